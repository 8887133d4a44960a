//! The one filesystem all connections share, and the registry of files
//! being served from it.
//!
//! Lock order, outermost first: the registry, a file's map, the allocation
//! gate, the filesystem lock.  Plugin I/O for file data happens under a
//! file's map lock at most, never under the filesystem lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::filter::file::ServedFile;
use crate::filter::opening;
use crate::image::Image;
use crate::nbdkit::report::{ext2_debug_lock, ext2_debug_map, nbd_debug, nbd_error};
use crate::nbdkit::Plugin;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::lazy_map::{LazyMap, MapSource};
use ext2_rs::mmp::Protection;
use ext2_rs::policy::Verdict;
use ext2_rs::{Filesystem, Ino};

pub struct Shared {
    /// Where file data and metadata are read and written.
    pub image: Arc<Image>,
    /// The process-wide libext2fs lock: every library call holds it.
    /// Emptied by [`Shared::shutdown`].
    fs: Mutex<Option<Filesystem>>,
    /// Held shared from allocating blocks until they are linked into a file,
    /// and exclusively by flush, so a flush never records blocks as in use
    /// that no file owns yet.
    alloc_gate: RwLock<()>,
    files: Mutex<HashMap<Ino, Weak<ServedFile>>>,
    /// Where served files' maps are read from, and their shared cache.
    map_source: MapSource,
    /// The MMP block held while the filesystem is written (`mmp`), released
    /// by [`Shared::shutdown`].
    mmp: Mutex<Option<Protection>>,
    pub block_size: u32,
    /// Read-only from the start until the first writable connection has
    /// re-opened the filesystem read-write ([`opening::reopen_writable`]).
    writable: AtomicBool,
}

impl Shared {
    /// Opens the filesystem over `plugin` read-only, an unclean journal
    /// replayed in memory (see [`opening::open_read_only`]); files' maps
    /// share a cache of about `map_cache` bytes.
    pub fn open(plugin: Plugin, map_cache: usize) -> Result<Shared> {
        let (image, fs) = opening::open_read_only(plugin)?;
        Ok(Shared {
            map_source: MapSource::new(&fs, image.clone(), map_cache)
                .with_background(Arc::new(crate::pool::spawn)),
            mmp: Mutex::new(None),
            block_size: fs.block_size(),
            image,
            fs: Mutex::new(Some(fs)),
            alloc_gate: RwLock::new(()),
            files: Mutex::new(HashMap::new()),
            writable: AtomicBool::new(false),
        })
    }

    pub fn plugin(&self) -> &Plugin {
        self.image.plugin()
    }

