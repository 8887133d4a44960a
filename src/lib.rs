//! ext2filter: an nbdkit filter that serves one regular file from inside an
//! ext2/ext3/ext4 filesystem image provided by any nbdkit plugin.
//!
//! Layers, from C to logic (a module only uses those above it):
//! - [`sys`]: bindings generated from the installed nbdkit headers.
//! - [`nbdkit`]: safe wrappers over nbdkit's filter API (the plugin context,
//!   messages, debug flags, handles).
//! - the `ext2-rs` crate: everything about libext2fs and the on-disk
//!   formats (filesystem, block maps, JBD2), over a block-device trait.
//! - [`pool`]: worker threads a request borrows to make several plugin
//!   calls at once.
//! - [`image`]: the image as the filesystem sees it, i.e. that block
//!   device: the plugin, plus any journal replayed in memory.
//! - [`filter`]: what the filter does, in safe Rust.
//! - [`callbacks`]: `filter_init` and the `extern "C"` callbacks, the one
//!   place that knows both nbdkit's ABI and the filter's logic.

// In the unit-test build `filter_init` is left out (it would pull nbdkit's
// symbols into a test binary that cannot link them), so the callbacks it
// refers to look unused there.
pub mod abi;
pub mod file;
pub mod image;
pub mod pool;
pub mod server;
pub mod volume;
