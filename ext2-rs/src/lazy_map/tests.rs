//! In-process tests of the lazy map on real images (made by mke2fs) held
//! in a [`MemDevice`]: the same map as libext2fs's own walk on every layout,
//! with caches small enough to evict, damaged trees refused, a slow or
//! failing device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::extent_map::Content;
use crate::fs::{Access, Layout};
use crate::mapping;
use crate::testing::{Faults, MemDevice};

/// The data blocks of a file for `mke2fs -d` of `blocks` blocks, data in every
/// `every`-th block (the rest holes), each data block filled with a byte
/// derived from its number.
fn sparse_source(blocks: usize, every: usize) -> Vec<(usize, u8)> {
    (0..blocks)
        .step_by(every)
        .map(|b| (b, (b % 251) as u8 + 1))
        .collect()
}

/// A device holding an image with `/f` made from `sparse_source`.
fn image(mkfs: &[&str], size: &str, bs: usize, blocks: usize, every: usize) -> Arc<MemDevice> {
    use std::io::{Seek, SeekFrom, Write};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ext2-rs-lazy-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("f")).unwrap();
    for (b, byte) in sparse_source(blocks, every) {
        f.seek(SeekFrom::Start((b * bs) as u64)).unwrap();
        f.write_all(&vec![byte; bs]).unwrap();
    }
    f.set_len((blocks * bs) as u64).unwrap();
    drop(f);
    let d = dir.to_str().unwrap().to_string();
    let bs_arg = bs.to_string();
    let mut args = mkfs.to_vec();
    args.extend(["-b", &bs_arg, "-d", &d]);
    let dev = Arc::new(MemDevice::mkfs(&args, size));
    std::fs::remove_dir_all(&dir).unwrap();
    dev
}

fn source(fs: &Filesystem, dev: &Arc<MemDevice>, cache: usize) -> MapSource {
    MapSource::new(fs, dev.clone(), cache)
}

/// The file's extents as libext2fs's own walk gives them, merged.
fn library_map(fs: &mut Filesystem, ino: Ino) -> FileMap {
    let layout = fs.inode(ino).unwrap().layout;
    let extents = mapping::read_map(fs, ino, layout).unwrap();
    FileMap::new(fs.block_size(), extents).unwrap()
}

fn lazy_extents(map: &LazyMap, blocks: Range<u64>) -> Result<FileMap> {
    let mut out = Vec::new();
    map.extents(blocks, &mut out)?;
    Ok(FileMap::new(map.block_size() as u32, out).unwrap())
}

/// The depth of a file's extent tree (0 for block pointers).
fn depth(map: &LazyMap) -> u16 {
    match &map.root {
        Root::Extents(ExtentNode::Index { depth, .. }) => *depth,
        _ => 0,
    }
}

struct Case {
    name: &'static str,
    mkfs: &'static [&'static str],
    size: &'static str,
    bs: usize,
    blocks: usize,
    every: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "ext2 1k, double indirect",
        mkfs: &["-t", "ext2"],
        size: "16M",
        bs: 1024,
        blocks: 12 + 256 + 3000,
        every: 1,
    },
    Case {
        name: "ext3 4k, holes",
        mkfs: &["-t", "ext3"],
        size: "64M",
        bs: 4096,
        blocks: 12 + 1024 + 2000,
        every: 3,
    },
    Case {
        name: "ext4 depth 0",
        mkfs: &["-t", "ext4"],
        size: "16M",
        bs: 4096,
        blocks: 7,
        every: 2,
    },
    Case {
        name: "ext4 depth 1",
        mkfs: &["-t", "ext4"],
        size: "16M",
        bs: 1024,
        blocks: 600,
        every: 2,
    },
    Case {
        name: "ext4 depth 2",
        mkfs: &["-t", "ext4"],
        size: "32M",
        bs: 1024,
        blocks: 4000,
        every: 2,
    },
    Case {
        name: "ext4 bigalloc",
        mkfs: &["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
        size: "64M",
        bs: 1024,
        blocks: 3000,
        every: 20,
    },
];

#[test]
fn every_layout_maps_as_libext2fs_does_with_eviction() {
    for case in CASES {
        let dev = image(case.mkfs, case.size, case.bs, case.blocks, case.every);
        let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
        let ino = fs.lookup("/f").unwrap();
        let want = library_map(&mut fs, ino);
        for budget in [0usize, 4096, 16 << 20] {
            let src = source(&fs, &dev, budget);
            let cache = src.cache.clone();
            let map = LazyMap::open(&mut fs, src, ino, "/f").unwrap();
            let got = lazy_extents(&map, 0..u64::MAX).unwrap();
            assert_eq!(got, want, "{}: budget {budget}", case.name);
            // Piece by piece, in small windows, against the library's map.
            let bs = case.bs as u64;
            let size = (case.blocks * case.bs) as u64;
            let mut pieces = Vec::new();
            for offset in (0..size).step_by(case.bs * 37 + 123) {
                let len = (bs * 5 + 7).min(size - offset);
                map.pieces(offset, len, &mut pieces).unwrap();
                assert_eq!(
                    pieces,
                    want.pieces(offset, len),
                    "{}: budget {budget}, pieces at {offset}",
                    case.name
                );
            }
            if budget == 4096 && depth(&map) > 0 {
                assert!(
                    cache.stats().evicted > 0,
                    "{}: nothing was evicted ({:?})",
                    case.name,
                    cache.stats()
                );
            }
            assert!(cache.stats().bytes <= budget.max(1), "{}", case.name);
        }
    }
}

