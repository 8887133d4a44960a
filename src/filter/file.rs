//! One served file: its size, its block map, and its data path.  (What
//! changes its map, allocating, converting and freeing blocks, is in
//! `filter::change`.)
//!
//! Reads and writes to blocks the file already owns go straight between the
//! client's buffer and the plugin, holding the map shared and no library
//! lock: pieces that follow each other in the image are one plugin request
//! even with holes between them in the file (see `filter::coalesce`).
//! Writes into holes of an extent file (not bigalloc) change no tree: their
//! blocks are linked into it later and laid over it meanwhile
//! (`filter::unlinked`), so they hold the map shared, several at once, each
//! taking the blocks it fills from the others (`filter::ranges`).  Other
//! writes that need new blocks, that turn unwritten blocks into data, and
//! every change of a tree hold the map exclusively, so no request can use
//! a mapping while it changes; they work on a window of the map covering
//! the request, and the map is read again from the inode afterwards.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::filter::coalesce;
use crate::filter::ranges::BlockRanges;
use crate::filter::shared::Shared;
use crate::filter::unlinked::{MapChanges, OverlaidMap};
use crate::nbdkit::report::{ext2_debug_map, nbd_debug};
use crate::pool;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::{Content, FileMap, Piece};
use ext2_rs::lazy_map::LazyMap;
use ext2_rs::txn::LINK_AT;
use ext2_rs::{Ino, Layout};

pub struct ServedFile {
    pub ino: Ino,
    pub path: String,
    pub size: u64,
    pub(super) layout: Layout,
    /// Blocks per allocation cluster (bigalloc), 1 otherwise.
    cluster_ratio: u64,
    /// Blocks can be freed (`mapping::punch`): extents, no bigalloc.
    punchable: bool,
    /// Why the file is never written, if it is not (`ext2_rs::policy::file`,
    /// or inline data).
    read_only: Option<String>,
    map: RwLock<OverlaidMap>,
    /// The last write needed new blocks: the next one likely does too, and
    /// takes the map exclusively at once instead of looking first (where
    /// writes into holes cannot share the map: see `fills_concurrently`).
    filling: AtomicBool,
    /// The blocks writers sharing the map fill (`filter::ranges`).
    pub(super) ranges: BlockRanges,
    /// A writer is linking writes into holes in place
    /// ([`ServedFile::link_in_place`]): others need not.
    linking: AtomicBool,
}

/// The one writer of a file linking its writes into holes, until dropped.
struct Linker<'a>(&'a AtomicBool);

