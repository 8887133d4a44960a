//! Writing: writes at unaligned offsets (1 byte, 4095 bytes straddling blocks, 1 MiB at an
//! odd offset, the last bytes), writes into the holes of sparse files (start, middle, end,
//! partially covering blocks, so the untouched bytes of newly allocated blocks must read
//! as zeros), on ext2/ext3/ext4 with 1 KiB and 4 KiB blocks. The result is checked live
//! (through the filter), then after the server exits with `debugfs dump` of the file and
//! of a neighbouring file, and with `e2fsck -fn`. Also zeroing, fast zero, trim and
//! writes with `qemu-io`.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};

const NEIGHBOUR_SIZE: usize = 200 * 1024 + 9;

fn apply_writes(contents: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (offset, data) in writes {
        let start = *offset as usize;
        contents[start..start + data.len()].copy_from_slice(data);
    }
}

/// Checks the file through the server (pread and nbdcopy with block status), stops the
/// server, then checks the image with debugfs and e2fsck.
fn verify_after_writes(
    dir: &TestDir,
    mut server: Server,
    image: &Path,
    path: &str,
    expected: &[u8],
    neighbour: &[u8],
) {
    let live = nbd_pread(&server.uri(), 0, expected.len());
    assert_bytes_eq(&live, expected, "pread through the filter after the writes");
    let copied = nbdcopy_read(&server.uri(), dir, &[]);
    assert_bytes_eq(
        &copied,
        expected,
        "nbdcopy (default, with block status) after the writes",
    );
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(image, path),
        expected,
        &format!("debugfs dump of {path}"),
    );
    assert_neighbour_untouched_and_clean(image, neighbour);
}

/// After a server has stopped: `/neighbour` still holds its bytes and the
/// filesystem is clean.
fn assert_neighbour_untouched_and_clean(image: &Path, neighbour: &[u8]) {
    assert_bytes_eq(
        &debugfs_dump(image, "/neighbour"),
        neighbour,
        "debugfs dump of /neighbour (must be untouched)",
    );
    e2fsck_clean(image);
}

fn image_with(
    dir: &TestDir,
    fs: FsType,
    block_size: u32,
    seed: u64,
    target: Target,
) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let neighbour = random_bytes(seed ^ 0x55, NEIGHBOUR_SIZE);
    let builder = ImageBuilder::new(fs)
        .block_size(block_size)
        .file("/neighbour", &neighbour);
    let (builder, contents) = match target {
        Target::Dense(len) => {
            let contents = random_bytes(seed, len);
            (builder.file("/target", &contents), contents)
        }
        Target::Sparse(sparse) => {
            let contents = sparse.contents();
            (builder.sparse_file("/target", &sparse), contents)
        }
    };
    let image = builder
        .file("/after", &random_bytes(seed ^ 0xaa, 50_000))
        .build(dir, "fs.img");
    (image, contents, neighbour)
}

enum Target {
    Dense(usize),
    Sparse(SparseFile),
}

fn check_unaligned_writes(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let (image, mut expected, neighbour) = image_with(
        &dir,
        fs,
        block_size,
        seed,
        Target::Dense((3 * MIB + 123) as usize),
    );
    let size = expected.len() as u64;
    let bs = block_size as u64;
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, vec![0x01]),
        (bs - 1, vec![0x02, 0x03]),
        (4093, random_bytes(seed + 1, 4095)),
        (12 * bs - 3, random_bytes(seed + 2, 4095)),
        (MIB + 7, random_bytes(seed + 3, MIB as usize)),
        (2 * MIB + 4097, vec![0x04]),
        (size - 5000, random_bytes(seed + 4, 4999)),
        (size - 1, vec![0x05]),
    ];
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    apply_writes(&mut expected, &writes);
    verify_after_writes(&dir, server, &image, "/target", &expected, &neighbour);
}

