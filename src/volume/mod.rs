//! The one filesystem all connections share: opened read-only over the
//! device at start, re-opened read-write once for the first connection
//! that may write ([`Volume::admit`]), changed only through
//! [`Volume::change`] and friends, committed by [`Volume::commit`], in the
//! background ([`committer`]) and at [`Volume::shutdown`].
//!
//! Every libext2fs call goes through the one door ([`door`]).  Lock order,
//! outermost first: the served-file registry (`file::registry`), a file's
//! map, the door.  Plugin I/O for file data happens under a file's map
//! lock; only a change's own data (the blocks it links) is written through
//! the door, so that a change is one unit.
//!
//! A file's extent tree changes only under its map lock held exclusively
//! (its readers walk the tree with no library lock: `ext2_rs::lazy_map`):
//! changes name the file they change, and `ext2_rs::txn` changes a tree
//! only in such a change, or when asked to link a file's pending writes
//! (`file::holes`), which the file's own code does under its lock.

pub mod committer;
pub mod discard;
pub mod door;
pub mod open;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{MappedMutexGuard, Mutex};

use crate::device::Device;
use crate::image::{Image, MapDevice};
use crate::volume::committer::{Committer, INTERVAL};
use crate::volume::discard::DiscardMode;
use crate::volume::door::{Door, FsState};
use crate::volume::open::Reopened;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::lazy_map::{LazyMap, MapSource};
use ext2_rs::log::{self, Topic};
use ext2_rs::mmp::Protection;
use ext2_rs::policy::Verdict;
use ext2_rs::txn::{Durability, Transactions};
use ext2_rs::{Filesystem, Ino, Layout};

pub use open::JournalMode;

pub struct Volume {
    /// Where file data and metadata are read and written.
    pub image: Arc<Image>,
    /// The process-wide libext2fs lock: every library call holds it.
    door: Arc<Door>,
    committer: Committer,
    /// Where served files' maps are read from, and their shared cache.
    map_source: MapSource,
    /// The device under `map_source`, switched to the transactions'
    /// metadata cache once the filesystem is writable.
    map_device: Arc<MapDevice>,
    /// The MMP block held while the filesystem is written (`mmp`), released
    /// by [`Volume::shutdown`].
    mmp: Mutex<Option<Protection>>,
    pub block_size: u32,
    /// Blocks per allocation cluster (bigalloc; 1 otherwise).
    pub cluster_ratio: u64,
    /// Read-only from the start until the first writable connection has
    /// re-opened the filesystem read-write ([`Volume::admit`]).
    writable: AtomicBool,
    /// Whether the re-open for the first writable connection has settled;
    /// held while it runs, so that other writable connections wait for it.
    reopened: Mutex<bool>,
    /// Whether the log says why the journal stays unwritten (told once, by
    /// the first read-only connection or the re-open).
    told_read_only: AtomicBool,
    /// Whether commits trim the blocks they freed (`ext2discard`), decided
    /// when the filesystem is opened read-write.
    discard: Mutex<DiscardMode>,
}

/// A regular file found in the filesystem, to serve.
pub struct FoundFile {
    pub ino: Ino,
    pub size: u64,
    pub layout: Layout,
    pub cluster_ratio: u64,
    /// Its map, read lazily.
    pub map: LazyMap,
    /// Why it must be served read-only, if it must (its inode's flags).
    pub read_only: Option<String>,
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
        self.image
            .pwrite(buf, offset, false)
            .map_err(Error::reported)
    }

    /// About how many metadata blocks one change may touch; a change that
    /// could touch more (freeing a long range) splits itself.
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// The path libext2fs should look up, as a kernel would read it: repeated
/// slashes count as one, and a trailing slash names a directory, which can
/// never be served (`Err` with the message).
pub fn lookup_path(path: &str) -> std::result::Result<String, String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if path.ends_with('/') && !parts.is_empty() {
        return Err(format!("{path}: must be a regular file in the disk image"));
    }
    Ok(format!("/{}", parts.join("/")))
}

