//! Reading: byte-exact copies of a file embedded in ext2, ext3 and ext4 images with 1 KiB
//! and 4 KiB blocks, through `nbdcopy` (default settings, which use block status, and
//! `--no-extents`) and `qemu-img convert`; sparse files with holes at the start, middle
//! and end; block status describing the file (not the image); small reads at odd
//! offsets and across block boundaries; the exact export size; the export description;
//! unwritten (uninit) extents and inline data; symlinks.

mod common;

use common::*;

/// An image holding a dense random file `/data/file.bin` (not a multiple of the block
/// size, preceded by another file so it does not start at the image's first data block).
fn dense_image(
    dir: &TestDir,
    fs: FsType,
    block_size: u32,
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>) {
    let content = random_bytes(seed, (5 * MIB + 777) as usize);
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .file("/padding", &random_bytes(seed ^ 1, 300 * KIB as usize + 1))
        .file("/data/file.bin", &content)
        .file("/hello.txt", b"hello world\n")
        .build(dir, "fs.img");
    (image, content)
}

/// A sparse file with holes at the start, in the middle and at the end (through EOF);
/// the data pieces start and end at unaligned offsets.
fn sparse_test_file(seed: u64) -> (SparseFile, Vec<(u64, u64)>) {
    let len = 3 * MIB + 100;
    let first = (MIB, random_bytes(seed, 200 * KIB as usize + 3));
    let second = (2 * MIB + 5, random_bytes(seed ^ 2, 100_000));
    let align_up = |x: u64| x.div_ceil(64 * KIB) * (64 * KIB);
    let first_end = align_up(first.0 + first.1.len() as u64);
    let second_end = align_up(second.0 + second.1.len() as u64);
    let holes = vec![
        (0, MIB),
        (first_end, 2 * MIB - first_end),
        (second_end, len - second_end),
    ];
    (
        SparseFile {
            len,
            pieces: vec![first, second],
        },
        holes,
    )
}

fn sparse_image(
    dir: &TestDir,
    fs: FsType,
    block_size: u32,
    seed: u64,
) -> (std::path::PathBuf, SparseFile, Vec<(u64, u64)>) {
    let (sparse, holes) = sparse_test_file(seed);
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .file("/padding", &random_bytes(seed ^ 3, 100 * KIB as usize))
        .sparse_file("/sparse.bin", &sparse)
        .build(dir, "fs.img");
    (image, sparse, holes)
}

/// `nbdkit ... --run 'nbdcopy [ARGS] $uri OUT'`, the documented usage, returning OUT.
fn nbdcopy_through_run(
    dir: &TestDir,
    image: &std::path::Path,
    ext2file: &str,
    nbdcopy_args: &str,
) -> Vec<u8> {
    let out = dir.join("out.bin");
    nbdkit_run(
        &[],
        &[
            "file",
            image.to_str().unwrap(),
            &format!("ext2file={ext2file}"),
        ],
        &format!(
            "nbdcopy {nbdcopy_args} \"$uri\" {}",
            shell_quote(out.to_str().unwrap())
        ),
    )
    .assert_success();
    read_file(&out)
}

fn check_nbdcopy_dense(fs: FsType, block_size: u32, nbdcopy_args: &str, name: &str) {
    let dir = TestDir::new(name);
    let (image, content) = dense_image(&dir, fs, block_size, seed_from(name));
    let copied = nbdcopy_through_run(&dir, &image, "/data/file.bin", nbdcopy_args);
    assert_bytes_eq(
        &copied,
        &content,
        &format!("nbdcopy [{nbdcopy_args}] of /data/file.bin"),
    );
}

fn check_nbdcopy_sparse(fs: FsType, block_size: u32, nbdcopy_args: &str, name: &str) {
    let dir = TestDir::new(name);
    let (image, sparse, _) = sparse_image(&dir, fs, block_size, seed_from(name));
    let copied = nbdcopy_through_run(&dir, &image, "/sparse.bin", nbdcopy_args);
    assert_bytes_eq(
        &copied,
        &sparse.contents(),
        &format!("nbdcopy [{nbdcopy_args}] of /sparse.bin"),
    );
}

fn check_block_status_sparse(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let (image, sparse, holes) = sparse_image(&dir, fs, block_size, seed_from(name));
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/sparse.bin"],
    );
    let extents = nbd_block_status(&server.uri());
    assert_extents_describe_file(&extents, &sparse.contents(), &holes);
}

