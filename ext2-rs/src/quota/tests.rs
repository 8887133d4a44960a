//! Quotas kept through real libext2fs on images from the real mke2fs,
//! judged by the real e2fsck (which recomputes every owner's usage from the
//! inodes, as the kernel counts it) and debugfs's `lq`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::*;
use crate::fs::{Access, Filesystem, Layout};
use crate::mapping;
use crate::testing::MemDevice;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ext2-rs-quota-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (install e2fsprogs): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A sparse file of `len` bytes owned by `uid`:`gid` in project `project`,
/// with `data` bytes written at its start.
struct Owned {
    name: &'static str,
    uid: u32,
    gid: u32,
    project: u32,
    len: u64,
    data: usize,
}

const OWNED: &[Owned] = &[
    Owned {
        name: "a",
        uid: 1000,
        gid: 100,
        project: 7,
        len: 4 << 20,
        data: 5000,
    },
    Owned {
        name: "b",
        uid: 1000,
        gid: 200,
        project: 7,
        len: 4 << 20,
        data: 0,
    },
    Owned {
        name: "c",
        uid: 2001,
        gid: 100,
        project: 9,
        len: 8 << 20,
        data: 70_000,
    },
    Owned {
        name: "d",
        uid: 65_537,
        gid: 70_000,
        project: 0,
        len: 2 << 20,
        data: 0,
    },
];

/// An image with quota and project quota whose files are owned by several
/// ids, its quota files made consistent by `e2fsck -fy` (mke2fs -d leaves
/// them short).
fn quota_image(dir: &TempDir, mkfs: &[&str]) -> PathBuf {
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).unwrap();
    for f in OWNED {
        let path = root.join(f.name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(f.len).unwrap();
        if f.data > 0 {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&vec![0x5a; f.data], 0).unwrap();
        }
    }
    let image = dir.0.join("fs.img");
    let root_arg = root.to_str().unwrap();
    let image_arg = image.to_str().unwrap();
    let mut args = vec!["-q", "-F", "-O", "quota,project", "-E"];
    args.push("quotatype=usrquota:grpquota:prjquota");
    args.extend(mkfs);
    args.extend(["-d", root_arg, image_arg, "64M"]);
    let (ok, text) = run("mke2fs", &args);
    assert!(ok, "mke2fs {args:?}: {text}");
    let mut edits = Vec::new();
    for f in OWNED {
        edits.push(format!("sif /{} uid {}", f.name, f.uid));
        edits.push(format!("sif /{} gid {}", f.name, f.gid));
        edits.push(format!("sif /{} projid {}", f.name, f.project));
    }
    let script = dir.0.join("edits");
    std::fs::write(&script, edits.join("\n")).unwrap();
    let (ok, text) = run(
        "debugfs",
        &["-w", "-f", script.to_str().unwrap(), image_arg],
    );
    assert!(ok, "debugfs: {text}");
    let _ = run("e2fsck", &["-fy", image_arg]);
    assert_clean(&image, "the image as built");
    image
}

fn assert_clean(image: &Path, what: &str) {
    let (ok, text) = run("e2fsck", &["-fn", image.to_str().unwrap()]);
    assert!(ok && !text.contains("QUOTA"), "{what}: e2fsck -fn:\n{text}");
}

/// `debugfs -R 'lq KIND'`: id -> (space, inodes).
fn listed(image: &Path, kind: Kind) -> BTreeMap<u32, (u64, u64)> {
    crate::testing::listed_quota_usage(image, kind.name())
}

fn write_out(dev: &MemDevice, dir: &TempDir) -> PathBuf {
    let path = dir.0.join("after.img");
    std::fs::write(&path, dev.snapshot()).unwrap();
    path
}

fn usage(fs: &mut Filesystem, path: &str) -> (Ino, Owner, u64) {
    let ino = fs.lookup(path).unwrap();
    let (owner, bytes) = owner_and_usage(fs.handle(), ino).unwrap();
    (ino, owner, bytes)
}

