//! Load: 8 connections per file writing overlapping and disjoint ranges of several files
//! (allocated, sparse, all holes), zeroing and trimming, for a bounded time; then every
//! byte must read back where it belongs, and `e2fsck -fn` must be clean after a clean
//! shutdown and after a flush + `kill -9`. A full filesystem gives ENOSPC and stays
//! consistent.
//!
//! Overlapping writes race, so the check is per byte: the final value must be the last
//! value some writer wrote there (each writer's own writes are ordered), or the
//! original byte if nobody wrote it.
//!
//! Default runs take a few seconds; `EXT2FILTER_STRESS_SECS=300 cargo test --release
//! --test hardening_load -- --include-ignored` runs them (and the long variants) for
//! minutes.

mod common;
mod hardening_support;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

use common::{debugfs_dump, random_bytes, TestDir, XorShift};
use hardening_support::*;

const FILE_LEN: u64 = 3 << 20;

/// What one writer last wrote to one file.
struct Trace {
    last: Vec<u8>,
    written: Vec<bool>,
}

impl Trace {
    fn new(len: usize) -> Trace {
        Trace {
            last: vec![0; len],
            written: vec![false; len],
        }
    }
    fn set(&mut self, off: u64, data: &[u8]) {
        let at = off as usize;
        self.last[at..at + data.len()].copy_from_slice(data);
        self.written[at..at + data.len()].fill(true);
    }
}

/// Checks each byte of `actual` against the writers' traces and the original contents.
fn check(actual: &[u8], initial: &[u8], traces: &[&Trace], what: &str) -> Result<(), String> {
    if actual.len() != initial.len() {
        return Err(format!(
            "{what}: {} bytes, expected {}",
            actual.len(),
            initial.len()
        ));
    }
    let mut bad = Vec::new();
    for i in 0..actual.len() {
        let mut any = false;
        let mut ok = false;
        for t in traces {
            if t.written[i] {
                any = true;
                if t.last[i] == actual[i] {
                    ok = true;
                    break;
                }
            }
        }
        if !any {
            ok = actual[i] == initial[i];
        }
        if !ok {
            bad.push(i);
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} bytes hold a value no writer left there; first at {} (actual {:02x}, original {:02x}), last at {}",
            bad.len(),
            bad[0],
            actual[bad[0]],
            initial[bad[0]],
            bad[bad.len() - 1]
        ))
    }
}

