//! Crash states, for tests only (crate `crash-judge`): what a device may hold
//! after a power cut, built from a record of every write and flush that
//! reached it (the CrashMonkey model).
//!
//! A flush makes every write before it durable; the writes after the last
//! completed flush may each have reached the medium or not, in any
//! combination.  A state "at flush `k`" is the base image with every write
//! before flush `k`, plus a subset of the writes between flush `k` and the
//! next one.  Writes are split into pieces of `atom` bytes (the unit a
//! device writes atomically; tests use the filesystem block size), each
//! kept or lost on its own; a piece written twice in one epoch keeps its
//! last kept version.

pub mod judge;

use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::BlockDevice;
use crate::error::Errno;

pub use crate::testing::Rng;

/// One request that reached the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Flush,
}

/// A device that passes every request to `inner` and records writes,
/// zeroes (as writes of zeroes) and flushes.
pub struct RecordingDevice {
    inner: Arc<dyn BlockDevice>,
    ops: Mutex<Vec<Op>>,
}

impl RecordingDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> RecordingDevice {
        RecordingDevice {
            inner,
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Everything recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().clone()
    }

    /// How many requests were recorded so far.
    pub fn len(&self) -> usize {
        self.ops.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BlockDevice for RecordingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.inner.write_at(buf, offset)?;
        self.ops.lock().push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.inner.zero_at(len, offset)?;
        self.ops.lock().push(Op::Write {
            offset,
            data: vec![0; len as usize],
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), Errno> {
        self.inner.flush()?;
        self.ops.lock().push(Op::Flush);
        Ok(())
    }
}

/// One crash state.
#[derive(Clone, Debug)]
pub struct CrashState {
    /// Requests `0..durable` all reached the medium (the last is a flush,
    /// or there is none).
    pub durable: usize,
    /// Pieces of the following writes kept, out of how many.
    pub kept: usize,
    pub pieces: usize,
    /// What the device holds.
    pub image: Vec<u8>,
}

impl CrashState {
    pub fn describe(&self) -> String {
        format!(
            "crash after request {} with {} of the {} later pieces",
            self.durable, self.kept, self.pieces
        )
    }
}

/// A piece of a write: `data` at `offset`.
#[derive(Clone, Debug)]
struct Piece {
    offset: u64,
    data: Vec<u8>,
}

fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let at = offset as usize;
    image[at..at + data.len()].copy_from_slice(data);
}

fn split(offset: u64, data: &[u8], atom: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = offset;
    let end = offset + data.len() as u64;
    while at < end {
        let stop = ((at / atom + 1) * atom).min(end);
        out.push(Piece {
            offset: at,
            data: data[(at - offset) as usize..(stop - offset) as usize].to_vec(),
        });
        at = stop;
    }
    out
}

/// The image once every request in `ops` has reached it.
pub fn final_image(base: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut image = base.to_vec();
    for op in ops {
        if let Op::Write { offset, data } = op {
            apply(&mut image, *offset, data);
        }
    }
    image
}

/// Crash states from `base` and the requests `ops` that followed it: for
/// each flush (and the start), the state with all of the next epoch's
/// pieces, with a prefix of them of random length (a device that writes in
/// order and stops), and `random` random subsets (and the base image
/// itself, and one state for an epoch without writes).  Each is handed to
/// `visit` with its number and whether it is the last, one at a time (a
/// state is a whole image: thousands of them do not fit in memory);
/// returns how many there were.
pub fn each_crash_state(
    base: &[u8],
    ops: &[Op],
    atom: u64,
    random: usize,
    rng: &mut Rng,
    mut visit: impl FnMut(usize, &CrashState, bool),
) -> usize {
    let mut count = 0;
    let mut image = base.to_vec();
    let mut durable = 0;
    loop {
        let next_flush = ops[durable..]
            .iter()
            .position(|op| *op == Op::Flush)
            .map(|i| durable + i);
        let epoch_end = next_flush.unwrap_or(ops.len());
        let pieces: Vec<Piece> = ops[durable..epoch_end]
            .iter()
            .flat_map(|op| match op {
                Op::Write { offset, data } => split(*offset, data, atom),
                Op::Flush => Vec::new(),
            })
            .collect();
        let n = pieces.len();
        // With none of this epoch's pieces, the state is the last epoch's
        // with all of its: judged once.
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if durable == 0 || n == 0 {
            subsets.push(vec![false; n]);
        }
        if n > 0 {
            subsets.push(vec![true; n]);
            let k = rng.below(n as u64) as usize;
            subsets.push((0..n).map(|i| i < k).collect());
            for _ in 0..random {
                // Keep probability varies, so sparse and dense subsets occur.
                let p = 1 + rng.below(7);
                subsets.push((0..n).map(|_| rng.below(8) < p).collect());
            }
        }
        let last_subset = subsets.len().saturating_sub(1);
        for (k, keep) in subsets.into_iter().enumerate() {
            let mut state = image.clone();
            for (piece, _) in pieces.iter().zip(&keep).filter(|(_, k)| **k) {
                apply(&mut state, piece.offset, &piece.data);
            }
            let state = CrashState {
                durable,
                kept: keep.iter().filter(|k| **k).count(),
                pieces: n,
                image: state,
            };
            visit(count, &state, next_flush.is_none() && k == last_subset);
            count += 1;
        }
        for piece in &pieces {
            apply(&mut image, piece.offset, &piece.data);
        }
        match next_flush {
            Some(flush) => durable = flush + 1,
            None => break,
        }
    }
    count
}

/// All of [`each_crash_state`]'s states at once (small tests only).
#[cfg(test)]
fn crash_states(
    base: &[u8],
    ops: &[Op],
    atom: u64,
    random: usize,
    rng: &mut Rng,
) -> Vec<CrashState> {
    let mut states = Vec::new();
    each_crash_state(base, ops, atom, random, rng, |_, state, _| {
        states.push(state.clone())
    });
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_flushes() {
        let base = vec![0u8; 16];
        let ops = vec![
            Op::Write {
                offset: 0,
                data: vec![1; 8],
            },
            Op::Flush,
            Op::Write {
                offset: 8,
                data: vec![2; 8],
            },
            Op::Write {
                offset: 0,
                data: vec![3; 4],
            },
        ];
        let states = crash_states(&base, &ops, 4, 20, &mut Rng::new(1));
        // Before the flush, the first write may be partly there.
        let first: Vec<&CrashState> = states.iter().filter(|s| s.durable == 0).collect();
        assert!(first.iter().any(|s| s.image == vec![0u8; 16]));
        assert!(first.iter().any(|s| s.image[..8] == [1; 8]));
        // After it, the first write always is; the others vary.
        let after: Vec<&CrashState> = states.iter().filter(|s| s.durable == 2).collect();
        assert!(!after.is_empty());
        for s in &after {
            assert!(s.image[4..8] == [1; 4], "{}", s.describe());
            assert!(s.image[..4] == [1; 4] || s.image[..4] == [3; 4]);
        }
        assert!(after
            .iter()
            .any(|s| s.image[..4] == [3; 4] && s.image[8..] == [2; 8]));
    }
}
