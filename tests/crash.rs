//! Crash consistency, end to end: a client writes through the real filter
//! in the real nbdkit into an image served by a recording plugin
//! (`tests/crash/recorder.py`, nbdkit's python plugin), which logs every
//! write and flush the filter sends down; from that log every crash state
//! a power cut could leave (all requests before some flush, plus any
//! subset of the blocks written after it: `crash_judge`) is rebuilt and
//! judged as a user's machine would:
//!
//! - with a journal, its replay alone (`e2fsck -E journal_only`), then
//!   `e2fsck -fn` must be clean; without one, `fsck -p` must repair it
//!   without asking, then `e2fsck -fn` must be clean;
//! - every byte the client wrote before its last completed flush (or with
//!   FUA) is there, every other byte of the served files is its old value
//!   or one the client wrote since (never a stale block), and the file
//!   nobody writes is unchanged;
//! - the kernel judges a sample too: it mounts the state (replaying the
//!   journal), the files are read back through it, then `e2fsck -fn`.
//!
//! The recording plugin can trim, so the filter's discard is on: a trimmed
//! range is unknown content, which the plugin makes garbage at once and a
//! crash state shows as it was before the trim or as that garbage (a write
//! of garbage, judged like any other write).  A trim sent before the change
//! that freed its blocks is durable, or over a block in use, shows up as a
//! file or the filesystem reading garbage.
//!
//! `EXT2FILTER_CRASH_STATES=N` samples N random subsets per epoch instead
//! of 1 (thousands of states for N around 20).

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::*;
use crash_judge::judge::{judge, judge_with_kernel, kernel_mounts, FileHistory, Recovery};
use crash_judge::{each_crash_state, Op, Rng};

/// One client request, on connection `conn`.
#[derive(Clone, Debug)]
enum Req {
    Write {
        conn: usize,
        offset: u64,
        len: usize,
        fua: bool,
    },
    /// Write zeroes; `trim` lets the filter free whole blocks.
    Zero {
        conn: usize,
        offset: u64,
        len: usize,
        trim: bool,
    },
    Trim {
        conn: usize,
        offset: u64,
        len: usize,
    },
    Flush {
        conn: usize,
    },
    /// Requests in flight together on their connections, then waited for.
    Together(Vec<Req>),
    /// A pause longer than the filter's background commit interval.
    Idle,
}

struct Served {
    path: &'static str,
    file: SparseFile,
}

struct Workload {
    name: &'static str,
    fs: FsType,
    block_size: u32,
    mkfs: &'static [&'static str],
    /// `debugfs -w` requests after mke2fs (journal checksums, unwritten
    /// extents), run as given.
    debugfs: Vec<String>,
    files: Vec<Served>,
    /// For each connection, the file (index in `files`) it serves.
    conns: Vec<usize>,
    requests: Vec<Req>,
    recovery: Recovery,
}

fn recorder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash/recorder.py")
}

/// The bytes of every write, in request order (flattening `Together`).
fn flatten(requests: &[Req]) -> Vec<&Req> {
    let mut out = Vec::new();
    for r in requests {
        match r {
            Req::Together(inner) => out.extend(flatten(inner)),
            other => out.push(other),
        }
    }
    out
}

