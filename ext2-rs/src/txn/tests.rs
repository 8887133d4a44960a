//! Crash states of real workloads, in process: real libext2fs over an
//! in-memory device that records every write and flush; every crash state
//! (see `crate::crash`) is recovered as boot would and judged by `e2fsck`
//! and `debugfs`.  `EXT2RS_CRASH_STATES=N` asks for N random subsets per
//! epoch instead of the default few.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::crash::judge::{judge, judge_with_kernel, FileHistory, Recovery};
use crate::crash::{each_crash_state, RecordingDevice, Rng};
use crate::device::BlockDevice;
use crate::extent_map::{Extent, FileMap};
use crate::fs::{Filesystem, Ino, Layout};
use crate::mapping;
use crate::testing::MemDevice;
use crate::txn::{open_read_write, Durability, Method, Transactions};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Crash states are whole images written out many times: memory is
        // the place for them when there is some.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("ext2-rs-txn-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file to put in the image: path, size, written pieces.
struct Spec {
    path: &'static str,
    len: u64,
    pieces: Vec<(u64, Vec<u8>)>,
}

/// An image made by `mke2fs -d` with `specs`, a deleted file's stale bytes
/// in its free blocks, then `debugfs -w` requests.
fn make_image(
    dir: &Path,
    mkfs: &[&str],
    size: &str,
    specs: &[Spec],
    debugfs: &[String],
) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for spec in specs {
        let mut file = vec![0u8; spec.len as usize];
        for (offset, data) in &spec.pieces {
            file[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        let path = src.join(spec.path.trim_start_matches('/'));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(spec.len).unwrap();
        use std::os::unix::fs::FileExt;
        for (offset, data) in &spec.pieces {
            f.write_all_at(data, *offset).unwrap();
        }
    }
    std::fs::write(src.join("junk"), vec![0xaa; 2 << 20]).unwrap();
    let image = dir.join("base.img");
    let mut args = vec!["-q", "-F"];
    args.extend(mkfs);
    let src_s = src.to_string_lossy().into_owned();
    let img_s = image.to_string_lossy().into_owned();
    args.extend(["-d", &src_s, &img_s, size]);
    sh("mke2fs", &args);
    let mut requests = vec!["rm /junk".to_string()];
    requests.extend(debugfs.iter().cloned());
    let script = dir.join("debugfs.cmds");
    std::fs::write(&script, requests.join("\n")).unwrap();
    sh("debugfs", &["-w", "-f", &script.to_string_lossy(), &img_s]);
    sh("e2fsck", &["-fn", &img_s]);
    std::fs::read(&image).unwrap()
}

struct Served {
    ino: Ino,
    layout: Layout,
    history: FileHistory,
    /// The file's map as the writer knows it (links may be pending), as
    /// the filter keeps one.
    map: FileMap,
}

/// A writer working as the filter does, on a recorded device.
struct Rig {
    scratch: Scratch,
    base: Vec<u8>,
    mem: Arc<MemDevice>,
    rec: Arc<RecordingDevice>,
    fs: Filesystem,
    tx: Transactions,
    bs: u64,
    files: Vec<Served>,
    /// Files that must not change.
    others: Vec<FileHistory>,
}

impl Rig {
    fn new(name: &str, mkfs: &[&str], size: &str, specs: Vec<Spec>, debugfs: &[String]) -> Rig {
        let scratch = Scratch::new(name);
        let base = make_image(&scratch.0, mkfs, size, &specs, debugfs);
        let mem = Arc::new(MemDevice::new(base.clone()));
        let rec = Arc::new(RecordingDevice::new(mem.clone()));
        let (mut fs, tx) = open_read_write(rec.clone(), None).unwrap();
        let bs = u64::from(fs.block_size());
        let mut files = Vec::new();
        let mut others = Vec::new();
        for spec in &specs {
            let ino = fs.lookup(spec.path).unwrap();
            let info = fs.inode(ino).unwrap();
            let mut initial = vec![0u8; spec.len as usize];
            for (offset, data) in &spec.pieces {
                initial[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            if spec.path.starts_with("/other") {
                others.push(FileHistory::new(spec.path, initial));
            } else {
                let extents = mapping::read_map(&mut fs, ino, info.layout).unwrap();
                files.push(Served {
                    ino,
                    layout: info.layout,
                    history: FileHistory::new(spec.path, initial),
                    map: FileMap::new(bs as u32, extents).unwrap(),
                });
            }
        }
        // Files made by debugfs requests (unwritten extents) start as zeroes.
        Rig {
            scratch,
            base,
            mem,
            rec,
            fs,
            tx,
            bs,
            files,
            others,
        }
    }

    /// The file's extent tree, with every pending link made.
    fn map(&mut self, file: usize) -> Vec<Extent> {
        let (ino, layout) = (self.files[file].ino, self.files[file].layout);
        self.tx.link_pending(&mut self.fs, ino).unwrap();
        mapping::read_map(&mut self.fs, ino, layout).unwrap()
    }

    /// Writes `data` at `offset` of file `file`: into its data in place,
    /// into holes by allocating, filling and linking in one change, into
    /// unwritten blocks by filling then marking them written.
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) {
        let bs = self.bs;
        let first = offset / bs;
        let end = (offset + data.len() as u64).div_ceil(bs);
        let map = self.files[file].map.extents().to_vec();
        let mut updates: Vec<(u64, u64, Vec<Extent>)> = Vec::new();
        let find = |block: u64| {
            map.iter()
                .find(|e| block >= e.logical && block < e.logical + e.len)
                .map(|e| (e.physical + block - e.logical, e.unwritten))
        };
        let mut block = first;
        while block < end {
            let kind = find(block);
            let mut stop = block + 1;
            while stop < end && find(stop).map(|(_, u)| u) == kind.map(|(_, u)| u) {
                if let (Some((p, _)), Some((q, _))) = (kind, find(stop)) {
                    if q != p + (stop - block) {
                        break;
                    }
                }
                stop += 1;
            }
            // The run's bytes: the write's, or zeroes (new) / old data.
            let run_start = block * bs;
            let run_end = stop * bs;
            let lo = offset.max(run_start);
            let hi = (offset + data.len() as u64).min(run_end);
            let part = &data[(lo - offset) as usize..(hi - offset) as usize];
            let (ino, layout) = (self.files[file].ino, self.files[file].layout);
            let rec = self.rec.clone();
            match kind {
                Some((physical, false)) => {
                    rec.write_at(part, physical * bs + (lo - run_start))
                        .unwrap();
                }
                Some((physical, true)) => {
                    let mut buf = vec![0u8; (run_end - run_start) as usize];
                    buf[(lo - run_start) as usize..(hi - run_start) as usize].copy_from_slice(part);
                    self.tx
                        .change(&mut self.fs, Some(ino), |fs| {
                            rec.write_at(&buf, physical * bs)
                                .map_err(crate::Error::reported)?;
                            mapping::mark_written(fs, ino, block, stop)
                        })
                        .unwrap();
                    let written = Extent {
                        logical: block,
                        physical,
                        len: stop - block,
                        unwritten: false,
                    };
                    updates.push((block, stop, vec![written]));
                }
                None => {
                    let mut buf = vec![0u8; (run_end - run_start) as usize];
                    buf[(lo - run_start) as usize..(hi - run_start) as usize].copy_from_slice(part);
                    let count = stop - block;
                    let fill =
                        |fs: &mut Filesystem, goal: u64| -> crate::Result<mapping::BlockRuns> {
                            let runs = mapping::allocate(fs, goal, count)?;
                            let mut at = 0usize;
                            for &(physical, len) in &runs {
                                let n = (len * bs) as usize;
                                rec.write_at(&buf[at..at + n], physical * bs)
                                    .map_err(crate::Error::reported)?;
                                at += n;
                            }
                            Ok(runs)
                        };
                    let runs = if layout == Layout::Extents {
                        // As the filter: linked later (at a flush).
                        self.tx
                            .fill_hole(&mut self.fs, ino, block, count, None, fill)
                            .unwrap()
                    } else {
                        self.tx
                            .change(&mut self.fs, Some(ino), |fs| {
                                let goal = mapping::goal_for(fs, ino, block)?;
                                let runs = fill(fs, goal)?;
                                mapping::link_blocks(fs, ino, layout, block, &runs, count)?;
                                Ok(runs)
                            })
                            .unwrap()
                    };
                    updates.push((block, stop, Extent::written_runs(block, &runs)));
                }
            }
            block = stop;
        }
        for (start, stop, extents) in updates {
            self.files[file].map.replace_range(start, stop, &extents);
        }
        self.files[file].history.write(offset, data);
    }

    /// Frees file blocks `start..end` (extent files), in as many changes
    /// as it takes.
    fn punch(&mut self, file: usize, start: u64, end: u64) {
        let ino = self.files[file].ino;
        let layout = self.files[file].layout;
        let mut at = start;
        while at < end {
            at = self
                .tx
                .change(&mut self.fs, Some(ino), |fs| {
                    mapping::punch(fs, ino, layout, at, end, 64)
                })
                .unwrap();
        }
        self.files[file].map.replace_range(start, end, &[]);
        let bs = self.bs as usize;
        let len = self.files[file].history.initial.len();
        let from = (start as usize * bs).min(len);
        let to = (end as usize * bs).min(len);
        self.files[file]
            .history
            .write(from as u64, &vec![0; to - from]);
    }

    /// As the filter's flush: every pending link made, then committed.
    fn flush(&mut self) {
        self.tx.link_all(&mut self.fs).unwrap();
        self.tx.commit(&mut self.fs, Durability::Home).unwrap();
        let requests = self.rec.len();
        for file in &mut self.files {
            file.history.flush(requests);
        }
    }

    fn commit(&mut self) {
        self.tx
            .commit(&mut self.fs, Durability::Recoverable)
            .unwrap();
    }

    /// Judges crash states of everything recorded; returns how many.
    fn judge_all(&self, recovery: Recovery, seed: u64) -> usize {
        let random = std::env::var("EXT2RS_CRASH_STATES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let mut rng = Rng::new(seed);
        let mut histories: Vec<FileHistory> =
            self.files.iter().map(|f| f.history.clone()).collect();
        histories.extend(self.others.iter().cloned());
        let mut kernel_checked = false;
        let ops = self.rec.ops();
        let count = each_crash_state(
            &self.base,
            &ops,
            self.bs,
            random,
            &mut rng,
            |i, state, last| {
                if let Err(e) = judge(state, &self.scratch.0, recovery, &histories) {
                    let keep = std::env::temp_dir().join("ext2-rs-failed-state.img");
                    let _ = std::fs::write(&keep, &state.image);
                    let around: Vec<String> = ops
                        .iter()
                        .enumerate()
                        .skip(state.durable.saturating_sub(12))
                        .take(30)
                        .map(|(k, op)| match op {
                            crate::crash::Op::Write { offset, data } => format!(
                                "{k}: write blocks {}+{}",
                                offset / self.bs,
                                (data.len() as u64).div_ceil(self.bs)
                            ),
                            crate::crash::Op::Flush => format!("{k}: flush"),
                        })
                        .collect();
                    panic!(
                        "state {i}: {e}\n(kept in {})\nrequests:\n{}",
                        keep.display(),
                        around.join("\n")
                    );
                }
                // The kernel judges a few: it is slower.
                if i % 29 == 5 || (!kernel_checked && last) {
                    match judge_with_kernel(state, &self.scratch.0, recovery, &histories) {
                        Ok(done) => kernel_checked |= done,
                        Err(e) => panic!("state {i}: {e}"),
                    }
                }
            },
        );
        eprintln!(
            "{}: {} requests, {count} crash states",
            self.scratch.0.display(),
            ops.len(),
        );
        count
    }
}

fn spec(path: &'static str, len: u64, pieces: Vec<(u64, Vec<u8>)>) -> Spec {
    Spec { path, len, pieces }
}

/// Scattered writes into holes (small, large, unaligned), a flush, more
/// writes, an interval commit, writes into data, a flush, and writes left
/// unflushed.
fn holes_workload(rig: &mut Rig) {
    let bs = rig.bs;
    rig.write(0, 3, &bytes(1, 100));
    rig.write(0, 5 * bs + 17, &bytes(2, 3 * bs as usize));
    rig.write(0, 200 * 1024, &bytes(3, 300 * 1024));
    rig.flush();
    for i in 0..20u64 {
        rig.write(0, 600 * 1024 + i * 2 * bs + 5, &bytes(10 + i, bs as usize));
    }
    rig.commit();
    rig.write(0, 10, &bytes(40, 50));
    rig.write(0, 1024 * 1024, &bytes(41, 64 * 1024));
    rig.flush();
    rig.write(0, 1500 * 1024, &bytes(42, 9000));
    rig.write(0, 7, &bytes(43, 10));
}

fn sparse_specs(len: u64) -> Vec<Spec> {
    vec![
        spec("/f", len, vec![(64 * 1024, bytes(99, 8192))]),
        spec("/other", 300_000, vec![(0, bytes(98, 300_000))]),
    ]
}

#[test]
fn ext4_journal_4k_writes_into_holes() {
    let mut rig = Rig::new(
        "ext4-4k",
        &["-t", "ext4", "-b", "4096"],
        "32M",
        sparse_specs(3 << 20),
        &[],
    );
    assert_eq!(rig.tx.method(), Method::Journal);
    holes_workload(&mut rig);
    let n = rig.judge_all(Recovery::JournalReplay, 1);
    eprintln!("STATES {n} ops {}", rig.rec.len());
    assert!(n > 10, "{n} states");
}

#[test]
fn ext4_journal_1k_csum_v3_64bit() {
    let mut rig = Rig::new(
        "ext4-1k-v3",
        &["-t", "ext4", "-b", "1024", "-O", "metadata_csum,64bit"],
        "32M",
        sparse_specs(3 << 20),
        &["jo -c".into(), "jc".into()],
    );
    assert_eq!(rig.tx.method(), Method::Journal);
    holes_workload(&mut rig);
    rig.judge_all(Recovery::JournalReplay, 2);
}

#[test]
fn ext3_journal_indirect_blocks() {
    let mut rig = Rig::new(
        "ext3",
        &["-t", "ext3", "-b", "1024"],
        "32M",
        sparse_specs(3 << 20),
        &[],
    );
    assert_eq!(rig.tx.method(), Method::Journal);
    holes_workload(&mut rig);
    rig.judge_all(Recovery::JournalReplay, 3);
}

#[test]
fn ext2_ordered_indirect_growth() {
    let mut rig = Rig::new(
        "ext2",
        &["-t", "ext2", "-b", "1024"],
        "32M",
        sparse_specs(3 << 20),
        &[],
    );
    assert_eq!(rig.tx.method(), Method::Ordered);
    holes_workload(&mut rig);
    rig.judge_all(Recovery::Preen, 4);
}

/// Many one-block extents: the tree grows past the inode and splits
/// leaves; then punches free blocks and whole leaves.
fn extent_growth_workload(rig: &mut Rig, extents: u64) {
    let bs = rig.bs;
    for i in 0..extents {
        rig.write(0, (i * 2 + 1) * bs, &bytes(200 + i, bs as usize));
        if i % 97 == 50 {
            rig.commit();
        }
    }
    rig.flush();
    for i in 0..40 {
        rig.write(0, (i * 2 + 2) * bs + 1, &bytes(500 + i, 10));
    }
    rig.punch(0, extents, extents + 300);
    rig.flush();
    rig.punch(0, 0, 40);
    for i in 0..30 {
        rig.write(
            0,
            (extents * 2 + 50 + i * 3) * bs,
            &bytes(700 + i, bs as usize),
        );
    }
}

#[test]
fn ext4_journal_extent_tree_growth_and_punch() {
    let mut rig = Rig::new(
        "ext4-tree",
        &["-t", "ext4", "-b", "1024"],
        "32M",
        sparse_specs(2 << 20),
        &[],
    );
    extent_growth_workload(&mut rig, 400);
    rig.judge_all(Recovery::JournalReplay, 5);
}

#[test]
fn ext4_without_journal_extent_tree_growth_and_punch() {
    let mut rig = Rig::new(
        "ext4-nojournal",
        &["-t", "ext4", "-b", "1024", "-O", "^has_journal"],
        "32M",
        sparse_specs(2 << 20),
        &[],
    );
    assert_eq!(rig.tx.method(), Method::Ordered);
    extent_growth_workload(&mut rig, 400);
    rig.judge_all(Recovery::Preen, 6);
}

fn unwritten_specs() -> Vec<Spec> {
    vec![
        spec("/f", 1 << 20, vec![]),
        spec("/other", 100_000, vec![(0, bytes(97, 100_000))]),
    ]
}

fn unwritten_workload(rig: &mut Rig) {
    let bs = rig.bs;
    rig.write(0, 3 * bs + 100, &bytes(300, 2 * bs as usize));
    rig.write(0, 20 * bs, &bytes(301, 10 * bs as usize));
    rig.flush();
    for i in 0..30 {
        rig.write(0, (40 + i * 3) * bs + 7, &bytes(310 + i, 100));
    }
    rig.flush();
    rig.write(0, 200 * bs, &bytes(350, 5 * bs as usize));
}

#[test]
fn ext4_journal_unwritten_extents() {
    let mut rig = Rig::new(
        "ext4-unwritten",
        &["-t", "ext4", "-b", "4096"],
        "32M",
        unwritten_specs(),
        &["fallocate /f 0 255".into()],
    );
    assert!(rig.map(0).iter().all(|e| e.unwritten));
    unwritten_workload(&mut rig);
    rig.judge_all(Recovery::JournalReplay, 7);
}

#[test]
fn ext4_without_journal_unwritten_extents() {
    let mut rig = Rig::new(
        "ext4-unwritten-nj",
        &["-t", "ext4", "-b", "1024", "-O", "^has_journal"],
        "32M",
        unwritten_specs(),
        &["fallocate /f 0 1023".into()],
    );
    unwritten_workload(&mut rig);
    rig.judge_all(Recovery::Preen, 8);
}

#[test]
fn clean_shutdown_leaves_a_clean_image() {
    for (mkfs, method) in [
        (&["-t", "ext4", "-b", "4096"][..], Method::Journal),
        (&["-t", "ext2", "-b", "1024"][..], Method::Ordered),
    ] {
        let mut rig = Rig::new("shutdown", mkfs, "16M", sparse_specs(1 << 20), &[]);
        assert_eq!(rig.tx.method(), method);
        rig.write(0, 5000, &bytes(1, 70_000));
        rig.tx.shutdown(&mut rig.fs).unwrap();
        let image = rig.scratch.0.join("final.img");
        std::fs::write(&image, crate::crash::final_image(&rig.base, &rig.rec.ops())).unwrap();
        let img = image.to_string_lossy().into_owned();
        let out = Command::new("dumpe2fs")
            .args(["-h", &img])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("needs_recovery"), "{mkfs:?}: {text}");
        assert!(
            text.contains("Filesystem state:         clean"),
            "{mkfs:?}: {text}"
        );
        sh("e2fsck", &["-fn", &img]);
    }
}

#[test]
fn nothing_is_written_without_a_change() {
    let rig = Rig::new(
        "untouched",
        &["-t", "ext4"],
        "16M",
        sparse_specs(1 << 20),
        &[],
    );
    let Rig {
        mut fs,
        mut tx,
        rec,
        ..
    } = rig;
    tx.commit(&mut fs, Durability::Home).unwrap();
    tx.shutdown(&mut fs).unwrap();
    drop(fs);
    assert!(
        rec.ops().iter().all(|op| *op == crate::crash::Op::Flush),
        "wrote to an image nobody changed"
    );
}

#[test]
fn a_failing_or_panicking_change_leaves_nothing() {
    let mut rig = Rig::new("undo", &["-t", "ext4"], "16M", sparse_specs(1 << 20), &[]);
    let ino = rig.files[0].ino;
    let free_before = rig.fs.super_block().s_free_blocks_count;
    let err = rig.tx.change(&mut rig.fs, Some(ino), |fs| {
        let runs = mapping::allocate(fs, 100, 10)?;
        mapping::link_blocks(fs, ino, Layout::Extents, 500, &runs, 10)?;
        Err::<(), _>(crate::Error::other(crate::Errno::EIO, "injected"))
    });
    assert!(err.is_err());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: crate::Result<()> = rig.tx.change(&mut rig.fs, Some(ino), |fs| {
            let runs = mapping::allocate(fs, 100, 10)?;
            mapping::link_blocks(fs, ino, Layout::Extents, 500, &runs, 10)?;
            panic!("injected");
        });
    }));
    assert!(panicked.is_err());
    assert!(
        rig.tx.is_empty(),
        "the failed changes left writes behind: {:?} {:?}",
        rig.tx.cache.dirty_blocks(),
        rig.tx.touched
    );
    assert_eq!(rig.fs.super_block().s_free_blocks_count, free_before);
    assert!(
        rig.map(0).iter().all(|e| e.logical < 500),
        "blocks stayed linked"
    );
    // The library still works: a good change after them commits cleanly.
    rig.write(0, 0, &bytes(5, 4096));
    rig.flush();
    rig.judge_all(Recovery::JournalReplay, 9);
}

