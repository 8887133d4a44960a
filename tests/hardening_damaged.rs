//! Damaged images served through the real filter: superblock, group descriptors,
//! bitmaps, inodes, extent trees, indirect blocks, directories and the journal
//! overwritten where `dumpe2fs`/`debugfs` say they live, and images truncated short of
//! their block count. Each test checks that the damaged part fails the connection or
//! the request with a message, that nbdkit keeps running without a panic, assertion or
//! crash in its log, that a good export on the same server keeps working (another file
//! of the image, or the same server after the image is repaired: a failed re-open for
//! writing is retried by the next connection), and that nbdkit exits 0 on SIGTERM.
//! Damage that keeps the filesystem from opening at all (superblock, descriptors, a
//! truncated image, a journal that cannot be replayed) stops nbdkit at start instead,
//! with exit status 1 and a message, before any client: that is checked too.

mod common;
mod hardening_support;

use std::fs;
use std::path::{Path, PathBuf};

use common::{random_bytes, TestDir};
use hardening_support::*;

fn rnd(seed: u64, len: usize) -> Vec<u8> {
    random_bytes(seed, len)
}

/// Which image to damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// ext4, 1 KiB blocks, metadata checksums (mke2fs's defaults).
    Ext4Csum,
    /// ext4, 1 KiB blocks, no checksums, 128-byte inodes: damage is not caught by a
    /// checksum and reaches the parsing code.
    Ext4Plain,
    /// ext2, 1 KiB blocks: indirect blocks.
    Ext2,
    /// ext3, 1 KiB blocks, with a journal.
    Ext3,
}

struct Fixture {
    dir: TestDir,
    /// The pristine image.
    pristine: PathBuf,
    /// The image the server serves (damaged in place).
    served: PathBuf,
    layout: Layout,
    good: Vec<u8>,
    victim: Vec<u8>,
    sparse_len: u64,
}

impl Fixture {
    /// An image with `/good` (5000 bytes), `/victim` (300 KiB; on ext4 fragmented into
    /// an extent tree of depth 1), `/dir/nested`, `/sparse` (6 MiB, all holes but its first KiB: larger than the image, so
    /// filling it exhausts the free space).
    fn new(name: &str, kind: Kind) -> Fixture {
        let dir = TestDir::new(name);
        let mkfs: Vec<&str> = match kind {
            Kind::Ext4Csum => vec!["-t", "ext4", "-b", "1024"],
            Kind::Ext4Plain => vec![
                "-t",
                "ext4",
                "-b",
                "1024",
                "-I",
                "128",
                "-O",
                "^metadata_csum,^64bit,^flex_bg",
            ],
            Kind::Ext2 => vec!["-t", "ext2", "-b", "1024"],
            Kind::Ext3 => vec!["-t", "ext3", "-b", "1024"],
        };
        let good = rnd(1, 5000);
        let victim = rnd(2, 300 * 1024);
        let sparse_len = 6 << 20;
        let items = vec![
            Item::File("/good", good.clone()),
            Item::File("/victim", victim.clone()),
            Item::File("/dir/nested", rnd(3, 3000)),
            Item::Sparse("/sparse", sparse_len, vec![(0, rnd(4, 1000))]),
        ];
        let punch: Vec<String> = if matches!(kind, Kind::Ext4Csum | Kind::Ext4Plain) {
            (10..=60)
                .step_by(10)
                .map(|b| format!("punch /victim {b} {b}"))
                .collect()
        } else {
            Vec::new()
        };
        let pristine = det_image(dir.path(), "pristine.img", &mkfs, 4096, &items, &punch);
        let mut victim = victim;
        for b in (10..=60).step_by(10) {
            if !punch.is_empty() {
                victim[b * 1024..(b + 1) * 1024].fill(0);
            }
        }
        let served = dir.join("served.img");
        fs::copy(&pristine, &served).unwrap();
        let layout = Layout::of(&pristine);
        Fixture {
            dir,
            pristine,
            served,
            layout,
            good,
            victim,
            sparse_len,
        }
    }

    fn bs(&self) -> u64 {
        self.layout.block_size
    }

    fn damage(&self, offset: u64, bytes: &[u8]) {
        common::overwrite_host_file(&self.served, offset, bytes);
    }

    fn repair(&self) {
        restore(&self.pristine, &self.served);
    }

    /// Starts a server that serves, or stops at start with a message (checked).
    fn start(&self, options: &[&str], ext2file: &str, context: &str) -> Started {
        Srv::start_or_stop(
            self.dir.path(),
            options,
            &strs(&file_plugin(&self.served, ext2file)),
        )
        .unwrap_or_else(|e| panic!("{context}: {e}"))
    }

    fn serve(&self, options: &[&str], ext2file: &str) -> Srv {
        Srv::start(
            self.dir.path(),
            options,
            &strs(&file_plugin(&self.served, ext2file)),
        )
    }

    fn block_of(&self, path: &str, kind: &str) -> u64 {
        mapping_blocks(&self.pristine, path)
            .into_iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("{path} has no {kind} block"))
            .1
    }

    fn inode_at(&self, path: &str) -> u64 {
        inode_location(&self.pristine, path).1
    }
}