/// The client, in Python: performs the requests with data read from
/// stdin, printing after each flush and FUA write how many requests the
/// plugin had seen.
fn client_script(w: &Workload, log: &Path) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "import nbd, os, sys, time\n\
         sock = sys.argv[1]\n\
         data = sys.stdin.buffer.read()\n\
         pos = 0\n\
         def seen():\n\
         \x20   return int(open({:?}).read())\n\
         conns = []\n",
        format!("{}.count", log.display())
    );
    for &file in &w.conns {
        let _ = writeln!(
            s,
            "h = nbd.NBD(); h.connect_uri('nbd+unix:///{}?socket=' + sock); conns.append(h)",
            w.files[file].path.trim_start_matches('/')
        );
    }
    fn emit(s: &mut String, r: &Req, indent: &str, aio: bool) {
        match r {
            Req::Write {
                conn,
                offset,
                len,
                fua,
            } => {
                let flags = if *fua { "nbd.CMD_FLAG_FUA" } else { "0" };
                if aio {
                    let _ = writeln!(
                        s,
                        "{indent}pending.append((conns[{conn}], conns[{conn}].aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[pos:pos + {len}])), {offset}))); pos += {len}"
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "{indent}conns[{conn}].pwrite(data[pos:pos + {len}], {offset}, {flags}); pos += {len}"
                    );
                    if *fua {
                        let _ = writeln!(s, "{indent}print('fua', seen(), flush=True)");
                    }
                }
            }
            Req::Zero {
                conn,
                offset,
                len,
                trim,
            } => {
                let flags = if *trim { "0" } else { "nbd.CMD_FLAG_NO_HOLE" };
                let _ = writeln!(s, "{indent}conns[{conn}].zero({len}, {offset}, {flags})");
            }
            Req::Trim { conn, offset, len } => {
                let _ = writeln!(s, "{indent}conns[{conn}].trim({len}, {offset})");
            }
            Req::Flush { conn } => {
                let _ = writeln!(s, "{indent}conns[{conn}].flush()");
                let _ = writeln!(s, "{indent}print('flush', seen(), flush=True)");
            }
            Req::Together(inner) => {
                assert!(
                    !inner
                        .iter()
                        .any(|r| matches!(r, Req::Write { fua: true, .. })),
                    "FUA writes in flight together are not modelled"
                );
                let _ = writeln!(s, "{indent}pending = []");
                for r in inner {
                    emit(s, r, indent, true);
                }
                let _ = writeln!(
                    s,
                    "{indent}for (h, cookie) in pending:\n\
                     {indent}    while not h.aio_command_completed(cookie):\n\
                     {indent}        h.poll(-1)"
                );
            }
            Req::Idle => {
                let _ = writeln!(s, "{indent}time.sleep(1.6)");
            }
        }
    }
    for r in &w.requests {
        emit(&mut s, r, "", false);
    }
    s.push_str("for h in conns:\n    h.shutdown()\n");
    s
}

/// What the recording plugin leaves in a trimmed range (`TRIMMED` in
/// `recorder.py`).
const TRIMMED: u8 = 0xdb;

/// Parses the recorder's log; a trim is a write of garbage.
fn parse_log(bytes: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'W' => {
                let offset = u64::from_le_bytes(bytes[at + 1..at + 9].try_into().unwrap());
                let len = u32::from_le_bytes(bytes[at + 9..at + 13].try_into().unwrap()) as usize;
                ops.push(Op::Write {
                    offset,
                    data: bytes[at + 13..at + 13 + len].to_vec(),
                });
                at += 13 + len;
            }
            b'T' => {
                let offset = u64::from_le_bytes(bytes[at + 1..at + 9].try_into().unwrap());
                let len = u32::from_le_bytes(bytes[at + 9..at + 13].try_into().unwrap()) as usize;
                ops.push(Op::Write {
                    offset,
                    data: vec![TRIMMED; len],
                });
                at += 13;
            }
            b'F' => {
                ops.push(Op::Flush);
                at += 1;
            }
            other => panic!("recorder log: unknown record {other:#x} at {at}"),
        }
    }
    ops
}

/// How many trims the recorder's log holds.
fn count_trims(bytes: &[u8]) -> usize {
    let mut at = 0;
    let mut trims = 0;
    while at < bytes.len() {
        let len = || u32::from_le_bytes(bytes[at + 9..at + 13].try_into().unwrap()) as usize;
        at += match bytes[at] {
            b'W' => 13 + len(),
            b'T' => {
                trims += 1;
                13
            }
            _ => 1,
        };
    }
    trims
}

