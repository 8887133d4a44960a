//! Hostile clients: export names that are empty, huge, full of `..` and `//`, with a
//! trailing `/`, non-UTF-8, NUL bytes or format strings, naming directories, fifos,
//! sockets, devices and symlink loops; requests at the very end of the file and past
//! it, zero-length and huge; broken protocol; thousands of connections opening and
//! closing while others write. nbdkit must answer each with a refusal or an error,
//! stay up with a clean log, keep serving the good exports and exit 0 on SIGTERM.

mod common;
mod hardening_support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{random_bytes, TestDir, XorShift};
use hardening_support::*;

const HELLO_LEN: usize = 10_000;

fn image(dir: &TestDir) -> (std::path::PathBuf, Vec<u8>) {
    let hello = random_bytes(0xc11e, HELLO_LEN);
    let image = det_image(
        dir.path(),
        "fs.img",
        &["-t", "ext4", "-b", "4096"],
        96 * 1024,
        &[
            Item::File("/hello", hello.clone()),
            Item::File("/dir/inner", random_bytes(2, 3000)),
            Item::File("/\u{fffd}", b"replacement character".to_vec()),
            Item::File("/%s%n%p%x", b"format".to_vec()),
            Item::Symlink("/loop1", "/loop2"),
            Item::Symlink("/loop2", "/loop1"),
            Item::Symlink("/selfloop", "selfloop"),
            Item::Symlink("/todir", "/dir"),
            Item::Symlink("/dangling", "/nowhere"),
            Item::Symlink("/up", "../../../../hello"),
            Item::Fifo("/fifo"),
            Item::Sparse("/sparse", 64 << 20, vec![]),
        ],
        &[
            "mknod chardev c 1 3".to_string(),
            "mknod blockdev b 8 0".to_string(),
        ],
    );
    (image, hello)
}

/// Names a client may send, as raw bytes.
fn hostile_names() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        "",
        "/",
        "//",
        "///",
        ".",
        "..",
        "/.",
        "/..",
        "/../..",
        "/../hello",
        "../hello",
        "/./hello",
        "//hello",
        "hello/",
        "/hello/",
        "/hello/.",
        "/hello/..",
        "/dir",
        "/dir/",
        "/dir/..",
        "/dir/../hello",
        "/dir/./inner",
        "dir//inner",
        "/dir/inner/",
        "/lost+found",
        "/fifo",
        "/chardev",
        "/blockdev",
        "/loop1",
        "/selfloop",
        "/todir",
        "/todir/inner",
        "/dangling",
        "/up",
        "/nonexistent",
        "/nonexistent/",
        "/hello/x",
        "/%s%n%p%x",
        "%s%s%s%s%n",
        "/hello\n",
        "/hello ",
        " /hello",
        "\\hello",
        "/\u{fffd}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    names.push(b"/\xff".to_vec());
    names.push(b"/\xc3\x28".to_vec());
    names.push(b"/hello\0/x".to_vec());
    names.push(b"\0".to_vec());
    names.push(vec![b'a'; 255]);
    names.push([b"/".as_slice(), &[b'b'; 256]].concat());
    names.push(vec![b'/'; 4096]);
    names.push([b"/".as_slice(), &[b'c'; 4095]].concat());
    names.push(vec![b'd'; 4097]);
    names.push(vec![b'e'; 65_536]);
    names.push("/..".repeat(1365).into_bytes());
    names.push("/a".repeat(2000).into_bytes());
    names.push(
        "/dir/.."
            .repeat(500)
            .into_bytes()
            .into_iter()
            .chain(*b"/hello")
            .collect(),
    );
    names
}

