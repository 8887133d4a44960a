//! ext2filter: an nbdkit filter that serves one regular file from inside an
//! ext2/ext3/ext4 filesystem image provided by any nbdkit plugin.
//!
//! Layers, from C to logic:
//! - [`sys`]: bindings generated from the installed nbdkit and libext2fs headers.
//! - [`nbdkit`]: safe wrappers over nbdkit's filter API (the plugin context,
//!   messages, debug flags, handles, the panic guard).
//! - [`ext2`]: safe wrappers over libext2fs and the io_manager that puts the
//!   filesystem on top of the plugin.
//! - [`image`]: the image as the filesystem sees it (the plugin, plus any
//!   journal replayed in memory by [`journal`]).
//! - [`extent_map`]: the pure block map of a served file.
//! - [`filter`]: what the filter does, in safe Rust.
//! - [`callbacks`]: `filter_init` and the `extern "C"` callbacks, the one
//!   place that knows both nbdkit's ABI and the filter's logic.

// In the unit-test build `filter_init` is left out (it would pull nbdkit's
// symbols into a test binary that cannot link them), so the callbacks it
// refers to look unused there.
#[cfg_attr(test, allow(dead_code))]
pub mod callbacks;
pub mod error;
pub mod ext2;
pub mod extent_map;
pub mod filter;
pub mod image;
pub mod journal;
pub mod nbdkit;
pub mod sys;
