//! Writes into holes, the transactions' side ([`HoleFills`]): their
//! blocks reserved while the host writes the data, then their links into
//! the file's extent tree, which wait until the host asks for them (before
//! a flush), or the next change of that file's tree.
//!
//! A write into a hole must allocate its blocks and write its data at
//! once, but nothing needs the extent tree to say so before a flush makes
//! it durable: the host's own map of the file already does.
//! Linking them then, in file order, walks the tree once per run of
//! neighbours instead of once per write, and writes that landed next to
//! each other in both the file and the image become one extent.

use std::collections::{BTreeMap, HashMap};

use crate::fs::Ino;

/// Extents waiting to be linked: per inode, logical -> (physical, len).
#[derive(Debug, Default)]
pub struct PendingLinks {
    by_inode: BTreeMap<Ino, BTreeMap<u64, (u64, u64)>>,
    /// Where the last run added for each inode ends in the image: the
    /// goal for the next, when nothing in the file is nearer.
    last_end: HashMap<Ino, u64>,
    extents: usize,
}

impl PendingLinks {
    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }

    /// Extents waiting, over all inodes.
    pub fn extents(&self) -> usize {
        self.extents
    }

    /// Whether `ino` has extents waiting.
    pub fn has(&self, ino: Ino) -> bool {
        self.by_inode.contains_key(&ino)
    }

    /// The image blocks of every extent waiting: (first block, count).
    pub fn block_runs(&self) -> Vec<(u64, u64)> {
        self.by_inode
            .values()
            .flat_map(|map| map.values().map(|&(p, n)| (p, n)))
            .collect()
    }

    /// How many inodes have extents waiting.
    pub fn inode_count(&self) -> usize {
        self.by_inode.len()
    }

    pub fn inodes(&self) -> Vec<Ino> {
        self.by_inode.keys().copied().collect()
    }

    /// How many extents of `ino` wait.
    pub fn count_of(&self, ino: Ino) -> usize {
        self.by_inode.get(&ino).map_or(0, BTreeMap::len)
    }

    /// The extents of `ino` waiting, in file order: (logical, physical, len).
    pub fn of(&self, ino: Ino) -> Vec<(u64, u64, u64)> {
        self.by_inode.get(&ino).map_or_else(Vec::new, |map| {
            map.iter().map(|(&l, &(p, n))| (l, p, n)).collect()
        })
    }

    /// Where the last run added for `ino` ends in the image.
    pub fn goal(&self, ino: Ino) -> Option<u64> {
        self.last_end.get(&ino).copied()
    }

    /// Adds `runs` (physical, len), laid out in file order from file block
    /// `logical` of `ino`, merging with the neighbours they continue.
    pub fn add(&mut self, ino: Ino, logical: u64, runs: &[(u64, u64)]) {
        let map = self.by_inode.entry(ino).or_default();
        let mut at = logical;
        for &(physical, len) in runs {
            let (mut start, mut phys, mut n) = (at, physical, len);
            if let Some((&l, &(p, pl))) = map.range(..at).next_back() {
                if l + pl == at && p + pl == physical {
                    map.remove(&l);
                    self.extents -= 1;
                    (start, phys, n) = (l, p, pl + len);
                }
            }
            if let Some(&(p, nl)) = map.get(&(at + len)) {
                if physical + len == p {
                    map.remove(&(at + len));
                    self.extents -= 1;
                    n += nl;
                }
            }
            map.insert(start, (phys, n));
            self.extents += 1;
            self.last_end.insert(ino, physical + len);
            at += len;
        }
    }

    /// The next run for `ino` is best placed from image block `end`.
    pub fn note_goal(&mut self, ino: Ino, end: u64) {
        self.last_end.insert(ino, end);
    }

    /// Removes and returns the extents of `ino`, in file order:
    /// (logical, physical, len).
    pub fn take(&mut self, ino: Ino) -> Option<Vec<(u64, u64, u64)>> {
        let map = self.by_inode.remove(&ino)?;
        self.extents -= map.len();
        Some(map.into_iter().map(|(l, (p, n))| (l, p, n)).collect())
    }

    /// Removes and returns up to `max` extents of `ino` from file block
    /// `from` on, in file order.
    pub fn take_from(&mut self, ino: Ino, from: u64, max: usize) -> Vec<(u64, u64, u64)> {
        let Some(map) = self.by_inode.get_mut(&ino) else {
            return Vec::new();
        };
        let taken: Vec<(u64, u64, u64)> = map
            .range(from..)
            .take(max)
            .map(|(&l, &(p, n))| (l, p, n))
            .collect();
        for &(l, _, _) in &taken {
            map.remove(&l);
        }
        if map.is_empty() {
            self.by_inode.remove(&ino);
        }
        self.extents -= taken.len();
        taken
    }

    /// Puts back what [`PendingLinks::take`] returned (linking failed).
    pub fn put_back(&mut self, ino: Ino, extents: Vec<(u64, u64, u64)>) {
        let map = self.by_inode.entry(ino).or_default();
        for (l, p, n) in extents {
            if map.insert(l, (p, n)).is_none() {
                self.extents += 1;
            }
        }
    }
}

