//! Multi-mount protection (the `mmp` feature), run as the kernel runs it
//! (fs/ext4/mmp.c), through a [`BlockDevice`]: so that two writers that
//! share one image over a network never both write it.
//!
//! The MMP block holds a sequence number.  A writer that finds it
//! [`SEQ_CLEAN`] takes it at once; one that finds [`SEQ_FSCK`] is refused
//! (e2fsck runs); any other value may belong to a live node, so the writer
//! waits about twice the check interval and is refused if the number
//! changed meanwhile.  Taking it means writing a random number, waiting
//! again and finding it unchanged.  While it writes, a background thread
//! writes a new number every update interval, and checks, if it ever took
//! longer than the check interval, that nobody else did; at the end the
//! block is marked clean.
//!
//! libext2fs has this protocol too, but it opens the device by name with
//! O_DIRECT, which a device behind an io_manager does not have; so
//! [`crate::Filesystem`] opens with `EXT2_FLAG_SKIP_MMP` and writes an
//! `mmp` filesystem only through [`crate::Filesystem::open_protected`].
//!
//! The device given here must read what is on the medium, not a cache of
//! earlier writes: the other node writes behind its back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use crate::device::BlockDevice;
use crate::error::{Errno, Error, Result};
use crate::format::{le16, le32, le64, put_le16, put_le32, put_le64};
use crate::sys;

/// The block's magic number (`EXT4_MMP_MAGIC`).
const MAGIC: u32 = sys::EXT4_MMP_MAGIC;
/// The sequence of a block nobody holds.
pub const SEQ_CLEAN: u32 = sys::EXT4_MMP_SEQ_CLEAN;
/// The sequence e2fsck writes while it checks.
pub const SEQ_FSCK: u32 = sys::EXT4_MMP_SEQ_FSCK;
const SEQ_MAX: u32 = sys::EXT4_MMP_SEQ_MAX;
const MIN_CHECK_INTERVAL: u64 = sys::EXT4_MMP_MIN_CHECK_INTERVAL as u64;
/// `EXT4_MMP_MAX_CHECK_INTERVAL`.
const MAX_CHECK_INTERVAL: u64 = 300;
/// `EXT4_MMP_CHECK_MULT`.
const CHECK_MULT: u64 = 2;

/// `struct mmp_struct` offsets.
const AT_MAGIC: usize = 0;
const AT_SEQ: usize = 4;
const AT_TIME: usize = 8;
const AT_NODENAME: usize = 16;
const NODENAME_LEN: usize = 64;
const AT_BDEVNAME: usize = 80;
const BDEVNAME_LEN: usize = 32;
const AT_CHECK_INTERVAL: usize = 112;
const AT_CHECKSUM: usize = 1020;
const STRUCT_LEN: usize = 1024;

/// Where the MMP block is and how it is kept, from the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmpConfig {
    pub block: u64,
    pub block_size: u32,
    /// Seconds between updates (`s_mmp_update_interval`).
    pub update_interval: u64,
    /// The metadata checksum seed, with `metadata_csum`.
    pub checksum_seed: Option<u32>,
}