fn check_small_reads(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let (image, content) = dense_image(&dir, fs, block_size, seed_from(name));
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/data/file.bin"],
    );
    let size = content.len() as u64;
    let bs = block_size as u64;
    let ranges: Vec<(u64, usize)> = vec![
        (0, 1),
        (1, 1),
        (3, 7),
        (bs - 1, 1),
        (bs - 1, 2),
        (bs + 1, 1),
        (bs - 3, bs as usize + 6),
        (12 * bs - 1, 2),
        (12 * bs - 5, 3 * bs as usize + 11),
        ((12 + 256) * bs - 7, 14),
        (MIB - 1, 3),
        (3 * MIB + 12345, 65537),
        (size - bs - 1, bs as usize + 1),
        (size - 2, 2),
        (size - 1, 1),
        (4093, 4099),
        (0, size as usize),
    ];
    let got = nbd_pread_many(&server.uri(), &ranges);
    for ((offset, len), bytes) in ranges.iter().zip(got) {
        let start = *offset as usize;
        assert_bytes_eq(
            &bytes,
            &content[start..start + len],
            &format!("pread of {len} bytes at {offset}"),
        );
    }
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

fn nbdcopy_default_dense(fs: FsType, block_size: u32, name: &str) {
    check_nbdcopy_dense(fs, block_size, "", name);
}

fn nbdcopy_no_extents_dense(fs: FsType, block_size: u32, name: &str) {
    check_nbdcopy_dense(fs, block_size, "--no-extents", name);
}

fn nbdcopy_default_sparse(fs: FsType, block_size: u32, name: &str) {
    check_nbdcopy_sparse(fs, block_size, "", name);
}

fn nbdcopy_no_extents_sparse(fs: FsType, block_size: u32, name: &str) {
    check_nbdcopy_sparse(fs, block_size, "--no-extents", name);
}

// nbdcopy with default settings: uses block status, so wrong extents give wrong bytes.
layout_tests!(nbdcopy_default_dense =>
    nbdcopy_default_exact_ext2_1k: (FsType::Ext2, 1024),
    nbdcopy_default_exact_ext2_4k: (FsType::Ext2, 4096),
    nbdcopy_default_exact_ext3_1k: (FsType::Ext3, 1024),
    nbdcopy_default_exact_ext3_4k: (FsType::Ext3, 4096),
    nbdcopy_default_exact_ext4_1k: (FsType::Ext4, 1024),
    nbdcopy_default_exact_ext4_4k: (FsType::Ext4, 4096),
);

layout_tests!(nbdcopy_no_extents_dense =>
    nbdcopy_no_extents_exact_ext2_1k: (FsType::Ext2, 1024),
    nbdcopy_no_extents_exact_ext2_4k: (FsType::Ext2, 4096),
    nbdcopy_no_extents_exact_ext3_1k: (FsType::Ext3, 1024),
    nbdcopy_no_extents_exact_ext3_4k: (FsType::Ext3, 4096),
    nbdcopy_no_extents_exact_ext4_1k: (FsType::Ext4, 1024),
    nbdcopy_no_extents_exact_ext4_4k: (FsType::Ext4, 4096),
);

layout_tests!(nbdcopy_default_sparse =>
    nbdcopy_default_sparse_ext2_1k: (FsType::Ext2, 1024),
    nbdcopy_default_sparse_ext2_4k: (FsType::Ext2, 4096),
    nbdcopy_default_sparse_ext3_1k: (FsType::Ext3, 1024),
    nbdcopy_default_sparse_ext3_4k: (FsType::Ext3, 4096),
    nbdcopy_default_sparse_ext4_1k: (FsType::Ext4, 1024),
    nbdcopy_default_sparse_ext4_4k: (FsType::Ext4, 4096),
    nbdcopy_default_sparse_ext2_2k: (FsType::Ext2, 2048),
    nbdcopy_default_sparse_ext4_64k: (FsType::Ext4, 65536),
);

layout_tests!(nbdcopy_no_extents_sparse =>
    nbdcopy_no_extents_sparse_ext2_4k: (FsType::Ext2, 4096),
    nbdcopy_no_extents_sparse_ext4_1k: (FsType::Ext4, 1024),
);

layout_tests!(check_block_status_sparse =>
    block_status_describes_file_holes_ext2_1k: (FsType::Ext2, 1024),
    block_status_describes_file_holes_ext2_4k: (FsType::Ext2, 4096),
    block_status_describes_file_holes_ext3_1k: (FsType::Ext3, 1024),
    block_status_describes_file_holes_ext3_4k: (FsType::Ext3, 4096),
    block_status_describes_file_holes_ext4_1k: (FsType::Ext4, 1024),
    block_status_describes_file_holes_ext4_4k: (FsType::Ext4, 4096),
    block_status_describes_file_holes_ext2_2k: (FsType::Ext2, 2048),
    block_status_describes_file_holes_ext4_64k: (FsType::Ext4, 65536),
);

