//! One served file: its size, its block map, and its data path.  (What
//! changes its map, allocating, converting and freeing blocks, is in
//! `file::change`.)
//!
//! Reads and writes to blocks the file already owns go straight between the
//! client's buffer and the plugin, holding the map shared and no library
//! lock: pieces that follow each other in the image are one plugin request
//! even with holes between them in the file (see `file::coalesce`).
//! Writes into holes of an extent file (not bigalloc) change no tree: their
//! blocks are linked into it later and laid over it meanwhile
//! (`file::overlay`), so they hold the map shared, several at once, each
//! taking the blocks it fills from the others (`file::holes`).  Other
//! writes that need new blocks, that turn unwritten blocks into data, and
//! every change of a tree hold the map exclusively, so no request can use
//! a mapping while it changes; they work on a window of the map covering
//! the request, and the map is read again from the inode afterwards.

mod change;
pub mod coalesce;
mod fills;
mod holes;
pub mod overlay;
pub mod ranges;
pub mod registry;

use std::ops::Range;
use std::sync::atomic::Ordering;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::file::fills::Holes;
use crate::file::overlay::{MapChanges, OverlaidMap};
use crate::pool;
use crate::volume::{FoundFile, Volume};
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::{Content, FileMap, Piece};
use ext2_rs::{Ino, Layout};

pub use registry::Files;

pub struct ServedFile {
    pub ino: Ino,
    pub path: String,
    pub size: u64,
    layout: Layout,
    /// Blocks per allocation cluster (bigalloc), 1 otherwise.
    cluster_ratio: u64,
    /// Blocks can be freed (`mapping::punch`): extents, no bigalloc.
    punchable: bool,
    /// Why the file is never written, if it is not (`ext2_rs::policy::file`,
    /// or inline data).
    read_only: Option<String>,
    map: RwLock<OverlaidMap>,
    /// What writers into its holes share (`file::holes`).
    holes: Holes,
}

/// How a range of the file reads, for block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Data,
    /// Allocated but unwritten: reads as zeroes.
    Zero,
    /// Not allocated: reads as zeroes.
    Hole,
}

impl ServedFile {
    pub fn new(path: String, found: FoundFile) -> ServedFile {
        let FoundFile {
            ino,
            size,
            layout,
            cluster_ratio,
            map,
            read_only,
        } = found;
        // Inline-data files are served read-only: libext2fs 1.47.0's
        // inline-data write path corrupts them.
        let read_only = read_only.or_else(|| {
            (layout == Layout::Inline)
                .then(|| format!("{path}: writing inline-data files is not supported"))
        });
        ServedFile {
            ino,
            path,
            size,
            layout,
            cluster_ratio,
            punchable: layout == Layout::Extents && cluster_ratio == 1,
            read_only,
            map: RwLock::new(OverlaidMap::new(map)),
            holes: Holes::default(),
        }
    }

    /// Whether the file may be written (see `read_only`).
    pub fn writable(&self) -> bool {
        self.read_only.is_none()
    }

    /// Where in `buf` a piece of a request starting at `offset` goes.
    pub(crate) fn span(piece: &Piece, offset: u64) -> Range<usize> {
        coalesce::span(piece, offset)
    }

