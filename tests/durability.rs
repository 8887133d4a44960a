//! Durability: a client writes (into data and into holes, so block bitmaps, group
//! descriptors, free counts and the file's block map all change), then flushes, or uses
//! FUA writes instead; the client itself then `kill -9`s nbdkit while still connected, so
//! no cleanup, close or finalize can run. Afterwards `debugfs dump` must show the new
//! bytes and `e2fsck -fn` must find the filesystem clean. On every ext2/3/4 × 1/4 KiB.

mod common;

use common::*;

/// Writes that change the file's data and its metadata: one into existing data, many
/// scattered into holes (enough to outgrow the 4 extents kept in an ext4 inode, and to
/// need indirect and double-indirect blocks on ext2/ext3), and the file's last byte.
fn planned_writes(block_size: u64, len: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut writes = vec![
        (MIB + 3, random_bytes(seed, 10_000)),
        (5, random_bytes(seed + 1, 100)),
        (len - 1, vec![0x7f]),
    ];
    for i in 0..12u64 {
        // Holes between 2 MiB and 6 MiB, one write every ~330 KiB, each unaligned.
        let offset = 2 * MIB + i * 330 * KIB + i * 7 + 1;
        writes.push((
            offset,
            random_bytes(seed + 10 + i, block_size as usize + 100),
        ));
    }
    writes
}

fn check_durable_after_kill9(fs: FsType, block_size: u32, mode: WriteFlush, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let sparse = SparseFile {
        len: 7 * MIB + 11,
        pieces: vec![(MIB, random_bytes(seed, 64 * KIB as usize))],
    };
    let neighbour = random_bytes(seed ^ 5, 300_000);
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(32 * MIB)
        .file("/neighbour", &neighbour)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    let writes = planned_writes(block_size as u64, sparse.len, seed);
    let mut expected = sparse.contents();
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }

    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let ops: Vec<String> = writes
        .iter()
        .map(|(o, d)| format!("({o}, {})", d.len()))
        .collect();
    let flags = if mode == WriteFlush::Fua {
        "nbd.CMD_FLAG_FUA"
    } else {
        "0"
    };
    let flush = if mode == WriteFlush::Flush {
        "h.flush()"
    } else {
        "pass"
    };
    // The client kills the server while its connection is still open.
    let script = format!(
        "import os, signal, sys\n\
         data = sys.stdin.buffer.read()\n\
         pos = 0\n\
         for off, n in [{}]:\n\
         \x20   h.pwrite(data[pos:pos + n], off, {flags})\n\
         \x20   pos += n\n\
         {flush}\n\
         os.kill({}, signal.SIGKILL)\n\
         print('killed', flush=True)\n\
         os._exit(0)\n",
        ops.join(", "),
        server.pid()
    );
    let input: Vec<u8> = writes.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let out = nbdsh(&server.uri(), &script, &input);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "killed");
    server.kill9();

    assert_bytes_eq(
        &debugfs_dump(&image, "/target"),
        &expected,
        "debugfs dump of /target after kill -9",
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/neighbour"),
        &neighbour,
        "/neighbour after kill -9",
    );
    e2fsck_clean(&image);
}

macro_rules! durability_tests {
    ($mode:expr => $($name:ident: ($fs:expr, $bs:expr)),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_durable_after_kill9($fs, $bs, $mode, stringify!($name));
            }
        )*
    };
}

durability_tests!(WriteFlush::Flush =>
    flush_durable_across_kill9_ext2_1k: (FsType::Ext2, 1024),
    flush_durable_across_kill9_ext2_4k: (FsType::Ext2, 4096),
    flush_durable_across_kill9_ext3_1k: (FsType::Ext3, 1024),
    flush_durable_across_kill9_ext3_4k: (FsType::Ext3, 4096),
    flush_durable_across_kill9_ext4_1k: (FsType::Ext4, 1024),
    flush_durable_across_kill9_ext4_4k: (FsType::Ext4, 4096),
);

durability_tests!(WriteFlush::Fua =>
    fua_durable_across_kill9_ext2_1k: (FsType::Ext2, 1024),
    fua_durable_across_kill9_ext2_4k: (FsType::Ext2, 4096),
    fua_durable_across_kill9_ext3_1k: (FsType::Ext3, 1024),
    fua_durable_across_kill9_ext3_4k: (FsType::Ext3, 4096),
    fua_durable_across_kill9_ext4_1k: (FsType::Ext4, 1024),
    fua_durable_across_kill9_ext4_4k: (FsType::Ext4, 4096),
);

