//! Fragmented and indirect-mapped files. A fragmented file is made by filling an image
//! with small files, deleting every other one (`debugfs -w rm`) and writing a big file
//! (`debugfs -w write`) that lands in the freed gaps; its block map is checked to have
//! many runs, then reads and writes across every run boundary must be exact. Indirect
//! mapping (ext2/ext3): files past 12 direct blocks and past 12 + 256 (1 KiB) or
//! 12 + 1024 (4 KiB) blocks use indirect and double-indirect blocks; reads and writes
//! across those boundaries, and writes into holes that need new mapping blocks.

mod common;

use common::*;
use std::path::PathBuf;

const GAP_FILES: usize = 16;
const GAP_BLOCKS: usize = 40;

struct Fragmented {
    image: PathBuf,
    content: Vec<u8>,
    /// Byte offsets in /big where its block map changes run.
    boundaries: Vec<u64>,
    /// The files left in place between the gaps, with their contents.
    kept: Vec<(String, Vec<u8>)>,
}

fn fragmented_image(dir: &TestDir, fs: FsType, block_size: u32, seed: u64) -> Fragmented {
    let bs = block_size as usize;
    let mut builder = ImageBuilder::new(fs).block_size(block_size).size(32 * MIB);
    let mut kept = Vec::new();
    for i in 0..GAP_FILES {
        let content = random_bytes(seed + i as u64, GAP_BLOCKS * bs);
        builder = builder.file(&format!("/f{i}"), &content);
        if i % 2 == 1 {
            kept.push((format!("/f{i}"), content));
        }
    }
    let image = builder.build(dir, "fs.img");
    // Big enough to need about 7 of the 8 gaps.
    let content = random_bytes(seed ^ 0xb16, 7 * GAP_BLOCKS * bs - 3 * bs + 777);
    let source = dir.join("big.src");
    std::fs::write(&source, &content).unwrap();
    let mut commands: Vec<String> = (0..GAP_FILES)
        .step_by(2)
        .map(|i| format!("rm /f{i}"))
        .collect();
    commands.push(format!("write {} /big", source.to_str().unwrap()));
    debugfs_write(&image, &commands);

    let runs = debugfs_mapping(&image, "/big");
    let discontiguous = runs
        .windows(2)
        .filter(|w| w[1].physical != w[0].physical + w[0].count)
        .count();
    assert!(
        discontiguous >= 4,
        "test premise: /big should be fragmented, its block map is {runs:?}"
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/big"),
        &content,
        "test premise: debugfs dump of /big",
    );
    e2fsck_clean(&image);
    let boundaries = runs
        .iter()
        .skip(1)
        .map(|run| run.logical * block_size as u64)
        .filter(|&offset| offset < content.len() as u64)
        .collect();
    Fragmented {
        image,
        content,
        boundaries,
        kept,
    }
}

fn check_fragmented_reads(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let frag = fragmented_image(&dir, fs, block_size, seed_from(name));
    let server = Server::start(
        &dir,
        &[],
        &["file", frag.image.to_str().unwrap(), "ext2file=/big"],
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &frag.content,
        "nbdcopy (default)",
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &["--no-extents"]),
        &frag.content,
        "nbdcopy --no-extents",
    );
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    for &b in &frag.boundaries {
        ranges.push((b - 1, 2));
        ranges.push((b - 3, 7));
        ranges.push((b - block_size as u64 - 1, 2 * block_size as usize + 2));
    }
    // One read spanning every boundary.
    let first = frag.boundaries[0] - 5;
    let last = *frag.boundaries.last().unwrap() + 5;
    ranges.push((first, (last - first) as usize));
    let got = nbd_pread_many(&server.uri(), &ranges);
    for ((offset, len), bytes) in ranges.iter().zip(got) {
        let start = *offset as usize;
        assert_bytes_eq(
            &bytes,
            &frag.content[start..start + len],
            &format!("pread {len}@{offset}"),
        );
    }
}

fn check_fragmented_writes(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let frag = fragmented_image(&dir, fs, block_size, seed);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", frag.image.to_str().unwrap(), "ext2file=/big"],
    );
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, &b) in frag.boundaries.iter().enumerate() {
        writes.push((b - 100, random_bytes(seed + i as u64, 200)));
    }
    // One write spanning the 2nd to the 4th boundary, unaligned at both ends.
    let span_start = frag.boundaries[1] - 77;
    let span_end = frag.boundaries[3] + 55;
    writes.push((
        span_start,
        random_bytes(seed + 99, (span_end - span_start) as usize),
    ));
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    let mut expected = frag.content.clone();
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, expected.len()),
        &expected,
        "pread after writes",
    );
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&frag.image, "/big"),
        &expected,
        "debugfs dump of /big",
    );
    for (path, content) in &frag.kept {
        assert_bytes_eq(
            &debugfs_dump(&frag.image, path),
            content,
            &format!("{path} (between the gaps)"),
        );
    }
    e2fsck_clean(&frag.image);
}

macro_rules! layout_tests {
    ($check:ident => $($name:ident: ($fs:expr, $bs:expr)),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $check($fs, $bs, stringify!($name));
            }
        )*
    };
}