struct Setup {
    dir: TestDir,
    image: PathBuf,
    files: Vec<(&'static str, Vec<u8>)>,
    block_size: u64,
    can_trim: bool,
}

fn setup(name: &str, ext3: bool) -> Setup {
    let dir = TestDir::new(name);
    let alloc = random_bytes(1, FILE_LEN as usize);
    let mut holes = vec![0u8; FILE_LEN as usize];
    let mut pieces = Vec::new();
    for i in 0..6u64 {
        let off = i * (FILE_LEN / 6) + 4096 * i;
        let data = random_bytes(10 + i, 50_000);
        holes[off as usize..off as usize + data.len()].copy_from_slice(&data);
        pieces.push((off, data));
    }
    let mkfs: &[&str] = if ext3 {
        &["-t", "ext3", "-b", "1024"]
    } else {
        &["-t", "ext4", "-b", "4096"]
    };
    let image = det_image(
        dir.path(),
        "fs.img",
        mkfs,
        96 * 1024,
        &[
            Item::File("/alloc", alloc.clone()),
            Item::Sparse("/holes", FILE_LEN, pieces),
            Item::Sparse("/empty", FILE_LEN, vec![]),
        ],
        &[],
    );
    Setup {
        dir,
        image,
        files: vec![
            ("/alloc", alloc),
            ("/holes", holes),
            ("/empty", vec![0; FILE_LEN as usize]),
        ],
        block_size: if ext3 { 1024 } else { 4096 },
        can_trim: !ext3,
    }
}

/// One writer: a connection to each file; random writes (anywhere: overlapping other
/// writers, or in its own stripe: disjoint), zeroes and trims until the deadline.
fn writer(
    socket: PathBuf,
    w: u64,
    writers: u64,
    setup_bs: u64,
    can_trim: bool,
    names: Vec<&'static str>,
    deadline: Instant,
) -> Result<(Vec<Trace>, u64), String> {
    let mut conns: Vec<Nbd> = names
        .iter()
        .map(|n| Nbd::connect(&socket, n.as_bytes()).map_err(|e| format!("connect {n}: {e}")))
        .collect::<Result<_, _>>()?;
    let mut traces: Vec<Trace> = names
        .iter()
        .map(|_| Trace::new(FILE_LEN as usize))
        .collect();
    let mut rng = XorShift::new(0x10ad + w);
    let mut ops = 0u64;
    let stripe = FILE_LEN / writers;
    while Instant::now() < deadline {
        let f = (rng.next_u64() % names.len() as u64) as usize;
        let nbd = &mut conns[f];
        let len = 1 + rng.next_u64() % 24_000;
        let off = if rng.next_u64() % 2 == 0 {
            rng.next_u64() % (FILE_LEN - len)
        } else {
            let s = w * stripe;
            s + rng.next_u64() % (stripe - len)
        };
        let op = rng.next_u64() % 20;
        let io = |e: std::io::Error| format!("writer {w}: the connection broke: {e}");
        let fail = |what: &str, e: u32| {
            format!(
                "writer {w}: {what} {} at {off}+{len} failed with errno {e}",
                names[f]
            )
        };
        if op < 14 {
            let data = random_bytes(rng.next_u64(), len as usize);
            let flags = if op == 0 { FLAG_FUA } else { 0 };
            nbd.write(off, &data, flags)
                .map_err(io)?
                .map_err(|e| fail("write", e))?;
            traces[f].set(off, &data);
        } else if op < 17 {
            let flags = if op == 14 { FLAG_NO_HOLE } else { 0 };
            nbd.zero(off, len as u32, flags)
                .map_err(io)?
                .map_err(|e| fail("zero", e))?;
            traces[f].set(off, &vec![0; len as usize]);
        } else if op < 18 && can_trim {
            nbd.trim(off, len as u32, 0)
                .map_err(io)?
                .map_err(|e| fail("trim", e))?;
            // Trim frees the whole blocks inside the range (they then read as zeroes);
            // the partial blocks at its edges are left alone.
            let first = off.div_ceil(setup_bs);
            let end = if off + len >= FILE_LEN {
                FILE_LEN.div_ceil(setup_bs)
            } else {
                (off + len) / setup_bs
            };
            if end > first {
                let from = first * setup_bs;
                let to = (end * setup_bs).min(FILE_LEN);
                traces[f].set(from, &vec![0; (to - from) as usize]);
            }
        } else if op < 19 {
            nbd.read(off, len as u32)
                .map_err(io)?
                .map_err(|e| fail("read", e))?;
        } else {
            nbd.flush().map_err(io)?.map_err(|e| fail("flush", e))?;
        }
        ops += 1;
    }
    for nbd in conns {
        nbd.disconnect();
    }
    Ok((traces, ops))
}

/// Runs `writers` writers for `secs`, then checks every file through a new connection;
/// returns the traces.
fn run_load(srv: &mut Srv, s: &Setup, writers: u64, secs: u64) -> Vec<Vec<Trace>> {
    let deadline = Instant::now() + stress_secs(secs);
    let names: Vec<&'static str> = s.files.iter().map(|f| f.0).collect();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let socket = srv.socket().to_path_buf();
            let names = names.clone();
            let (bs, trim) = (s.block_size, s.can_trim);
            thread::spawn(move || writer(socket, w, writers, bs, trim, names, deadline))
        })
        .collect();
    let mut all = Vec::new();
    let mut ops = 0;
    for h in handles {
        let (traces, n) = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(&srv.log(), 4000)));
        ops += n;
        all.push(traces);
    }
    eprintln!("{writers} writers, {ops} requests");
    srv.assert_alive("after the load");
    for (f, (name, initial)) in s.files.iter().enumerate() {
        let mut nbd = Nbd::connect(srv.socket(), name.as_bytes()).unwrap();
        let got = ok_io(nbd.read_all(1 << 20), "read back").expect("read back");
        nbd.disconnect();
        let traces: Vec<&Trace> = all.iter().map(|t| &t[f]).collect();
        check(&got, initial, &traces, &format!("{name} read back")).unwrap();
    }
    all
}

