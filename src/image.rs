//! The image as the filesystem sees it: the device's bytes, with the blocks
//! a journal replay stands in for read from their journal copies.
//!
//! Both libext2fs (through the io_manager, and for a writable filesystem
//! through ext2-rs's metadata transactions) and the direct data path read
//! and write through an [`Image`], so they always agree on what it holds.
//! An image with a replay is never written: it is served read-only.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use ext2_rs::error::Errno;
use ext2_rs::jbd2::Replay;
use ext2_rs::mmp::Watch;
use ext2_rs::BlockDevice;

use ext2_rs::log;

use crate::device::Device;

pub struct Image {
    device: Arc<dyn Device>,
    replay: Option<(Replay, u64)>,
    /// Set once the replay is written into the image (`ext2journal=replay`):
    /// the device then holds what it stood in for.
    replay_written: AtomicBool,
    /// The multi-mount protection this server writes under, if any: once
    /// another node has taken the filesystem, nothing more is written
    /// (data, and the metadata the transactions write through here).
    fence: OnceLock<Watch>,
}

impl Image {
    pub fn new(device: Arc<dyn Device>) -> Image {
        Image {
            device,
            replay: None,
            replay_written: AtomicBool::new(false),
            fence: OnceLock::new(),
        }
    }

    /// An image whose reads see `replay` (with filesystem blocks of
    /// `block_size` bytes) and which refuses every write.
    pub fn with_replay(device: Arc<dyn Device>, replay: Replay, block_size: u64) -> Image {
        Image {
            device,
            replay: Some((replay, block_size)),
            replay_written: AtomicBool::new(false),
            fence: OnceLock::new(),
        }
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
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

    /// Whether the image was opened with a replay that is now written
    /// into it.
    pub fn replay_was_written(&self) -> bool {
        self.replay.is_some() && !self.replaying()
    }

    /// Says the replay is now in the image: reads go to the device, and
    /// writes are allowed.
    pub fn replay_is_written(&self) {
        self.replay_written.store(true, Ordering::Release);
    }

    pub fn size(&self) -> u64 {
        self.device.size()
    }

    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let Some((replay, bs)) = self.overlay() else {
            return self.device.pread(buf, offset);
        };
        // Walk the request a block at a time, sending runs of blocks that the
        // journal does not replace to the device as one request.
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
                self.device.pread(&mut whole, copy.image_block * bs)?;
                copy.unescape(&mut whole);
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
        self.device.pread(&mut buf[at..at + len], range.start)
    }

    fn refuse_write(&self) -> Result<(), Errno> {
        if self.replaying() {
            log::error("the image's journal is replayed in memory only: it is served read-only");
            return Err(Errno::EROFS);
        }
        if let Some(why) = self.fence.get().and_then(Watch::lost) {
            log::error(&why);
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
        self.device.pwrite(buf, offset, fua)
    }

    pub fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        self.refuse_write()?;
        self.device.zero(len, offset, may_trim, fast)
    }

    /// Trims `len` bytes at `offset` (blocks the filesystem freed), refused
    /// as writes are.
    pub fn trim(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.refuse_write()?;
        self.device.trim(len, offset)
    }

    pub fn flush(&self) -> Result<(), Errno> {
        self.device.flush()
    }
}

/// The device the filesystem lives on: read-only, libext2fs reads it
/// directly; read-write, it is the device under ext2-rs's transactions
/// (`ext2_rs::txn`), which alone write metadata to it.
impl BlockDevice for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.pread(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.pwrite(buf, offset, false)
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.zero(len, offset, false, false)
    }

    fn flush(&self) -> Result<(), Errno> {
        Image::flush(self)
    }

    /// Map blocks read together: in parallel when the device allows.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        let items: Vec<&mut (u64, &mut [u8])> = reads.iter_mut().collect();
        let limit = crate::pool::WORKERS;
        crate::pool::run_all(self.device.parallel(), limit, items, &|read| {
            self.pread(read.1, read.0)
        })
    }
}

/// What served files' maps are read through (`ext2_rs::lazy_map`): the
/// image while the filesystem is read-only; once it is open read-write,
/// the metadata cache of its transactions over the image, which holds the
/// metadata not yet written home (a map read from the image alone would
/// miss it).
pub struct MapDevice {
    image: Arc<Image>,
    metadata: OnceLock<Arc<dyn BlockDevice>>,
}

impl MapDevice {
    pub fn new(image: Arc<Image>) -> MapDevice {
        MapDevice {
            image,
            metadata: OnceLock::new(),
        }
    }

    /// From now on, maps are read through `metadata` (set once: the
    /// filesystem is opened read-write once).
    pub fn read_through(&self, metadata: Arc<dyn BlockDevice>) {
        let _ = self.metadata.set(metadata);
    }

    fn device(&self) -> &dyn BlockDevice {
        match self.metadata.get() {
            Some(metadata) => metadata.as_ref(),
            None => self.image.as_ref(),
        }
    }
}

/// Reads only: maps are never written through here.
impl BlockDevice for MapDevice {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.device().read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), Errno> {
        Err(Errno::EROFS)
    }

    fn zero_at(&self, _len: u64, _offset: u64) -> Result<(), Errno> {
        Err(Errno::EROFS)
    }

    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        self.device().read_many(reads)
    }
}

/// The device's bytes as they are, for multi-mount protection
/// (`ext2_rs::mmp`): its block is written behind our back by other nodes,
/// so it is read from the device every time, past any journal replay or
/// cached metadata.
pub struct RawDevice(pub Arc<dyn Device>);

impl BlockDevice for RawDevice {
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
