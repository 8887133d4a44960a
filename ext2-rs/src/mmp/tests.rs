//! Multi-mount protection on images from the real mke2fs
//! (`-O mmp -E mmp_update_interval=1`), with the kernel's timings: a clean
//! block is taken at once, a busy one after 2 x 5 + 1 seconds.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::fs::{Access, Filesystem};
use crate::testing::MemDevice;

fn mmp_image() -> Arc<MemDevice> {
    Arc::new(MemDevice::mkfs(
        &["-t", "ext4", "-O", "mmp", "-E", "mmp_update_interval=1"],
        "16M",
    ))
}

fn config(dev: &Arc<MemDevice>) -> MmpConfig {
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    fs.mmp_config().unwrap().expect("the mmp feature")
}

fn medium(dev: &Arc<MemDevice>) -> Medium {
    Medium {
        device: dev.clone(),
        config: config(dev),
    }
}

/// Writes the MMP block as another node would.
fn write_as_other_node(dev: &Arc<MemDevice>, seq: u32, node: &str) {
    let medium = medium(dev);
    let mut block = medium.read().unwrap();
    block.set_seq(seq);
    set_text(&mut block.0[AT_NODENAME..AT_NODENAME + NODENAME_LEN], node);
    medium.write(&mut block).unwrap();
}

/// Waits up to `limit` for `held` to notice another node took the block,
/// and returns what it says.
fn wait_until_lost(held: &Protection, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    while held.lost().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    held.lost()
        .unwrap_or_else(|| panic!("another node's write not noticed in {limit:?}"))
}

/// Asserts the block holds `seq`, written by `node`.
#[track_caller]
fn assert_block(dev: &Arc<MemDevice>, seq: u32, node: &str) {
    let block = medium(dev).read().unwrap();
    assert_eq!((block.seq(), text(block.nodename()).as_str()), (seq, node));
}

#[test]
fn a_clean_block_is_taken_at_once_kept_fresh_and_left_clean() {
    let dev = mmp_image();
    let cfg = config(&dev);
    assert_eq!(cfg.update_interval, 1);
    assert!(
        cfg.checksum_seed.is_some(),
        "mke2fs's ext4 has metadata_csum"
    );
    // Without the protocol the filesystem is not written.
    let refused = Filesystem::open(dev.clone(), Access::ReadWrite)
        .err()
        .unwrap();
    assert_eq!(refused.errno(), Errno::EROFS);
    assert!(refused.to_string().contains("mmp"), "{refused}");

    let started = Instant::now();
    let held = Protection::take(dev.clone(), cfg, "node-a", "disk-a").unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no wait when clean"
    );
    let first = medium(&dev).read().unwrap();
    assert!(first.seq() != SEQ_CLEAN && first.seq() <= SEQ_MAX);
    assert_eq!(text(first.nodename()), "node-a");
    std::thread::sleep(Duration::from_millis(2500));
    let later = medium(&dev).read().unwrap();
    assert_ne!(
        later.seq(),
        first.seq(),
        "the block is updated every second"
    );

    // Written while held: e2fsck then finds it consistent.
    let mut fs = Filesystem::open_protected(dev.clone(), &held).unwrap();
    fs.flush().unwrap();
    drop(fs);
    assert!(held.lost().is_none());
    held.release().unwrap();
    assert_eq!(medium(&dev).read().unwrap().seq(), SEQ_CLEAN);

    let dir = std::env::temp_dir().join(format!("ext2-rs-mmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("clean.img");
    std::fs::write(&image, dev.snapshot()).unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", "dump_mmp", image.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        text.contains("sequence: ff4d4d50"),
        "debugfs dump_mmp:\n{text}"
    );
}

#[test]
fn a_second_node_is_refused_while_the_first_holds_the_block() {
    let dev = mmp_image();
    let held = Protection::take(dev.clone(), config(&dev), "node-a", "disk-a").unwrap();
    let started = Instant::now();
    let refused = Protection::take(dev.clone(), config(&dev), "node-b", "disk-b")
        .err()
        .expect("refused");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(11) && waited < Duration::from_secs(20),
        "waited {waited:?}: the kernel's 2 x 5 + 1 seconds"
    );
    let message = refused.to_string();
    assert!(
        message.contains("already active on another node") && message.contains("node-a"),
        "{message}"
    );
    assert_eq!(refused.errno(), Errno::EBUSY);
    assert!(held.lost().is_none(), "the first node keeps it");
    assert_eq!(text(medium(&dev).read().unwrap().nodename()), "node-a");
    held.release().unwrap();
}

