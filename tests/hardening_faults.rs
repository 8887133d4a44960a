//! A failing, short or slow plugin beneath the filter. nbdkit's error filter (below
//! ours: `--filter=OURS --filter=error`) fails reads and writes at chosen moments
//! (`error-*-file`) or at random rates; an eval plugin fails flushes and returns short
//! reads; the delay filter makes every call slow. Errors must reach the client as
//! errors with their errno, the server must live, the filesystem must never be left
//! half-written: a failed flush is reported and a later flush retries, and after that
//! flush and a `kill -9` `e2fsck -fn` is clean and every acknowledged write is in the
//! image.

mod common;
mod hardening_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{debugfs_dump, free_blocks, random_bytes, shell_quote, TestDir, XorShift};
use hardening_support::*;

const DATA_LEN: usize = 1 << 20;
const SPARSE_LEN: u64 = 8 << 20;

/// `kill -9` the server after a successful flush: the filesystem must be clean
/// and `/sparse` must hold every byte the model knows.
fn kill9_and_check(srv: &mut Srv, image: &Path, model: &ByteModel) {
    srv.kill9();
    e2fsck(image).unwrap();
    model
        .check(&debugfs_dump(image, "/sparse"), "after flush and kill -9")
        .unwrap();
}

/// ext4 (4 KiB blocks, 32 MiB) with `/data` (1 MiB written) and `/sparse` (8 MiB of
/// holes); or ext3 with 1 KiB blocks (indirect blocks).
fn image(dir: &TestDir, ext3: bool) -> (PathBuf, Vec<u8>) {
    let data = random_bytes(0xfa17, DATA_LEN);
    let mkfs: &[&str] = if ext3 {
        &["-t", "ext3", "-b", "1024"]
    } else {
        &["-t", "ext4", "-b", "4096"]
    };
    let image = det_image(
        dir.path(),
        "fs.img",
        mkfs,
        32 * 1024,
        &[
            Item::File("/data", data.clone()),
            Item::Sparse("/sparse", SPARSE_LEN, vec![]),
        ],
        &[],
    );
    (image, data)
}

fn args(image: &Path, under: &[&str], params: &[String]) -> Vec<String> {
    let mut v: Vec<String> = under.iter().map(|s| s.to_string()).collect();
    v.push("file".into());
    v.push(image.to_str().unwrap().into());
    v.extend(params.iter().cloned());
    v
}

/// Reads fail while the trigger exists: the client gets the injected errno (EIO, or
/// EPERM when that is what the plugin said) and the connection and server go on.
#[test]
fn read_errors_reach_the_client_and_the_server_recovers() {
    let dir = TestDir::new("fault-read");
    let (image, data) = image(&dir, false);
    for errno_name in ["EIO", "EPERM", "ENOMEM"] {
        let trigger = dir.join("trigger");
        let params = vec![
            format!("error-pread={errno_name}"),
            "error-pread-rate=100%".into(),
            format!("error-pread-file={}", trigger.display()),
            "ext2file=/data".into(),
        ];
        let mut srv = Srv::start(
            dir.path(),
            &[],
            &strs(&args(&image, &["--filter=error"], &params)),
        );
        let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
        assert_eq!(ok_io(nbd.read(0, 4096), "read").unwrap(), &data[..4096]);
        set_trigger(&trigger, true);
        let expected = match errno_name {
            "EIO" => EIO,
            "EPERM" => EPERM,
            _ => ENOMEM,
        };
        for (off, len) in [(0u64, 4096u32), (12345, 300_000), (DATA_LEN as u64 - 1, 1)] {
            let r = ok_io(nbd.read(off, len), "read while failing");
            assert_eq!(
                r.err(),
                Some(expected),
                "{errno_name}: read {off}+{len} while the plugin fails"
            );
        }
        srv.assert_alive("after failed reads");
        set_trigger(&trigger, false);
        let all = ok_io(nbd.read_all(256 * 1024), "read").expect("read after recovery");
        common::assert_bytes_eq(&all, &data, "after recovery");
        nbd.disconnect();
        srv.stop();
    }
}