impl Volume {
    /// Opens the filesystem over `device` read-only, an unclean journal
    /// replayed in memory (see [`open::open_read_only`]); files' maps
    /// share a cache of about `map_cache` bytes.
    pub fn open(device: Arc<dyn Device>, map_cache: usize) -> Result<Volume> {
        let (image, fs) = open::open_read_only(device)?;
        let map_device = Arc::new(MapDevice::new(image.clone()));
        Ok(Volume {
            map_source: MapSource::new(&fs, map_device.clone(), map_cache)
                .with_background(Arc::new(crate::pool::spawn)),
            map_device,
            mmp: Mutex::new(None),
            block_size: fs.block_size(),
            cluster_ratio: fs.cluster_ratio(),
            image,
            door: Arc::new(Door::new(FsState { fs, tx: None })),
            committer: Committer::default(),
            writable: AtomicBool::new(false),
            reopened: Mutex::new(false),
            told_read_only: AtomicBool::new(false),
            discard: Mutex::new(DiscardMode::Auto),
        })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        self.image.device()
    }

    /// Whether the blocks commits free are trimmed in the device (see
    /// [`discard`]), once the filesystem is opened read-write: set before.
    pub fn set_discard(&self, mode: DiscardMode) {
        *self.discard.lock() = mode;
    }