/// Every hostile name is refused or serves a regular file whose contents are right;
/// the server lives, `/hello` keeps working, listing works, and no name picks a file
/// other than the one it names.
#[test]
fn hostile_export_names() {
    let dir = TestDir::new("hostile-names");
    let (image, hello) = image(&dir);
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "exportname")));
    let mut served = Vec::new();
    for name in hostile_names() {
        let shown: String = String::from_utf8_lossy(&name).chars().take(60).collect();
        let context = format!("export name {shown:?} ({} bytes)", name.len());
        match Nbd::connect(srv.socket(), &name) {
            Ok(mut nbd) => {
                let all = ok_io(nbd.read_all(1 << 20), &context);
                served.push((name.clone(), nbd.size, all.ok()));
                nbd.disconnect();
            }
            Err(ConnectError::Refused { .. }) => {}
            Err(ConnectError::Io(e)) => {
                srv.assert_alive(&context);
                // nbdkit itself drops a client whose option is too long.
                assert!(name.len() > 4096, "{context}: the connection broke: {e}");
            }
        }
        srv.assert_alive(&context);
    }
    let mut nbd = Nbd::connect(srv.socket(), b"/hello").expect("/hello after the hostile names");
    common::assert_bytes_eq(
        &ok_io(nbd.read_all(1 << 20), "read").unwrap(),
        &hello,
        "/hello",
    );
    nbd.disconnect();
    list_exports(srv.socket()).expect("listing");
    srv.stop();
    // What was served must be the file the name means.
    let mut wrong = Vec::new();
    for (name, size, contents) in &served {
        let text = String::from_utf8_lossy(name);
        let means_hello = matches!(
            text.as_ref(),
            "/hello"
                | "hello"
                | "//hello"
                | "/./hello"
                | "/../hello"
                | "../hello"
                | "/dir/../hello"
                | "/up"
        ) || text.ends_with("/hello") && !text.contains('\u{fffd}');
        let ok = if means_hello {
            *size == HELLO_LEN as u64 && contents.as_deref() == Some(&hello[..])
        } else {
            // Anything else served must be a regular file the name really names:
            // non-UTF-8 bytes must not be "repaired" into another file's name.
            std::str::from_utf8(name).is_ok() && !name.contains(&0)
        };
        if !ok {
            wrong.push(format!(
                "{:?} served {size} bytes",
                String::from_utf8_lossy(name)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "names served the wrong file:\n{}",
        wrong.join("\n")
    );
}

/// A non-UTF-8 export name is not looked up as its lossy UTF-8 rendering: `/\xff` must
/// not serve the file named `/\u{fffd}` (U+FFFD REPLACEMENT CHARACTER, bytes EF BF BD).
/// (`callbacks.rs` converts the name with `to_string_lossy`.)
#[test]
fn non_utf8_export_name_is_not_repaired_into_another_name() {
    let dir = TestDir::new("non-utf8");
    let (image, _) = image(&dir);
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "exportname")));
    if let Ok(mut nbd) = Nbd::connect(srv.socket(), b"/\xff") {
        let got = ok_io(nbd.read_all(4096), "read").unwrap_or_default();
        panic!(
            "export name b\"/\\xff\" was served ({} bytes: {:?})",
            nbd.size,
            String::from_utf8_lossy(&got)
        );
    }
    srv.assert_alive("non-UTF-8 name");
    srv.stop();
}

/// Requests at the very end of a file whose size is not a multiple of the block size,
/// past it, zero-length and huge: the right data or the protocol's errors, the file's
/// size and the bytes around unchanged, e2fsck clean afterwards.
#[test]
fn requests_at_and_past_the_end() {
    let dir = TestDir::new("end");
    let (image, hello) = image(&dir);
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "exportname")));
    let mut nbd = Nbd::connect(srv.socket(), b"/hello").unwrap();
    let size = nbd.size;
    assert_eq!(size, HELLO_LEN as u64);
    let mut model = ByteModel::new(hello.clone());
    let io = |r: std::io::Result<Reply<Vec<u8>>>| ok_io(r, "request");
    assert_eq!(io(nbd.read(size - 1, 1)).unwrap(), &hello[HELLO_LEN - 1..]);
    for (off, len) in [
        (size, 1u32),
        (size - 1, 2),
        (size, 0),
        (u64::MAX - 10, 20),
        (u64::MAX, 1),
        (0, u32::MAX),
        (1 << 62, 4096),
    ] {
        let r = io(nbd.read(off, len));
        assert!(
            r.is_err() || len == 0,
            "read {off}+{len} past the end succeeded"
        );
    }
    // Writes: the last byte, the last partial block, across the end, past it.
    ok_io(nbd.write(size - 1, b"Z", 0), "w").unwrap();
    model.write(size - 1, b"Z");
    ok_io(nbd.write(8192, &[7u8; HELLO_LEN - 8192], FLAG_FUA), "w").unwrap();
    model.write(8192, &[7u8; HELLO_LEN - 8192]);
    for (off, len) in [
        (size - 1, 2usize),
        (size, 1),
        (u64::MAX - 1, 4),
        (size + 4096, 4096),
    ] {
        let r = ok_io(nbd.write(off, &vec![9u8; len], 0), "w");
        assert!(r.is_err(), "write {off}+{len} past the end succeeded");
    }
    // Zero and trim at and across the end.
    ok_io(nbd.zero(size - 100, 100, 0), "z").unwrap();
    model.write(size - 100, &[0; 100]);
    assert!(
        ok_io(nbd.zero(size - 100, 200, 0), "z").is_err(),
        "zero across the end"
    );
    assert!(
        ok_io(nbd.zero(size, 1, 0), "z").is_err(),
        "zero past the end"
    );
    if nbd.flags & TFLAG_SEND_TRIM != 0 {
        ok_io(nbd.trim(8192, (size - 8192) as u32, 0), "t").unwrap();
        model.write(8192, &vec![0; HELLO_LEN - 8192]);
        assert!(
            ok_io(nbd.trim(size - 10, 20, 0), "t").is_err(),
            "trim across the end"
        );
        // Trim of a partial last block must leave the bytes before it alone.
        ok_io(nbd.trim(size - 10, 10, 0), "t").unwrap();
        model.forget(size - 10, 10);
    }
    assert!(
        ok_io(nbd.cache(size, 10), "c").is_err(),
        "cache past the end"
    );
    let _ = ok_io(nbd.cache(0, size as u32), "c");
    // Unknown commands and flags.
    let cookie = ok_io(nbd.send_request(0, 99, 0, 0, &[]), "unknown command");
    assert_ne!(ok_io(nbd.read_reply(cookie), "unknown command"), 0);
    let all = io(nbd.read(0, size as u32)).unwrap();
    model.check(&all, "after the end-of-file requests").unwrap();
    ok_io(nbd.flush(), "flush").unwrap();
    nbd.disconnect();
    // Huge requests in the middle of a large sparse file.
    let mut big = Nbd::connect(srv.socket(), b"/sparse").unwrap();
    let data = random_bytes(77, 32 << 20);
    ok_io(big.write(1 << 20, &data, 0), "32 MiB write").unwrap();
    assert_eq!(
        ok_io(big.read(1 << 20, 32 << 20), "32 MiB read").unwrap(),
        data
    );
    let r = ok_io(big.read(0, (64 << 20) + 1), "oversized read");
    assert!(r.is_err(), "a read over nbdkit's limit succeeded");
    big.disconnect();
    srv.assert_alive("after the requests");
    srv.stop();
    e2fsck(&image).unwrap();
    assert_eq!(
        common::debugfs_dump(&image, "/hello").len(),
        HELLO_LEN,
        "the file's size changed"
    );
}

