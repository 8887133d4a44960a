//! Concurrency: the thread model is parallel; `can_multi_conn` is true over the file
//! plugin; several simultaneous connections (threads in one Python process, one
//! `nbd.NBD()` handle each, exportname mode with two files) read and write disjoint
//! ranges, and after a writer's flush every other connection sees its data; several
//! connections writing different parts of the same hole at once (block-aligned, and
//! sharing blocks) leave every byte right and the filesystem clean; requests from
//! different connections really run at the same time (timed through the delay filter).

mod common;

use common::*;

/// Python helpers prepended to every multi-connection script: a watchdog (so a filter
/// that serializes connections fails the test instead of hanging it) and parallel
/// connection setup.
const PYTHON_PRELUDE: &str = r#"
import nbd, os, sys, threading, time

def _watchdog(seconds, what):
    def fire():
        print("TIMEOUT: " + what, flush=True)
        sys.stderr.write("TIMEOUT: " + what + "\n")
        sys.stderr.flush()
        os._exit(3)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t

def connect_all(uris, seconds=30):
    """Opens one handle per URI, all at the same time; fails if they cannot all be
    connected together (e.g. the server serializes connections)."""
    handles = [None] * len(uris)
    def one(i):
        h = nbd.NBD()
        h.connect_uri(uris[i])
        handles[i] = h
    dog = _watchdog(seconds, "could not open %d connections at the same time" % len(uris))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(uris))]
    for t in threads: t.start()
    for t in threads: t.join()
    dog.cancel()
    assert all(h is not None for h in handles), "a connection failed"
    return handles

def run_threads(fns, seconds=120):
    errors = []
    def wrap(fn):
        try:
            fn()
        except BaseException as e:
            import traceback
            errors.append(traceback.format_exc())
    dog = _watchdog(seconds, "threads did not finish")
    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads: t.start()
    for t in threads: t.join()
    dog.cancel()
    if errors:
        for e in errors: sys.stderr.write(e + "\n")
        sys.exit(1)
"#;

fn python_with_prelude(script: &str, stdin: &[u8]) -> CmdOutput {
    python(&format!("{PYTHON_PRELUDE}\n{script}"), stdin)
}

fn py_list(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

#[test]
fn thread_model_is_parallel() {
    let out = nbdkit_query(&["--dump-plugin"], &["file"]);
    out.assert_success();
    let text = out.stdout_text();
    assert!(
        text.contains("\nthread_model=parallel\n"),
        "--dump-plugin output:\n{text}"
    );
}

#[test]
fn can_multi_conn_over_file_plugin() {
    let dir = TestDir::new("can_multi_conn_over_file_plugin");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/f", &random_bytes(1, 10_000))
        .build(&dir, "fs.img");
    let server = Server::start(&dir, &[], &["file", image.to_str().unwrap(), "ext2file=/f"]);
    let out = nbdsh(&server.uri(), "print(h.can_multi_conn())", &[]);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "True");
}

