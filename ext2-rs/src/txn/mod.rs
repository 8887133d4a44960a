//! Crash-consistent metadata: every change libext2fs makes is held in
//! memory and reaches the device only in commits that keep the filesystem
//! recoverable after a power cut at any instant, whatever subset of the
//! writes since the last device flush survives.
//!
//! - **With a journal** (ext3/ext4): a commit is one JBD2 transaction in
//!   the filesystem's own journal ([`journal`]): the log blocks, a flush,
//!   the commit block, a flush, then the blocks at their home locations.
//!   The journal's replay alone (the kernel at mount, `e2fsck -E
//!   journal_only`) gives a consistent filesystem.
//! - **Without one** (ext2, `^has_journal`, or a journal this crate does
//!   not write): [`ordered`] writes clear `EXT2_VALID_FS` first, then
//!   allocation records before the pointers to what they allocate, and
//!   frees after the pointers are gone, with copy-on-write of extent nodes,
//!   so that a crash leaks blocks at worst, which `fsck -p` repairs
//!   without asking.
//!
//! Both rely on the host writing file data straight to the device before
//! the change that links it ([`Transactions::change`]): a commit flushes
//! the device before it makes new pointers durable (`data=ordered`).  A
//! change that frees blocks is committed before any later change runs, so
//! no freed block is reused while a crash could still bring back a pointer
//! to it.
//!
//! A write into a hole of an extent file ([`Transactions::fill_hole`])
//! allocates its blocks and writes its data at once, but links them into
//! the file's tree only later, in file order, which costs far less than one
//! tree walk per write: when the host asks ([`Transactions::link_pending`],
//! before it makes a flush durable), before the next other change of that
//! file, or once [`LINK_AT`] extents wait.  The host's own map of the file
//! serves them meanwhile.  Only those calls change a file's tree, and only
//! with the file named: a host that lets readers walk a tree without the
//! library lock (its own lock on the file keeps them out) can rely on it.
//! A commit writes the blocks of links still waiting as free, so the image
//! never sees blocks allocated that no file owns, nor a link without them.
//!
//! [`open_read_write`] opens a filesystem this way; [`Transactions`] is
//! the one way to change it.

mod cache;
mod discard;
mod holes;
mod journal;
mod ordered;
mod relocate;
#[cfg(test)]
mod tests;
mod touched;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::debug;
use crate::device::BlockDevice;
use crate::error::{Errno, Error, Result};
use crate::fs::{Access, Filesystem, Ino};
use crate::log::Topic;
use crate::mapping::{self, BlockRuns};
use crate::sb;
use crate::sys;
use crate::undo;

pub use cache::MetaCache;
pub use discard::Discard;
use holes::HoleFills;
use journal::JournalLog;
use ordered::Ordered;
use touched::Touched;

/// Extents waiting to be linked into one file's tree before a write into
/// a hole links them all (the memory and the work of one linking bounded).
pub const LINK_AT: usize = 8192;

/// What [`Transactions::link_pending_noting_writes`] or
/// [`Transactions::link_in_place_some`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Linked {
    /// File blocks linked (all that were pending).
    pub blocks: u64,
    /// The metadata blocks written: of the file's tree, only these nodes
    /// (and the root, in the inode) may differ, so a reader of the tree may
    /// keep the others it has cached, if it knew of every link made before.
    pub rewritten: Vec<u64>,
}

impl Linked {
    /// Adds what a later link did.
    pub fn add(&mut self, later: Linked) {
        self.blocks += later.blocks;
        self.rewritten.extend(later.rewritten);
    }
}

/// How far a commit goes before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The metadata is recoverable after a crash (with a journal: the
    /// transaction is committed in it; its home writes are issued but not
    /// yet flushed).
    Recoverable,
    /// The metadata is at its home locations and the device flushed: the
    /// image is consistent as it stands, with no journal replay needed.
    Home,
}

/// How crash consistency is kept for this filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Journal,
    Ordered,
}

enum Mode {
    Journal(Box<JournalLog>),
    Ordered(Ordered),
}

