//! Read-only (`nbdkit -r`): reads are exact, writes are refused, and the image's bytes
//! are identical afterwards, even after client flushes and a clean server exit, in
//! single-file and exportname modes; the plugin itself is opened read-only, and never
//! read-write (`nbdkit -v` shows no `open readonly=0`). A writable server opens it
//! read-only at start and read-write once, for its first writable connection, however
//! many connections arrive at once.

mod common;

use common::*;

#[test]
fn readonly_reads_work_and_image_is_unchanged() {
    let dir = TestDir::new("readonly_reads_work_and_image_is_unchanged");
    let content = random_bytes(91, 3 * MIB as usize + 17);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let before = read_file(&image);
    let mut server = Server::start(
        &dir,
        &["-r"],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &["--no-extents"]),
        &content,
        "nbdcopy under -r",
    );
    let out = nbdsh(
        &server.uri(),
        "assert h.is_read_only()\n\
         try:\n\
         \x20   h.pwrite(b'x' * 10, 0)\n\
         \x20   print('write-succeeded')\n\
         except nbd.Error:\n\
         \x20   print('write-refused')\n\
         if h.can_flush():\n\
         \x20   h.flush()\n\
         \x20   h.flush()\n",
        &[],
    );
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "write-refused");
    server.stop();
    assert_bytes_eq(
        &read_file(&image),
        &before,
        "image bytes after a read-only session",
    );
}

#[test]
fn readonly_exportname_mode_leaves_image_unchanged() {
    let dir = TestDir::new("readonly_exportname_mode_leaves_image_unchanged");
    let a = random_bytes(92, 100_000);
    let b = random_bytes(93, 1_000_000);
    let sparse = SparseFile {
        len: 2 * MIB,
        pieces: vec![(MIB + 1, random_bytes(94, 1000))],
    };
    let image = ImageBuilder::new(FsType::Ext2)
        .block_size(1024)
        .size(16 * MIB)
        .file("/a", &a)
        .file("/sub/b", &b)
        .sparse_file("/sparse", &sparse)
        .build(&dir, "fs.img");
    let before = read_file(&image);
    let mut server = Server::start(
        &dir,
        &["-r"],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    for (name, expected) in [
        ("/a", a.clone()),
        ("sub/b", b.clone()),
        ("/sparse", sparse.contents()),
    ] {
        let uri = server.export_uri(name);
        assert_bytes_eq(&nbdcopy_read(&uri, &dir, &[]), &expected, name);
        nbdsh(&uri, "if h.can_flush():\n    h.flush()\n", &[]).assert_success();
    }
    // A failed open must not write either.
    nbdsh(&server.export_uri("/missing"), "pass", &[]).assert_failure();
    server.stop();
    assert_bytes_eq(
        &read_file(&image),
        &before,
        "image bytes after a read-only session",
    );
}

/// With `-r` the filter must open the plugin read-only: the eval plugin records the
/// `readonly` argument of every open.
#[test]
fn readonly_opens_plugin_readonly() {
    let dir = TestDir::new("readonly_opens_plugin_readonly");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let before = read_file(&image);
    let open_log = dir.join("opens.log");
    let mut plugin_args = eval_plugin_args(&image, &open_log);
    plugin_args.push("ext2file=/hello.txt".to_string());
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &["-r"], &plugin_args);
    assert_eq!(nbd_pread(&server.uri(), 0, 12), b"hello world\n");
    server.stop();
    let log = std::fs::read_to_string(&open_log).unwrap_or_default();
    let opens: Vec<&str> = log.lines().filter(|l| l.starts_with("open ")).collect();
    assert!(!opens.is_empty(), "the eval plugin was never opened");
    for open in &opens {
        assert_eq!(
            *open, "open true",
            "the plugin was opened writable under -r (plugin calls: {log:?})"
        );
    }
    assert!(
        !log.contains("pwrite"),
        "the plugin was written to under -r: {log:?}"
    );
    assert_bytes_eq(
        &read_file(&image),
        &before,
        "image bytes after a read-only session",
    );
}

/// Without `-r` the same eval setup serves writes (checks the eval plugin arguments).
#[test]
fn eval_plugin_setup_serves_writes() {
    let dir = TestDir::new("eval_plugin_setup_serves_writes");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let open_log = dir.join("opens.log");
    let mut plugin_args = eval_plugin_args(&image, &open_log);
    plugin_args.push("ext2file=/hello.txt".to_string());
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &[], &plugin_args);
    nbd_pwrite(&server.uri(), 6, b"WORLD");
    server.stop();
    assert_eq!(debugfs_dump(&image, "/hello.txt"), b"hello WORLD\n");
    e2fsck_clean(&image);
}