/// Two connections open at the same time: what one writes and flushes, the other (opened
/// before the write) reads, in both directions, including into a hole.
#[test]
fn flushed_writes_visible_to_other_connection() {
    let dir = TestDir::new("flushed_writes_visible_to_other_connection");
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![(0, random_bytes(2, MIB as usize))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .sparse_file("/f", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(&dir, &[], &["file", image.to_str().unwrap(), "ext2file=/f"]);
    let uri = server.uri();
    let script = format!(
        r#"
a, b = connect_all([{uri:?}, {uri:?}])
# Read first so any per-connection caching would hold stale data.
assert a.pread(4096, 1000) == b.pread(4096, 1000)
assert b.pread(5000, 3 * 1024 * 1024 + 7) == bytes(5000)
a.pwrite(b"\x11" * 4096, 1000)
a.flush()
assert b.pread(4096, 1000) == b"\x11" * 4096, "b does not see a's flushed write"
b.pwrite(b"\x22" * 5000, 3 * 1024 * 1024 + 7)
b.flush()
assert a.pread(5000, 3 * 1024 * 1024 + 7) == b"\x22" * 5000, "a does not see b's flushed write into a hole"
print("ok")
"#
    );
    let out = python_with_prelude(&script, &[]);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "ok");
    server.stop();
    let mut expected = sparse.contents();
    expected[1000..5096].fill(0x11);
    expected[3 * MIB as usize + 7..3 * MIB as usize + 5007].fill(0x22);
    assert_bytes_eq(&debugfs_dump(&image, "/f"), &expected, "debugfs dump of /f");
    e2fsck_clean(&image);
}

/// One planned write: which connection, where, what.
struct PlannedWrite {
    connection: usize,
    offset: u64,
    data: Vec<u8>,
}

/// Six connections in exportname mode (four on /target, two on /second) write disjoint
/// ranges (in data and holes, unaligned) and read untouched ranges at the same time;
/// after everyone has flushed, every connection checks every range of its file.
#[test]
fn concurrent_connections_disjoint_ranges() {
    let dir = TestDir::new("concurrent_connections_disjoint_ranges");
    let target = SparseFile {
        len: 8 * MIB + 5,
        pieces: vec![
            (0, random_bytes(3, 2 * MIB as usize)),
            (5 * MIB, random_bytes(4, MIB as usize)),
        ],
    };
    // Also sparse, so both files allocate blocks at the same time.
    let second = SparseFile {
        len: 3 * MIB + 1,
        pieces: vec![(MIB / 2, random_bytes(5, 300_000))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(32 * MIB)
        .sparse_file("/target", &target)
        .sparse_file("/second", &second)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    let exports = [
        "/target", "/target", "/target", "/target", "/second", "second",
    ];
    let mut expected_target = target.contents();
    let mut expected_second = second.contents();
    // Connection c writes 8 chunks of 37,001 bytes in its own stripe of the file.
    let mut writes = Vec::new();
    for (connection, export) in exports.iter().enumerate() {
        let on_target = export.ends_with("target");
        let stripe = if on_target {
            connection as u64
        } else {
            connection as u64 - 4
        };
        let stripe_size = if on_target { 2 * MIB } else { MIB };
        let spacing = stripe_size * 3 / 32;
        for chunk in 0..8u64 {
            let offset = stripe * stripe_size + chunk * spacing + 13 * connection as u64 + 1;
            let data = random_bytes(100 + connection as u64 * 8 + chunk, 37_001);
            let expected = if on_target {
                &mut expected_target
            } else {
                &mut expected_second
            };
            expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            writes.push(PlannedWrite {
                connection,
                offset,
                data,
            });
        }
    }
    // Ranges nobody writes, read while the writes happen: at 7/8 of each stripe.
    let untouched: Vec<(usize, u64, usize)> = (0..exports.len())
        .map(|c| {
            let on_target = c < 4;
            let stripe = if on_target { c as u64 } else { c as u64 - 4 };
            let stripe_size = if on_target { 2 * MIB } else { MIB };
            (c, stripe * stripe_size + stripe_size * 7 / 8, 50_000usize)
        })
        .collect();

    let mut blob = Vec::new();
    let mut write_ops = Vec::new();
    for w in &writes {
        write_ops.push(format!(
            "({}, {}, {}, {})",
            w.connection,
            w.offset,
            w.data.len(),
            blob.len()
        ));
        blob.extend_from_slice(&w.data);
    }
    let mut untouched_ops = Vec::new();
    for &(c, offset, len) in &untouched {
        let source = if c < 4 {
            &expected_target
        } else {
            &expected_second
        };
        untouched_ops.push(format!("({c}, {offset}, {len}, {})", blob.len()));
        blob.extend_from_slice(&source[offset as usize..offset as usize + len]);
    }
    let uris: Vec<String> = exports
        .iter()
        .map(|e| format!("{:?}", server.export_uri(e)))
        .collect();
    let file_of: Vec<String> = exports
        .iter()
        .map(|e| format!("{:?}", e.trim_start_matches('/')))
        .collect();
    let script = r#"
blob = sys.stdin.buffer.read()
uris = URIS
file_of = FILE_OF
writes = WRITES
untouched = UNTOUCHED
handles = connect_all(uris)
barrier = threading.Barrier(len(handles))

def worker(c):
    h = handles[c]
    for (wc, off, n, pos) in writes:
        if wc == c:
            h.pwrite(blob[pos:pos + n], off)
    for (uc, off, n, pos) in untouched:
        if file_of[uc] == file_of[c]:
            assert h.pread(n, off) == blob[pos:pos + n], "untouched range changed"
    h.flush()
    barrier.wait()
    for (wc, off, n, pos) in writes:
        if file_of[wc] == file_of[c]:
            got = h.pread(n, off)
            assert got == blob[pos:pos + n], "connection %d does not see connection %d's write at %d" % (c, wc, off)

run_threads([lambda c=c: worker(c) for c in range(len(handles))])
for h in handles:
    h.shutdown()
print("ok")
"#
    .replace("URIS", &py_list(&uris))
    .replace("FILE_OF", &py_list(&file_of))
    .replace("WRITES", &py_list(&write_ops))
    .replace("UNTOUCHED", &py_list(&untouched_ops));
    let out = python_with_prelude(&script, &blob);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "ok");
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&image, "/target"),
        &expected_target,
        "debugfs dump of /target",
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/second"),
        &expected_second,
        "debugfs dump of /second",
    );
    e2fsck_clean(&image);
}

