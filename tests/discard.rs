//! Discard through the real nbdkit (issue 19): an ext4 image kept as a
//! sparse file by the `file` plugin; a client trims 64 MiB of the served
//! file and the host's image file gives the space back, e2fsck is happy and
//! the range reads as zeroes.  With `ext2discard=off` it keeps its size.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

/// Bytes the host's filesystem has allocated for `path` (`stat -c %b`).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The stats filter's count of trim requests.
fn trims_in_stats(stats: &str) -> u64 {
    // "trim: 3 ops, 0.000000 s, 64.00 MiB, ..." in 1.32.
    let line = stats
        .lines()
        .find(|l| l.trim_start().starts_with("trim:"))
        .unwrap_or("trim: 0 ops");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

const FILE_LEN: u64 = 80 * MIB;
const TRIM_AT: u64 = 8 * MIB;
const TRIM_LEN: u64 = 64 * MIB;

/// Serves `/disk` (80 MiB of data) with `params`, trims 64 MiB of it
/// through nbdsh; returns how much the host image shrank, and the number
/// of trims the plugin got.
fn trim_64_mib(name: &str, params: &[&str]) -> (i64, u64) {
    let dir = TestDir::new(name);
    let content = random_bytes(19, FILE_LEN as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(4096)
        .size(128 * MIB)
        .file("/disk", &content)
        .build(&dir, "fs.img");
    let before = allocated(&image);
    let stats = dir.join("stats.txt");
    let stats_arg = format!("statsfile={}", stats.display());
    let mut args = vec![
        "--filter=stats",
        "file",
        image.to_str().unwrap(),
        "ext2file=/disk",
        &stats_arg,
    ];
    args.extend(params);
    let mut server = Server::start(&dir, &[], &args);
    let script = format!(
        "h.trim({TRIM_LEN}, {TRIM_AT})\n\
         h.flush()\n\
         assert h.pread({TRIM_LEN}, {TRIM_AT}) == bytearray({TRIM_LEN}), 'zeroes'\n\
         assert h.pread(4096, {TRIM_AT} - 4096) == sys.stdin.buffer.read(4096), 'data'\n"
    );
    let edge = &content[(TRIM_AT - 4096) as usize..TRIM_AT as usize];
    let out = nbdsh(&server.uri(), &format!("import sys\n{script}"), edge);
    out.assert_success();
    let served = allocated(&image);
    server.stop();
    let after = allocated(&image);
    assert!(
        after <= served + MIB,
        "shutdown does not grow it back ({served} -> {after})"
    );
    e2fsck_clean(&image);
    let mut expected = content;
    expected[TRIM_AT as usize..(TRIM_AT + TRIM_LEN) as usize].fill(0);
    assert_bytes_eq(&debugfs_dump(&image, "/disk"), &expected, "/disk");
    let trims = trims_in_stats(&std::fs::read_to_string(&stats).unwrap_or_default());
    eprintln!(
        "{name}: host image allocated {before} -> {served} bytes while served, {after} after \
         shutdown; {trims} trim requests reached the plugin"
    );
    (before as i64 - served as i64, trims)
}

#[test]
fn a_trim_of_64_mib_shrinks_the_sparse_host_image() {
    let (shrunk, trims) = trim_64_mib("discard_on", &[]);
    assert!(
        shrunk >= 56 * MIB as i64,
        "the host image shrank by only {shrunk} bytes"
    );
    assert!(trims >= 1, "the plugin got the trims");
}

#[test]
fn with_discard_off_the_host_image_keeps_its_blocks() {
    let (shrunk, trims) = trim_64_mib("discard_off", &["ext2discard=off"]);
    assert!(shrunk < MIB as i64, "shrank by {shrunk} bytes");
    assert_eq!(trims, 0);
}
