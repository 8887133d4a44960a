//! Discard (`ext2discard`): the blocks a trim or a zero frees are trimmed
//! in the device once the change that freed them is committed, and only
//! those; never with `ext2discard=off`, a device that cannot trim, or a
//! read-only server.
//!
//! The device here makes a trimmed range unknown content for real (it
//! fills it with a pattern no file holds), and at each trim checks that
//! what was flushed before it, replayed as a crash would leave it, already
//! has the blocks free.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::*;
use crate::device::{Capabilities, Device};
use crash_judge::{Op, RecordingDevice};
use ext2_rs::error::Errno;
use parking_lot::Mutex;

/// What a trimmed range holds afterwards here.
const TRIMMED: u8 = 0xdb;

/// A memory device whose trims destroy what they cover, checked against
/// the crash state flushed before them.
struct Discarding {
    device: Arc<MemoryDevice>,
    bytes: Arc<MemDevice>,
    recording: Arc<RecordingDevice>,
    base: Vec<u8>,
    block_size: u64,
    /// How a crash state is recovered (e2fsck's arguments): what was
    /// flushed before each trim, recovered so, must have the trimmed
    /// blocks free.
    recovery: &'static [&'static str],
    /// Problems found at trims.
    problems: Mutex<Vec<String>>,
}

impl Discarding {
    fn new(
        bytes: &Arc<MemDevice>,
        block_size: u64,
        recovery: &'static [&'static str],
    ) -> Arc<Discarding> {
        let recording = Arc::new(RecordingDevice::new(bytes.clone() as Arc<dyn BlockDevice>));
        Arc::new(Discarding {
            device: Arc::new(MemoryDevice::new(recording.clone() as Arc<dyn BlockDevice>)),
            bytes: bytes.clone(),
            recording,
            base: bytes.snapshot(),
            block_size,
            recovery,
            problems: Mutex::new(Vec::new()),
        })
    }

    /// The blocks trimmed so far.
    fn trimmed(&self) -> BTreeSet<u64> {
        let bs = self.block_size;
        let mut out = BTreeSet::new();
        for (offset, len) in self.device.trims() {
            assert_eq!((offset % bs, len % bs), (0, 0), "trims cover whole blocks");
            out.extend(offset / bs..(offset + len) / bs);
        }
        out
    }

    /// The image as a crash right now could leave it at worst: the
    /// requests up to the last flush.
    fn durable(&self) -> Vec<u8> {
        let ops = self.recording.ops();
        let flushed = ops.iter().rposition(|op| *op == Op::Flush).unwrap_or(0);
        let mut image = self.base.clone();
        for op in &ops[..flushed] {
            if let Op::Write { offset, data } = op {
                let at = *offset as usize;
                image[at..at + data.len()].copy_from_slice(data);
            }
        }
        image
    }

    /// Whether blocks `first..first + count` are free in `image` once
    /// recovered as `recovery` says.
    fn free_after_recovery(&self, image: &[u8], first: u64, count: u64) -> Result<(), String> {
        let dir = TempDir::new();
        let path = dir.path().join("durable.img");
        std::fs::write(&path, image).unwrap();
        let (code, text) = run_on("e2fsck", self.recovery, &path);
        if code > 1 {
            return Err(format!("recovery: {text}"));
        }
        let (_, text) = run_on("debugfs", &["-R", &format!("testb {first} {count}")], &path);
        match text.lines().find(|l| l.contains("marked in use")) {
            Some(line) => Err(format!("trimmed while in use on the medium: {line}")),
            None => Ok(()),
        }
    }
}