impl MmpConfig {
    fn offset(&self) -> u64 {
        self.block * u64::from(self.block_size)
    }
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn set_text(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The MMP block as read from, and written to, the device.
#[derive(Clone)]
struct MmpBlock(Vec<u8>);

impl MmpBlock {
    fn seq(&self) -> u32 {
        le32(&self.0, AT_SEQ)
    }

    fn set_seq(&mut self, seq: u32) {
        put_le32(&mut self.0, AT_SEQ, seq);
        put_le64(&mut self.0, AT_TIME, now());
    }

    fn nodename(&self) -> &[u8] {
        &self.0[AT_NODENAME..AT_NODENAME + NODENAME_LEN]
    }

    fn check_interval(&self) -> u64 {
        u64::from(le16(&self.0, AT_CHECK_INTERVAL))
    }

    fn set_check_interval(&mut self, seconds: u64) {
        let v = seconds.min(u64::from(u16::MAX)) as u16;
        put_le16(&mut self.0, AT_CHECK_INTERVAL, v);
    }

    fn checksum(seed: u32, bytes: &[u8]) -> u32 {
        // SAFETY: reads `AT_CHECKSUM` bytes of a slice at least that long.
        unsafe { sys::ext2fs_crc32c_le(seed, bytes.as_ptr(), AT_CHECKSUM) }
    }

    /// Who wrote the block, for messages (the kernel's `dump_mmp_msg`).
    fn describe(&self) -> String {
        format!(
            "last update time: {}, last update node: {}, last update device: {}",
            le64(&self.0, AT_TIME),
            text(self.nodename()),
            text(&self.0[AT_BDEVNAME..AT_BDEVNAME + BDEVNAME_LEN]),
        )
    }
}

/// Reads and writes the MMP block on the device.
struct Medium {
    device: Arc<dyn BlockDevice>,
    config: MmpConfig,
}

impl Medium {
    fn read(&self) -> Result<MmpBlock> {
        let len = (self.config.block_size as usize).max(STRUCT_LEN);
        let mut buf = vec![0u8; len];
        self.device
            .read_at(&mut buf, self.config.offset())
            .map_err(|errno| {
                Error::other(
                    errno,
                    format!(
                        "multi-mount protection: reading the MMP block {} failed",
                        self.config.block
                    ),
                )
            })?;
        if le32(&buf, AT_MAGIC) != MAGIC {
            return Err(Error::other(
                Errno::EIO,
                format!(
                    "multi-mount protection: the MMP block {} has no MMP magic number: the \
                     image is damaged",
                    self.config.block
                ),
            ));
        }
        if let Some(seed) = self.config.checksum_seed {
            if le32(&buf, AT_CHECKSUM) != MmpBlock::checksum(seed, &buf) {
                return Err(Error::other(
                    Errno::EIO,
                    format!(
                        "multi-mount protection: the MMP block {} fails its checksum",
                        self.config.block
                    ),
                ));
            }
        }
        Ok(MmpBlock(buf))
    }

    fn write(&self, block: &mut MmpBlock) -> Result<()> {
        if let Some(seed) = self.config.checksum_seed {
            let sum = MmpBlock::checksum(seed, &block.0);
            put_le32(&mut block.0, AT_CHECKSUM, sum);
        }
        self.device
            .write_at(&block.0, self.config.offset())
            .map_err(|errno| {
                Error::other(
                    errno,
                    format!(
                        "multi-mount protection: writing the MMP block {} failed",
                        self.config.block
                    ),
                )
            })
    }

    fn flush(&self) -> Result<()> {
        self.device.flush().map_err(|errno| {
            Error::other(
                errno,
                "multi-mount protection: flushing the MMP block failed",
            )
        })
    }
}

/// A random sequence number a node can hold (at most [`SEQ_MAX`]).
fn new_seq() -> u32 {
    loop {
        let mut bytes = [0u8; 4];
        // SAFETY: fills the 4 bytes of a local buffer.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 4, 0) };
        let seq = if got == 4 {
            u32::from_ne_bytes(bytes)
        } else {
            // No entropy source: the clock's nanoseconds still differ
            // between two nodes starting together.
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.subsec_nanos() ^ d.as_secs() as u32)
        };
        if seq <= SEQ_MAX {
            return seq;
        }
    }
}

/// This host's name, as the kernel writes `utsname()->nodename`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    text(&buf)
}

/// What the updater thread and its owner share.
struct Shared {
    medium: Medium,
    /// Set to ask the updater to mark the block clean and stop.
    stop: Mutex<bool>,
    wake: Condvar,
    /// Set when another node took the block: nothing may be written.
    lost: AtomicBool,
    lost_reason: Mutex<Option<String>>,
}

/// The filesystem's MMP block, held: while this lives (and [`lost`] is
/// false), no other node following the protocol writes the filesystem.
///
/// [`lost`]: Protection::lost
pub struct Protection {
    shared: Arc<Shared>,
    updater: Option<JoinHandle<Result<()>>>,
}