/// Allocates and links `count` blocks from file block `logical`, as a
/// write into a hole does.
fn fill(fs: &mut Filesystem, ino: Ino, logical: u64, count: u64) {
    let layout = fs.inode(ino).unwrap().layout;
    let ratio = fs.cluster_ratio();
    let goal = mapping::goal_for(fs, ino, logical).unwrap();
    if ratio == 1 {
        let runs = mapping::allocate(fs, goal, count).unwrap();
        mapping::link_blocks(fs, ino, layout, logical, &runs, count).unwrap();
    } else {
        let map = mapping::read_map(fs, ino, layout).unwrap();
        let existing = |cluster: u64| {
            map.iter()
                .find(|e| {
                    e.logical / ratio <= cluster && cluster <= (e.logical + e.len - 1) / ratio
                })
                .map(|e| e.physical / ratio + (cluster - e.logical / ratio))
        };
        let (runs, new) =
            mapping::allocate_clustered(fs, logical..logical + count, existing, goal).unwrap();
        let clusters = new.iter().map(|r| r.1).sum::<u64>() / ratio;
        mapping::link_blocks(fs, ino, layout, logical, &runs, clusters).unwrap();
    }
}

/// Fills holes in every owner's files (scattered, so extent trees and
/// indirect blocks grow too), frees some again where the layout allows,
/// and checks the quota files against e2fsck and against the block counts.
fn keeps_usage(name: &str, mkfs: &[&str]) {
    let dir = TempDir::new(name);
    let image = quota_image(&dir, mkfs);
    let before: Vec<BTreeMap<u32, (u64, u64)>> = [Kind::User, Kind::Group, Kind::Project]
        .iter()
        .map(|&k| listed(&image, k))
        .collect();
    let dev = Arc::new(MemDevice::from_file(&image));
    let mut fs = Filesystem::open(dev.clone(), Access::ReadWrite).unwrap();
    assert!(fs.keeps_quotas(), "{name}: quotas are kept");
    assert_eq!(fs.quotas().unwrap().files().len(), 3);
    let bs = u64::from(fs.block_size());
    let mut grown: BTreeMap<(Kind, u32), i64> = BTreeMap::new();
    for f in OWNED {
        let path = format!("/{}", f.name);
        let (ino, owner, start) = usage(&mut fs, &path);
        assert_eq!(
            (owner.uid, owner.gid, owner.project),
            (f.uid, f.gid, f.project),
            "{name}: {path}'s owner"
        );
        let blocks = f.len / bs;
        // Every 7th run of 3 blocks: many extents, indirect blocks.
        for logical in (blocks / 4..blocks).step_by(7 * 3).take(40) {
            if logical * bs >= f.data as u64 {
                fill(&mut fs, ino, logical, 3);
            }
        }
        let layout = fs.inode(ino).unwrap().layout;
        if layout == Layout::Extents && fs.cluster_ratio() == 1 {
            mapping::punch(&mut fs, ino, layout, blocks / 2, blocks / 2 + 60, u64::MAX).unwrap();
        }
        let (_, _, end) = usage(&mut fs, &path);
        let delta = end as i64 - start as i64;
        assert!(delta > 0, "{name}: {path} grew");
        for (kind, id) in [
            (Kind::User, f.uid),
            (Kind::Group, f.gid),
            (Kind::Project, f.project),
        ] {
            *grown.entry((kind, id)).or_default() += delta;
        }
    }
    fs.flush().unwrap();
    drop(fs);
    let after = write_out(&dev, &dir);
    assert_clean(&after, name);
    for (i, kind) in [Kind::User, Kind::Group, Kind::Project]
        .into_iter()
        .enumerate()
    {
        let now = listed(&after, kind);
        for (&id, &(space, inodes)) in &now {
            let was = before[i].get(&id).copied().unwrap_or((0, 0));
            let expect = was.0 as i64 + grown.get(&(kind, id)).copied().unwrap_or(0);
            assert_eq!(
                (space as i64, inodes),
                (expect, was.1),
                "{name}: {} id {id}",
                kind.name()
            );
        }
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            before[i].keys().collect::<Vec<_>>(),
            "{name}: {} ids",
            kind.name()
        );
    }
}

