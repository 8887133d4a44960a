//! The blocks a filesystem keeps for itself: boot block, superblocks, group
//! descriptors (and their reserved growth), bitmaps and inode tables.
//!
//! A damaged image can map a file onto them, or a damaged block bitmap can
//! offer them for allocation; either would let a client overwrite the
//! filesystem's own structures.  The filter checks maps and allocations
//! against this list.

use std::ops::Range;

use crate::error::{Errno, Error, Result};

/// Sorted, merged ranges of reserved blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    ranges: Vec<Range<u64>>,
}

impl Reserved {
    pub fn new(mut ranges: Vec<Range<u64>>) -> Reserved {
        ranges.retain(|r| !r.is_empty());
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged.shrink_to_fit();
        Reserved { ranges: merged }
    }

    /// The first reserved block in `[start, start + len)`, if any.
    pub fn first_in(&self, start: u64, len: u64) -> Option<u64> {
        let end = start.saturating_add(len);
        let i = self.ranges.partition_point(|r| r.end <= start);
        self.ranges
            .get(i)
            .filter(|r| r.start < end)
            .map(|r| r.start.max(start))
    }
}

/// `start..start + len`, or why it cannot be (a damaged superblock or
/// descriptor whose numbers wrap around).
fn span(what: &str, group: u32, start: u64, len: u64) -> Result<Range<u64>> {
    start
        .checked_add(len)
        .map(|end| start..end)
        .ok_or_else(|| {
            Error::other(
                Errno::EIO,
                format!(
                    "group {group}: the {what} at block {start} ({len} blocks) runs past the largest block number: the image is damaged"
                ),
            )
        })
}

/// Reads the reserved blocks of an open filesystem.  Fails when a group's
/// layout cannot be computed or wraps around (a damaged image).
pub fn collect(fs: &mut crate::handle::Handle) -> Result<Reserved> {
    use crate::sys;
    let raw = fs.raw();
    // SAFETY: plain fields of an open filesystem.
    // (`desc_blocks` is a C unsigned long: u64 here, not on every target.)
    #[allow(clippy::useless_conversion)]
    let (groups, desc_blocks, itable_len) = unsafe {
        (
            (*raw).group_desc_count,
            u64::from((*raw).desc_blocks),
            u64::from((*raw).inode_blocks_per_group),
        )
    };
    let sb = fs.super_block();
    let first_data = u64::from(sb.s_first_data_block);
    let reserved_gdt = u64::from(sb.s_reserved_gdt_blocks);
    // Block 0 (boot block, or the superblock's block with 4 KiB blocks)
    // through the primary superblock.
    let mut ranges: Vec<Range<u64>> = Vec::new();
    ranges.push(span("primary superblock", 0, 0, first_data + 1)?);
    for group in 0..groups {
        let (mut superblock, mut old_desc, mut new_desc) = (0u64, 0u64, 0u64);
        let mut used: sys::blk_t = 0;
        // SAFETY: open filesystem, group in range, valid out-pointers.
        let code = unsafe {
            sys::ext2fs_super_and_bgd_loc2(
                raw,
                group,
                &mut superblock,
                &mut old_desc,
                &mut new_desc,
                &mut used,
            )
        };
        if code != 0 {
            return Err(Error::ext2(
                format!("group {group}: locating its superblock and descriptors"),
                code,
            ));
        }
        if superblock != 0 {
            ranges.push(span("superblock backup", group, superblock, 1)?);
        }
        if old_desc != 0 {
            let len = desc_blocks.saturating_add(reserved_gdt);
            ranges.push(span("group descriptors", group, old_desc, len)?);
        }
        if new_desc != 0 {
            ranges.push(span("group descriptor", group, new_desc, 1)?);
        }
        // SAFETY: open filesystem with its group descriptors loaded.
        let (block_bitmap, inode_bitmap, inode_table) = unsafe {
            (
                sys::ext2fs_block_bitmap_loc(raw, group),
                sys::ext2fs_inode_bitmap_loc(raw, group),
                sys::ext2fs_inode_table_loc(raw, group),
            )
        };
        ranges.push(span("block bitmap", group, block_bitmap, 1)?);
        ranges.push(span("inode bitmap", group, inode_bitmap, 1)?);
        ranges.push(span("inode table", group, inode_table, itable_len)?);
    }
    Ok(Reserved::new(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_and_searched() {
        let r = Reserved::new(vec![10..12, 0..2, 11..20, 30..31, 5..5]);
        assert_eq!(r.ranges, vec![0..2, 10..20, 30..31]);
        assert_eq!(r.first_in(2, 8), None);
        assert_eq!(r.first_in(2, 9), Some(10));
        assert_eq!(r.first_in(15, 100), Some(15));
        assert_eq!(r.first_in(20, 10), None);
        assert_eq!(r.first_in(25, 6), Some(30));
        assert_eq!(r.first_in(31, u64::MAX), None);
    }

    #[test]
    fn spans_that_wrap_are_errors() {
        assert_eq!(span("x", 0, 10, 5).unwrap(), 10..15);
        assert!(span("inode table", 3, u64::MAX - 2, 5).is_err());
    }
}
