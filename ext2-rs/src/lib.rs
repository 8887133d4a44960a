//! ext2-rs: safe Rust over libext2fs, for programs that serve or edit
//! ext2/ext3/ext4 images that live on any block device.
//!
//! Modules by layer, from C upwards (a module only uses those above it):
//! - [`sys`]: bindings generated from the installed libext2fs headers.
//! - `crc`, [`log`]: CRC32C and CRC32; where messages go.
//! - [`error`]: errors, errnos, libext2fs's codes, and the kinds a caller
//!   decides on (read-only, no space, already reported).
//! - [`ffi`]: the one C boundary (panic guard, typed `void *` conversions).
//! - [`format`], [`sb`]: the on-disk format read as bytes (byte readers,
//!   inodes, extent nodes); the superblock's raw fields.
//! - [`device`], [`io`]: the block-device trait a filesystem lives on; the
//!   libext2fs `io_manager` over it.
//! - [`extent_map`]: a file's block map, pure Rust.
//! - [`policy`]: what may be written, read only, or refused, by the
//!   kernel's rules for features and inode flags.
//! - [`handle`]: one open libext2fs handle, closed on drop.
//! - `libfile`, [`reserved`], [`undo`], [`quota`]: on the handle: a file
//!   through the library's own file code, the blocks the filesystem keeps
//!   for itself, undoing a failed change in the library's memory, quota
//!   usage.
//! - [`mmp`]: multi-mount protection on the device.
//! - [`fs`]: one open filesystem, made of the handle and those parts.
//! - [`dir`], [`mapping`]: directories; reading and changing where a
//!   file's blocks live (and where new ones go, [`mapping::hole_goal`]).
//! - [`lazy_map`]: a served file's block map read lazily from the device,
//!   without the library, checked as the kernel checks it, with a shared
//!   bounded cache.
//! - [`jbd2`]: the JBD2 journal format: parsing, recovery and writing.
//! - [`txn`]: crash-consistent metadata changes (journalled, or ordered
//!   without a journal) through a metadata cache libext2fs reads and
//!   writes; writes into holes (`txn/holes.rs`).
//! - [`testing`], [`crash`]: an in-memory device for tests, and crash
//!   states of recorded writes with their judge (`e2fsck`, the kernel).
//!
//! libext2fs is not thread-safe, not even for reads: a [`Filesystem`] is
//! `Send` but not `Sync`, and every method that calls the library takes
//! `&mut self`, so its owner decides how calls are serialized.

// For unit tests only; the dev-only crate `crash-judge` builds it for the filter's.
#[cfg(test)]
#[path = "../../crash-judge/src/crash/mod.rs"]
pub mod crash;
mod crc;
pub mod device;
pub mod dir;
pub mod error;
pub mod extent_map;
pub mod ffi;
pub mod format;
pub mod fs;
pub mod handle;
pub mod io;
pub mod jbd2;
pub mod lazy_map;
mod libfile;
pub mod log;
pub mod mapping;
pub mod mmp;
pub mod policy;
pub mod quota;
pub mod reserved;
pub mod sb;
pub mod sys;
// Always built, not behind a feature: a dev-dependency feature would make
// `cargo test` and `cargo build` link different filters, each rebuilding
// the .so the other's integration tests are running.
pub mod testing;
pub mod txn;
pub mod undo;

pub use device::BlockDevice;
pub use error::{Errno, Error, Ext2Code, Result};
pub use fs::{Access, Filesystem, Ino, InodeInfo, Layout};

/// Registers libext2fs's message table with com_err, so that error codes
/// print as the library's words (`Bad magic number in super-block`).
/// Call once before any message is formatted; undo with [`unload`].
pub fn load() {
    // SAFETY: registers a static table; com_err keeps a pointer to it.
    unsafe { sys::add_error_table(&sys::et_ext2_error_table) };
}

/// Removes what [`load`] registered.
pub fn unload() {
    // SAFETY: the table registered by `load`; com_err frees its list node.
    unsafe { sys::remove_error_table(&sys::et_ext2_error_table) };
}

/// The version of the libext2fs this process runs with, e.g. `1.47.0`.
pub fn library_version() -> String {
    let mut version: *const std::ffi::c_char = std::ptr::null();
    let mut date: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: two valid out-pointers; the library stores pointers to its
    // static strings there.
    unsafe { sys::ext2fs_get_library_version(&mut version, &mut date) };
    if version.is_null() {
        return String::from("unknown");
    }
    // SAFETY: non-null, pointing to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(version) }
        .to_string_lossy()
        .into_owned()
}
