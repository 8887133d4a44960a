//! ext2filter: an nbdkit filter that serves one regular file from inside an
//! ext2/ext3/ext4 filesystem image provided by any nbdkit plugin.
//!
//! Layers, top to bottom; a module uses only those below it:
//!
//! - [`abi`]: everything that touches nbdkit's C ABI, and all of this
//!   crate's `unsafe`: the bindings (`abi::sys`), `filter_init` and the
//!   `extern "C"` callbacks (`abi::callbacks`), the process-wide state
//!   nbdkit's callbacks share (`abi::state`), and the plugin beneath us as
//!   a [`device::Device`] (`abi::plugin`).
//! - [`server`]: the configuration (parameters and their messages), the
//!   server started in `.after_fork`, and each connection's requests.
//! - [`file`]: a served file: its map (the extent tree read lazily, with
//!   the writes into holes not linked yet laid over it), reads and writes
//!   coalesced into few device requests, writes into holes (`file::holes`,
//!   the protocol's one home on this side), changes of the map, and the
//!   registry of served files (flush and shutdown reach every file).
//! - [`volume`]: the one filesystem every connection shares: the library
//!   lock (`volume::door`), opening it read-only and the upgrade to
//!   read-write (`volume::open`), changes and commits, the background
//!   commit, shutdown.
//! - [`image`]: the image as the filesystem sees it: the device, with a
//!   journal replayed in memory standing in for the blocks it replaces.
//! - [`device`]: the device trait the core runs over (the plugin in the
//!   server, bytes in memory in the in-process tests).
//! - [`pool`]: worker threads a request borrows to make several device
//!   calls at once.
//!
//! Below them all, the `ext2-rs` crate: libext2fs, the on-disk formats
//! (extent maps, JBD2, quotas, MMP) and crash-consistent metadata
//! transactions.

pub mod abi;
pub mod device;
pub mod file;
pub mod image;
pub mod pool;
pub mod server;
pub mod volume;

#[cfg(test)]
mod tests;
