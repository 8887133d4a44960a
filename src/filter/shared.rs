//! The one filesystem all connections share, and the registry of files
//! being served from it.
//!
//! Lock order, outermost first: the registry, a file's map, the allocation
//! gate, the filesystem lock.  Plugin I/O for file data happens under a
//! file's map lock at most, never under the filesystem lock.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::error::{Errno, Error, Result};
use crate::ext2::{io_shim, mapping, Access, Filesystem, Ino, Layout};
use crate::extent_map::FileMap;
use crate::filter::file::ServedFile;
use crate::image::Image;
use crate::nbdkit::report::{ext2_debug_lock, ext2_debug_map, nbd_debug};
use crate::nbdkit::Plugin;

pub struct Shared {
    /// Where file data and metadata are read and written.
    pub image: Arc<Image>,
    /// The process-wide libext2fs lock: every library call holds it.
    fs: Mutex<Filesystem>,
    /// Held shared from allocating blocks until they are linked into a file,
    /// and exclusively by flush, so a flush never records blocks as in use
    /// that no file owns yet.
    alloc_gate: RwLock<()>,
    files: Mutex<HashMap<Ino, Weak<ServedFile>>>,
    pub block_size: u32,
    pub access: Access,
}

impl Shared {
    /// Opens the filesystem over `plugin`.  A filesystem libext2fs can only
    /// read, or whose journal needs recovery, is served read-only with a
    /// message saying why.
    pub fn open(plugin: Plugin, want_write: bool) -> Result<Shared> {
        let plugin = Arc::new(plugin);
        let mut image = Arc::new(Image::new(plugin.clone()));
        let mut access = if want_write && plugin.capabilities().can_write {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        };
        let mut fs = match Filesystem::open(io_shim::register(image.clone()), access) {
            Err(Error::Ext2 { code, .. })
                if access == Access::ReadWrite
                    && code.0 == crate::sys::EXT2_ET_RO_UNSUPP_FEATURE as crate::sys::errcode_t =>
            {
                crate::nbdkit::report::error(
                    "the filesystem has features libext2fs can read but not write: serving read-only",
                );
                access = Access::ReadOnly;
                Filesystem::open(io_shim::register(image.clone()), access)?
            }
            other => other?,
        };
        if fs.needs_recovery() {
            // The journal is replayed in memory and never written: the image
            // is served read-only, every read seeing the replayed blocks.
            if access == Access::ReadWrite {
                crate::nbdkit::report::error(
                    "the filesystem's journal needs recovery: replaying it in memory and \
                     serving read-only (run e2fsck on the image to serve it read-write)",
                );
                drop(fs);
                access = Access::ReadOnly;
                fs = Filesystem::open(io_shim::register(image.clone()), access)?;
            }
            let bs = u64::from(fs.block_size());
            let read_block = |block: u64, buf: &mut [u8]| -> std::result::Result<(), Errno> {
                plugin.pread(buf, block.checked_mul(bs).ok_or(Errno::EIO)?)
            };
            let replay = crate::journal::load(&mut fs, &read_block)?;
            drop(fs);
            image = Arc::new(Image::with_replay(plugin.clone(), replay, bs));
            fs = Filesystem::open(io_shim::register(image.clone()), access)?;
        }
        Ok(Shared {
            block_size: fs.block_size(),
            image,
            fs: Mutex::new(fs),
            alloc_gate: RwLock::new(()),
            files: Mutex::new(HashMap::new()),
            access,
        })
    }

    pub fn plugin(&self) -> &Plugin {
        self.image.plugin()
    }

    pub fn writable(&self) -> bool {
        self.access == Access::ReadWrite
    }

    /// Takes the libext2fs lock.
    pub fn lock_fs(&self) -> MutexGuard<'_, Filesystem> {
        if !ext2_debug_lock.enabled() {
            return self.fs.lock();
        }
        let start = Instant::now();
        let guard = self.fs.lock();
        let waited = start.elapsed();
        if waited.as_micros() >= 1000 {
            nbd_debug!(
                ext2_debug_lock,
                "waited {:?} for the filesystem lock",
                waited
            );
        }
        guard
    }

    pub fn allocation_pass(&self) -> RwLockReadGuard<'_, ()> {
        self.alloc_gate.read()
    }

    /// The shared state of the file at `path`, building its block map the
    /// first time any connection opens it.
    pub fn open_file(&self, path: &str) -> Result<Arc<ServedFile>> {
        let lookup = crate::filter::config::lookup_path(path)
            .map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        let mut files = self.files.lock();
        let mut fs = self.lock_fs();
        let ino = fs
            .lookup(&lookup)
            .map_err(|e| rename_context(e, format!("{path}: namei")))?;
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let info = fs
            .inode(ino)
            .map_err(|e| rename_context(e, format!("{path}: inode")))?;
        if !info.is_regular() {
            return Err(Error::other(
                if info.is_dir() {
                    Errno::EISDIR
                } else {
                    Errno::EINVAL
                },
                format!("{path}: must be a regular file in the disk image"),
            ));
        }
        let extents = mapping::read_map(&mut fs, ino, info.layout)
            .map_err(|e| rename_context(e, path.to_string()))?;
        let count = extents.len();
        let map = FileMap::new(fs.block_size(), extents).map_err(|msg| {
            Error::other(Errno::EIO, format!("{path}: {msg}: the image is damaged"))
        })?;
        nbd_debug!(
            ext2_debug_map,
            "{path}: inode {ino}, {} bytes, {:?}, {count} extents in {} runs ({} bytes of map)",
            info.size,
            info.layout,
            map.extents().len(),
            map.memory()
        );
        drop(fs);
        let file = Arc::new(ServedFile::new(
            ino,
            path.to_string(),
            info.size,
            info.layout,
            map,
        ));
        files.retain(|_, weak| weak.strong_count() > 0);
        files.insert(ino, Arc::downgrade(&file));
        Ok(file)
    }

    /// Makes the filesystem's metadata and then the plugin durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable() {
            let _no_allocations = self.alloc_gate.write();
            // ext2fs_flush2 ends with a flush of our channel, i.e. the plugin.
            self.lock_fs().flush()
        } else {
            self.image.flush().map_err(Error::from)
        }
    }

    pub fn layout_supports_write(layout: Layout) -> bool {
        layout != Layout::Inline
    }
}

/// Prefixes a library error with what it was about, as the C filter does
/// (`/nonexistent: namei: File not found by ext2_lookup`).
fn rename_context(err: Error, context: String) -> Error {
    match err {
        Error::Ext2 { code, .. } => Error::Ext2 { context, code },
        Error::Other { message, errno } => Error::Other {
            message: format!("{context}: {message}"),
            errno,
        },
        other => other,
    }
}