/// Connects to `name` expecting a refusal; returns the server's log afterwards.
#[track_caller]
fn expect_refused(srv: &mut Srv, name: &str, context: &str) -> String {
    match Nbd::connect(srv.socket(), name.as_bytes()) {
        Ok(nbd) => panic!("{context}: export {name:?} ({} bytes) was served", nbd.size),
        Err(ConnectError::Refused { .. }) => {}
        Err(ConnectError::Io(e)) => {
            srv.assert_alive(context);
            panic!("{context}: connecting to {name:?} broke the connection: {e}");
        }
    }
    srv.assert_alive(context);
    srv.log()
}

/// Connects to `name` and reads the whole export, which must equal `expected`.
#[track_caller]
fn expect_serves(srv: &mut Srv, name: &str, expected: &[u8], context: &str) {
    let mut nbd = Nbd::connect(srv.socket(), name.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "{context}: {name:?} not served: {e}\n{}",
            tail(&srv.log(), 3000)
        )
    });
    let got = ok_io(nbd.read_all(64 * 1024), context)
        .unwrap_or_else(|e| panic!("{context}: reading {name:?} failed with errno {e}"));
    common::assert_bytes_eq(&got, expected, context);
    nbd.disconnect();
    srv.assert_alive(context);
}

/// If `name` is served, every successful read must return the right bytes (a damaged
/// image may fail a request, never return wrong data where the map is intact); writes
/// may fail. Returns whether it was served.
#[track_caller]
fn probe(srv: &mut Srv, name: &str, expected: Option<&[u8]>, context: &str) -> bool {
    let mut nbd = match Nbd::connect(srv.socket(), name.as_bytes()) {
        Ok(nbd) => nbd,
        Err(ConnectError::Refused { .. }) => {
            srv.assert_alive(context);
            return false;
        }
        Err(ConnectError::Io(e)) => {
            srv.assert_alive(context);
            panic!("{context}: connecting to {name:?} broke the connection: {e}");
        }
    };
    let mut off = 0u64;
    while off < nbd.size.min(4 << 20) {
        let n = (nbd.size - off).min(16 * 1024) as u32;
        if let Ok(buf) = ok_io(nbd.read(off, n), context) {
            if let Some(expected) = expected {
                if expected.len() as u64 == nbd.size {
                    common::assert_bytes_eq(
                        &buf,
                        &expected[off as usize..off as usize + n as usize],
                        &format!("{context}: read at {off}"),
                    );
                }
            }
        }
        off += u64::from(n);
    }
    if !nbd.read_only() && nbd.size > 0 {
        // Write back what is there (so later probes still expect the same bytes): the
        // write path runs, through the map and for holes through allocation.
        let at = nbd.size / 2 / 1024 * 1024;
        let n = (nbd.size - at).min(1024) as u32;
        if let Ok(buf) = ok_io(nbd.read(at, n), context) {
            let _ = ok_io(nbd.write(at, &buf, 0), context);
        }
        let _ = ok_io(nbd.flush(), context);
    }
    nbd.disconnect();
    srv.assert_alive(context);
    true
}

/// A file whose map is damaged where no reader may go: the connection is refused or,
/// when the damage lies in a map block read lazily, a read of the whole file fails;
/// either way the log names the file and says the image is damaged (or, where
/// libext2fs finds it first, that a checksum does not match).
#[track_caller]
fn expect_damaged(srv: &mut Srv, name: &str, context: &str) {
    match Nbd::connect(srv.socket(), name.as_bytes()) {
        Err(ConnectError::Refused { .. }) => {}
        Err(ConnectError::Io(e)) => {
            srv.assert_alive(context);
            panic!("{context}: connecting to {name:?} broke the connection: {e}");
        }
        Ok(mut nbd) => {
            let read = ok_io(nbd.read_all(16 * 1024), context);
            assert!(read.is_err(), "{context}: the whole file was read");
            nbd.disconnect();
        }
    }
    srv.assert_alive(context);
    let log = srv.log();
    assert!(
        log.contains(name) && (log.contains("damaged") || log.contains("checksum")),
        "{context}: no message names the file and the damage:\n{log}"
    );
}

/// One superblock damage: (what, byte offset inside the superblock, bytes).
fn superblock_damages() -> Vec<(&'static str, u64, Vec<u8>)> {
    vec![
        ("magic", 56, vec![0, 0]),
        ("log block size 20", 24, 20u32.to_le_bytes().to_vec()),
        ("log block size 0xffffffff", 24, vec![0xff; 4]),
        ("blocks per group 0", 32, vec![0; 4]),
        ("inodes per group 0", 40, vec![0; 4]),
        ("inodes per group huge", 40, vec![0xff, 0xff, 0xff, 0x7f]),
        ("blocks count 0", 4, vec![0; 4]),
        (
            "first data block past the end",
            20,
            100_000u32.to_le_bytes().to_vec(),
        ),
        ("unknown incompat feature", 96 + 3, vec![0x80]),
        ("inode size 3", 88, 3u16.to_le_bytes().to_vec()),
        ("inode size 65535", 88, vec![0xff, 0xff]),
        ("first inode 0", 84, vec![0; 4]),
        ("revision 0xffffffff", 76, vec![0xff; 4]),
        ("descriptor size 0xffff", 254, vec![0xff, 0xff]),
        ("log groups per flex 200", 372, vec![200]),
        ("everything random", 0, rnd(99, 1024)),
        ("all zero", 0, vec![0; 1024]),
        ("all ones", 0, vec![0xff; 1024]),
    ]
}