/// The running transaction of an open filesystem, and how it commits.
pub struct Transactions {
    cache: Arc<MetaCache>,
    mode: Mode,
    touched: Touched,
    /// When the oldest uncommitted change was made.
    since: Option<Instant>,
    /// A change freed blocks and has not been committed yet: nothing may
    /// allocate until it is.
    frees_pending: bool,
    /// Writes into holes: reserved ([`Self::reserve_hole`]), or written and
    /// not linked into their trees yet ([`Self::fill_hole`]).
    holes: HoleFills,
    /// Transactions committed so far.
    commits: u64,
    /// Blocks of group descriptors (each may change with a group).
    desc_blocks: u64,
    /// Told the blocks each commit freed, once they are free for good
    /// ([`Self::discard_freed`]).
    discard: Option<Discard>,
}

/// The block size of the filesystem on `raw`, from its superblock (1024 if
/// there is no valid one: opening will say what is wrong).
fn block_size_of(raw: &dyn BlockDevice) -> u64 {
    let mut superblock = vec![0u8; sb::BYTES];
    if raw.read_at(&mut superblock, sb::OFFSET).is_err() || !sb::is_superblock(&superblock) {
        return 1024;
    }
    sb::block_size(&superblock).unwrap_or(1024)
}

/// Opens the filesystem on `raw` read-write, with its metadata going
/// through a [`MetaCache`] and committed by the returned [`Transactions`]:
/// in the journal when there is one this crate can write, in crash-safe
/// order otherwise (saying why, when a journal is there but not used).
/// Nothing is written until the first commit.  A filesystem with the `mmp`
/// feature is opened only under `held`, its MMP block taken.  One that may
/// only be read (see [`Filesystem::open`]) is an [`Error::ReadOnly`].
pub fn open_read_write(
    raw: Arc<dyn BlockDevice>,
    held: Option<&crate::mmp::Protection>,
) -> Result<(Filesystem, Transactions)> {
    let bs = block_size_of(raw.as_ref());
    let cache = Arc::new(MetaCache::new(raw, bs));
    let mut fs = match held {
        Some(held) => Filesystem::open_protected(cache.clone(), held)?,
        None => Filesystem::open(cache.clone(), Access::ReadWrite)?,
    };
    // SAFETY: open filesystem; orig_super is libext2fs's copy of the
    // superblock as last written, freed and cleared here so that every
    // flush writes the whole superblock as it is in memory (instead of
    // only the bytes libext2fs believes changed, which would mix with what
    // this crate writes to the superblock directly).
    unsafe {
        let raw_fs = fs.raw();
        sys::ext2fs_free_mem(std::ptr::addr_of_mut!((*raw_fs).orig_super).cast());
    }
    let mode = choose_mode(&mut fs, &cache)?;
    // SAFETY: open filesystem; plain fields.
    let (desc_blocks, group_count) =
        unsafe { ((*fs.raw()).desc_blocks, (*fs.raw()).group_desc_count) };
    let sb = fs.super_block();
    let tx = Transactions {
        desc_blocks,
        cache,
        mode,
        touched: Touched::new(
            u64::from(sb.s_first_data_block),
            u64::from(sb.s_blocks_per_group),
        ),
        since: None,
        frees_pending: false,
        holes: HoleFills::default(),
        commits: 0,
        discard: None,
    };
    debug!(
        Topic::Journal,
        "transactions: {:?} ({bs}-byte blocks, {group_count} groups)",
        tx.method()
    );
    Ok((fs, tx))
}

fn choose_mode(fs: &mut Filesystem, cache: &Arc<MetaCache>) -> Result<Mode> {
    let has_journal = fs.super_block().s_feature_compat & sys::EXT3_FEATURE_COMPAT_HAS_JOURNAL != 0;
    if has_journal {
        match JournalLog::open(fs, cache) {
            Ok(log) => return Ok(Mode::Journal(Box::new(log))),
            Err(why) => crate::log::error(&format!(
                "{why}: metadata is not journalled but written in crash-safe order, as \
                 without a journal (after a crash, fsck -p repairs the filesystem)"
            )),
        }
    }
    Ok(Mode::Ordered(Ordered::open(fs, cache)?))
}

