//! The one filesystem all connections share, the registry of files being
//! served from it, and the one way to change its metadata
//! ([`Shared::change`]).
//!
//! Lock order, outermost first: the registry, a file's map, the filesystem
//! lock.  Plugin I/O for file data happens under a file's map lock; only a
//! change's own data (the blocks it links) is written under the filesystem
//! lock, so that a change is one unit.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use crate::filter::committer::Committer;
use crate::filter::config::JournalMode;
use crate::filter::file::ServedFile;
use crate::filter::opening;
use crate::image::Image;
use crate::nbdkit::report::{ext2_debug_lock, ext2_debug_map, nbd_debug, nbd_error};
use crate::nbdkit::Plugin;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::FileMap;
use ext2_rs::mapping::BlockRuns;
use ext2_rs::txn::{Durability, Transactions};
use ext2_rs::{mapping, Access, Filesystem, Ino};

/// The filesystem and, when it is writable, its running transaction:
/// what the process-wide libext2fs lock guards.
pub struct FsState {
    pub fs: Filesystem,
    pub tx: Option<Transactions>,
}

pub struct Shared {
    /// Where file data and metadata are read and written.
    pub image: Arc<Image>,
    /// The process-wide libext2fs lock: every library call holds it.
    /// Emptied by [`Shared::shutdown`].
    state: Arc<Mutex<Option<FsState>>>,
    committer: Committer,
    files: Mutex<HashMap<Ino, Weak<ServedFile>>>,
    pub block_size: u32,
    /// Blocks per allocation cluster (bigalloc; 1 otherwise).
    pub cluster_ratio: u64,
    pub access: Access,
}

/// What a change's closure works with: the filesystem, and the image for
/// the file data it writes before linking it.
pub struct Tx<'a> {
    fs: &'a mut Filesystem,
    image: &'a Image,
    budget: u64,
}

impl<'a> Tx<'a> {
    pub fn fs(&mut self) -> &mut Filesystem {
        self.fs
    }

    /// The image, for writing the file data a change links (see
    /// [`Tx::write_data`]).
    pub fn image(&self) -> &'a Image {
        self.image
    }

    /// Writes file data into blocks the change allocated (or owns
    /// unwritten), before it links them: a failure fails the change.
    pub fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.image.pwrite(buf, offset, false)?)
    }

    /// About how many metadata blocks one change may touch; a change that
    /// could touch more (freeing a long range) splits itself.
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