/// A flush on one connection makes another connection's earlier (unflushed) writes
/// durable too, as multi-conn promises.
#[test]
fn flush_on_one_connection_covers_another() {
    let dir = TestDir::new("flush_on_one_connection_covers_another");
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![(0, random_bytes(81, 4096))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    let uri = server.uri();
    let script = format!(
        "import nbd, os, signal\n\
         signal.alarm(30)  # fail instead of hanging if the connections are serialized\n\
         a = nbd.NBD(); a.connect_uri({uri:?})\n\
         b = nbd.NBD(); b.connect_uri({uri:?})\n\
         a.pwrite(b'\\x33' * 5000, 2 * 1024 * 1024 + 1)\n\
         b.flush()\n\
         os.kill({}, signal.SIGKILL)\n\
         print('killed', flush=True)\n\
         os._exit(0)\n",
        server.pid()
    );
    let out = python(&script, &[]);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "killed");
    server.kill9();
    let mut expected = sparse.contents();
    expected[2 * MIB as usize + 1..2 * MIB as usize + 5001].fill(0x33);
    assert_bytes_eq(
        &debugfs_dump(&image, "/target"),
        &expected,
        "debugfs dump of /target",
    );
    e2fsck_clean(&image);
}

/// Checks, at the moment the client's flush (or FUA write) returns, that the plugin has
/// been flushed after the last write the filter sent it (data and metadata).
fn check_plugin_flushed(mode: WriteFlush, name: &str) {
    let dir = TestDir::new(name);
    let sparse = SparseFile {
        len: 2 * MIB,
        pieces: vec![(0, random_bytes(82, 4096))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    let log = dir.join("plugin-calls.log");
    let mut plugin_args = eval_plugin_args(&image, &log);
    plugin_args.push("ext2file=/target".to_string());
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir, &[], &plugin_args);
    let (flags, flush) = match mode {
        WriteFlush::Fua => ("nbd.CMD_FLAG_FUA", ""),
        _ => ("0", "h.flush()"),
    };
    let script = format!(
        "h.pwrite(b'\\x44' * 5000, 1024 * 1024 + 3, {flags})\n\
         {flush}\n\
         print(open({:?}).read(), end='')\n",
        log.to_str().unwrap()
    );
    let out = nbdsh(&server.uri(), &script, &[]);
    out.assert_success();
    // A clean exit lets the plugin's scripts finish before the directory is removed.
    server.stop();
    let calls = out.stdout_text();
    let lines: Vec<&str> = calls.lines().collect();
    let last_write = lines.iter().rposition(|l| *l == "pwrite");
    let last_flush = lines.iter().rposition(|l| *l == "flush");
    assert!(
        last_write.is_some(),
        "the plugin was never written: {calls:?}"
    );
    assert!(
        last_flush > last_write,
        "the plugin was not flushed after the last write when the client's {mode:?} returned: {calls:?}"
    );
}

#[test]
fn client_flush_reaches_plugin_flush() {
    check_plugin_flushed(WriteFlush::Flush, "client_flush_reaches_plugin_flush");
}

#[test]
fn fua_write_reaches_plugin_flush() {
    check_plugin_flushed(WriteFlush::Fua, "fua_write_reaches_plugin_flush");
}

/// Clients that vanish in the middle of large writes into holes (the process exits with
/// requests in flight) leave the server serving and the filesystem clean; the bytes of
/// the abandoned writes are old or new, nothing else.
#[test]
fn clients_vanishing_mid_write_leave_filesystem_clean() {
    let dir = TestDir::new("clients_vanishing_mid_write_leave_filesystem_clean");
    let sparse = SparseFile {
        len: 48 * MIB,
        pieces: vec![(0, random_bytes(83, 100_000))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(64 * MIB)
        .sparse_file("/target", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/target"],
    );
    for round in 0..3u64 {
        let script = format!(
            "import os, time\n\
             buf = bytes([0x40 + {round}]) * (8 * 1024 * 1024)\n\
             h.aio_pwrite(buf, {} * 1024 * 1024 + 1)\n\
             h.aio_pwrite(buf, {} * 1024 * 1024 + 7)\n\
             time.sleep(0.01 * {round})\n\
             os._exit(0)\n",
            1 + round * 16,
            7 + round * 16,
        );
        nbdsh(&server.uri(), &script, &[]).assert_success();
        assert!(server.is_running(), "round {round} killed the server");
    }
    nbd_pwrite(&server.uri(), 5, b"still writable");
    server.stop();
    e2fsck_clean(&image);
    let dumped = debugfs_dump(&image, "/target");
    let mut expected = sparse.contents();
    expected[5..19].copy_from_slice(b"still writable");
    assert_bytes_eq(&dumped[..100_000], &expected[..100_000], "the file's start");
    for (i, (&got, &old)) in dumped.iter().zip(&expected).enumerate().skip(100_000) {
        assert!(
            got == old || (0x40..=0x42).contains(&got),
            "byte {i} is {got:#x}: neither old nor written"
        );
    }
}