/// Broken protocol: garbage instead of the greeting reply, huge option lengths, bad
/// request magic, a write whose payload never comes, INFO then GO on different
/// names, abrupt disconnects.
#[test]
fn broken_protocol_and_abrupt_disconnects() {
    let dir = TestDir::new("protocol");
    let (image, hello) = image(&dir);
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "exportname")));
    let sock = srv.socket().to_path_buf();
    // Garbage and truncation during the handshake.
    for garbage in [
        &b""[..],
        b"\xff\xff\xff\xff",
        b"\0\0\0\x03IHAVEOPT\0\0\0\x07\xff\xff\xff\xff",
    ] {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
            let _ = s.write_all(garbage);
        }
        srv.assert_alive("handshake garbage");
    }
    {
        let mut s = greet(&sock).unwrap();
        let _ = send_option(&mut s, OPT_GO, &[0, 0, 0x10, 0]); // claims a 1 MiB name
    }
    // INFO on several names, then GO on another, on one handshake.
    {
        let mut s = greet(&sock).unwrap();
        for name in [
            &b"/dir"[..],
            b"/nonexistent",
            b"/hello",
            b"/fifo",
            b"/hello",
        ] {
            let _ = info_or_go(&mut s, OPT_INFO, name);
        }
        let (size, flags) = info_or_go(&mut s, OPT_GO, b"/hello").expect("GO after INFOs");
        let mut nbd = Nbd::from_stream(s, size, flags);
        assert_eq!(ok_io(nbd.read(0, 100), "read").unwrap(), &hello[..100]);
        nbd.disconnect();
    }
    // Bad request magic, then a write whose payload never arrives.
    {
        let mut nbd = Nbd::connect(&sock, b"/hello").unwrap();
        let _ = nbd.stream().write_all(&[0u8; 28]);
    }
    {
        let mut nbd = Nbd::connect(&sock, b"/sparse").unwrap();
        let _ = nbd.send_request(0, CMD_WRITE, 0, 1 << 20, &[1u8; 1000]);
    }
    // Clients that vanish without NBD_CMD_DISC once their replies are in. (Vanishing
    // with requests still in flight aborts nbdkit 1.32.5 itself, with or without this
    // filter: `connections.c:402: raw_send_socket: Assertion 'sock >= 0' failed`.)
    for i in 0..20u64 {
        let mut nbd = Nbd::connect(&sock, b"/sparse").unwrap();
        let mut cookies = Vec::new();
        for j in 0..8u64 {
            cookies.push(ok_io(
                nbd.send_request(0, CMD_WRITE, (i * 8 + j) * 65536, 4096, &[i as u8; 4096]),
                "w",
            ));
        }
        for _ in cookies {
            assert_eq!(ok_io(nbd.read_any_reply(), "reply").1, 0);
        }
        drop(nbd);
    }
    srv.assert_alive("after the broken clients");
    let mut nbd = Nbd::connect(&sock, b"/hello").unwrap();
    common::assert_bytes_eq(
        &ok_io(nbd.read_all(1 << 20), "read").unwrap(),
        &hello,
        "/hello",
    );
    ok_io(nbd.flush(), "flush").unwrap();
    nbd.disconnect();
    srv.stop();
    e2fsck(&image).unwrap();
}