/// Every superblock damage stops nbdkit at start with a message, or fails the
/// connection with one while the server lives and, once the image is repaired, serves
/// the file on the same server (the re-open for writing is retried).
fn superblock_damage(kind: Kind) {
    let fx = Fixture::new(&format!("sb-{kind:?}"), kind);
    let mut outcomes = Vec::new();
    for (what, at, bytes) in superblock_damages() {
        fx.repair();
        fx.damage(1024 + at, &bytes);
        let context = format!("{kind:?} superblock {what}");
        let outcome = match fx.start(&[], "/good", &context) {
            Started::Stopped(_) => "stopped at start",
            Started::Serving(mut srv) => {
                let served = probe(&mut srv, "/good", Some(&fx.good), &context);
                if !served {
                    // Still failing while damaged...
                    let log = expect_refused(&mut srv, "/good", &context);
                    assert!(
                        log.contains("error:"),
                        "{context}: no message in the log:\n{log}"
                    );
                    // ...and serving once repaired, on the same server.
                    fx.repair();
                    expect_serves(&mut srv, "/good", &fx.good, &format!("{context}, repaired"));
                }
                srv.stop();
                if served {
                    "served"
                } else {
                    "refused"
                }
            }
        };
        outcomes.push(format!("{what}: {outcome}"));
    }
    eprintln!("{kind:?}: {outcomes:#?}");
    // These cannot be a filesystem anyone should serve.
    for must_fail in [
        "magic",
        "log block size 20",
        "blocks per group 0",
        "inodes per group 0",
        "unknown incompat feature",
        "everything random",
        "all zero",
    ] {
        assert!(
            !outcomes.contains(&format!("{must_fail}: served")),
            "{kind:?}: superblock damage {must_fail:?} was served: {outcomes:#?}"
        );
    }
}

#[test]
fn damaged_superblock_ext4() {
    superblock_damage(Kind::Ext4Csum);
}

#[test]
fn damaged_superblock_ext4_without_checksums() {
    superblock_damage(Kind::Ext4Plain);
}

#[test]
fn damaged_superblock_ext2() {
    superblock_damage(Kind::Ext2);
}

/// Group descriptors overwritten: random bytes, bitmaps and inode tables moved past the
/// device, onto block 0, onto the superblock. Read-write and read-only servers.
#[test]
fn damaged_group_descriptors() {
    for kind in [Kind::Ext4Csum, Kind::Ext4Plain, Kind::Ext2] {
        let fx = Fixture::new(&format!("gdt-{kind:?}"), kind);
        let gdt = fx.layout.groups[0].descriptors.clone().unwrap().start * fx.bs();
        let beyond = (fx.layout.blocks_count + 10) as u32;
        let damages: Vec<(&str, u64, Vec<u8>)> = vec![
            ("random descriptor block", 0, rnd(7, fx.bs() as usize)),
            (
                "block bitmap past the device",
                0,
                beyond.to_le_bytes().to_vec(),
            ),
            (
                "inode bitmap past the device",
                4,
                beyond.to_le_bytes().to_vec(),
            ),
            (
                "inode table past the device",
                8,
                beyond.to_le_bytes().to_vec(),
            ),
            ("inode table at block 0", 8, vec![0; 4]),
            (
                "inode table at the last block",
                8,
                ((fx.layout.blocks_count - 1) as u32).to_le_bytes().to_vec(),
            ),
            (
                "block bitmap on the superblock",
                0,
                1u32.to_le_bytes().to_vec(),
            ),
            (
                "group 1 inode table past the device",
                32 + 8,
                u32::MAX.to_le_bytes().to_vec(),
            ),
        ];
        for readonly in [false, true] {
            for (what, at, bytes) in &damages {
                fx.repair();
                fx.damage(gdt + at, bytes);
                let options: &[&str] = if readonly { &["-r"] } else { &[] };
                let context = format!("{kind:?} descriptors: {what} (readonly {readonly})");
                let Started::Serving(mut srv) = fx.start(options, "/good", &context) else {
                    continue; // stopped at start, with a message
                };
                if !probe(&mut srv, "/good", Some(&fx.good), &context) {
                    fx.repair();
                    // The filesystem may have opened and only the lookup failed; then
                    // the repaired image serves once the library re-reads it, or the
                    // connection still fails: either way, cleanly.
                    probe(
                        &mut srv,
                        "/good",
                        Some(&fx.good),
                        &format!("{context}, repaired"),
                    );
                }
                srv.stop();
            }
        }
    }
}