impl Shared {
    /// Opens the filesystem over `plugin`, read-write if `want_write` and
    /// the image allows it (see [`opening::open_filesystem`]).
    pub fn open(plugin: Plugin, want_write: bool, journal: JournalMode) -> Result<Shared> {
        let (image, fs, access, tx) = opening::open_filesystem(plugin, want_write, journal)?;
        Ok(Shared {
            block_size: fs.block_size(),
            cluster_ratio: fs.cluster_ratio(),
            image,
            state: Arc::new(Mutex::new(Some(FsState { fs, tx }))),
            committer: Committer::default(),
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
    fn lock_state(&self) -> Result<MappedMutexGuard<'_, FsState>> {
        let start = ext2_debug_lock.enabled().then(Instant::now);
        let guard = self.state.lock();
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

    /// Takes the libext2fs lock, to read the filesystem (changes go through
    /// [`Shared::change`]).
    pub fn lock_fs(&self) -> Result<MappedMutexGuard<'_, Filesystem>> {
        Ok(MappedMutexGuard::map(self.lock_state()?, |state| {
            &mut state.fs
        }))
    }

    /// `.cleanup`: commits what is still in memory and leaves the image as
    /// a clean unmount does (see `Transactions::shutdown`), closes the
    /// filesystem, then the plugin context.  nbdkit may clean up while
    /// connections still hold this state: their later requests fail with
    /// ESHUTDOWN.  Metadata that cannot be written now is reported: it is
    /// lost, and the image holds what the last commit left (recoverable).
    pub fn shutdown(&self) {
        self.committer.stop();
        if let Some(FsState { mut fs, tx }) = self.state.lock().take() {
            if let Some(mut tx) = tx {
                if let Err(e) = tx.shutdown(&mut fs) {
                    nbd_error!(
                        "shutdown: the last metadata changes could not be written ({e}): the \
                         image holds what the last commit left, which e2fsck or the kernel \
                         recovers"
                    );
                }
            }
            drop(fs);
        }
        if let Err(e) = self.image.flush() {
            nbd_error!("flushing the plugin at shutdown failed (errno {})", e.get());
        }
        self.image.plugin().close();
    }

    /// The shared state of the file at `path`, building its block map the
    /// first time any connection opens it.
    pub fn open_file(&self, path: &str) -> Result<Arc<ServedFile>> {
        let lookup = crate::filter::config::lookup_path(path)
            .map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        let mut files = self.files.lock();
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        let ino = fs
            .lookup(&lookup)
            .map_err(|e| e.in_context(format!("{path}: namei")))?;
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
        if let Some(tx) = tx {
            // Writes into holes of an earlier served copy of this file may
            // wait to be linked: the tree read below must hold them.
            tx.link_pending(fs, ino)
                .map_err(|e| e.in_context(path.to_string()))?;
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
        let extents =
            mapping::read_map(fs, ino, info.layout).map_err(|e| e.in_context(path.to_string()))?;
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
        let cluster_ratio = fs.cluster_ratio();
        drop(state);
        let file = Arc::new(ServedFile::new(
            ino,
            path.to_string(),
            info.size,
            info.layout,
            cluster_ratio,
            map,
        ));
        files.retain(|_, weak| weak.strong_count() > 0);
        files.insert(ino, Arc::downgrade(&file));
        Ok(file)
    }

    /// Changes the filesystem's metadata as one unit, in the running
    /// transaction (see `ext2_rs::txn`): `op` gets the filesystem and may
    /// write the file data it is about to link ([`Tx::write_data`]).  If
    /// `op` fails, or panics, everything it did is undone in libext2fs's
    /// memory and none of its metadata is ever written; the error (or the
    /// panic) goes on to the caller.  When it succeeds its metadata reaches
    /// the image only in a commit that keeps the image recoverable: at a
    /// client's flush or FUA, when the transaction grows large, at once
    /// for a change that freed blocks, or within a second in the
    /// background.  `ino` is the inode it changes.
    pub fn change<T>(&self, ino: Ino, op: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.change_allocating(ino, 0, op)
    }

    /// [`Shared::change`] for a change that allocates up to `count`
    /// blocks: refused with ENOSPC when that would leave the transaction
    /// too few for its own metadata.
    pub fn change_allocating<T>(
        &self,
        ino: Ino,
        count: u64,
        op: impl FnOnce(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.with_transactions(|fs, tx, image| {
            let budget = tx.change_limit();
            let op = |fs: &mut Filesystem| op(&mut Tx { fs, image, budget });
            if count == 0 {
                tx.change(fs, Some(ino), op)
            } else {
                tx.change_allocating(fs, ino, count, op)
            }
        })
    }

    /// Runs `f` on the filesystem and its transactions, under the lock,
    /// with the background commit started (changes go through here).
    fn with_transactions<T>(
        &self,
        f: impl FnOnce(&mut Filesystem, &mut Transactions, &Image) -> Result<T>,
    ) -> Result<T> {
        self.committer.ensure_started(&self.state);
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        let tx = tx
            .as_mut()
            .ok_or_else(|| Error::other(Errno::EROFS, "the filesystem is read-only"))?;
        f(fs, tx, &self.image)
    }

    /// Fills a hole of extent file `ino` (not bigalloc) at file blocks from
    /// `logical`, as one change: `fill(fs, image, goal)` allocates the
    /// blocks near `goal` and writes their data, returning the runs; they
    /// are linked into the file's tree at the commit (see
    /// `Transactions::fill_hole`), the caller's map serving them until then.
    /// `near` is a goal the caller knows from a neighbour.
    pub fn fill_hole(
        &self,
        ino: Ino,
        logical: u64,
        count: u64,
        near: Option<u64>,
        fill: impl FnOnce(&mut Filesystem, &Image, u64) -> Result<BlockRuns>,
    ) -> Result<BlockRuns> {
        self.with_transactions(|fs, tx, image| {
            tx.fill_hole(fs, ino, logical, count, near, |fs, goal| {
                fill(fs, image, goal)
            })
        })
    }

    /// Makes everything durable: commits the metadata home (see
    /// `Transactions::commit`) and flushes the plugin.
    pub fn flush(&self) -> Result<()> {
        if !self.writable() {
            return self.image.flush().map_err(Error::from);
        }
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        match tx {
            Some(tx) => tx.commit(fs, Durability::Home),
            None => self.image.flush().map_err(Error::from),
        }
    }
}