#[test]
fn a_stale_holder_is_replaced_after_the_wait() {
    let dev = mmp_image();
    // A node that crashed while holding it: the sequence never changes.
    write_as_other_node(&dev, 0x1234, "crashed-node");
    let started = Instant::now();
    let held = Protection::take(dev.clone(), config(&dev), "node-a", "disk-a").unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(22),
        "waited {:?}: twice 11 seconds",
        started.elapsed()
    );
    assert_eq!(text(medium(&dev).read().unwrap().nodename()), "node-a");
    held.release().unwrap();
}

#[test]
fn a_running_fsck_is_refused_at_once() {
    let dev = mmp_image();
    write_as_other_node(&dev, SEQ_FSCK, "fsck-node");
    let started = Instant::now();
    let refused = Protection::take(dev.clone(), config(&dev), "node-a", "disk-a")
        .err()
        .expect("refused");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        refused.to_string().contains("e2fsck is running"),
        "{refused}"
    );
}

#[test]
fn a_block_failing_its_checksum_is_an_error() {
    let dev = mmp_image();
    let cfg = config(&dev);
    let at = cfg.offset() + AT_CHECKSUM as u64;
    dev.write_at(&[0, 0, 0, 0], at).unwrap();
    let err = Protection::take(dev.clone(), cfg, "node-a", "disk-a")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("checksum"), "{err}");
}

/// A device whose writes, while stalled, land at once but return late (a
/// node that hangs after writing its MMP block).
struct Stalling {
    inner: Arc<MemDevice>,
    stall: AtomicBool,
}

impl BlockDevice for Stalling {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Errno> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::result::Result<(), Errno> {
        self.inner.write_at(buf, offset)?;
        if self.stall.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(7));
        }
        Ok(())
    }
    fn zero_at(&self, len: u64, offset: u64) -> std::result::Result<(), Errno> {
        self.inner.zero_at(len, offset)
    }
    fn flush(&self) -> std::result::Result<(), Errno> {
        self.inner.flush()
    }
}

#[test]
fn a_node_that_comes_back_late_and_finds_another_one_stops_writing() {
    let dev = mmp_image();
    let stalling = Arc::new(Stalling {
        inner: dev.clone(),
        stall: AtomicBool::new(false),
    });
    let held = Protection::take(stalling.clone(), config(&dev), "node-a", "disk-a").unwrap();
    stalling.stall.store(true, Ordering::SeqCst);
    // While node-a hangs after a write, node-b sees no change and takes it.
    std::thread::sleep(Duration::from_millis(2500));
    write_as_other_node(&dev, 0x4242, "node-b");
    let lost = wait_until_lost(&held, Duration::from_secs(15));
    assert!(lost.contains("node-b"), "{lost}");
    let why = held.release().unwrap_err().to_string();
    assert!(
        why.contains("not marked clean") && why.contains("node-b"),
        "{why}"
    );
    // node-a writes nothing more: node-b's block stays.
    assert_block(&dev, 0x4242, "node-b");
}

#[test]
fn of_two_nodes_taking_a_clean_block_at_once_one_gives_up() {
    let dev = mmp_image();
    let held = Protection::take(dev.clone(), config(&dev), "node-a", "disk-a").unwrap();
    // node-b read the block clean before node-a wrote, and writes after it
    // read its number back: the kernel's protocol lets both through.
    write_as_other_node(&dev, 0x4242, "node-b");
    // Noticed at node-a's next update.
    let lost = wait_until_lost(&held, Duration::from_secs(5));
    assert!(
        lost.contains("node-b") && lost.contains("no longer writing it"),
        "{lost}"
    );
    let why = held.release().unwrap_err().to_string();
    assert!(
        why.contains("not marked clean") && why.contains("node-b"),
        "{why}"
    );
    assert_block(&dev, 0x4242, "node-b");
}