/// Checksums are verified once, when a block comes from the device: a
/// damaged extent node a change reads for the first time fails the change,
/// and fails the next one too (a block that failed is not kept).
#[test]
fn a_damaged_extent_node_fails_the_change_that_reads_it() {
    let bs = 1024u64;
    let pieces: Vec<(u64, Vec<u8>)> = (0..200)
        .map(|i| (i * 2 * bs, bytes(i, bs as usize)))
        .collect();
    let mut rig = Rig::new(
        "csum",
        &["-t", "ext4", "-b", "1024", "-O", "metadata_csum"],
        "16M",
        vec![spec("/f", 400 * bs, pieces)],
        &[],
    );
    let ino = rig.files[0].ino;
    let inode = rig.fs.read_inode_raw(ino).unwrap();
    let root: Vec<u8> = inode.i_block.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(
        u16::from_le_bytes([root[6], root[7]]),
        1,
        "test premise: a tree of depth 1"
    );
    let leaf = super::relocate::index_leaf(&root, 0);
    // One byte of an extent entry, behind libext2fs's back.
    let at = leaf * bs + 12 + 5;
    let mut byte = [0u8; 1];
    rig.mem.read_at(&mut byte, at).unwrap();
    rig.mem.write_at(&[byte[0] ^ 0x40], at).unwrap();
    for attempt in 0..2 {
        let err = rig
            .tx
            .change(&mut rig.fs, Some(ino), |fs| {
                let runs = mapping::allocate(fs, 1000, 1)?;
                mapping::link_blocks(fs, ino, Layout::Extents, 3, &runs, 1)
            })
            .expect_err("a change through a damaged node");
        let csum = crate::sys::EXT2_ET_EXTENT_CSUM_INVALID as crate::sys::errcode_t;
        assert!(
            matches!(err, crate::Error::Ext2 { code, .. } if code.0 == csum),
            "attempt {attempt}: {err}"
        );
    }
    assert!(rig.tx.is_empty());
}

