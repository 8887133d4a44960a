//! Undoing a failed metadata change in libext2fs's memory.
//!
//! A change such as linking blocks into an extent tree is several library
//! steps; if a read fails halfway, the library's memory holds part of it:
//! blocks marked in use (an extent node it allocated) and a cached inode
//! that the disk never got.  [`with_undo`] records every block allocation
//! and release libext2fs makes during the change, through its allocation
//! callbacks, and on failure reverses them and drops the inode cache, so the
//! library's memory again matches the image.  (The writes themselves are
//! held back by the caller until the change succeeded; see `crate::image`.)

use parking_lot::Mutex;

use crate::error::Result;
use crate::fs::Filesystem;
use crate::sys;

/// One change: `count` blocks from `start` marked in use (+1) or free (-1).
type Change = (u64, u64, i32);

/// The changes of the operation in progress; `None` when not recording.
/// Only touched with the filesystem lock held.
static LOG: Mutex<Option<Vec<Change>>> = Mutex::new(None);

unsafe extern "C" fn record_block(_fs: sys::ext2_filsys, blk: sys::blk64_t, inuse: i32) {
    crate::ffi::guard("block allocation callback", || {
        if let Some(log) = LOG.lock().as_mut() {
            log.push((blk, 1, inuse));
        }
    })
}

/// Installs the recording callback (once per open filesystem).
///
/// Only the per-block callback: libext2fs 1.47.0 calls the range callback
/// after its loop has used up `blk` and `num` (it always reports zero
/// blocks), so ranges are recorded by [`block_stats_range`] instead, which
/// all of our own range changes go through.  The library's internal
/// allocations (extent nodes, indirect blocks) are per block.
pub fn install(fs: &mut Filesystem) {
    let mut old_block = None;
    // SAFETY: open filesystem; the callback only appends to LOG.
    unsafe {
        sys::ext2fs_set_block_alloc_stats_callback(fs.raw(), Some(record_block), &mut old_block)
    };
}

/// Marks `count` blocks from `start` in use (`inuse` 1) or free (-1) in the
/// bitmap and the free counts, recorded for [`with_undo`].
pub fn block_stats_range(fs: &mut Filesystem, start: u64, count: u64, inuse: i32) {
    if let Some(log) = LOG.lock().as_mut() {
        log.push((start, count, inuse));
    }
    apply(fs, start, count, inuse);
}

fn apply(fs: &mut Filesystem, start: u64, count: u64, inuse: i32) {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(u64::from(u32::MAX));
        // SAFETY: open read-write filesystem with its bitmaps loaded.
        unsafe { sys::ext2fs_block_alloc_stats_range(fs.raw(), start + done, n as u32, inuse) };
        done += n;
    }
}

/// Runs `op`; if it fails, reverses the block allocations and releases it
/// made and forgets cached inodes.
pub fn with_undo<T>(
    fs: &mut Filesystem,
    op: impl FnOnce(&mut Filesystem) -> Result<T>,
) -> Result<T> {
    *LOG.lock() = Some(Vec::new());
    let result = op(fs);
    let changes = LOG.lock().take().unwrap_or_default();
    if result.is_err() {
        for &(start, count, inuse) in changes.iter().rev() {
            // Reverses a change made during `op` (not recorded: LOG is None).
            apply(fs, start, count, -inuse);
        }
        // SAFETY: open filesystem; only invalidates cached inodes.
        unsafe { sys::ext2fs_flush_icache(fs.raw()) };
    }
    result
}
