//! Commits without a journal (ext2, ext4 `^has_journal`, or a journal this
//! crate does not write), ordered so that any crash leaves a filesystem
//! `fsck -p` repairs without asking, with every flushed byte reachable.
//!
//! The rules, each resting on the device flush between two steps:
//!
//! - `EXT2_VALID_FS` is cleared on the device, and flushed, before the
//!   first metadata write after it was set, so that boot's `fsck -p` checks
//!   a filesystem a crash may have left inconsistent; it is set again once
//!   a flush (or a clean shutdown) leaves the metadata consistent.
//! - **Allocation before pointers:** the bitmaps, group descriptors and
//!   superblock are written first, with every block this transaction
//!   allocated marked in use *and every block it freed still marked in use*,
//!   then flushed (with the file data the host wrote into new blocks);
//! - **new before old:** then the metadata blocks this transaction
//!   allocated (new extent nodes, indirect blocks: nothing on disk points at
//!   them yet), flushed, then the blocks that were already in use (inode
//!   tables, indirect blocks gaining pointers); an extent tree changed in
//!   more than one existing node was first moved, node by node, to new
//!   blocks up to its root ([`super::relocate`]), so its only in-place
//!   write is the inode, and a crash sees the old tree or the new one;
//! - **frees last:** once those are flushed, the bitmaps are written again
//!   with the freed blocks (and the moved nodes) free.
//!
//! A crash between the steps leaves blocks marked in use that nothing
//! points at, free counts and `i_blocks` off: all of which `e2fsck -p`
//! fixes silently (`PR_PREEN_OK` in e2fsck's problem table).  It never
//! leaves a pointer to a block the bitmap calls free, to a block not yet
//! written, or a block with two owners.

use std::collections::HashSet;

use crate::debug;
use crate::error::{Error, Result};
use crate::fs::{Filesystem, Ino};
use crate::log::Topic;
use crate::sb;
use crate::sys;
use crate::txn::relocate::relocate_changed_nodes;
use crate::txn::touched::Touched;
use crate::txn::{
    capture, edit_superblock_on_disk, freed_ranges, in_use, write_runs, Durability, MetaCache,
};
use crate::undo;

/// Blocks a transaction should not outgrow (memory only: no log to fill).
pub(crate) const MAX_TRANSACTION: u64 = 8192;

/// What changed hands in a transaction, for ordering its writes.
#[derive(Clone, Copy)]
struct Allocations<'a> {
    touched: &'a Touched,
    /// In use at the last commit, free now: freed on disk last.
    freed: &'a [(u64, u64)],
    /// Allocated, not yet linked to a file: free on disk for now.
    unlinked: &'a [(u64, u64)],
}

pub(crate) struct Ordered {
    /// Blocks holding allocation records: the primary superblock's block,
    /// the group descriptors, the block and inode bitmaps.
    records: HashSet<u64>,
    /// `EXT2_VALID_FS` is set on the device.
    valid_on_disk: bool,
    /// It was set when the filesystem was opened: only then is it set
    /// again (a filesystem that was not clean stays marked for checking).
    valid_at_open: bool,
    /// Extent nodes moved away by this transaction's changes, still
    /// marked in use: freed by its commit.
    moved: Vec<u64>,
}

