//! Which blocks changed hands since the last commit, and whether each was
//! in use then: a transaction needs to know the blocks it freed (they must
//! not be logged, must be revoked, and, without a journal, are freed on
//! disk only after the pointers to them are gone) and the blocks it
//! allocated (new blocks, which nothing on disk points at yet).

use std::collections::BTreeMap;

/// Disjoint ranges of blocks, each with its state at the last commit.
#[derive(Clone, Debug, Default)]
pub struct Touched {
    /// start -> (end, was in use at the last commit)
    ranges: BTreeMap<u64, (u64, bool)>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Notes that `count` blocks from `start` were marked in use (`inuse`
    /// positive) or free.  Blocks already noted keep their first state:
    /// what they were at the last commit.
    pub fn note(&mut self, start: u64, count: u64, inuse: i32) {
        let end = start.saturating_add(count);
        let was_used = inuse < 0;
        let mut at = start;
        // Ranges that overlap [start, end), in order; fill the gaps.
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
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
            self.ranges.insert(s, (e, was_used));
        }
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

    /// How many distinct block groups of `per_group` blocks from `first`
    /// the noted ranges touch: each has a bitmap block (and a descriptor)
    /// to write.
    pub fn groups(&self, first: u64, per_group: u64) -> u64 {
        let mut count = 0;
        let mut last: Option<u64> = None;
        for (s, e, _) in self.ranges() {
            let g1 = s.saturating_sub(first) / per_group;
            let g2 = (e - 1).saturating_sub(first) / per_group;
            let from = match last {
                Some(l) if l >= g1 => l + 1,
                _ => g1,
            };
            if g2 >= from {
                count += g2 - from + 1;
            }
            last = Some(last.map_or(g2, |l| l.max(g2)));
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_state_wins() {
        let mut t = Touched::default();
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
    fn groups_are_counted_once() {
        let mut t = Touched::default();
        assert_eq!(t.groups(1, 8192), 0);
        t.note(1, 1, 1);
        t.note(100, 1, 1);
        assert_eq!(t.groups(1, 8192), 1);
        t.note(8193, 8192 * 2, -1);
        assert_eq!(t.groups(1, 8192), 3);
        t.note(20_000, 5, 1);
        assert_eq!(t.groups(1, 8192), 3);
    }
}