/// An ext3/ext4 image whose journal needs recovery is served read-only (the filter
/// cannot replay it into the image) with a message, and not one byte is written.
#[test]
fn journal_needing_recovery_is_served_read_only() {
    for fs in [FsType::Ext3, FsType::Ext4] {
        let name = format!("journal_needing_recovery_{}", fs.name());
        let dir = TestDir::new(&name);
        let content = random_bytes(95, 300_001);
        let image = ImageBuilder::new(fs)
            .size(16 * MIB)
            .file("/data.bin", &content)
            .build(&dir, "fs.img");
        debugfs_write(&image, &["feature needs_recovery".to_string()]);
        let before = read_file(&image);
        let mut server = Server::start(
            &dir,
            &[],
            &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
        );
        let out = nbdsh(
            &server.uri(),
            "import sys\n\
             print(h.is_read_only())\n\
             sys.stdout.flush()\n\
             sys.stdout.buffer.write(h.pread(300001, 0))\n",
            &[],
        );
        out.assert_success();
        assert!(
            out.stdout.starts_with(b"True\n"),
            "{name}: export is not read-only"
        );
        assert_bytes_eq(&out.stdout[5..], &content, &name);
        assert!(server.is_running());
        let log = server.log();
        assert!(
            log.contains("recovery"),
            "{name}: no message about the journal:\n{log}"
        );
        server.stop();
        assert_bytes_eq(&read_file(&image), &before, &format!("{name}: image bytes"));
    }
}

/// A plugin that cannot write (eval without pwrite) gives a read-only export, with the
/// plugin opened read-only.
#[test]
fn plugin_without_write_gives_read_only_export() {
    let dir = TestDir::new("plugin_without_write_gives_read_only_export");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let before = read_file(&image);
    let log = dir.join("calls.log");
    let mut plugin_args: Vec<String> = eval_plugin_args(&image, &log)
        .into_iter()
        .filter(|arg| !arg.starts_with("pwrite=") && !arg.starts_with("flush="))
        .collect();
    plugin_args.push("ext2file=/hello.txt".to_string());
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &[], &plugin_args);
    let out = nbdsh(
        &server.uri(),
        "print(h.is_read_only(), bytes(h.pread(12, 0)))",
        &[],
    );
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "True b'hello world\\n'");
    server.stop();
    assert_bytes_eq(&read_file(&image), &before, "image bytes");
}

/// The plugin's opens, in nbdkit's debug output (`-v`): one line per `open readonly=N`
/// of the plugin (`file`), not of our filter.
fn plugin_opens(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("debug: file: open readonly="))
        .collect()
}

/// `nbdkit -r` never opens the plugin read-write: not at start, not for listing
/// exports, not for a client that tries to write, in either mode.
#[test]
fn readonly_server_never_opens_the_plugin_read_write() {
    let dir = TestDir::new("readonly_server_never_opens_the_plugin_rw");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .build(&dir, "fs.img");
    let before = read_file(&image);
    for (ext2file, uri) in [
        ("/hello.txt", "$uri"),
        ("exportname", "nbd+unix:///hello.txt?socket=$unixsocket"),
    ] {
        let out = nbdkit_run(
            &["-r", "-v"],
            &[
                "file",
                image.to_str().unwrap(),
                &format!("ext2file={ext2file}"),
            ],
            &format!(
                "nbdinfo --list \"$uri\" >/dev/null && \
                 nbdsh -u \"{uri}\" -c '\n\
                 try:\n    h.pwrite(b\"x\", 0)\nexcept nbd.Error:\n    pass\n\
                 print(bytes(h.pread(11, 0)))' && \
                 nbdcopy \"{uri}\" /dev/null"
            ),
        );
        out.assert_success();
        assert!(
            out.stdout_text().contains("hello world"),
            "{}",
            out.stdout_text()
        );
        let opens = plugin_opens(&out.stderr);
        assert!(
            !opens.is_empty(),
            "no plugin open in the log:\n{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("open readonly=0"),
            "ext2file={ext2file}: nbdkit -r opened something read-write:\n{}",
            out.stderr
        );
    }
    assert_bytes_eq(&read_file(&image), &before, "image bytes");
}

/// Without `-r`: the plugin is opened read-only at start, before any client, and
/// read-write exactly once, by the first writable connection, even when several
/// arrive together; every one of them then writes, and what each wrote is there.
#[test]
fn writable_server_reopens_the_plugin_read_write_once() {
    let dir = TestDir::new("writable_server_reopens_once");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/data.bin", &vec![0u8; 64 * 1024])
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &["-v"],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
    );
    // Opened at start (Server::start waits until nbdkit greets, i.e. after
    // `.after_fork`), read-only, with no client yet.
    assert_eq!(
        plugin_opens(&server.log()),
        vec!["nbdkit: debug: file: open readonly=1 exportname=\"\" tls=0"],
        "at start"
    );
    // Eight writable connections at once, each writing its own 4 KiB.
    let clients: Vec<_> = (0..8u8)
        .map(|i| {
            let uri = server.uri();
            std::thread::spawn(move || {
                nbd_pwrite(&uri, u64::from(i) * 4096, &[i + 1; 4096]);
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
    let got = nbd_pread(&server.uri(), 0, 8 * 4096);
    for i in 0..8u8 {
        let part = &got[usize::from(i) * 4096..usize::from(i + 1) * 4096];
        assert!(part.iter().all(|&b| b == i + 1), "client {i}'s write");
    }
    let log = server.log();
    let opens = plugin_opens(&log);
    assert_eq!(
        opens.iter().filter(|l| l.contains("readonly=0")).count(),
        1,
        "the plugin must be opened read-write once:\n{}",
        opens.join("\n")
    );
    assert_eq!(opens.len(), 2, "{}", opens.join("\n"));
    server.stop();
    e2fsck_clean(&image);
}