layout_tests!(check_fragmented_reads =>
    fragmented_reads_ext2_1k: (FsType::Ext2, 1024),
    fragmented_reads_ext2_4k: (FsType::Ext2, 4096),
    fragmented_reads_ext3_1k: (FsType::Ext3, 1024),
    fragmented_reads_ext3_4k: (FsType::Ext3, 4096),
    fragmented_reads_ext4_1k: (FsType::Ext4, 1024),
    fragmented_reads_ext4_4k: (FsType::Ext4, 4096),
);

layout_tests!(check_fragmented_writes =>
    fragmented_writes_ext2_1k: (FsType::Ext2, 1024),
    fragmented_writes_ext2_4k: (FsType::Ext2, 4096),
    fragmented_writes_ext3_1k: (FsType::Ext3, 1024),
    fragmented_writes_ext3_4k: (FsType::Ext3, 4096),
    fragmented_writes_ext4_1k: (FsType::Ext4, 1024),
    fragmented_writes_ext4_4k: (FsType::Ext4, 4096),
);

/// Logical block where double-indirect mapping starts.
fn dind_start(block_size: u32) -> u64 {
    12 + block_size as u64 / 4
}

/// A dense file reaching into the double-indirect range: reads and writes across the
/// direct→indirect and indirect→double-indirect boundaries.
fn check_indirect_dense(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let bs = block_size as u64;
    let len = (dind_start(block_size) + 300) * bs + 123;
    let content = random_bytes(seed, len as usize);
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(32 * MIB)
        .file("/before", &random_bytes(seed ^ 1, 10_000))
        .file("/indirect", &content)
        .build(&dir, "fs.img");
    let stat = debugfs(&image, "stat /indirect");
    assert!(
        stat.contains("(IND)") && stat.contains("(DIND)"),
        "test premise: {stat}"
    );

    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/indirect"],
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &content,
        "nbdcopy (default)",
    );
    let ind = 12 * bs;
    let dind = dind_start(block_size) * bs;
    let ranges = vec![
        (ind - 1, 2usize),
        (ind - 10, 2 * bs as usize),
        (dind - 1, 2),
        (dind - 3, 3 * bs as usize),
        (len - 1, 1),
    ];
    let got = nbd_pread_many(&server.uri(), &ranges);
    for ((offset, n), bytes) in ranges.iter().zip(got) {
        assert_bytes_eq(
            &bytes,
            &content[*offset as usize..*offset as usize + n],
            &format!("pread {n}@{offset}"),
        );
    }
    let writes = vec![
        (ind - 5, random_bytes(seed + 2, 10)),
        (dind - bs - 7, random_bytes(seed + 3, 2 * bs as usize + 14)),
        (dind + 100 * bs + 1, random_bytes(seed + 4, 5 * bs as usize)),
        (len - 2, vec![0xab, 0xcd]),
    ];
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    let mut expected = content.clone();
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&image, "/indirect"),
        &expected,
        "debugfs dump of /indirect",
    );
    e2fsck_clean(&image);
}

/// A sparse indirect-mapped file whose indirect and double-indirect ranges are holes:
/// writes there must allocate the mapping blocks too.
fn check_indirect_holes(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let bs = block_size as u64;
    let dind = dind_start(block_size) * bs;
    let len = dind + 600 * bs + 9;
    let sparse = SparseFile {
        len,
        pieces: vec![
            (0, random_bytes(seed, 3 * bs as usize)),
            (dind + 400 * bs, random_bytes(seed ^ 1, 10 * bs as usize)),
        ],
    };
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(32 * MIB)
        .sparse_file("/holes", &sparse)
        .file("/after", &random_bytes(seed ^ 2, 20_000))
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/holes"],
    );
    let writes = vec![
        // Last direct block and first indirect block.
        (12 * bs - 10, random_bytes(seed + 1, 20)),
        // Middle of the indirect range.
        (150 * bs + 3, random_bytes(seed + 2, 100)),
        // Last indirect block and first double-indirect block.
        (dind - 1, vec![0x5a, 0xa5]),
        // Further into the double-indirect range, several blocks.
        (dind + 100 * bs + 5, random_bytes(seed + 3, 3 * bs as usize)),
        // Last byte of the file.
        (len - 1, vec![0x42]),
    ];
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    let mut expected = sparse.contents();
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &expected,
        "nbdcopy after writes",
    );
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&image, "/holes"),
        &expected,
        "debugfs dump of /holes",
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/after"),
        &random_bytes(seed ^ 2, 20_000),
        "/after",
    );
    e2fsck_clean(&image);
}

layout_tests!(check_indirect_dense =>
    indirect_dense_ext2_1k: (FsType::Ext2, 1024),
    indirect_dense_ext3_1k: (FsType::Ext3, 1024),
    indirect_dense_ext2_4k: (FsType::Ext2, 4096),
);

layout_tests!(check_indirect_holes =>
    indirect_holes_ext2_1k: (FsType::Ext2, 1024),
    indirect_holes_ext3_1k: (FsType::Ext3, 1024),
    indirect_holes_ext2_4k: (FsType::Ext2, 4096),
);