/// A sparse file: hole, data (unaligned end), hole, data, hole through EOF.
fn sparse_target(seed: u64) -> SparseFile {
    SparseFile {
        len: 4 * MIB + 333,
        pieces: vec![
            (MIB + 512 * KIB, random_bytes(seed, 100_001)),
            (2 * MIB + 3, random_bytes(seed ^ 9, 300_000)),
        ],
    }
}

fn check_writes_into_holes(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let sparse = sparse_target(seed);
    let len = sparse.len;
    let (image, mut expected, neighbour) =
        image_with(&dir, fs, block_size, seed, Target::Sparse(sparse));
    let writes: Vec<(u64, Vec<u8>)> = vec![
        // Start hole: a few bytes in the middle of the first block.
        (5, random_bytes(seed + 1, 100)),
        // Middle of the start hole, straddling two blocks, partially covering both.
        (MIB / 2 + 1000, random_bytes(seed + 2, 3000)),
        // Across the hole/data boundary into the first data piece.
        (MIB + 512 * KIB - 500, random_bytes(seed + 3, 1000)),
        // Middle hole, just after the first piece's unaligned end.
        (MIB + 512 * KIB + 100_001 + 10, random_bytes(seed + 4, 10)),
        // Large unaligned write filling part of the end hole.
        (3 * MIB + 17, random_bytes(seed + 5, 200 * KIB as usize)),
        // The very last bytes of the file (partial final block).
        (len - 10, random_bytes(seed + 6, 10)),
        // Rewrite inside a block allocated by an earlier write.
        (7, vec![0xee; 3]),
    ];
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    apply_writes(&mut expected, &writes);
    verify_after_writes(&dir, server, &image, "/target", &expected, &neighbour);
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

layout_tests!(check_unaligned_writes =>
    unaligned_writes_ext2_1k: (FsType::Ext2, 1024),
    unaligned_writes_ext2_4k: (FsType::Ext2, 4096),
    unaligned_writes_ext3_1k: (FsType::Ext3, 1024),
    unaligned_writes_ext3_4k: (FsType::Ext3, 4096),
    unaligned_writes_ext4_1k: (FsType::Ext4, 1024),
    unaligned_writes_ext4_4k: (FsType::Ext4, 4096),
);

layout_tests!(check_writes_into_holes =>
    writes_into_holes_ext2_1k: (FsType::Ext2, 1024),
    writes_into_holes_ext2_4k: (FsType::Ext2, 4096),
    writes_into_holes_ext3_1k: (FsType::Ext3, 1024),
    writes_into_holes_ext3_4k: (FsType::Ext3, 4096),
    writes_into_holes_ext4_1k: (FsType::Ext4, 1024),
    writes_into_holes_ext4_4k: (FsType::Ext4, 4096),
    writes_into_holes_ext3_2k: (FsType::Ext3, 2048),
    writes_into_holes_ext4_64k: (FsType::Ext4, 65536),
);

/// Writes into holes must change block status: the written ranges are no longer
/// reported as zero, the remaining holes still are hole+zero.
#[test]
fn block_status_after_writes_into_holes() {
    let dir = TestDir::new("block_status_after_writes_into_holes");
    let sparse = sparse_target(31);
    let len = sparse.len;
    let (image, mut expected, _) = image_with(&dir, FsType::Ext4, 4096, 31, Target::Sparse(sparse));
    let writes = vec![(100, vec![0x11; 10]), (3 * MIB + 1, vec![0x22; 5000])];
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    apply_writes(&mut expected, &writes);
    let extents = nbd_block_status(&server.uri());
    let holes = [
        (64 * KIB, MIB - 64 * KIB),
        (3 * MIB + 64 * KIB, len - 3 * MIB - 64 * KIB),
    ];
    assert_extents_describe_file(&extents, &expected, &holes);
}

/// NBD_CMD_WRITE_ZEROES (with and without NO_HOLE) over data at unaligned offsets.
#[test]
fn write_zeroes_over_data() {
    for (fs, block_size) in [(FsType::Ext4, 4096), (FsType::Ext2, 1024)] {
        let name = format!("write_zeroes_over_data_{}_{block_size}", fs.name());
        let dir = TestDir::new(&name);
        let (image, mut expected, neighbour) = image_with(
            &dir,
            fs,
            block_size,
            seed_from(&name),
            Target::Dense((2 * MIB + 1) as usize),
        );
        let server = Server::start(
            &dir,
            &[],
            &["file", image.to_str().unwrap(), "ext2file=/target"],
        );
        nbdsh(
            &server.uri(),
            "h.zero(10, 3)\n\
             h.zero(300000, 4097)\n\
             h.zero(70000, 1048576 + 5, nbd.CMD_FLAG_NO_HOLE)\n\
             h.zero(1, 2097152)\n\
             h.flush()\n",
            &[],
        )
        .assert_success();
        for (offset, len) in [
            (3, 10),
            (4097, 300_000),
            (MIB as usize + 5, 70_000),
            (2 * MIB as usize, 1),
        ] {
            expected[offset..offset + len].fill(0);
        }
        verify_after_writes(&dir, server, &image, "/target", &expected, &neighbour);
    }
}

/// Fast zero is either refused with ENOTSUP (leaving the data alone) or performed; it
/// must never fail any other way when advertised.
#[test]
fn fast_zero_succeeds_or_is_refused_cleanly() {
    let dir = TestDir::new("fast_zero_succeeds_or_is_refused_cleanly");
    let (image, mut expected, neighbour) = image_with(
        &dir,
        FsType::Ext4,
        4096,
        41,
        Target::Dense((MIB + 5) as usize),
    );
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let out = nbdsh(
        &server.uri(),
        "import errno\n\
         if not h.can_fast_zero():\n\
         \x20   print('not-advertised')\n\
         else:\n\
         \x20   try:\n\
         \x20       h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)\n\
         \x20       print('zeroed')\n\
         \x20   except nbd.Error as e:\n\
         \x20       assert e.errnum == errno.ENOTSUP, (e.string, e.errnum)\n\
         \x20       print('refused')\n\
         h.flush()\n",
        &[],
    );
    out.assert_success();
    if out.stdout_text().trim() == "zeroed" {
        expected[65536..131072].fill(0);
    }
    verify_after_writes(&dir, server, &image, "/target", &expected, &neighbour);
}

/// Trim (if offered) must leave the untrimmed bytes and the filesystem intact.
#[test]
fn trim_keeps_other_data_and_filesystem_intact() {
    let dir = TestDir::new("trim_keeps_other_data_and_filesystem_intact");
    let (image, expected, neighbour) = image_with(
        &dir,
        FsType::Ext4,
        4096,
        43,
        Target::Dense((2 * MIB + 77) as usize),
    );
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let out = nbdsh(
        &server.uri(),
        "if h.can_trim():\n\
         \x20   h.trim(512 * 1024 + 100, 4096 * 10 + 1)\n\
         \x20   h.flush()\n",
        &[],
    );
    out.assert_success();
    let trimmed = 4096 * 10 + 1..4096 * 10 + 1 + 512 * 1024 + 100;
    let live = nbd_pread(&server.uri(), 0, expected.len());
    assert_bytes_eq(
        &live[..trimmed.start],
        &expected[..trimmed.start],
        "bytes before the trim",
    );
    assert_bytes_eq(
        &live[trimmed.end..],
        &expected[trimmed.end..],
        "bytes after the trim",
    );
    server.stop();
    let dumped = debugfs_dump(&image, "/target");
    assert_eq!(dumped.len(), expected.len());
    assert_bytes_eq(
        &dumped[..trimmed.start],
        &expected[..trimmed.start],
        "dump before the trim",
    );
    assert_bytes_eq(
        &dumped[trimmed.end..],
        &expected[trimmed.end..],
        "dump after the trim",
    );
    assert_neighbour_untouched_and_clean(&image, &neighbour);
}

/// Unaligned writes from qemu-io (a different client) into data and a hole.
#[test]
fn qemu_io_unaligned_writes() {
    let dir = TestDir::new("qemu_io_unaligned_writes");
    let sparse = sparse_target(47);
    let (image, mut expected, neighbour) =
        image_with(&dir, FsType::Ext3, 1024, 47, Target::Sparse(sparse));
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &server.uri(),
            "-c",
            "write -P 0x5a 4093 5000",
            "-c",
            "write -P 0xa5 1572863 3",
            "-c",
            "write -z 2097160 1000",
            "-c",
            "flush",
        ],
    );
    out.assert_success();
    // qemu-io reports failed commands on stdout and may still exit 0.
    assert!(
        !out.stdout_text().contains("failed"),
        "qemu-io: {}",
        out.stdout_text()
    );
    expected[4093..4093 + 5000].fill(0x5a);
    expected[1_572_863..1_572_866].fill(0xa5);
    expected[2_097_160..2_098_160].fill(0);
    verify_after_writes(&dir, server, &image, "/target", &expected, &neighbour);
}