    /// Opened read-write, and no other node has taken the filesystem since
    /// (multi-mount protection).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire) && !self.image.fenced_off()
    }

    /// Says the filesystem now in the lock is open read-write, under the
    /// MMP block `held` if it has the `mmp` feature.
    pub fn now_writable(&self, held: Option<Protection>) {
        *self.mmp.lock() = held;
        self.writable.store(true, Ordering::Release);
    }

    /// Takes the libext2fs lock.
    pub fn lock_fs(&self) -> Result<MappedMutexGuard<'_, Filesystem>> {
        let start = ext2_debug_lock.enabled().then(Instant::now);
        let guard = self.fs.lock();
        if let Some(waited) = start.map(|s| s.elapsed()) {
            if waited.as_micros() >= 1000 {
                nbd_debug!(
                    ext2_debug_lock,
                    "waited {:?} for the filesystem lock",
                    waited
                );
            }
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))
    }

    /// `.cleanup`: closes the filesystem, writing its metadata, then the
    /// plugin context.  nbdkit may clean up while connections still hold
    /// this state: their later requests fail with ESHUTDOWN.
    pub fn shutdown(&self) {
        {
            let _no_allocations = self.alloc_gate.write();
            // Dropping the filesystem closes it (ext2fs_close2 flushes).
            drop(self.fs.lock().take());
        }
        if let Err(e) = self.image.flush() {
            nbd_error!("flushing the plugin at shutdown failed (errno {})", e.get());
        }
        // Everything is written: the MMP block can say the filesystem is
        // free (unless another node took it).
        if let Some(held) = self.mmp.lock().take() {
            if let Err(e) = held.release() {
                nbd_error!("{e}");
            }
        }
        self.image.plugin().close();
    }

    pub fn allocation_pass(&self) -> RwLockReadGuard<'_, ()> {
        self.alloc_gate.read()
    }

    /// The shared state of the file at `path`, reading its inode the first
    /// time any connection opens it.
    pub fn open_file(&self, path: &str) -> Result<Arc<ServedFile>> {
        let lookup = crate::filter::config::lookup_path(path)
            .map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        let mut files = self.files.lock();
        let mut fs = self.lock_fs()?;
        let ino = fs
            .lookup(&lookup)
            .map_err(|e| e.in_context(format!("{path}: namei")))?;
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let info = fs
            .inode(ino)
            .map_err(|e| e.in_context(format!("{path}: inode")))?;
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
        // The kernel's rules for the file's inode flags: encrypted files are
        // refused, immutable ones served read-only...
        let read_only = match ext2_rs::policy::file(path, info.flags) {
            Verdict::Refused(why) => return Err(Error::other(Errno::ENOTSUP, why)),
            Verdict::ReadOnly(why) => Some(why),
            Verdict::ReadWrite => None,
        };
        // Only the inode is read: map blocks are read as requests need them.
        let map = LazyMap::open(&mut fs, self.map_source.clone(), ino, path)?;
        nbd_debug!(
            ext2_debug_map,
            "{path}: inode {ino}, {} bytes, {:?}, map read lazily ({:?})",
            info.size,
            info.layout,
            self.map_source.cache.stats()
        );
        let cluster_ratio = fs.cluster_ratio();
        drop(fs);
        if let Some(why) = &read_only {
            crate::nbdkit::report::error(&format!("{why}: serving it read-only"));
        }
        let file = Arc::new(ServedFile::new(
            ino,
            path.to_string(),
            info.size,
            info.layout,
            cluster_ratio,
            map,
            read_only,
        ));
        files.retain(|_, weak| weak.strong_count() > 0);
        files.insert(ino, Arc::downgrade(&file));
        Ok(file)
    }

    /// Runs a change of the filesystem's metadata as one unit: its writes
    /// reach the plugin only if it succeeds in libext2fs's memory, and if it
    /// fails, the library's memory is rolled back too (`ext2::undo`), so a
    /// failing plugin never leaves half a change behind.  Writes that then
    /// fail to reach the plugin stay pending in the image, are read back
    /// from there, and are retried before the next change and by flush,
    /// which reports the failure: until a flush succeeds nothing was
    /// promised durable.
    pub fn change_metadata<T>(
        &self,
        fs: &mut Filesystem,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        self.image.write_pending().map_err(|errno| {
            Error::other(
                errno,
                "earlier metadata writes still fail to reach the plugin",
            )
        })?;
        let before = self.image.pending_count();
        self.image.begin_changes();
        let result = ext2_rs::undo::with_undo(fs, op);
        self.image.end_changes(result.is_ok(), before);
        let value = result?;
        if let Err(errno) = self.image.write_pending() {
            nbd_debug!(
                ext2_debug_map,
                "metadata writes failed (errno {}): kept for the next flush",
                errno.get()
            );
        }
        Ok(value)
    }

    /// Makes the filesystem's metadata and then the plugin durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable() {
            let _no_allocations = self.alloc_gate.write();
            let mut fs = self.lock_fs()?;
            self.image.write_pending().map_err(|errno| {
                Error::other(
                    errno,
                    "flush: metadata writes still fail to reach the plugin",
                )
            })?;
            // ext2fs_flush2 ends with a flush of our channel, i.e. the plugin.
            fs.flush()
        } else {
            self.image.flush().map_err(Error::from)
        }
    }
}