/// Bitmaps overwritten with random bytes, all zeroes (every block free) and all ones.
#[test]
fn damaged_bitmaps() {
    for kind in [Kind::Ext4Csum, Kind::Ext4Plain, Kind::Ext2] {
        let fx = Fixture::new(&format!("bitmaps-{kind:?}"), kind);
        let g = fx.layout.groups[0].clone();
        for (which, block) in [("block", g.block_bitmap), ("inode", g.inode_bitmap)] {
            for (what, fill) in [
                ("random", rnd(block, fx.bs() as usize)),
                ("zeroes", vec![0u8; fx.bs() as usize]),
                ("ones", vec![0xffu8; fx.bs() as usize]),
            ] {
                fx.repair();
                fx.damage(block * fx.bs(), &fill);
                let mut srv = fx.serve(&[], "exportname");
                let context = format!("{kind:?} {which} bitmap: {what}");
                probe(&mut srv, "/good", Some(&fx.good), &context);
                probe(&mut srv, "/victim", Some(&fx.victim), &context);
                // Last: filling a hole allocates, and a damaged bitmap may hand out a
                // block another file uses (libext2fs trusts the bitmap).
                probe(&mut srv, "/sparse", None, &context);
                srv.stop();
            }
        }
    }
}

/// With a block bitmap that says every block is free (no checksum to catch it), a
/// write into a hole must not be given the filesystem's own fixed metadata (superblock,
/// group descriptors, bitmaps, inode table) as data blocks: the write would destroy the
/// metadata and read back wrong. (libext2fs's allocator trusts the bitmap; the filter
/// has to refuse blocks that are group metadata, e.g. with
/// `ext2fs_reserve_super_and_bgd` or the descriptors' bitmap and table locations.)
#[test]
fn zeroed_block_bitmap_never_hands_out_metadata_blocks() {
    let fx = Fixture::new("zeroed-bitmap", Kind::Ext4Plain);
    let g = fx.layout.groups[0].clone();
    fx.damage(g.block_bitmap * fx.bs(), &vec![0u8; fx.bs() as usize]);
    let mut srv = fx.serve(&[], "/sparse");
    let mut nbd = Nbd::connect(srv.socket(), b"").expect("serve /sparse");
    // Fill every hole block of the file, one write each (each allocates one block).
    let marker = |i: u64| -> Vec<u8> {
        let mut m = format!("MARKER-{i:08}-").into_bytes();
        m.resize(1024, b'#');
        m
    };
    let mut failures = Vec::new();
    for i in 1..(fx.sparse_len / 1024) {
        match ok_io(nbd.write(i * 1024, &marker(i), 0), "write") {
            Ok(()) => {
                let back = ok_io(nbd.read(i * 1024, 1024), "read").expect("read back");
                if back != marker(i) {
                    failures.push(i);
                }
            }
            Err(_) => break, // ENOSPC: every really free block is used
        }
    }
    let _ = ok_io(nbd.flush(), "flush");
    nbd.disconnect();
    srv.stop();
    // Which fixed metadata blocks now hold client data?
    let image = fs::read(&fx.served).unwrap();
    let bs = fx.bs() as usize;
    let mut metadata: Vec<(String, u64)> = vec![("superblock".into(), 1)];
    for (n, group) in fx.layout.groups.iter().enumerate() {
        if let Some(d) = &group.descriptors {
            metadata.extend(d.clone().map(|b| (format!("group {n} descriptors"), b)));
        }
        metadata.push((format!("group {n} block bitmap"), group.block_bitmap));
        metadata.push((format!("group {n} inode bitmap"), group.inode_bitmap));
        metadata.extend(
            group
                .inode_table
                .clone()
                .map(|b| (format!("group {n} inode table"), b)),
        );
    }
    let clobbered: Vec<String> = metadata
        .iter()
        .filter(|(_, b)| {
            image[*b as usize * bs..(*b as usize + 1) * bs]
                .windows(7)
                .any(|w| w == b"MARKER-")
        })
        .map(|(what, b)| format!("{what} (block {b})"))
        .collect();
    let shown: Vec<&String> = clobbered.iter().take(6).collect();
    assert!(
        clobbered.is_empty() && failures.is_empty(),
        "client data was written over {} blocks of filesystem metadata, e.g. {shown:?}; writes at file blocks {failures:?} read back wrong",
        clobbered.len()
    );
}