impl Protection {
    /// Takes the MMP block, as the kernel does at a read-write mount: may
    /// wait up to twice `2 * check interval + 1` seconds (at once when the
    /// block is clean).  Refused, with a message naming the node that holds
    /// it, if another node is active or e2fsck runs.  `node` and
    /// `device_name` are written into the block for the other nodes'
    /// messages.  Starts a thread: call after any fork.
    pub fn take(
        device: Arc<dyn BlockDevice>,
        config: MmpConfig,
        node: &str,
        device_name: &str,
    ) -> Result<Protection> {
        let medium = Medium { device, config };
        let mut block = medium.read()?;
        let mut check_interval = config.update_interval.max(MIN_CHECK_INTERVAL);
        check_interval = check_interval.max(block.check_interval());
        let seen = block.seq();
        let mut wait = Duration::ZERO;
        if seen == SEQ_FSCK {
            return Err(refusal("e2fsck is running on the filesystem", &block));
        }
        if seen != SEQ_CLEAN {
            wait = Duration::from_secs((check_interval * 2 + 1).min(check_interval + 60));
            // A wait for a lock held across nodes.
            crate::debug!(
                crate::log::Topic::Lock,
                "multi-mount protection: the MMP block is in use ({}): waiting {wait:?} \
                 to see whether its node is alive",
                block.describe()
            );
            std::thread::sleep(wait);
            block = medium.read()?;
            if block.seq() != seen {
                return Err(refusal(
                    "the filesystem is already active on another node",
                    &block,
                ));
            }
        }
        let mine = new_seq();
        block.set_seq(mine);
        set_text(&mut block.0[AT_NODENAME..AT_NODENAME + NODENAME_LEN], node);
        set_text(
            &mut block.0[AT_BDEVNAME..AT_BDEVNAME + BDEVNAME_LEN],
            device_name,
        );
        medium.write(&mut block)?;
        medium.flush()?;
        std::thread::sleep(wait);
        let check = medium.read()?;
        if check.seq() != mine {
            return Err(refusal(
                "the filesystem is already active on another node",
                &check,
            ));
        }
        let shared = Arc::new(Shared {
            medium,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
            lost_reason: Mutex::new(None),
        });
        let updater = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ext2-mmp".into())
                .spawn(move || update(&shared, block))
                .map_err(|e| {
                    Error::other(
                        Errno::ENOMEM,
                        format!("multi-mount protection: starting the update thread: {e}"),
                    )
                })?
        };
        Ok(Protection {
            shared,
            updater: Some(updater),
        })
    }

    /// Whether another node took the block since: then nothing may be
    /// written, and the reason says who.
    pub fn lost(&self) -> Option<String> {
        self.watch().lost()
    }

    /// A handle that tells whether the block is still held, for whoever
    /// writes the filesystem (it does not keep the block).
    pub fn watch(&self) -> Watch {
        Watch(self.shared.clone())
    }

    /// Stops updating and marks the block clean (unless another node took
    /// it), then flushes.  Call once the filesystem is closed.
    pub fn release(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let Some(updater) = self.updater.take() else {
            return Ok(());
        };
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        updater.join().unwrap_or_else(|_| {
            Err(Error::other(
                Errno::EIO,
                "multi-mount protection: the update thread panicked",
            ))
        })?;
        // The updater stopped early: the block is left to whoever took it.
        match self.lost() {
            Some(why) => Err(Error::other(
                Errno::EIO,
                format!(
                    "multi-mount protection: the MMP block {} is not marked clean at \
                     shutdown: it was given up earlier: {why}",
                    self.shared.medium.config.block
                ),
            )),
            None => Ok(()),
        }
    }
}

/// Tells whether a [`Protection`] still holds its block (cheap: one atomic
/// load while it does).
#[derive(Clone)]
pub struct Watch(Arc<Shared>);

impl Watch {
    /// `None` while the block is held; once another node took it, why.
    pub fn lost(&self) -> Option<String> {
        if !self.0.lost.load(Ordering::Acquire) {
            return None;
        }
        self.0.lost_reason.lock().clone()
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            crate::log::error(&e.to_string());
        }
    }
}

/// The error for a block another node holds: `what` happened, so this node
/// does `consequence`; the block says who wrote it last.
fn held_elsewhere(what: &str, consequence: &str, block: &MmpBlock) -> Error {
    Error::other(
        Errno::EBUSY,
        format!(
            "multi-mount protection: {what}: {consequence} ({})",
            block.describe()
        ),
    )
}

/// Refuses to take the block.
fn refusal(what: &str, block: &MmpBlock) -> Error {
    held_elsewhere(what, "refusing to write it", block)
}