/// How many random subsets of each epoch's writes to judge.
fn random_subsets() -> usize {
    std::env::var("EXT2FILTER_CRASH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Runs `w` through the filter and judges its crash states; returns how
/// many were judged.
fn judge_workload(w: &Workload) -> usize {
    if valgrind_enabled() {
        eprintln!(
            "{}: crash states are not judged under valgrind (the recording plugin is Python)",
            w.name
        );
        return 0;
    }
    let dir = TestDir::new(w.name);
    let seed = seed_from(w.name);
    let other = random_bytes(seed ^ 0x55, 200_000);
    let mut builder = ImageBuilder::new(w.fs)
        .block_size(w.block_size)
        .size(16 * MIB)
        // A deleted file leaves its bytes in free blocks: a new block that
        // showed them would be caught.
        .file("/junk", &vec![0xaa; 3 * MIB as usize])
        .file("/other", &other);
    for opt in w.mkfs {
        builder = builder.mkfs_option(opt);
    }
    for served in &w.files {
        builder = builder.sparse_file(served.path, &served.file);
    }
    let image = builder.build(&dir, "fs.img");
    let mut requests = vec!["rm /junk".to_string()];
    requests.extend(w.debugfs.iter().cloned());
    let script = dir.join("debugfs.cmds");
    std::fs::write(&script, requests.join("\n") + "\n").unwrap();
    run(
        "debugfs",
        &["-w", "-f", path_str(&script), path_str(&image)],
    )
    .assert_success();
    if w.mkfs.iter().any(|o| o.contains("quota")) {
        // debugfs's rm leaves the quota records counting /junk: e2fsck
        // brings them up to date (exit 1: it changed something).
        let out = run("e2fsck", &["-fy", path_str(&image)]);
        assert!(out.status.code() == Some(1), "e2fsck -fy: {}", out.stderr);
    }
    e2fsck_clean(&image);
    let base = read_file(&image);

    // The payloads, and each file's history as the client will see it.
    let writes = flatten(&w.requests);
    let mut payload = Vec::new();
    for (i, r) in writes.iter().enumerate() {
        if let Req::Write { len, .. } = r {
            payload.extend(random_bytes(seed + i as u64, *len));
        }
    }
    let log = dir.join("requests.log");
    let client = dir.join("client.py");
    std::fs::write(&client, client_script(w, &log)).unwrap();
    let img = path_str(&image).to_string();
    let data = dir.join("payload");
    std::fs::write(&data, &payload).unwrap();
    let file_arg = format!("file={img}");
    let log_arg = format!("log={}", log.display());
    let out = common::nbdkit_run(
        &[],
        &[
            "python",
            path_str(&recorder()),
            &file_arg,
            &log_arg,
            "ext2file=exportname",
        ],
        &format!(
            "/usr/bin/python3 {} \"$unixsocket\" < {}",
            path_str(&client),
            path_str(&data)
        ),
    );
    out.assert_success();
    let stdout = out.stdout_text();
    let mut marks = stdout.lines().map(|line| {
        let (_, n) = line.split_once(' ').expect("client output");
        n.parse::<usize>().expect("a request count")
    });
    let recorded = read_file(&log);
    let ops = parse_log(&recorded);
    let trims = count_trims(&recorded);
    if w.name.starts_with("discard") {
        assert!(trims > 0, "{}: the filter sent no trim", w.name);
    }

    let bs = u64::from(w.block_size);
    let mut histories: Vec<FileHistory> = w
        .files
        .iter()
        .map(|f| FileHistory::new(f.path, f.file.contents()))
        .collect();
    let mut pos = 0usize;
    for r in &writes {
        match r {
            Req::Write {
                conn,
                offset,
                len,
                fua,
            } => {
                let data = &payload[pos..pos + len];
                pos += len;
                let h = &mut histories[w.conns[*conn]];
                if *fua {
                    h.write_durable(*offset, data, marks.next().expect("a FUA mark"));
                } else {
                    h.write(*offset, data);
                }
            }
            Req::Zero {
                conn, offset, len, ..
            } => histories[w.conns[*conn]].write(*offset, &vec![0; *len]),
            Req::Trim { conn, offset, len } => {
                // Trim frees whole blocks, which then read as zeroes; the
                // rest of the range keeps its bytes.
                let size = w.files[w.conns[*conn]].file.len;
                let first = offset.div_ceil(bs) * bs;
                let end = if offset + *len as u64 >= size {
                    size
                } else {
                    (offset + *len as u64) / bs * bs
                };
                if end > first {
                    histories[w.conns[*conn]].write(first, &vec![0; (end - first) as usize]);
                }
            }
            Req::Flush { .. } => {
                let n = marks.next().expect("a flush mark");
                for h in &mut histories {
                    h.flush(n);
                }
            }
            Req::Together(_) | Req::Idle => {}
        }
    }
    histories.push(FileHistory::new("/other", other));

    let mut rng = Rng::new(seed);
    // Each state is a whole image written out: memory is the place for
    // them when there is some.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        shm.join(format!(
            "ext2filter-crash-{}-{}",
            std::process::id(),
            w.name
        ))
    } else {
        dir.join("states")
    };
    std::fs::create_dir_all(&scratch).unwrap();
    let _cleanup = RemoveOnDrop(scratch.clone());
    let mut kernel = 0;
    let kernel_judges = match kernel_mounts(&base, &scratch) {
        Ok(()) => true,
        Err(why) => {
            eprintln!(
                "{}: the kernel here does not mount the filesystem this workload starts \
                 from ({why}): its half of the check is skipped, e2fsck judges alone",
                w.name
            );
            false
        }
    };
    let count = each_crash_state(
        &base,
        &ops,
        bs,
        random_subsets(),
        &mut rng,
        |i, state, last| {
            if let Err(e) = judge(state, &scratch, w.recovery, &histories) {
                let keep = dir.path().with_extension("failed.img");
                let _ = std::fs::write(&keep, &state.image);
                panic!(
                    "{}: state {i} ({} requests logged): {e}\n(state kept in {})",
                    w.name,
                    ops.len(),
                    keep.display()
                );
            }
            if kernel_judges && (i % 23 == 3 || last) {
                match judge_with_kernel(state, &scratch, w.recovery, &histories) {
                    Ok(true) => kernel += 1,
                    Ok(false) => {}
                    Err(e) => panic!("{}: state {i}: {e}", w.name),
                }
            }
        },
    );
    eprintln!(
        "{}: {} requests ({trims} trims), {count} crash states judged ({kernel} by the kernel \
         too)",
        w.name,
        ops.len(),
    );
    count
}