#[test]
fn deep_trees_are_built() {
    // The premise of the layouts above: depths 1 and 2 exist, and depth 3
    // comes from enough one-block extents with 1 KiB blocks.
    let dev = image(&["-t", "ext4"], "160M", 1024, 70_000, 2);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    let want = library_map(&mut fs, ino);
    let map = {
        let src = source(&fs, &dev, 64 << 10);
        LazyMap::open(&mut fs, src, ino, "/f")
    }
    .unwrap();
    assert_eq!(depth(&map), 3, "test premise: a depth-3 tree");
    assert_eq!(lazy_extents(&map, 0..u64::MAX).unwrap(), want);
    // A range in the middle only.
    let mid = lazy_extents(&map, 30_001..30_011).unwrap();
    assert_eq!(
        mid.extents().iter().map(|e| e.logical).collect::<Vec<_>>(),
        vec![30_002, 30_004, 30_006, 30_008, 30_010]
    );
}

#[test]
fn opening_reads_no_map_block_and_a_lookup_reads_one_path() {
    let dev = image(&["-t", "ext4"], "32M", 1024, 8000, 2);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    fs.inode(ino).unwrap();
    let before = dev.counts().reads;
    let map = {
        let src = source(&fs, &dev, 16 << 20);
        LazyMap::open(&mut fs, src, ino, "/f")
    }
    .unwrap();
    assert_eq!(dev.counts().reads, before, "opening read the device");
    let d = u64::from(depth(&map));
    assert!(d >= 2, "test premise: depth {d}");
    // One block deep in the file: one read per level (no read-ahead for a
    // lone lookup), through a slow device.
    dev.set_latency(Duration::from_millis(20));
    let start = Instant::now();
    let mut pieces = Vec::new();
    map.pieces(5000 * 1024, 1024, &mut pieces).unwrap();
    let took = start.elapsed();
    assert_eq!(dev.counts().reads - before, d, "reads for one lookup");
    assert!(took < Duration::from_millis(20 * (d + 2)), "took {took:?}");
    assert!(matches!(pieces[0].content, Content::Data { .. }));
    // Again: cached, no read.
    map.pieces(5000 * 1024, 1024, &mut pieces).unwrap();
    assert_eq!(dev.counts().reads - before, d);
}

#[test]
fn a_reader_in_order_gets_map_blocks_read_ahead() {
    let dev = image(&["-t", "ext4"], "32M", 1024, 8000, 2);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    let src = source(&fs, &dev, 16 << 20);
    let cache = src.cache.clone();
    let map = LazyMap::open(&mut fs, src, ino, "/f").unwrap();
    // A slow device that serves parallel requests together: a sequential
    // reader, 64 KiB at a time, waits for few round trips, not one per leaf.
    let latency = Duration::from_millis(10);
    dev.set_latency(latency);
    let start = Instant::now();
    let mut pieces = Vec::new();
    for offset in (0..8000 * 1024).step_by(64 << 10) {
        map.pieces(offset, 64 << 10, &mut pieces).unwrap();
    }
    let took = start.elapsed();
    let leaves = cache.stats().inserted;
    assert!(leaves >= 40, "test premise: {leaves} map blocks");
    assert!(
        took < latency * (leaves as u32 / 4),
        "{leaves} map blocks took {took:?}"
    );
}

/// Overwrites `bytes` at `offset` of the device.
fn damage(dev: &MemDevice, offset: u64, bytes: &[u8]) {
    dev.write_at(bytes, offset).unwrap();
}

/// The first leaf of /f's depth-1 tree: (its block, the root's entries).
fn first_leaf(map: &LazyMap) -> (u64, Vec<IndexEntry>) {
    match &map.root {
        Root::Extents(ExtentNode::Index { entries, .. }) => (entries[0].child, entries.clone()),
        other => panic!("test premise: an index root, not {other:?}"),
    }
}

