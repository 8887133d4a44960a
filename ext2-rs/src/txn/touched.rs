//! Which blocks changed hands since the last commit, and whether each was
//! in use then: a transaction needs to know the blocks it freed (they must
//! not be logged, must be revoked, and, without a journal, are freed on
//! disk only after the pointers to them are gone) and the blocks it
//! allocated (new blocks, which nothing on disk points at yet).

use std::collections::{BTreeMap, BTreeSet};

/// Disjoint ranges of blocks, each with its state at the last commit, and
/// the block groups they lie in.
#[derive(Clone, Debug)]
pub struct Touched {
    /// start -> (end, was in use at the last commit); adjacent ranges of
    /// the same state are merged.
    ranges: BTreeMap<u64, (u64, bool)>,
    /// Groups (of `per_group` blocks from `first`) with a noted block:
    /// each has a bitmap block and a descriptor to write.
    groups: BTreeSet<u64>,
    first: u64,
    per_group: u64,
}

impl Touched {
    /// For a filesystem whose groups have `per_group` blocks from `first`.
    pub fn new(first: u64, per_group: u64) -> Touched {
        Touched {
            ranges: BTreeMap::new(),
            groups: BTreeSet::new(),
            first,
            per_group: per_group.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
        self.groups.clear();
    }

    /// Notes that `count` blocks from `start` were marked in use (`inuse`
    /// positive) or free.  Blocks already noted keep their first state:
    /// what they were at the last commit.
    pub fn note(&mut self, start: u64, count: u64, inuse: i32) {
        if count == 0 {
            return;
        }
        let end = start.saturating_add(count);
        let was_used = inuse < 0;
        // Ranges that overlap [start, end), in order; fill the gaps.
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        let mut at = start;
        let mut gaps = Vec::new();
        for (s, e) in overlapping.into_iter().rev() {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            gaps.push((at, end));
        }
        for (s, e) in gaps {
            self.insert(s, e, was_used);
        }
        let g1 = start.saturating_sub(self.first) / self.per_group;
        let g2 = (end - 1).saturating_sub(self.first) / self.per_group;
        self.groups.extend(g1..=g2);
    }

    /// Inserts a range not overlapping any, merged with same-state
    /// neighbours.
    fn insert(&mut self, mut s: u64, mut e: u64, used: bool) {
        if let Some((&ps, &(pe, pu))) = self.ranges.range(..s).next_back() {
            if pe == s && pu == used {
                self.ranges.remove(&ps);
                s = ps;
            }
        }
        if let Some(&(ne, nu)) = self.ranges.get(&e) {
            if nu == used {
                self.ranges.remove(&e);
                e = ne;
            }
        }
        self.ranges.insert(s, (e, used));
    }

    /// Whether `block` was in use at the last commit, if it changed since.
    pub fn was_used(&self, block: u64) -> Option<bool> {
        let (_, &(end, used)) = self.ranges.range(..=block).next_back()?;
        (block < end).then_some(used)
    }

    /// The noted ranges: (start, end, was in use at the last commit).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        self.ranges.iter().map(|(&s, &(e, used))| (s, e, used))
    }

    /// How many distinct block groups the noted ranges touch.
    pub fn groups(&self) -> u64 {
        self.groups.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_state_wins() {
        let mut t = Touched::new(1, 8192);
        t.note(10, 5, 1); // allocated: was free
        t.note(12, 10, -1); // 12..15 freed again, 15..22 were in use
        assert_eq!(t.was_used(9), None);
        assert_eq!(t.was_used(10), Some(false));
        assert_eq!(t.was_used(14), Some(false));
        assert_eq!(t.was_used(15), Some(true));
        assert_eq!(t.was_used(21), Some(true));
        assert_eq!(t.was_used(22), None);
        t.note(0, 100, 1);
        assert_eq!(t.was_used(5), Some(false));
        assert_eq!(t.was_used(20), Some(true));
        assert_eq!(t.was_used(50), Some(false));
        let covered: u64 = t.ranges().map(|(s, e, _)| e - s).sum();
        assert_eq!(covered, 100, "ranges stay disjoint");
    }

    #[test]
    fn neighbours_of_one_state_merge() {
        let mut t = Touched::new(1, 8192);
        for b in (100..200).rev() {
            t.note(b, 1, 1);
        }
        for b in 200..300 {
            t.note(b, 1, 1);
        }
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![(100, 300, false)]);
        t.note(300, 5, -1);
        assert_eq!(t.ranges().count(), 2);
    }

    #[test]
    fn groups_are_counted_once() {
        let mut t = Touched::new(1, 8192);
        assert_eq!(t.groups(), 0);
        t.note(1, 1, 1);
        t.note(100, 1, 1);
        assert_eq!(t.groups(), 1);
        t.note(8193, 8192 * 2, -1);
        assert_eq!(t.groups(), 3);
        t.note(20_000, 5, 1);
        assert_eq!(t.groups(), 3);
        t.clear();
        assert_eq!(t.groups(), 0);
    }
}