/// The plugin fails every read at start: the filesystem cannot be opened, and nbdkit
/// stops at start with a message (exit status 1, no crash) before any client.
#[test]
fn plugin_failing_at_start_stops_nbdkit() {
    let dir = TestDir::new("fault-start");
    let (image, _) = image(&dir, false);
    let params = vec!["error-pread-rate=100%".into(), "ext2file=/data".into()];
    match Srv::start_or_stop(
        dir.path(),
        &[],
        &strs(&args(&image, &["--filter=error"], &params)),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    {
        Started::Stopped(log) => assert!(log.contains("open:"), "{log}"),
        Started::Serving(mut srv) => {
            srv.stop();
            panic!("served while every read fails");
        }
    }
}

/// The plugin fails every read when the first writable clients connect, after the
/// filesystem was opened read-only at start: re-opening it read-write fails, each such
/// connection fails with a message, the server lives, and the first connection after
/// the plugin recovers re-opens it and is served, writable.
#[test]
fn reopen_for_writing_fails_while_the_plugin_fails_then_recovers() {
    let dir = TestDir::new("fault-reopen");
    let (image, data) = image(&dir, false);
    let trigger = dir.join("trigger");
    set_trigger(&trigger, false);
    let params = vec![
        "error-pread-rate=100%".into(),
        format!("error-pread-file={}", trigger.display()),
        "ext2file=exportname".into(),
    ];
    let mut srv = match Srv::start_or_stop(
        dir.path(),
        &[],
        &strs(&args(&image, &["--filter=error"], &params)),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    {
        Started::Serving(srv) => srv,
        Started::Stopped(log) => panic!("stopped at start:\n{log}"),
    };
    set_trigger(&trigger, true);
    for _ in 0..3 {
        match Nbd::connect(srv.socket(), b"/data") {
            Err(ConnectError::Refused { .. }) => {}
            Ok(_) => panic!("served while every read fails"),
            Err(e) => panic!("connection broke: {e}"),
        }
        let _ = list_exports(srv.socket());
        srv.assert_alive("while the plugin fails");
    }
    assert!(srv.log().contains("error"), "no message:\n{}", srv.log());
    set_trigger(&trigger, false);
    let mut nbd = Nbd::connect(srv.socket(), b"/data").expect("served after recovery");
    assert!(!nbd.read_only(), "served read-only after recovery");
    common::assert_bytes_eq(
        &ok_io(nbd.read_all(1 << 20), "read").unwrap(),
        &data,
        "after recovery",
    );
    nbd.disconnect();
    srv.stop();
}

/// Every write fails while filling holes (data writes and, for allocations, the
/// library's metadata writes): the client gets EIO, no block leaks (the free count is
/// unchanged), the file's holes stay holes, and after the plugin recovers the same
/// writes succeed; flush, `kill -9`, e2fsck clean, data in the image.
#[test]
fn failed_writes_into_holes_leak_nothing() {
    for ext3 in [false, true] {
        let dir = TestDir::new("fault-write-holes");
        let (image, _) = image(&dir, ext3);
        let free_before = free_blocks(&image);
        let trigger = dir.join("trigger");
        let params = vec![
            "error-pwrite-rate=100%".into(),
            format!("error-pwrite-file={}", trigger.display()),
            "error-zero-rate=100%".into(),
            format!("error-zero-file={}", trigger.display()),
            "ext2file=/sparse".into(),
        ];
        let mut srv = Srv::start(
            dir.path(),
            &[],
            &strs(&args(&image, &["--filter=error"], &params)),
        );
        let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
        set_trigger(&trigger, true);
        let writes: Vec<(u64, Vec<u8>)> = (0..40u64)
            .map(|i| {
                (
                    i * 200_000 + i * 7,
                    random_bytes(i, 3000 + (i as usize * 1000) % 70_000),
                )
            })
            .collect();
        for (off, bytes) in &writes {
            let r = ok_io(nbd.write(*off, bytes, 0), "write while failing");
            assert_eq!(
                r.err(),
                Some(EIO),
                "ext3={ext3}: write at {off} while every plugin write fails"
            );
        }
        // Nothing changed (each failed write was undone whole), so a flush
        // has nothing to write and may well succeed: either way the server
        // lives.
        let _ = ok_io(nbd.flush(), "flush");
        srv.assert_alive("after failed writes");
        set_trigger(&trigger, false);
        ok_io(nbd.flush(), "flush").expect("flush after recovery");
        nbd.disconnect();
        srv.stop();
        e2fsck(&image).unwrap();
        assert_eq!(
            free_blocks(&image),
            free_before,
            "ext3={ext3}: failed writes leaked blocks"
        );
        assert!(
            debugfs_dump(&image, "/sparse").iter().all(|&b| b == 0),
            "ext3={ext3}: failed writes left data in the file"
        );
        // The same writes, now succeeding.
        let mut srv = Srv::start(
            dir.path(),
            &[],
            &strs(&args(&image, &["--filter=error"], &params)),
        );
        let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
        let mut model = ByteModel::new(vec![0; SPARSE_LEN as usize]);
        for (off, bytes) in &writes {
            ok_io(nbd.write(*off, bytes, 0), "write").expect("write after recovery");
            model.write(*off, bytes);
        }
        ok_io(nbd.flush(), "flush").expect("flush");
        kill9_and_check(&mut srv, &image, &model);
    }
}

/// The image's metadata cannot be written when the client flushes: the flush fails
/// with an error, the server lives, and the next flush (plugin recovered) writes it
/// all: after `kill -9` e2fsck is clean and the data is there.
#[test]
fn failed_metadata_flush_is_reported_and_retried() {
    let dir = TestDir::new("fault-flush-metadata");
    let (image, _) = image(&dir, false);
    let trigger = dir.join("trigger");
    let params = vec![
        "error-pwrite-rate=100%".into(),
        format!("error-pwrite-file={}", trigger.display()),
        "ext2file=/sparse".into(),
    ];
    let mut srv = Srv::start(
        dir.path(),
        &[],
        &strs(&args(&image, &["--filter=error"], &params)),
    );
    let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
    let mut model = ByteModel::new(vec![0; SPARSE_LEN as usize]);
    for i in 0..20u64 {
        let bytes = random_bytes(100 + i, 10_000);
        ok_io(nbd.write(i * 300_000, &bytes, 0), "write").expect("write");
        model.write(i * 300_000, &bytes);
    }
    set_trigger(&trigger, true);
    for _ in 0..2 {
        let r = ok_io(nbd.flush(), "flush while failing");
        assert!(
            r.is_err(),
            "flush reported success while metadata could not be written"
        );
    }
    srv.assert_alive("after failed flushes");
    set_trigger(&trigger, false);
    ok_io(nbd.flush(), "flush").expect("the retried flush");
    kill9_and_check(&mut srv, &image, &model);
}

/// The eval plugin over `image`, logging nothing, whose flush fails and whose reads
/// come back one byte short while `trigger` exists.
fn failing_eval_plugin(image: &Path, trigger: &Path) -> Vec<String> {
    let img = shell_quote(image.to_str().unwrap());
    let t = shell_quote(trigger.to_str().unwrap());
    vec![
        "eval".into(),
        "open=echo handle".into(),
        format!("get_size=stat -c %s {img}"),
        format!(
            "pread=if [ -e {t} ]; then n=$(( $3 - 1 )); else n=$3; fi; dd if={img} skip=$4 count=$n iflag=skip_bytes,count_bytes status=none"
        ),
        format!("pwrite=dd of={img} seek=$4 oflag=seek_bytes conv=notrunc status=none"),
        format!("flush=if [ -e {t} ]; then echo 'EIO injected flush failure' >&2; exit 1; fi; sync {img}"),
    ]
}

/// The plugin's own flush fails: the client's flush fails, later succeeds, and what
/// was flushed survives `kill -9` with a clean e2fsck.
#[test]
fn failed_plugin_flush_is_reported_and_retried() {
    let dir = TestDir::new("fault-flush-plugin");
    let (image, _) = image(&dir, false);
    let trigger = dir.join("trigger");
    let mut plugin = failing_eval_plugin(&image, &dir.join("never"));
    // Only the flush fails here: a separate trigger for it.
    plugin[5] = {
        let img = shell_quote(image.to_str().unwrap());
        let t = shell_quote(trigger.to_str().unwrap());
        format!("flush=if [ -e {t} ]; then echo 'EIO injected flush failure' >&2; exit 1; fi; sync {img}")
    };
    plugin.push("ext2file=/sparse".into());
    let mut srv = Srv::start(dir.path(), &[], &strs(&plugin));
    let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
    let mut model = ByteModel::new(vec![0; SPARSE_LEN as usize]);
    for i in 0..5u64 {
        let bytes = random_bytes(200 + i, 5000);
        ok_io(nbd.write(i * 1_000_000 + 17, &bytes, 0), "write").expect("write");
        model.write(i * 1_000_000 + 17, &bytes);
    }
    set_trigger(&trigger, true);
    let r = ok_io(nbd.flush(), "flush");
    assert_eq!(r.err(), Some(EIO), "flush while the plugin's flush fails");
    // FUA on a write that allocates needs a flush too.
    let r = ok_io(nbd.write(7_000_000, b"fua", FLAG_FUA), "fua write");
    assert!(
        r.is_err(),
        "a FUA write reported success while the plugin cannot flush"
    );
    model.forget(7_000_000, 3);
    srv.assert_alive("after failed flushes");
    set_trigger(&trigger, false);
    ok_io(nbd.flush(), "flush").expect("the retried flush");
    kill9_and_check(&mut srv, &image, &model);
}

/// The plugin returns short reads: an error for the client, never short or stale data,
/// and the server goes on.
#[test]
fn short_reads_from_the_plugin_are_errors() {
    let dir = TestDir::new("fault-short");
    let (image, data) = image(&dir, false);
    let trigger = dir.join("trigger");
    let mut plugin = failing_eval_plugin(&image, &trigger);
    plugin.push("ext2file=/data".into());
    let mut srv = Srv::start(dir.path(), &[], &strs(&plugin));
    let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
    set_trigger(&trigger, true);
    for (off, len) in [(0u64, 4096u32), (5000, 100_000)] {
        let r = ok_io(nbd.read(off, len), "short read");
        assert_eq!(
            r.err(),
            Some(EIO),
            "read {off}+{len} with short plugin reads"
        );
    }
    srv.assert_alive("after short reads");
    set_trigger(&trigger, false);
    assert_eq!(
        ok_io(nbd.read(5000, 100_000), "read").unwrap(),
        &data[5000..105_000]
    );
    nbd.disconnect();
    srv.stop();
}

/// One writer's share of a parallel run: its own region of the file, its own model.
fn writer_loop(
    mut nbd: Nbd,
    seed: u64,
    region: (u64, u64),
    model: Arc<Mutex<ByteModel>>,
    deadline: Instant,
    tolerate_errors: bool,
) -> Result<(u64, u64), String> {
    let mut rng = XorShift::new(seed);
    let (start, len) = region;
    let (mut ok, mut failed) = (0u64, 0u64);
    while Instant::now() < deadline {
        let n = 1 + rng.next_u64() % 40_000;
        let off = start + rng.next_u64() % (len - n);
        let op = rng.next_u64() % 10;
        let io = |e: std::io::Error| format!("connection broke: {e}");
        let result = if op < 7 {
            let bytes = random_bytes(rng.next_u64(), n as usize);
            let flags = if op == 0 { FLAG_FUA } else { 0 };
            let r = nbd.write(off, &bytes, flags).map_err(io)?;
            let mut m = model.lock().unwrap();
            match r {
                Ok(()) => m.write(off, &bytes),
                Err(_) => m.forget(off, n as usize),
            }
            r
        } else if op < 9 {
            let r = nbd
                .zero(off, n as u32, if op == 7 { FLAG_NO_HOLE } else { 0 })
                .map_err(io)?;
            let mut m = model.lock().unwrap();
            match r {
                Ok(()) => m.write(off, &vec![0; n as usize]),
                Err(_) => m.forget(off, n as usize),
            }
            r
        } else {
            let r = nbd.read(off, n as u32).map_err(io)?;
            match r {
                Ok(buf) => {
                    let m = model.lock().unwrap();
                    let mut copy = ByteModel::new(vec![0; n as usize]);
                    // Compare against the region's known bytes only.
                    let mut expected = Vec::with_capacity(n as usize);
                    for i in 0..n as usize {
                        expected.push(m.known_at(off as usize + i));
                    }
                    for (i, e) in expected.iter().enumerate() {
                        if let Some(e) = e {
                            copy.write(i as u64, &[*e]);
                        } else {
                            copy.forget(i as u64, 1);
                        }
                    }
                    copy.check(&buf, &format!("read at {off}+{n} during the run"))?;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(()) => ok += 1,
            Err(e) if tolerate_errors && e == EIO => failed += 1,
            Err(e) => return Err(format!("request at {off}+{n} failed with errno {e}")),
        }
    }
    nbd.disconnect();
    Ok((ok, failed))
}

/// Four writers on their own regions of one sparse file while the plugin fails 10 % of
/// reads, writes and zeroes (or only reads, or only writes): failures are EIO, successes stick. Then the plugin
/// recovers, one flush succeeds, `kill -9`: e2fsck is clean and every acknowledged byte
/// is in the image.
fn random_plugin_errors(which: &str, ext3: bool) {
    {
        let dir = TestDir::new("fault-random");
        let (image, _) = image(&dir, ext3);
        let trigger = dir.join("trigger");
        let prefix = if which.is_empty() {
            "error".to_string()
        } else {
            format!("error-{which}")
        };
        let params = vec![
            format!("{prefix}-rate=10%"),
            format!("{prefix}-file={}", trigger.display()),
            "ext2file=/sparse".into(),
        ];
        let mut srv = Srv::start(
            dir.path(),
            &[],
            &strs(&args(&image, &["--filter=error"], &params)),
        );
        let model = Arc::new(Mutex::new(ByteModel::new(vec![0; SPARSE_LEN as usize])));
        // Long enough for a few hundred requests, so that a 10 % error rate
        // injects some: under valgrind a request takes some 50 times longer.
        let secs = if common::valgrind_enabled() { 40 } else { 4 };
        let deadline = Instant::now() + stress_secs(secs);
        let writers = 4u64;
        let share = SPARSE_LEN / writers;
        // Connected before the errors start: opening is tested elsewhere.
        let connections: Vec<Nbd> = (0..writers)
            .map(|_| Nbd::connect(srv.socket(), b"").expect("connect"))
            .collect();
        set_trigger(&trigger, true);
        let handles: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(w, nbd)| {
                let w = w as u64;
                let model = model.clone();
                thread::spawn(move || {
                    writer_loop(nbd, 0xe770 + w, (w * share, share), model, deadline, true)
                })
            })
            .collect();
        let mut total = (0, 0);
        for h in handles {
            let (ok, failed) = h
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("ext3={ext3}: {e}\n{}", tail(&srv.log(), 3000)));
            total.0 += ok;
            total.1 += failed;
        }
        eprintln!(
            "ext3={ext3}: {} requests succeeded, {} failed",
            total.0, total.1
        );
        assert!(
            total.1 > 0 && total.0 > 0,
            "the error filter injected nothing"
        );
        srv.assert_alive("after the run");
        set_trigger(&trigger, false);
        let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
        ok_io(nbd.flush(), "flush").expect("flush after the plugin recovered");
        let all = ok_io(nbd.read_all(1 << 20), "read").expect("read back");
        model
            .lock()
            .unwrap()
            .check(&all, "read back after the run")
            .unwrap();
        srv.kill9();
        e2fsck(&image).unwrap_or_else(|e| panic!("ext3={ext3}: {e}"));
        model
            .lock()
            .unwrap()
            .check(
                &debugfs_dump(&image, "/sparse"),
                "in the image after kill -9",
            )
            .unwrap();
    }
}

#[test]
fn random_read_errors_under_parallel_writers_ext4() {
    random_plugin_errors("pread", false);
}

#[test]
fn random_write_errors_under_parallel_writers_ext4() {
    random_plugin_errors("pwrite", false);
}

#[test]
fn random_errors_under_parallel_writers_ext4() {
    random_plugin_errors("", false);
}

#[test]
fn random_errors_under_parallel_writers_ext3() {
    random_plugin_errors("", true);
}

/// Every plugin call is slow (delay filter beneath ours): four clients read and write
/// their regions, including holes; a client that disconnects with a request in flight
/// does not disturb the others; everything reads back.
#[test]
fn slow_plugin_with_parallel_clients() {
    let dir = TestDir::new("fault-slow");
    let (image, _) = image(&dir, false);
    let params = vec![
        "rdelay=2ms".into(),
        "wdelay=2ms".into(),
        "ext2file=/sparse".into(),
    ];
    let mut srv = Srv::start(
        dir.path(),
        &[],
        &strs(&args(&image, &["--filter=delay"], &params)),
    );
    let model = Arc::new(Mutex::new(ByteModel::new(vec![0; SPARSE_LEN as usize])));
    let deadline = Instant::now() + stress_secs(3);
    let share = SPARSE_LEN / 4;
    let handles: Vec<_> = (0..4u64)
        .map(|w| {
            let nbd = Nbd::connect(srv.socket(), b"").expect("connect");
            let model = model.clone();
            thread::spawn(move || {
                writer_loop(nbd, 0x510 + w, (w * share, share), model, deadline, false)
            })
        })
        .collect();
    // Clients that vanish without NBD_CMD_DISC (after their replies: vanishing with
    // requests in flight aborts nbdkit 1.32.5 itself, filter or not).
    for i in 0..20u64 {
        let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
        let _ = ok_io(nbd.read(i * 4096, 1 << 20), "read");
        drop(nbd);
        thread::sleep(Duration::from_millis(20));
    }
    for h in handles {
        h.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(&srv.log(), 3000)));
    }
    srv.assert_alive("after the run");
    let mut nbd = Nbd::connect(srv.socket(), b"").expect("connect");
    let all = ok_io(nbd.read_all(4 << 20), "read").expect("read back");
    model.lock().unwrap().check(&all, "read back").unwrap();
    ok_io(nbd.flush(), "flush").unwrap();
    nbd.disconnect();
    srv.stop();
    e2fsck(&image).unwrap();
}
