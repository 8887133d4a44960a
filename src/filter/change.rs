//! Changing a served file's block map: filling holes, writing unwritten
//! blocks, freeing blocks.  Each holds the file's map exclusively and makes
//! its metadata change through [`Shared`], working on a window of the map
//! (a [`FileMap`] of the blocks the request touches) that it keeps up to
//! date for the rest of the request.

use std::borrow::Cow;
use std::ops::Range;

use ext2_rs::error::Errno;
use ext2_rs::extent_map::{Content, Extent, FileMap, Piece};
use ext2_rs::mapping::{self, BlockRuns};
use ext2_rs::{Layout, Result};

use crate::filter::file::ServedFile;
use crate::filter::shared::Shared;
use crate::filter::unlinked::{MapChanges, OverlaidMap, TreeWindow};
use crate::image::Image;
use crate::nbdkit::report::{ext2_debug_map, nbd_debug, nbd_error};

/// The most blocks one change links into a hole: even if each lands in an
/// extent of its own, their tree nodes and bitmaps stay well inside the
/// smallest journal's transaction.
const HOLE_CHUNK_BLOCKS: u64 = 1024;

impl ServedFile {
    /// The whole blocks a piece touches, and a buffer for them holding the
    /// piece's bytes with zeroes around them (the rest of a newly used block
    /// must read back as zeroes, never as what the image held there before).
    /// (A piece of whole blocks is its own buffer.)
    fn padded_blocks<'a>(
        &self,
        map: &FileMap,
        piece: &Piece,
        bytes: &'a [u8],
    ) -> (Range<u64>, Cow<'a, [u8]>) {
        let bs = map.block_size();
        let first = piece.file_offset / bs;
        let end = (piece.file_offset + piece.len).div_ceil(bs);
        if piece.file_offset % bs == 0 && piece.len % bs == 0 {
            return (first..end, Cow::Borrowed(bytes));
        }
        let mut buf = vec![0u8; ((end - first) * bs) as usize];
        let at = (piece.file_offset - first * bs) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        (first..end, Cow::Owned(buf))
    }

    /// Allocates blocks for a hole, fills them, then links them to the
    /// file.  A hole of up to [`HOLE_CHUNK_BLOCKS`] blocks is one change (if
    /// any step fails, nothing happened); a longer one is filled in chunks
    /// of that many, each one change, so that no change outgrows a
    /// transaction however fragmented the free space (a failure part way
    /// leaves the chunks before it written, as a failed write may).
    ///
    /// `map` is the file's whole map (for a neighbour to place the blocks
    /// near), `window` the part the request touches; what changed is
    /// added to `changes`.
    pub(super) fn fill_hole(
        &self,
        shared: &Shared,
        map: &OverlaidMap,
        window: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
        changes: &mut MapChanges,
    ) -> Result<()> {
        let bs = window.block_size();
        let (blocks, buf) = self.padded_blocks(window, piece, bytes);
        // Chunks start on cluster boundaries (bigalloc places blocks by
        // their offset in the cluster).
        let chunk = HOLE_CHUNK_BLOCKS.max(shared.cluster_ratio);
        let mut start = blocks.start;
        while start < blocks.end {
            let end = ((start / chunk + 1) * chunk).min(blocks.end);
            let at = ((start - blocks.start) * bs) as usize;
            let len = ((end - start) * bs) as usize;
            self.fill_hole_chunk(shared, map, window, start..end, &buf[at..at + len], changes)?;
            start = end;
        }
        Ok(())
    }

    /// Writes into holes whose blocks are linked later (extent files, not
    /// bigalloc) can run at once, holding the map shared: see
    /// [`ServedFile::fill_holes_shared`].
    pub(super) fn fills_concurrently(&self) -> bool {
        self.layout == Layout::Extents && self.cluster_ratio() == 1
    }

    /// Writes `data` at `offset`, whose pieces are data and holes only,
    /// holding `map` only shared: its blocks are taken from other writers
    /// of the file (see `filter::ranges`), the pieces looked up again (in
    /// `tree`, the tree's map of the blocks [`ServedFile::window_blocks`]
    /// names, with the overlay as it is now), the
    /// data pieces written, and each hole filled with
    /// [`Self::fill_hole_shared`].  `Ok(None)` when this way cannot do it
    /// (unwritten blocks appeared, a hole too large for one change, the
    /// filesystem short of room without linking first): the caller then
    /// writes it the exclusive way, which finds what was done here as data.
    /// `Ok(Some(n))`: done, and `n` extents of the file wait to be linked.
    pub(super) fn fill_holes_shared(
        &self,
        shared: &Shared,
        map: &OverlaidMap,
        tree: &TreeWindow,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<Option<usize>> {
        let bs = map.block_size();
        let len = data.len() as u64;
        let _held = self.ranges.take(offset / bs..(offset + len).div_ceil(bs));
        let mut window = map.overlaid(tree);
        let pieces = window.pieces(offset, len);
        if pieces
            .iter()
            .any(|p| matches!(p.content, Content::Unwritten { .. }))
        {
            return Ok(None);
        }
        let (holes, written): (Vec<Piece>, Vec<Piece>) = pieces
            .into_iter()
            .partition(|p| matches!(p.content, Content::Hole));
        super::file::write_pieces(shared, &written, data, offset, fua)?;
        let mut waiting = 0;
        for piece in &holes {
            let bytes = &data[Self::span(piece, offset)];
            match self.fill_hole_shared(shared, map, &mut window, piece, bytes)? {
                Some(n) => waiting = n,
                None => return Ok(None),
            }
        }
        Ok(Some(waiting))
    }

    /// Fills the hole `piece` with `bytes` while other writers may fill
    /// other holes of the file: allocates its blocks (a change under the
    /// library lock that changes no tree), writes the data without the
    /// library lock, then has the blocks wait to be linked and lays them
    /// over the map.  Until then readers see a hole and commits write the
    /// blocks as free, so neither a reader nor a crash ever sees them
    /// without their data.  `Ok(None)` (nothing done) for a hole larger
    /// than one change or a filesystem short of room.
    fn fill_hole_shared(
        &self,
        shared: &Shared,
        map: &OverlaidMap,
        window: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
    ) -> Result<Option<usize>> {
        let bs = window.block_size();
        let (blocks, buf) = self.padded_blocks(window, piece, bytes);
        let count = blocks.end - blocks.start;
        if count > HOLE_CHUNK_BLOCKS {
            return Ok(None);
        }
        let before = content_before(window, blocks.start);
        let near = placement(map, before, blocks.start, bs);
        let runs = match shared.reserve_hole(self.ino, blocks.start, count, near) {
            Ok(runs) => runs,
            Err(e) if e.errno() == Errno::ENOSPC => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Err(e) = write_runs(&shared.image, &runs, &buf, bs) {
            if let Err(undo) = shared.abandon_hole(&runs) {
                // They stay allocated in memory only (commits write them
                // as free): lost to this server until it restarts.
                nbd_error!(
                    "{}: freeing blocks {runs:?} whose write failed: {undo}",
                    self.path
                );
            }
            return Err(e);
        }
        let extents = Extent::written_runs(blocks.start, &runs);
        shared.hole_filled(self.ino, blocks.start, runs);
        let waiting = map.add_unlinked(&extents);
        window.replace_range(blocks.start, blocks.end, &extents);
        nbd_debug!(
            ext2_debug_map,
            "{}: allocated blocks {:?} at {:?}",
            self.path,
            blocks,
            extents
        );
        Ok(Some(waiting))
    }

    /// Fills file blocks `blocks` (a hole) with `buf`, as one change.
    fn fill_hole_chunk(
        &self,
        shared: &Shared,
        map: &OverlaidMap,
        window: &mut FileMap,
        blocks: Range<u64>,
        buf: &[u8],
        changes: &mut MapChanges,
    ) -> Result<()> {
        let bs = window.block_size();
        let count = blocks.end - blocks.start;
        // The data first: the blocks are linked only once they hold it (and
        // a commit flushes the plugin before it makes the link durable), so
        // the file never exposes what they held before.
        let write_runs = |image: &Image, runs: &BlockRuns| write_runs(image, runs, buf, bs);
        let before = content_before(window, blocks.start);
        let runs = if self.fills_concurrently() {
            let near = placement(map, before, blocks.start, bs);
            let (runs, tree_changed) =
                shared.fill_hole(self.ino, blocks.start, count, near, |fs, image, goal| {
                    let runs = mapping::allocate(fs, goal, count)?;
                    write_runs(image, &runs)?;
                    Ok(runs)
                });
            // Even if the fill failed: links made to find room changed it.
            changes.tree |= tree_changed;
            let runs = runs?;
            changes
                .unlinked
                .extend(Extent::written_runs(blocks.start, &runs));
            runs
        } else {
            let runs = shared.change_allocating(self.ino, count, |tx| {
                let fs = tx.fs();
                let goal = match before {
                    Some(Content::Data { image_offset })
                    | Some(Content::Unwritten { image_offset }) => image_offset / bs + 1,
                    _ => mapping::goal_for(fs, self.ino, blocks.start)?,
                };
                let ratio = fs.cluster_ratio();
                let (runs, new_units) = if ratio == 1 {
                    let runs = mapping::allocate(fs, goal, count)?;
                    (runs.clone(), runs)
                } else {
                    let existing = |cluster: u64| physical_cluster(window, cluster, ratio);
                    mapping::allocate_clustered(fs, blocks.clone(), existing, goal)?
                };
                write_runs(tx.image(), &runs)?;
                let fs = tx.fs();
                let new_count = new_units.iter().map(|r| r.1).sum::<u64>() / fs.cluster_ratio();
                mapping::link_blocks(fs, self.ino, self.layout, blocks.start, &runs, new_count)?;
                Ok(runs)
            });
            changes.tree = true;
            runs?
        };
        window.replace_range(
            blocks.start,
            blocks.end,
            &Extent::written_runs(blocks.start, &runs),
        );
        nbd_debug!(
            ext2_debug_map,
            "{}: allocated blocks {:?} at {:?}",
            self.path,
            blocks,
            runs
        );
        Ok(())
    }

    /// Fills unwritten blocks, then marks them written, as one change.
    pub(super) fn fill_unwritten(
        &self,
        shared: &Shared,
        map: &mut FileMap,
        piece: &Piece,
        image_offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let bs = map.block_size();
        let (blocks, buf) = self.padded_blocks(map, piece, bytes);
        let physical = (image_offset - (piece.file_offset - blocks.start * bs)) / bs;
        shared.change(self.ino, |tx| {
            tx.write_data(&buf, physical * bs)?;
            mapping::mark_written(tx.fs(), self.ino, blocks.start, blocks.end)
        })?;
        map.replace_range(
            blocks.start,
            blocks.end,
            &[Extent {
                logical: blocks.start,
                physical,
                len: blocks.end - blocks.start,
                unwritten: false,
            }],
        );
        nbd_debug!(
            ext2_debug_map,
            "{}: blocks {:?} now written",
            self.path,
            blocks
        );
        Ok(())
    }

    /// Frees the blocks of file blocks `blocks`, in as many changes as the
    /// range needs to keep each transaction small.  Each change is
    /// committed before the next one runs (see `Shared::change`), so no
    /// freed block is reused while a crash could bring its owner back.
    pub(super) fn punch(
        &self,
        shared: &Shared,
        map: &mut FileMap,
        blocks: Range<u64>,
    ) -> Result<()> {
        let bs = map.block_size();
        let owns_blocks = map
            .pieces(blocks.start * bs, (blocks.end - blocks.start) * bs)
            .iter()
            .any(|p| p.content != Content::Hole);
        if blocks.is_empty() || !owns_blocks {
            return Ok(());
        }
        let mut at = blocks.start;
        while at < blocks.end {
            let done = shared.change(self.ino, |tx| {
                let budget = tx.budget();
                mapping::punch(tx.fs(), self.ino, self.layout, at, blocks.end, budget)
            })?;
            map.replace_range(at, done, &[]);
            at = done;
        }
        nbd_debug!(ext2_debug_map, "{}: freed blocks {:?}", self.path, blocks);
        Ok(())
    }
}

/// The physical cluster already holding some block of logical cluster
/// `cluster` (bigalloc), if any.
fn physical_cluster(map: &FileMap, cluster: u64, ratio: u64) -> Option<u64> {
    let bs = map.block_size();
    map.pieces(cluster * ratio * bs, ratio * bs)
        .iter()
        .find_map(|p| match p.content {
            Content::Data { image_offset } | Content::Unwritten { image_offset } => {
                Some(image_offset / bs / ratio)
            }
            Content::Hole => None,
        })
}

/// What the window says of the file block before `logical`, if any.
fn content_before(window: &FileMap, logical: u64) -> Option<Content> {
    let bs = window.block_size();
    logical
        .checked_sub(1)
        .map(|block| window.pieces(block * bs, 1)[0].content)
}

/// Where new blocks for file block `logical` go: after the block before
/// it when the window shows one (no lookup), else where the nearest extent
/// says they would be had the file been written in order (as
/// ext2fs_find_inode_goal places them), so that neighbours merge as the
/// file fills.
fn placement(map: &OverlaidMap, before: Option<Content>, logical: u64, bs: u64) -> Option<u64> {
    match before {
        Some(Content::Data { image_offset }) | Some(Content::Unwritten { image_offset }) => {
            Some(image_offset / bs + 1)
        }
        _ => map.placement_goal(logical),
    }
}

/// Writes `buf` to the image blocks `runs`, laid out one after the other.
fn write_runs(image: &Image, runs: &BlockRuns, buf: &[u8], bs: u64) -> Result<()> {
    let mut at = 0usize;
    for &(physical, len) in runs {
        let n = (len * bs) as usize;
        image
            .pwrite(&buf[at..at + n], physical * bs, false)
            .map_err(ext2_rs::Error::reported)?;
        at += n;
    }
    Ok(())
}