/// A journal this crate does not write (here: one holding fast commits) is
/// left alone: the writes are ordered as without a journal instead, and
/// the image stays consistent with the journal untouched.
#[test]
fn a_journal_with_fast_commits_is_left_alone() {
    let scratch = Scratch::new("fast-commit");
    let mut base = make_image(
        &scratch.0,
        &["-t", "ext4", "-b", "1024"],
        "64M",
        &sparse_specs(1 << 20),
        &[],
    );
    let mem = Arc::new(MemDevice::new(base.clone()));
    let (mut fs, _) = open_read_write(mem.clone(), None).unwrap();
    let (_, map) = crate::jbd2::locate(&mut fs).unwrap();
    drop(fs);
    let at = (map.image_block(0).unwrap() * 1024) as usize;
    let incompat = u32::from_be_bytes(base[at + 0x28..at + 0x2c].try_into().unwrap()) | 0x20;
    base[at + 0x28..at + 0x2c].copy_from_slice(&incompat.to_be_bytes());
    let journal_before = base[at..at + 1024].to_vec();
    let mem = Arc::new(MemDevice::new(base));
    let (mut fs, mut tx) = open_read_write(mem.clone(), None).unwrap();
    assert_eq!(tx.method(), Method::Ordered);
    let ino = fs.lookup("/f").unwrap();
    tx.fill_hole(&mut fs, ino, 100, 4, None, |fs, goal| {
        mapping::allocate(fs, goal, 4)
    })
    .unwrap();
    tx.commit(&mut fs, Durability::Home).unwrap();
    tx.shutdown(&mut fs).unwrap();
    drop(fs);
    let image = mem.snapshot();
    assert!(
        image[at..at + 1024] == journal_before[..],
        "the journal was written"
    );
    let path = scratch.0.join("after.img");
    std::fs::write(&path, &image).unwrap();
    sh("e2fsck", &["-fn", &path.to_string_lossy()]);
}