fn sparse(len: u64, seed: u64) -> SparseFile {
    SparseFile {
        len,
        pieces: vec![
            (0, random_bytes(seed, 5000)),
            (len / 2, random_bytes(seed + 1, 70_000)),
        ],
    }
}

fn write(conn: usize, offset: u64, len: usize) -> Req {
    Req::Write {
        conn,
        offset,
        len,
        fua: false,
    }
}

/// Small and large writes into holes, flushes, a background commit, and
/// writes left unflushed at the end.
fn holes(bs: u64) -> Vec<Req> {
    let mut r = vec![
        write(0, 7, 100),
        write(0, 3 * bs + 1, 3 * bs as usize),
        write(0, 300 * 1024, 1024 * 1024 + 17),
        Req::Flush { conn: 0 },
    ];
    for i in 0..24 {
        r.push(write(0, 2 * 1024 * 1024 + i * 3 * bs + 11, bs as usize));
    }
    r.push(Req::Idle);
    r.push(write(0, 100, 20));
    r.push(write(0, 3 * 1024 * 1024, 200_000));
    r.push(Req::Flush { conn: 0 });
    r.push(write(0, 3_700_000, 9000));
    r.push(write(0, 50, 10));
    r
}

fn holes_workload(
    name: &'static str,
    fs: FsType,
    block_size: u32,
    mkfs: &'static [&'static str],
    debugfs: &[&str],
) -> Workload {
    Workload {
        name,
        fs,
        block_size,
        mkfs,
        debugfs: debugfs.iter().map(|s| s.to_string()).collect(),
        files: vec![Served {
            path: "/f",
            file: sparse(4 * MIB, 1),
        }],
        conns: vec![0],
        requests: holes(u64::from(block_size)),
        recovery: if fs == FsType::Ext2 || mkfs.contains(&"^has_journal") {
            Recovery::Preen
        } else {
            Recovery::JournalReplay
        },
    }
}

#[test]
fn holes_ext4_4k() {
    judge_workload(&holes_workload(
        "holes_ext4_4k",
        FsType::Ext4,
        4096,
        &[],
        &[],
    ));
}

#[test]
fn holes_ext4_1k_checksum_v3_64bit_journal() {
    judge_workload(&holes_workload(
        "holes_ext4_1k_csum_v3",
        FsType::Ext4,
        1024,
        &["-O", "metadata_csum,64bit"],
        &["jo -c", "jc"],
    ));
}

