//! Changing a served file's block map: filling holes, writing unwritten
//! blocks, freeing blocks.  Each holds the file's map exclusively and makes
//! its metadata change through [`Volume`], working on a window of the map
//! (a [`FileMap`] of the blocks the request touches) that it keeps up to
//! date for the rest of the request.

use std::borrow::Cow;
use std::ops::Range;

use ext2_rs::extent_map::{Content, Extent, FileMap, Piece};
use ext2_rs::log::Topic;
use ext2_rs::mapping::{self, BlockRuns};
use ext2_rs::{Error, Result};

use crate::file::overlay::{MapChanges, OverlaidMap};
use crate::file::ServedFile;
use crate::image::Image;
use crate::volume::Volume;

/// The most blocks one change links into a hole: even if each lands in an
/// extent of its own, their tree nodes and bitmaps stay well inside the
/// smallest journal's transaction.
pub(crate) const HOLE_CHUNK_BLOCKS: u64 = 1024;

impl ServedFile {
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
    pub(crate) fn fill_hole(
        &self,
        volume: &Volume,
        map: &OverlaidMap,
        window: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
        changes: &mut MapChanges,
    ) -> Result<()> {
        let bs = window.block_size();
        let (blocks, buf) = padded_blocks(window, piece, bytes);
        // Chunks start on cluster boundaries (bigalloc places blocks by
        // their offset in the cluster).
        let chunk = HOLE_CHUNK_BLOCKS.max(volume.cluster_ratio);
        let mut start = blocks.start;
        while start < blocks.end {
            let end = ((start / chunk + 1) * chunk).min(blocks.end);
            let at = ((start - blocks.start) * bs) as usize;
            let len = ((end - start) * bs) as usize;
            self.fill_hole_chunk(volume, map, window, start..end, &buf[at..at + len], changes)?;
            start = end;
        }
        Ok(())
    }

    /// Fills file blocks `blocks` (a hole) with `buf`, as one change.
    fn fill_hole_chunk(
        &self,
        volume: &Volume,
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
        let near = map.goal(window, blocks.start);
        let runs = if self.fills_concurrently() {
            self.fill_hole_deferred(volume, blocks.clone(), near, buf, changes)?
        } else {
            let runs = volume.change_allocating(self.ino, count, |tx| {
                let fs = tx.fs();
                let goal = mapping::hole_goal(fs, self.ino, blocks.start, near)?;
                let ratio = fs.cluster_ratio();
                let (runs, new_units) = if ratio == 1 {
                    let runs = mapping::allocate(fs, goal, count)?;
                    (runs.clone(), runs)
                } else {
                    let existing = |cluster: u64| physical_cluster(window, cluster, ratio);
                    mapping::allocate_clustered(fs, blocks.clone(), existing, goal)?
                };
                write_runs(tx.image(), &runs, buf, bs)?;
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
        ext2_rs::debug!(
            Topic::Map,
            "{}: allocated blocks {:?} at {:?}",
            self.path,
            blocks,
            runs
        );
        Ok(())
    }

    /// Fills unwritten blocks, then marks them written, as one change.
    pub(crate) fn fill_unwritten(
        &self,
        volume: &Volume,
        map: &mut FileMap,
        piece: &Piece,
        image_offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let bs = map.block_size();
        let (blocks, buf) = padded_blocks(map, piece, bytes);
        let physical = (image_offset - (piece.file_offset - blocks.start * bs)) / bs;
        volume.change(self.ino, |tx| {
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
        ext2_rs::debug!(Topic::Map, "{}: blocks {:?} now written", self.path, blocks);
        Ok(())
    }

    /// Frees the blocks of file blocks `blocks`, in as many changes as the
    /// range needs to keep each transaction small.  Each change is
    /// committed before the next one runs (see `Volume::change`), so no
    /// freed block is reused while a crash could bring its owner back.
    pub(crate) fn punch(
        &self,
        volume: &Volume,
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
            let done = volume.change(self.ino, |tx| {
                let budget = tx.budget();
                mapping::punch(tx.fs(), self.ino, self.layout, at, blocks.end, budget)
            })?;
            map.replace_range(at, done, &[]);
            at = done;
        }
        ext2_rs::debug!(Topic::Map, "{}: freed blocks {:?}", self.path, blocks);
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

/// Writes `buf` to the image blocks `runs`, laid out one after the other.
pub(crate) fn write_runs(image: &Image, runs: &BlockRuns, buf: &[u8], bs: u64) -> Result<()> {
    let mut at = 0usize;
    for &(physical, len) in runs {
        let n = (len * bs) as usize;
        image
            .pwrite(&buf[at..at + n], physical * bs, false)
            .map_err(Error::reported)?;
        at += n;
    }
    Ok(())
}

/// The whole blocks a piece touches, and a buffer for them holding the
/// piece's bytes with zeroes around them (the rest of a newly used block
/// must read back as zeroes, never as what the image held there before).
/// (A piece of whole blocks is its own buffer.)
pub(crate) fn padded_blocks<'a>(
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