layout_tests!(check_small_reads =>
    small_reads_at_odd_offsets_ext2_1k: (FsType::Ext2, 1024),
    small_reads_at_odd_offsets_ext2_4k: (FsType::Ext2, 4096),
    small_reads_at_odd_offsets_ext3_1k: (FsType::Ext3, 1024),
    small_reads_at_odd_offsets_ext3_4k: (FsType::Ext3, 4096),
    small_reads_at_odd_offsets_ext4_1k: (FsType::Ext4, 1024),
    small_reads_at_odd_offsets_ext4_4k: (FsType::Ext4, 4096),
);

/// The premise of the sparse tests: `mke2fs -d` keeps the source file's holes.
#[test]
fn mke2fs_keeps_source_holes() {
    for (fs, block_size) in [(FsType::Ext4, 4096), (FsType::Ext2, 1024)] {
        let dir = TestDir::new("mke2fs_keeps_source_holes");
        let (image, sparse, _) = sparse_image(&dir, fs, block_size, 7);
        let data_bytes: u64 = sparse.pieces.iter().map(|(_, d)| d.len() as u64).sum();
        let blocks = debugfs_blocks(&image, "/sparse.bin").len() as u64;
        // Data blocks (two partial blocks each side at most) plus a few mapping blocks.
        let max_blocks = data_bytes / block_size as u64 + 4 + 8;
        assert!(
            blocks <= max_blocks,
            "{fs:?}/{block_size}: /sparse.bin uses {blocks} blocks, expected at most {max_blocks}: not sparse"
        );
        assert_bytes_eq(
            &debugfs_dump(&image, "/sparse.bin"),
            &sparse.contents(),
            "debugfs dump",
        );
    }
}

/// qemu works in 512-byte sectors: its output is the file padded with zeros to a
/// multiple of 512.
fn assert_qemu_output(output: &[u8], expected: &[u8]) {
    let padded_len = expected.len().div_ceil(512) * 512;
    assert_eq!(output.len(), padded_len, "qemu-img output length");
    assert_bytes_eq(
        &output[..expected.len()],
        expected,
        "qemu-img convert output",
    );
    assert!(
        output[expected.len()..].iter().all(|&b| b == 0),
        "qemu-img padding is not zeros"
    );
}

/// `qemu-img convert` (which also uses block status) of a dense file.
#[test]
fn qemu_img_convert_dense_exact() {
    let dir = TestDir::new("qemu_img_convert_dense_exact");
    let (image, content) = dense_image(&dir, FsType::Ext3, 1024, 11);
    let out = dir.join("out.raw");
    nbdkit_run(
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/data/file.bin"],
        &format!(
            "qemu-img convert -f raw -O raw \"$uri\" {}",
            shell_quote(out.to_str().unwrap())
        ),
    )
    .assert_success();
    assert_qemu_output(&read_file(&out), &content);
}

/// `qemu-img convert` of a sparse file.
#[test]
fn qemu_img_convert_sparse_exact() {
    let dir = TestDir::new("qemu_img_convert_sparse_exact");
    let (image, sparse, _) = sparse_image(&dir, FsType::Ext4, 4096, 12);
    let out = dir.join("out.raw");
    nbdkit_run(
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/sparse.bin"],
        &format!(
            "qemu-img convert -f raw -O raw \"$uri\" {}",
            shell_quote(out.to_str().unwrap())
        ),
    )
    .assert_success();
    assert_qemu_output(&read_file(&out), &sparse.contents());
}

/// The export size is the inode's byte size, not rounded to blocks or sectors.
#[test]
fn size_is_exact_file_size() {
    let dir = TestDir::new("size_is_exact_file_size");
    let content = random_bytes(13, 1_000_001);
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/odd.bin", &content)
        .build(&dir, "fs.img");
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/odd.bin"],
    );
    let size = run("nbdinfo", &["--size", &server.uri()]);
    size.assert_success();
    assert_eq!(size.stdout_text().trim(), "1000001");
    let json = run("nbdinfo", &["--json", &server.uri()]);
    json.assert_success();
    assert!(
        json.stdout_text().contains("\"export-size\": 1000001"),
        "nbdinfo --json: {}",
        json.stdout_text()
    );
    assert_eq!(
        nbd_pread(&server.uri(), 1_000_000, 1),
        vec![content[1_000_000]]
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &content,
        "nbdcopy of /odd.bin",
    );
}