/// Partial writes into an unwritten (uninit) extent whose disk blocks hold stale 0xaa
/// bytes: the written bytes read back, every other byte still reads as zero (in the
/// written blocks too), live, in the image and after a restart.
#[test]
fn writes_into_unwritten_extent() {
    let dir = TestDir::new("writes_into_unwritten_extent");
    let image = unwritten_extent_image(&dir);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/prealloc"],
    );
    let writes = vec![
        (10, random_bytes(51, 100)),
        (50 * 4096 - 3, random_bytes(52, 10)),
        (70 * 4096, random_bytes(53, 4096)),
        (409_599, vec![0x01]),
    ];
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    let mut expected = vec![0u8; 409_600];
    apply_writes(&mut expected, &writes);
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, expected.len()),
        &expected,
        "pread after writes",
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &expected,
        "nbdcopy (with block status) after writes",
    );
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&image, "/prealloc"),
        &expected,
        "debugfs dump of /prealloc",
    );
    e2fsck_clean(&image);
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/prealloc"],
    );
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, expected.len()),
        &expected,
        "pread after a server restart",
    );
}

/// An ext4 inline-data file (bytes stored in the inode): either the export is read-only
/// (writes refused cleanly, the server survives, the image is unchanged) or writes
/// within the file work and leave the filesystem clean.
#[test]
fn writes_into_inline_data_file_work_or_are_refused() {
    let dir = TestDir::new("writes_into_inline_data_file_work_or_are_refused");
    let original = b"tiny file kept in the inode, 43 bytes long.".to_vec();
    let image = ImageBuilder::new(FsType::Ext4)
        .mkfs_option("-O")
        .mkfs_option("inline_data")
        .file("/tiny", &original)
        .file("/neighbour", &random_bytes(54, NEIGHBOUR_SIZE))
        .build(&dir, "fs.img");
    let image_before = read_file(&image);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/tiny"],
    );
    let out = nbdsh(
        &server.uri(),
        "if h.is_read_only():\n\
         \x20   print('read-only')\n\
         else:\n\
         \x20   h.pwrite(b'T', 0)\n\
         \x20   h.pwrite(b'FILE', 5)\n\
         \x20   h.pwrite(b'!', 42)\n\
         \x20   h.flush()\n\
         \x20   print('written')\n",
        &[],
    );
    out.assert_success();
    let mut expected = original.clone();
    let written = out.stdout_text().trim() == "written";
    if written {
        apply_writes(
            &mut expected,
            &[
                (0, b"T".to_vec()),
                (5, b"FILE".to_vec()),
                (43, b"!".to_vec()),
            ],
        );
    }
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, expected.len()),
        &expected,
        "pread",
    );
    assert!(server.is_running());
    server.stop();
    if !written {
        assert_bytes_eq(
            &read_file(&image),
            &image_before,
            "image of a read-only export",
        );
    }
    // debugfs 1.47.0 dumps the whole 60-byte inline area: compare the file's part.
    let dumped = debugfs_dump(&image, "/tiny");
    assert!(dumped.len() >= expected.len(), "debugfs dump too short");
    assert_bytes_eq(&dumped[..expected.len()], &expected, "debugfs dump");
    assert_neighbour_untouched_and_clean(&image, &random_bytes(54, NEIGHBOUR_SIZE));
}

