//! A [`Device`] over any of ext2-rs's block devices (bytes in memory, a
//! recorder of writes and flushes for crash states), behaving as nbdkit's
//! plugin does for the filter: read-only until [`Device::open_writable`],
//! with the capabilities a test chooses, requests past the end refused,
//! and faults injected on demand.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use ext2_rs::error::Errno;
use ext2_rs::testing::MemDevice;
use ext2_rs::BlockDevice;

use super::{Capabilities, Device};

/// Faults the device injects, besides those of the inner device.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// `open_writable` fails with this errno.
    pub open_writable: Option<Errno>,
    /// Writes whose byte range meets one of these fail with EIO.
    pub write_ranges: Vec<std::ops::Range<u64>>,
    /// Flushes fail with EIO.
    pub flush: bool,
    /// Every write (and zero) whose number is a multiple of this fails
    /// with EIO, counting from when the faults were set.
    pub every_nth_write: Option<u64>,
}

pub struct MemoryDevice {
    inner: Arc<dyn BlockDevice>,
    /// What the device can do once open for writing.
    caps: Capabilities,
    /// Whether it has been opened for writing.
    writable: AtomicBool,
    closed: AtomicBool,
    parallel: bool,
    faults: Mutex<Faults>,
    /// Byte ranges trimmed, in order.
    trims: Mutex<Vec<(u64, u64)>>,
    fua_writes: AtomicU64,
    reopens: AtomicU64,
    /// Writes since the faults were set.
    writes: AtomicU64,
}

impl MemoryDevice {
    /// A device over `inner` that can do everything once open for writing.
    pub fn new(inner: Arc<dyn BlockDevice>) -> MemoryDevice {
        MemoryDevice::with_capabilities(
            inner,
            Capabilities {
                can_write: true,
                can_flush: true,
                native_fua: true,
                can_fast_zero: true,
                can_trim: true,
            },
        )
    }

    /// A device over `inner` with capabilities `caps` once open for writing.
    pub fn with_capabilities(inner: Arc<dyn BlockDevice>, caps: Capabilities) -> MemoryDevice {
        MemoryDevice {
            inner,
            caps,
            writable: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            parallel: true,
            faults: Mutex::new(Faults::default()),
            trims: Mutex::new(Vec::new()),
            fua_writes: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// A device holding an image `mke2fs` makes with `args`, of `size`.
    pub fn mkfs(args: &[&str], size: &str) -> (MemoryDevice, Arc<MemDevice>) {
        let bytes = Arc::new(MemDevice::mkfs(args, size));
        (MemoryDevice::new(bytes.clone()), bytes)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock() = faults;
        self.writes.store(0, Ordering::Relaxed);
    }

    /// The byte ranges trimmed so far, as `(offset, len)`.
    pub fn trims(&self) -> Vec<(u64, u64)> {
        self.trims.lock().clone()
    }

    /// Whether it was ever opened for writing.
    pub fn opened_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// How many times `open_writable` opened it.
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    pub fn fua_writes(&self) -> u64 {
        self.fua_writes.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), Errno> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Errno::ESHUTDOWN);
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size() => Ok(()),
            _ => Err(Errno::EIO),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.check_open()?;
        if !self.capabilities().can_write {
            return Err(Errno::EROFS);
        }
        self.check_range(offset, len)?;
        let end = offset + len;
        let faults = self.faults.lock();
        if faults
            .write_ranges
            .iter()
            .any(|r| r.start < end && offset < r.end)
        {
            return Err(Errno::EIO);
        }
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if faults.every_nth_write.is_some_and(|every| n % every == 0) {
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

impl Device for MemoryDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        if self.writable.load(Ordering::Acquire) {
            self.caps
        } else {
            Capabilities {
                can_flush: self.caps.can_flush,
                ..Capabilities::default()
            }
        }
    }

    fn parallel(&self) -> bool {
        self.parallel
    }

    fn description(&self) -> Option<String> {
        Some("memory".to_string())
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.check_write(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
            self.inner.flush()?;
        }
        Ok(())
    }

    fn zero(&self, len: u64, offset: u64, _may_trim: bool, fast: bool) -> Result<(), Errno> {
        self.check_write(offset, len)?;
        if fast && !self.caps.can_fast_zero {
            return Err(Errno::ENOTSUP);
        }
        self.inner.zero_at(len, offset)
    }

    fn trim(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.check_write(offset, len)?;
        if !self.caps.can_trim {
            return Err(Errno::ENOTSUP);
        }
        self.trims.lock().push((offset, len));
        Ok(())
    }

    fn flush(&self) -> Result<(), Errno> {
        self.check_open()?;
        if self.faults.lock().flush {
            return Err(Errno::EIO);
        }
        self.inner.flush()
    }

    fn open_writable(&self) -> Result<(), Errno> {
        self.check_open()?;
        if let Some(errno) = self.faults.lock().open_writable {
            return Err(errno);
        }
        if !self.writable.swap(true, Ordering::AcqRel) {
            self.reopens.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}
