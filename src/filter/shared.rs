//! The one filesystem all connections share, the registry of files being
//! served from it, and the one way to change its metadata
//! ([`Shared::change`]).
//!
//! Lock order, outermost first: the registry, a file's map, the filesystem
//! lock.  Plugin I/O for file data happens under a file's map lock; only a
//! change's own data (the blocks it links) is written under the filesystem
//! lock, so that a change is one unit.
//!
//! A file's extent tree changes only under its map lock held exclusively
//! (its readers walk the tree with no library lock: `ext2_rs::lazy_map`):
//! changes name the file they change, and `ext2_rs::txn` changes a tree
//! only in such a change, or when asked to link a file's pending writes
//! ([`Shared::link_pending`]), which the file's own code does under its
//! lock; [`Shared::flush`] takes each file's lock to ask.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use crate::filter::committer::Committer;
use crate::filter::file::ServedFile;
use crate::filter::opening;
use crate::filter::unlinked::written_extents;
use crate::image::{Image, MapDevice};
use crate::nbdkit::report::{ext2_debug_lock, ext2_debug_map, nbd_debug, nbd_error};
use crate::nbdkit::Plugin;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::Extent;
use ext2_rs::lazy_map::{LazyMap, MapSource};
use ext2_rs::mapping::BlockRuns;
use ext2_rs::mmp::Protection;
use ext2_rs::policy::Verdict;
use ext2_rs::txn::{Durability, Linked, Transactions};
use ext2_rs::{Filesystem, Ino};

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
    /// Where served files' maps are read from, and their shared cache.
    map_source: MapSource,
    /// The device under `map_source`, switched to the transactions'
    /// metadata cache once the filesystem is writable.
    map_device: Arc<MapDevice>,
    /// The MMP block held while the filesystem is written (`mmp`), released
    /// by [`Shared::shutdown`].
    mmp: Mutex<Option<Protection>>,
    pub block_size: u32,
    /// Blocks per allocation cluster (bigalloc; 1 otherwise).
    pub cluster_ratio: u64,
    /// Read-only from the start until the first writable connection has
    /// re-opened the filesystem read-write ([`opening::reopen_writable`]).
    writable: AtomicBool,
    /// Writes into holes whose data is in ([`Shared::hole_filled`]), for
    /// the transactions to take at the next lock of the filesystem: a
    /// write needs the library lock once, not twice.
    filled: Mutex<Vec<Filled>>,
}

/// Blocks `runs` reserved for file blocks from `logical` of `ino` now
/// hold their data.
struct Filled {
    ino: Ino,
    logical: u64,
    runs: BlockRuns,
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

impl Shared {
    /// Opens the filesystem over `plugin` read-only, an unclean journal
    /// replayed in memory (see [`opening::open_read_only`]); files' maps
    /// share a cache of about `map_cache` bytes.
    pub fn open(plugin: Plugin, map_cache: usize) -> Result<Shared> {
        let (image, fs) = opening::open_read_only(plugin)?;
        let map_device = Arc::new(MapDevice::new(image.clone()));
        Ok(Shared {
            map_source: MapSource::new(&fs, map_device.clone(), map_cache)
                .with_background(Arc::new(crate::pool::spawn)),
            map_device,
            mmp: Mutex::new(None),
            block_size: fs.block_size(),
            cluster_ratio: fs.cluster_ratio(),
            image,
            state: Arc::new(Mutex::new(Some(FsState { fs, tx: None }))),
            committer: Committer::default(),
            files: Mutex::new(HashMap::new()),
            writable: AtomicBool::new(false),
            filled: Mutex::new(Vec::new()),
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

    /// Puts the filesystem re-opened read-write (`fs`, changed through
    /// `tx`, under the MMP block `held` if it has the `mmp` feature) in the
    /// lock's `state`; from now on maps are read through the transactions'
    /// metadata cache and the filesystem counts as writable.
    pub fn now_writable(
        &self,
        state: &mut FsState,
        fs: Filesystem,
        tx: Transactions,
        held: Option<Protection>,
    ) {
        self.map_device.read_through(tx.cache().clone());
        state.fs = fs;
        state.tx = Some(tx);
        *self.mmp.lock() = held;
        self.writable.store(true, Ordering::Release);
    }

    /// Takes the libext2fs lock.
    pub fn lock_state(&self) -> Result<MappedMutexGuard<'_, FsState>> {
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
        let mut state = MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))?;
        self.hand_over_filled(&mut state);
        Ok(state)
    }