    /// Opened read-write, and no other node has taken the filesystem since
    /// (multi-mount protection).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire) && !self.image.fenced_off()
    }

    /// Readies the filesystem for a connection that may write (`writable`)
    /// or not.  The first that may write re-opens it read-write, once (see
    /// [`open::reopen_writable`]), holding the library lock so that other
    /// connections' requests wait and then see the re-opened filesystem;
    /// connections arriving meanwhile wait here until that has settled.
    /// `Err` (the connection fails) leaves it read-only for the next
    /// writable connection to try again.
    pub fn admit(&self, writable: bool, journal: JournalMode) -> Result<()> {
        if !writable {
            if let Some(note) = open::read_only_note(&self.image, journal) {
                if !self.told_read_only.swap(true, Ordering::Relaxed) {
                    log::error(note);
                }
            }
            return Ok(());
        }
        let mut settled = self.reopened.lock();
        if *settled {
            return Ok(());
        }
        let mut state = self.door.lock()?;
        match open::reopen_writable(&self.image, &mut state.fs, journal)? {
            Reopened::Unchanged => {}
            Reopened::ReadOnly(fs) => state.fs = fs,
            Reopened::Writable { fs, mut tx, held } => {
                self.map_device.read_through(tx.cache().clone());
                let bs = u64::from(fs.block_size());
                if let Some(discard) = discard::discarder(&self.image, bs, *self.discard.lock()) {
                    tx.discard_freed(discard);
                }
                state.fs = fs;
                state.tx = Some(*tx);
                *self.mmp.lock() = held;
                self.writable.store(true, Ordering::Release);
            }
        }
        *settled = true;
        // It said why, if the image stays read-only: a read-only
        // connection has nothing to add.
        self.told_read_only.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Takes the libext2fs lock, to read the filesystem (changes go through
    /// [`Volume::change`]).
    pub fn lock_fs(&self) -> Result<MappedMutexGuard<'_, Filesystem>> {
        Ok(MappedMutexGuard::map(self.door.lock()?, |state| {
            &mut state.fs
        }))
    }

    /// The inode `path` names.
    pub fn lookup(&self, path: &str) -> Result<Ino> {
        let lookup = lookup_path(path).map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        self.lock_fs()?
            .lookup(&lookup)
            .map_err(|e| e.in_context(path))
    }

    /// Reads inode `ino` (found at `path`) to serve it: a regular file the
    /// kernel's rules let us open, its map read lazily from now on.
    pub fn open_inode(&self, ino: Ino, path: &str) -> Result<FoundFile> {
        let mut state = self.door.lock()?;
        let FsState { fs, tx } = &mut *state;
        if let Some(tx) = tx {
            // Writes into holes of an earlier served copy of this file may
            // wait to be linked (no one reads that copy's tree now): the
            // tree read below must hold them.
            tx.link_pending(fs, ino)
                .map_err(|e| e.in_context(path.to_string()))?;
        }
        let info = fs.inode(ino).map_err(|e| e.in_context(path))?;
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
        let map = LazyMap::open(fs, self.map_source.clone(), ino, path)?;
        ext2_rs::debug!(
            Topic::Map,
            "{path}: inode {ino}, {} bytes, {:?}, map read lazily ({:?})",
            info.size,
            info.layout,
            self.map_source.cache.stats()
        );
        Ok(FoundFile {
            ino,
            size: info.size,
            layout: info.layout,
            cluster_ratio: fs.cluster_ratio(),
            map,
            read_only,
        })
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
    /// background.  `ino` is the inode it changes, whose map lock the
    /// caller holds exclusively (its pending writes are linked first).
    pub fn change<T>(&self, ino: Ino, op: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.change_allocating(ino, 0, op)
    }

    /// [`Volume::change`] for a change that allocates up to `count`
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
    /// with the background commit started: every change of a writable
    /// filesystem goes through here.
    pub fn with_transactions<T>(
        &self,
        f: impl FnOnce(&mut Filesystem, &mut Transactions, &Image) -> Result<T>,
    ) -> Result<T> {
        self.start_committer();
        let mut state = self.door.lock()?;
        let FsState { fs, tx } = &mut *state;
        let tx = tx
            .as_mut()
            .ok_or_else(|| Error::other(Errno::EROFS, "the filesystem is read-only"))?;
        f(fs, tx, &self.image)
    }

    /// Runs `f` on the filesystem and its transactions, if it is writable
    /// (`None` otherwise), under the lock.
    pub fn with_transactions_if_writable<T>(
        &self,
        f: impl FnOnce(&mut Filesystem, &mut Transactions) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut state = self.door.lock()?;
        let FsState { fs, tx } = &mut *state;
        tx.as_mut().map(|tx| f(fs, tx)).transpose()
    }

    /// The door, for writes into holes whose data is in
    /// (`file::holes`): handed to the transactions at the next lock.
    pub fn door(&self) -> &Door {
        &self.door
    }

    /// The background commit: what waited [`INTERVAL`] is committed
    /// recoverably.
    fn start_committer(&self) {
        let door = Arc::downgrade(&self.door);
        self.committer.ensure_started(move || {
            let Some(door) = door.upgrade() else {
                return;
            };
            let Ok(mut state) = door.lock() else {
                return;
            };
            let FsState { fs, tx: Some(tx) } = &mut *state else {
                return;
            };
            if tx.age().is_some_and(|age| age >= INTERVAL) {
                if let Err(e) = tx.commit(fs, Durability::Recoverable) {
                    // Kept in memory; the next commit or a client's flush
                    // tries again, and the flush reports it.
                    ext2_rs::debug!(
                        Topic::Journal,
                        "the background commit failed ({e}): retried later"
                    );
                }
            }
        });
    }

    /// Makes everything durable that the transactions hold: commits the
    /// metadata home (see `Transactions::commit`) and flushes the device.
    /// The caller linked the writes into holes it wants durable first.
    pub fn commit(&self) -> Result<()> {
        let mut state = self.door.lock()?;
        let FsState { fs, tx } = &mut *state;
        match tx {
            Some(tx) => tx.commit(fs, Durability::Home),
            None => self.image.flush().map_err(Error::reported),
        }
    }

    /// `.cleanup`: stops the background commit, has `link_files` link
    /// every file's pending writes, commits what is still in memory and
    /// leaves the image as a clean unmount does (see
    /// `Transactions::shutdown`), closes the filesystem, then the device.
    /// Connections that still hold the volume fail with ESHUTDOWN from now
    /// on.  Metadata that cannot be written now is reported: it is lost,
    /// and the image holds what the last commit left (recoverable).
    pub fn shutdown(&self, link_files: impl FnOnce() -> Result<()>) {
        self.committer.stop();
        let linked = link_files();
        if let Some(FsState { mut fs, tx }) = self.door.take() {
            if let Some(mut tx) = tx {
                if let Err(e) = linked.and_then(|()| tx.shutdown(&mut fs)) {
                    log::error(&format!(
                        "shutdown: the last metadata changes could not be written ({e}): the \
                         image holds what the last commit left, which e2fsck or the kernel \
                         recovers"
                    ));
                }
            }
            drop(fs);
        }
        if let Err(e) = self.image.flush() {
            log::error(&format!(
                "flushing the plugin at shutdown failed (errno {})",
                e.get()
            ));
        }
        // Everything is written: the MMP block can say the filesystem is
        // free (unless another node took it).
        if let Some(held) = self.mmp.lock().take() {
            if let Err(e) = held.release() {
                log::error(&e.to_string());
            }
        }
        self.device().close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_paths_are_normalized() {
        assert_eq!(lookup_path("//disks//disk.img").unwrap(), "/disks/disk.img");
        assert_eq!(lookup_path("/").unwrap(), "/");
        assert_eq!(lookup_path("/a/../b").unwrap(), "/a/../b");
        assert!(lookup_path("/disks/disk.img/")
            .unwrap_err()
            .contains("must be a regular file"));
    }
}