/// `connections` connections write chunks of `chunk` bytes round-robin into one hole of
/// `hole_len` bytes at `hole_start` simultaneously, each in its own order; then every
/// byte is checked live, in the image, and the filesystem must be clean (no block
/// allocated twice, no lost block).
fn check_concurrent_writers_into_one_hole(fs: FsType, block_size: u32, chunk: usize, name: &str) {
    const CONNECTIONS: usize = 4;
    let dir = TestDir::new(name);
    let hole_start = MIB + 3;
    let hole_len = 2 * MIB as usize;
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![
            (0, random_bytes(6, 4096)),
            (3 * MIB + 100, random_bytes(7, 4096)),
        ],
    };
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(32 * MIB)
        .file("/before", &random_bytes(8, 100_000))
        .sparse_file("/holey", &sparse)
        .file("/after", &random_bytes(9, 100_000))
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/holey"],
    );
    let hole_data = random_bytes(seed_from(name), hole_len);
    let script = r#"
blob = sys.stdin.buffer.read()
handles = connect_all([URI] * CONNECTIONS)
barrier = threading.Barrier(CONNECTIONS)
chunks = [(i, min(CHUNK, len(blob) - i)) for i in range(0, len(blob), CHUNK)]

def worker(c):
    h = handles[c]
    mine = [ch for k, ch in enumerate(chunks) if k % CONNECTIONS == c]
    if c % 2 == 1:
        mine.reverse()
    barrier.wait()
    for (pos, n) in mine:
        h.pwrite(blob[pos:pos + n], HOLE_START + pos)
    h.flush()

run_threads([lambda c=c: worker(c) for c in range(CONNECTIONS)])
got = handles[0].pread(len(blob), HOLE_START)
if got != blob:
    bad = [i for i in range(len(blob)) if got[i] != blob[i]]
    sys.stderr.write("%d wrong bytes in the hole, first at hole offset %d\n" % (len(bad), bad[0]))
    sys.exit(1)
print("ok")
"#
    .replace("URI", &format!("{:?}", server.uri()))
    .replace("CONNECTIONS", &CONNECTIONS.to_string())
    .replace("CHUNK", &chunk.to_string())
    .replace("HOLE_START", &hole_start.to_string());
    let out = python_with_prelude(&script, &hole_data);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "ok");
    server.stop();
    let mut expected = sparse.contents();
    expected[hole_start as usize..hole_start as usize + hole_len].copy_from_slice(&hole_data);
    assert_bytes_eq(
        &debugfs_dump(&image, "/holey"),
        &expected,
        "debugfs dump of /holey",
    );
    e2fsck_clean(&image);
    assert_bytes_eq(
        &debugfs_dump(&image, "/after"),
        &random_bytes(9, 100_000),
        "/after untouched",
    );
}

#[test]
fn concurrent_writers_into_one_hole_separate_blocks_ext4() {
    check_concurrent_writers_into_one_hole(
        FsType::Ext4,
        4096,
        64 * 1024,
        "concurrent_writers_into_one_hole_separate_blocks_ext4",
    );
}

