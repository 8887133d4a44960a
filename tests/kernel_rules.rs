//! Nothing the kernel would keep read-only is written, and nothing it refuses to read
//! is served: filesystems with the `read-only` or `shared_blocks` features, and
//! immutable, append-only and verity files, are served read-only (the export says so,
//! a write is refused with EPERM or EROFS, the image is byte-identical afterwards);
//! encrypted files and files with the old ext2 compression flags are refused with a
//! message saying why (with `ext2file=/PATH` nbdkit stops at start); in exportname mode
//! by the same rules, per connection.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const EPERM: i32 = 1;
const EROFS: i32 = 30;

/// Checks through `uri` that the export says read-only and that a write the client
/// sends anyway (libnbd's strict mode off) is refused by the server with EPERM or
/// EROFS; then that the file reads `expected`.
#[track_caller]
fn assert_read_only_export(uri: &str, expected: &[u8], what: &str) {
    let out = nbdsh(
        uri,
        "print(h.is_read_only())\n\
         h.set_strict_mode(0)\n\
         try:\n\
         \x20   h.pwrite(b'x' * 4096, 0)\n\
         \x20   print('written')\n\
         except nbd.Error as e:\n\
         \x20   print('refused', e.errnum)\n",
        &[],
    );
    out.assert_success();
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"True"),
        "{what}: the export says read-only"
    );
    assert!(
        lines.get(1) == Some(&format!("refused {EPERM}").as_str())
            || lines.get(1) == Some(&format!("refused {EROFS}").as_str()),
        "{what}: a write is refused with EPERM or EROFS: {text}"
    );
    assert_bytes_eq(&nbd_pread(uri, 0, expected.len()), expected, what);
}

/// Serves `target` of `image` on its own server, checks it read-only, stops the server
/// and checks the image did not change and the log gives `reason`.
fn assert_served_read_only(
    dir: &TestDir,
    image: &Path,
    target: &str,
    expected: &[u8],
    reason: &str,
) {
    let before = read_file(image);
    let mut server = Server::start(
        dir,
        &[],
        &[
            "file",
            image.to_str().unwrap(),
            &format!("ext2file={target}"),
        ],
    );
    assert_read_only_export(&server.uri(), expected, target);
    server.stop();
    let log = server.log();
    assert!(
        log.contains(reason),
        "{target}: the log says why ({reason:?}):\n{log}"
    );
    assert_bytes_eq(
        &read_file(image),
        &before,
        &format!("{target}: the image afterwards"),
    );
}

fn image_with_file(dir: &TestDir, fs_type: FsType, block_size: u32, content: &[u8]) -> PathBuf {
    ImageBuilder::new(fs_type)
        .block_size(block_size)
        .size(16 * MIB)
        .file("/f", content)
        .build(dir, &format!("fs-{block_size}.img"))
}

#[test]
fn the_read_only_feature_is_served_read_only() {
    let dir = TestDir::new("read_only_feature");
    for block_size in [1024, 4096] {
        let content = random_bytes(700 + u64::from(block_size), 300_000);
        let image = image_with_file(&dir, FsType::Ext4, block_size, &content);
        run("tune2fs", &["-O", "read-only", image.to_str().unwrap()]).assert_success();
        assert_served_read_only(&dir, &image, "/f", &content, "the read-only feature");
    }
}

#[test]
fn shared_blocks_are_served_read_only() {
    let dir = TestDir::new("shared_blocks");
    for (fs_type, block_size) in [(FsType::Ext2, 1024), (FsType::Ext4, 4096)] {
        let a = random_bytes(710, 3 * block_size as usize);
        let b = random_bytes(711, 3 * block_size as usize);
        let image = ImageBuilder::new(fs_type)
            .block_size(block_size)
            .size(16 * MIB)
            .file("/a", &a)
            .file("/b", &b)
            .build(&dir, &format!("shared-{}.img", fs_type.name()));
        // /b's first block becomes /a's first block, as a reflink would share it.
        let shared = debugfs_blocks(&image, "/a")[0];
        let edit = if fs_type == FsType::Ext2 {
            format!("sif /b block[0] {shared}")
        } else {
            // One extent, whose start (ee_start_lo) is i_block[5], after the
            // extent header and the entry's logical block and length.
            assert_eq!(debugfs_mapping(&image, "/b").len(), 1);
            format!("sif /b block[5] {shared}")
        };
        debugfs_write(&image, &[edit, "feature shared_blocks".to_string()]);
        // Block-mapped: /b's first block is /a's; extents: /b's one extent now
        // starts at /a's first block, so /b is /a.
        let mut b_now = if fs_type == FsType::Ext2 {
            b.clone()
        } else {
            a.clone()
        };
        b_now[..block_size as usize].copy_from_slice(&a[..block_size as usize]);
        assert_bytes_eq(
            &debugfs_dump(&image, "/b"),
            &b_now,
            "test premise: /b shares a block",
        );
        assert_served_read_only(&dir, &image, "/a", &a, "shared_blocks");
        assert_bytes_eq(&debugfs_dump(&image, "/b"), &b_now, "/b afterwards");
    }
}