impl Transactions {
    pub fn method(&self) -> Method {
        match self.mode {
            Mode::Journal(_) => Method::Journal,
            Mode::Ordered(_) => Method::Ordered,
        }
    }

    pub fn cache(&self) -> &Arc<MetaCache> {
        &self.cache
    }

    /// How many commits have succeeded (each one transaction, or one
    /// ordered write-out), counting those with nothing to write.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Whether anything awaits a commit.
    pub fn is_empty(&self) -> bool {
        self.cache.dirty_len() == 0 && self.touched.is_empty() && self.holes.is_empty()
    }

    /// How long the oldest uncommitted change has waited.
    pub fn age(&self) -> Option<Duration> {
        self.since.map(|t| t.elapsed())
    }

    /// Blocks the running transaction writes as it stands: those written
    /// so far, plus a bitmap and a descriptor block for each group whose
    /// allocations changed, plus the superblock.
    fn written_blocks(&self) -> u64 {
        let groups = self.touched.groups();
        self.cache.dirty_len() as u64
            + self.cache.change_len() as u64
            + groups
            + groups.min(self.desc_blocks)
            + 1
    }

    /// Blocks the running transaction writes as it stands (pending links
    /// are not part of it: see [`Self::fill_hole`]).
    pub fn estimated_blocks(&self) -> u64 {
        self.written_blocks()
    }

    /// How many times a file's tree has gained pending links: a host that
    /// keeps its own map of a file reads the tree again when this moved
    /// during a [`Self::fill_hole`] of it.
    pub fn links_made(&self) -> u64 {
        self.holes.links_made()
    }

    /// The files with writes into holes waiting to be linked.
    pub fn pending_inodes(&self) -> Vec<Ino> {
        self.holes.pending().inodes()
    }

    /// The extents written into holes of `ino` and not linked yet:
    /// (file block, image block, blocks), in file order.
    pub fn unlinked(&self, ino: Ino) -> Vec<(u64, u64, u64)> {
        self.holes.pending().of(ino)
    }

    /// Blocks a transaction should not outgrow: a quarter of the journal,
    /// as JBD2 does, or a memory bound without one.
    pub fn commit_threshold(&self) -> u64 {
        match &self.mode {
            Mode::Journal(log) => log.max_transaction(),
            Mode::Ordered(_) => ordered::MAX_TRANSACTION,
        }
    }

    /// How many blocks one change may write at most: a change that needs
    /// more is refused (the caller makes its changes smaller than this).
    pub fn change_limit(&self) -> u64 {
        self.commit_threshold()
    }

    /// Runs one change of the filesystem's metadata as a unit.  `op` may
    /// write file data to the device itself (it must, before it links
    /// blocks to a file: see the module documentation).  If `op` fails or
    /// panics, the change is undone in libext2fs's memory and its writes
    /// dropped, and the error (or the panic) goes on to the caller.  If it
    /// succeeds, its writes join the running transaction; a change that
    /// freed blocks is committed at once.  `ino` is the inode it changes
    /// (its pending links, see [`Self::fill_hole`], are made first).
    pub fn change<T>(
        &mut self,
        fs: &mut Filesystem,
        ino: Option<Ino>,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        if let Some(ino) = ino {
            self.link_pending(fs, ino)?;
        }
        self.run_change(fs, ino, true, op)
    }