/// Inodes overwritten: the damaged file fails (or serves what its map says) while
/// another file of the same image keeps working on the same server.
#[test]
fn damaged_inodes_leave_other_files_working() {
    for kind in [Kind::Ext4Csum, Kind::Ext4Plain, Kind::Ext2] {
        let fx = Fixture::new(&format!("inode-{kind:?}"), kind);
        let at = fx.inode_at("/victim");
        let i_block = at + 40;
        let damages: Vec<(&str, u64, Vec<u8>)> = vec![
            ("random inode", at, rnd(5, 128)),
            ("random block map", i_block, rnd(6, 60)),
            ("mode directory", at, 0x41edu16.to_le_bytes().to_vec()),
            ("mode socket", at, 0xc1edu16.to_le_bytes().to_vec()),
            ("mode 0", at, vec![0, 0]),
            ("size 2^63 - 1", at + 4, vec![0xff, 0xff, 0xff, 0xff]),
            (
                "size high 0x7fffffff",
                at + 108,
                vec![0xff, 0xff, 0xff, 0x7f],
            ),
            ("size high 0xffffffff", at + 108, vec![0xff; 4]),
            ("flags: extents cleared", at + 32, vec![0, 0, 0, 0]),
            (
                "flags: extents set",
                at + 32,
                0x0008_0000u32.to_le_bytes().to_vec(),
            ),
            (
                "flags: inline data",
                at + 32,
                0x1000_0000u32.to_le_bytes().to_vec(),
            ),
            ("flags: all", at + 32, vec![0xff; 4]),
            ("block map all ones", i_block, vec![0xff; 60]),
            ("links count 0, dtime set", at + 20, vec![1, 0, 0, 0]),
        ];
        for (what, offset, bytes) in damages {
            fx.repair();
            fx.damage(offset, &bytes);
            let mut srv = fx.serve(&[], "exportname");
            let context = format!("{kind:?} inode of /victim: {what}");
            expect_serves(&mut srv, "/good", &fx.good, &format!("{context}, before"));
            probe(&mut srv, "/victim", None, &context);
            probe(&mut srv, "victim", None, &context);
            expect_serves(&mut srv, "/good", &fx.good, &format!("{context}, after"));
            let _ = list_exports(srv.socket());
            srv.assert_alive(&context);
            srv.stop();
        }
    }
}

/// Extent trees damaged: index and leaf blocks overwritten, entries pointing past the
/// device, at block 0, at the inode table, at their own node (a loop), depth and entry
/// counts out of range, overlapping extents. The file fails with a message; the server
/// and the other files live.
#[test]
fn damaged_extent_trees() {
    for kind in [Kind::Ext4Plain, Kind::Ext4Csum] {
        let fx = Fixture::new(&format!("extents-{kind:?}"), kind);
        let etb = fx.block_of("/victim", "ETB0");
        let node = etb * fx.bs();
        let root = fx.inode_at("/victim") + 40;
        let blocks = fx.layout.blocks_count;
        let entry = |i: u64| node + 12 + 12 * i;
        let table = fx.layout.groups[0].inode_table.start;
        // Leaf entries: ee_block u32, ee_len u16, ee_start_hi u16, ee_start_lo u32.
        let damages: Vec<(&str, u64, Vec<u8>)> = vec![
            ("random index block", node, rnd(8, fx.bs() as usize)),
            ("zeroed index block", node, vec![0; fx.bs() as usize]),
            (
                "leaf past the device",
                entry(2) + 8,
                ((blocks + 5) as u32).to_le_bytes().to_vec(),
            ),
            (
                "leaf ending past the device",
                entry(6) + 8,
                ((blocks - 3) as u32).to_le_bytes().to_vec(),
            ),
            (
                "leaf far past the device (start_hi)",
                entry(1) + 6,
                0xffffu16.to_le_bytes().to_vec(),
            ),
            ("leaf at block 0", entry(0) + 8, vec![0; 4]),
            (
                "leaf on the inode table",
                entry(3) + 8,
                (table as u32).to_le_bytes().to_vec(),
            ),
            ("leaf length 0", entry(1) + 4, vec![0, 0]),
            ("leaf length 0xffff", entry(1) + 4, vec![0xff, 0xff]),
            ("leaf logical 0xffffffff", entry(3), vec![0xff; 4]),
            ("overlapping leaves", entry(2), 0u32.to_le_bytes().to_vec()),
            (
                "leaf depth 1 pointing at itself (loop)",
                node + 6,
                1u16.to_le_bytes().to_vec(),
            ),
            ("entries 0xffff", node + 2, vec![0xff, 0xff]),
            ("entries 0", node + 2, vec![0, 0]),
            ("max 0", node + 4, vec![0, 0]),
            ("root depth 0xffff", root + 6, vec![0xff, 0xff]),
            ("root depth 5", root + 6, 5u16.to_le_bytes().to_vec()),
            (
                "root index past the device",
                root + 12 + 4,
                ((blocks + 100) as u32).to_le_bytes().to_vec(),
            ),
            (
                "root index on the inode table",
                root + 12 + 4,
                (table as u32).to_le_bytes().to_vec(),
            ),
            (
                "root index on the superblock",
                root + 12 + 4,
                1u32.to_le_bytes().to_vec(),
            ),
            (
                "root index on itself's inode block",
                root + 12 + 4,
                ((fx.inode_at("/victim") / fx.bs()) as u32)
                    .to_le_bytes()
                    .to_vec(),
            ),
            ("root magic", root, vec![0, 0]),
        ];
        for (what, offset, bytes) in damages {
            fx.repair();
            fx.damage(offset, &bytes);
            if what.contains("loop") {
                // Make entry 0 an index entry pointing back at this very node.
                let mut e = Vec::new();
                e.extend_from_slice(&0u32.to_le_bytes());
                e.extend_from_slice(&(etb as u32).to_le_bytes());
                e.extend_from_slice(&0u16.to_le_bytes());
                fx.damage(entry(0), &e);
            }
            let mut srv = fx.serve(&[], "exportname");
            let context = format!("{kind:?} extent tree of /victim: {what}");
            if what.contains("past the device") || what.contains("loop") {
                expect_damaged(&mut srv, "/victim", &context);
            } else {
                probe(&mut srv, "/victim", None, &context);
            }
            expect_serves(&mut srv, "/good", &fx.good, &context);
            srv.stop();
        }
    }
}