/// The updater thread (the kernel's `kmmpd`): a new sequence number every
/// update interval, and the block marked clean at the end.
///
/// The kernel reads the block back only when an update came later than the
/// check interval (another node can only have taken it after that long
/// without a change).  Here it is read back before every update and before
/// the clean mark, at the cost of one read per interval: that also catches
/// two nodes that took a clean block at the same moment (each wrote its
/// number and read it back before the other wrote), which the kernel's
/// protocol lets through, and never marks clean a block another node holds.
fn update(shared: &Shared, mut block: MmpBlock) -> Result<()> {
    let medium = &shared.medium;
    let interval = Duration::from_secs(medium.config.update_interval);
    let mut check_interval = (CHECK_MULT * medium.config.update_interval).max(MIN_CHECK_INTERVAL);
    block.set_check_interval(check_interval);
    // What the block holds if nobody else wrote it: what we wrote last.
    let mut on_disk = block.seq();
    let mut last_check = Instant::now();
    let mut seq = 0u32;
    let mut failures = 0u64;
    // One message a minute or so, as the kernel.
    let mut complain = |e: &Error| {
        if failures % 60 == 0 {
            crate::log::error(&e.to_string());
        }
        failures += 1;
    };
    loop {
        // Asked to stop: however late this thread is (a stall past the
        // check interval proves nothing while the block still holds our
        // number), the block is read back and marked clean if it is ours.
        if *shared.stop.lock() {
            return mark_clean(medium, &mut block, on_disk);
        }
        match still_ours(medium, &block, on_disk) {
            Ok(true) => last_check = Instant::now(),
            Ok(false) => return give_up(shared, medium),
            // A read that fails is no proof of anything, unless it has been
            // so long that another node could have taken the block.
            Err(e) if last_check.elapsed().as_secs() > check_interval => {
                if *shared.stop.lock() {
                    // Shutting down: tried again before anything is said.
                    return mark_clean(medium, &mut block, on_disk);
                }
                lose(shared, e.to_string());
                return Ok(());
            }
            Err(e) => complain(&e),
        }
        if *shared.stop.lock() {
            return mark_clean(medium, &mut block, on_disk);
        }
        seq = if seq >= SEQ_MAX { 1 } else { seq + 1 };
        block.set_seq(seq);
        let written = Instant::now();
        match medium.write(&mut block) {
            Ok(()) => on_disk = seq,
            Err(e) => complain(&e),
        }
        {
            let mut stop = shared.stop.lock();
            let deadline = written + interval;
            while !*stop && Instant::now() < deadline {
                shared.wake.wait_until(&mut stop, deadline);
            }
        }
        // Adjust the check interval to how long an update took.
        let late = written.elapsed();
        check_interval =
            (CHECK_MULT * late.as_secs()).clamp(MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL);
        block.set_check_interval(check_interval);
    }
}

/// Reads tried before the block is left as it is at shutdown.
const CLEAN_READS: u32 = 3;

/// At shutdown: marks the block clean (and flushes) once a read shows it
/// still holds what this node wrote last; otherwise leaves it and says
/// exactly why (another node's number in it, or reads failing
/// [`CLEAN_READS`] times: another node may hold it).
fn mark_clean(medium: &Medium, block: &mut MmpBlock, on_disk: u32) -> Result<()> {
    let not_clean = |why: String| {
        Error::other(
            Errno::EIO,
            format!(
                "multi-mount protection: the MMP block {} is not marked clean at shutdown: \
                 {why}",
                medium.config.block
            ),
        )
    };
    let mut attempt = 0;
    let now = loop {
        attempt += 1;
        match medium.read() {
            Ok(now) => break now,
            Err(e) if attempt >= CLEAN_READS => {
                return Err(not_clean(format!(
                    "reading it back failed {CLEAN_READS} times ({e}), so another node may \
                     hold it; e2fsck -f or tune2fs -f -E clear_mmp clears it once no node \
                     uses the filesystem"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    if now.seq() != on_disk || now.nodename() != block.nodename() {
        return Err(not_clean(
            held_elsewhere(
                "the filesystem has been taken by another node",
                "leaving the block to it",
                &now,
            )
            .to_string(),
        ));
    }
    block.set_seq(SEQ_CLEAN);
    medium.write(block).map_err(|e| not_clean(e.to_string()))?;
    medium.flush().map_err(|e| not_clean(e.to_string()))
}

/// Whether the block still holds what this node wrote last.
fn still_ours(medium: &Medium, block: &MmpBlock, on_disk: u32) -> Result<bool> {
    let now = medium.read()?;
    Ok(now.seq() == on_disk && now.nodename() == block.nodename())
}

/// Another node wrote the block: stop writing it (and the filesystem).
fn give_up(shared: &Shared, medium: &Medium) -> Result<()> {
    let reason = match medium.read() {
        Ok(now) => held_elsewhere(
            "the filesystem has been taken by another node",
            "no longer writing it",
            &now,
        )
        .to_string(),
        Err(e) => e.to_string(),
    };
    lose(shared, reason);
    Ok(())
}

fn lose(shared: &Shared, reason: String) {
    crate::log::error(&reason);
    *shared.lost_reason.lock() = Some(reason);
    shared.lost.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests;