#[test]
fn holes_ext3_1k_indirect_blocks_checksum_v1_journal() {
    judge_workload(&holes_workload(
        "holes_ext3_1k",
        FsType::Ext3,
        1024,
        &[],
        &["jo -c", "jc"],
    ));
}

#[test]
fn holes_ext3_4k() {
    judge_workload(&holes_workload(
        "holes_ext3_4k",
        FsType::Ext3,
        4096,
        &[],
        &[],
    ));
}

#[test]
fn holes_ext2_1k() {
    judge_workload(&holes_workload(
        "holes_ext2_1k",
        FsType::Ext2,
        1024,
        &[],
        &[],
    ));
}

#[test]
fn holes_ext2_4k() {
    judge_workload(&holes_workload(
        "holes_ext2_4k",
        FsType::Ext2,
        4096,
        &[],
        &[],
    ));
}

/// Writes that convert unwritten extents (whole, partial, unaligned).
#[test]
fn unwritten_extents_ext4_4k() {
    let w = Workload {
        name: "unwritten_ext4_4k",
        fs: FsType::Ext4,
        block_size: 4096,
        mkfs: &[],
        debugfs: vec!["fallocate /u 0 511".into(), "sif /u size 2097152".into()],
        files: vec![Served {
            path: "/u",
            file: SparseFile {
                len: 2 * MIB,
                pieces: vec![],
            },
        }],
        conns: vec![0],
        requests: vec![
            write(0, 4096 * 3 + 5, 10_000),
            write(0, 4096 * 40, 4096 * 20),
            Req::Flush { conn: 0 },
            write(0, 4096 * 100 + 1, 3),
            write(0, 4096 * 200, 300_000),
            Req::Flush { conn: 0 },
            write(0, 4096 * 300 + 77, 4096),
        ],
        recovery: Recovery::JournalReplay,
    };
    judge_workload(&w);
}