fn check_image(s: &Setup, all: &[Vec<Trace>], when: &str) {
    e2fsck(&s.image).unwrap_or_else(|e| panic!("{when}: {e}"));
    for (f, (name, initial)) in s.files.iter().enumerate() {
        let traces: Vec<&Trace> = all.iter().map(|t| &t[f]).collect();
        check(
            &debugfs_dump(&s.image, name),
            initial,
            &traces,
            &format!("{name} in the image {when}"),
        )
        .unwrap();
    }
}

fn load_then_clean_stop(ext3: bool, writers: u64, secs: u64) {
    let s = setup(if ext3 { "load-ext3" } else { "load-ext4" }, ext3);
    let mut srv = Srv::start(
        s.dir.path(),
        &[],
        &strs(&file_plugin(&s.image, "exportname")),
    );
    let all = run_load(&mut srv, &s, writers, secs);
    srv.stop();
    check_image(&s, &all, "after a clean shutdown");
}

fn load_then_flush_and_kill9(ext3: bool, writers: u64, secs: u64) {
    let s = setup(
        if ext3 {
            "load-kill-ext3"
        } else {
            "load-kill-ext4"
        },
        ext3,
    );
    let mut srv = Srv::start(
        s.dir.path(),
        &[],
        &strs(&file_plugin(&s.image, "exportname")),
    );
    let all = run_load(&mut srv, &s, writers, secs);
    let mut nbd = Nbd::connect(srv.socket(), b"/empty").unwrap();
    ok_io(nbd.flush(), "flush").expect("flush");
    srv.kill9();
    check_image(&s, &all, "after flush and kill -9");
}

#[test]
fn eight_writers_ext4_clean_shutdown() {
    load_then_clean_stop(false, 8, 6);
}

#[test]
fn eight_writers_ext4_flush_and_kill9() {
    load_then_flush_and_kill9(false, 8, 5);
}

#[test]
fn eight_writers_ext3_indirect_blocks_flush_and_kill9() {
    load_then_flush_and_kill9(true, 8, 4);
}

/// The long version: 12 writers for `EXT2FILTER_STRESS_SECS` (default 300 s) each on
/// ext4 and ext3, clean shutdown and kill -9.
#[test]
#[ignore]
fn long_load() {
    let secs = stress_secs(300).as_secs();
    for ext3 in [false, true] {
        load_then_clean_stop(ext3, 12, secs);
        load_then_flush_and_kill9(ext3, 12, secs);
    }
}