/// Writes into holes scattered over more leaves than one transaction may
/// hold: linking them commits whenever the transaction is full, its
/// bitmaps leaving out the blocks of what is still unlinked; every crash
/// state in between is consistent.
#[test]
fn pending_links_spread_over_transactions() {
    let bs = 1024u64;
    // 24,000 one-block extents (every other block): ~290 leaves.
    let pieces: Vec<(u64, Vec<u8>)> = (0..24_000u64)
        .map(|i| (i * 2 * bs, bytes(i % 97, bs as usize)))
        .collect();
    let mut rig = Rig::new(
        "spread",
        &["-t", "ext4", "-b", "1024", "-J", "size=1"],
        "64M",
        vec![
            spec("/f", 48_000 * bs, pieces),
            spec("/other", 5000, vec![(0, bytes(7, 5000))]),
        ],
        &[],
    );
    let threshold = rig.tx.commit_threshold();
    // One write into a hole of every leaf.
    for i in 0..290u64 {
        rig.write(0, (i * 166 + 1) * bs, &bytes(1000 + i, bs as usize));
    }
    let before = rig.tx.commits();
    rig.flush();
    assert!(
        rig.tx.commits() - before >= 2,
        "the links should take several transactions (threshold {threshold} blocks)"
    );
    rig.judge_all(Recovery::JournalReplay, 11);
}