/// ext2 indirect blocks damaged: random, pointing past the device, at themselves.
#[test]
fn damaged_indirect_blocks() {
    let fx = Fixture::new("indirect", Kind::Ext2);
    let ind = fx.block_of("/victim", "IND");
    let dind = fx.block_of("/victim", "DIND");
    let bs = fx.bs();
    let blocks = fx.layout.blocks_count as u32;
    let damages: Vec<(&str, u64, Vec<u8>)> = vec![
        ("random IND", ind * bs, rnd(9, bs as usize)),
        ("random DIND", dind * bs, rnd(10, bs as usize)),
        (
            "IND entry past the device",
            ind * bs + 8,
            (blocks + 7).to_le_bytes().to_vec(),
        ),
        ("IND entry 0xffffffff", ind * bs + 12, vec![0xff; 4]),
        (
            "IND entry pointing at IND",
            ind * bs,
            (ind as u32).to_le_bytes().to_vec(),
        ),
        (
            "DIND entry pointing at DIND",
            dind * bs,
            (dind as u32).to_le_bytes().to_vec(),
        ),
        (
            "DIND entry past the device",
            dind * bs,
            (blocks + 1).to_le_bytes().to_vec(),
        ),
        ("IND all ones", ind * bs, vec![0xff; bs as usize]),
        (
            "inode TIND pointer set",
            fx.inode_at("/victim") + 40 + 56,
            (dind as u32).to_le_bytes().to_vec(),
        ),
    ];
    for (what, offset, bytes) in damages {
        fx.repair();
        fx.damage(offset, &bytes);
        let mut srv = fx.serve(&[], "exportname");
        let context = format!("ext2 /victim: {what}");
        if what.contains("past the device") {
            expect_damaged(&mut srv, "/victim", &context);
        } else {
            probe(&mut srv, "/victim", None, &context);
        }
        expect_serves(&mut srv, "/good", &fx.good, &context);
        srv.stop();
    }
}

/// Directory blocks damaged: the root and a subdirectory, random bytes, zero record
/// lengths, entries pointing at inode 0, at huge inode numbers, at their own directory
/// (a loop). Lookups and export listing fail or succeed, the server lives, and the
/// repaired image serves again on the same server.
#[test]
fn damaged_directories() {
    for kind in [Kind::Ext4Plain, Kind::Ext4Csum, Kind::Ext2] {
        let fx = Fixture::new(&format!("dirs-{kind:?}"), kind);
        let bs = fx.bs();
        let root = data_blocks(&fx.pristine, "/")[0] * bs;
        let sub = data_blocks(&fx.pristine, "/dir")[0] * bs;
        let (dir_ino, _) = inode_location(&fx.pristine, "/dir");
        // Entries: inode u32, rec_len u16, name_len u8, file_type u8, name.
        // The third entry of /dir is "nested" (after "." and "..").
        let damages: Vec<(&str, u64, Vec<u8>)> = vec![
            ("random root block", root, rnd(11, bs as usize)),
            ("zeroed root block", root, vec![0; bs as usize]),
            ("root: '.' rec_len 0", root + 4, vec![0, 0]),
            (
                "root: '..' rec_len past the block",
                root + 12 + 4,
                0xfff0u16.to_le_bytes().to_vec(),
            ),
            ("root: name_len 255", root + 12 + 6, vec![255]),
            ("random /dir block", sub, rnd(12, bs as usize)),
            ("/dir: nested -> inode 0xffffffff", sub + 24, vec![0xff; 4]),
            (
                "/dir: nested -> /dir (loop)",
                sub + 24,
                (dir_ino as u32).to_le_bytes().to_vec(),
            ),
            (
                "/dir: nested -> inode 1 (bad blocks)",
                sub + 24,
                1u32.to_le_bytes().to_vec(),
            ),
            (
                "/dir: nested -> journal inode",
                sub + 24,
                8u32.to_le_bytes().to_vec(),
            ),
        ];
        for (what, offset, bytes) in damages {
            fx.repair();
            fx.damage(offset, &bytes);
            let mut srv = fx.serve(&[], "exportname");
            let context = format!("{kind:?} directories: {what}");
            let _ = list_exports(srv.socket());
            srv.assert_alive(&context);
            for name in [
                "/good",
                "/dir/nested",
                "/dir/nested/x",
                "/dir/../good",
                "/victim",
            ] {
                probe(&mut srv, name, None, &context);
            }
            if what.contains("/dir") {
                expect_serves(&mut srv, "/good", &fx.good, &context);
            } else {
                fx.repair();
                expect_serves(&mut srv, "/good", &fx.good, &format!("{context}, repaired"));
            }
            srv.stop();
        }
    }
}