/// Writers fill a file larger than the filesystem: each ends with ENOSPC (never EIO or a
/// broken connection), what was acknowledged reads back, and after a flush and a
/// `kill -9` e2fsck is clean and the data is in the image; writes into blocks the file
/// already owns still work when the filesystem is full.
fn full_filesystem(ext2: bool) {
    let dir = TestDir::new(if ext2 { "enospc-ext2" } else { "enospc-ext4" });
    let big = 64u64 << 20;
    let mkfs: &[&str] = if ext2 {
        &["-t", "ext2", "-b", "1024"]
    } else {
        &["-t", "ext4", "-b", "4096"]
    };
    let image = det_image(
        dir.path(),
        "fs.img",
        mkfs,
        8 * 1024,
        &[Item::Sparse("/big", big, vec![])],
        &[],
    );
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "/big")));
    let writers = 4u64;
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let socket = srv.socket().to_path_buf();
            thread::spawn(move || -> Result<Vec<(u64, Vec<u8>)>, String> {
                let mut nbd = Nbd::connect(&socket, b"").map_err(|e| e.to_string())?;
                let mut rng = XorShift::new(0xf011 + w);
                let mut acked = Vec::new();
                let share = big / writers;
                for k in 0.. {
                    // Scattered, non-overlapping writes: each needs new blocks (and
                    // mapping blocks).
                    let len = 1 + rng.next_u64() % 40_000;
                    let off = w * share + k * 49_152 + rng.next_u64() % 8192;
                    if off + len > (w + 1) * share {
                        return Err(format!("writer {w}: the filesystem never filled up"));
                    }
                    let data = random_bytes(rng.next_u64(), len as usize);
                    match nbd
                        .write(off, &data, 0)
                        .map_err(|e| format!("writer {w}: connection broke: {e}"))?
                    {
                        Ok(()) => acked.push((off, data)),
                        Err(ENOSPC) => break,
                        Err(e) => {
                            return Err(format!(
                            "writer {w}: write at {off}+{len} failed with errno {e}, not ENOSPC"
                        ))
                        }
                    }
                }
                // Overwriting acknowledged data needs no new block: still works.
                if let Some((off, data)) = acked.last().cloned() {
                    let new: Vec<u8> = data.iter().map(|b| !b).collect();
                    nbd.write(off, &new, 0)
                        .map_err(|e| e.to_string())?
                        .map_err(|e| {
                            format!(
                                "writer {w}: overwrite on a full filesystem failed with errno {e}"
                            )
                        })?;
                    let n = acked.len();
                    acked[n - 1] = (off, new);
                }
                nbd.disconnect();
                Ok(acked)
            })
        })
        .collect();
    let mut all: Vec<(u64, Vec<u8>)> = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{e}\n{}", tail(&srv.log(), 3000))),
        );
    }
    srv.assert_alive("after ENOSPC");
    let mut nbd = Nbd::connect(srv.socket(), b"").unwrap();
    ok_io(nbd.flush(), "flush").expect("flush on a full filesystem");
    for (off, data) in &all {
        let got = ok_io(nbd.read(*off, data.len() as u32), "read").expect("read back");
        assert!(
            got == *data,
            "acknowledged write at {off}+{} does not read back",
            data.len()
        );
    }
    srv.kill9();
    e2fsck(&image).unwrap_or_else(|e| panic!("full filesystem after flush and kill -9: {e}"));
    let dump = debugfs_dump(&image, "/big");
    for (off, data) in &all {
        assert!(
            dump[*off as usize..*off as usize + data.len()] == data[..],
            "acknowledged write at {off} is not in the image"
        );
    }
    let _ = Path::new("");
}

#[test]
fn full_filesystem_gives_enospc_ext4() {
    full_filesystem(false);
}

#[test]
fn full_filesystem_gives_enospc_ext2() {
    full_filesystem(true);
}

/// A clean shutdown (SIGTERM) while clients are still connected, with writes into
/// holes not yet flushed: nbdkit 1.32 runs the filter's `.cleanup` without waiting for
/// the connections, so the filesystem must be closed (metadata written, plugin
/// flushed) there, not only when its last connection lets go of it. Afterwards
/// e2fsck is clean and the data is in the image.
#[test]
fn sigterm_with_clients_connected_writes_the_metadata() {
    let s = setup("sigterm-connected", false);
    let mut srv = Srv::start(
        s.dir.path(),
        &[],
        &strs(&file_plugin(&s.image, "exportname")),
    );
    let mut nbd = Nbd::connect(srv.socket(), b"/empty").unwrap();
    let data = random_bytes(5, 100_000);
    ok_io(nbd.write(1_000_000, &data, 0), "write").expect("write into a hole");
    // SIGTERM while the connection is open; the client goes away a moment later
    // (nbdkit waits for it), without flushing.
    common::run("kill", &["-TERM", &srv.pid().unwrap().to_string()]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(nbd);
    let status = srv
        .terminate(std::time::Duration::from_secs(60))
        .expect("nbdkit exits on SIGTERM");
    assert!(status.success(), "nbdkit exited with {status}");
    e2fsck(&s.image).unwrap_or_else(|e| panic!("after SIGTERM with a client connected: {e}"));
    let dump = debugfs_dump(&s.image, "/empty");
    assert!(
        dump[1_000_000..1_100_000] == data[..],
        "the written data is not in the image"
    );
}
