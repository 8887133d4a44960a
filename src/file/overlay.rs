//! A served file's map as its readers must see it: the extent tree, read
//! lazily ([`LazyMap`]), with the blocks written into its holes whose links
//! into the tree still wait (see `ext2_rs::txn::Transactions::fill_hole`)
//! laid over it.
//!
//! Those writes change no tree block, so the lazy map's cached nodes stay
//! good: the file's map lock is held exclusively only while a write adds to
//! this overlay, not for a re-read of the tree.  Whoever links them (under
//! that lock, as every change of a tree is made) reads the tree again and
//! takes the overlay from the transaction: [`MapChanges`] says which.
//! The overlay only ever covers holes of the tree.

use std::ops::Range;

use parking_lot::Mutex;

use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::{pieces_in, Content, Extent, ExtentSet, FileMap, Piece};
use ext2_rs::lazy_map::LazyMap;
use ext2_rs::txn::Linked;

/// How far from a new block the map looks for a neighbour to place it
/// next to, in blocks, either side.
const NEIGHBOUR_SEARCH: u64 = 1024;

pub struct OverlaidMap {
    tree: LazyMap,
    /// The blocks written into holes and not linked yet.  Writers add to it
    /// holding the map shared (each into holes of its own: see
    /// `ServedFile::write`); it is replaced only under the map's exclusive
    /// lock.
    unlinked: Mutex<ExtentSet>,
    /// Links made in place while the map was held shared (see
    /// `ServedFile::link_in_place`), which the map has not followed yet:
    /// their blocks are still in the overlay, and the leaves they rewrote
    /// may be cached as they were.
    unfollowed: Mutex<Linked>,
}

/// What changes to a file's map did while its lock was held, so that the
/// map can follow.
#[derive(Debug, Default)]
pub struct MapChanges {
    /// The tree changed (or may have): read it again, and the overlay too.
    pub tree: bool,
    /// If known, the only tree blocks that changed: the others read so
    /// far are kept.
    pub rewritten: Option<Vec<u64>>,
    /// Blocks written into holes, not linked: added to the overlay.
    pub unlinked: Vec<Extent>,
}

impl MapChanges {
    /// The tree changed (or may have).
    pub fn tree_changed() -> MapChanges {
        MapChanges {
            tree: true,
            ..MapChanges::default()
        }
    }

    /// The tree changed in blocks `rewritten` only.
    pub fn tree_rewrote(rewritten: Vec<u64>) -> MapChanges {
        MapChanges {
            tree: true,
            rewritten: Some(rewritten),
            unlinked: Vec::new(),
        }
    }

    pub fn any(&self) -> bool {
        self.tree || !self.unlinked.is_empty()
    }
}

/// The tree's map of a range of file blocks (see
/// [`OverlaidMap::tree_window`]).
pub struct TreeWindow {
    map: FileMap,
    blocks: Range<u64>,
}

/// `(file block, image block, blocks)` triples as written extents.
pub fn written_extents(triples: &[(u64, u64, u64)]) -> Vec<Extent> {
    triples
        .iter()
        .map(|&(logical, physical, len)| Extent {
            logical,
            physical,
            len,
            unwritten: false,
        })
        .collect()
}