/// Images truncated at every interesting point: inside the superblock, after the
/// descriptors, inside the bitmaps and inode table, inside a file's data, one byte and
/// one block short. Each stops nbdkit at start with a message (for a readable
/// superblock, the kernel's `bad geometry`), in both modes: no data of a filesystem
/// larger than its image is ever served.
#[test]
fn truncated_images() {
    for kind in [Kind::Ext4Csum, Kind::Ext4Plain, Kind::Ext2, Kind::Ext3] {
        let fx = Fixture::new(&format!("trunc-{kind:?}"), kind);
        let bs = fx.bs();
        let g = fx.layout.groups[0].clone();
        let size = fs::metadata(&fx.pristine).unwrap().len();
        let victim_blocks = data_blocks(&fx.pristine, "/victim");
        let descriptors_end = g.descriptors.clone().unwrap().end * bs;
        let points: Vec<(&str, u64)> = vec![
            ("empty", 0),
            ("512 bytes", 512),
            ("inside the superblock", 1024 + 100),
            ("after the superblock", 2048),
            (
                "after the descriptors",
                g.descriptors.clone().unwrap().end * bs,
            ),
            ("inside the block bitmap", g.block_bitmap * bs + 10),
            ("after the inode bitmap", (g.inode_bitmap + 1) * bs),
            (
                "inside the inode table",
                g.inode_table.start * bs + 3 * bs / 2,
            ),
            (
                "inside /victim's data",
                victim_blocks[victim_blocks.len() / 2] * bs + 7,
            ),
            ("one block short", size - bs),
            ("one byte short", size - 1),
        ];
        for (what, len) in points {
            fx.repair();
            let f = fs::OpenOptions::new().write(true).open(&fx.served).unwrap();
            f.set_len(len).unwrap();
            drop(f);
            for ext2file in ["/victim", "exportname"] {
                let context =
                    format!("{kind:?} truncated {what} ({len} bytes), ext2file={ext2file}");
                match fx.start(&[], ext2file, &context) {
                    // Short of the descriptors, libext2fs cannot even open it.
                    Started::Stopped(log) => assert!(
                        len < descriptors_end || log.contains("bad geometry: block count"),
                        "{context}: not refused for its geometry:\n{log}"
                    ),
                    Started::Serving(mut srv) => {
                        srv.stop();
                        panic!("{context}: a truncated image was served");
                    }
                }
            }
        }
    }
}

/// A journal that needs recovery but is damaged (random journal superblock, journal
/// inode pointing past the device): the connection fails or the image is served
/// read-only; the server lives.
#[test]
fn damaged_journal_needing_recovery() {
    let fx = Fixture::new("journal", Kind::Ext3);
    let bs = fx.bs();
    let journal = data_blocks(&fx.pristine, "<8>");
    let jsb = journal[0] * bs;
    let needs_recovery = |fx: &Fixture| {
        // s_feature_incompat |= EXT3_FEATURE_INCOMPAT_RECOVER (0x4)
        let mut sb = fs::read(&fx.served).unwrap()[1024 + 96..1024 + 100].to_vec();
        sb[0] |= 0x4;
        fx.damage(1024 + 96, &sb);
    };
    let damages: Vec<(&str, u64, Vec<u8>)> = vec![
        ("intact journal", jsb, Vec::new()),
        ("random journal superblock", jsb, rnd(13, bs as usize)),
        ("journal superblock zeroed", jsb, vec![0; bs as usize]),
        ("journal s_first 0xffffffff", jsb + 20, vec![0xff; 4]),
        (
            "journal s_maxlen huge",
            jsb + 16,
            vec![0x7f, 0xff, 0xff, 0xff],
        ),
        ("journal s_blocksize 0", jsb + 12, vec![0; 4]),
        (
            "journal s_start past the journal",
            jsb + 28,
            vec![0, 0, 0x7f, 0xff],
        ),
        (
            "random first journal blocks",
            journal[1] * bs,
            rnd(14, 4 * bs as usize),
        ),
        (
            "journal inode pointing past the device",
            fx.inode_at("<8>") + 40 + 12 * 4,
            ((fx.layout.blocks_count + 50) as u32)
                .to_le_bytes()
                .to_vec(),
        ),
    ];
    for (what, offset, bytes) in damages {
        fx.repair();
        needs_recovery(&fx);
        fx.damage(offset, &bytes);
        let context = format!("ext3 needing recovery: {what}");
        let Started::Serving(mut srv) = fx.start(&[], "exportname", &context) else {
            continue; // the journal could not be read at start: stopped, with a message
        };
        let _ = list_exports(srv.socket());
        if let Ok(mut nbd) = Nbd::connect(srv.socket(), b"/good") {
            assert!(nbd.read_only(), "{context}: served writable");
            let _ = ok_io(nbd.read_all(4096), &context);
            let _ = ok_io(nbd.write(0, b"x", 0), &context);
            nbd.disconnect();
        }
        probe(&mut srv, "/victim", None, &context);
        srv.assert_alive(&context);
        srv.stop();
    }
}

