//! Writes into holes whose blocks are linked into the file's tree later
//! (extent files, not bigalloc): the filter's half of the protocol whose
//! other half is `ext2_rs::txn` (`reserve_hole`, `hole_filled`, the
//! pending links).
//!
//! 1. A writer takes the file blocks it fills from the other writers
//!    ([`BlockRanges`]) and holds the map only shared, so writers into
//!    different holes run at once.
//! 2. It reserves image blocks near the goal (`OverlaidMap::goal`) under the library lock;
//!    the change touches no tree, and until the data is in, commits write
//!    the blocks as free and readers see a hole.
//! 3. It writes the data without the library lock, then hands the blocks
//!    to the door (`volume::door`): they wait to be linked from the next
//!    lock on, and the map's overlay (`file::overlay`) shows them
//!    meanwhile.  A failed data write frees them.
//! 4. Once [`LINK_AT`] extents wait, one writer links those that fit their
//!    leaves in place, a batch per change, still holding the map shared;
//!    the rest are linked holding the map alone ([`ServedFile::link_unlinked`]),
//!    as at a flush, FUA and shutdown.
//!
//! A hole larger than one change, or a filesystem short of room, falls
//! back to the exclusive path (`file::change`), which finds what was done
//! here as data.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use ext2_rs::error::{Error, Result};
use ext2_rs::extent_map::{Content, Extent, FileMap, Piece};
use ext2_rs::log::{self, Topic};
use ext2_rs::mapping::{self, BlockRuns};
use ext2_rs::txn::LINK_AT;
use ext2_rs::Layout;

use crate::file::change::{padded_blocks, write_runs, HOLE_CHUNK_BLOCKS};
use crate::file::overlay::{written_extents, MapChanges, OverlaidMap, TreeWindow};
use crate::file::{write_pieces, ServedFile};
use crate::volume::Volume;

/// Extents one change links in place (see [`ServedFile::link_in_place`]):
/// the library lock is let go of between changes, so writers go on.
const IN_PLACE_BATCH: usize = 128;

/// The one writer of a file linking its writes into holes, until dropped.
struct Linker<'a>(&'a AtomicBool);

impl Drop for Linker<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ServedFile {
    /// Whether writes into holes are linked later, holding the map shared.
    pub(crate) fn fills_concurrently(&self) -> bool {
        self.layout == Layout::Extents && self.cluster_ratio == 1
    }