impl OverlaidMap {
    pub fn new(tree: LazyMap) -> OverlaidMap {
        OverlaidMap {
            tree,
            unlinked: Mutex::new(ExtentSet::default()),
            unfollowed: Mutex::new(Linked::default()),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.tree.block_size()
    }

    pub fn is_stale(&self) -> bool {
        self.tree.is_stale()
    }

    /// Whether blocks written into holes wait to be linked.
    pub fn has_unlinked(&self) -> bool {
        !self.unlinked.lock().is_empty()
    }

    /// How many blocks the overlay maps that are not linked yet (as far as
    /// the map knows).
    pub fn unlinked_blocks(&self) -> u64 {
        let unfollowed = self.unfollowed.lock().blocks;
        self.unlinked.lock().blocks().saturating_sub(unfollowed)
    }

    /// Notes links made in place while the map is held shared: the next
    /// [`OverlaidMap::follow`] takes them into account.
    pub fn note_linked(&self, linked: Linked) {
        self.unfollowed.lock().add(linked);
    }

    /// Reads the tree again (see [`LazyMap::reload`]).
    pub fn reload(&mut self) -> Result<()> {
        self.tree.reload()
    }

    /// Replaces the overlay: `extents` are all the file's unlinked blocks.
    pub fn set_unlinked(&mut self, extents: Vec<Extent>) -> Result<()> {
        *self.unlinked.get_mut() = ExtentSet::new(self.block_size() as u32, extents)
            .map_err(|why| Error::other(Errno::EIO, format!("blocks written into holes: {why}")))?;
        Ok(())
    }

    /// Adds blocks written into holes of the tree; returns how many
    /// extents the overlay holds.
    pub fn add_unlinked(&self, extents: &[Extent]) -> usize {
        let mut unlinked = self.unlinked.lock();
        for e in extents {
            unlinked.insert(*e);
        }
        unlinked.len()
    }

    /// Follows what a change of the file did: the tree read again and the
    /// overlay replaced by `unlinked()` if the tree changed, else the new
    /// unlinked blocks added.
    pub fn follow(
        &mut self,
        changes: MapChanges,
        unlinked: impl FnOnce() -> Result<Vec<Extent>>,
    ) -> Result<()> {
        if changes.tree {
            let unfollowed = std::mem::take(self.unfollowed.get_mut());
            let reloaded = match changes.rewritten {
                Some(mut blocks) => {
                    blocks.extend(unfollowed.rewritten);
                    self.tree.reload_except(&blocks)
                }
                None => self.reload(),
            };
            let overlay = unlinked().and_then(|extents| self.set_unlinked(extents));
            if overlay.is_err() {
                // Only a server shutting down cannot say: nothing is
                // served from here on.
                *self.unlinked.get_mut() = ExtentSet::default();
            }
            return reloaded.and(overlay);
        }
        self.add_unlinked(&changes.unlinked);
        Ok(())
    }

    /// Appends the extents that map any of file blocks `blocks`, in order,
    /// the tree's whole and the overlay's clipped.
    pub fn extents(&self, blocks: Range<u64>, out: &mut Vec<Extent>) -> Result<()> {
        let before = out.len();
        self.tree.extents(blocks.clone(), out)?;
        let overlay = self.unlinked.lock();
        let mut unlinked = overlay.clipped(blocks).peekable();
        if unlinked.peek().is_none() {
            return Ok(());
        }
        // Both lists are in order and never overlap: merge them.
        let tree = out.split_off(before);
        let mut tree = tree.into_iter().peekable();
        loop {
            let next = match (tree.peek(), unlinked.peek()) {
                (Some(t), Some(u)) if t.logical < u.logical => tree.next(),
                (_, Some(_)) => unlinked.next(),
                (Some(_), None) => tree.next(),
                (None, None) => break,
            };
            out.extend(next);
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` of the file into pieces of like
    /// content (see [`FileMap::pieces`]), into `out`.
    pub fn pieces(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        if !self.has_unlinked() {
            return self.tree.pieces(offset, len, out);
        }
        out.clear();
        let bs = self.block_size();
        let mut extents = Vec::new();
        let end = offset.saturating_add(len).div_ceil(bs);
        self.extents(offset / bs..end, &mut extents)?;
        pieces_in(bs, &extents, offset, len, out);
        Ok(())
    }

    /// The map of file blocks `blocks` alone (see [`LazyMap::window`]).
    pub fn window(&self, blocks: Range<u64>) -> Result<FileMap> {
        Ok(self.overlaid(&self.tree_window(blocks)?))
    }

    /// The tree's map of file blocks `blocks` alone, without the overlay:
    /// good for as long as the map is held (only a holder of the map's
    /// exclusive lock changes the tree), while the overlay may grow.
    pub fn tree_window(&self, blocks: Range<u64>) -> Result<TreeWindow> {
        Ok(TreeWindow {
            map: self.tree.window(blocks.clone())?,
            blocks,
        })
    }

    /// `tree` with the overlay's blocks, as they are now, laid over it.
    pub fn overlaid(&self, tree: &TreeWindow) -> FileMap {
        let mut window = tree.map.clone();
        for e in self.unlinked.lock().clipped(tree.blocks.clone()) {
            window.replace_range(e.logical, e.end(), &[e]);
        }
        window
    }

    /// Where new blocks for file block `logical` go: after the block
    /// before it when `window` (a window of this map) shows one, with no
    /// lookup; else [`OverlaidMap::placement_goal`]; `None` when nothing is
    /// near (libext2fs's goal then applies).
    pub fn goal(&self, window: &FileMap, logical: u64) -> Option<u64> {
        let bs = window.block_size();
        let before = logical
            .checked_sub(1)
            .map(|block| window.pieces(block * bs, 1)[0].content);
        match before {
            Some(Content::Data { image_offset }) | Some(Content::Unwritten { image_offset }) => {
                Some(image_offset / bs + 1)
            }
            _ => self.placement_goal(logical),
        }
    }

    /// Where file block `logical` would lie if the file were laid out as
    /// its nearest mapped block is: that block's place plus the distance.
    /// Looks before it first, then after it, in widening windows of up to
    /// [`NEIGHBOUR_SEARCH`] blocks (so that a full file costs a lookup of a
    /// few extents, not of a thousand); `None` if nothing is that near (or
    /// the tree cannot be read: this is only a hint).
    pub fn placement_goal(&self, logical: u64) -> Option<u64> {
        let mut extents = Vec::new();
        let mut reach = 16;
        loop {
            extents.clear();
            self.extents(logical.saturating_sub(reach)..logical, &mut extents)
                .ok()?;
            if let Some(e) = extents.last() {
                return Some(e.physical + (logical - e.logical));
            }
            extents.clear();
            self.extents(logical..logical.saturating_add(reach), &mut extents)
                .ok()?;
            if let Some(e) = extents.first() {
                return Some(e.physical.saturating_sub(e.logical.saturating_sub(logical)));
            }
            if reach >= NEIGHBOUR_SEARCH {
                return None;
            }
            reach = (reach * 8).min(NEIGHBOUR_SEARCH);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use ext2_rs::lazy_map::MapSource;
    use ext2_rs::testing::MemDevice;
    use ext2_rs::{Access, Filesystem};

    const BS: u64 = 1024;

    fn extent(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            unwritten: false,
        }
    }

    /// An ext4 image (1 KiB blocks) whose `/f` has 64 blocks, data in
    /// every fourth (the rest holes), and its map read lazily.
    fn sparse_file_map() -> OverlaidMap {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("ext2filter-unlinked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(dir.join("f")).unwrap();
        for block in (0..64).step_by(4) {
            f.seek(SeekFrom::Start(block * BS)).unwrap();
            f.write_all(&[block as u8 + 1; BS as usize]).unwrap();
        }
        f.set_len(64 * BS).unwrap();
        drop(f);
        let d = dir.to_str().unwrap();
        let dev = Arc::new(MemDevice::mkfs(
            &["-t", "ext4", "-b", "1024", "-d", d],
            "8M",
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
        let ino = fs.lookup("/f").unwrap();
        let source = MapSource::new(&fs, dev, 1 << 20);
        OverlaidMap::new(LazyMap::open(&mut fs, source, ino, "/f").unwrap())
    }

    #[test]
    fn unlinked_blocks_fill_the_trees_holes_until_the_tree_is_read_again() {
        let mut map = sparse_file_map();
        let tree_block = |logical: u64| {
            let mut out = Vec::new();
            map.tree.extents(logical..logical + 1, &mut out).unwrap();
            out[0].physical + (logical - out[0].logical)
        };
        let (zero, four) = (tree_block(0), tree_block(4));
        map.add_unlinked(&[extent(1, 9000, 1)]);
        map.add_unlinked(&[extent(2, 9001, 1)]);
        assert_eq!(
            map.unlinked.lock().to_vec(),
            vec![extent(1, 9000, 2)],
            "merged"
        );
        let mut pieces = Vec::new();
        map.pieces(0, 5 * BS, &mut pieces).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::data(0, BS, zero * BS),
                Piece::data(BS, 2 * BS, 9000 * BS),
                Piece::hole(3 * BS, BS),
                Piece::data(4 * BS, BS, four * BS),
            ]
        );
        let window = map.window(1..5).unwrap();
        assert_eq!(window.extents(), &[extent(1, 9000, 2), extent(4, four, 1)]);
        // The nearest mapped block before, else after, places a new one.
        assert_eq!(map.placement_goal(3), Some(9002));
        assert_eq!(map.placement_goal(6), Some(four + 2));
        assert_eq!(map.placement_goal(5000), None, "nothing that near");
        // Once linked elsewhere, the tree is read again and the overlay
        // replaced by what still waits.
        map.follow(
            MapChanges {
                tree: true,
                unlinked: vec![extent(40, 1, 1)],
                ..MapChanges::default()
            },
            || Ok(vec![extent(2, 9001, 1)]),
        )
        .unwrap();
        map.pieces(BS, 2 * BS, &mut pieces).unwrap();
        assert_eq!(
            pieces,
            vec![Piece::hole(BS, BS), Piece::data(2 * BS, BS, 9001 * BS)]
        );
        map.follow(
            MapChanges {
                unlinked: vec![extent(3, 9002, 1)],
                ..MapChanges::default()
            },
            || panic!("the tree did not change"),
        )
        .unwrap();
        assert_eq!(map.unlinked.lock().to_vec(), vec![extent(2, 9001, 2)]);
    }

    #[test]
    fn changes_say_whether_anything_happened() {
        assert!(!MapChanges::default().any());
        assert!(MapChanges::tree_changed().any());
        assert_eq!(
            written_extents(&[(1, 2, 3), (9, 20, 1)]),
            vec![extent(1, 2, 3), extent(9, 20, 1)]
        );
    }
}
