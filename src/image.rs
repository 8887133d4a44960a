//! The image as the filesystem sees it: the plugin's bytes, with the blocks
//! a journal replay stands in for read from their journal copies.
//!
//! Both libext2fs (through the io_manager) and the direct data path read
//! and write through an [`Image`], so they always agree on what it holds.
//! An image with a replay is never written: it is served read-only.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use ext2_rs::error::Errno;
use ext2_rs::jbd2::{Replay, JBD2_MAGIC};
use ext2_rs::mmp::Watch;
use ext2_rs::BlockDevice;

use crate::nbdkit::report::nbd_error;
use crate::nbdkit::Plugin;

pub struct Image {
    plugin: Arc<Plugin>,
    replay: Option<(Replay, u64)>,
    /// Set once the replay is written into the image (`ext2journal=replay`):
    /// the plugin then holds what it stood in for.
    replay_written: AtomicBool,
    /// The multi-mount protection this server writes under, if any: once
    /// another node has taken the filesystem, nothing more is written.
    fence: OnceLock<Watch>,
    /// libext2fs's writes held back during a metadata change, and any that
    /// failed to reach the plugin since; see [`Image::begin_changes`].
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// A metadata change is in progress: hold its writes back.
    active: bool,
    /// Writes not yet in the plugin, oldest first: (offset, bytes).
    writes: Vec<(u64, Vec<u8>)>,
}

impl Image {
    pub fn new(plugin: Arc<Plugin>) -> Image {
        Image {
            plugin,
            replay: None,
            replay_written: AtomicBool::new(false),
            fence: OnceLock::new(),
            pending: Mutex::new(Pending::default()),
        }
    }

    /// An image whose reads see `replay` (with filesystem blocks of
    /// `block_size` bytes) and which refuses every write.
    pub fn with_replay(plugin: Arc<Plugin>, replay: Replay, block_size: u64) -> Image {
        Image {
            plugin,
            replay: Some((replay, block_size)),
            replay_written: AtomicBool::new(false),
            fence: OnceLock::new(),
            pending: Mutex::new(Pending::default()),
        }
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// The journal replay reads see, until it is written into the image.
    fn overlay(&self) -> Option<&(Replay, u64)> {
        self.replay
            .as_ref()
            .filter(|_| !self.replay_written.load(Ordering::Acquire))
    }

    pub fn replaying(&self) -> bool {
        self.overlay().is_some()
    }

    /// The replay reads see, while they see one.
    pub fn replay(&self) -> Option<&Replay> {
        self.overlay().map(|(replay, _)| replay)
    }

    /// Says the replay is now in the image: reads go to the plugin, and
    /// writes are allowed.
    pub fn replay_is_written(&self) {
        self.replay_written.store(true, Ordering::Release);
    }

    pub fn size(&self) -> u64 {
        self.plugin.size()
    }

    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let Some((replay, bs)) = self.overlay() else {
            return self.plugin.pread(buf, offset);
        };
        // Walk the request a block at a time, sending runs of blocks that the
        // journal does not replace to the plugin as one request.
        let bs = *bs;
        let end = offset + buf.len() as u64;
        let mut run_start = offset;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let block_end = ((block + 1) * bs).min(end);
            if let Some(copy) = replay.copy_of(block) {
                self.read_plain(buf, offset, run_start..pos)?;
                let mut whole = vec![0u8; bs as usize];
                self.plugin.pread(&mut whole, copy.image_block * bs)?;
                if copy.escaped {
                    whole[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                }
                let from = (pos - block * bs) as usize;
                let len = (block_end - pos) as usize;
                let at = (pos - offset) as usize;
                buf[at..at + len].copy_from_slice(&whole[from..from + len]);
                run_start = block_end;
            }
            pos = block_end;
        }
        self.read_plain(buf, offset, run_start..end)
    }

    /// Reads image bytes `range` untouched into the matching part of `buf`,
    /// which holds the request starting at `offset`.
    fn read_plain(&self, buf: &mut [u8], offset: u64, range: Range<u64>) -> Result<(), Errno> {
        if range.is_empty() {
            return Ok(());
        }
        let at = (range.start - offset) as usize;
        let len = (range.end - range.start) as usize;
        self.plugin.pread(&mut buf[at..at + len], range.start)
    }