/// Two files of one image share a block (cross-linked, as damage leaves them): the
/// server serves both and survives writes through either, and a clean stop leaves the
/// rest of the filesystem alone.
#[test]
fn cross_linked_files() {
    let fx = Fixture::new("crosslink", Kind::Ext2);
    // Point /good's first block at /victim's first block.
    let victim_first = data_blocks(&fx.pristine, "/victim")[0] as u32;
    fx.damage(fx.inode_at("/good") + 40, &victim_first.to_le_bytes());
    let mut srv = fx.serve(&[], "exportname");
    let mut a = Nbd::connect(srv.socket(), b"/good").unwrap();
    let mut b = Nbd::connect(srv.socket(), b"/victim").unwrap();
    ok_io(a.write(0, &[1u8; 1024], 0), "write").unwrap();
    ok_io(b.write(0, &[2u8; 1024], 0), "write").unwrap();
    let _ = ok_io(a.flush(), "flush");
    a.disconnect();
    b.disconnect();
    srv.assert_alive("cross-linked");
    srv.stop();
    let _ = Path::new(&fx.served);
}

/// A file map that points at blocks no file may own: block 0 (the boot block on 1 KiB
/// filesystems), the superblock, the group descriptors, the inode table, a bitmap.
/// Serving it would hand a client the filesystem's own metadata to read and overwrite
/// (a write would destroy inodes or descriptors), so the file is refused with a message
/// the way a map past the device is. e2fsck calls these "illegal blocks".
#[test]
fn maps_pointing_at_fixed_metadata_are_refused() {
    let mut served = Vec::new();
    for kind in [Kind::Ext4Plain, Kind::Ext2] {
        let fx = Fixture::new(&format!("meta-map-{kind:?}"), kind);
        let bs = fx.bs();
        let g = fx.layout.groups[0].clone();
        let targets: Vec<(&str, u64)> = vec![
            ("block 0", 0),
            ("the superblock", 1),
            (
                "the group descriptors",
                g.descriptors.clone().unwrap().start,
            ),
            ("the block bitmap", g.block_bitmap),
            ("the inode table", g.inode_table.start),
        ];
        for (what, block) in targets {
            if kind == Kind::Ext2 && block == 0 {
                // A zero block pointer is how ext2 records a hole, not a map.
                continue;
            }
            fx.repair();
            match kind {
                Kind::Ext2 => {
                    // /good's first direct block pointer (i_block[0]).
                    fx.damage(fx.inode_at("/good") + 40, &(block as u32).to_le_bytes());
                }
                _ => {
                    // /good's only extent, in the inode: ee_start_lo.
                    fx.damage(
                        fx.inode_at("/good") + 40 + 12 + 8,
                        &(block as u32).to_le_bytes(),
                    );
                }
            }
            let mut srv = fx.serve(&[], "exportname");
            let context = format!("{kind:?}: /good mapped onto {what} (block {block})");
            if let Ok(nbd) = Nbd::connect(srv.socket(), b"/good") {
                served.push(context.clone());
                nbd.disconnect();
            }
            srv.assert_alive(&context);
            srv.stop();
            let _ = bs;
        }
    }
    assert!(
        served.is_empty(),
        "files mapped onto metadata were served:\n{}",
        served.join("\n")
    );
}

/// An ext2 inode whose single-indirect pointer lies past the device: libext2fs 1.47.0's
/// `ext2fs_block_iterate3` notes `EXT2_ET_BAD_IND_BLOCK` but the double-indirect walk
/// that follows overwrites the error code with 0 and does not advance the logical block
/// count past the skipped 256 blocks, so a walk with `BLOCK_FLAG_DATA_ONLY` reports
/// success and numbers every later block 256 too low: the file is served with its data
/// shifted (file block 12 reads what belongs at 268, and a write there lands on it).
/// The file must be refused like any other map that points past the device.
#[test]
fn indirect_pointer_past_the_device_is_refused() {
    let fx = Fixture::new("ind-past-end", Kind::Ext2);
    let beyond = (fx.layout.blocks_count * 2) as u32;
    fx.damage(fx.inode_at("/victim") + 40 + 12 * 4, &beyond.to_le_bytes());
    let mut srv = fx.serve(&[], "exportname");
    match Nbd::connect(srv.socket(), b"/victim") {
        Err(ConnectError::Refused { .. }) => {
            let log = srv.log();
            assert!(log.contains("/victim"), "no message names the file:\n{log}");
        }
        Err(e) => panic!("connection broke: {e}"),
        Ok(mut nbd) => {
            let r = ok_io(nbd.read(12 * 1024, 1024), "read");
            let v = &fx.victim;
            panic!(
                "/victim was served with its indirect block past the device; file block 12 reads {}",
                match r {
                    Ok(buf) if buf.iter().all(|&b| b == 0) => "as zeroes (a hole)".to_string(),
                    Ok(buf) if buf[..] == v[268 * 1024..269 * 1024] => {
                        "the data of file block 268: every block behind the bad pointer is shifted down by 256".to_string()
                    }
                    Ok(_) => "as some other data".to_string(),
                    Err(e) => format!("as error {e}"),
                }
            );
        }
    }
    expect_serves(&mut srv, "/good", &fx.good, "other file");
    srv.stop();
}