/// Inode flags, as `debugfs sif /f flags` sets them (extents kept on ext4).
const EXTENTS: u32 = 0x80000;
const IMMUTABLE: u32 = 0x10;
const APPEND: u32 = 0x20;
const VERITY: u32 = 0x100000;
const ENCRYPTED: u32 = 0x800;
const COMPRESSED_CLUSTERS: u32 = 0x200;

struct Flagged {
    path: &'static str,
    flags: u32,
    /// Served read-only with this reason, or refused (`read_only` false).
    read_only: bool,
    reason: &'static str,
}

const FLAGGED: &[Flagged] = &[
    Flagged {
        path: "/immutable",
        flags: IMMUTABLE,
        read_only: true,
        reason: "immutable",
    },
    Flagged {
        path: "/append",
        flags: APPEND,
        read_only: true,
        reason: "append-only",
    },
    Flagged {
        path: "/verity",
        flags: VERITY,
        read_only: true,
        reason: "fs-verity",
    },
    Flagged {
        path: "/encrypted",
        flags: ENCRYPTED,
        read_only: false,
        reason: "the file is encrypted",
    },
    Flagged {
        path: "/compressed",
        flags: COMPRESSED_CLUSTERS,
        read_only: false,
        reason: "old ext2 compression",
    },
];

/// An ext4 image (with the verity and encrypt features) holding one file per flag
/// and /plain, and the contents of each.
fn flagged_image(dir: &TestDir, block_size: u32) -> (PathBuf, Vec<Vec<u8>>, Vec<u8>) {
    let mut builder = ImageBuilder::new(FsType::Ext4)
        .block_size(block_size)
        .size(16 * MIB)
        .mkfs_option("-O")
        .mkfs_option("verity,encrypt");
    let contents: Vec<Vec<u8>> = (0..FLAGGED.len())
        .map(|i| random_bytes(720 + i as u64, 200_000))
        .collect();
    for (f, content) in FLAGGED.iter().zip(&contents) {
        builder = builder.file(f.path, content);
    }
    let plain = random_bytes(730, 200_000);
    let image = builder
        .file("/plain", &plain)
        .build(dir, &format!("flags-{block_size}.img"));
    let edits: Vec<String> = FLAGGED
        .iter()
        .map(|f| format!("sif {} flags {:#x}", f.path, f.flags | EXTENTS))
        .collect();
    debugfs_write(&image, &edits);
    (image, contents, plain)
}

#[test]
fn file_flags_decide_read_only_or_refused() {
    let dir = TestDir::new("file_flags");
    for block_size in [1024, 4096] {
        let (image, contents, _) = flagged_image(&dir, block_size);
        for (f, content) in FLAGGED.iter().zip(&contents) {
            if f.read_only {
                assert_served_read_only(&dir, &image, f.path, content, f.reason);
                continue;
            }
            // Refused like a path that is not a regular file: nbdkit stops at
            // start, before any client, with the message.
            let before = read_file(&image);
            let out = nbdkit_start_failure(
                &dir,
                &[],
                &[
                    "file",
                    image.to_str().unwrap(),
                    &format!("ext2file={}", f.path),
                ],
            );
            assert_stopped_at_start(&out, f.reason);
            assert_bytes_eq(&read_file(&image), &before, f.path);
        }
    }
}

#[test]
fn exportname_mode_serves_by_the_same_rules() {
    let dir = TestDir::new("file_flags_exportname");
    let (image, contents, plain) = flagged_image(&dir, 4096);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    // The list marks nothing special: every regular file is listed.
    let list = python(
        &format!(
            "import nbd\n\
             h = nbd.NBD()\n\
             h.set_opt_mode(True)\n\
             h.connect_uri({:?})\n\
             h.opt_list(lambda name, description: print(name, '|', description))\n\
             h.opt_abort()\n",
            server.uri()
        ),
        &[],
    );
    list.assert_success();
    let listed = list.stdout_text();
    for f in FLAGGED {
        assert!(
            listed
                .lines()
                .any(|l| l == format!("{} | regular file, 200000 bytes", f.path)),
            "{} is listed like any file:\n{listed}",
            f.path
        );
    }
    for (f, content) in FLAGGED.iter().zip(&contents) {
        let uri = server.export_uri(f.path);
        if f.read_only {
            assert_read_only_export(&uri, content, f.path);
        } else {
            let out = nbdsh(&uri, "print(h.get_size())", &[]);
            assert!(!out.success(), "{}: the connection is refused", f.path);
        }
    }
    // The filesystem itself stays writable: /plain takes a write.
    let patch = random_bytes(731, 5000);
    nbd_pwrite(&server.export_uri("/plain"), 1000, &patch);
    server.stop();
    let log = server.log();
    for f in FLAGGED {
        assert!(
            log.contains(f.reason),
            "{}: the log says why:\n{log}",
            f.path
        );
    }
    for (f, content) in FLAGGED.iter().zip(&contents) {
        assert_bytes_eq(&debugfs_dump(&image, f.path), content, f.path);
    }
    let mut expected = plain;
    expected[1000..6000].copy_from_slice(&patch);
    assert_bytes_eq(&debugfs_dump(&image, "/plain"), &expected, "/plain");
}