/// A file's tree changes only when its host says so (a flush's links, a
/// change of that file): a commit, even with writes into holes waiting,
/// leaves every tree as it was and writes the waiting blocks as free, and
/// every crash state of it is consistent.  (Lazy maps read trees with no
/// library lock, holding only the file's own lock.)
#[test]
fn a_commit_changes_no_tree() {
    for (name, mkfs, recovery) in [
        (
            "commit-tree-j",
            &["-t", "ext4", "-b", "1024"][..],
            Recovery::JournalReplay,
        ),
        (
            "commit-tree-nj",
            &["-t", "ext4", "-b", "1024", "-O", "^has_journal"][..],
            Recovery::Preen,
        ),
    ] {
        let mut rig = Rig::new(name, mkfs, "16M", sparse_specs(1 << 20), &[]);
        let (ino, layout) = (rig.files[0].ino, rig.files[0].layout);
        let before = mapping::read_map(&mut rig.fs, ino, layout).unwrap();
        let inode_before = rig.fs.read_inode_raw(ino).unwrap().i_block;
        for i in 0..20u64 {
            rig.write(0, (300 + i * 7) * 1024, &bytes(60 + i, 1024));
        }
        rig.commit();
        let after = mapping::read_map(&mut rig.fs, ino, layout).unwrap();
        assert!(
            after == before,
            "{name}: the commit linked writes into holes ({} extents, {} before)",
            after.len(),
            before.len()
        );
        assert_eq!(rig.fs.read_inode_raw(ino).unwrap().i_block, inode_before);
        rig.judge_all(recovery, 12);
    }
}

