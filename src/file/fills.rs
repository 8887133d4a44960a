//! What the writers into one file's holes share (the protocol itself is
//! `file::holes`).

use std::sync::atomic::AtomicBool;

use crate::file::ranges::BlockRanges;

#[derive(Default)]
pub struct Holes {
    /// The file blocks writers sharing the map fill.
    pub ranges: BlockRanges,
    /// A writer is linking writes into holes in place: others need not.
    pub linking: AtomicBool,
    /// The last write needed new blocks: the next one likely does too, and
    /// takes the map exclusively at once instead of looking first (where
    /// writes into holes cannot share the map).
    pub filling: AtomicBool,
}