    /// Fills a hole of extent file `ino` (not bigalloc) at file blocks
    /// `logical..logical + count`: as one change, `fill(fs, goal)`
    /// allocates the blocks near `goal` and writes their data, returning
    /// the runs it allocated; the runs are linked into the file's tree only
    /// when the caller asks ([`Self::link_pending`]), or before the next
    /// other change of `ino` (the caller's own map of the file serves them
    /// meanwhile; commits write their blocks as free).  `goal` is
    /// `near` if given (the caller knows a neighbour), else after the last
    /// run pending for `ino`, else libext2fs's goal for the block.
    ///
    /// Once [`LINK_AT`] extents of `ino` wait, they are all linked here
    /// ([`Self::links_made`] moves).  That failing does not fail the write,
    /// whose data and blocks are in: what was not linked stays pending, and
    /// the next link reports the error.
    pub fn fill_hole(
        &mut self,
        fs: &mut Filesystem,
        ino: Ino,
        logical: u64,
        count: u64,
        near: Option<u64>,
        fill: impl FnOnce(&mut Filesystem, u64) -> Result<BlockRuns>,
    ) -> Result<BlockRuns> {
        self.ensure_room(fs, ino, count)?;
        let near = self.holes.near(ino, near);
        // No inode named: the change allocates, and no tree changes (so,
        // without a journal, there is no node to move).
        let runs = self.run_change(fs, None, true, |fs| {
            let goal = mapping::hole_goal(fs, ino, logical, near)?;
            fill(fs, goal)
        })?;
        if self.holes.written(ino, logical, &runs) >= LINK_AT {
            if let Err(e) = self.link_pending(fs, ino) {
                debug!(Topic::Map, "{e}: the rest stays pending");
            }
        }
        Ok(runs)
    }

    /// The first half of [`Self::fill_hole`] for a host that writes the
    /// data itself, outside the library lock: allocates
    /// `count` blocks for file blocks `logical..` of extent file `ino` (not
    /// bigalloc), near `near` as `fill_hole` places them, and holds them as
    /// in flight, free in what commits write, until the host says the data
    /// is in ([`Self::hole_filled`]) or gave up ([`Self::abandon_hole`]).
    /// Changes no tree: nothing is linked here, not even to make room (a
    /// host whose readers walk the tree without the library lock may call
    /// this while they do); short of room it fails with [`Error::NoSpace`], and
    /// [`Self::fill_hole`], which may link, is the way to go on.
    pub fn reserve_hole(
        &mut self,
        fs: &mut Filesystem,
        ino: Ino,
        logical: u64,
        count: u64,
        near: Option<u64>,
    ) -> Result<BlockRuns> {
        self.room_for(fs, count)?;
        self.commit_if_needed(fs)?;
        let near = self.holes.near(ino, near);
        let goal = mapping::hole_goal(fs, ino, logical, near)?;
        // Only libext2fs's block bitmap and counters change, in its memory,
        // and `allocate` gives back what it took if it fails: no change
        // (undo log, block cache overlay) is needed around it.
        let runs = mapping::allocate(fs, goal, count)?;
        for &(start, len) in &runs {
            self.touched.note(start, len, 1);
            // The blocks will hold file data: no metadata cached of them.
            self.cache.forget_clean(start, len);
        }
        self.holes.reserved(ino, &runs);
        self.since.get_or_insert_with(Instant::now);
        Ok(runs)
    }

    /// The data of blocks `runs`, reserved by [`Self::reserve_hole`] for
    /// file blocks from `logical` of `ino`, is written: they wait to be
    /// linked as [`Self::fill_hole`]'s do.  Returns how many extents of
    /// `ino` wait (the host links them, under its own lock, past
    /// [`LINK_AT`]).
    pub fn hole_filled(&mut self, ino: Ino, logical: u64, runs: &BlockRuns) -> usize {
        self.holes.filled(ino, logical, runs)
    }

    /// Frees blocks `runs` reserved by [`Self::reserve_hole`] whose data
    /// could not be written, as one change.
    pub fn abandon_hole(&mut self, fs: &mut Filesystem, runs: &BlockRuns) -> Result<()> {
        self.holes.abandoned(runs);
        self.run_change(fs, None, false, |fs| {
            mapping::free_blocks(fs, runs);
            Ok(())
        })
    }

    /// A change that allocates `count` blocks (and may link them, as
    /// [`Self::change`]), refused with [`Error::NoSpace`] if that would eat into the
    /// blocks the transaction keeps for itself (see [`Self::ensure_room`]).
    pub fn change_allocating<T>(
        &mut self,
        fs: &mut Filesystem,
        ino: Ino,
        count: u64,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        self.ensure_room(fs, ino, count)?;
        self.change(fs, Some(ino), op)
    }

