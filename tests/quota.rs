//! Quotas (`quota` with user and group files, and `project`) are kept as the kernel
//! keeps them: after writes into holes, zeroes and trims through the filter, by clients
//! of files owned by several users, groups and projects, `e2fsck -fn` is clean and
//! debugfs's `lq` shows every owner's usage changed by exactly the bytes its files
//! gained or lost (what the kernel charges: data, tree and indirect blocks, whole
//! clusters on bigalloc).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// A sparse file and its owners.
struct Owned {
    path: &'static str,
    uid: u32,
    gid: u32,
    project: u32,
}

const FILES: &[Owned] = &[
    Owned {
        path: "/alice",
        uid: 1000,
        gid: 100,
        project: 7,
    },
    Owned {
        path: "/bob",
        uid: 1001,
        gid: 100,
        project: 7,
    },
    Owned {
        path: "/carol",
        uid: 2000,
        gid: 300,
        project: 0,
    },
    Owned {
        path: "/shared/dave",
        uid: 1000,
        gid: 70_000,
        project: 9,
    },
];

const FILE_LEN: u64 = 3 * MIB;

const KINDS: [&str; 3] = ["user", "group", "project"];

/// `debugfs lq KIND`: id -> (space in bytes, inodes).
fn quota_list(image: &Path, kind: &str) -> BTreeMap<u32, (u64, u64)> {
    ext2_rs::testing::listed_quota_usage(image, kind)
}

/// The bytes a file holds on disk as the kernel counts them (`i_blocks` x 512).
fn charged_bytes(image: &Path, path: &str) -> u64 {
    let stat = debugfs(image, &format!("stat {path}"));
    let count: u64 = stat
        .split("Blockcount:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no Blockcount in debugfs stat {path}:\n{stat}"));
    // huge_file without EXT4_HUGE_FILE_FL: 512-byte units.
    count * 512
}

/// An image with user, group and project quotas whose sparse files are owned by
/// several ids, made consistent with `e2fsck -fy` (mke2fs -d leaves the quota files
/// short in 1.47.0).
fn quota_image(dir: &TestDir, block_size: u32, extra: &[&str]) -> std::path::PathBuf {
    let mut builder = ImageBuilder::new(FsType::Ext4)
        .block_size(block_size)
        .size(64 * MIB)
        .mkfs_option("-O")
        .mkfs_option("quota,project")
        .mkfs_option("-E")
        .mkfs_option("quotatype=usrquota:grpquota:prjquota");
    for option in extra {
        builder = builder.mkfs_option(option);
    }
    for (i, f) in FILES.iter().enumerate() {
        builder = builder.sparse_file(
            f.path,
            &SparseFile {
                len: FILE_LEN,
                pieces: vec![(MIB, random_bytes(500 + i as u64, 10_000))],
            },
        );
    }
    let image = builder.build(dir, "fs.img");
    let mut edits = Vec::new();
    for f in FILES {
        edits.push(format!("sif {} uid {}", f.path, f.uid));
        edits.push(format!("sif {} gid {}", f.path, f.gid));
        edits.push(format!("sif {} projid {}", f.path, f.project));
    }
    debugfs_write(&image, &edits);
    let _ = run("e2fsck", &["-fy", image.to_str().unwrap()]);
    e2fsck_clean(&image);
    image
}

/// Writes into holes (small, scattered, and a large run), zeroes with and without
/// trimming, and trims, in every file over exportname connections, then checks the
/// quota files.
fn keeps_quotas(name: &str, block_size: u32, extra: &[&str]) {
    let dir = TestDir::new(name);
    let image = quota_image(&dir, block_size, extra);
    let before: Vec<_> = KINDS.iter().map(|k| quota_list(&image, k)).collect();
    let held: Vec<u64> = FILES
        .iter()
        .map(|f| charged_bytes(&image, f.path))
        .collect();
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    for (i, f) in FILES.iter().enumerate() {
        let seed = 600 + i as u64;
        let script = format!(
            "import random\n\
             r = random.Random({seed})\n\
             for k in range(60):\n\
             \x20   off = r.randrange(0, {FILE_LEN} - 9000)\n\
             \x20   h.pwrite(bytes([k + 1]) * r.randrange(1, 9000), off)\n\
             h.pwrite(b'\\x77' * 600000, 2000000)\n\
             h.zero(300000, 2100000)\n\
             if h.can_trim():\n\
             \x20   h.trim(200000, 2300000)\n\
             \x20   h.zero(100000, 50000, nbd.CMD_FLAG_NO_HOLE)\n\
             h.flush()\n"
        );
        nbdsh(&server.export_uri(f.path), &script, &[]).assert_success();
    }
    server.stop();
    e2fsck_clean(&image);
    let mut grown: BTreeMap<(usize, u32), i64> = BTreeMap::new();
    for (f, was) in FILES.iter().zip(&held) {
        let delta = charged_bytes(&image, f.path) as i64 - *was as i64;
        assert!(delta > 0, "{name}: {} gained blocks", f.path);
        for (k, id) in [f.uid, f.gid, f.project].into_iter().enumerate() {
            *grown.entry((k, id)).or_default() += delta;
        }
    }
    for (k, kind) in KINDS.iter().enumerate() {
        let after = quota_list(&image, kind);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before[k].keys().collect::<Vec<_>>(),
            "{name}: the {kind} ids"
        );
        for (id, &(space, inodes)) in &after {
            let (was_space, was_inodes) = before[k][id];
            let expected = was_space as i64 + grown.get(&(k, *id)).copied().unwrap_or(0);
            assert_eq!(
                (space as i64, inodes),
                (expected, was_inodes),
                "{name}: {kind} {id}: usage as the kernel counts it"
            );
        }
    }
}

#[test]
fn quotas_kept_ext4_4k() {
    keeps_quotas("quotas_kept_ext4_4k", 4096, &[]);
}

#[test]
fn quotas_kept_ext4_1k() {
    keeps_quotas("quotas_kept_ext4_1k", 1024, &[]);
}

#[test]
fn quotas_kept_bigalloc() {
    keeps_quotas(
        "quotas_kept_bigalloc",
        4096,
        &["-O", "bigalloc", "-C", "16384"],
    );
}

#[test]
fn quotas_kept_without_metadata_checksums() {
    keeps_quotas(
        "quotas_kept_without_metadata_checksums",
        4096,
        &["-O", "^metadata_csum,uninit_bg"],
    );
}