/// The transactions' side of writes into holes, in one place: the runs
/// reserved whose data is still being written (in flight), the runs
/// written and waiting to be linked into their files' trees (pending), how
/// often a tree gained links, and, while a linking runs for a host that
/// asked, the metadata blocks its changes wrote.  Commits write the blocks
/// of in-flight and pending runs as free ([`HoleFills::unlinked_runs`]).
#[derive(Debug, Default)]
pub(super) struct HoleFills {
    /// Written, not linked yet.
    pending: PendingLinks,
    /// Reserved, data still being written: image block -> count.
    in_flight: BTreeMap<u64, u64>,
    /// How many times a file's tree gained pending links so far.
    links_made: u64,
    /// While a linking notes its writes: the blocks its changes wrote.
    noted_writes: Option<Vec<u64>>,
}

impl HoleFills {
    /// Whether no written run waits to be linked.
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Where new blocks for `ino` go: `near` if the caller knows a
    /// neighbour, else after the last run reserved or written for it.
    pub(super) fn near(&self, ino: Ino, near: Option<u64>) -> Option<u64> {
        near.or(self.pending.goal(ino))
    }

    /// `runs` were reserved for `ino`; their data is being written.
    pub(super) fn reserved(&mut self, ino: Ino, runs: &[(u64, u64)]) {
        for &(start, len) in runs {
            self.in_flight.insert(start, len);
        }
        if let Some(&(start, len)) = runs.last() {
            self.pending.note_goal(ino, start + len);
        }
    }

    /// The data of reserved `runs` is in; they wait to be linked from file
    /// block `logical` of `ino`.  Returns how many extents of `ino` wait.
    pub(super) fn filled(&mut self, ino: Ino, logical: u64, runs: &[(u64, u64)]) -> usize {
        for &(start, _) in runs {
            self.in_flight.remove(&start);
        }
        self.written(ino, logical, runs)
    }

    /// The data of reserved `runs` could not be written: they are freed.
    pub(super) fn abandoned(&mut self, runs: &[(u64, u64)]) {
        for &(start, _) in runs {
            self.in_flight.remove(&start);
        }
    }

    /// `runs`, allocated and written in one change, wait to be linked from
    /// file block `logical` of `ino`.  Returns how many extents of `ino` wait.
    pub(super) fn written(&mut self, ino: Ino, logical: u64, runs: &[(u64, u64)]) -> usize {
        self.pending.add(ino, logical, runs);
        self.pending.count_of(ino)
    }

    /// Blocks to keep free for the tree nodes that linking what waits may
    /// allocate.
    pub(super) fn reserve(&self) -> u64 {
        (self.pending.extents() + self.in_flight.len()) as u64 / 16
            + 8 * self.pending.inode_count() as u64
    }

    /// The blocks allocated and not linked to any file: (first, count).
    pub(super) fn unlinked_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = self.pending.block_runs();
        runs.extend(self.in_flight.iter().map(|(&start, &count)| (start, count)));
        runs
    }

    /// The runs waiting to be linked.
    pub(super) fn pending(&self) -> &PendingLinks {
        &self.pending
    }

    pub(super) fn pending_mut(&mut self) -> &mut PendingLinks {
        &mut self.pending
    }

    /// A file's tree gained links.
    pub(super) fn linked(&mut self) {
        self.links_made += 1;
    }

    pub(super) fn links_made(&self) -> u64 {
        self.links_made
    }

    /// Starts noting the blocks changes write.
    pub(super) fn start_noting(&mut self) {
        self.noted_writes = Some(Vec::new());
    }

    /// A change wrote `blocks`: noted, if noting.
    pub(super) fn note_writes(&mut self, blocks: impl IntoIterator<Item = u64>) {
        if let Some(noted) = self.noted_writes.as_mut() {
            noted.extend(blocks);
        }
    }

    /// Stops noting; what was noted.
    pub(super) fn stop_noting(&mut self) -> Vec<u64> {
        self.noted_writes.take().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_merge_and_come_back_in_file_order() {
        let mut p = PendingLinks::default();
        p.add(12, 10, &[(500, 2)]);
        p.add(12, 12, &[(502, 3)]); // continues the first
        p.add(12, 9, &[(499, 1)]); // precedes it in both
        p.add(12, 40, &[(600, 1), (900, 2)]);
        p.add(13, 0, &[(50, 1)]);
        assert_eq!(p.extents(), 4);
        assert_eq!(p.count_of(12), 3);
        assert_eq!(p.of(13), vec![(0, 50, 1)]);
        assert_eq!(p.goal(12), Some(902));
        assert_eq!(p.inodes(), vec![12, 13]);
        let twelve = p.take(12).unwrap();
        assert_eq!(twelve, vec![(9, 499, 6), (40, 600, 1), (41, 900, 2)]);
        assert_eq!(p.extents(), 1);
        p.put_back(12, twelve);
        assert_eq!(p.extents(), 4);
        assert_eq!(p.inodes(), vec![12, 13]);
        assert_eq!(p.take(14), None);
        assert_eq!(p.take_from(12, 10, 1), vec![(40, 600, 1)]);
        assert_eq!(p.take_from(12, 0, 5), vec![(9, 499, 6), (41, 900, 2)]);
        assert!(!p.has(12));
        assert_eq!(p.extents(), 1);
    }
}