#[test]
fn concurrent_writers_into_one_hole_separate_blocks_ext2() {
    check_concurrent_writers_into_one_hole(
        FsType::Ext2,
        1024,
        16 * 1024,
        "concurrent_writers_into_one_hole_separate_blocks_ext2",
    );
}

/// Chunks of 1,000 bytes: neighbouring connections write different bytes of the same
/// newly allocated block at the same time.
#[test]
fn concurrent_writers_into_one_hole_sharing_blocks_ext4() {
    check_concurrent_writers_into_one_hole(
        FsType::Ext4,
        4096,
        1000,
        "concurrent_writers_into_one_hole_sharing_blocks_ext4",
    );
}

#[test]
fn concurrent_writers_into_one_hole_sharing_blocks_ext3() {
    check_concurrent_writers_into_one_hole(
        FsType::Ext3,
        1024,
        300,
        "concurrent_writers_into_one_hole_sharing_blocks_ext3",
    );
}

/// Requests from different connections overlap in time: with the delay filter adding
/// 100 ms to every plugin read, 8 connections × 3 reads of distinct data take 2.4 s if
/// serialized and about 0.3 s if parallel.
#[test]
fn connections_are_served_in_parallel() {
    let dir = TestDir::new("connections_are_served_in_parallel");
    let content = random_bytes(10, 8 * MIB as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(32 * MIB)
        .file("/f", &content)
        .build(&dir, "fs.img");
    let server = Server::start(
        &dir,
        &[],
        &[
            "--filter=delay",
            "file",
            image.to_str().unwrap(),
            "ext2file=/f",
            "rdelay=100ms",
        ],
    );
    let script = r#"
CONNECTIONS = 8
handles = connect_all([URI] * CONNECTIONS, seconds=60)
for c, h in enumerate(handles):
    h.pread(4096, 7 * 1024 * 1024 + c * 4096)   # warm up anything lazy
barrier = threading.Barrier(CONNECTIONS)
elapsed = [0.0] * CONNECTIONS
def worker(c):
    barrier.wait()
    start = time.monotonic()
    for r in range(3):
        h = handles[c]
        off = (c * 3 + r) * 128 * 1024
        h.pread(65536, off)
    elapsed[c] = time.monotonic() - start
start = time.monotonic()
run_threads([lambda c=c: worker(c) for c in range(CONNECTIONS)])
print("%.3f" % (time.monotonic() - start))
"#
    .replace("URI", &format!("{:?}", server.uri()));
    let out = python_with_prelude(&script, &[]);
    out.assert_success();
    let seconds: f64 = out.stdout_text().trim().parse().unwrap();
    assert!(
        seconds < 1.2,
        "24 delayed reads over 8 connections took {seconds} s: requests are serialized (parallel would take ~0.3 s)"
    );
}

/// Two names for one inode (a hard link) in exportname mode: connections through
/// either name write into the same holes at the same time and see each other's
/// flushed writes; the inode's block map and block count stay consistent.
#[test]
fn hard_linked_names_share_one_file() {
    let dir = TestDir::new("hard_linked_names_share_one_file");
    let sparse = SparseFile {
        len: 4 * MIB,
        pieces: vec![(0, random_bytes(20, 4096))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .sparse_file("/x", &sparse)
        .hard_link("/hardlink", "/x")
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    let hole_data = random_bytes(21, 2 * MIB as usize);
    let script = r#"
blob = sys.stdin.buffer.read()
a, b, c, d = connect_all([URI_X, URI_LINK, URI_X, URI_LINK])
# Sequential: each side sees the other's flushed write into a hole.
a.pwrite(b"\x01" * 3000, 3 * 1024 * 1024 + 1)
a.flush()
assert b.pread(3000, 3 * 1024 * 1024 + 1) == b"\x01" * 3000, "hardlink does not see x's write"
b.pwrite(b"\x02" * 3000, 3 * 1024 * 1024 + 100000)
b.flush()
assert a.pread(3000, 3 * 1024 * 1024 + 100000) == b"\x02" * 3000, "x does not see hardlink's write"
# Concurrent: four connections, two per name, fill one hole in interleaved 8 KiB chunks.
handles = [a, b, c, d]
chunks = list(range(0, len(blob), 8192))
def worker(k):
    h = handles[k]
    for i in chunks[k::4]:
        h.pwrite(blob[i:i + 8192], 1024 * 1024 + i)
    h.flush()
run_threads([lambda k=k: worker(k) for k in range(4)])
for h in handles:
    assert h.pread(len(blob), 1024 * 1024) == blob, "wrong bytes in the hole"
print("ok")
"#
    .replace("URI_X", &format!("{:?}", server.export_uri("/x")))
    .replace("URI_LINK", &format!("{:?}", server.export_uri("/hardlink")));
    let out = python_with_prelude(&script, &hole_data);
    out.assert_success();
    assert_eq!(out.stdout_text().trim(), "ok");
    server.stop();
    let mut expected = sparse.contents();
    expected[3 * MIB as usize + 1..3 * MIB as usize + 3001].fill(0x01);
    expected[3 * MIB as usize + 100_000..3 * MIB as usize + 103_000].fill(0x02);
    expected[MIB as usize..3 * MIB as usize].copy_from_slice(&hole_data);
    assert_bytes_eq(&debugfs_dump(&image, "/x"), &expected, "debugfs dump of /x");
    assert_bytes_eq(
        &debugfs_dump(&image, "/hardlink"),
        &expected,
        "debugfs dump of /hardlink",
    );
    e2fsck_clean(&image);
}

/// Randomized stress: 8 connections each own a random set of byte segments (1 to
/// 20,000 bytes, so connections share blocks) of a sparse file, and run 300 random
/// operations on their own segments at the same time: writes (some with FUA), zeroes
/// (with and without NO_HOLE, so whole blocks may be punched), reads checked against the
/// model, flushes. At the end the file matches the model through the filter, in block
/// status, and in the image, and the filesystem is clean.
fn check_random_concurrent_operations(fs: FsType, block_size: u32, name: &str) {
    let dir = TestDir::new(name);
    let seed = seed_from(name) % 1_000_000;
    let sparse = SparseFile {
        len: 6 * MIB + 123,
        pieces: vec![
            (0, random_bytes(seed, 700_000)),
            (2 * MIB + 1, random_bytes(seed + 1, 1_000_000)),
            (5 * MIB, random_bytes(seed + 2, 300_000)),
        ],
    };
    let image = ImageBuilder::new(fs)
        .block_size(block_size)
        .size(32 * MIB)
        .sparse_file("/stress", &sparse)
        .file("/other", &random_bytes(seed + 3, 100_000))
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/stress"],
    );
    let script = r#"
import random
model = bytearray(sys.stdin.buffer.read())
N = 8
handles = connect_all([URI] * N)
rng = random.Random(SEED)
segments = []
pos = 0
while pos < len(model):
    n = min(rng.randint(1, 20000), len(model) - pos)
    segments.append((pos, n))
    pos += n

def worker(k):
    r = random.Random(SEED * 100 + k)
    h = handles[k]
    mine = segments[k::N]
    for step in range(300):
        start, length = r.choice(mine)
        a = r.randrange(length)
        b = r.randint(a + 1, length)
        off, n = start + a, b - a
        x = r.random()
        if x < 0.55:
            data = r.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if r.random() < 0.1 else 0)
            model[off:off + n] = data
        elif x < 0.75:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if r.random() < 0.5 else 0)
            model[off:off + n] = bytes(n)
        elif x < 0.97:
            got = h.pread(n, off)
            if got != model[off:off + n]:
                raise AssertionError("connection %d step %d: pread(%d, %d) differs from the model" % (k, step, n, off))
        else:
            h.flush()
    h.flush()

run_threads([lambda k=k: worker(k) for k in range(N)])
final = handles[0].pread(len(model), 0)
if final != model:
    bad = [i for i in range(len(model)) if final[i] != model[i]]
    sys.stderr.write("%d bytes differ from the model, first at %d\n" % (len(bad), bad[0]))
    sys.exit(1)
sys.stdout.buffer.write(model)
"#
    .replace("URI", &format!("{:?}", server.uri()))
    .replace("SEED", &seed.to_string());
    let out = python_with_prelude(&script, &sparse.contents());
    out.assert_success();
    let model = out.stdout;
    assert_eq!(model.len(), sparse.len as usize);
    let extents = nbd_block_status(&server.uri());
    assert_extents_describe_file(&extents, &model, &[]);
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&image, "/stress"),
        &model,
        "debugfs dump of /stress",
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/other"),
        &random_bytes(seed + 3, 100_000),
        "/other",
    );
    e2fsck_clean(&image);
}