/// Maximum-size requests (32 MiB) at odd offsets, mostly into a hole: one request
/// allocates thousands of blocks (and, on ext2 with 1 KiB blocks, indirect and
/// double-indirect blocks).
fn check_large_requests(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let sparse = SparseFile {
        len: 40 * MIB + 1,
        pieces: vec![(0, random_bytes(seed, 100_000))],
    };
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(64 * MIB)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let big = random_bytes(seed + 1, 32 * MIB as usize);
    let offset = 50_001;
    nbd_pwrite_many(&server.uri(), &[(offset, big.clone())], WriteFlush::Flush);
    let mut expected = sparse.contents();
    apply_writes(&mut expected, &[(offset, big)]);
    let back = nbd_pread(&server.uri(), 7 * MIB + 3, 32 * MIB as usize);
    assert_bytes_eq(
        &back,
        &expected[7 * MIB as usize + 3..39 * MIB as usize + 3],
        "32 MiB pread",
    );
    server.stop();
    assert_bytes_eq(&debugfs_dump(&image, "/target"), &expected, "debugfs dump");
    e2fsck_clean(&image);
}

#[test]
fn large_requests_ext4_4k() {
    check_large_requests(FsType::Ext4, 4096, "large_requests_ext4_4k");
}

#[test]
fn large_requests_ext2_1k() {
    check_large_requests(FsType::Ext2, 1024, "large_requests_ext2_1k");
}

