//! Linking a batch of new extents into an extent tree with one write of
//! each leaf they land in.
//!
//! `ext2fs_extent_insert` walks the tree from the root, rewrites the leaf
//! and recomputes its checksum (a CRC of the whole block) for every extent
//! it inserts: a batch of writes into holes scattered over a large file
//! pays all of that for each of them.  Here the batch, in file order, is cut
//! into the runs that fall in one leaf; each leaf is read once, its run
//! merged into it (joining the extents a new one continues, before or
//! after, as the kernel does), and written once, with one checksum.
//!
//! Only what leaves the tree's shape alone is done here: an extent that
//! finds its leaf full (which must split) and joins no neighbour, one that
//! would come first in its leaf (the index entries above repeat a leaf's
//! first block), and every extent of a tree held whole in the inode, are
//! handed back for libext2fs to insert.

use std::ops::Range;

use crate::error::{Errno, Error, Result};
use crate::format::{
    extent_csum_ok, extent_entry_at, i_block_bytes, index_entry, inode_csum_seed,
    seal_extent_block, ExtentHeader, RawExtent, EXTENT_ENTRY_BYTES, EXTENT_HEADER_BYTES,
    EXTENT_MAGIC, EXT_INIT_MAX_LEN, MAX_EXTENT_DEPTH,
};
use crate::fs::{Filesystem, Ino};
use crate::sys;

/// A new extent: (file block, image block, blocks), written.
pub type NewExtent = (u64, u64, u64);

/// One extent of a leaf as stored: `len` as the kernel counts it, the
/// unwritten flag apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeafEntry {
    pub logical: u64,
    pub len: u64,
    pub physical: u64,
    pub unwritten: bool,
}

impl LeafEntry {
    fn end(&self) -> u64 {
        self.logical + self.len
    }

    /// Whether `next` continues this extent in the file and in the image
    /// and the two fit in one written extent.
    fn joins(&self, next: &LeafEntry) -> bool {
        !self.unwritten
            && !next.unwritten
            && self.end() == next.logical
            && self.physical + self.len == next.physical
            && self.len + next.len <= EXT_INIT_MAX_LEN
    }
}

/// Merges `new` (sorted, not overlapping, each in a hole) into the sorted
/// `leaf`, which may hold `max` entries.  Returns, in order, those that
/// need the tree to change shape (they would come first in the leaf, or
/// find it full and join no neighbour), for libext2fs to insert.  `Err`
/// names a file block one of them would map a second time.
pub(super) fn merge_into_leaf(
    leaf: &mut Vec<LeafEntry>,
    new: &[NewExtent],
    max: usize,
) -> std::result::Result<Vec<NewExtent>, u64> {
    let mut refused = Vec::new();
    for &(logical, physical, len) in new {
        let entry = LeafEntry {
            logical,
            len,
            physical,
            unwritten: false,
        };
        let at = leaf.partition_point(|e| e.logical <= logical);
        if let Some(prev) = at.checked_sub(1).map(|i| leaf[i]) {
            if prev.end() > logical {
                return Err(logical);
            }
        }
        let next = leaf.get(at).copied();
        if let Some(next) = next {
            if entry.end() > next.logical {
                return Err(next.logical);
            }
        }
        let joins_prev = at > 0 && leaf[at - 1].joins(&entry);
        let joins_next = next.is_some_and(|next| entry.joins(&next));
        if at == 0 || (leaf.len() >= max && !joins_prev && !joins_next) {
            refused.push((logical, physical, len));
            continue;
        }
        let at = if joins_prev {
            leaf[at - 1].len += len;
            at - 1
        } else {
            leaf.insert(at, entry);
            at
        };
        if leaf.get(at + 1).is_some_and(|next| leaf[at].joins(next)) {
            leaf[at].len += leaf[at + 1].len;
            leaf.remove(at + 1);
        }
    }
    Ok(refused)
}

/// An extent node read from its block, with what checking it needs.
struct NodeBlock {
    block: u64,
    bytes: Vec<u8>,
}

impl NodeBlock {
    fn entries(&self) -> usize {
        usize::from(ExtentHeader::read(&self.bytes).entries)
    }

