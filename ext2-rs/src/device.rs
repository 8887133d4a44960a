//! The block device a filesystem lives on.
//!
//! libext2fs reaches its device only through [`crate::io`], which calls
//! this trait; the host implements it (a server: the image beneath it, with
//! its journal overlay; tests: [`crate::testing::MemDevice`]).  A device
//! reports its own failures where they happen: its errno comes back as
//! [`crate::Error::reported`].

use crate::error::Errno;

/// A device of [`BlockDevice::size`] bytes, addressed in bytes.  Calls may
/// come from any thread; requests outside the device must fail, not wrap.
pub trait BlockDevice: Send + Sync {
    /// The device's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno>;
    /// Writes `len` zero bytes at `offset`.
    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), Errno>;
    /// Fills each `(offset, buf)`, returning each read's outcome in order.
    /// A device that can serve requests in parallel issues them together.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        reads
            .iter_mut()
            .map(|(offset, buf)| self.read_at(buf, *offset))
            .collect()
    }
}