    /// The map, shared; read again first if a change left it stale.
    pub(crate) fn map_shared(&self) -> Result<RwLockReadGuard<'_, OverlaidMap>> {
        let map = self.map.read();
        if !map.is_stale() {
            return Ok(map);
        }
        drop(map);
        Ok(RwLockWriteGuard::downgrade(self.map_exclusive()?))
    }

    /// The map, exclusively (to change it); read again first if stale.
    pub(crate) fn map_exclusive(&self) -> Result<RwLockWriteGuard<'_, OverlaidMap>> {
        let mut map = self.map.write();
        if map.is_stale() {
            map.reload()?;
        }
        Ok(map)
    }

    /// The window of the map a change of bytes `[offset, offset + len)`
    /// looks at: its blocks, the block before them (where new blocks are
    /// best placed), all rounded out to whole clusters.
    pub(crate) fn change_window(
        &self,
        map: &OverlaidMap,
        offset: u64,
        len: u64,
    ) -> Result<FileMap> {
        map.window(self.window_blocks(map.block_size(), offset, len))
    }

    /// The file blocks [`Self::change_window`] covers.
    pub(crate) fn window_blocks(&self, bs: u64, offset: u64, len: u64) -> Range<u64> {
        let ratio = self.cluster_ratio.max(1);
        let first = (offset / bs).saturating_sub(1) / ratio * ratio;
        let end = (offset + len).div_ceil(bs).div_ceil(ratio) * ratio;
        first..end
    }

    pub fn read(&self, volume: &Volume, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.layout == Layout::Inline {
            return volume.lock_fs()?.read_via_library(self.ino, buf, offset);
        }
        let map = self.map_shared()?;
        let mut pieces = Vec::new();
        map.pieces(offset, buf.len() as u64, &mut pieces)?;
        read_pieces(volume, &pieces, buf, offset)
    }

    pub fn write(&self, volume: &Volume, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        if !volume.writable() {
            return Err(Error::other(Errno::EROFS, "the filesystem is read-only"));
        }
        if let Some(why) = &self.read_only {
            return Err(Error::other(Errno::EROFS, why.clone()));
        }
        let end_block = (offset + data.len() as u64).div_ceil(u64::from(volume.block_size));
        if self.layout == Layout::Extents && end_block > 1 << 32 {
            // Only a damaged size reaches here: blocks allocated there could
            // never be linked.
            return Err(Error::other(
                Errno::EFBIG,
                "writing past the 2^32 blocks an extent tree maps",
            ));
        }
        if self.fills_concurrently() {
            if self.write_shared(volume, data, offset, fua)? {
                return Ok(());
            }
        } else if !self.holes.filling.load(Ordering::Relaxed) {
            let map = self.map_shared()?;
            let mut pieces = Vec::new();
            map.pieces(offset, data.len() as u64, &mut pieces)?;
            if pieces
                .iter()
                .all(|p| matches!(p.content, Content::Data { .. }))
            {
                return write_pieces(volume, &pieces, data, offset, fua);
            }
        }
        // Some blocks must be allocated or converted: take the map for
        // ourselves, then look again, as another writer may have got there.
        let mut map = self.map_exclusive()?;
        let mut window = self.change_window(&map, offset, data.len() as u64)?;
        let pieces = window.pieces(offset, data.len() as u64);
        let needs_blocks = pieces
            .iter()
            .any(|p| !matches!(p.content, Content::Data { .. }));
        self.holes.filling.store(needs_blocks, Ordering::Relaxed);
        let mut changes = MapChanges::default();
        let result = (|| {
            write_pieces(volume, &pieces, data, offset, fua)?;
            for piece in &pieces {
                let bytes = &data[Self::span(piece, offset)];
                match piece.content {
                    Content::Data { .. } => {}
                    Content::Hole => {
                        self.fill_hole(volume, &map, &mut window, piece, bytes, &mut changes)?;
                    }
                    Content::Unwritten { image_offset } => {
                        changes.tree = true;
                        self.fill_unwritten(volume, &mut window, piece, image_offset, bytes)?;
                    }
                }
            }
            Ok(())
        })();
        let changed = changes.any();
        self.after_change(volume, &mut map, changes, result)?;
        drop(map);
        if fua && changed {
            self.make_durable(volume)?;
        }
        Ok(())
    }

    /// Once changes of the map were attempted, whether or not they
    /// succeeded: the map follows them (see [`OverlaidMap::follow`]).
    fn after_change(
        &self,
        volume: &Volume,
        map: &mut OverlaidMap,
        changes: MapChanges,
        result: Result<()>,
    ) -> Result<()> {
        if !changes.any() {
            return result;
        }
        let followed = map.follow(changes, || self.unlinked_extents(volume));
        result.and(followed)
    }

    /// Block status of `[offset, offset + len)`, as runs of like status.
    pub fn status(&self, offset: u64, len: u64) -> Result<Vec<(u64, Status)>> {
        if self.layout == Layout::Inline {
            return Ok(vec![(len, Status::Data)]);
        }
        let map = self.map_shared()?;
        let mut pieces = Vec::new();
        map.pieces(offset, len, &mut pieces)?;
        let mut out: Vec<(u64, Status)> = Vec::new();
        for piece in pieces {
            let status = match piece.content {
                Content::Data { .. } => Status::Data,
                Content::Unwritten { .. } => Status::Zero,
                Content::Hole => Status::Hole,
            };
            match out.last_mut() {
                Some((n, s)) if *s == status => *n += piece.len,
                _ => out.push((piece.len, status)),
            }
        }
        Ok(out)
    }

    /// Whether trim can free blocks of this file (see `mapping::punch`).
    pub fn can_trim(&self) -> bool {
        self.punchable
    }

    fn check_writable(&self, volume: &Volume) -> Result<()> {
        match &self.read_only {
            Some(why) => Err(Error::other(Errno::EROFS, why.clone())),
            None if !volume.writable() => Err(Error::other(
                Errno::EROFS,
                format!("{}: read-only", self.path),
            )),
            None => Ok(()),
        }
    }

    /// Frees the whole blocks of a range (extent files; elsewhere a no-op,
    /// as trim is only advice).
    pub fn trim(&self, volume: &Volume, offset: u64, len: u64) -> Result<()> {
        self.check_writable(volume)?;
        if !self.can_trim() {
            return Ok(());
        }
        let mut map = self.map_exclusive()?;
        let mut window = self.change_window(&map, offset, len)?;
        let blocks = whole_blocks(window.block_size(), self.size, offset, len);
        let result = self.punch(volume, &mut window, blocks);
        self.after_change(volume, &mut map, MapChanges::tree_changed(), result)
    }

    /// Zeroes a range.  Holes and unwritten blocks already read as zeroes;
    /// with `may_trim`, whole blocks of an extent file are freed; the rest
    /// of the data is zeroed in place.  With `fast`, fails with ENOTSUP
    /// before changing anything if that would mean writing zeroes slowly.
    pub fn zero(
        &self,
        volume: &Volume,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<()> {
        self.check_writable(volume)?;
        let punching = may_trim && self.can_trim();
        let mut map = self.map_exclusive()?;
        let mut window = self.change_window(&map, offset, len)?;
        let bs = window.block_size();
        let freed = if punching {
            whole_blocks(bs, self.size, offset, len)
        } else {
            0..0
        };
        let in_place: Vec<Piece> = window
            .pieces(offset, len)
            .into_iter()
            .filter(|p| matches!(p.content, Content::Data { .. }))
            .flat_map(|p| outside(&p, freed.start * bs, freed.end * bs))
            .collect();
        if fast && !in_place.is_empty() && !volume.device().capabilities().can_fast_zero {
            return Err(Error::Device(Errno::ENOTSUP));
        }
        let punched = self.punch(volume, &mut window, freed.clone());
        let changes = if freed.is_empty() {
            MapChanges::default()
        } else {
            MapChanges::tree_changed()
        };
        self.after_change(volume, &mut map, changes, punched)?;
        for piece in in_place {
            if let Content::Data { image_offset } = piece.content {
                volume
                    .image
                    .zero(piece.len, image_offset, may_trim, fast)
                    .map_err(Error::reported)?;
            }
        }
        Ok(())
    }
}

