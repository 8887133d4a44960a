//! One node of an ext4 extent tree, parsed from its bytes and checked as
//! the kernel checks it (`__ext4_ext_check`, `ext4_valid_extent_entries`):
//! magic, depth, entry counts, entries in order without overlap, every
//! block inside the filesystem and off its own metadata, and the checksum
//! of a node stored in a block.  A node that fails is never used.

use crate::extent_map::Extent;
use crate::format::{
    extent_csum_ok, extent_entry_at, index_entry, ExtentHeader, RawExtent,
    EXTENT_ENTRY_BYTES as ENTRY, EXTENT_HEADER_BYTES as HEADER, EXTENT_MAGIC, MAX_EXTENT_DEPTH,
};
use crate::lazy_map::geometry::Geometry;

/// An index entry: the subtree from file block `logical` lies in `child`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub logical: u64,
    pub child: u64,
}

/// A parsed, checked node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentNode {
    /// A leaf: extents sorted by file block, not overlapping.
    Leaf(Vec<Extent>),
    /// An index node at `depth` (>= 1): entries sorted, strictly increasing.
    Index {
        depth: u16,
        entries: Vec<IndexEntry>,
    },
}

/// Where a node lives: in the inode (the root) or in a block of its own.
#[derive(Clone, Copy, Debug)]
pub enum Place {
    Root,
    /// In image block `block`; the inode's checksum seed checks it.
    Block {
        block: u64,
        csum_seed: Option<u32>,
    },
}

impl ExtentNode {
    /// Parses a node.  `depth` is the depth its parent expects (`None` for
    /// the root, which says its own).  `Err` says what is wrong.
    pub fn parse(
        bytes: &[u8],
        place: Place,
        depth: Option<u16>,
        geometry: &Geometry,
    ) -> Result<ExtentNode, String> {
        let where_ = || match place {
            Place::Root => "the extent tree's root".to_string(),
            Place::Block { block, .. } => format!("extent block {block}"),
        };
        if bytes.len() < HEADER {
            return Err(format!("{} is truncated", where_()));
        }
        let header = ExtentHeader::read(bytes);
        if header.magic != EXTENT_MAGIC {
            return Err(format!("{} has a bad magic number", where_()));
        }
        let entries = usize::from(header.entries);
        let max = usize::from(header.max);
        let own_depth = header.depth;
        match depth {
            Some(want) if want != own_depth => {
                return Err(format!(
                    "{} has depth {own_depth} where {want} is expected",
                    where_()
                ))
            }
            None if own_depth > MAX_EXTENT_DEPTH => {
                return Err(format!("{} has depth {own_depth}", where_()))
            }
            _ => {}
        }
        let capacity = (bytes.len() - HEADER) / ENTRY;
        if max == 0 || max > capacity {
            return Err(format!("{} has room for {max} entries", where_()));
        }
        if entries > max {
            return Err(format!(
                "{} holds {entries} entries in room for {max}",
                where_()
            ));
        }
        if entries == 0 && own_depth > 0 {
            return Err(format!("{} is an empty index node", where_()));
        }
        if let Place::Block {
            csum_seed: Some(seed),
            ..
        } = place
        {
            if !extent_csum_ok(bytes, seed) {
                return Err(format!("{} fails its checksum", where_()));
            }
        }
        if own_depth == 0 {
            let mut extents = Vec::with_capacity(entries);
            let mut next_free = 0u64;
            for i in 0..entries {
                let RawExtent {
                    logical,
                    len,
                    physical,
                    unwritten,
                } = RawExtent::read(bytes, extent_entry_at(i));
                // At most EXT_INIT_MAX_LEN: a u32.
                let len = len as u32;
                if len == 0 || logical.checked_add(len).is_none() {
                    return Err(format!(
                        "{}: extent {i} (file block {logical}, length {len}) is invalid",
                        where_()
                    ));
                }
                let logical = u64::from(logical);
                if logical < next_free {
                    return Err(format!(
                        "{}: extent {i} (file block {logical}) is out of order or overlaps the one before it",
                        where_()
                    ));
                }
                if let Some(why) = geometry.bad_blocks(physical, u64::from(len)) {
                    return Err(format!(
                        "{}: extent {i} (file block {logical}) maps onto {why}",
                        where_()
                    ));
                }
                next_free = logical + u64::from(len);
                extents.push(Extent {
                    logical,
                    physical,
                    len: u64::from(len),
                    unwritten,
                });
            }
            Ok(ExtentNode::Leaf(extents))
        } else {
            let mut index = Vec::with_capacity(entries);
            for i in 0..entries {
                let (logical, child) = index_entry(bytes, extent_entry_at(i));
                let logical = u64::from(logical);
                if index
                    .last()
                    .is_some_and(|prev: &IndexEntry| logical <= prev.logical)
                {
                    return Err(format!(
                        "{}: index entry {i} (file block {logical}) is out of order",
                        where_()
                    ));
                }
                if let Some(why) = geometry.bad_blocks(child, 1) {
                    return Err(format!(
                        "{}: index entry {i} (file block {logical}) points at {why}",
                        where_()
                    ));
                }
                index.push(IndexEntry { logical, child });
            }
            Ok(ExtentNode::Index {
                depth: own_depth,
                entries: index,
            })
        }
    }

    /// The first file block the node names, if it has entries.
    pub fn first_logical(&self) -> Option<u64> {
        match self {
            ExtentNode::Leaf(extents) => extents.first().map(|e| e.logical),
            ExtentNode::Index { entries, .. } => entries.first().map(|e| e.logical),
        }
    }

    /// The end of what the node maps: past its last extent, or just past
    /// its last index entry's first block.
    pub fn end_logical(&self) -> Option<u64> {
        match self {
            ExtentNode::Leaf(extents) => extents.last().map(Extent::end),
            ExtentNode::Index { entries, .. } => entries.last().map(|e| e.logical + 1),
        }
    }

    /// Checks the node against the range its parent's entry gives it: it
    /// must start where the entry says (the kernel's rule) and end before
    /// the next entry (e2fsck's).
    pub fn check_within(&self, start: u64, end: u64) -> Result<(), String> {
        if let Some(first) = self.first_logical() {
            if first != start {
                return Err(format!(
                    "its first entry (file block {first}) is not where its parent's index entry says (file block {start})"
                ));
            }
        }
        if let Some(last) = self.end_logical() {
            if last > end {
                return Err(format!(
                    "it maps file blocks up to {last}, past its parent's range, which ends at {end}"
                ));
            }
        }
        Ok(())
    }

    /// Bytes of memory the parsed node holds.
    pub fn memory(&self) -> usize {
        match self {
            ExtentNode::Leaf(e) => e.capacity() * std::mem::size_of::<Extent>(),
            ExtentNode::Index { entries, .. } => {
                entries.capacity() * std::mem::size_of::<IndexEntry>()
            }
        }
    }
}
