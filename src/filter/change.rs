//! Changing a served file's block map: filling holes, writing unwritten
//! blocks, freeing blocks.  Each holds the file's map exclusively and makes
//! its metadata change through [`Shared`].

use std::ops::Range;

use ext2_rs::extent_map::{Content, Extent, FileMap, Piece};
use ext2_rs::mapping;
use ext2_rs::Result;

use crate::filter::file::ServedFile;
use crate::filter::shared::Shared;
use crate::nbdkit::report::{ext2_debug_map, nbd_debug};

impl ServedFile {
    /// The whole blocks a piece touches, and a buffer for them holding the
    /// piece's bytes with zeroes around them (the rest of a newly used block
    /// must read back as zeroes, never as what the image held there before).
    fn padded_blocks(&self, map: &FileMap, piece: &Piece, bytes: &[u8]) -> (Range<u64>, Vec<u8>) {
        let bs = map.block_size();
        let first = piece.file_offset / bs;
        let end = (piece.file_offset + piece.len).div_ceil(bs);
        let mut buf = vec![0u8; ((end - first) * bs) as usize];
        let at = (piece.file_offset - first * bs) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        (first..end, buf)
    }

    /// Allocates blocks for a hole, fills them, then links them to the file.
    pub(super) fn fill_hole(
        &self,
        shared: &Shared,
        map: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
    ) -> Result<()> {
        let bs = map.block_size();
        let (blocks, buf) = self.padded_blocks(map, piece, bytes);
        let count = blocks.end - blocks.start;
        // Keep flush from recording these blocks as used before they are linked.
        let _pass = shared.allocation_pass();
        let (runs, new_units) = {
            let mut fs = shared.lock_fs()?;
            shared.change_metadata(&mut fs, |fs| {
                let goal = match blocks
                    .start
                    .checked_sub(1)
                    .map(|b| map.pieces(b * bs, 1)[0].content)
                {
                    Some(Content::Data { image_offset })
                    | Some(Content::Unwritten { image_offset }) => image_offset / bs + 1,
                    _ => mapping::goal_for(fs, self.ino, blocks.start)?,
                };
                let ratio = fs.cluster_ratio();
                if ratio == 1 {
                    let runs = mapping::allocate(fs, goal, count)?;
                    Ok((runs.clone(), runs))
                } else {
                    let existing = |cluster: u64| physical_cluster(map, cluster, ratio);
                    mapping::allocate_clustered(fs, blocks.clone(), existing, goal)
                }
            })?
        };
        let mut at = 0usize;
        for &(physical, len) in &runs {
            let n = (len * bs) as usize;
            if let Err(e) = shared.image.pwrite(&buf[at..at + n], physical * bs, false) {
                if let Ok(mut fs) = shared.lock_fs() {
                    mapping::free_blocks(&mut fs, &new_units);
                }
                return Err(e.into());
            }
            at += n;
        }
        let mut fs = shared.lock_fs()?;
        let new_count = new_units.iter().map(|r| r.1).sum::<u64>() / fs.cluster_ratio();
        let linked = shared.change_metadata(&mut fs, |fs| {
            mapping::link_blocks(fs, self.ino, self.layout, blocks.start, &runs, new_count)
        });
        if let Err(e) = linked {
            // Rolled back: nothing was linked, so the blocks go back.
            mapping::free_blocks(&mut fs, &new_units);
            return Err(e);
        }
        drop(fs);
        let mut logical = blocks.start;
        let new: Vec<Extent> = runs
            .iter()
            .map(|&(physical, len)| {
                let e = Extent {
                    logical,
                    physical,
                    len,
                    unwritten: false,
                };
                logical += len;
                e
            })
            .collect();
        map.replace_range(blocks.start, blocks.end, &new);
        nbd_debug!(
            ext2_debug_map,
            "{}: allocated blocks {:?} at {:?}",
            self.path,
            blocks,
            runs
        );
        Ok(())
    }

    /// Fills unwritten blocks, then marks them written.
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
        shared.image.pwrite(&buf, physical * bs, false)?;
        let mut fs = shared.lock_fs()?;
        shared.change_metadata(&mut fs, |fs| {
            mapping::mark_written(fs, self.ino, blocks.start, blocks.end)
        })?;
        drop(fs);
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
        let mut fs = shared.lock_fs()?;
        shared.change_metadata(&mut fs, |fs| {
            mapping::punch(fs, self.ino, self.layout, blocks.start, blocks.end)
        })?;
        drop(fs);
        map.replace_range(blocks.start, blocks.end, &[]);
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