#[test]
fn ext4_4k_allocations_and_frees_keep_quotas() {
    keeps_usage("ext4-4k", &["-t", "ext4", "-b", "4096"]);
}

#[test]
fn ext4_1k_allocations_and_frees_keep_quotas() {
    keeps_usage("ext4-1k", &["-t", "ext4", "-b", "1024"]);
}

#[test]
fn bigalloc_clusters_keep_quotas() {
    keeps_usage(
        "bigalloc",
        &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
    );
}

#[test]
fn block_mapped_files_keep_quotas() {
    keeps_usage("ext3", &["-t", "ext3", "-b", "1024", "-I", "256"]);
}

#[test]
fn owners_without_records_get_them_and_the_tree_grows() {
    let dir = TempDir::new("growth");
    let image = quota_image(&dir, &["-t", "ext4", "-b", "4096"]);
    let dev = Arc::new(MemDevice::from_file(&image));
    let mut fs = Filesystem::open(dev.clone(), Access::ReadWrite).unwrap();
    // Ids spread over every level of the tree; each gets a record whose
    // usage returns to zero (no inode owns it, so e2fsck expects zero).
    let ids: Vec<u32> = (0..600u32)
        .map(|i| i.wrapping_mul(0x9e37_79b9) | 1)
        .chain([5, 6, 1_000_000, u32::MAX - 1])
        .collect();
    for &id in &ids {
        let owner = Owner {
            uid: id,
            gid: id,
            project: id,
        };
        fs.with_quotas(|fs, q| q.add_space(fs, owner, 4096))
            .unwrap();
        fs.with_quotas(|fs, q| q.add_space(fs, owner, -4096))
            .unwrap();
    }
    // Known owners still count right afterwards.
    let (ino, _, _) = usage(&mut fs, "/d");
    fill(&mut fs, ino, 10, 2);
    let records = fs
        .with_quotas(|fs, q| q.records(fs, Kind::Project))
        .unwrap();
    fs.flush().unwrap();
    drop(fs);
    let after = write_out(&dev, &dir);
    assert_clean(&after, "after adding records");
    let listed_project = listed(&after, Kind::Project);
    for &id in &ids {
        assert_eq!(
            listed_project.get(&id),
            Some(&(0, 0)),
            "project id {id} has an empty record"
        );
    }
    // Our own reading of the tree agrees with debugfs's.
    let ours: BTreeMap<u32, (u64, u64)> = records.iter().map(|&(id, s, i)| (id, (s, i))).collect();
    assert_eq!(ours, listed_project);
}

#[test]
fn a_filesystem_without_quotas_keeps_none() {
    let dev = Arc::new(MemDevice::mkfs(&["-t", "ext4"], "8M"));
    let fs = Filesystem::open(dev, Access::ReadWrite).unwrap();
    assert!(!fs.keeps_quotas());
}

#[test]
fn an_unknown_quota_format_is_not_written() {
    let dir = TempDir::new("format");
    let image = quota_image(&dir, &["-t", "ext4", "-b", "4096"]);
    // Make the user quota file claim format revision 0.
    let blocks = {
        let (ok, text) = run("debugfs", &["-R", "blocks <3>", image.to_str().unwrap()]);
        assert!(ok, "{text}");
        text.split_whitespace()
            .find_map(|w| w.parse::<u64>().ok())
            .expect("a block")
    };
    let mut bytes = std::fs::read(&image).unwrap();
    let at = (blocks * 4096 + 4) as usize;
    bytes[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    let dev = Arc::new(MemDevice::new(bytes.clone()));
    let err = Filesystem::open(dev.clone(), Access::ReadWrite)
        .err()
        .expect("refused read-write");
    assert_eq!(err.errno(), Errno::EROFS);
    assert!(err.to_string().contains("revision 0"), "{err}");
    assert!(Filesystem::open(dev.clone(), Access::ReadOnly).is_ok());
    assert!(dev.snapshot() == bytes, "nothing was written");
}
