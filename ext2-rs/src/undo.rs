//! Recording the block allocations and releases of a metadata change, so
//! that a failed change can be undone in libext2fs's memory and a
//! successful one tells its transaction which blocks it took and freed.
//!
//! A change such as linking blocks into an extent tree is several library
//! steps; if a read fails halfway, the library's memory holds part of it:
//! blocks marked in use (an extent node it allocated) and a cached inode
//! that the disk never got.  A [`Recording`] collects every allocation and
//! release libext2fs makes while it lives, through the library's
//! allocation callback and [`block_stats_range`]; [`reverse`] undoes them
//! and drops the inode cache, so the library's memory again matches what
//! was committed.  (The change's writes are held back by the caller until
//! it succeeded; see `crate::txn`.)

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::handle::Handle;
use crate::sys;

/// One change: `count` blocks from `start` marked in use (+1) or free (-1).
pub type Change = (u64, u64, i32);

/// The changes of the recordings in progress, by filesystem handle (as an
/// address): one at a time per filesystem, whose owner serializes calls.
static LOG: Mutex<Option<HashMap<usize, Vec<Change>>>> = Mutex::new(None);

fn record(fs: sys::ext2_filsys, change: Change) {
    if let Some(log) = LOG
        .lock()
        .as_mut()
        .and_then(|logs| logs.get_mut(&(fs as usize)))
    {
        log.push(change);
    }
}

unsafe extern "C" fn record_block(fs: sys::ext2_filsys, blk: sys::blk64_t, inuse: i32) {
    crate::ffi::guard("block allocation callback", || record(fs, (blk, 1, inuse)))
}

/// Installs the recording callback (once per open filesystem).
///
/// Only the per-block callback: libext2fs 1.47.0 calls the range callback
/// after its loop has used up `blk` and `num` (it always reports zero
/// blocks), so ranges are recorded by [`block_stats_range`] instead, which
/// all of our own range changes go through.  The library's internal
/// allocations (extent nodes, indirect blocks) are per block.
pub fn install(fs: &mut Handle) {
    let mut old_block = None;
    // SAFETY: open filesystem; the callback only appends to LOG.
    unsafe {
        sys::ext2fs_set_block_alloc_stats_callback(fs.raw(), Some(record_block), &mut old_block)
    };
}

/// Marks `count` blocks from `start` in use (`inuse` 1) or free (-1) in the
/// bitmap and the free counts, recorded if a [`Recording`] is running.
pub fn block_stats_range(fs: &mut Handle, start: u64, count: u64, inuse: i32) {
    record(fs.raw(), (start, count, inuse));
    apply(fs, start, count, inuse);
}

/// Marks blocks in use or free without recording it: for the temporary
/// and reversing changes a transaction makes itself.
///
/// With bigalloc the range is rounded out to whole clusters, which is what
/// the bitmap marks anyway: libext2fs 1.47.0 changes a group's free count
/// by `inuse * n / ratio` in unsigned arithmetic, so a part of a cluster
/// frees one cluster more than it took (`-1 * 1 / 4` comes out as -1, but
/// `1 * 1 / 4` as 0) and the group descriptor drifts from the bitmap.
pub(crate) fn apply(fs: &mut Handle, start: u64, count: u64, inuse: i32) {
    let ratio = 1u64 << fs.fields().cluster_ratio_bits;
    let (start, count) = if ratio > 1 && count > 0 {
        // SAFETY: an open filesystem's superblock.
        let blocks = unsafe { sys::ext2fs_blocks_count(fs.fields().super_) };
        let first = start / ratio * ratio;
        let end = (start + count).div_ceil(ratio) * ratio;
        (first, end.min(blocks.max(start + count)) - first)
    } else {
        (start, count)
    };
    let mut done = 0;
    while done < count {
        let n = (count - done).min(u64::from(u32::MAX));
        // SAFETY: open read-write filesystem with its bitmaps loaded.
        unsafe { sys::ext2fs_block_alloc_stats_range(fs.raw(), start + done, n as u32, inuse) };
        done += n;
    }
}