/// An empty file is an export of size 0.
#[test]
fn empty_file_has_size_zero() {
    let dir = TestDir::new("empty_file_has_size_zero");
    let image = ImageBuilder::new(FsType::Ext2)
        .file("/empty", b"")
        .build(&dir, "fs.img");
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/empty"],
    );
    assert_eq!(nbd_size(&server.uri()), 0);
}

fn nbdinfo_description(uri: &str) -> Option<String> {
    let json = run("nbdinfo", &["--json", uri]);
    json.assert_success();
    let text = json.stdout_text();
    let key = "\"description\": \"";
    let start = text.find(key)? + key.len();
    let end = start + text[start..].find("\",\n").expect("end of description");
    Some(text[start..end].to_string())
}

/// The description wraps the plugin's: "embedded '/FILE' from within ext2 image: DESC".
#[test]
fn export_description_wraps_plugin_description() {
    let dir = TestDir::new("export_description_wraps_plugin_description");
    let image = ImageBuilder::new(FsType::Ext2)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let server = Server::start(
        &dir,
        &[],
        &[
            "--filter=exportname",
            "file",
            image.to_str().unwrap(),
            "ext2file=/hello.txt",
            "exportdesc=fixed:a disk image",
        ],
    );
    assert_eq!(
        nbdinfo_description(&server.uri()).as_deref(),
        Some("embedded '/hello.txt' from within ext2 image: a disk image")
    );
}

/// The file plugin has no description, so neither has the export (as the C filter).
#[test]
fn export_description_absent_when_plugin_has_none() {
    let dir = TestDir::new("export_description_absent_when_plugin_has_none");
    let image = ImageBuilder::new(FsType::Ext2)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/hello.txt"],
    );
    assert_eq!(nbdinfo_description(&server.uri()), None);
}

/// Blocks preallocated with fallocate on ext4 are unwritten (uninit) extents: they must
/// read as zeros even though the disk blocks hold old data of a deleted file, and block
/// status must not report that old data.
#[test]
fn unwritten_extents_read_as_zeros() {
    let dir = TestDir::new("unwritten_extents_read_as_zeros");
    let image = unwritten_extent_image(&dir);
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/prealloc"],
    );
    let zeros = vec![0u8; 409_600];
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, 409_600),
        &zeros,
        "pread of unwritten extent",
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &zeros,
        "nbdcopy of unwritten extent",
    );
    let extents = nbd_block_status(&server.uri());
    assert_extents_describe_file(&extents, &zeros, &[]);
}

/// ext4 inline data: a tiny file stored inside its inode.
#[test]
fn inline_data_file_reads_exactly() {
    let dir = TestDir::new("inline_data_file_reads_exactly");
    let content = b"tiny file kept in the inode".to_vec();
    let image = ImageBuilder::new(FsType::Ext4)
        .mkfs_option("-O")
        .mkfs_option("inline_data")
        .file("/tiny", &content)
        .build(&dir, "fs.img");
    assert!(
        debugfs(&image, "stat /tiny").contains("Size of inline data"),
        "test premise: /tiny should be inline"
    );
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/tiny"],
    );
    assert_eq!(nbd_size(&server.uri()), content.len() as u64);
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, content.len()),
        &content,
        "pread",
    );
    assert_bytes_eq(&nbdcopy_read(&server.uri(), &dir, &[]), &content, "nbdcopy");
}

fn symlink_image(dir: &TestDir, content: &[u8]) -> std::path::PathBuf {
    ImageBuilder::new(FsType::Ext4)
        .file("/real/target.bin", content)
        .symlink("/relative-link", "real/target.bin")
        .symlink("/absolute-link", "/real/target.bin")
        .symlink("/dirlink", "real")
        .symlink("/chain", "relative-link")
        .build(dir, "fs.img")
}

/// `ext2file=` naming a symlink serves the file it points to (relative, absolute,
/// chained, and through a symlinked directory).
#[test]
fn symlinks_in_ext2file_are_followed() {
    let dir = TestDir::new("symlinks_in_ext2file_are_followed");
    let content = random_bytes(21, 70_001);
    let image = symlink_image(&dir, &content);
    for path in [
        "/relative-link",
        "/absolute-link",
        "/dirlink/target.bin",
        "/chain",
    ] {
        let out = nbdkit_run(
            &[],
            &["file", image.to_str().unwrap(), &format!("ext2file={path}")],
            "nbdcopy \"$uri\" -",
        );
        out.assert_success();
        assert_bytes_eq(&out.stdout, &content, &format!("nbdcopy of {path}"));
    }
}