    /// Blocks kept free for what the running transaction has yet to
    /// allocate on its own: tree nodes for the pending links, and, without
    /// a journal, a new home for every existing node a commit moves.
    fn reserve(&self) -> u64 {
        let mut reserve = 64 + self.holes.reserve();
        if let Mode::Ordered(_) = self.mode {
            reserve += self.cache.dirty_len() as u64;
        }
        reserve
    }

    /// Makes sure `count` more blocks can be allocated without taking the
    /// reserve: if not, first makes the pending links of `ino` (while there
    /// is room for their nodes; other files' trees are changed only when
    /// their host asks), then refuses with [`Error::NoSpace`] if it is still short.
    fn room_for(&self, fs: &mut Filesystem, count: u64) -> Result<()> {
        // SAFETY: open filesystem; reads its in-memory superblock.
        let free = unsafe { sys::ext2fs_free_blocks_count((*fs.raw()).super_) };
        if free >= count + self.reserve() {
            return Ok(());
        }
        Err(Error::NoSpace(format!(
            "no space left: {free} blocks free, {count} wanted, {} kept for the filesystem's \
             own metadata",
            self.reserve()
        )))
    }

    fn ensure_room(&mut self, fs: &mut Filesystem, ino: Ino, count: u64) -> Result<()> {
        if self.room_for(fs, count).is_ok() {
            return Ok(());
        }
        self.link_pending(fs, ino)?;
        self.room_for(fs, count)
    }

    /// Links everything pending for `ino` into its tree (see
    /// [`Self::fill_hole`]): as many changes as it takes, and, when that
    /// is more than one transaction may hold, commits in between.  The
    /// caller keeps readers of that tree out meanwhile.
    pub fn link_pending(&mut self, fs: &mut Filesystem, ino: Ino) -> Result<()> {
        while self.holes.pending().has(ino) {
            self.link_some(fs, ino)?;
            if self.holes.pending().has(ino) {
                self.commit(fs, Durability::Recoverable)?;
            }
        }
        Ok(())
    }

    /// [`Self::link_pending`], saying what it did (see [`Linked`]).
    pub fn link_pending_noting_writes(&mut self, fs: &mut Filesystem, ino: Ino) -> Result<Linked> {
        let blocks = self.holes.pending().of(ino).iter().map(|e| e.2).sum();
        let (result, rewritten) = self.noting_writes(|tx| tx.link_pending(fs, ino));
        result.map(|()| Linked { blocks, rewritten })
    }