impl Ordered {
    pub(crate) fn open(fs: &mut Filesystem, cache: &MetaCache) -> Result<Ordered> {
        let bs = cache.block_size();
        let mut records = HashSet::new();
        records.insert(sb::OFFSET / bs);
        let raw = fs.raw();
        // SAFETY: open filesystem with its descriptors loaded; the location
        // functions only read them.
        unsafe {
            let first = (*(*raw).super_).s_first_data_block;
            for i in 0..(*raw).desc_blocks {
                records.insert(sys::ext2fs_descriptor_block_loc2(
                    raw,
                    u64::from(first),
                    i as sys::dgrp_t,
                ));
            }
            for group in 0..(*raw).group_desc_count {
                records.insert(sys::ext2fs_block_bitmap_loc(raw, group));
                records.insert(sys::ext2fs_inode_bitmap_loc(raw, group));
            }
        }
        let valid = u32::from(fs.super_block().s_state) & sys::EXT2_VALID_FS != 0;
        // Every superblock written from now on says "not clean", as while a
        // kernel has the filesystem mounted.
        // SAFETY: open filesystem; we hold it exclusively.
        unsafe { (*(*raw).super_).s_state &= !(sys::EXT2_VALID_FS as u16) };
        Ok(Ordered {
            records,
            valid_on_disk: valid,
            valid_at_open: valid,
            moved: Vec::new(),
        })
    }