    fn max(&self) -> usize {
        usize::from(ExtentHeader::read(&self.bytes).max)
    }

    fn depth(&self) -> u16 {
        ExtentHeader::read(&self.bytes).depth
    }

    fn leaf_entries(&self) -> Vec<LeafEntry> {
        (0..self.entries())
            .map(|i| {
                let e = RawExtent::read(&self.bytes, extent_entry_at(i));
                LeafEntry {
                    logical: u64::from(e.logical),
                    len: e.len,
                    physical: e.physical,
                    unwritten: e.unwritten,
                }
            })
            .collect()
    }

    fn set_leaf_entries(&mut self, entries: &[LeafEntry]) {
        let old = self.entries();
        ExtentHeader::set_entries(&mut self.bytes, entries.len() as u16);
        for (i, e) in entries.iter().enumerate() {
            let raw = RawExtent {
                logical: e.logical as u32,
                len: e.len,
                physical: e.physical,
                unwritten: e.unwritten,
            };
            raw.write(&mut self.bytes, extent_entry_at(i));
        }
        // Entries a merge made redundant are cleared, not left behind.
        let cleared = extent_entry_at(entries.len())..extent_entry_at(old);
        if !cleared.is_empty() {
            self.bytes[cleared].fill(0);
        }
    }

    /// The index entry at `i`: (first file block, child block).
    fn index(&self, i: usize) -> (u64, u64) {
        let (logical, child) = index_entry(&self.bytes, extent_entry_at(i));
        (u64::from(logical), child)
    }
}

/// An extent tree being walked from its root, for the leaf of each run.
struct Tree<'a> {
    fs: &'a mut Filesystem,
    ino: Ino,
    /// The inode's checksum seed, with `metadata_csum`.
    seed: Option<u32>,
    root: NodeBlock,
    /// The index node last read at each depth below the root (a batch in
    /// file order walks the same ones again and again).
    index_nodes: Vec<Option<NodeBlock>>,
}