impl Device for Discarding {
    fn size(&self) -> u64 {
        self.device.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.device.capabilities()
    }
    fn parallel(&self) -> bool {
        self.device.parallel()
    }
    fn description(&self) -> Option<String> {
        self.device.description()
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.device.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.device.pwrite(buf, offset, fua)
    }
    fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        self.device.zero(len, offset, may_trim, fast)
    }
    fn trim(&self, len: u64, offset: u64) -> Result<(), Errno> {
        {
            let bs = self.block_size;
            if let Err(e) = self.free_after_recovery(&self.durable(), offset / bs, len / bs) {
                self.problems.lock().push(e);
            }
        }
        self.device.trim(len, offset)?;
        // Unknown content from now on (not through the recording: the
        // durable image keeps the old bytes, as a crash may).
        self.bytes
            .write_at(&vec![TRIMMED; len as usize], offset)
            .map_err(|_| Errno::EIO)
    }
    fn flush(&self) -> Result<(), Errno> {
        self.device.flush()
    }
    fn open_writable(&self) -> Result<(), Errno> {
        self.device.open_writable()
    }
    fn close(&self) {
        self.device.close()
    }
}

/// The image blocks of `path` in `bytes`, in file order (`debugfs blocks`).
fn file_blocks(bytes: &[u8], path: &str) -> Vec<u64> {
    let dir = TempDir::new();
    let image = dir.path().join("blocks.img");
    std::fs::write(&image, bytes).unwrap();
    let (code, text) = run_on("debugfs", &["-R", &format!("blocks {path}")], &image);
    assert_eq!(code, 0, "debugfs blocks: {text}");
    text.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

const MIB: u64 = 1 << 20;

/// A crash state's recovery with a journal: its replay alone.
const JOURNAL_REPLAY: &[&str] = &["-p", "-E", "journal_only"];
/// Without one: boot's `fsck -p`, which frees what no inode owns.
const PREEN: &[&str] = &["-fp"];

/// Trims, a zero that frees, writes into the freed range again, more
/// trims: every trim covers exactly blocks the filesystem freed, after the
/// commit that freed them; the file reads as written and e2fsck is happy
/// although trimmed blocks hold garbage.
fn freed_blocks_are_trimmed(args: &[&str], recovery: &'static [&'static str]) {
    let size = 6 * MIB as usize;
    let bytes = image(args, "32M", &[("/f", Content::Bytes(pattern(size, 3)))]);
    let bs = 4096;
    let device = Discarding::new(&bytes, bs, recovery);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let before = bytes.snapshot();
    let blocks = file_blocks(&before, "/f");
    let mut expected = pattern(size, 3);

    // A trim of 1 MiB (with ragged ends: only whole blocks are freed).
    conn.trim(MIB - 100, MIB + 200, false).unwrap();
    let trimmed = device.trimmed();
    let freed: BTreeSet<u64> = blocks[256..512].iter().copied().collect();
    assert_eq!(trimmed, freed, "the trim's blocks, exactly");
    expected[MIB as usize..2 * MIB as usize].fill(0);

    // A zero that may trim frees blocks too.
    conn.zero(3 * MIB, MIB / 2, true, false, false).unwrap();
    let zeroed: BTreeSet<u64> = blocks[768..896].iter().copied().collect();
    assert_eq!(
        device.trimmed(),
        &freed | &zeroed,
        "the zero's freed blocks are trimmed as well"
    );
    expected[3 * MIB as usize..3 * MIB as usize + MIB as usize / 2].fill(0);
    // A zero that may not trim frees nothing, trims nothing.
    conn.zero(4 * MIB, 8192, false, false, false).unwrap();
    expected[4 * MIB as usize..4 * MIB as usize + 8192].fill(0);
    assert_eq!(device.trimmed(), &freed | &zeroed);

    // Writes into the freed range reuse freed (and trimmed) blocks; then
    // those are freed and trimmed again.
    let new = pattern(MIB as usize / 2, 9);
    conn.pwrite(&new, MIB + 4096, false).unwrap();
    conn.flush().unwrap();
    expected[MIB as usize + 4096..MIB as usize + 4096 + new.len()].copy_from_slice(&new);
    assert_eq!(read(&conn, 0, size), expected);
    conn.trim(MIB, MIB, false).unwrap();
    expected[MIB as usize..2 * MIB as usize].fill(0);
    assert_eq!(read(&conn, 0, size), expected);
    drop(conn);
    server.shutdown();

    let problems = device.problems.lock().clone();
    assert!(problems.is_empty(), "{problems:#?}");
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(dump(&after, "/f"), expected);
    // Blocks trimmed and allocated again since were written after their
    // trim (they hold garbage otherwise, which e2fsck and the dump catch);
    // every block freed was trimmed.
    let trimmed = device.trimmed();
    // (Without a journal a tree leaf may have been allocated meanwhile.)
    assert_eq!(
        free_blocks(&after) - free_blocks(&before),
        (blocks.len() - file_blocks(&after, "/f").len()) as u64
    );
    assert!(trimmed.is_superset(&(&freed | &zeroed)));
}