    /// At the end of a change of `ino` (whose allocations and releases so
    /// far are `this_change`): moves the extent nodes it changed that are
    /// on disk to new blocks (see [`relocate_changed_nodes`]).  The moves
    /// are part of the change; the old nodes stay in use until the commit
    /// ([`Self::free_moved`]).
    ///
    /// Done per change rather than at the commit because the change's host
    /// keeps readers of the tree out only while the change runs: a commit
    /// that moved nodes would pull blocks from under a reader that walks
    /// the tree as it was.  A node moved once is new in this transaction,
    /// so later changes rewrite it in place: it moves at most once.
    pub(crate) fn relocate(
        &mut self,
        fs: &mut Filesystem,
        ino: Ino,
        cache: &MetaCache,
        touched: &Touched,
        this_change: &[undo::Change],
    ) -> Result<()> {
        let allocated_now = |block: u64| {
            this_change
                .iter()
                .any(|&(start, count, inuse)| inuse > 0 && (start..start + count).contains(&block))
        };
        let existing = |block: u64| !allocated_now(block) && touched.was_used(block) != Some(false);
        let is_dirty = |block: u64| cache.written(block);
        // Blocks this change freed are still pointed at on disk until it
        // commits: no new node may land on one.  (Those freed by earlier
        // changes were committed before this one ran, or are held the
        // same way by the caller.)
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for &(start, count, inuse) in this_change {
            if inuse >= 0 {
                continue;
            }
            for block in start..start + count {
                if !in_use(fs, block) && existing(block) {
                    match freed.last_mut() {
                        Some((s, n)) if *s + *n == block => *n += 1,
                        _ => freed.push((block, 1)),
                    }
                }
            }
        }
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, 1);
        }
        let result = relocate_changed_nodes(fs, ino, &existing, &is_dirty);
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, -1);
        }
        let moved =
            result.map_err(|e| e.in_context(format!("inode {ino}: moving extent nodes")))?;
        if !moved.is_empty() {
            debug!(
                Topic::Journal,
                "ordered: inode {ino}: moved {} extent nodes to new blocks",
                moved.len()
            );
        }
        self.moved.extend(moved);
        Ok(())
    }

    /// Frees the nodes changes moved away (see [`Self::relocate`]), as the
    /// commit that writes the new ones starts: they are freed on disk last,
    /// with the transaction's other frees.
    fn free_moved(&mut self, fs: &mut Filesystem, cache: &MetaCache, touched: &mut Touched) {
        if self.moved.is_empty() {
            return;
        }
        let recording = undo::Recording::start(fs.handle());
        for &block in &self.moved {
            // SAFETY: open read-write filesystem; the block was a node,
            // marked in use since.
            unsafe { sys::ext2fs_block_alloc_stats2(fs.raw(), block, -1) };
        }
        for (start, count, inuse) in recording.finish() {
            touched.note(start, count, inuse);
            cache.forget_clean(start, count);
        }
        self.moved.clear();
    }

    pub(crate) fn commit(
        &mut self,
        fs: &mut Filesystem,
        cache: &MetaCache,
        touched: &mut Touched,
        unlinked: &[(u64, u64)],
        durability: Durability,
    ) -> Result<()> {
        if cache.dirty_len() == 0 && touched.is_empty() {
            // Nothing changed: not even the superblock's write time.
            return self.finish(cache, durability);
        }
        self.free_moved(fs, cache, touched);
        let freed = freed_ranges(fs, touched);
        // The allocation records as they must be first: freed blocks still
        // in use.
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, 1);
        }
        let captured = capture(fs, unlinked);
        for &(start, count) in &freed {
            undo::apply(fs.handle(), start, count, -1);
        }
        captured?;
        let mut taken = cache.take_dirty();
        let changes = Allocations {
            touched,
            freed: &freed,
            unlinked,
        };
        let result = self.write(fs, cache, &changes, &mut taken, durability);
        cache.end_commit(&taken, result.is_ok());
        result
    }

    fn write(
        &mut self,
        fs: &mut Filesystem,
        cache: &MetaCache,
        changes: &Allocations<'_>,
        taken: &mut Vec<(u64, Vec<u8>)>,
        durability: Durability,
    ) -> Result<()> {
        let Allocations {
            touched,
            freed,
            unlinked,
        } = *changes;
        let raw = cache.raw();
        let bs = cache.block_size();
        let (mut records, mut new, mut old) = (Vec::new(), Vec::new(), Vec::new());
        for (block, data) in taken.iter() {
            let was_used = touched.was_used(*block);
            if was_used.is_some() && !in_use(fs, *block) {
                continue; // freed: its contents no longer matter
            }
            let part = if self.records.contains(block) {
                &mut records
            } else if was_used == Some(false) {
                &mut new
            } else {
                &mut old
            };
            part.push((*block, data.clone()));
        }
        if records.is_empty() && new.is_empty() && old.is_empty() {
            return self.finish(cache, durability);
        }
        if self.valid_on_disk {
            edit_superblock_on_disk(cache, |sb| sb::set_valid(sb, false))?;
            raw.flush().map_err(Error::reported)?;
            self.valid_on_disk = false;
            debug!(
                Topic::Journal,
                "ordered: the filesystem is marked not clean"
            );
        }
        write_runs(raw.as_ref(), bs, &records)?;
        raw.flush().map_err(Error::reported)?;
        write_runs(raw.as_ref(), bs, &new)?;
        if !new.is_empty() && !old.is_empty() {
            raw.flush().map_err(Error::reported)?;
        }
        write_runs(raw.as_ref(), bs, &old)?;
        if !freed.is_empty() {
            raw.flush().map_err(Error::reported)?;
            // The freed blocks, free on disk too.
            capture(fs, unlinked)?;
            let last = cache.take_dirty();
            taken.extend(last.iter().cloned());
            write_runs(raw.as_ref(), bs, &last)?;
        }
        debug!(
            Topic::Journal,
            "ordered: committed {} allocation records, {} new and {} existing blocks, {} runs freed",
            records.len(),
            new.len(),
            old.len(),
            freed.len()
        );
        self.finish(cache, durability)
    }

    /// With `Home`: flushes, then marks the filesystem clean again.
    fn finish(&mut self, cache: &MetaCache, durability: Durability) -> Result<()> {
        if durability == Durability::Recoverable {
            return Ok(());
        }
        cache.raw().flush().map_err(Error::reported)?;
        if self.valid_at_open && !self.valid_on_disk {
            edit_superblock_on_disk(cache, |sb| sb::set_valid(sb, true))?;
            cache.raw().flush().map_err(Error::reported)?;
            self.valid_on_disk = true;
            debug!(Topic::Journal, "ordered: the filesystem is marked clean");
        }
        Ok(())
    }

    /// After the last commit (home and flushed, the filesystem marked
    /// clean): nothing is left to do.
    pub(crate) fn shutdown(&mut self, _cache: &MetaCache) -> Result<(), Error> {
        Ok(())
    }
}