    /// Gives the transactions the writes into holes filled since the last
    /// lock: from now on they wait to be linked, not in flight.
    fn hand_over_filled(&self, state: &mut FsState) {
        if let Some(tx) = state.tx.as_mut() {
            for Filled { ino, logical, runs } in self.filled.lock().drain(..) {
                tx.hole_filled(ino, logical, &runs);
            }
        }
    }

    /// Takes the libext2fs lock, to read the filesystem (changes go through
    /// [`Shared::change`]).
    pub fn lock_fs(&self) -> Result<MappedMutexGuard<'_, Filesystem>> {
        Ok(MappedMutexGuard::map(self.lock_state()?, |state| {
            &mut state.fs
        }))
    }

    /// `.cleanup`: links every file's pending writes, commits what is
    /// still in memory and leaves the image as a clean unmount does (see
    /// `Transactions::shutdown`), closes the filesystem, then the plugin
    /// context.  nbdkit may clean up while connections still hold this
    /// state: their later requests fail with ESHUTDOWN.  Metadata that
    /// cannot be written now is reported: it is lost, and the image holds
    /// what the last commit left (recoverable).
    pub fn shutdown(&self) {
        self.committer.stop();
        let linked = self.link_all_files();
        let mut state = self.state.lock();
        if let Some(state) = state.as_mut() {
            self.hand_over_filled(state);
        }
        if let Some(FsState { mut fs, tx }) = state.take() {
            if let Some(mut tx) = tx {
                if let Err(e) = linked.and_then(|()| tx.shutdown(&mut fs)) {
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
        // Everything is written: the MMP block can say the filesystem is
        // free (unless another node took it).
        if let Some(held) = self.mmp.lock().take() {
            if let Err(e) = held.release() {
                nbd_error!("{e}");
            }
        }
        self.image.plugin().close();
    }

    /// The shared state of the file at `path`, reading its inode the first
    /// time any connection opens it.
    pub fn open_file(&self, path: &str) -> Result<Arc<ServedFile>> {
        let lookup = crate::filter::config::lookup_path(path)
            .map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        let mut files = self.files.lock();
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        let ino = fs.lookup(&lookup).map_err(|e| e.in_context(path))?;
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
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
        nbd_debug!(
            ext2_debug_map,
            "{path}: inode {ino}, {} bytes, {:?}, map read lazily ({:?})",
            info.size,
            info.layout,
            self.map_source.cache.stats()
        );
        let cluster_ratio = fs.cluster_ratio();
        drop(state);
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
    /// are linked into the file's tree later (see
    /// `Transactions::fill_hole`), the caller's map serving them until
    /// then.  `near` is a goal the caller knows from a neighbour.  Also
    /// says whether the file's tree changed meanwhile (writes waiting to
    /// be linked were, to make room or because enough waited), failed or
    /// not: the caller holds the file's map lock exclusively, and reads the
    /// tree again if so.
    pub fn fill_hole(
        &self,
        ino: Ino,
        logical: u64,
        count: u64,
        near: Option<u64>,
        fill: impl FnOnce(&mut Filesystem, &Image, u64) -> Result<BlockRuns>,
    ) -> (Result<BlockRuns>, bool) {
        let mut tree_changed = false;
        let runs = self.with_transactions(|fs, tx, image| {
            let links = tx.links_made();
            let runs = tx.fill_hole(fs, ino, logical, count, near, |fs, goal| {
                fill(fs, image, goal)
            });
            tree_changed = tx.links_made() != links;
            runs
        });
        (runs, tree_changed)
    }

    /// Allocates `count` blocks for a hole of extent file `ino` (not
    /// bigalloc) at file blocks from `logical`, as one change, for a caller
    /// that then writes their data without the library lock and says how
    /// that went ([`Shared::hole_filled`] or [`Shared::abandon_hole`]).
    /// Changes no tree (see `Transactions::reserve_hole`): callable while
    /// the file's map is held only shared.
    pub fn reserve_hole(
        &self,
        ino: Ino,
        logical: u64,
        count: u64,
        near: Option<u64>,
    ) -> Result<BlockRuns> {
        self.with_transactions(|fs, tx, _| tx.reserve_hole(fs, ino, logical, count, near))
    }

    /// The data of `runs` from [`Shared::reserve_hole`] is written: they
    /// wait to be linked, from the next time the filesystem is locked (the
    /// caller lays them over the file's map meanwhile).
    pub fn hole_filled(&self, ino: Ino, logical: u64, runs: BlockRuns) {
        self.filled.lock().push(Filled { ino, logical, runs });
    }

    /// The data of `runs` from [`Shared::reserve_hole`] could not be
    /// written: they are freed.
    pub fn abandon_hole(&self, runs: &BlockRuns) -> Result<()> {
        self.with_transactions(|fs, tx, _| tx.abandon_hole(fs, runs))
    }

    /// The blocks written into holes of `ino` not linked into its tree yet.
    pub fn unlinked(&self, ino: Ino) -> Result<Vec<Extent>> {
        let state = self.lock_state()?;
        Ok(state
            .tx
            .as_ref()
            .map(|tx| written_extents(&tx.unlinked(ino)))
            .unwrap_or_default())
    }

    /// Links the writes into holes of `ino` that wait, into its tree; the
    /// caller holds the file's map lock exclusively (and reads the tree
    /// again after, whatever the outcome), and learns which tree blocks
    /// changed.
    pub fn link_pending(&self, ino: Ino) -> Result<Linked> {
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        match tx {
            Some(tx) => tx.link_pending_noting_writes(fs, ino),
            None => Ok(Linked::default()),
        }
    }

    /// Links, as one change, those of up to `max` writes into holes of
    /// `ino` waiting from file block `from` on that go into their leaves
    /// in place (see `Transactions::link_in_place_some`); the caller may
    /// hold the file's map only shared.  Returns what was linked and where
    /// to go on from (`None`: done, or the filesystem cannot link so).
    pub fn link_in_place_some(
        &self,
        ino: Ino,
        from: u64,
        max: usize,
    ) -> Result<(Linked, Option<u64>)> {
        self.with_transactions(|fs, tx, _| tx.link_in_place_some(fs, ino, from, max))
    }

    /// Links every file's pending writes: each served file's under its map
    /// lock (see `ServedFile::link_unlinked`), then those of files no
    /// connection serves any more, whose trees nobody reads, holding the
    /// registry so that none is opened meanwhile.
    fn link_all_files(&self) -> Result<()> {
        let live: Vec<Arc<ServedFile>> = self
            .files
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for file in &live {
            file.link_unlinked(self)?;
        }
        drop(live);
        let files = self.files.lock();
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        let Some(tx) = tx else {
            return Ok(());
        };
        for ino in tx.pending_inodes() {
            if files.get(&ino).and_then(Weak::upgrade).is_none() {
                tx.link_pending(fs, ino)?;
            }
        }
        Ok(())
    }

    /// Makes everything durable: links the writes into holes that wait,
    /// commits the metadata home (see `Transactions::commit`) and flushes
    /// the plugin.  Writes that complete while it runs may stay pending:
    /// they came after the flush.
    pub fn flush(&self) -> Result<()> {
        if !self.writable() {
            return self.image.flush().map_err(Error::reported);
        }
        self.link_all_files()?;
        let mut state = self.lock_state()?;
        let FsState { fs, tx } = &mut *state;
        match tx {
            Some(tx) => tx.commit(fs, Durability::Home),
            None => self.image.flush().map_err(Error::reported),
        }
    }
}