    /// Runs `op`, returning with its outcome the metadata blocks that the
    /// changes it ran wrote.
    fn noting_writes<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T>,
    ) -> (Result<T>, Vec<u64>) {
        self.holes.start_noting();
        let result = op(self);
        (result, self.holes.stop_noting())
    }

    /// Links, as one change, those of up to `max` extents pending for `ino`
    /// from file block `from` on that go into their leaves in place (see
    /// [`mapping::link_extents_in_place`]); the others stay pending.  With
    /// a journal only: the tree keeps its shape and every node but those
    /// leaves, so a host's readers may go on walking it meanwhile (a leaf
    /// they read before or after holds the same blocks, with the pending
    /// ones they see too).  Without one, a change moves the nodes it
    /// changes, and this links nothing.  Returns what it linked and where
    /// the next call should start (`None`: nothing pending is left there).
    pub fn link_in_place_some(
        &mut self,
        fs: &mut Filesystem,
        ino: Ino,
        from: u64,
        max: usize,
    ) -> Result<(Linked, Option<u64>)> {
        if self.method() != Method::Journal {
            return Ok((Linked::default(), None));
        }
        let extents = self.holes.pending_mut().take_from(ino, from, max);
        let Some(&(last, _, _)) = extents.last() else {
            return Ok((Linked::default(), None));
        };
        let (result, rewritten) = self.noting_writes(|tx| {
            tx.run_change(fs, Some(ino), true, |fs| {
                mapping::link_extents_in_place(fs, ino, &extents)
            })
        });
        let refused = match result {
            Ok(refused) => refused,
            Err(e) => {
                self.holes.pending_mut().put_back(ino, extents);
                return Err(e);
            }
        };
        let blocks = |list: &[(u64, u64, u64)]| list.iter().map(|e| e.2).sum::<u64>();
        let linked = Linked {
            blocks: blocks(&extents) - blocks(&refused),
            rewritten,
        };
        if linked.blocks > 0 {
            self.holes.linked();
        }
        self.holes.pending_mut().put_back(ino, refused);
        Ok((linked, Some(last + 1)))
    }

    /// Links extents pending for `ino`, a batch per change, until none are
    /// left or the running transaction holds as many blocks as it should;
    /// what is not linked stays pending.
    fn link_some(&mut self, fs: &mut Filesystem, ino: Ino) -> Result<()> {
        /// Extents per change: each may change a leaf (and split it).
        const BATCH: usize = 64;
        let Some(mut extents) = self.holes.pending_mut().take(ino) else {
            return Ok(());
        };
        // Not committing first: the blocks are allocated in this
        // transaction and must be linked in it too.  Blocks freed and not
        // yet committed stay marked in use meanwhile, so that no new node
        // lands on one.
        let freed = if self.frees_pending {
            freed_ranges(fs, &self.touched)
        } else {
            Vec::new()
        };
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, 1);
        }
        let mut linked = 0;
        let mut result = Ok(());
        while linked < extents.len() && self.written_blocks() < self.commit_threshold() {
            let batch = &extents[linked..(linked + BATCH).min(extents.len())];
            result = self.run_change(fs, Some(ino), false, |fs| {
                mapping::link_extents(fs, ino, batch)
            });
            if result.is_err() {
                break;
            }
            linked += batch.len();
        }
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, -1);
        }
        let rest = extents.split_off(linked);
        if !rest.is_empty() {
            self.holes.pending_mut().put_back(ino, rest);
        }
        if linked > 0 {
            self.holes.linked();
        }
        debug!(
            Topic::Map,
            "inode {ino}: {linked} extents written into holes linked into its tree"
        );
        result.map_err(|e| e.in_context(format!("inode {ino}: linking blocks written into holes")))
    }

    /// The body of [`Self::change`]; `may_commit_first` lets it commit the
    /// running transaction first when that is large or holds frees.
    fn run_change<T>(
        &mut self,
        fs: &mut Filesystem,
        ino: Option<Ino>,
        may_commit_first: bool,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        if may_commit_first {
            self.commit_if_needed(fs)?;
        }
        self.run_change_now(fs, ino, op)
    }

    fn commit_if_needed(&mut self, fs: &mut Filesystem) -> Result<()> {
        if self.frees_pending {
            self.commit(fs, Durability::Recoverable).map_err(|e| {
                e.in_context("blocks freed earlier cannot be committed, so none may be allocated")
            })?;
        }
        if self.estimated_blocks() >= self.commit_threshold() {
            self.commit(fs, Durability::Recoverable)?;
        }
        Ok(())
    }

    fn run_change_now<T>(
        &mut self,
        fs: &mut Filesystem,
        ino: Option<Ino>,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        // SAFETY: `fs` is open and ours until the change ends below.
        unsafe {
            let flags = std::ptr::addr_of_mut!((*fs.raw()).flags);
            self.cache.begin_change_verifying_once(flags);
        }
        let recording = undo::Recording::start(fs.handle());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let value = op(fs)?;
            if let (Mode::Ordered(ordered), Some(ino)) = (&mut self.mode, ino) {
                // Without a journal, a changed tree moves to new blocks now,
                // while its host keeps readers out (see `relocate`).
                ordered.relocate(fs, ino, &self.cache, &self.touched, &recording.so_far())?;
            }
            Ok(value)
        }));
        let changes = recording.finish();
        let result = match outcome {
            Ok(Ok(value)) => {
                let size = self.estimated_blocks();
                if let Some(block) = self.reused_in_place(&changes) {
                    Err(Error::other(
                        Errno::EIO,
                        format!(
                            "block {block} was freed and allocated again in one change:                              without a journal that cannot be written in a crash-safe order"
                        ),
                    ))
                } else if size > self.change_limit() + self.commit_threshold() / 2 {
                    Err(Error::other(
                        Errno::EFBIG,
                        format!(
                            "a change of about {size} metadata blocks is too large for one \
                             transaction (at most {})",
                            self.change_limit()
                        ),
                    ))
                } else {
                    Ok(value)
                }
            }
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                undo::reverse(fs.handle(), &changes);
                self.cache.end_change(false);
                resume_unwind(panic)
            }
        };
        let value = match result {
            Ok(value) => value,
            Err(e) => {
                undo::reverse(fs.handle(), &changes);
                self.cache.end_change(false);
                return Err(e);
            }
        };
        let written = self.cache.end_change(true);
        self.holes.note_writes(written);
        let mut freed = false;
        for &(start, count, inuse) in &changes {
            self.touched.note(start, count, inuse);
            // The block may hold file data from now on (or did until now).
            self.cache.forget_clean(start, count);
            freed |= inuse < 0;
        }
        self.since.get_or_insert_with(Instant::now);
        if freed {
            // The change happened (the caller must go on as if it did):
            // committing it now is what lets the freed blocks be reused.
            // If that fails, nothing allocates until a commit succeeds
            // (see the top of this function), and the next flush reports it.
            self.frees_pending = true;
            if let Err(e) = self.commit(fs, Durability::Recoverable) {
                debug!(
                    Topic::Journal,
                    "committing freed blocks failed ({e}): retried before the next change"
                );
            }
        }
        Ok(value)
    }

    /// Without a journal, a block that was in use at the last commit and
    /// that one change frees and then allocates again (libext2fs may split
    /// a leaf, or add a quota tree block, on blocks a punch just freed)
    /// would be written while the old pointer to it may still be on disk:
    /// the first such block, if any.  With a journal the change is atomic.
    fn reused_in_place(&self, changes: &[undo::Change]) -> Option<u64> {
        if self.method() != Method::Ordered || changes.iter().all(|c| c.2 >= 0) {
            return None;
        }
        let mut freed = std::collections::HashSet::new();
        for &(start, count, inuse) in changes {
            for block in start..start + count {
                if inuse < 0 {
                    if self.touched.was_used(block) != Some(false) {
                        freed.insert(block);
                    }
                } else if inuse > 0 && freed.contains(&block) {
                    return Some(block);
                }
            }
        }
        None
    }

    /// Commits the running transaction as far as `durability` asks; with
    /// nothing to commit, flushes the device when `Home` is asked.  On
    /// failure everything stays in the running transaction, to be retried.
    ///
    /// Pending links (see [`Self::fill_hole`]) are not made here: their
    /// blocks are left out of the bitmaps this commit writes (allocated in
    /// memory only, until a later transaction links them).  A host that
    /// makes a flush durable links them first ([`Self::link_pending`]).
    pub fn commit(&mut self, fs: &mut Filesystem, durability: Durability) -> Result<()> {
        let cache = self.cache.clone();
        let _remember = cache.remembering();
        let unlinked = self.holes.unlinked_runs();
        let result = match &mut self.mode {
            Mode::Journal(log) => log.commit(fs, &self.cache, &self.touched, &unlinked, durability),
            Mode::Ordered(ordered) => {
                ordered.commit(fs, &self.cache, &mut self.touched, &unlinked, durability)
            }
        };
        if let Err(e) = result {
            // Without a journal, the commit may have freed the nodes its
            // changes moved away (in memory): none may be reused until a
            // commit succeeds.
            self.frees_pending |= self.method() == Method::Ordered;
            return Err(e);
        }
        if let Some(discard) = self.discard.as_mut() {
            let freed = freed_ranges(fs, &self.touched);
            if !freed.is_empty() {
                discard(&freed);
            }
        }
        self.touched.clear();
        self.frees_pending = false;
        self.since = None;
        self.commits += 1;
        Ok(())
    }

    /// From now on, every commit that succeeds calls `discard` with the
    /// runs of blocks its transaction freed, once the frees are durable
    /// and before any of those blocks can be allocated again (see
    /// [`discard`]).
    pub fn discard_freed(&mut self, discard: Discard) {
        self.discard = Some(discard);
    }

    /// Links every pending extent of every file (see [`Self::link_pending`]):
    /// for a host that knows no reader walks any tree now.
    pub fn link_all(&mut self, fs: &mut Filesystem) -> Result<()> {
        for ino in self.holes.pending().inodes() {
            self.link_pending(fs, ino)?;
        }
        Ok(())
    }

    /// A clean shutdown: links what is pending, commits everything home,
    /// then leaves the image as a clean unmount does (the journal empty and
    /// `needs_recovery` cleared; or `EXT2_VALID_FS` set without a journal).
    pub fn shutdown(&mut self, fs: &mut Filesystem) -> Result<()> {
        self.link_all(fs)?;
        self.commit(fs, Durability::Home)?;
        match &mut self.mode {
            Mode::Journal(log) => log.shutdown(&self.cache),
            Mode::Ordered(ordered) => ordered.shutdown(&self.cache),
        }
    }
}

