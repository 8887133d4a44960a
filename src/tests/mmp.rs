//! Multi-mount protection at shutdown under a stall (issue 19, part 3): a
//! server whose MMP updater hangs in a plugin read past the check interval,
//! the read then failing, just as the server shuts down, still leaves the
//! block marked clean.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use ext2_rs::error::Errno;
use ext2_rs::{Access, Filesystem};
use parking_lot::Mutex;

/// Bytes in memory whose reads at one offset, while armed, hang for
/// `stall` and then fail (a plugin timing out under heavy load).
struct StallingReads {
    inner: Arc<MemDevice>,
    offset: u64,
    stall: Duration,
    armed: Mutex<u32>,
    stalled: AtomicU32,
}

impl BlockDevice for StallingReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        if offset == self.offset {
            let stall = {
                let mut armed = self.armed.lock();
                let now = *armed > 0;
                *armed = armed.saturating_sub(1);
                now
            };
            if stall {
                self.stalled.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(self.stall);
                return Err(Errno::EIO);
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.inner.write_at(buf, offset)
    }
    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        self.inner.zero_at(len, offset)
    }
    fn flush(&self) -> Result<(), Errno> {
        self.inner.flush()
    }
}

/// `debugfs dump_mmp`'s sequence for `bytes`.
fn mmp_sequence(bytes: &[u8]) -> String {
    let dir = TempDir::new();
    let image = dir.path().join("mmp.img");
    std::fs::write(&image, bytes).unwrap();
    let (_, text) = run_on("debugfs", &["-R", "dump_mmp"], &image);
    text.lines()
        .find_map(|l| l.strip_prefix("sequence:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("dump_mmp:\n{text}"))
}

const CLEAN: &str = "ff4d4d50";

#[test]
fn shutdown_marks_the_mmp_block_clean_after_the_updater_stalled() {
    let bytes = image(
        &["-t", "ext4", "-O", "mmp", "-E", "mmp_update_interval=1"],
        "16M",
        &[("/f", Content::Bytes(pattern(1 << 20, 5)))],
    );
    let config = Filesystem::open(bytes.clone(), Access::ReadOnly)
        .unwrap()
        .mmp_config()
        .unwrap()
        .expect("the mmp feature");
    let stalling = Arc::new(StallingReads {
        inner: bytes.clone(),
        offset: config.block * u64::from(config.block_size),
        stall: Duration::from_secs(6),
        armed: Mutex::new(0),
        stalled: AtomicU32::new(0),
    });
    let server = serve(
        Arc::new(MemoryDevice::new(stalling.clone() as Arc<dyn BlockDevice>)),
        &[("ext2file", "/f")],
    );
    let conn = connect(&server, false, "");
    conn.pwrite(b"held", 4096, false).unwrap();
    conn.flush().unwrap();
    assert_ne!(mmp_sequence(&bytes.snapshot()), CLEAN, "the block is held");

    // The updater's next read of the block hangs 6 s (past the 5 s check
    // interval) and fails; the server shuts down meanwhile.
    *stalling.armed.lock() = 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stalling.stalled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the updater never read the block"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_eq!(mmp_sequence(&after), CLEAN, "clean after shutdown");
    assert_fsck_clean(&after);
    let mut expected = pattern(1 << 20, 5);
    expected[4096..4100].copy_from_slice(b"held");
    assert_eq!(dump(&after, "/f"), expected);
}