/// A read may span a gap this large in the image between two runs of the
/// file's data (see `file::coalesce`).
const READ_GAP: u64 = 16 << 10;

/// Reads a request's pieces into `buf` (the request at `offset`): each run
/// of pieces contiguous in the image in one plugin request, several at once
/// when the plugin allows; holes and unwritten blocks as zeroes.
fn read_pieces(volume: &Volume, pieces: &[Piece], buf: &mut [u8], offset: u64) -> Result<()> {
    if let [Piece {
        content: Content::Data { image_offset },
        ..
    }] = pieces
    {
        // The common case, with nothing to group or allocate.
        return volume
            .image
            .pread(buf, *image_offset)
            .map_err(Error::reported);
    }
    let runs = coalesce::runs(pieces, offset, READ_GAP);
    // Zero what no run covers, and give each run its part of the buffer.
    let mut jobs: Vec<(&coalesce::Run, &mut [u8])> = Vec::with_capacity(runs.len());
    let mut rest = buf;
    let mut at = 0usize;
    for run in &runs {
        let (gap, tail) = std::mem::take(&mut rest).split_at_mut(run.span.start - at);
        gap.fill(0);
        let (dst, tail) = tail.split_at_mut(run.span.len());
        rest = tail;
        at = run.span.end;
        jobs.push((run, dst));
    }
    rest.fill(0);
    let parallel = volume.device().parallel();
    pool::run_all(parallel, pool::FAN_OUT, jobs, &|(run, dst)| -> Result<()> {
        if run.is_direct() {
            volume
                .image
                .pread(dst, run.image_offset)
                .map_err(Error::reported)?;
        } else {
            let mut image = vec![0u8; run.image_len as usize];
            volume
                .image
                .pread(&mut image, run.image_offset)
                .map_err(Error::reported)?;
            coalesce::scatter(run, pieces, offset, &image, dst);
        }
        Ok(())
    })
    .into_iter()
    .collect()
}