    /// Writes `data` at `offset` holding the map only shared, when its
    /// pieces are data and holes only: `Ok(true)` when done, `Ok(false)`
    /// when the exclusive path must do it (unwritten blocks, a hole larger
    /// than one change, a filesystem short of room).
    pub(crate) fn write_shared(
        &self,
        volume: &Volume,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<bool> {
        // One look at the tree serves both the check and the fill: while
        // the map is held shared the tree changes only by leaves gaining
        // extents the overlay shows too (`link_in_place`).
        let map = self.map_shared()?;
        let blocks = self.window_blocks(map.block_size(), offset, data.len() as u64);
        let tree = map.tree_window(blocks)?;
        let pieces = map.overlaid(&tree).pieces(offset, data.len() as u64);
        if pieces
            .iter()
            .all(|p| matches!(p.content, Content::Data { .. }))
        {
            write_pieces(volume, &pieces, data, offset, fua)?;
            return Ok(true);
        }
        if pieces
            .iter()
            .any(|p| matches!(p.content, Content::Unwritten { .. }))
        {
            return Ok(false);
        }
        let Some(waiting) = self.fill_holes_shared(volume, &map, &tree, data, offset, fua)? else {
            return Ok(false);
        };
        let linker = if waiting >= LINK_AT {
            self.link_in_place(volume, &map)?
        } else {
            None
        };
        // Let go of the map before anything takes it alone.
        drop(map);
        if linker.is_some() {
            self.link_unlinked(volume)?;
        }
        drop(linker);
        if fua {
            self.make_durable(volume)?;
        }
        Ok(true)
    }

    /// Writes `data` at `offset`, whose pieces are data and holes only,
    /// holding `map` only shared: its blocks are taken from other writers
    /// of the file, the pieces looked up again (in `tree`, with the overlay
    /// as it is now), the data pieces written, and each hole filled with
    /// [`Self::fill_hole_shared`].  `Ok(None)` when this way cannot do it;
    /// `Ok(Some(n))`: done, and `n` extents of the file wait to be linked.
    fn fill_holes_shared(
        &self,
        volume: &Volume,
        map: &OverlaidMap,
        tree: &TreeWindow,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<Option<usize>> {
        let bs = map.block_size();
        let len = data.len() as u64;
        let _held = self
            .holes
            .ranges
            .take(offset / bs..(offset + len).div_ceil(bs));
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
        write_pieces(volume, &written, data, offset, fua)?;
        let mut waiting = 0;
        for piece in &holes {
            let bytes = &data[Self::span(piece, offset)];
            match self.fill_hole_shared(volume, map, &mut window, piece, bytes)? {
                Some(n) => waiting = n,
                None => return Ok(None),
            }
        }
        Ok(Some(waiting))
    }

    /// Fills the hole `piece` with `bytes` while other writers may fill
    /// other holes of the file (steps 2 and 3 above).  `Ok(None)` (nothing
    /// done) for a hole larger than one change or a filesystem short of
    /// room.
    fn fill_hole_shared(
        &self,
        volume: &Volume,
        map: &OverlaidMap,
        window: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
    ) -> Result<Option<usize>> {
        let bs = window.block_size();
        let (blocks, buf) = padded_blocks(window, piece, bytes);
        let count = blocks.end - blocks.start;
        if count > HOLE_CHUNK_BLOCKS {
            return Ok(None);
        }
        let near = map.goal(window, blocks.start);
        let reserved = volume.with_transactions(|fs, tx, _| {
            tx.reserve_hole(fs, self.ino, blocks.start, count, near)
        });
        let runs = match reserved {
            Ok(runs) => runs,
            Err(Error::NoSpace(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Err(e) = write_runs(&volume.image, &runs, &buf, bs) {
            self.abandon(volume, &runs);
            return Err(e);
        }
        let extents = Extent::written_runs(blocks.start, &runs);
        volume.door().hole_filled(self.ino, blocks.start, runs);
        let waiting = map.add_unlinked(&extents);
        window.replace_range(blocks.start, blocks.end, &extents);
        ext2_rs::debug!(
            Topic::Map,
            "{}: allocated blocks {:?} at {:?}",
            self.path,
            blocks,
            extents
        );
        Ok(Some(waiting))
    }

    /// Frees blocks reserved for a hole whose data write failed.
    fn abandon(&self, volume: &Volume, runs: &BlockRuns) {
        if let Err(undo) = volume.with_transactions(|fs, tx, _| tx.abandon_hole(fs, runs)) {
            // They stay allocated in memory only (commits write them as
            // free): lost to this server until it restarts.
            log::error(&format!(
                "{}: freeing blocks {runs:?} whose write failed: {undo}",
                self.path
            ));
        }
    }

    /// Fills file blocks `blocks` (a hole) with `buf` as one change holding
    /// the map exclusively, the blocks linked later: allocated near `near`
    /// and written under the library lock, then pending.  Notes in
    /// `changes` what the map must follow: the runs filled, and whether the
    /// tree changed (writes that waited were linked to make room), even if
    /// the fill failed.
    pub(crate) fn fill_hole_deferred(
        &self,
        volume: &Volume,
        blocks: Range<u64>,
        near: Option<u64>,
        buf: &[u8],
        changes: &mut MapChanges,
    ) -> Result<BlockRuns> {
        let bs = u64::from(volume.block_size);
        let count = blocks.end - blocks.start;
        let mut tree_changed = false;
        let runs = volume.with_transactions(|fs, tx, image| {
            let links = tx.links_made();
            let runs = tx.fill_hole(fs, self.ino, blocks.start, count, near, |fs, goal| {
                let runs = mapping::allocate(fs, goal, count)?;
                write_runs(image, &runs, buf, bs)?;
                Ok(runs)
            });
            tree_changed = tx.links_made() != links;
            runs
        });
        changes.tree |= tree_changed;
        let runs = runs?;
        changes
            .unlinked
            .extend(Extent::written_runs(blocks.start, &runs));
        Ok(runs)
    }

    /// The blocks written into holes of this file not linked yet.
    pub(crate) fn unlinked_extents(&self, volume: &Volume) -> Result<Vec<Extent>> {
        Ok(volume
            .with_transactions_if_writable(|_, tx| Ok(written_extents(&tx.unlinked(self.ino))))?
            .unwrap_or_default())
    }

    /// Links this file's writes into holes that wait into its tree, holding
    /// its map exclusively (step 4, and at a flush, FUA and shutdown).
    pub(crate) fn link_unlinked(&self, volume: &Volume) -> Result<()> {
        if !self.map.read().has_unlinked() {
            return Ok(());
        }
        let mut map = self.map_exclusive()?;
        if !map.has_unlinked() {
            return Ok(());
        }
        let waiting = map.unlinked_blocks();
        let linked = volume
            .with_transactions_if_writable(|fs, tx| tx.link_pending_noting_writes(fs, self.ino));
        let (changes, linked) = match linked {
            // The map knew of every link made before (its overlay held
            // just what was pending): it may keep the nodes not rewritten.
            Ok(Some(linked)) if linked.blocks == waiting => {
                (MapChanges::tree_rewrote(linked.rewritten), Ok(()))
            }
            Ok(linked) => {
                ext2_rs::debug!(
                    Topic::Map,
                    "{}: {} blocks were linked unseen: reading the whole tree again",
                    self.path,
                    waiting.saturating_sub(linked.map_or(0, |l| l.blocks))
                );
                (MapChanges::tree_changed(), Ok(()))
            }
            Err(e) => (MapChanges::tree_changed(), Err(e)),
        };
        self.after_change(volume, &mut map, changes, linked)
    }

    /// Makes this file's writes durable (FUA): its writes into holes
    /// linked, then one commit.
    pub(crate) fn make_durable(&self, volume: &Volume) -> Result<()> {
        self.link_unlinked(volume)?;
        volume.commit()
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
    fn link_in_place(&self, volume: &Volume, map: &OverlaidMap) -> Result<Option<Linker<'_>>> {
        if self.holes.linking.swap(true, Ordering::Acquire) {
            return Ok(None);
        }
        let linker = Linker(&self.holes.linking);
        let mut from = Some(0);
        let mut blocks = 0;
        while let Some(at) = from {
            let (linked, next) = volume.with_transactions(|fs, tx, _| {
                tx.link_in_place_some(fs, self.ino, at, IN_PLACE_BATCH)
            })?;
            // A batch none of which fits (a tree still in the inode, say):
            // the rest are left to the exclusive link too.
            from = next.filter(|_| linked.blocks > 0);
            blocks += linked.blocks;
            map.note_linked(linked);
        }
        if blocks > 0 {
            ext2_rs::debug!(
                Topic::Map,
                "{}: linked {blocks} blocks of writes into holes in place while writes went on",
                self.path
            );
        }
        Ok(Some(linker))
    }
}
