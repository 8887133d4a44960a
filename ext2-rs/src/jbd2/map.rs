//! Where the journal's blocks lie in the image: the journal inode's block
//! map, checked the way e2fsck checks it before trusting the journal.

use crate::error::{Errno, Error, Result};
use crate::extent_map::Extent;

/// The journal inode's logical blocks `0..len`, all mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalMap {
    /// Sorted by logical block, contiguous from 0, covering `len`.
    extents: Vec<Extent>,
    len: u32,
}

impl JournalMap {
    /// Checks that `extents` (any order) map every block of a journal of
    /// `len` blocks exactly once; e2fsck drops a journal with holes.
    pub fn new(mut extents: Vec<Extent>, len: u32) -> Result<JournalMap> {
        extents.sort_by_key(|e| e.logical);
        extents.retain(|e| e.len > 0 && e.logical < u64::from(len));
        let mut next = 0u64;
        for e in &extents {
            if e.logical != next {
                let what = if e.logical > next {
                    "has a hole at"
                } else {
                    "maps twice"
                };
                return Err(Error::other(
                    Errno::EIO,
                    format!(
                        "journal: the journal inode {what} block {next} \
                         (e2fsck would delete the journal)"
                    ),
                ));
            }
            next = e.logical + e.len;
        }
        if next < u64::from(len) {
            return Err(Error::other(
                Errno::EIO,
                format!(
                    "journal: the journal inode maps {next} of its {len} blocks \
                     (e2fsck would delete the journal)"
                ),
            ));
        }
        Ok(JournalMap { extents, len })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image block holding journal block `logical`.
    pub fn image_block(&self, logical: u32) -> Option<u64> {
        let logical = u64::from(logical);
        if logical >= u64::from(self.len) {
            return None;
        }
        let i = self.extents.partition_point(|e| e.end() <= logical);
        let e = self.extents.get(i)?;
        (e.logical <= logical).then(|| e.physical + (logical - e.logical))
    }

    /// How many journal blocks from `logical` on lie one after the other in
    /// the image (0 if `logical` is past the journal).
    pub fn contiguous_from(&self, logical: u32) -> u32 {
        let logical = u64::from(logical);
        if logical >= u64::from(self.len) {
            return 0;
        }
        let i = self.extents.partition_point(|e| e.end() <= logical);
        let mut count = 0u64;
        let mut next_physical = None;
        for e in &self.extents[i..] {
            let from = logical.max(e.logical);
            let physical = e.physical + (from - e.logical);
            if next_physical.is_some_and(|p| p != physical) {
                break;
            }
            count += e.end().min(u64::from(self.len)) - from;
            next_physical = Some(e.physical + e.len);
        }
        count.min(u64::from(u32::MAX)) as u32
    }

    /// Whether image block `block` is one of the journal's own.
    pub fn holds_image_block(&self, block: u64) -> bool {
        self.extents
            .iter()
            .any(|e| block >= e.physical && block - e.physical < e.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            unwritten: false,
        }
    }

    #[test]
    fn maps_across_extents() {
        let map = JournalMap::new(vec![extent(4, 900, 6), extent(0, 100, 4)], 10).unwrap();
        assert_eq!(map.image_block(0), Some(100));
        assert_eq!(map.image_block(3), Some(103));
        assert_eq!(map.image_block(4), Some(900));
        assert_eq!(map.image_block(9), Some(905));
        assert_eq!(map.image_block(10), None);
        assert!(map.holds_image_block(905));
        assert!(!map.holds_image_block(906));
        assert!(!map.holds_image_block(99));
    }

    #[test]
    fn contiguous_runs_cross_extents_that_touch() {
        let map = JournalMap::new(
            vec![extent(0, 100, 4), extent(4, 104, 2), extent(6, 900, 4)],
            10,
        )
        .unwrap();
        assert_eq!(map.contiguous_from(0), 6);
        assert_eq!(map.contiguous_from(5), 1);
        assert_eq!(map.contiguous_from(7), 3);
        assert_eq!(map.contiguous_from(10), 0);
    }

    #[test]
    fn blocks_past_the_size_are_ignored() {
        let map = JournalMap::new(vec![extent(0, 100, 20)], 10).unwrap();
        assert_eq!(map.image_block(9), Some(109));
        assert_eq!(map.image_block(10), None);
    }

    #[test]
    fn holes_and_short_maps_are_refused() {
        let hole = JournalMap::new(vec![extent(0, 100, 4), extent(5, 200, 5)], 10);
        assert!(hole.unwrap_err().to_string().contains("hole at block 4"));
        let short = JournalMap::new(vec![extent(0, 100, 4)], 10);
        assert!(short.unwrap_err().to_string().contains("maps 4 of its 10"));
        let twice = JournalMap::new(vec![extent(0, 100, 6), extent(4, 200, 6)], 10);
        assert!(twice.unwrap_err().to_string().contains("maps twice"));
    }
}
