//! The storage under the filesystem image, as the filter's core sees it:
//! the nbdkit plugin in the server (`abi::plugin`), bytes in memory in
//! tests ([`memory`]).
//!
//! Everything above this trait is plain Rust that never names nbdkit, so
//! the whole core (shared filesystem, served files, writes into holes,
//! commits, the read-write upgrade) runs in process over [`memory`].

#[cfg(test)]
pub mod memory;

use ext2_rs::error::Errno;

/// What a device can do, learnt when it was (re)opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub can_write: bool,
    pub can_flush: bool,
    /// Honours FUA itself (otherwise a write with FUA is followed by a
    /// flush, where the device can flush).
    pub native_fua: bool,
    /// Fails a fast zero rather than writing zeroes slowly.
    pub can_fast_zero: bool,
    pub can_trim: bool,
}

/// A byte-addressed device the filesystem image lives on.
///
/// Requests outside `[0, size)`, writes to a read-only device and fast
/// zeroes it cannot do fail with an errno; none of them may abort.
pub trait Device: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// What the device can do now.
    fn capabilities(&self) -> Capabilities;

    /// Whether several requests may be in flight at once.
    fn parallel(&self) -> bool;

    /// What the device says it is, for the export description.
    fn description(&self) -> Option<String>;

    /// Fills `buf` from `offset`.
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno>;

    /// Writes `buf` at `offset`; `fua` makes it durable before returning.
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno>;

    /// Writes `len` zero bytes at `offset`; `may_trim` lets the device
    /// deallocate them; `fast` asks it to fail with ENOTSUP rather than
    /// write zeroes slowly.
    fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno>;

    /// Tells the device `len` bytes at `offset` are no longer needed (their
    /// content is unknown afterwards).
    fn trim(&self, len: u64, offset: u64) -> Result<(), Errno>;

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), Errno>;

    /// The device starts read-only (so `nbdkit -r` never opens the plugin
    /// for writing): opens it for writing, once requests in flight are
    /// done.  Nothing changes when it already is; afterwards
    /// [`Device::capabilities`] says whether it can write after all.
    fn open_writable(&self) -> Result<(), Errno>;

    /// Closes the device: requests in flight finish, later ones fail with
    /// ESHUTDOWN.
    fn close(&self);
}
