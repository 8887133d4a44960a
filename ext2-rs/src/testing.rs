//! An in-memory block device for in-process tests:
//! real libext2fs over bytes in memory, with injected faults and latency,
//! and images made by the real `mke2fs`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::device::BlockDevice;
use crate::error::Errno;

/// Which requests fail.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Reads touching any of these byte ranges fail with EIO.
    pub read_ranges: Vec<std::ops::Range<u64>>,
    /// Writes (and zeroes) fail with EIO once this many have succeeded.
    pub writes_before_failure: Option<u64>,
    /// Every write and zero fails with EIO.
    pub read_only: bool,
}

impl Faults {
    /// Reads touching `range` fail.
    pub fn failing_reads(range: std::ops::Range<u64>) -> Faults {
        let mut faults = Faults::default();
        faults.read_ranges.push(range);
        faults
    }
}

/// Counts of what the device was asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
}

/// A block device held in memory.
#[derive(Default)]
pub struct MemDevice {
    bytes: Mutex<Vec<u8>>,
    faults: Mutex<Faults>,
    latency: Mutex<Duration>,
    reads: AtomicU64,
    writes: AtomicU64,
    zeroes: AtomicU64,
    flushes: AtomicU64,
}

impl MemDevice {
    pub fn new(bytes: Vec<u8>) -> MemDevice {
        MemDevice {
            bytes: Mutex::new(bytes),
            ..Default::default()
        }
    }

    /// A device holding an image that `mke2fs` builds: `args` are its
    /// options (`-t ext4`, `-b 1024`, `-d DIR`...), `size` the image size
    /// (`"32M"`).  Panics with mke2fs's output if it fails.
    pub fn mkfs(args: &[&str], size: &str) -> MemDevice {
        let dir = std::env::temp_dir().join(format!(
            "ext2-rs-mkfs-{}-{}",
            std::process::id(),
            NEXT_IMAGE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let image = dir.join("fs.img");
        let out = Command::new("mke2fs")
            .args(["-q", "-F"])
            .args(args)
            .arg(&image)
            .arg(size)
            .output()
            .expect("mke2fs runs (install e2fsprogs)");
        assert!(
            out.status.success(),
            "mke2fs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = MemDevice::from_file(&image);
        let _ = std::fs::remove_dir_all(&dir);
        device
    }

    pub fn from_file(path: &Path) -> MemDevice {
        MemDevice::new(std::fs::read(path).expect("image file"))
    }

    /// A copy of the bytes, e.g. to write out for `e2fsck`.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock() = faults;
    }

    /// Every request sleeps this long first (a slow device).
    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock() = latency;
    }

    pub fn counts(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            zeroes: self.zeroes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    fn wait(&self) {
        let latency = *self.latency.lock();
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, Errno> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(Errno::EIO),
        }
    }

    /// A read without the wait.
    fn read_now(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let range = self.range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        if self
            .faults
            .lock()
            .read_ranges
            .iter()
            .any(|r| r.start < end && offset < r.end)
        {
            return Err(Errno::EIO);
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        buf.copy_from_slice(&self.bytes.lock()[range]);
        Ok(())
    }

    fn write_allowed(&self) -> Result<(), Errno> {
        let faults = self.faults.lock();
        if faults.read_only {
            return Err(Errno::EROFS);
        }
        if let Some(left) = faults.writes_before_failure {
            let done = self.writes.load(Ordering::Relaxed) + self.zeroes.load(Ordering::Relaxed);
            if done >= left {
                return Err(Errno::EIO);
            }
        }
        Ok(())
    }
}

static NEXT_IMAGE: AtomicU64 = AtomicU64::new(0);

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.wait();
        self.read_now(buf, offset)
    }

    /// One wait for all the reads: a device that serves requests in parallel.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        self.wait();
        reads
            .iter_mut()
            .map(|(offset, buf)| self.read_now(buf, *offset))
            .collect()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.wait();
        let range = self.range(offset, buf.len() as u64)?;
        self.write_allowed()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes.lock()[range].copy_from_slice(buf);
        Ok(())
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.wait();
        let range = self.range(offset, len)?;
        self.write_allowed()?;
        self.zeroes.fetch_add(1, Ordering::Relaxed);
        self.bytes.lock()[range].fill(0);
        Ok(())
    }

    fn flush(&self) -> Result<(), Errno> {
        self.wait();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The quota usage `debugfs -R 'lq KIND' IMAGE` lists (`kind` is `user`,
/// `group` or `project`): id -> (bytes in use, inodes).  Panics with
/// debugfs's output if it fails.
pub fn listed_quota_usage(image: &Path, kind: &str) -> std::collections::BTreeMap<u32, (u64, u64)> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("lq {kind}")])
        .arg(image)
        .output()
        .expect("debugfs runs (install e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "debugfs lq {kind}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rows: id, space, quota, limit, inodes, quota, limit.
    text.lines()
        .filter_map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .map(|w| w.parse().ok())
                .collect::<Option<_>>()?;
            if f.len() != 7 {
                return None;
            }
            Some((u32::try_from(f[0]).ok()?, (f[1], f[4])))
        })
        .collect()
}

/// A small deterministic generator (xorshift64*), so runs repeat.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}