/// Without a journal, a change that changes an existing extent node moves
/// it (and the nodes above it) to new blocks itself, while its host keeps
/// the tree's readers out: the commit then writes the tree as the change
/// left it, moving nothing.
#[test]
fn without_a_journal_changed_nodes_move_in_the_change() {
    let bs = 1024u64;
    let pieces: Vec<(u64, Vec<u8>)> = (0..200)
        .map(|i| (i * 2 * bs, bytes(i, bs as usize)))
        .collect();
    let mut rig = Rig::new(
        "move-in-change",
        &["-t", "ext4", "-b", "1024", "-O", "^has_journal"],
        "16M",
        vec![spec("/f", 400 * bs, pieces)],
        &[],
    );
    assert_eq!(rig.tx.method(), Method::Ordered);
    let ino = rig.files[0].ino;
    let root = |rig: &mut Rig| rig.fs.read_inode_raw(ino).unwrap().i_block;
    let on_disk = root(&mut rig);
    rig.write(0, 3 * bs, &bytes(77, bs as usize));
    rig.tx.link_pending(&mut rig.fs, ino).unwrap();
    let changed = root(&mut rig);
    assert_ne!(changed, on_disk, "the change left its leaf in place");
    rig.commit();
    assert_eq!(root(&mut rig), changed, "the commit moved nodes");
    rig.flush();
    rig.judge_all(Recovery::Preen, 13);
}