/// Records the allocations and releases on one filesystem until
/// [`Recording::finish`], or until dropped (a panic unwinding through the
/// change), which stops recording so that nothing later is attributed to
/// it.
#[must_use]
pub struct Recording(usize);

impl Recording {
    /// Starts recording on `fs`.  One recording at a time per filesystem:
    /// its owner serializes the calls.
    pub fn start(fs: &mut Handle) -> Recording {
        let key = fs.raw() as usize;
        LOG.lock()
            .get_or_insert_with(HashMap::new)
            .insert(key, Vec::new());
        Recording(key)
    }

    /// What was recorded so far, oldest first (recording goes on).
    pub fn so_far(&self) -> Vec<Change> {
        LOG.lock()
            .as_ref()
            .and_then(|logs| logs.get(&self.0))
            .cloned()
            .unwrap_or_default()
    }

    /// Stops recording and returns what was recorded, oldest first.
    pub fn finish(self) -> Vec<Change> {
        self.take()
    }

    fn take(&self) -> Vec<Change> {
        let mut logs = LOG.lock();
        let Some(map) = logs.as_mut() else {
            return Vec::new();
        };
        let changes = map.remove(&self.0).unwrap_or_default();
        if map.is_empty() {
            // Nothing stays allocated: a host may unload us.
            *logs = None;
        }
        changes
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.take();
    }
}

/// Undoes `changes` (as a [`Recording`] returned them) in the library's
/// memory, newest first, and forgets cached inodes.
pub fn reverse(fs: &mut Handle, changes: &[Change]) {
    for &(start, count, inuse) in changes.iter().rev() {
        apply(fs, start, count, -inuse);
    }
    // SAFETY: open filesystem; only invalidates cached inodes.
    unsafe { sys::ext2fs_flush_icache(fs.raw()) };
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::fs::{Access, Filesystem};
    use crate::sys;
    use crate::testing::MemDevice;

    /// Group 0's free clusters and the superblock's free blocks.
    fn free_counts(fs: &mut Filesystem) -> (u32, u64) {
        // SAFETY: open filesystem; reads its in-memory descriptors and
        // superblock.
        unsafe {
            (
                sys::ext2fs_bg_free_blocks_count(fs.raw(), 0),
                sys::ext2fs_free_blocks_count((*fs.raw()).super_),
            )
        }
    }

    /// Taking and giving back part of a cluster (a block the library
    /// allocated or freed, which a failed change undoes, or the freed
    /// blocks a commit holds in use for a moment) leaves the counts as
    /// they were, and each step changes them by one cluster: found by the
    /// fuzzer's write target on bigalloc, where e2fsck then reported
    /// `Free blocks count wrong for group #0`.
    #[test]
    fn parts_of_clusters_count_as_whole_clusters() {
        let dev = Arc::new(MemDevice::mkfs(
            &[
                "-t",
                "ext4",
                "-b",
                "1024",
                "-C",
                "4096",
                "-O",
                "^has_journal,bigalloc,^resize_inode",
            ],
            "2M",
        ));
        let mut fs = Filesystem::open(dev, Access::ReadWrite).unwrap();
        assert_eq!(fs.cluster_ratio(), 4);
        let before = free_counts(&mut fs);
        // A free cluster well inside the group.
        let block = 1501;
        assert!(!crate::txn::in_use(&mut fs, block));
        super::apply(fs.handle(), block, 1, 1);
        assert!(crate::txn::in_use(&mut fs, block));
        assert_eq!(free_counts(&mut fs), (before.0 - 1, before.1 - 4));
        super::apply(fs.handle(), block, 1, -1);
        assert_eq!(free_counts(&mut fs), before);
        // Across a cluster boundary: two clusters.
        super::apply(fs.handle(), 1503, 2, 1);
        assert_eq!(free_counts(&mut fs), (before.0 - 2, before.1 - 8));
        super::apply(fs.handle(), 1503, 2, -1);
        assert_eq!(free_counts(&mut fs), before);
    }
}