/// Thousands of connections open and close (good names, bad names, listing, abrupt
/// drops) while four clients write and verify their own regions of one file.
#[test]
fn connection_storm_while_writing() {
    let dir = TestDir::new("storm");
    let (image, hello) = image(&dir);
    let mut srv = Srv::start(dir.path(), &[], &strs(&file_plugin(&image, "exportname")));
    let sock = srv.socket().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let target: u64 = std::env::var("EXT2FILTER_STORM_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if valgrind_enabled() { 100 } else { 3000 });
    let region = 4u64 << 20;
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (sock, stop, errors) = (sock.clone(), stop.clone(), errors.clone());
            thread::spawn(move || {
                let mut nbd = Nbd::connect(&sock, b"/sparse").expect("writer connect");
                let mut model = ByteModel::new(vec![0; region as usize]);
                let mut rng = XorShift::new(w + 1);
                let base = w * region;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 50 {
                    let len = 1 + rng.next_u64() % 20_000;
                    let off = rng.next_u64() % (region - len);
                    let bytes = random_bytes(rng.next_u64(), len as usize);
                    match nbd.write(base + off, &bytes, 0) {
                        Ok(Ok(())) => model.write(off, &bytes),
                        other => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("writer {w}: write failed: {other:?}"));
                            return;
                        }
                    }
                    n += 1;
                }
                let mut all = Vec::new();
                let mut off = 0;
                while off < region {
                    match nbd.read(base + off, 1 << 20) {
                        Ok(Ok(buf)) => all.extend(buf),
                        other => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("writer {w}: read failed: {other:?}"));
                            return;
                        }
                    }
                    off += 1 << 20;
                }
                if let Err(e) = model.check(&all, &format!("writer {w}")) {
                    errors.lock().unwrap().push(e);
                }
                let _ = nbd.flush();
                nbd.disconnect();
            })
        })
        .collect();
    let started = Instant::now();
    let churners: Vec<_> = (0..2u64)
        .map(|c| {
            let (sock, connections, errors, hello) = (
                sock.clone(),
                connections.clone(),
                errors.clone(),
                hello.clone(),
            );
            thread::spawn(move || {
                let mut rng = XorShift::new(100 + c);
                while connections.fetch_add(1, Ordering::Relaxed) < target {
                    let r = rng.next_u64() % 6;
                    let result: Result<(), String> = match r {
                        0 => list_exports(&sock)
                            .map(|_| ())
                            .map_err(|e| format!("list: {e}")),
                        1 => match Nbd::connect(&sock, b"/nonexistent") {
                            Err(ConnectError::Refused { .. }) => Ok(()),
                            other => Err(format!("/nonexistent: {:?}", other.map(|n| n.size))),
                        },
                        2 => match Nbd::connect(&sock, b"/dir") {
                            Err(ConnectError::Refused { .. }) => Ok(()),
                            other => Err(format!("/dir: {:?}", other.map(|n| n.size))),
                        },
                        3 => Nbd::connect(&sock, b"/hello")
                            .map(drop)
                            .map_err(|e| format!("/hello: {e}")),
                        4 => greet(&sock).map(drop).map_err(|e| format!("greet: {e}")),
                        _ => match Nbd::connect(&sock, b"/hello") {
                            Ok(mut nbd) => match nbd.read(0, 1000) {
                                Ok(Ok(buf)) if buf == hello[..1000] => {
                                    nbd.disconnect();
                                    Ok(())
                                }
                                other => Err(format!("/hello read: {other:?}")),
                            },
                            Err(e) => Err(format!("/hello: {e}")),
                        },
                    };
                    if let Err(e) = result {
                        errors.lock().unwrap().push(e);
                        return;
                    }
                }
            })
        })
        .collect();
    for c in churners {
        c.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    eprintln!(
        "{} connections in {:.1} s",
        connections.load(Ordering::Relaxed).min(target),
        started.elapsed().as_secs_f64()
    );
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{}\n{}",
        errors.join("\n"),
        tail(&srv.log(), 3000)
    );
    srv.assert_alive("after the storm");
    srv.stop();
    e2fsck(&image).unwrap();
    let _ = Duration::from_secs(0);
}
