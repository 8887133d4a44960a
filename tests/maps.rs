//! What clients that read a map see: `nbdinfo --map` and `qemu-img map` show the
//! served file's own holes (not the image's), and an image with read-only-compat
//! features libext2fs cannot write is served read-only, unchanged, with a message.

mod common;

use common::*;

const KIB: u64 = 1024;

/// A 4 MiB file: data at 1 MiB (100,000 bytes) and at 3 MiB (5,000 bytes), holes
/// elsewhere.  Returns the image and the file's bytes.
fn sparse_image(dir: &TestDir, block_size: u32) -> (std::path::PathBuf, Vec<u8>) {
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![
            (MIB, random_bytes(301, 100_000)),
            (3 * MIB, random_bytes(302, 5_000)),
        ],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(block_size)
        .size(32 * MIB)
        .sparse_file("/sparse", &sparse)
        // Image data after the file, so the image's own map is not the file's.
        .file("/after", &random_bytes(303, 2 * MIB as usize))
        .build(dir, "fs.img");
    (image, sparse.contents())
}

/// Whether every byte of `range` is described as data by `runs` of
/// (start, length, is_data).
fn all_data(runs: &[(u64, u64, bool)], range: std::ops::Range<u64>) -> bool {
    range.clone().step_by(512).all(|at| {
        runs.iter()
            .any(|&(start, len, data)| data && (start..start + len).contains(&at))
    })
}

fn no_data(runs: &[(u64, u64, bool)], range: std::ops::Range<u64>) -> bool {
    range.clone().step_by(512).all(|at| {
        runs.iter()
            .any(|&(start, len, data)| !data && (start..start + len).contains(&at))
    })
}

/// The expected shape for `sparse_image` with blocks of `bs` bytes.
fn check_shape(runs: &[(u64, u64, bool)], bs: u64, what: &str) {
    let covered: u64 = runs.iter().map(|r| r.1).sum();
    assert_eq!(
        covered,
        4 * MIB,
        "{what}: the map covers the file: {runs:?}"
    );
    let round_up = |x: u64| x.div_ceil(bs) * bs;
    assert!(no_data(runs, 0..MIB), "{what}: the leading hole: {runs:?}");
    assert!(
        all_data(runs, MIB..MIB + 100_000),
        "{what}: the first data: {runs:?}"
    );
    assert!(
        no_data(runs, round_up(MIB + 100_000)..3 * MIB),
        "{what}: the middle hole: {runs:?}"
    );
    assert!(
        all_data(runs, 3 * MIB..3 * MIB + 5_000),
        "{what}: the second data: {runs:?}"
    );
    assert!(
        no_data(runs, round_up(3 * MIB + 5_000)..4 * MIB),
        "{what}: the trailing hole: {runs:?}"
    );
}

#[test]
fn nbdinfo_map_shows_the_files_holes() {
    for bs in [1024u32, 4096] {
        let dir = TestDir::new(&format!("nbdinfo_map_{bs}"));
        let (image, _) = sparse_image(&dir, bs);
        let out = nbdkit_run(
            &["-r"],
            &["file", image.to_str().unwrap(), "ext2file=/sparse"],
            "nbdinfo --map \"$uri\"",
        );
        out.assert_success();
        // Lines: OFFSET LENGTH TYPE DESCRIPTION, type bit 0 = hole.
        let runs: Vec<(u64, u64, bool)> = out
            .stdout_text()
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                Some((
                    f.first()?.parse().ok()?,
                    f.get(1)?.parse().ok()?,
                    f.get(2)?.parse::<u32>().ok()? & 1 == 0,
                ))
            })
            .collect();
        check_shape(
            &runs,
            u64::from(bs),
            &format!("nbdinfo --map, {bs}-byte blocks"),
        );
    }
}

#[test]
fn qemu_img_map_shows_the_files_holes() {
    let dir = TestDir::new("qemu_img_map");
    let (image, _) = sparse_image(&dir, 4096);
    let out = nbdkit_run(
        &["-r"],
        &["file", image.to_str().unwrap(), "ext2file=/sparse"],
        "qemu-img map --output=json \"$uri\" | /usr/bin/python3 -c \
         'import json,sys; [print(e[\"start\"], e[\"length\"], int(e[\"data\"])) for e in json.load(sys.stdin)]'",
    );
    out.assert_success();
    let runs: Vec<(u64, u64, bool)> = out
        .stdout_text()
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                *f.get(2)? == "1",
            ))
        })
        .collect();
    check_shape(&runs, 4 * KIB, "qemu-img map");
}

#[test]
fn sparse_copy_with_block_status_is_exact_and_sparse() {
    let dir = TestDir::new("sparse_copy_is_sparse");
    let (image, contents) = sparse_image(&dir, 4096);
    let out_path = dir.join("copy.img");
    let out = nbdkit_run(
        &["-r"],
        &["file", image.to_str().unwrap(), "ext2file=/sparse"],
        &format!(
            "nbdcopy \"$uri\" {}",
            shell_quote(out_path.to_str().unwrap())
        ),
    );
    out.assert_success();
    assert_bytes_eq(
        &read_file(&out_path),
        &contents,
        "nbdcopy with block status",
    );
    // The copy keeps the holes: far fewer bytes allocated than its size.
    let stat = run("stat", &["-c", "%b %B", out_path.to_str().unwrap()]);
    stat.assert_success();
    let text = stat.stdout_text();
    let f: Vec<u64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let allocated = f[0] * f[1];
    assert!(
        allocated < 1024 * KIB,
        "the copy is not sparse: {allocated} bytes allocated"
    );
}

#[test]
fn read_only_compat_features_serve_read_only() {
    let dir = TestDir::new("ro_compat_features");
    let content = random_bytes(304, 300_000);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .file("/f", &content)
        .build(&dir, "fs.img");
    // REPLICA is a read-only-compat feature the kernel does not write.
    debugfs_write(&image, &["feature replica".to_string()]);
    let before = read_file(&image);
    let copy = dir.join("copy");
    let out = nbdkit_run(
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/f"],
        &format!(
            "nbdsh -u \"$uri\" -c 'print(h.is_read_only()); h.flush()' && nbdcopy \"$uri\" {}",
            shell_quote(copy.to_str().unwrap())
        ),
    );
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "True", "the export is read-only");
    assert!(
        out.stderr
            .contains("the ro_compat feature replica, which the kernel mounts read-only")
            && out.stderr.contains("serving read-only"),
        "the reason, naming the feature, is logged: {}",
        out.stderr
    );
    assert_bytes_eq(&read_file(&copy), &content, "reads");
    assert_bytes_eq(&read_file(&image), &before, "the image after serving");
}