/// Export names naming symlinks are followed too.
#[test]
fn symlinks_in_export_names_are_followed() {
    let dir = TestDir::new("symlinks_in_export_names_are_followed");
    let content = random_bytes(22, 5_000);
    let image = symlink_image(&dir, &content);
    let server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    for name in ["/relative-link", "absolute-link", "/dirlink/target.bin"] {
        assert_bytes_eq(
            &nbd_pread(&server.export_uri(name), 0, content.len()),
            &content,
            name,
        );
    }
}

/// Data moves in one plugin request per contiguous run of blocks, not one per block:
/// a 2 MiB read (and write) of a freshly written file costs about as many plugin calls
/// as the file has data runs (counted by the eval plugin's call log).
fn check_io_is_coalesced(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let content = random_bytes(seed_from(name), 2 * MIB as usize);
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(16 * MIB)
        .file("/disk.img", &content)
        .build(&dir, "fs.img");
    // Data runs: stretches both logically and physically contiguous.  The first read
    // of the whole file also reads its map blocks (read lazily): the counts are of
    // data requests, taken after it.
    let mapping = debugfs_mapping(&image, "/disk.img");
    let runs = 1 + mapping
        .windows(2)
        .filter(|w| {
            w[1].logical != w[0].logical + w[0].count || w[1].physical != w[0].physical + w[0].count
        })
        .count();
    let log = dir.join("calls.log");
    let mut plugin_args = eval_plugin_args(&image, &log);
    plugin_args.push("ext2file=/disk.img".to_string());
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &[], &plugin_args);
    let script = format!(
        "import sys\n\
         expected = sys.stdin.buffer.read()\n\
         def calls(kind):\n\
         \x20   return sum(1 for l in open({log:?}).read().splitlines() if l.split()[0] == kind)\n\
         h.pread(len(expected), 0)\n\
         before = calls('pread')\n\
         assert h.pread(len(expected), 0) == expected, 'wrong bytes'\n\
         print(calls('pread') - before)\n\
         before = calls('pwrite')\n\
         h.pwrite(expected[::-1], 0)\n\
         print(calls('pwrite') - before)\n\
         assert h.pread(len(expected), 0) == expected[::-1], 'wrong bytes after write'\n",
        log = log.to_str().unwrap()
    );
    let out = nbdsh(&server.uri(), &script, &content);
    out.assert_success();
    // A clean exit lets the plugin's scripts finish before the directory is removed.
    server.stop();
    let counts: Vec<usize> = out
        .stdout_text()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let limit = runs + 8;
    assert!(
        counts[0] <= limit,
        "a 2 MiB read took {} plugin preads for a file in {runs} data runs",
        counts[0]
    );
    assert!(
        counts[1] <= limit,
        "a 2 MiB write took {} plugin pwrites for a file in {runs} data runs",
        counts[1]
    );
}

#[test]
fn io_is_coalesced_ext4_4k() {
    check_io_is_coalesced(FsType::Ext4, 4096, "io_is_coalesced_ext4_4k");
}

#[test]
fn io_is_coalesced_ext2_1k() {
    check_io_is_coalesced(FsType::Ext2, 1024, "io_is_coalesced_ext2_1k");
}

/// Blocks allocated past the end of the file (fallocate beyond i_size) are not part of
/// the export: the size stays the inode's, reads, block status and a write of the last
/// byte stay inside it.
#[test]
fn blocks_allocated_past_eof_are_ignored() {
    let dir = TestDir::new("blocks_allocated_past_eof_are_ignored");
    let content = random_bytes(23, 100 * 1024 + 3);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .file("/f", &content)
        .build(&dir, "fs.img");
    debugfs_write(&image, &["fallocate /f 0 299".to_string()]);
    let mapped: u64 = debugfs_mapping(&image, "/f").iter().map(|r| r.count).sum();
    assert!(
        mapped >= 300,
        "test premise: blocks past EOF should be allocated ({mapped})"
    );
    e2fsck_clean(&image);
    let mut server = Server::start(&dir, &[], &["file", image.to_str().unwrap(), "ext2file=/f"]);
    assert_eq!(nbd_size(&server.uri()), content.len() as u64);
    assert_bytes_eq(&nbdcopy_read(&server.uri(), &dir, &[]), &content, "nbdcopy");
    let extents = nbd_block_status(&server.uri());
    assert_extents_describe_file(&extents, &content, &[]);
    nbd_pwrite(&server.uri(), content.len() as u64 - 1, b"\xee");
    server.stop();
    let mut expected = content.clone();
    *expected.last_mut().unwrap() = 0xee;
    assert_bytes_eq(&debugfs_dump(&image, "/f"), &expected, "debugfs dump");
    e2fsck_clean(&image);
}