#[test]
fn freed_blocks_are_trimmed_after_the_journal_commit() {
    freed_blocks_are_trimmed(&["-t", "ext4", "-b", "4096"], JOURNAL_REPLAY);
}

#[test]
fn freed_blocks_are_trimmed_after_the_ordered_commit_without_journal() {
    freed_blocks_are_trimmed(&["-t", "ext4", "-b", "4096", "-O", "^has_journal"], PREEN);
}

/// Blocks of the extent tree freed with the data are trimmed too: as many
/// blocks are trimmed as the trim freed, all of them free.
#[test]
fn freed_extent_tree_blocks_are_trimmed() {
    let bs = 1024u64;
    // Every other block written: hundreds of extents, a tree of leaves.
    let writes: Vec<(u64, Vec<u8>)> = (0..600u64)
        .map(|i| (2 * i * bs, pattern(bs as usize, i as u8)))
        .collect();
    let bytes = image(
        &["-t", "ext4", "-b", "1024"],
        "16M",
        &[("/t", Content::Sparse(2 * MIB, writes))],
    );
    let before = bytes.snapshot();
    let data = file_blocks(&before, "/t");
    assert!(data.len() > 600, "test premise: data and tree blocks");
    let device = Discarding::new(&bytes, bs, JOURNAL_REPLAY);
    let server = serve(device.clone(), &[("ext2file", "/t")]);
    let conn = connect(&server, false, "");
    conn.trim(0, 2 * MIB, false).unwrap();
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    let freed = free_blocks(&after) - free_blocks(&before);
    assert!(freed > 600, "test premise: tree blocks freed too ({freed})");
    let trimmed = device.trimmed();
    assert_eq!(
        trimmed.len() as u64,
        freed,
        "every freed block trimmed, once"
    );
    assert!(data.iter().all(|b| trimmed.contains(b)));
    let problems = device.problems.lock().clone();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn discard_off_trims_nothing() {
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Bytes(pattern(2 << 20, 1)))],
    );
    let device = device_over(&bytes);
    let server = serve(
        device.clone(),
        &[("ext2file", "/f"), ("ext2discard", "off")],
    );
    let conn = connect(&server, false, "");
    conn.trim(0, 2 << 20, false).unwrap();
    conn.zero(0, 1 << 20, true, false, false).unwrap();
    conn.flush().unwrap();
    drop(conn);
    server.shutdown();
    assert_eq!(device.trims(), vec![]);
    assert_fsck_clean(&bytes.snapshot());
}

#[test]
fn a_device_that_cannot_trim_gets_no_trim() {
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Bytes(pattern(2 << 20, 1)))],
    );
    let device = Arc::new(MemoryDevice::with_capabilities(
        bytes.clone() as Arc<dyn BlockDevice>,
        Capabilities {
            can_write: true,
            can_flush: true,
            native_fua: true,
            can_fast_zero: true,
            can_trim: false,
        },
    ));
    let server = serve(device.clone(), &[("ext2file", "/f"), ("ext2discard", "on")]);
    let conn = connect(&server, false, "");
    conn.trim(0, 2 << 20, false).unwrap();
    drop(conn);
    server.shutdown();
    assert_eq!(device.trims(), vec![]);
    assert_fsck_clean(&bytes.snapshot());
}

#[test]
fn a_read_only_server_never_trims() {
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Bytes(pattern(2 << 20, 1)))],
    );
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, true, "");
    assert!(conn.trim(0, 2 << 20, false).is_err());
    drop(conn);
    server.shutdown();
    assert_eq!(device.trims(), vec![]);
    assert!(!device.opened_writable());
}