impl<'a> Tree<'a> {
    /// `None` when the whole tree lies in the inode.
    fn open(fs: &'a mut Filesystem, ino: Ino) -> Result<Option<Tree<'a>>> {
        let inode = fs.read_inode_raw(ino)?;
        if inode.i_flags & sys::EXT4_EXTENTS_FL == 0 {
            return Err(Error::other(Errno::EINVAL, "not an extent file"));
        }
        let bytes = i_block_bytes(&inode.i_block);
        let root = NodeBlock { block: 0, bytes };
        let mut tree = Tree {
            seed: fs
                .metadata_csum_seed()
                .map(|seed| inode_csum_seed(seed, ino, inode.i_generation)),
            fs,
            ino,
            root,
            index_nodes: Vec::new(),
        };
        let depth = tree.check(&tree.root, None)?;
        if depth == 0 {
            return Ok(None);
        }
        tree.index_nodes = (0..depth).map(|_| None).collect();
        Ok(Some(tree))
    }

    fn damaged(&self, block: u64, why: impl std::fmt::Display) -> Error {
        Error::other(
            Errno::EIO,
            format!(
                "inode {}: extent block {block} {why}: the image is damaged",
                self.ino
            ),
        )
    }

    /// Checks a node's header (and checksum, for a block), and that it has
    /// `depth` when that is known; returns its depth.
    fn check(&self, node: &NodeBlock, depth: Option<u16>) -> Result<u16> {
        let bytes = &node.bytes;
        if ExtentHeader::read(bytes).magic != EXTENT_MAGIC {
            return Err(self.damaged(node.block, "has a bad magic number"));
        }
        let room = (bytes.len() - EXTENT_HEADER_BYTES) / EXTENT_ENTRY_BYTES;
        if node.max() == 0 || node.max() > room || node.entries() > node.max() {
            return Err(self.damaged(node.block, "has a bad entry count"));
        }
        if depth.map_or(node.depth() > MAX_EXTENT_DEPTH, |d| d != node.depth()) {
            return Err(self.damaged(node.block, "is at the wrong depth"));
        }
        if node.depth() > 0 && node.entries() == 0 {
            return Err(self.damaged(node.block, "is an empty index node"));
        }
        if let (Some(seed), true) = (self.seed, node.block != 0) {
            if !extent_csum_ok(bytes, seed) {
                return Err(self.damaged(node.block, "fails its checksum"));
            }
        }
        Ok(node.depth())
    }

    fn read(&mut self, block: u64, depth: u16) -> Result<NodeBlock> {
        if block >= self.fs.blocks_count() || self.fs.first_reserved_in(block, 1).is_some() {
            return Err(self.damaged(block, "lies off the filesystem's data blocks"));
        }
        let mut bytes = vec![0u8; self.fs.block_size() as usize];
        self.fs.read_block(block, &mut bytes)?;
        let node = NodeBlock { block, bytes };
        self.check(&node, Some(depth))?;
        Ok(node)
    }

    /// The leaf whose range holds file block `logical`, and the file blocks
    /// that range covers (from the key of the index entry that leads to it,
    /// or 0 before the first key, up to the next key at any level).
    fn leaf_for(&mut self, logical: u64) -> Result<(u64, Range<u64>)> {
        let mut range = 0..1u64 << 32;
        let mut depth = self.root.depth();
        let mut child = pick(&self.root, logical, &mut range);
        while depth > 1 {
            depth -= 1;
            let slot = usize::from(depth);
            let cached = self.index_nodes[slot]
                .as_ref()
                .is_some_and(|n| n.block == child);
            if !cached {
                let node = self.read(child, depth)?;
                self.index_nodes[slot] = Some(node);
            }
            let node = self.index_nodes[slot].as_ref().expect("read above");
            child = pick(node, logical, &mut range);
        }
        Ok((child, range))
    }

    fn write_leaf(&mut self, leaf: &mut NodeBlock) -> Result<()> {
        if let Some(seed) = self.seed {
            seal_extent_block(&mut leaf.bytes, seed);
        }
        self.fs.write_block(leaf.block, &leaf.bytes)
    }
}

/// The child of index node `node` whose range holds `logical` (the first
/// one if `logical` lies before them all), narrowing `range` to it.
fn pick(node: &NodeBlock, logical: u64, range: &mut Range<u64>) -> u64 {
    let keys = node.entries();
    // The last entry whose key is at most `logical`, by bisection.
    let (mut lo, mut hi) = (0, keys);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if node.index(mid).0 <= logical {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let i = lo.saturating_sub(1);
    let (key, child) = node.index(i);
    if i > 0 {
        range.start = range.start.max(key);
    }
    if let Some((next, _)) = (i + 1 < keys).then(|| node.index(i + 1)) {
        range.end = range.end.min(next);
    }
    child
}

/// Links as many of `extents` (file order, each in a hole and at most
/// [`EXT_INIT_MAX_LEN`] long) into `ino`'s tree as fit without changing its
/// shape, each leaf written once; returns the others, in order, for the
/// caller to insert one by one.  Fails on a damaged tree or an extent over
/// mapped blocks (the caller's change is then undone, with the leaves
/// written so far).
pub(super) fn link_in_place(
    fs: &mut Filesystem,
    ino: Ino,
    extents: &[NewExtent],
) -> Result<Vec<NewExtent>> {
    let Some(mut tree) = Tree::open(fs, ino)? else {
        return Ok(extents.to_vec());
    };
    let mut left = Vec::new();
    let mut i = 0;
    while i < extents.len() {
        let (block, range) = tree.leaf_for(extents[i].0)?;
        let run = extents[i..].iter().take_while(|e| e.0 < range.end).count();
        if run == 0 {
            // Past every range: beyond what an extent can map.
            return Err(beyond_extents(extents[i].0));
        }
        let batch = &extents[i..i + run];
        i += run;
        if let Some(&(logical, _, len)) = batch.last() {
            if logical + len > range.end {
                return Err(super::already_mapped(range.end));
            }
        }
        let mut leaf = tree.read(block, 0)?;
        let mut entries = leaf.leaf_entries();
        let in_order = entries.windows(2).all(|w| w[0].end() <= w[1].logical);
        if !in_order || entries.iter().any(|e| e.len == 0) {
            return Err(tree.damaged(block, "holds extents out of order"));
        }
        let refused =
            merge_into_leaf(&mut entries, batch, leaf.max()).map_err(super::already_mapped)?;
        if refused.len() < batch.len() {
            leaf.set_leaf_entries(&entries);
            tree.write_leaf(&mut leaf)?;
        }
        left.extend(refused);
    }
    Ok(left)
}

/// The error for file block `logical`, which no extent can map.
fn beyond_extents(logical: u64) -> Error {
    Error::other(
        Errno::EFBIG,
        format!("file block {logical} lies beyond the 2^32 blocks an extent tree maps"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(logical: u64, physical: u64, len: u64) -> LeafEntry {
        LeafEntry {
            logical,
            len,
            physical,
            unwritten: false,
        }
    }

    #[test]
    fn new_extents_join_the_extents_they_continue_on_either_side() {
        let mut leaf = vec![entry(10, 100, 5), entry(20, 110, 5)];
        // Continues the first in file and image; then bridges to the second.
        let refused = merge_into_leaf(&mut leaf, &[(15, 105, 2), (17, 107, 3)], 8).unwrap();
        assert!(refused.is_empty());
        assert_eq!(leaf, vec![entry(10, 100, 15)]);
        // Not contiguous in the image: an extent of its own.
        merge_into_leaf(&mut leaf, &[(30, 500, 1)], 8).unwrap();
        assert_eq!(leaf, vec![entry(10, 100, 15), entry(30, 500, 1)]);
        // Contiguous with the next only.
        merge_into_leaf(&mut leaf, &[(29, 499, 1)], 8).unwrap();
        assert_eq!(leaf, vec![entry(10, 100, 15), entry(29, 499, 2)]);
    }

    #[test]
    fn unwritten_or_overlong_neighbours_are_not_joined() {
        let mut unwritten = entry(10, 100, 5);
        unwritten.unwritten = true;
        let mut leaf = vec![entry(0, 50, 1), unwritten];
        merge_into_leaf(&mut leaf, &[(15, 105, 1)], 8).unwrap();
        assert_eq!(leaf.len(), 3);
        let mut leaf = vec![entry(0, 50, 1), entry(1, 1000, EXT_INIT_MAX_LEN)];
        merge_into_leaf(
            &mut leaf,
            &[(1 + EXT_INIT_MAX_LEN, 1000 + EXT_INIT_MAX_LEN, 1)],
            8,
        )
        .unwrap();
        assert_eq!(leaf.len(), 3, "a written extent holds at most 32768 blocks");
    }

    #[test]
    fn what_would_reshape_the_tree_is_refused_alone() {
        // A new first extent (the parents' keys would change) is refused;
        // the others go in.
        let mut leaf = vec![entry(10, 100, 5)];
        let refused = merge_into_leaf(&mut leaf, &[(2, 7, 1), (20, 300, 1)], 8).unwrap();
        assert_eq!(refused, vec![(2, 7, 1)]);
        assert_eq!(leaf, vec![entry(10, 100, 5), entry(20, 300, 1)]);
        // A full leaf takes what joins its extents, and refuses the rest.
        let mut leaf = vec![entry(0, 100, 1), entry(10, 200, 1)];
        let new = [(1, 101, 1), (2, 300, 1), (4, 400, 1), (9, 199, 1)];
        let refused = merge_into_leaf(&mut leaf, &new, 2).unwrap();
        assert_eq!(refused, vec![(2, 300, 1), (4, 400, 1)]);
        assert_eq!(leaf, vec![entry(0, 100, 2), entry(9, 199, 2)]);
        // Room for one more: the first that needs it gets it.
        let refused = merge_into_leaf(&mut leaf, &new[1..3], 3).unwrap();
        assert_eq!(refused, vec![(4, 400, 1)]);
        assert_eq!(leaf.len(), 3);
    }

    #[test]
    fn extents_over_mapped_blocks_are_errors() {
        let mut leaf = vec![entry(0, 100, 4), entry(10, 200, 2)];
        assert_eq!(merge_into_leaf(&mut leaf.clone(), &[(3, 5, 1)], 8), Err(3));
        assert_eq!(merge_into_leaf(&mut leaf, &[(8, 5, 3)], 8), Err(10));
    }
}