#[test]
fn the_block_is_not_marked_clean_under_another_node() {
    let dev = mmp_image();
    let held = Protection::take(dev.clone(), config(&dev), "node-a", "disk-a").unwrap();
    write_as_other_node(&dev, 0x77, "node-b");
    // Released before the updater's next round: the last check still sees
    // node-b and leaves its block alone, saying so.
    let why = held.release().unwrap_err().to_string();
    assert!(
        why.contains("not marked clean") && why.contains("taken by another node"),
        "{why}"
    );
    assert_block(&dev, 0x77, "node-b");
}

/// A device whose reads of one block, once stalled, sleep and then fail a
/// given number of times (a plugin under heavy load, timing out).
struct StallingReads {
    inner: Arc<MemDevice>,
    block_offset: u64,
    stall: Duration,
    /// Reads of the block still to stall (and fail, if `fail`).
    left: Mutex<u32>,
    fail: bool,
    /// Reads of the block that began while stalled.
    stalled: std::sync::atomic::AtomicU32,
}

impl BlockDevice for StallingReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Errno> {
        if offset == self.block_offset {
            let stalled = {
                let mut left = self.left.lock();
                let now = *left > 0;
                *left = left.saturating_sub(1);
                now
            };
            if stalled {
                self.stalled.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(self.stall);
                if self.fail {
                    return Err(Errno::EIO);
                }
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::result::Result<(), Errno> {
        self.inner.write_at(buf, offset)
    }
    fn zero_at(&self, len: u64, offset: u64) -> std::result::Result<(), Errno> {
        self.inner.zero_at(len, offset)
    }
    fn flush(&self) -> std::result::Result<(), Errno> {
        self.inner.flush()
    }
}

fn stalling_reads(dev: &Arc<MemDevice>, stall: Duration, fail: bool) -> Arc<StallingReads> {
    Arc::new(StallingReads {
        inner: dev.clone(),
        block_offset: config(dev).offset(),
        stall,
        left: Mutex::new(0),
        fail,
        stalled: std::sync::atomic::AtomicU32::new(0),
    })
}

/// Waits until the updater is inside a stalled read.
fn wait_for_stall(device: &StallingReads) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while device.stalled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the updater never read the block"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The updater stalls past the check interval in a read that then fails,
/// just as the server shuts down: the stall proves nothing, the block is
/// read again, found ours and marked clean.
#[test]
fn an_updater_stalled_past_the_check_interval_still_marks_the_block_clean() {
    let dev = mmp_image();
    let device = stalling_reads(&dev, Duration::from_secs(6), true);
    let held = Protection::take(device.clone(), config(&dev), "node-a", "disk-a").unwrap();
    *device.left.lock() = 1;
    wait_for_stall(&device);
    // Shutdown comes while the read hangs; it fails 6 s later, past the
    // check interval (5 s).
    std::thread::sleep(Duration::from_millis(200));
    held.release().unwrap();
    assert_eq!(medium(&dev).read().unwrap().seq(), SEQ_CLEAN);
}

/// Reads that keep failing at shutdown: the block is left as it is (another
/// node may hold it), and the error says so.
#[test]
fn reads_failing_at_shutdown_say_why_the_block_is_not_clean() {
    let dev = mmp_image();
    let device = stalling_reads(&dev, Duration::from_millis(50), true);
    let held = Protection::take(device.clone(), config(&dev), "node-a", "disk-a").unwrap();
    let before = medium(&dev).read().unwrap().seq();
    *device.left.lock() = u32::MAX;
    wait_for_stall(&device);
    let why = held.release().unwrap_err().to_string();
    assert!(
        why.contains("not marked clean at shutdown")
            && why.contains("reading it back failed")
            && why.contains("another node may hold it"),
        "{why}"
    );
    let after = medium(&dev).read().unwrap();
    assert_ne!(after.seq(), SEQ_CLEAN);
    assert!(
        after.seq() == before || after.seq() < 4,
        "only our own numbers"
    );
}