#[test]
fn damaged_trees_fail_with_a_message_naming_the_file() {
    let damages: &[(&str, &str)] = &[
        ("entries out of order", "out of order"),
        ("overlapping entries", "overlaps"),
        ("index outside its parent's range", "parent"),
        ("bad magic", "magic"),
        ("too many entries", "entries"),
        ("leaf on the inode table", "metadata"),
    ];
    for &(what, says) in damages {
        let dev = image(&["-t", "ext4", "-O", "^metadata_csum"], "16M", 1024, 600, 2);
        let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
        let ino = fs.lookup("/f").unwrap();
        let map = {
            let src = source(&fs, &dev, 1 << 20);
            LazyMap::open(&mut fs, src, ino, "/f")
        }
        .unwrap();
        let (leaf, root) = first_leaf(&map);
        let at = leaf * 1024;
        let entry = |i: u64| at + 12 + 12 * i;
        match what {
            "entries out of order" => {
                // Entry 1 before entry 0: swap their logical blocks.
                damage(&dev, entry(0), &2u32.to_le_bytes());
                damage(&dev, entry(1), &0u32.to_le_bytes());
            }
            "overlapping entries" => damage(&dev, entry(1), &0u32.to_le_bytes()),
            "index outside its parent's range" => {
                // The second leaf starts (per the root) before the first
                // leaf's extents end.
                let inode = map.inode_offset;
                let second = (root[1].logical - 10) as u32;
                damage(&dev, inode + 0x28 + 12 + 12, &second.to_le_bytes());
            }
            "bad magic" => damage(&dev, at, &[0, 0]),
            "too many entries" => damage(&dev, at + 2, &200u16.to_le_bytes()),
            "leaf on the inode table" => {
                let table = fs.reserved().first_in(2, u64::MAX).unwrap();
                let _ = table;
                // The inode's own block is inode table.
                let block = (map.inode_offset / 1024) as u32;
                damage(&dev, entry(3) + 8, &block.to_le_bytes());
            }
            _ => unreachable!(),
        }
        // A fresh filesystem and map: nothing cached from before.
        drop(map);
        drop(fs);
        let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
        let result = {
            let src = source(&fs, &dev, 1 << 20);
            LazyMap::open(&mut fs, src, ino, "/f")
        }
        .and_then(|map| lazy_extents(&map, 0..600));
        let err = result.expect_err(what).to_string();
        assert!(
            err.contains("/f") && err.contains("damaged") && err.contains(says),
            "{what}: {err}"
        );
    }
}

#[test]
fn inline_data_with_extents_is_damaged() {
    let dev = image(&["-t", "ext4", "-O", "^metadata_csum"], "16M", 1024, 4, 1);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    let map = {
        let src = source(&fs, &dev, 1 << 20);
        LazyMap::open(&mut fs, src, ino, "/f")
    }
    .unwrap();
    let flags_at = map.inode_offset + 0x20;
    let mut flags = [0u8; 4];
    dev.read_at(&mut flags, flags_at).unwrap();
    let flags = u32::from_le_bytes(flags) | 0x1000_0000;
    damage(&dev, flags_at, &flags.to_le_bytes());
    drop(map);
    drop(fs);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    assert_eq!(fs.inode(ino).unwrap().layout, Layout::Inline);
    let err = {
        let src = source(&fs, &dev, 1 << 20);
        LazyMap::open(&mut fs, src, ino, "/f")
    }
    .err()
    .expect("served")
    .to_string();
    assert!(
        err.contains("/f") && err.contains("inline-data") && err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn a_failing_device_fails_the_lookup_and_recovers() {
    let dev = image(&["-t", "ext2"], "16M", 1024, 3000, 1);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    let want = library_map(&mut fs, ino);
    let map = {
        let src = source(&fs, &dev, 0);
        LazyMap::open(&mut fs, src, ino, "/f")
    }
    .unwrap();
    let Root::Pointers(pointers) = map.root else {
        panic!("test premise: block pointers");
    };
    let ind = u64::from(pointers[12]) * 1024;
    dev.set_faults(Faults::failing_reads(ind..ind + 1024));
    let err = lazy_extents(&map, 0..3000).unwrap_err();
    assert!(err.to_string().contains("/f"), "{err}");
    assert!(
        lazy_extents(&map, 0..12).is_ok(),
        "direct blocks need no read"
    );
    dev.set_faults(Faults::default());
    assert_eq!(lazy_extents(&map, 0..u64::MAX).unwrap(), want);
}

#[test]
fn parallel_lookups_agree() {
    let dev = image(&["-t", "ext4"], "32M", 1024, 8000, 2);
    let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
    let ino = fs.lookup("/f").unwrap();
    let want = library_map(&mut fs, ino);
    let map = Arc::new(
        {
            let src = source(&fs, &dev, 8192);
            LazyMap::open(&mut fs, src, ino, "/f")
        }
        .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (map, want) = (map.clone(), &want);
            s.spawn(move || {
                let mut pieces = Vec::new();
                for i in 0..300u64 {
                    let offset = (i * 7919 + t * 104_729) % (8000 * 1024);
                    map.pieces(offset, 3000, &mut pieces).unwrap();
                    assert_eq!(pieces, want.pieces(offset, 3000));
                }
            });
        }
    });
}