/// A write into a hole of a full filesystem fails with ENOSPC; the server keeps
/// working, writes to allocated data still succeed, and the filesystem stays clean
/// (no half-allocated blocks).
#[test]
fn full_filesystem_write_fails_with_enospc() {
    let dir = TestDir::new("full_filesystem_write_fails_with_enospc");
    let sparse = SparseFile {
        len: 8 * MIB,
        pieces: vec![(0, random_bytes(61, 8192))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(4096)
        .size(16 * MIB)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    // Fill all but 16 free blocks with one contiguous file.
    let free = free_blocks(&image);
    let filler_len = (free - 16) * 4096;
    let filler = dir.join("filler.src");
    std::fs::File::create(&filler)
        .unwrap()
        .write_all(&vec![0x5f; filler_len as usize])
        .unwrap();
    debugfs_write(&image, &[format!("write {} /filler", filler.display())]);
    let left = free_blocks(&image);
    assert!(
        left < 40,
        "test premise: the filesystem should be nearly full ({left} free blocks)"
    );
    e2fsck_clean(&image);

    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let out = nbdsh(
        &server.uri(),
        "import errno\n\
         try:\n\
         \x20   h.pwrite(b'\\x77' * (4 * 1024 * 1024), 2 * 1024 * 1024)\n\
         \x20   print('write-succeeded')\n\
         except nbd.Error as e:\n\
         \x20   print('failed', errno.errorcode.get(e.errnum, e.errnum))\n\
         h.pwrite(b'\\x66' * 100, 10)\n\
         h.flush()\n",
        &[],
    );
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "failed ENOSPC");
    assert!(server.is_running());
    server.stop();
    let dumped = debugfs_dump(&image, "/target");
    let mut expected_start = sparse.contents()[..8192].to_vec();
    expected_start[10..110].fill(0x66);
    assert_bytes_eq(
        &dumped[..8192],
        &expected_start,
        "allocated data after ENOSPC",
    );
    assert_eq!(dumped.len(), 8 * MIB as usize);
    e2fsck_clean(&image);
}

/// Zeroing (without NO_HOLE) a range that is a hole allocates nothing.
#[test]
fn zeroing_a_hole_allocates_nothing() {
    for (fs, block_size) in [(FsType::Ext4, 4096), (FsType::Ext2, 1024)] {
        let name = format!("zeroing_a_hole_allocates_nothing_{}", fs.name());
        let dir = TestDir::new(&name);
        let sparse = sparse_target(seed_from(&name));
        let (image, expected, _) = image_with(
            &dir,
            fs,
            block_size,
            seed_from(&name),
            Target::Sparse(sparse),
        );
        let free_before = free_blocks(&image);
        let mut server = Server::start(
            &dir,
            &[],
            &["file", image.to_str().unwrap(), "ext2file=/target"],
        );
        nbdsh(
            &server.uri(),
            "h.zero(900000, 4097)\n\
             h.zero(500000, 3 * 1024 * 1024 + 5)\n\
             h.flush()\n",
            &[],
        )
        .assert_success();
        server.stop();
        assert_eq!(
            free_blocks(&image),
            free_before,
            "{name}: zeroing holes changed the free block count"
        );
        assert_bytes_eq(&debugfs_dump(&image, "/target"), &expected, &name);
        e2fsck_clean(&image);
    }
}

/// Trim on an ext4 (extent-mapped) file frees the whole blocks inside the range: they
/// read as zeros and return to the free count; partial blocks at the edges keep their
/// bytes.
#[test]
fn trim_frees_whole_blocks_of_extent_files() {
    let dir = TestDir::new("trim_frees_whole_blocks_of_extent_files");
    let (image, mut expected, neighbour) = image_with(
        &dir,
        FsType::Ext4,
        4096,
        45,
        Target::Dense((2 * MIB + 77) as usize),
    );
    let free_before = free_blocks(&image);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    // [65537, 1048579): whole blocks 17..=255.
    let out = nbdsh(
        &server.uri(),
        "assert h.can_trim()\n\
         h.trim(1048579 - 65537, 65537)\n\
         h.flush()\n",
        &[],
    );
    out.assert_success();
    expected[17 * 4096..256 * 4096].fill(0);
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, expected.len()),
        &expected,
        "pread after trim",
    );
    server.stop();
    let freed = free_blocks(&image) as i64 - free_before as i64;
    assert!(
        (235..=239).contains(&freed),
        "trim of 239 whole blocks freed {freed} blocks"
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/target"),
        &expected,
        "dump after trim",
    );
    assert_neighbour_untouched_and_clean(&image, &neighbour);
}