/// Writes the data pieces of a request (`data`, at `offset`): each run of
/// pieces contiguous in the image in one plugin request, several at once
/// when the plugin allows.  Other pieces are left to the caller.
pub(crate) fn write_pieces(
    volume: &Volume,
    pieces: &[Piece],
    data: &[u8],
    offset: u64,
    fua: bool,
) -> Result<()> {
    let runs = coalesce::runs(pieces, offset, 0);
    let parallel = volume.device().parallel();
    pool::run_all(parallel, pool::FAN_OUT, runs, &|run| -> Result<()> {
        let from = &data[run.span.clone()];
        if run.is_direct() {
            volume
                .image
                .pwrite(from, run.image_offset, fua)
                .map_err(Error::reported)?;
        } else {
            let image = coalesce::gather(&run, pieces, offset, from);
            volume
                .image
                .pwrite(&image, run.image_offset, fua)
                .map_err(Error::reported)?;
        }
        Ok(())
    })
    .into_iter()
    .collect()
}

/// The whole file blocks inside `[offset, offset + len)` of a file of
/// `size` bytes.  The block holding the end of the file counts as whole
/// when the range reaches the end: its bytes past the end are never read.
fn whole_blocks(bs: u64, size: u64, offset: u64, len: u64) -> Range<u64> {
    let first = offset.div_ceil(bs);
    let end = if offset + len >= size {
        size.div_ceil(bs)
    } else {
        (offset + len) / bs
    };
    first..end.max(first)
}

/// The parts of a data piece outside the byte range `[from, to)`.
fn outside(piece: &Piece, from: u64, to: u64) -> Vec<Piece> {
    let Content::Data { image_offset } = piece.content else {
        return vec![*piece];
    };
    let end = piece.file_offset + piece.len;
    let mut out = Vec::new();
    let mut keep = |start: u64, stop: u64| {
        if start < stop {
            out.push(Piece {
                file_offset: start,
                len: stop - start,
                content: Content::Data {
                    image_offset: image_offset + (start - piece.file_offset),
                },
            });
        }
    };
    if from >= to {
        keep(piece.file_offset, end);
    } else {
        keep(piece.file_offset, end.min(from));
        keep(piece.file_offset.max(to), end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(file_offset: u64, len: u64, image_offset: u64) -> Piece {
        Piece::data(file_offset, len, image_offset)
    }

    #[test]
    fn whole_blocks_round_inwards() {
        assert_eq!(whole_blocks(1024, 1 << 20, 0, 1024), 0..1);
        assert_eq!(whole_blocks(1024, 1 << 20, 1, 2047), 1..2);
        assert_eq!(whole_blocks(1024, 1 << 20, 1, 1000), 1..1);
        assert_eq!(whole_blocks(4096, 1 << 20, 100, 1 << 20), 1..256);
    }

    #[test]
    fn the_last_partial_block_is_whole_when_reached() {
        // A 10,000-byte file: its third 4 KiB block holds only 1,808 bytes.
        assert_eq!(whole_blocks(4096, 10_000, 4096, 10_000 - 4096), 1..3);
        assert_eq!(whole_blocks(4096, 10_000, 4096, 4000), 1..1);
    }

    #[test]
    fn outside_keeps_both_edges() {
        let p = data(100, 5000, 7000);
        assert_eq!(
            outside(&p, 1024, 4096),
            vec![data(100, 924, 7000), data(4096, 1004, 7000 + 3996)]
        );
    }

    #[test]
    fn outside_an_empty_range_keeps_everything() {
        let p = data(100, 5000, 7000);
        assert_eq!(outside(&p, 0, 0), vec![p]);
    }

    #[test]
    fn outside_a_covering_range_keeps_nothing() {
        assert!(outside(&data(1024, 2048, 0), 0, 8192).is_empty());
    }
}
