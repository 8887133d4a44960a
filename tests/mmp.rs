//! Multi-mount protection (`mke2fs -O mmp`): a writable server runs the kernel's
//! protocol through the plugin, so writes work, a second writable server on the same
//! image is refused (naming the node that holds it) while the first runs, and the MMP
//! block reads clean once the first has shut down.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// debugfs's `dump_mmp`: (sequence, node name).
fn mmp_state(image: &Path) -> (String, String) {
    let text = debugfs(image, "dump_mmp");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in dump_mmp:\n{text}"))
    };
    (field("sequence:"), field("node_name:"))
}

const CLEAN: &str = "ff4d4d50";

fn mmp_image(dir: &TestDir, block_size: u32, content: &[u8]) -> std::path::PathBuf {
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(block_size)
        .size(16 * MIB)
        .mkfs_option("-O")
        .mkfs_option("mmp")
        .mkfs_option("-E")
        .mkfs_option("mmp_update_interval=1")
        .sparse_file(
            "/disk",
            &SparseFile {
                len: 4 * MIB,
                pieces: vec![(0, content.to_vec())],
            },
        )
        .build(dir, &format!("mmp-{block_size}.img"));
    assert_eq!(
        mmp_state(&image).0,
        CLEAN,
        "test premise: a clean MMP block"
    );
    image
}

fn hostname() -> String {
    run("hostname", &[]).stdout_text().trim().to_string()
}

#[test]
fn writes_work_a_second_writer_is_refused_and_the_block_ends_clean() {
    let dir = TestDir::new("mmp_two_writers");
    let content = random_bytes(800, 100_000);
    let image = mmp_image(&dir, 4096, &content);
    let args = ["file", image.to_str().unwrap(), "ext2file=/disk"];
    let mut first = Server::start(&dir, &[], &args);
    let patch = random_bytes(801, 300_000);
    // Into the file's data and into its hole.
    nbd_pwrite_many(
        &first.uri(),
        &[(5000, patch[..50_000].to_vec()), (2 * MIB, patch.clone())],
        WriteFlush::Flush,
    );
    let (seq, node) = mmp_state(&image);
    assert_ne!(seq, CLEAN, "the first server holds the MMP block");
    assert_eq!(node, hostname());

    let mut second = Server::start(&dir, &[], &args);
    let started = Instant::now();
    let out = nbdsh(&second.uri(), "h.pwrite(b'y' * 4096, 0)\nh.flush()", &[]);
    assert!(!out.success(), "the second writer is refused");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "the refusal comes after watching the block ({:?})",
        started.elapsed()
    );
    let log = second.log();
    assert!(
        log.contains("already active on another node") && log.contains(&hostname()),
        "the message names the node holding it:\n{log}"
    );
    // The first keeps serving and writing.
    nbd_pwrite(&first.uri(), 3 * MIB, b"still mine");
    second.stop();
    first.stop();
    assert_eq!(
        mmp_state(&image).0,
        CLEAN,
        "the block is clean after shutdown"
    );
    e2fsck_clean(&image);
    let mut expected = content.clone();
    expected.resize(4 * MIB as usize, 0);
    expected[5000..55_000].copy_from_slice(&patch[..50_000]);
    expected[2 * MIB as usize..2 * MIB as usize + patch.len()].copy_from_slice(&patch);
    expected[3 * MIB as usize..3 * MIB as usize + 10].copy_from_slice(b"still mine");
    assert_bytes_eq(
        &debugfs_dump(&image, "/disk"),
        &expected,
        "/disk after both",
    );
}

#[test]
fn a_read_only_server_leaves_the_block_alone() {
    let dir = TestDir::new("mmp_read_only");
    let content = random_bytes(802, 100_000);
    let image = mmp_image(&dir, 1024, &content);
    let before = read_file(&image);
    let mut server = Server::start(
        &dir,
        &["-r"],
        &["file", image.to_str().unwrap(), "ext2file=/disk"],
    );
    assert_bytes_eq(
        &nbd_pread(&server.uri(), 0, content.len()),
        &content,
        "reads under -r",
    );
    server.stop();
    assert_bytes_eq(&read_file(&image), &before, "the image after -r");
}

#[test]
fn writes_work_on_1k_blocks_and_the_block_ends_clean() {
    let dir = TestDir::new("mmp_1k");
    let content = random_bytes(803, 10_000);
    let image = mmp_image(&dir, 1024, &content);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/disk"],
    );
    let patch = random_bytes(804, 70_000);
    nbd_pwrite(&server.uri(), MIB, &patch);
    server.stop();
    assert_eq!(mmp_state(&image).0, CLEAN);
    e2fsck_clean(&image);
    assert_bytes_eq(
        &debugfs_dump(&image, "/disk")[MIB as usize..MIB as usize + patch.len()],
        &patch,
        "the write",
    );
}