/// Plugin errors (injected with the error filter while a trigger file exists) fail the
/// client's requests with EIO, never the server; once the errors stop, writes work
/// again, and the filesystem is clean: a failed allocation leaks no block and exposes
/// no stale bytes.
#[test]
fn plugin_errors_fail_requests_not_the_server() {
    let dir = TestDir::new("plugin_errors_fail_requests_not_the_server");
    let sparse = sparse_target(46);
    let (image, mut expected, neighbour) =
        image_with(&dir, FsType::Ext4, 4096, 46, Target::Sparse(sparse));
    let write_trigger = dir.join("fail-writes");
    let read_trigger = dir.join("fail-reads");
    let mut server = Server::start(
        &dir,
        &[],
        &[
            "--filter=error",
            "file",
            image.to_str().unwrap(),
            "ext2file=/target",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", write_trigger.display()),
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", read_trigger.display()),
        ],
    );
    let script = format!(
        "import errno, os\n\
         def expect_eio(what, fn):\n\
         \x20   try:\n\
         \x20       fn()\n\
         \x20   except nbd.Error as e:\n\
         \x20       assert e.errnum == errno.EIO, (what, e.string)\n\
         \x20       return\n\
         \x20   raise AssertionError(what + ' succeeded despite plugin errors')\n\
         h.pread(4096, 0)\n\
         open({wt:?}, 'w').close()\n\
         expect_eio('write into a hole', lambda: h.pwrite(b'\\x01' * 100000, 2 * 1024 * 1024 + 500000))\n\
         expect_eio('write into data', lambda: h.pwrite(b'\\x02' * 5000, 1024 * 1024 + 512 * 1024 + 10))\n\
         os.unlink({wt:?})\n\
         h.pwrite(b'\\x03' * 7000, 3 * 1024 * 1024 + 11)\n\
         h.flush()\n\
         open({rt:?}, 'w').close()\n\
         expect_eio('read', lambda: h.pread(65536, 2 * 1024 * 1024 + 65536))\n\
         os.unlink({rt:?})\n\
         assert h.pread(7000, 3 * 1024 * 1024 + 11) == b'\\x03' * 7000\n\
         print('ok')\n",
        wt = write_trigger.to_str().unwrap(),
        rt = read_trigger.to_str().unwrap(),
    );
    let out = nbdsh(&server.uri(), &script, &[]);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "ok");
    assert!(server.is_running());
    server.stop();
    expected[3 * MIB as usize + 11..3 * MIB as usize + 7011].fill(0x03);
    let dumped = debugfs_dump(&image, "/target");
    assert_eq!(dumped.len(), expected.len());
    // The failed writes' ranges may hold old or new bytes, nothing else.
    let hole_write = 2 * MIB as usize + 500_000..2 * MIB as usize + 600_000;
    let data_write = (MIB + 512 * KIB + 10) as usize..(MIB + 512 * KIB + 5010) as usize;
    for (range, new_byte) in [(hole_write.clone(), 0x01), (data_write.clone(), 0x02)] {
        for i in range {
            assert!(
                dumped[i] == expected[i] || dumped[i] == new_byte,
                "byte {i} after a failed write is {:#x}: neither old nor new",
                dumped[i]
            );
        }
    }
    let mut masked = dumped.clone();
    masked[hole_write.clone()].copy_from_slice(&expected[hole_write]);
    masked[data_write.clone()].copy_from_slice(&expected[data_write]);
    assert_bytes_eq(&masked, &expected, "bytes outside the failed writes");
    assert_neighbour_untouched_and_clean(&image, &neighbour);
}