impl Drop for Linker<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Extents one change links in place (see [`ServedFile::link_in_place`]):
/// the library lock is let go of between changes, so writers go on.
const IN_PLACE_BATCH: usize = 128;

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
    pub fn new(
        ino: Ino,
        path: String,
        size: u64,
        layout: Layout,
        cluster_ratio: u64,
        map: LazyMap,
        read_only: Option<String>,
    ) -> ServedFile {
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
            filling: AtomicBool::new(false),
            linking: AtomicBool::new(false),
            ranges: BlockRanges::default(),
        }
    }

    /// Blocks per allocation cluster (bigalloc), 1 otherwise.
    pub(super) fn cluster_ratio(&self) -> u64 {
        self.cluster_ratio
    }

    /// Whether the file may be written (see `read_only`).
    pub fn writable(&self) -> bool {
        self.read_only.is_none()
    }

    /// Where in `buf` a piece of a request starting at `offset` goes.
    pub(super) fn span(piece: &Piece, offset: u64) -> Range<usize> {
        coalesce::span(piece, offset)
    }

    /// The map, shared; read again first if a change left it stale.
    pub(super) fn map_shared(&self) -> Result<RwLockReadGuard<'_, OverlaidMap>> {
        let map = self.map.read();
        if !map.is_stale() {
            return Ok(map);
        }
        drop(map);
        Ok(RwLockWriteGuard::downgrade(self.map_exclusive()?))
    }

    /// The map, exclusively (to change it); read again first if stale.
    pub(super) fn map_exclusive(&self) -> Result<RwLockWriteGuard<'_, OverlaidMap>> {
        let mut map = self.map.write();
        if map.is_stale() {
            map.reload()?;
        }
        Ok(map)
    }

    /// The window of the map a change of bytes `[offset, offset + len)`
    /// looks at: its blocks, the block before them (where new blocks are
    /// best placed), all rounded out to whole clusters.
    pub(super) fn change_window(
        &self,
        map: &OverlaidMap,
        offset: u64,
        len: u64,
    ) -> Result<FileMap> {
        map.window(self.window_blocks(map.block_size(), offset, len))
    }

    /// The file blocks [`Self::change_window`] covers.
    pub(super) fn window_blocks(&self, bs: u64, offset: u64, len: u64) -> Range<u64> {
        let ratio = self.cluster_ratio.max(1);
        let first = (offset / bs).saturating_sub(1) / ratio * ratio;
        let end = (offset + len).div_ceil(bs).div_ceil(ratio) * ratio;
        first..end
    }

    pub fn read(&self, shared: &Shared, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.layout == Layout::Inline {
            return shared.lock_fs()?.read_via_library(self.ino, buf, offset);
        }
        let map = self.map_shared()?;
        let mut pieces = Vec::new();
        map.pieces(offset, buf.len() as u64, &mut pieces)?;
        read_pieces(shared, &pieces, buf, offset)
    }

    pub fn write(&self, shared: &Shared, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        if !shared.writable() {
            return Err(Error::other(Errno::EROFS, "the filesystem is read-only"));
        }
        if let Some(why) = &self.read_only {
            return Err(Error::other(Errno::EROFS, why.clone()));
        }
        let end_block = (offset + data.len() as u64).div_ceil(u64::from(shared.block_size));
        if self.layout == Layout::Extents && end_block > 1 << 32 {
            // Only a damaged size reaches here: blocks allocated there could
            // never be linked.
            return Err(Error::other(
                Errno::EFBIG,
                "writing past the 2^32 blocks an extent tree maps",
            ));
        }
        if self.fills_concurrently() {
            // One look at the tree serves both the check and the fill:
            // while the map is held shared the tree changes only by leaves
            // gaining extents the overlay shows too (`link_in_place`).
            let map = self.map_shared()?;
            let blocks = self.window_blocks(map.block_size(), offset, data.len() as u64);
            let tree = map.tree_window(blocks)?;
            let pieces = map.overlaid(&tree).pieces(offset, data.len() as u64);
            if pieces
                .iter()
                .all(|p| matches!(p.content, Content::Data { .. }))
            {
                return write_pieces(shared, &pieces, data, offset, fua);
            }
            let unwritten = pieces
                .iter()
                .any(|p| matches!(p.content, Content::Unwritten { .. }));
            if !unwritten {
                let filled = self.fill_holes_shared(shared, &map, &tree, data, offset, fua)?;
                if let Some(waiting) = filled {
                    let linker = if waiting >= LINK_AT {
                        self.link_in_place(shared, &map)?
                    } else {
                        None
                    };
                    // Let go of the map before anything takes it alone.
                    drop(map);
                    if linker.is_some() {
                        self.link_unlinked(shared)?;
                    }
                    drop(linker);
                    if fua {
                        shared.flush()?;
                    }
                    return Ok(());
                }
            }
        } else if !self.filling.load(Ordering::Relaxed) {
            let map = self.map_shared()?;
            let mut pieces = Vec::new();
            map.pieces(offset, data.len() as u64, &mut pieces)?;
            if pieces
                .iter()
                .all(|p| matches!(p.content, Content::Data { .. }))
            {
                return write_pieces(shared, &pieces, data, offset, fua);
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
        self.filling.store(needs_blocks, Ordering::Relaxed);
        let mut changes = MapChanges::default();
        let result = (|| {
            write_pieces(shared, &pieces, data, offset, fua)?;
            for piece in &pieces {
                let bytes = &data[Self::span(piece, offset)];
                match piece.content {
                    Content::Data { .. } => {}
                    Content::Hole => {
                        self.fill_hole(shared, &map, &mut window, piece, bytes, &mut changes)?;
                    }
                    Content::Unwritten { image_offset } => {
                        changes.tree = true;
                        self.fill_unwritten(shared, &mut window, piece, image_offset, bytes)?;
                    }
                }
            }
            Ok(())
        })();
        let changed = changes.any();
        self.after_change(shared, &mut map, changes, result)?;
        drop(map);
        if fua && changed {
            shared.flush()?;
        }
        Ok(())
    }

    /// Once changes of the map were attempted, whether or not they
    /// succeeded: the map follows them (see [`OverlaidMap::follow`]).
    fn after_change(
        &self,
        shared: &Shared,
        map: &mut OverlaidMap,
        changes: MapChanges,
        result: Result<()>,
    ) -> Result<()> {
        if !changes.any() {
            return result;
        }
        let followed = map.follow(changes, || shared.unlinked(self.ino));
        result.and(followed)
    }

    /// Links this file's writes into holes that wait (see
    /// `filter::unlinked`) into its tree, holding its map exclusively.
    pub(super) fn link_unlinked(&self, shared: &Shared) -> Result<()> {
        if !self.map.read().has_unlinked() {
            return Ok(());
        }
        let mut map = self.map_exclusive()?;
        if !map.has_unlinked() {
            return Ok(());
        }
        let waiting = map.unlinked_blocks();
        let (changes, linked) = match shared.link_pending(self.ino) {
            // The map knew of every link made before (its overlay held
            // just what was pending): it may keep the nodes not rewritten.
            Ok(linked) if linked.blocks == waiting => {
                (MapChanges::tree_rewrote(linked.rewritten), Ok(()))
            }
            Ok(linked) => {
                nbd_debug!(
                    ext2_debug_map,
                    "{}: {} blocks were linked unseen: reading the whole tree again",
                    self.path,
                    waiting.saturating_sub(linked.blocks)
                );
                (MapChanges::tree_changed(), Ok(()))
            }
            Err(e) => (MapChanges::tree_changed(), Err(e)),
        };
        self.after_change(shared, &mut map, changes, linked)
    }

    /// Links the writes into holes that wait and go into their leaves in
    /// place, holding `map` only shared, a batch per change: the other
    /// writers of the file go on meanwhile (a tree that keeps its shape and
    /// nodes can be walked while its leaves gain extents the overlay also
    /// shows).  What needs the tree reshaped waits for
    /// [`ServedFile::link_unlinked`], which also has the map follow: the
    /// caller's next step, while it holds the [`Linker`] returned.  One
    /// writer at a time does this; for the others it returns `None` at
    /// once, and they go on writing.
    fn link_in_place(&self, shared: &Shared, map: &OverlaidMap) -> Result<Option<Linker<'_>>> {
        if self.linking.swap(true, Ordering::Acquire) {
            return Ok(None);
        }
        let linker = Linker(&self.linking);
        let mut from = Some(0);
        let mut blocks = 0;
        while let Some(at) = from {
            let (linked, next) = shared.link_in_place_some(self.ino, at, IN_PLACE_BATCH)?;
            // A batch none of which fits (a tree still in the inode, say):
            // the rest are left to the exclusive link too.
            from = next.filter(|_| linked.blocks > 0);
            blocks += linked.blocks;
            map.note_linked(linked);
        }
        if blocks > 0 {
            nbd_debug!(
                ext2_debug_map,
                "{}: linked {blocks} blocks of writes into holes in place while writes went on",
                self.path
            );
        }
        Ok(Some(linker))
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

    fn check_writable(&self, shared: &Shared) -> Result<()> {
        match &self.read_only {
            Some(why) => Err(Error::other(Errno::EROFS, why.clone())),
            None if !shared.writable() => Err(Error::other(
                Errno::EROFS,
                format!("{}: read-only", self.path),
            )),
            None => Ok(()),
        }
    }

    /// Frees the whole blocks of a range (extent files; elsewhere a no-op,
    /// as trim is only advice).
    pub fn trim(&self, shared: &Shared, offset: u64, len: u64) -> Result<()> {
        self.check_writable(shared)?;
        if !self.can_trim() {
            return Ok(());
        }
        let mut map = self.map_exclusive()?;
        let mut window = self.change_window(&map, offset, len)?;
        let blocks = whole_blocks(window.block_size(), self.size, offset, len);
        let result = self.punch(shared, &mut window, blocks);
        self.after_change(shared, &mut map, MapChanges::tree_changed(), result)
    }

    /// Zeroes a range.  Holes and unwritten blocks already read as zeroes;
    /// with `may_trim`, whole blocks of an extent file are freed; the rest
    /// of the data is zeroed in place.  With `fast`, fails with ENOTSUP
    /// before changing anything if that would mean writing zeroes slowly.
    pub fn zero(
        &self,
        shared: &Shared,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<()> {
        self.check_writable(shared)?;
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
        if fast && !in_place.is_empty() && !shared.plugin().capabilities().can_fast_zero {
            return Err(Error::Device(Errno::ENOTSUP));
        }
        let punched = self.punch(shared, &mut window, freed.clone());
        let changes = if freed.is_empty() {
            MapChanges::default()
        } else {
            MapChanges::tree_changed()
        };
        self.after_change(shared, &mut map, changes, punched)?;
        for piece in in_place {
            if let Content::Data { image_offset } = piece.content {
                shared
                    .image
                    .zero(piece.len, image_offset, may_trim, fast)
                    .map_err(Error::reported)?;
            }
        }
        Ok(())
    }
}

/// A read may span a gap this large in the image between two runs of the
/// file's data (see `filter::coalesce`).
const READ_GAP: u64 = 16 << 10;

/// Reads a request's pieces into `buf` (the request at `offset`): each run
/// of pieces contiguous in the image in one plugin request, several at once
/// when the plugin allows; holes and unwritten blocks as zeroes.
fn read_pieces(shared: &Shared, pieces: &[Piece], buf: &mut [u8], offset: u64) -> Result<()> {
    if let [Piece {
        content: Content::Data { image_offset },
        ..
    }] = pieces
    {
        // The common case, with nothing to group or allocate.
        return shared
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
    let parallel = shared.plugin().parallel();
    pool::run_all(parallel, pool::FAN_OUT, jobs, &|(run, dst)| -> Result<()> {
        if run.is_direct() {
            shared
                .image
                .pread(dst, run.image_offset)
                .map_err(Error::reported)?;
        } else {
            let mut image = vec![0u8; run.image_len as usize];
            shared
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
pub(super) fn write_pieces(
    shared: &Shared,
    pieces: &[Piece],
    data: &[u8],
    offset: u64,
    fua: bool,
) -> Result<()> {
    let runs = coalesce::runs(pieces, offset, 0);
    let parallel = shared.plugin().parallel();
    pool::run_all(parallel, pool::FAN_OUT, runs, &|run| -> Result<()> {
        let from = &data[run.span.clone()];
        if run.is_direct() {
            shared
                .image
                .pwrite(from, run.image_offset, fua)
                .map_err(Error::reported)?;
        } else {
            let image = coalesce::gather(&run, pieces, offset, from);
            shared
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