    fn refuse_write(&self) -> Result<(), Errno> {
        if self.replaying() {
            nbd_error!("the image's journal is replayed in memory only: it is served read-only");
            return Err(Errno::EROFS);
        }
        if let Some(why) = self.fence.get().and_then(Watch::lost) {
            nbd_error!("{why}");
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    /// From now on, writes are refused once `watch` says another node took
    /// the filesystem (multi-mount protection).
    pub fn fence(&self, watch: Watch) {
        let _ = self.fence.set(watch);
    }

    /// Whether multi-mount protection says another node took the filesystem.
    pub fn fenced_off(&self) -> bool {
        self.fence.get().and_then(Watch::lost).is_some()
    }

    pub fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.refuse_write()?;
        self.plugin.pwrite(buf, offset, fua)
    }

    pub fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        self.refuse_write()?;
        self.plugin.zero(len, offset, may_trim, fast)
    }

    pub fn flush(&self) -> Result<(), Errno> {
        self.plugin.flush()
    }

    // libext2fs's own I/O (through the io_manager) goes through the
    // functions below, so that a metadata change is all or nothing: its
    // writes are held back until it has succeeded in memory
    // (`begin_changes`/`end_changes`), then written in order; what fails
    // to reach the plugin stays pending, is read back from here, and is
    // written again before the next change and at every flush.

    /// Starts holding back libext2fs's writes.
    pub fn begin_changes(&self) {
        self.pending.lock().active = true;
    }

    /// Stops holding writes back; `keep` false drops those of the failed
    /// change (earlier pending writes stay).
    pub fn end_changes(&self, keep: bool, kept_before: usize) {
        let mut pending = self.pending.lock();
        pending.active = false;
        if !keep {
            pending.writes.truncate(kept_before);
        }
    }

    /// How many writes are pending (to roll a failed change back to).
    pub fn pending_count(&self) -> usize {
        self.pending.lock().writes.len()
    }

    /// Writes the pending writes to the plugin, oldest first; on failure
    /// the unwritten ones stay pending.
    pub fn write_pending(&self) -> Result<(), Errno> {
        let mut pending = self.pending.lock();
        let mut done = 0;
        let result = pending.writes.iter().try_for_each(|(offset, data)| {
            self.pwrite(data, *offset, false)?;
            done += 1;
            Ok(())
        });
        pending.writes.drain(..done);
        result
    }

    /// A libext2fs read: the image, with pending writes laid over it.
    pub fn metadata_pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.pread(buf, offset)?;
        let pending = self.pending.lock();
        let end = offset + buf.len() as u64;
        for (at, data) in &pending.writes {
            let from = offset.max(*at);
            let to = end.min(at + data.len() as u64);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(())
    }

    /// A libext2fs write: held back during a change, or queued behind
    /// pending writes (so that they land in order), else written at once.
    pub fn metadata_pwrite(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        let mut pending = self.pending.lock();
        if pending.active || !pending.writes.is_empty() {
            self.refuse_write()?;
            pending.writes.push((offset, buf.to_vec()));
            if pending.active {
                return Ok(());
            }
            drop(pending);
            return self.write_pending();
        }
        drop(pending);
        self.pwrite(buf, offset, false)
    }

    /// A libext2fs request to zero blocks (e.g. a new extent node).
    pub fn metadata_zero(&self, len: u64, offset: u64) -> Result<(), Errno> {
        let queue = {
            let pending = self.pending.lock();
            pending.active || !pending.writes.is_empty()
        };
        if queue && len <= 1 << 20 {
            return self.metadata_pwrite(&vec![0u8; len as usize], offset);
        }
        self.write_pending()?;
        self.zero(len, offset, false, false)
    }
}

/// The device libext2fs sees (through ext2-rs's io_manager): the image,
/// with a metadata change's writes held back until it succeeds.
impl BlockDevice for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.metadata_pread(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.metadata_pwrite(buf, offset)
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.metadata_zero(len, offset)
    }

    fn flush(&self) -> Result<(), Errno> {
        Image::flush(self)
    }

    /// Map blocks read together: in parallel when the plugin allows.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        let items: Vec<&mut (u64, &mut [u8])> = reads.iter_mut().collect();
        let limit = crate::pool::WORKERS;
        crate::pool::run_all(self.plugin.parallel(), limit, items, &|read| {
            self.metadata_pread(read.1, read.0)
        })
    }
}

/// The plugin's bytes as they are, for multi-mount protection
/// (`ext2_rs::mmp`): its block is written behind our back by other nodes,
/// so it is read from the plugin every time, past any journal replay or
/// held-back metadata.
pub struct PluginDevice(pub Arc<Plugin>);

impl BlockDevice for PluginDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.0.pread(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.0.pwrite(buf, offset, false)
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.0.zero(len, offset, false, false)
    }

    fn flush(&self) -> Result<(), Errno> {
        self.0.flush()
    }
}