/// Whether `block` is marked in use in libext2fs's block bitmap (blocks
/// outside the bitmap count as in use: they are the filesystem's own).
pub(crate) fn in_use(fs: &mut Filesystem, block: u64) -> bool {
    let first = u64::from(fs.super_block().s_first_data_block);
    if block < first || block >= fs.blocks_count() {
        return true;
    }
    // SAFETY: open filesystem with its bitmaps loaded; the block is inside
    // the bitmap's range.
    unsafe { sys::ext2fs_test_block_bitmap2((*fs.raw()).block_map, block) != 0 }
}

/// The blocks the transaction freed: in use at the last commit, free now.
pub(crate) fn freed_ranges(fs: &mut Filesystem, touched: &Touched) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end, was_used) in touched.ranges() {
        if !was_used {
            continue;
        }
        for block in start..end {
            if in_use(fs, block) {
                continue;
            }
            match out.last_mut() {
                Some((s, n)) if *s + *n == block => *n += 1,
                _ => out.push((block, 1)),
            }
        }
    }
    out
}

/// Writes blocks to the device, one request per run of consecutive blocks.
pub(crate) fn write_runs(raw: &dyn BlockDevice, bs: u64, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i].0;
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n].0 == first + n as u64 && n < 256 {
            n += 1;
        }
        let mut buf = Vec::with_capacity(n * bs as usize);
        for (_, data) in &blocks[i..i + n] {
            buf.extend_from_slice(data);
        }
        raw.write_at(&buf, first * bs).map_err(Error::reported)?;
        i += n;
    }
    Ok(())
}

