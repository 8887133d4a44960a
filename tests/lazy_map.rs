//! Maps read lazily through a cache too small to hold them (`ext2mapcache=4K`, so map
//! blocks are evicted and read again all the time): every layout the suite builds reads
//! byte for byte as `debugfs dump` says, block status shows the holes, and parallel
//! writers filling holes leave a file and an image that `debugfs` and `e2fsck` agree with.

mod common;

use common::*;

/// A file of `blocks` blocks with data in every other one (one extent per data block on
/// ext4) and the holes between.
fn every_other_block(block_size: u32, blocks: u64, seed: u64) -> SparseFile {
    let bs = u64::from(block_size);
    SparseFile {
        len: blocks * bs,
        pieces: (0..blocks)
            .step_by(2)
            .map(|b| (b * bs, random_bytes(seed + b, bs as usize)))
            .collect(),
    }
}

fn holes_of(file: &SparseFile, block_size: u32) -> Vec<(u64, u64)> {
    let bs = u64::from(block_size);
    file.pieces.iter().map(|(at, _)| (at + bs, bs)).collect()
}

/// A server for `file` of `image` whose map cache holds `cache`.
fn serve(
    dir: &TestDir,
    options: &[&str],
    image: &std::path::Path,
    file: &str,
    cache: &str,
) -> Server {
    let ext2file = format!("ext2file={file}");
    let cache = format!("ext2mapcache={cache}");
    Server::start(
        dir,
        options,
        &["file", image.to_str().unwrap(), &ext2file, &cache],
    )
}

fn check_layout(name: &str, fs: FsType, block_size: u32, extra: &[&str], blocks: u64) {
    let dir = TestDir::new(name);
    let file = every_other_block(block_size, blocks, seed_from(name));
    let mut builder = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(64 * MIB)
        .sparse_file("/f", &file);
    for option in extra {
        builder = builder.mkfs_option(option);
    }
    let image = builder.build(&dir, "fs.img");
    let expected = debugfs_dump(&image, "/f");
    assert_bytes_eq(&expected, &file.contents(), "test premise: debugfs dump");
    let server = serve(&dir, &["-r"], &image, "/f", "4K");
    let got = nbdcopy_read(&server.uri(), &dir, &["--no-extents"]);
    assert_bytes_eq(&got, &expected, &format!("{name}: nbdcopy"));
    // Small reads spread over the file, each alone.
    let ranges: Vec<(u64, usize)> = (0..40)
        .map(|i| ((i * 7919 * 97) % (file.len - 5000), 5000))
        .collect();
    for ((at, len), read) in ranges.iter().zip(nbd_pread_many(&server.uri(), &ranges)) {
        let at = *at as usize;
        assert_bytes_eq(&read, &expected[at..at + len], &format!("{name}: at {at}"));
    }
    let extents = nbd_block_status(&server.uri());
    let holes = if fs == FsType::Ext4 && !extra.iter().any(|o| o.contains("bigalloc")) {
        holes_of(&file, block_size)
    } else {
        Vec::new()
    };
    assert_extents_describe_file(&extents, &expected, &holes);
}

#[test]
fn ext2_1k_indirect_with_eviction() {
    check_layout("lazy_ext2_1k", FsType::Ext2, 1024, &[], 12 + 256 + 2000);
}

#[test]
fn ext3_4k_indirect_with_eviction() {
    check_layout("lazy_ext3_4k", FsType::Ext3, 4096, &[], 12 + 1024 + 1000);
}

#[test]
fn ext4_depth_0_to_2_with_eviction() {
    check_layout("lazy_ext4_d0", FsType::Ext4, 4096, &[], 7);
    check_layout("lazy_ext4_d1", FsType::Ext4, 1024, &[], 500);
    check_layout("lazy_ext4_d2", FsType::Ext4, 1024, &[], 8000);
}

#[test]
fn ext4_depth_3_with_eviction() {
    // 35,000 one-block extents in half-full 1 KiB leaves need a third level.
    let name = "lazy_ext4_d3";
    let dir = TestDir::new(name);
    let file = every_other_block(1024, 70_000, seed_from(name));
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(1024)
        .size(160 * MIB)
        .sparse_file("/f", &file)
        .build(&dir, "fs.img");
    let stat = debugfs(&image, "ex /f");
    assert!(
        stat.lines().any(|l| l.trim_start().starts_with("3/ 3")),
        "test premise: a depth-3 tree"
    );
    let server = serve(&dir, &["-r"], &image, "/f", "4K");
    let got = nbdcopy_read(&server.uri(), &dir, &["--no-extents"]);
    assert_bytes_eq(&got, &file.contents(), name);
}

#[test]
fn bigalloc_with_eviction() {
    check_layout(
        "lazy_bigalloc",
        FsType::Ext4,
        1024,
        &["-O", "bigalloc", "-C", "16384"],
        3000,
    );
}

#[test]
fn unwritten_extents_with_eviction() {
    let dir = TestDir::new("lazy_unwritten");
    let image = unwritten_extent_image(&dir);
    let expected = debugfs_dump(&image, "/prealloc");
    let server = serve(&dir, &[], &image, "/prealloc", "0");
    let got = nbdcopy_read(&server.uri(), &dir, &["--no-extents"]);
    assert_bytes_eq(&got, &expected, "unwritten extents");
    let extents = nbd_block_status(&server.uri());
    assert!(
        extents.iter().any(|e| e.flags == STATE_ZERO),
        "no unwritten range reported as zero: {extents:?}"
    );
}

/// Four clients at once fill the holes of a fragmented file (allocating, and growing its
/// extent tree) while the map cache holds almost nothing: every byte lands where it
/// should and the image checks clean.
#[test]
fn parallel_writers_with_eviction() {
    let name = "lazy_parallel_writers";
    let dir = TestDir::new(name);
    let bs = 1024u64;
    let file = every_other_block(1024, 4000, seed_from(name));
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(1024)
        .size(64 * MIB)
        .sparse_file("/f", &file)
        .build(&dir, "fs.img");
    let mut server = serve(&dir, &[], &image, "/f", "4K");
    let mut expected = file.contents();
    let mut per_client: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); 4];
    for (i, hole) in (1..4000u64).step_by(2).enumerate() {
        let data = random_bytes(seed_from(name) ^ hole, bs as usize);
        expected[(hole * bs) as usize..((hole + 1) * bs) as usize].copy_from_slice(&data);
        per_client[i % 4].push((hole * bs, data));
    }
    let uri = server.uri();
    std::thread::scope(|s| {
        for writes in &per_client {
            let uri = uri.clone();
            s.spawn(move || nbd_pwrite_many(&uri, writes, WriteFlush::Flush));
        }
    });
    let got = nbdcopy_read(&uri, &dir, &["--no-extents"]);
    assert_bytes_eq(&got, &expected, "after the parallel writers");
    server.stop();
    assert_bytes_eq(&debugfs_dump(&image, "/f"), &expected, "debugfs dump");
    e2fsck_clean(&image);
}