/// ext4 with bigalloc (16 KiB clusters of 1 KiB blocks): allocation is per cluster.
/// Either the export is read-only, or writes into holes (partial clusters, a cluster
/// already partly used by the file, far into a hole) read back and leave the block
/// counts and bitmaps right.
#[test]
fn bigalloc_writes_into_holes() {
    let dir = TestDir::new("bigalloc_writes_into_holes");
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![(MIB, random_bytes(47, 100_000))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(1024)
        .mkfs_option("-O")
        .mkfs_option("bigalloc")
        .mkfs_option("-C")
        .mkfs_option("16384")
        .sparse_file("/target", &sparse)
        .file("/neighbour", &random_bytes(48, NEIGHBOUR_SIZE))
        .build(&dir, "fs.img");
    e2fsck_clean(&image);
    let image_before = read_file(&image);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let writes = vec![
        // Start of the file: part of the first cluster.
        (5, random_bytes(49, 3000)),
        // Just past the data, inside the data's last cluster.
        (MIB + 100_000 + 50, random_bytes(50, 10)),
        // Far into the hole, across a cluster boundary.
        (2 * MIB + 16 * KIB - 100, random_bytes(51, 20_000)),
        // Last byte.
        (4 * MIB - 1, vec![0x42]),
    ];
    let read_only = nbdsh(&server.uri(), "print(h.is_read_only())", &[]);
    read_only.assert_success();
    let mut expected = sparse.contents();
    if read_only.stdout_text().trim() == "True" {
        server.stop();
        assert_bytes_eq(
            &read_file(&image),
            &image_before,
            "read-only bigalloc image",
        );
        return;
    }
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    apply_writes(&mut expected, &writes);
    verify_after_writes(
        &dir,
        server,
        &image,
        "/target",
        &expected,
        &random_bytes(48, NEIGHBOUR_SIZE),
    );
}
