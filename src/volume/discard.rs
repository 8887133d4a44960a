//! `ext2discard`: the blocks a commit freed are trimmed in the plugin, as
//! the kernel's `discard` mount option does, so that storage that can
//! deallocate (a sparse image file, thin provisioning, an SSD) gets the
//! space back.
//!
//! When: inside the commit that makes the frees durable, under the library
//! lock (`ext2_rs::txn`'s discard documents the order).  The trims are sent
//! before the lock is released, so no change can allocate a freed block
//! and write to it before its trim is done: a trim never lands on a block
//! in use.  Keeping the blocks out of allocation until a later trim would
//! free the lock sooner, but needs a second free list that every
//! allocation path (libext2fs's own included) would have to honour.
//!
//! How: the runs of freed blocks, already coalesced, each split into
//! requests of at most [`MAX_REQUEST`] bytes, sent at once when the plugin
//! allows several requests in flight.  A trim is advice: one that fails is
//! logged (debug) and forgotten.

use std::sync::Arc;

use ext2_rs::log::Topic;
use ext2_rs::txn::Discard;

use crate::image::Image;

/// What `ext2discard=` asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Not given: trim freed blocks if the plugin can trim.
    #[default]
    Auto,
    /// `on`: the same, saying so in the log if the plugin cannot.
    On,
    /// `off`: never trim.
    Off,
}

/// The largest trim request sent: well below nbdkit's 32-bit count, small
/// enough that a long run is trimmed by several requests at once.
pub const MAX_REQUEST: u64 = 64 << 20;

/// The discard function for a filesystem of `block_size`-byte blocks on
/// `image` opened read-write, if `mode` and the plugin allow one.
pub fn discarder(image: &Arc<Image>, block_size: u64, mode: DiscardMode) -> Option<Discard> {
    if mode == DiscardMode::Off {
        return None;
    }
    if !image.device().capabilities().can_trim {
        if mode == DiscardMode::On {
            ext2_rs::log::error(
                "ext2discard=on: the plugin cannot trim: freed blocks are not discarded",
            );
        }
        return None;
    }
    let image = image.clone();
    Some(Box::new(move |runs: &[(u64, u64)]| {
        trim_runs(&image, block_size, runs)
    }))
}

/// Trims the blocks of `runs` (first block, count): split into requests of
/// at most [`MAX_REQUEST`], in parallel where the plugin allows.
pub fn trim_runs(image: &Image, block_size: u64, runs: &[(u64, u64)]) {
    let mut requests = Vec::new();
    for &(first, count) in runs {
        let (mut offset, end) = (first * block_size, (first + count) * block_size);
        while offset < end {
            let len = (end - offset).min(MAX_REQUEST);
            requests.push((offset, len));
            offset += len;
        }
    }
    let n = requests.len();
    let bytes: u64 = requests.iter().map(|r| r.1).sum();
    let parallel = image.device().parallel();
    let results = crate::pool::run_all(parallel, crate::pool::FAN_OUT, requests, &|(
        offset,
        len,
    )| {
        image.trim(len, offset).map_err(|e| (offset, len, e))
    });
    let failed: Vec<_> = results.into_iter().filter_map(|r| r.err()).collect();
    ext2_rs::debug!(
        Topic::Map,
        "discard: {} runs of freed blocks, {bytes} bytes, trimmed in {n} requests{}",
        runs.len(),
        match failed.first() {
            Some((offset, len, e)) => format!(
                " ({} failed, the first {len} bytes at {offset}: errno {})",
                failed.len(),
                e.get()
            ),
            None => String::new(),
        }
    );
}