/// Zero (in place, and freeing blocks) and trim, between writes.
fn zero_and_trim(name: &'static str, block_size: u32, mkfs: &'static [&'static str]) -> Workload {
    let len = 3 * MIB;
    let bs = u64::from(block_size);
    Workload {
        name,
        fs: FsType::Ext4,
        block_size,
        mkfs,
        debugfs: vec![],
        files: vec![Served {
            path: "/z",
            file: SparseFile {
                len,
                pieces: vec![(0, random_bytes(7, len as usize))],
            },
        }],
        conns: vec![0],
        requests: vec![
            Req::Zero {
                conn: 0,
                offset: 5,
                len: 3 * bs as usize,
                trim: false,
            },
            Req::Zero {
                conn: 0,
                offset: 100 * bs + 3,
                len: 50 * bs as usize,
                trim: true,
            },
            Req::Flush { conn: 0 },
            Req::Trim {
                conn: 0,
                offset: 400 * bs,
                len: 300 * bs as usize + 5,
            },
            write(0, 120 * bs, 2 * bs as usize),
            Req::Trim {
                conn: 0,
                offset: 1 << 20,
                len: 1 << 20,
            },
            Req::Flush { conn: 0 },
            write(0, (1 << 20) + 3, 5000),
            Req::Zero {
                conn: 0,
                offset: 2 << 20,
                len: 64 * 1024,
                trim: true,
            },
        ],
        recovery: if mkfs.contains(&"^has_journal") {
            Recovery::Preen
        } else {
            Recovery::JournalReplay
        },
    }
}

#[test]
fn zero_and_trim_ext4_1k() {
    judge_workload(&zero_and_trim("zero_trim_ext4_1k", 1024, &[]));
}

#[test]
fn zero_and_trim_ext4_4k_without_journal() {
    judge_workload(&zero_and_trim(
        "zero_trim_ext4_4k_nj",
        4096,
        &["-O", "^has_journal"],
    ));
}

/// Discard: large trims and zeroes that free blocks, writes that reuse the
/// freed (and trimmed) blocks at once, and trims again, in several epochs.
fn discard(name: &'static str, block_size: u32, mkfs: &'static [&'static str]) -> Workload {
    let len = 4 * MIB;
    let bs = u64::from(block_size);
    Workload {
        name,
        fs: FsType::Ext4,
        block_size,
        mkfs,
        debugfs: vec![],
        files: vec![Served {
            path: "/d",
            file: SparseFile {
                len,
                pieces: vec![(0, random_bytes(11, len as usize))],
            },
        }],
        conns: vec![0],
        requests: vec![
            Req::Trim {
                conn: 0,
                offset: MIB,
                len: MIB as usize,
            },
            write(0, MIB + 3 * bs, 40 * bs as usize),
            Req::Trim {
                conn: 0,
                offset: 3 * MIB - 7,
                len: MIB as usize / 2,
            },
            Req::Flush { conn: 0 },
            write(0, 3 * MIB + 5, 20 * bs as usize),
            Req::Zero {
                conn: 0,
                offset: 0,
                len: MIB as usize / 4,
                trim: true,
            },
            Req::Trim {
                conn: 0,
                offset: MIB,
                len: 2 * MIB as usize,
            },
            write(0, 2 * MIB, 64 * bs as usize),
            Req::Flush { conn: 0 },
            Req::Trim {
                conn: 0,
                offset: 2 * MIB + 8 * bs,
                len: 16 * bs as usize,
            },
            Req::Idle,
            write(0, 100 * bs, 3 * bs as usize),
        ],
        recovery: if mkfs.contains(&"^has_journal") {
            Recovery::Preen
        } else {
            Recovery::JournalReplay
        },
    }
}

#[test]
fn discard_ext4_4k() {
    judge_workload(&discard("discard_ext4_4k", 4096, &[]));
}

#[test]
fn discard_ext4_1k_without_journal() {
    judge_workload(&discard(
        "discard_ext4_1k_nj",
        1024,
        &["-O", "^has_journal"],
    ));
}

/// Hundreds of one-block extents: the tree grows past the inode and its
/// leaves split; then trims free blocks and whole leaves.
fn tree_growth(name: &'static str, mkfs: &'static [&'static str], recovery: Recovery) -> Workload {
    let bs = 1024u64;
    let mut requests = Vec::new();
    for i in 0..700u64 {
        requests.push(write(0, (2 * i + 1) * bs, bs as usize));
        if i == 350 {
            requests.push(Req::Flush { conn: 0 });
        }
    }
    requests.push(Req::Flush { conn: 0 });
    requests.push(Req::Trim {
        conn: 0,
        offset: 200 * bs,
        len: 400 * bs as usize,
    });
    for i in 0..30u64 {
        requests.push(write(0, (2 * i + 1602) * bs + 3, 20));
    }
    requests.push(Req::Flush { conn: 0 });
    requests.push(write(0, 1400 * bs, 5 * bs as usize));
    Workload {
        name,
        fs: FsType::Ext4,
        block_size: 1024,
        mkfs,
        debugfs: vec![],
        files: vec![Served {
            path: "/t",
            file: SparseFile {
                len: 4 * MIB,
                pieces: vec![],
            },
        }],
        conns: vec![0],
        requests,
        recovery,
    }
}

#[test]
fn extent_tree_growth_ext4_1k() {
    judge_workload(&tree_growth("tree_ext4_1k", &[], Recovery::JournalReplay));
}

#[test]
fn extent_tree_growth_ext4_1k_without_journal() {
    judge_workload(&tree_growth(
        "tree_ext4_1k_nj",
        &["-O", "^has_journal"],
        Recovery::Preen,
    ));
}

/// Two files, two connections each, writes in flight together into holes,
/// flushed from one connection.
#[test]
fn several_files_and_connections_ext4_4k() {
    let mut requests = Vec::new();
    for round in 0..4u64 {
        let mut together = Vec::new();
        for conn in 0..4 {
            for k in 0..3u64 {
                together.push(write(
                    conn,
                    (conn as u64 % 2) * MIB + round * 150_000 + k * 40_000 + 13,
                    20_000,
                ));
            }
        }
        requests.push(Req::Together(together));
        if round % 2 == 1 {
            requests.push(Req::Flush { conn: 3 });
        }
    }
    let w = Workload {
        name: "multi_ext4_4k",
        fs: FsType::Ext4,
        block_size: 4096,
        mkfs: &[],
        debugfs: vec![],
        files: vec![
            Served {
                path: "/a",
                file: sparse(2 * MIB, 11),
            },
            Served {
                path: "/b",
                file: sparse(2 * MIB, 12),
            },
        ],
        conns: vec![0, 0, 1, 1],
        requests,
        recovery: Recovery::JournalReplay,
    };
    judge_workload(&w);
}

/// FUA writes, into holes and into data, and no flush at all.
fn fua(name: &'static str, fs: FsType, recovery: Recovery) -> Workload {
    let fua_write = |offset, len| Req::Write {
        conn: 0,
        offset,
        len,
        fua: true,
    };
    Workload {
        name,
        fs,
        block_size: 4096,
        mkfs: &[],
        debugfs: vec![],
        files: vec![Served {
            path: "/f",
            file: sparse(2 * MIB, 21),
        }],
        conns: vec![0],
        requests: vec![
            fua_write(10, 100),
            fua_write(200_000, 9000),
            write(0, 400_000, 5000),
            fua_write(MIB + 5, 300),
            fua_write(MIB + 4096 * 10, 4096),
            write(0, 1_500_000, 70_000),
        ],
        recovery,
    }
}

#[test]
fn fua_writes_ext4_4k() {
    judge_workload(&fua("fua_ext4_4k", FsType::Ext4, Recovery::JournalReplay));
}

#[test]
fn fua_writes_ext2_4k() {
    judge_workload(&fua("fua_ext2_4k", FsType::Ext2, Recovery::Preen));
}

/// Removes a directory when dropped, even if the test panics.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Metadata still in memory at shutdown that cannot be committed (the
/// plugin fails every flush) is reported, not dropped silently, and the
/// image keeps what the last commit left: consistent, the file unchanged.
#[test]
fn metadata_that_cannot_be_written_at_shutdown_is_reported() {
    let dir = TestDir::new("shutdown-report");
    let sparse = sparse(2 * MIB, 31);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .sparse_file("/f", &sparse)
        .build(&dir, "fs.img");
    let trigger = dir.join("trigger");
    std::fs::write(&trigger, b"").unwrap();
    // The eval plugin over the image, whose flush fails while the trigger
    // file exists (nbdkit 1.32's error filter cannot fail flushes).
    let img = shell_quote(path_str(&image));
    let t = shell_quote(path_str(&trigger));
    let plugin = [
        "eval".to_string(),
        "open=echo handle".into(),
        format!("get_size=stat -c %s {img}"),
        format!("pread=dd if={img} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
        format!("pwrite=dd of={img} seek=$4 oflag=seek_bytes conv=notrunc status=none"),
        format!("flush=if [ -e {t} ]; then echo 'EIO injected' >&2; exit 1; fi; sync {img}"),
        "ext2file=/f".into(),
    ];
    let plugin: Vec<&str> = plugin.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &[], &plugin);
    nbd_pwrite_many(
        &server.uri(),
        &[(700_000, random_bytes(32, 10_000))],
        WriteFlush::Nothing,
    );
    server.stop();
    let log = server.log();
    assert!(
        log.contains("the last metadata changes could not be written"),
        "nothing said about the lost metadata:\n{log}"
    );
    e2fsck_clean(&image);
    let dumped = debugfs_dump(&image, "/f");
    assert_bytes_eq(&dumped, &sparse.contents(), "/f after the failed shutdown");
}

/// Quota records are metadata too: journalled with the blocks they count.
#[test]
fn holes_ext4_4k_with_quotas() {
    judge_workload(&holes_workload(
        "holes_ext4_4k_quota",
        FsType::Ext4,
        4096,
        &[
            "-O",
            "quota,project",
            "-E",
            "quotatype=usrquota:grpquota:prjquota",
        ],
        &[],
    ));
}

/// Without a journal, frees and their quota records keep `fsck -p` quiet.
#[test]
fn zero_and_trim_ext4_4k_with_quotas_without_journal() {
    judge_workload(&zero_and_trim(
        "zero_trim_ext4_4k_quota_nj",
        4096,
        &[
            "-O",
            "^has_journal",
            "-O",
            "quota",
            "-E",
            "quotatype=usrquota:grpquota",
        ],
    ));
}
