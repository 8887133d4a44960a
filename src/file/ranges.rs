//! Ranges of a file's blocks that writers take for themselves, so that
//! writes into different holes of one file run at once (each holding the
//! file's map only shared) while two writes into the same blocks take
//! turns: the second then finds the blocks the first filled.

use std::ops::Range;

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub struct BlockRanges {
    held: Mutex<Vec<Range<u64>>>,
    released: Condvar,
}

/// A range of blocks held until dropped.
pub struct HeldRange<'a> {
    ranges: &'a BlockRanges,
    blocks: Range<u64>,
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl BlockRanges {
    /// Takes `blocks`, waiting while another holder has any of them.
    pub fn take(&self, blocks: Range<u64>) -> HeldRange<'_> {
        let mut held = self.held.lock();
        while held.iter().any(|r| overlap(r, &blocks)) {
            self.released.wait(&mut held);
        }
        held.push(blocks.clone());
        HeldRange {
            ranges: self,
            blocks,
        }
    }
}

impl Drop for HeldRange<'_> {
    fn drop(&mut self) {
        let mut held = self.ranges.held.lock();
        if let Some(i) = held.iter().position(|r| *r == self.blocks) {
            held.swap_remove(i);
        }
        drop(held);
        self.ranges.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn disjoint_ranges_are_held_at_once_overlapping_ones_in_turn() {
        let ranges = Arc::new(BlockRanges::default());
        let a = ranges.take(0..4);
        let _b = ranges.take(4..8); // touching, not overlapping
        let entered = Arc::new(AtomicUsize::new(0));
        let waiter = {
            let (ranges, entered) = (ranges.clone(), entered.clone());
            std::thread::spawn(move || {
                let _c = ranges.take(3..5);
                entered.fetch_add(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(entered.load(Ordering::SeqCst), 0, "3..5 waits for 0..4");
        drop(a);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            entered.load(Ordering::SeqCst),
            0,
            "and for 4..8, still held"
        );
        drop(_b);
        waiter.join().unwrap();
        assert_eq!(entered.load(Ordering::SeqCst), 1);
        assert!(ranges.held.lock().is_empty(), "every range given back");
    }
}
