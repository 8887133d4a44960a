//! Safe wrappers over libext2fs: the filesystem, block maps, and the
//! io_manager that puts the filesystem on top of the nbdkit plugin.

pub mod dir;
pub mod fs;
pub mod io_shim;
pub mod mapping;
pub mod reserved;
pub mod undo;

pub use fs::{Access, Filesystem, Ino, InodeInfo, Layout};