#[test]
fn random_concurrent_operations_ext4_4k() {
    check_random_concurrent_operations(FsType::Ext4, 4096, "random_concurrent_operations_ext4_4k");
}

#[test]
fn random_concurrent_operations_ext4_1k() {
    check_random_concurrent_operations(FsType::Ext4, 1024, "random_concurrent_operations_ext4_1k");
}

#[test]
fn random_concurrent_operations_ext2_1k() {
    check_random_concurrent_operations(FsType::Ext2, 1024, "random_concurrent_operations_ext2_1k");
}

#[test]
fn random_concurrent_operations_ext3_4k() {
    check_random_concurrent_operations(FsType::Ext3, 4096, "random_concurrent_operations_ext3_4k");
}

/// Hundreds of short connections leave no file descriptors behind and the server
/// serving.
#[test]
fn connection_churn_leaks_no_file_descriptors() {
    let dir = TestDir::new("connection_churn_leaks_no_file_descriptors");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/a", &random_bytes(30, 10_000))
        .file("/b", &random_bytes(31, 20_000))
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    let fd_dir = format!("/proc/{}/fd", server.pid());
    let count_fds = || std::fs::read_dir(&fd_dir).unwrap().count();
    let script = r#"
for i in range(COUNT):
    h = nbd.NBD()
    h.connect_uri(URIS[i % 3])
    try:
        h.pread(100, 0)
    except nbd.Error:
        pass
    h.shutdown()
    del h
"#;
    let uris = format!(
        "[{:?}, {:?}, {:?}]",
        server.export_uri("/a"),
        server.export_uri("/b"),
        server.export_uri("/a")
    );
    let run_connections = |count: usize| {
        python_with_prelude(
            &script
                .replace("COUNT", &count.to_string())
                .replace("URIS", &uris),
            &[],
        )
        .assert_success();
    };
    run_connections(10);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fds_after_warmup = count_fds();
    run_connections(300);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fds_after_churn = count_fds();
    assert!(
        fds_after_churn <= fds_after_warmup + 3,
        "nbdkit holds {fds_after_churn} fds after 300 connections, {fds_after_warmup} after 10"
    );
    assert!(server.is_running());
    assert_bytes_eq(
        &nbd_pread(&server.export_uri("b"), 0, 20_000),
        &random_bytes(31, 20_000),
        "/b after the churn",
    );
}