/// Rewrites the primary superblock on the device directly (outside any
/// transaction), with `edit` applied to its 1024 bytes as they are on the
/// device; the cache's clean copy follows.  Returns whether `edit` changed
/// anything (nothing is written otherwise).
pub(crate) fn edit_superblock_on_disk(
    cache: &MetaCache,
    edit: impl FnOnce(&mut [u8]) -> bool,
) -> Result<bool> {
    let bs = cache.block_size();
    let block = sb::OFFSET / bs;
    let at = (sb::OFFSET - block * bs) as usize;
    let mut buf = vec![0u8; bs as usize];
    cache
        .raw()
        .read_at(&mut buf, block * bs)
        .map_err(Error::reported)?;
    if !edit(&mut buf[at..at + sb::BYTES]) {
        return Ok(false);
    }
    cache
        .raw()
        .write_at(&buf, block * bs)
        .map_err(Error::reported)?;
    cache.refresh_clean(block, &buf);
    Ok(true)
}

/// Writes libext2fs's bitmaps, group descriptors and superblock (those that
/// changed) into the cache, where the commit takes them, with the blocks
/// of `unlinked` (allocated, not yet linked to a file) shown free.
pub(crate) fn capture(fs: &mut Filesystem, unlinked: &[(u64, u64)]) -> Result<()> {
    for &(start, count) in unlinked {
        undo::apply(fs.handle(), start, count, -1);
    }
    let result = fs
        .flush()
        .map_err(|e| e.in_context("writing the bitmaps and the superblock"));
    for &(start, count) in unlinked {
        undo::apply(fs.handle(), start, count, 1);
    }
    result
}