/// Four connections scatter small writes over a hole at the same time, each creating
/// a new extent: hundreds of extents force the ext4 extent tree (84 entries per 1 KiB
/// block) to split leaves and grow a level; the map must stay exact and the tree valid.
/// Then whole-block zeroes punch some of the extents out again.
#[test]
fn concurrent_writes_grow_the_extent_tree() {
    let dir = TestDir::new("concurrent_writes_grow_the_extent_tree");
    let sparse = SparseFile {
        len: 16 * MIB,
        pieces: vec![(0, random_bytes(40, 1024))],
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(1024)
        .size(32 * MIB)
        .sparse_file("/scattered", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/scattered"],
    );
    let script = r#"
handles = connect_all([URI] * 4)
model = bytearray(16 * 1024 * 1024)
model[0:1024] = sys.stdin.buffer.read()
# 600 writes of 100 bytes, every 27 KiB (never adjacent blocks), dealt round-robin.
spots = [(i * 27 * 1024 + 5 + i % 900, bytes([1 + i % 250]) * 100) for i in range(1, 601)]
for off, data in spots:
    model[off:off + len(data)] = data

def writer(k):
    h = handles[k]
    for off, data in spots[k::4]:
        h.pwrite(data, off)
    h.flush()
run_threads([lambda k=k: writer(k) for k in range(4)])
# Flushed: print() text waits in sys.stdout's own buffer and would otherwise
# come out after the bytes written to sys.stdout.buffer below (Python 3.14).
print(len(spots), flush=True)

# Punch every 5th spot's whole block back out (zero without NO_HOLE, aligned).
def puncher(k):
    h = handles[k]
    for i, (off, data) in enumerate(spots):
        if i % 5 == 0 and i % 4 == k:
            block = off // 1024 * 1024
            h.zero(1024, block)
            model[block:block + 1024] = bytes(1024)
    h.flush()
run_threads([lambda k=k: puncher(k) for k in range(4)])
got = handles[0].pread(len(model), 0)
assert got == model, "contents differ from the model"
sys.stdout.buffer.write(b"\n")
sys.stdout.buffer.write(model)
"#
    .replace("URI", &format!("{:?}", server.uri()));
    let out = python_with_prelude(&script, &sparse.pieces[0].1);
    out.assert_success();
    let newline = out.stdout.iter().position(|&b| b == b'\n').unwrap();
    let model = &out.stdout[newline + 2..];
    server.stop();
    let extents = debugfs(&image, "ex /scattered");
    assert!(
        extents.lines().any(|l| l.trim_start().starts_with("1/")),
        "test premise: the extent tree should have grown a level:\n{extents}"
    );
    assert_bytes_eq(
        &debugfs_dump(&image, "/scattered"),
        model,
        "debugfs dump of /scattered",
    );
    e2fsck_clean(&image);
}

/// More writes into holes than wait unlinked at most (8192), twice over: the writer
/// that reaches that many links them, the second time mostly into their leaves in
/// place (the first split the full leaves `mke2fs` left), a batch at a time, while the
/// other connections go on writing into holes and reading back what they wrote. Every
/// byte stays right throughout, and after a flush and `kill -9` the image is clean and
/// holds them all.
#[test]
fn holes_linked_in_place_while_others_write() {
    let dir = TestDir::new("holes_linked_in_place_while_others_write");
    // Data every 64th block: the tree has leaves from the start.
    let content = |b: u64| ((b * 2654435761) % (1 << 32)) as u32;
    let sparse = SparseFile {
        len: 96 * MIB,
        pieces: (0..24576u64)
            .step_by(64)
            .map(|b| (b * 4096, content(b).to_le_bytes().repeat(1024)))
            .collect(),
    };
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(4096)
        .size(192 * MIB)
        .sparse_file("/holes", &sparse)
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &["-v", "-D", "ext2.map=1"],
        &["file", image.to_str().unwrap(), "ext2file=/holes"],
    );
    let script = r#"
import random
handles = connect_all([URI] * 4)
def content(b):
    return (b * 2654435761 % 2**32).to_bytes(4, "little") * 1024
blocks = [b for b in range(24576) if b % 64]
random.Random(7).shuffle(blocks)
model = bytearray(96 * 1024 * 1024)
for b in range(0, 24576, 64):
    model[b * 4096:(b + 1) * 4096] = content(b)

def writer(k):
    h = handles[k]
    mine = blocks[k::4]
    rng = random.Random(k)
    for i, b in enumerate(mine):
        h.pwrite(content(b), b * 4096)
        model[b * 4096:(b + 1) * 4096] = content(b)
        if i % 8 == 7:
            # One written before, read back while links may be running.
            old = mine[rng.randrange(i + 1)]
            got = h.pread(4096, old * 4096)
            assert got == content(old), "block %d reads back wrong" % old
    h.flush()
run_threads([lambda k=k: writer(k) for k in range(4)])
for at in range(0, len(model), 16 << 20):
    got = handles[1].pread(16 << 20, at)
    assert got == model[at:at + (16 << 20)], "contents differ from the model"
print("ok", flush=True)
"#
    .replace("URI", &format!("{:?}", server.uri()));
    let out = python_with_prelude(&script, b"");
    out.assert_success();
    let log = server.log();
    assert!(
        log.contains("in place while"),
        "test premise: no link was made in place:\n{}",
        log.lines()
            .filter(|l| l.contains("linked") || l.contains("error"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.kill9();
    e2fsck_clean(&image);
    let dump = debugfs_dump(&image, "/holes");
    for b in 0..24576u64 {
        let at = (b * 4096) as usize;
        assert_eq!(
            dump[at..at + 4],
            content(b).to_le_bytes(),
            "block {b} is not in the image"
        );
    }
}
