//! Journal replay in memory: images whose journal holds transactions not yet
//! written to their places (`needs_recovery`), made with `debugfs -w`'s journal
//! commands (`jo`, `jw -b/-r/-c`, `jc`).  What the filter serves must equal, byte
//! for byte, what `debugfs dump` gives from a copy recovered by `e2fsck -fy`, and
//! the image must not change (same sha256 after serving).
//!
//! Covered: data blocks and metadata (inode table, block maps, directories,
//! bitmaps, group descriptors, superblock) changed through the journal; later
//! copies winning; revoked blocks; an uncommitted last transaction; escaped
//! copies (blocks starting with the JBD2 magic); a transaction with a corrupt
//! commit block (checksum v3) or corrupt data (checksum v1); checksum v2 tags;
//! 32- and 64-bit tags; 1 KiB and 4 KiB blocks; a log that wraps around the end
//! of the journal; a clean journal with `needs_recovery` set; refused writes; an
//! external journal (refused at start); the `-D ext2.journal=1` debug lines; the
//! journal replayed in memory once, at start, however many clients connect.
//!
//! `ext2journal=replay`: the replay written into the image, then writes
//! through the filter (over replayed blocks and into holes); the files must
//! equal e2fsck's recovery plus the writes, `e2fsck -fn` must be clean,
//! `needs_recovery` gone and the journal superblock the one e2fsck leaves.
//! Also: a partly checkpointed image (group descriptors already in place,
//! their bitmap checksums not matching the bitmaps until the replay; both
//! modes), an empty log, a wrapped log, a corrupt transaction and `-r` (served
//! read-only, nothing written), and writes failing at every step (the
//! journal and `needs_recovery` untouched until the journal is empty).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const JBD2_MAGIC: [u8; 4] = [0xc0, 0x3b, 0x39, 0x98];

/// One transaction written with `debugfs -w` (`jw`).
struct Txn {
    /// (filesystem block, new contents).
    blocks: Vec<(u64, Vec<u8>)>,
    revokes: Vec<u64>,
    /// `false`: written without its commit block (`jw -c`).
    commit: bool,
}

impl Txn {
    fn new(blocks: Vec<(u64, Vec<u8>)>) -> Txn {
        Txn {
            blocks,
            revokes: Vec::new(),
            commit: true,
        }
    }

    fn revoking(mut self, revokes: Vec<u64>) -> Txn {
        self.revokes = revokes;
        self
    }

    fn uncommitted(mut self) -> Txn {
        self.commit = false;
        self
    }
}

fn list(blocks: impl IntoIterator<Item = u64>) -> String {
    blocks
        .into_iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes `txns` into the image's journal, one `jo`/`jw`/`jc` each (debugfs
/// only finds the head of the log reliably when reopening it).  `open` are the
/// options of the first `jo` (e.g. `-c` to turn on journal checksums).
fn write_journal(dir: &TestDir, image: &Path, open: &str, txns: &[Txn]) {
    let mut commands = Vec::new();
    for (i, txn) in txns.iter().enumerate() {
        commands.push(if i == 0 {
            format!("jo {open}")
        } else {
            "jo".to_string()
        });
        let mut jw = "jw".to_string();
        if !txn.blocks.is_empty() {
            jw += &format!(" -b {}", list(txn.blocks.iter().map(|(b, _)| *b)));
        }
        if !txn.revokes.is_empty() {
            jw += &format!(" -r {}", list(txn.revokes.iter().copied()));
        }
        if !txn.commit {
            jw += " -c";
        }
        if !txn.blocks.is_empty() {
            let data = dir.unique_file("jw-data");
            let bytes: Vec<u8> = txn.blocks.iter().flat_map(|(_, d)| d.clone()).collect();
            fs::write(&data, bytes).unwrap();
            jw += &format!(" {}", data.display());
        }
        commands.push(jw);
        commands.push("jc".to_string());
    }
    debugfs_write(image, &commands);
}

fn needs_recovery(image: &Path) -> bool {
    let out = run("dumpe2fs", &["-h", image.to_str().unwrap()]);
    out.assert_success();
    out.stdout_text()
        .lines()
        .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"))
}

fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()]);
    out.assert_success();
    out.stdout_text()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `path` as `debugfs dump` gives it from a copy of `image` recovered by
/// `e2fsck -fy`, and e2fsck's output.
fn recovered(dir: &TestDir, image: &Path, path: &str) -> (Vec<u8>, String) {
    let copy = dir.unique_file("recovered.img");
    fs::copy(image, &copy).unwrap();
    let out = run("e2fsck", &["-fy", copy.to_str().unwrap()]);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "e2fsck -fy exited {code}:\n{}\n{}",
        out.stdout_text(),
        out.stderr
    );
    let text = out.stdout_text();
    assert!(text.contains("recovering journal"), "{text}");
    assert!(!needs_recovery(&copy));
    let bytes = debugfs_dump(&copy, path);
    let _ = fs::remove_file(&copy);
    (bytes, text)
}

/// The file at `path` read through the filter with nbdcopy, and nbdkit's
/// stderr (with `-D ext2.journal=1`).
fn served(dir: &TestDir, image: &Path, path: &str) -> (Vec<u8>, String) {
    let out_file = dir.unique_file("served");
    let out = nbdkit_run(
        &["-v", "-D", "ext2.journal=1"],
        &["file", image.to_str().unwrap(), &format!("ext2file={path}")],
        &format!(
            "nbdcopy \"$uri\" {}",
            shell_quote(out_file.to_str().unwrap())
        ),
    );
    assert!(out.success(), "serving {path} failed:\n{}", out.stderr);
    let bytes = read_file(&out_file);
    let _ = fs::remove_file(&out_file);
    (bytes, out.stderr)
}

/// Serves each of `paths` and checks it against e2fsck's recovery and, if
/// given, the contents the test expects; checks the image is untouched.
/// Returns nbdkit's stderr of the last one.
#[track_caller]
fn check_served(dir: &TestDir, image: &Path, files: &[(&str, Option<&[u8]>)]) -> String {
    assert!(needs_recovery(image), "the test image should need recovery");
    let before = sha256(image);
    let mut log = String::new();
    for (path, expected) in files {
        let (want, _) = recovered(dir, image, path);
        let (got, stderr) = served(dir, image, path);
        assert_bytes_eq(
            &got,
            &want,
            &format!("{path} served vs. recovered by e2fsck"),
        );
        if let Some(expected) = expected {
            assert_bytes_eq(&got, expected, &format!("{path} served vs. expected"));
        }
        log = stderr;
    }
    assert_eq!(sha256(image), before, "serving changed the image");
    assert!(needs_recovery(image));
    log
}

fn block(bs: u32, seed: u64) -> Vec<u8> {
    random_bytes(seed, bs as usize)
}

/// `content` with block `index` replaced.
fn with_block(content: &mut [u8], bs: u32, index: usize, data: &[u8]) {
    let at = index * bs as usize;
    let end = (at + bs as usize).min(content.len());
    content[at..end].copy_from_slice(&data[..end - at]);
}

/// Journal debug lines from nbdkit's stderr.
fn journal_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("journal:")).collect()
}

/// Data blocks rewritten through the journal: later copies win, a revoked
/// copy is not replayed, an escaped copy gets its magic back, an uncommitted
/// transaction is ignored.
///
/// With checksum v1 (`jo -c` without metadata_csum), debugfs counts the
/// revoke block in the commit's CRC32 where recovery (kernel and e2fsck)
/// does not: transaction 2 then fails its checksum and it and everything
/// after it are dropped, which is what `v1` expects.
fn data_blocks(fs_type: FsType, bs: u32, open: &str, extra_mkfs: &[&str], v1: bool) {
    let name = format!("data {:?} {bs} {open}", fs_type);
    let dir = TestDir::new(&name);
    let seed = seed_from(&name);
    let mut content = random_bytes(seed, (40 * bs + 123) as usize);
    let mut builder = ImageBuilder::new(fs_type).block_size(bs);
    for option in extra_mkfs {
        builder = builder.mkfs_option(option);
    }
    let image = builder
        .file("/pad", &random_bytes(seed ^ 7, 5000))
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let b = |i: usize| blocks[i];
    let (x1, x1b, x1c, x2, y) = (
        block(bs, seed ^ 11),
        block(bs, seed ^ 12),
        block(bs, seed ^ 13),
        block(bs, seed ^ 14),
        block(bs, seed ^ 15),
    );
    let mut escaped = block(bs, seed ^ 16);
    escaped[..4].copy_from_slice(&JBD2_MAGIC);
    write_journal(
        &dir,
        &image,
        open,
        &[
            Txn::new(vec![
                (b(0), x1.clone()),
                (b(1), x1b.clone()),
                (b(2), x1c.clone()),
            ]),
            Txn::new(vec![(b(1), x2.clone())]).revoking(vec![b(2)]),
            Txn::new(vec![(b(5), escaped.clone())]),
            Txn::new(vec![(b(3), y)]).uncommitted(),
        ],
    );
    with_block(&mut content, bs, 0, &x1);
    if v1 {
        with_block(&mut content, bs, 1, &x1b);
        with_block(&mut content, bs, 2, &x1c);
    } else {
        with_block(&mut content, bs, 1, &x2);
        with_block(&mut content, bs, 5, &escaped);
    }
    let (_, fsck) = recovered(&dir, &image, "/data.bin");
    assert_eq!(fsck.contains("transaction 2 was corrupt"), v1, "{fsck}");
    let log = check_served(&dir, &image, &[("/data.bin", Some(&content))]);
    let lines = journal_lines(&log);
    let text = lines.join("\n");
    let has = |words: &[&str]| lines.iter().any(|l| words.iter().all(|w| l.contains(w)));
    if v1 {
        assert!(has(&["transaction 1 ", "applied 3 blocks"]), "{text}");
        assert!(has(&["transaction 2 ", "dropped"]), "{text}");
        assert!(has(&["transaction 2 is corrupt"]), "{text}");
    } else {
        assert!(
            has(&["transaction 1 ", "applied 2 blocks", "skipped 1 revoked"]),
            "{text}"
        );
        assert!(
            has(&["transaction 2 ", "applied 1 blocks", "revoked 1 blocks"]),
            "{text}"
        );
        assert!(has(&["transaction 3 ", "applied 1 blocks"]), "{text}");
        assert!(has(&["transaction 4 ", "dropped"]), "{text}");
    }
}

#[test]
fn data_blocks_ext4_4k() {
    data_blocks(FsType::Ext4, 4096, "", &[], false);
}

#[test]
fn data_blocks_ext3_1k() {
    data_blocks(FsType::Ext3, 1024, "", &[], false);
}

#[test]
fn data_blocks_64bit_checksum_v3_4k() {
    data_blocks(
        FsType::Ext4,
        4096,
        "-c",
        &["-O", "metadata_csum,64bit"],
        false,
    );
}

#[test]
fn data_blocks_checksum_v2_32bit_1k() {
    data_blocks(
        FsType::Ext4,
        1024,
        "-c -v 2",
        &["-O", "metadata_csum,^64bit"],
        false,
    );
}

#[test]
fn data_blocks_checksum_v1_1k() {
    data_blocks(FsType::Ext3, 1024, "-c", &[], true);
}

/// The blocks where `changed` differs from `original`, with their new
/// contents.
fn changed_blocks(original: &Path, changed: &Path, bs: u32) -> Vec<(u64, Vec<u8>)> {
    let a = read_file(original);
    let b = read_file(changed);
    assert_eq!(a.len(), b.len());
    a.chunks(bs as usize)
        .zip(b.chunks(bs as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (_, y))| (i as u64, y.to_vec()))
        .collect()
}

/// The image of a metadata test, its journal written: what `metadata` and
/// `replay_metadata` share.
struct MetadataCase {
    dir: TestDir,
    image: std::path::PathBuf,
    seed: u64,
    new: Vec<u8>,
    longer: Vec<u8>,
    changes: Vec<(u64, Vec<u8>)>,
}

/// Builds the image, makes the metadata changes on a scratch copy with
/// `debugfs`, and logs every changed block into the original's journal in two
/// transactions (the first also logging garbage over a block the second
/// logs again: the later copy must win).
fn metadata_case(
    name: &str,
    fs_type: FsType,
    bs: u32,
    open: &str,
    extra_mkfs: &[&str],
) -> MetadataCase {
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let old = random_bytes(seed, 70_000);
    let new = random_bytes(seed ^ 1, 150_001);
    let short = random_bytes(seed ^ 2, 20_000);
    let mut builder = ImageBuilder::new(fs_type).block_size(bs);
    for option in extra_mkfs {
        builder = builder.mkfs_option(option);
    }
    let image = builder
        .file("/meta.bin", &old)
        .file("/short.bin", &short)
        .file("/hello.txt", b"hello\n")
        .build(&dir, "fs.img");
    let scratch = dir.join("scratch.img");
    fs::copy(&image, &scratch).unwrap();
    let source = dir.join("new.bin");
    fs::write(&source, &new).unwrap();
    debugfs_write(
        &scratch,
        &[
            "rm /meta.bin".to_string(),
            format!("write {} /meta.bin", source.display()),
            "sif /short.bin size 40000".to_string(),
        ],
    );
    assert_bytes_eq(&debugfs_dump(&scratch, "/meta.bin"), &new, "scratch copy");
    let changes = changed_blocks(&image, &scratch, bs);
    assert!(changes.len() > 10, "{} blocks changed", changes.len());
    let half = changes.len() / 2;
    // A first transaction logs garbage over one of the blocks the second
    // one logs again: the later copy must win.
    let garbage = (changes[half].0, block(bs, seed ^ 3));
    let mut first: Vec<(u64, Vec<u8>)> = changes[..half].to_vec();
    first.push(garbage);
    write_journal(
        &dir,
        &image,
        open,
        &[Txn::new(first), Txn::new(changes[half..].to_vec())],
    );
    let mut longer = short.clone();
    longer.resize(40_000, 0);
    MetadataCase {
        dir,
        image,
        seed,
        new,
        longer,
        changes,
    }
}

/// Metadata changed through the journal: on a scratch copy, debugfs
/// replaces `/meta.bin` with a new, longer file (new inode contents, block
/// map, directory entry, bitmaps, descriptors, superblock) and makes
/// `/short.bin` longer (sparse at the end) by changing only its inode; every block that differs is
/// then logged, in two transactions, into the original's journal.
fn metadata(fs_type: FsType, bs: u32, open: &str, extra_mkfs: &[&str]) {
    let name = format!("metadata {:?} {bs} {open}", fs_type);
    let MetadataCase {
        dir,
        image,
        new,
        longer,
        ..
    } = metadata_case(&name, fs_type, bs, open, extra_mkfs);
    check_served(
        &dir,
        &image,
        &[
            ("/meta.bin", Some(&new)),
            ("/short.bin", Some(&longer)),
            ("/hello.txt", Some(b"hello\n")),
        ],
    );
}

#[test]
fn metadata_ext3_1k() {
    metadata(FsType::Ext3, 1024, "", &[]);
}

#[test]
fn metadata_ext4_4k() {
    metadata(FsType::Ext4, 4096, "", &[]);
}

#[test]
fn metadata_64bit_checksum_v3_4k() {
    metadata(FsType::Ext4, 4096, "-c", &["-O", "metadata_csum,64bit"]);
}

#[test]
fn metadata_checksum_v3_1k() {
    metadata(FsType::Ext4, 1024, "-c", &["-O", "metadata_csum"]);
}

/// What `debugfs logdump -a` shows of a journal.
struct LogDump {
    /// (transaction, journal block) of each commit block.
    commits: Vec<(u32, u64)>,
    /// (filesystem block, journal block) of each logged copy.
    copies: Vec<(u64, u64)>,
}

fn logdump(image: &Path) -> LogDump {
    let text = debugfs(image, "logdump -a");
    let mut commits = Vec::new();
    let mut copies = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "Found expected sequence 3, type 2 (commit block) at block 12"
        if line.contains("(commit block)") {
            let seq = words[3].trim_end_matches(',').parse().unwrap();
            let at = words.last().unwrap().parse().unwrap();
            commits.push((seq, at));
        }
        // "  FS block 1549 logged at journal block 2 (flags 0x0)"
        if line.trim_start().starts_with("FS block") {
            copies.push((words[2].parse().unwrap(), words[7].parse().unwrap()));
        }
    }
    LogDump { commits, copies }
}

/// Image block of journal block `logical` (the journal is inode 8).
fn journal_image_block(image: &Path, logical: u64) -> u64 {
    debugfs(image, &format!("bmap <8> {logical}"))
        .trim()
        .parse()
        .unwrap()
}

/// A transaction whose commit block fails its checksum is dropped with all
/// later ones, as e2fsck drops them ("transaction was corrupt, replay was
/// aborted"); the earlier ones are replayed.
#[test]
fn corrupt_commit_block_checksum_v3() {
    let bs = 4096;
    let dir = TestDir::new("corrupt commit v3");
    let seed = seed_from("corrupt commit v3");
    let mut content = random_bytes(seed, (20 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(bs)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum,64bit")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let (a, b, c) = (block(bs, 1), block(bs, 2), block(bs, 3));
    write_journal(
        &dir,
        &image,
        "-c",
        &[
            Txn::new(vec![(blocks[0], a.clone())]),
            Txn::new(vec![(blocks[1], b.clone())]),
            Txn::new(vec![(blocks[2], c.clone()), (blocks[0], c.clone())]),
            Txn::new(vec![(blocks[3], c)]),
        ],
    );
    let commits = logdump(&image).commits;
    let third = commits
        .iter()
        .find(|(seq, _)| *seq == 3)
        .expect("commit of 3")
        .1;
    let at = journal_image_block(&image, third) * u64::from(bs);
    // A byte the checksum covers but nothing else reads.
    overwrite_host_file(&image, at + 100, &[0x5a]);
    with_block(&mut content, bs, 0, &a);
    with_block(&mut content, bs, 1, &b);
    let (_, fsck) = recovered(&dir, &image, "/data.bin");
    assert!(fsck.contains("was corrupt"), "{fsck}");
    let log = check_served(&dir, &image, &[("/data.bin", Some(&content))]);
    assert!(
        log.contains("transaction 3 is corrupt"),
        "{}",
        journal_lines(&log).join("\n")
    );
}

/// With async commit, a bad commit checksum does not stop the scan, but
/// replay still ends before that transaction; nothing is reported corrupt.
#[test]
fn corrupt_commit_block_async_commit() {
    let bs = 1024;
    let dir = TestDir::new("corrupt commit async");
    let mut content = random_bytes(31, (20 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(bs)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let (a, b, c) = (block(bs, 1), block(bs, 2), block(bs, 3));
    write_journal(
        &dir,
        &image,
        "-c",
        &[
            Txn::new(vec![(blocks[0], a.clone())]),
            Txn::new(vec![(blocks[1], b)]),
            Txn::new(vec![(blocks[2], c)]),
        ],
    );
    set_journal_incompat(&image, bs, 0x4);
    let commits = logdump(&image).commits;
    let second = commits
        .iter()
        .find(|(seq, _)| *seq == 2)
        .expect("commit of 2")
        .1;
    let at = journal_image_block(&image, second) * u64::from(bs);
    overwrite_host_file(&image, at + 100, &[0x5a]);
    with_block(&mut content, bs, 0, &a);
    let (_, fsck) = recovered(&dir, &image, "/data.bin");
    assert!(!fsck.contains("was corrupt"), "{fsck}");
    let log = check_served(&dir, &image, &[("/data.bin", Some(&content))]);
    assert!(!log.contains("is corrupt"), "{log}");
}

/// A logged copy failing its v3 tag checksum makes recovery fail (e2fsck
/// skips the copy, reports a journal checksum error and repairs the
/// filesystem): the filter refuses the image with a clear message.
#[test]
fn corrupt_copy_checksum_v3_is_refused() {
    let bs = 4096;
    let dir = TestDir::new("corrupt copy v3");
    let content = random_bytes(32, (20 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum,64bit")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    write_journal(
        &dir,
        &image,
        "-c",
        &[Txn::new(vec![
            (blocks[0], block(bs, 1)),
            (blocks[1], block(bs, 2)),
        ])],
    );
    let copies = logdump(&image).copies;
    let logged = copies.iter().find(|(fs, _)| *fs == blocks[1]).unwrap().1;
    let at = journal_image_block(&image, logged) * u64::from(bs);
    overwrite_host_file(&image, at + 10, &[0xff, 0x00, 0xff]);
    let (_, fsck) = recovered(&dir, &image, "/data.bin");
    assert!(fsck.contains("checksum error"), "{fsck}");
    let before = sha256(&image);
    // Refused at start, where the journal is read, before any client.
    let out = nbdkit_start_failure(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
    );
    assert_stopped_at_start(&out, "bad checksum");
    assert!(out.stderr.contains("run e2fsck"), "{}", out.stderr);
    assert_eq!(sha256(&image), before);
}

/// Checksum v1 (`JBD2_FEATURE_COMPAT_CHECKSUM`): the commit block holds a
/// CRC32 of the whole transaction; a damaged copy makes it fail.
#[test]
fn corrupt_copy_checksum_v1() {
    let bs = 1024;
    let dir = TestDir::new("corrupt copy v1");
    let seed = seed_from("corrupt copy v1");
    let mut content = random_bytes(seed, (20 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext3)
        .block_size(bs)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let (a, b) = (block(bs, 1), block(bs, 2));
    write_journal(
        &dir,
        &image,
        "-c",
        &[
            Txn::new(vec![(blocks[0], a.clone())]),
            Txn::new(vec![(blocks[1], b.clone()), (blocks[2], b)]),
        ],
    );
    let copies = logdump(&image).copies;
    let logged = copies.iter().find(|(fs, _)| *fs == blocks[2]).unwrap().1;
    let at = journal_image_block(&image, logged) * u64::from(bs);
    overwrite_host_file(&image, at + 10, &[0xff, 0x00, 0xff]);
    with_block(&mut content, bs, 0, &a);
    check_served(&dir, &image, &[("/data.bin", Some(&content))]);
}

fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Rotates the log area of the journal (blocks `s_first..s_maxlen`) so that
/// the log starting at `s_start` runs into the end of the journal and wraps
/// back to `s_first` after `before_wrap` blocks.  Log blocks carry no
/// position, so the journal stays valid.  Returns the new `s_start`.
fn rotate_log(image: &Path, bs: u32, before_wrap: u64) -> u64 {
    let bs = bs as usize;
    let physical = debugfs_blocks(image, "<8>");
    let mut bytes = read_file(image);
    let journal_block = |bytes: &[u8], i: u64| -> Vec<u8> {
        let at = physical[i as usize] as usize * bs;
        bytes[at..at + bs].to_vec()
    };
    let mut sb = journal_block(&bytes, 0);
    let (maxlen, first, start) = (
        u64::from(be32(&sb, 0x10)),
        u64::from(be32(&sb, 0x14)),
        u64::from(be32(&sb, 0x1c)),
    );
    let area = maxlen - first;
    let shift = (maxlen - before_wrap - start + area) % area;
    let moved = |i: u64| first + (i - first + shift) % area;
    let log: Vec<Vec<u8>> = (first..maxlen).map(|i| journal_block(&bytes, i)).collect();
    for (i, contents) in (first..maxlen).zip(log) {
        let at = physical[moved(i) as usize] as usize * bs;
        bytes[at..at + bs].copy_from_slice(&contents);
    }
    sb[0x1c..0x20].copy_from_slice(&(moved(start) as u32).to_be_bytes());
    seal_journal_superblock(&mut sb);
    let at = physical[0] as usize * bs;
    bytes[at..at + bs].copy_from_slice(&sb);
    fs::write(image, bytes).unwrap();
    moved(start)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Recomputes the journal superblock's checksum (checksum v2/v3 only).
fn seal_journal_superblock(sb: &mut [u8]) {
    if be32(sb, 0x28) & 0x18 != 0 {
        sb[0xfc..0x100].fill(0);
        let sum = crc32c(!0, &sb[..1024]);
        sb[0xfc..0x100].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Sets incompatible feature bits in the journal superblock.
fn set_journal_incompat(image: &Path, bs: u32, bits: u32) {
    let at = journal_image_block(image, 0) * u64::from(bs);
    let bytes = read_file(image);
    let mut sb = bytes[at as usize..at as usize + bs as usize].to_vec();
    let incompat = be32(&sb, 0x28) | bits;
    sb[0x28..0x2c].copy_from_slice(&incompat.to_be_bytes());
    seal_journal_superblock(&mut sb);
    overwrite_host_file(image, at, &sb);
}

/// A log that wraps around the end of the journal, transactions spanning
/// the wrap.
fn wrapped(fs_type: FsType, bs: u32, open: &str, extra_mkfs: &[&str]) {
    let name = format!("wrapped {:?} {bs} {open}", fs_type);
    let dir = TestDir::new(&name);
    let seed = seed_from(&name);
    let mut content = random_bytes(seed, (30 * bs) as usize);
    let mut builder = ImageBuilder::new(fs_type).block_size(bs);
    for option in extra_mkfs {
        builder = builder.mkfs_option(option);
    }
    let image = builder.file("/data.bin", &content).build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let mut txns = Vec::new();
    for t in 0..4usize {
        let copies: Vec<(u64, Vec<u8>)> = (0..5)
            .map(|i| {
                let index = t * 3 + i;
                (blocks[index], block(bs, seed ^ (100 * t + i) as u64))
            })
            .collect();
        for (i, (_, data)) in copies.iter().enumerate() {
            with_block(&mut content, bs, t * 3 + i, data);
        }
        txns.push(Txn::new(copies));
    }
    txns.push(Txn::new(vec![(blocks[25], block(bs, seed ^ 999))]).uncommitted());
    write_journal(&dir, &image, open, &txns);
    // Each transaction takes 7 blocks: transaction 2 starts 3 blocks before
    // the end and wraps, transaction 3 starts at block 5.
    let start = rotate_log(&image, bs, 10);
    let commits = logdump(&image).commits;
    assert_eq!(commits.len(), 4, "debugfs logdump follows the wrap");
    let log = check_served(&dir, &image, &[("/data.bin", Some(&content))]);
    let lines = journal_lines(&log);
    let text = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("transaction 1 at log block {start}:"))),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("transaction 3 at log block 5:")),
        "{text}"
    );
}

#[test]
fn wrapped_log_ext4_4k() {
    wrapped(FsType::Ext4, 4096, "", &[]);
}

#[test]
fn wrapped_log_checksum_v3_1k() {
    wrapped(FsType::Ext4, 1024, "-c", &["-O", "metadata_csum"]);
}

/// `needs_recovery` with an empty log (`s_start == 0`): nothing to replay.
#[test]
fn needs_recovery_with_empty_log() {
    let dir = TestDir::new("empty log");
    let content = random_bytes(5, 50_000);
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    debugfs_write(&image, &["feature needs_recovery".to_string()]);
    check_served(&dir, &image, &[("/data.bin", Some(&content))]);
}

/// A client cannot write to an image whose journal is replayed in memory.
#[test]
fn writes_are_refused() {
    let bs = 4096;
    let dir = TestDir::new("writes refused");
    let content = random_bytes(6, (10 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    write_journal(
        &dir,
        &image,
        "",
        &[Txn::new(vec![(blocks[0], block(bs, 7))])],
    );
    let before = sha256(&image);
    let out = nbdkit_run(
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
        "nbdsh -u \"$uri\" -c 'h.pwrite(b\"x\" * 4096, 0); h.flush()'",
    );
    assert!(!out.success(), "a write was accepted:\n{}", out.stderr);
    assert_eq!(sha256(&image), before);
}

/// An external journal cannot be read: a clear error, not a silent serve.
#[test]
fn external_journal_is_refused() {
    let dir = TestDir::new("external journal");
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", b"data")
        .build(&dir, "fs.img");
    debugfs_write(
        &image,
        &[
            "ssv journal_uuid 01234567-89ab-cdef-0123-456789abcdef".to_string(),
            "feature needs_recovery".to_string(),
        ],
    );
    let out = nbdkit_start_failure(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
    );
    assert_stopped_at_start(&out, "external device");
}

// ---------------------------------------------------------------------------------------
// ext2journal=replay: the replay written into the image, then served read-write
// ---------------------------------------------------------------------------------------

/// A copy of `image` recovered (and checked) by `e2fsck -fy`.
fn fsck_copy(dir: &TestDir, image: &Path) -> PathBuf {
    let copy = dir.unique_file("fsck.img");
    fs::copy(image, &copy).unwrap();
    let out = run("e2fsck", &["-fy", copy.to_str().unwrap()]);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "e2fsck -fy exited {code}:\n{}\n{}",
        out.stdout_text(),
        out.stderr
    );
    assert!(!needs_recovery(&copy));
    copy
}

/// `after` (the journal superblock the filter left once it replayed the
/// journal, wrote through it and shut down) is `fscked` (the one e2fsck
/// leaves after replaying alone) used by a writer since: empty (`s_start`
/// 0), a sequence at or past e2fsck's next one (old commit blocks left in
/// the log can never pass for new ones), at most the revoke and 64-bit
/// features added, a valid checksum, and every other byte the same.
#[track_caller]
fn assert_journal_used_after(after: &[u8], fscked: &[u8]) {
    assert_eq!(be32(after, 0x1c), 0, "the journal is not empty");
    assert!(
        be32(after, 0x18).wrapping_sub(be32(fscked, 0x18)) < 1 << 31,
        "the journal's sequence {} went back from e2fsck's {}",
        be32(after, 0x18),
        be32(fscked, 0x18)
    );
    let added = be32(after, 0x28) & !be32(fscked, 0x28);
    assert_eq!(
        added & !0x3,
        0,
        "journal features other than revoke and 64-bit were added"
    );
    let mut resealed = after.to_vec();
    seal_journal_superblock(&mut resealed);
    assert!(
        resealed == after,
        "the journal superblock's checksum is wrong"
    );
    let mut expected = after.to_vec();
    expected[0x18..0x1c].copy_from_slice(&fscked[0x18..0x1c]);
    expected[0x28..0x2c].copy_from_slice(&fscked[0x28..0x2c]);
    seal_journal_superblock(&mut expected);
    assert!(
        expected == fscked,
        "journal superblock differs from the one e2fsck leaves beyond sequence and features"
    );
}

/// The journal superblock (journal block 0, the journal being inode 8).
fn journal_superblock(image: &Path, bs: u32) -> Vec<u8> {
    let at = (journal_image_block(image, 0) * u64::from(bs)) as usize;
    read_file(image)[at..at + bs as usize].to_vec()
}

/// Writes to one file through the filter: its path and (offset, bytes).
type FileWrites<'a> = (&'a str, Vec<(u64, Vec<u8>)>);

/// `content` with each (offset, bytes) written over it.
fn written(mut content: Vec<u8>, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    for (offset, data) in writes {
        let at = *offset as usize;
        assert!(at + data.len() <= content.len(), "test writes stay inside");
        content[at..at + data.len()].copy_from_slice(data);
    }
    content
}

/// Serves `image` in exportname mode with `ext2journal=replay`, writes
/// `writes` (path, offset, bytes) through the filter and flushes, checks
/// that the filter reads back `expected` (path, contents) and that the
/// replay was logged; returns nbdkit's stderr.
fn replay_and_write(
    dir: &TestDir,
    image: &Path,
    writes: &[FileWrites],
    expected: &[(&str, Vec<u8>)],
) -> String {
    let mut server = Server::start(
        dir,
        &["-v", "-D", "ext2.journal=1"],
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=exportname",
            "ext2journal=replay",
        ],
    );
    for (path, file_writes) in writes {
        nbd_pwrite_many(&server.export_uri(path), file_writes, WriteFlush::Flush);
    }
    for (path, want) in expected {
        let got = nbdcopy_read(&server.export_uri(path), dir, &[]);
        assert_bytes_eq(&got, want, &format!("{path} read back through the filter"));
    }
    server.stop();
    server.log()
}

/// Serves `image` (which needs recovery) with `ext2journal=replay`, writes
/// through the filter, and checks the outcome against `e2fsck -fy` on a copy
/// of the original: the files equal e2fsck's plus the writes, `e2fsck -fn`
/// is clean, `needs_recovery` is gone, and the journal superblock is the
/// one e2fsck leaves (empty, same next transaction, checksum).  `expected`
/// optionally pins the recovered contents too.  Returns nbdkit's stderr.
#[track_caller]
fn check_replayed(
    dir: &TestDir,
    image: &Path,
    bs: u32,
    writes: &[FileWrites],
    files: &[(&str, Option<&[u8]>)],
) -> String {
    assert!(needs_recovery(image), "the test image should need recovery");
    let fscked = fsck_copy(dir, image);
    let mut want = Vec::new();
    for (path, expected) in files {
        let recovered = debugfs_dump(&fscked, path);
        if let Some(expected) = expected {
            assert_bytes_eq(&recovered, expected, &format!("{path}: test premise"));
        }
        let file_writes: &[(u64, Vec<u8>)] = writes
            .iter()
            .find(|(p, _)| p == path)
            .map_or(&[], |(_, w)| w.as_slice());
        want.push((*path, written(recovered, file_writes)));
    }
    let log = replay_and_write(dir, image, writes, &want);
    assert!(
        log.contains("blocks of the journal into the image"),
        "no message about the replay:\n{log}"
    );
    assert!(!needs_recovery(image), "needs_recovery is still set");
    e2fsck_clean(image);
    for (path, contents) in &want {
        assert_bytes_eq(
            &debugfs_dump(image, path),
            contents,
            &format!("{path} in the image vs. e2fsck's recovery plus the writes"),
        );
    }
    assert_journal_used_after(
        &journal_superblock(image, bs),
        &journal_superblock(&fscked, bs),
    );
    // Served again, without the parameter: a clean image, read-write.
    for (path, contents) in &want {
        let (got, _) = served(dir, image, path);
        assert_bytes_eq(&got, contents, &format!("{path} served after the replay"));
    }
    let _ = fs::remove_file(&fscked);
    log
}

/// Data blocks changed through the journal (later copies, a revoke, an
/// escaped copy, an uncommitted transaction), replayed into the image; then
/// a write over replayed blocks and one into a hole of another file.
fn replay_data(fs_type: FsType, bs: u32, open: &str, extra_mkfs: &[&str]) {
    let name = format!("replay data {:?} {bs} {open}", fs_type);
    let dir = TestDir::new(&name);
    let seed = seed_from(&name);
    let mut content = random_bytes(seed, (40 * bs + 123) as usize);
    let sparse = SparseFile {
        len: u64::from(20 * bs),
        pieces: vec![
            (0, random_bytes(seed ^ 21, bs as usize)),
            (u64::from(15 * bs), random_bytes(seed ^ 22, bs as usize)),
        ],
    };
    let mut builder = ImageBuilder::new(fs_type).block_size(bs);
    for option in extra_mkfs {
        builder = builder.mkfs_option(option);
    }
    let image = builder
        .file("/pad", &random_bytes(seed ^ 7, 5000))
        .file("/data.bin", &content)
        .sparse_file("/sparse.bin", &sparse)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let b = |i: usize| blocks[i];
    let (x1, x2, y) = (
        block(bs, seed ^ 11),
        block(bs, seed ^ 14),
        block(bs, seed ^ 15),
    );
    let mut escaped = block(bs, seed ^ 16);
    escaped[..4].copy_from_slice(&JBD2_MAGIC);
    write_journal(
        &dir,
        &image,
        open,
        &[
            Txn::new(vec![
                (b(0), x1.clone()),
                (b(1), block(bs, seed ^ 12)),
                (b(2), block(bs, seed ^ 13)),
            ]),
            Txn::new(vec![(b(1), x2.clone())]).revoking(vec![b(2)]),
            Txn::new(vec![(b(5), escaped.clone())]),
            Txn::new(vec![(b(3), y)]).uncommitted(),
        ],
    );
    with_block(&mut content, bs, 0, &x1);
    with_block(&mut content, bs, 1, &x2);
    with_block(&mut content, bs, 5, &escaped);
    let before = journal_superblock(&image, bs);
    let writes = [
        (
            "/data.bin",
            vec![
                // Over part of a replayed block, and over the block only the
                // uncommitted transaction logged.
                (u64::from(bs) + 10, random_bytes(seed ^ 31, 100)),
                (u64::from(3 * bs), random_bytes(seed ^ 32, bs as usize)),
            ],
        ),
        (
            "/sparse.bin",
            vec![(u64::from(7 * bs) + 100, random_bytes(seed ^ 33, 3000))],
        ),
    ];
    let log = check_replayed(
        &dir,
        &image,
        bs,
        &writes,
        &[
            ("/data.bin", Some(&content)),
            ("/sparse.bin", Some(&sparse.contents())),
        ],
    );
    assert!(
        log.contains("replayed 3 blocks of the journal into the image"),
        "{log}"
    );
    let after = journal_superblock(&image, bs);
    assert_eq!(be32(&after, 0x1c), 0, "s_start");
    // The replay ends at 4 past the original sequence (transactions 1-3
    // and the uncommitted 4); the writes then went through the journal too.
    assert!(
        be32(&after, 0x18) >= be32(&before, 0x18) + 4,
        "s_sequence after transactions 1-3, the uncommitted 4 and the writes"
    );
}

#[test]
fn replay_data_ext4_4k() {
    replay_data(FsType::Ext4, 4096, "", &[]);
}

#[test]
fn replay_data_ext3_1k() {
    replay_data(FsType::Ext3, 1024, "", &[]);
}

#[test]
fn replay_data_64bit_checksum_v3_4k() {
    replay_data(FsType::Ext4, 4096, "-c", &["-O", "metadata_csum,64bit"]);
}

#[test]
fn replay_data_checksum_v3_1k() {
    replay_data(FsType::Ext4, 1024, "-c", &["-O", "metadata_csum"]);
}

#[test]
fn replay_data_checksum_v2_32bit_1k() {
    replay_data(
        FsType::Ext4,
        1024,
        "-c -v 2",
        &["-O", "metadata_csum,^64bit"],
    );
}

/// Metadata changed through the journal (a file replaced by a longer one,
/// another made longer with a hole at its end), replayed into the image;
/// then writes into the new file and into that hole, which allocate.
///
/// `checkpointed`: the group descriptors were also written to their place
/// before the crash (a partial checkpoint), so their bitmap checksums do not
/// match the bitmaps until the journal is replayed.
fn replay_metadata(fs_type: FsType, bs: u32, open: &str, extra_mkfs: &[&str], checkpointed: bool) {
    let name = format!("replay metadata {:?} {bs} {open} {checkpointed}", fs_type);
    let MetadataCase {
        dir,
        image,
        seed,
        new,
        longer,
        changes,
    } = metadata_case(&name, fs_type, bs, open, extra_mkfs);
    if checkpointed {
        let descriptors = if bs == 1024 { 2 } else { 1 };
        let (_, new_descriptors) = changes
            .iter()
            .find(|(b, _)| *b == descriptors)
            .expect("test premise: the group descriptors changed");
        overwrite_host_file(&image, descriptors * u64::from(bs), new_descriptors);
        // Served read-only with the journal replayed in memory: the image is
        // opened without reading the bitmaps.
        check_served(
            &dir,
            &image,
            &[("/meta.bin", Some(&new)), ("/short.bin", Some(&longer))],
        );
    }
    let writes = [
        ("/meta.bin", vec![(1000, random_bytes(seed ^ 4, 5000))]),
        // 24 KiB on is a hole after the journal made the file longer.
        ("/short.bin", vec![(30_000, random_bytes(seed ^ 5, 5000))]),
    ];
    let log = check_replayed(
        &dir,
        &image,
        bs,
        &writes,
        &[
            ("/meta.bin", Some(&new)),
            ("/short.bin", Some(&longer)),
            ("/hello.txt", Some(b"hello\n")),
        ],
    );
    let count = changes.len();
    // The superblock logged from the scratch copy lacks needs_recovery: it
    // is written with the flag kept until the journal is empty.
    assert!(changes
        .iter()
        .any(|(b, _)| *b * u64::from(bs) <= 1024 && 1024 < (*b + 1) * u64::from(bs)));
    assert!(
        log.contains("the replayed superblock lacks needs_recovery"),
        "{}",
        journal_lines(&log).join("\n")
    );
    assert!(
        log.contains(&format!(
            "replayed {count} blocks of the journal into the image"
        )),
        "{}",
        journal_lines(&log).join("\n")
    );
}

#[test]
fn replay_metadata_ext3_1k() {
    replay_metadata(FsType::Ext3, 1024, "", &[], false);
}

#[test]
fn replay_metadata_ext4_4k() {
    replay_metadata(FsType::Ext4, 4096, "", &[], false);
}

#[test]
fn replay_metadata_64bit_checksum_v3_4k() {
    replay_metadata(
        FsType::Ext4,
        4096,
        "-c",
        &["-O", "metadata_csum,64bit"],
        false,
    );
}

#[test]
fn replay_metadata_partly_checkpointed_checksum_v3_1k() {
    replay_metadata(FsType::Ext4, 1024, "-c", &["-O", "metadata_csum"], true);
}

#[test]
fn replay_metadata_partly_checkpointed_64bit_4k() {
    replay_metadata(FsType::Ext4, 4096, "", &["-O", "metadata_csum,64bit"], true);
}

#[test]
fn replay_metadata_checksum_v3_1k() {
    replay_metadata(FsType::Ext4, 1024, "-c", &["-O", "metadata_csum"], false);
}

/// A log that wraps around the end of the journal, replayed into the image.
#[test]
fn replay_wrapped_log_checksum_v3_1k() {
    let bs = 1024;
    let dir = TestDir::new("replay wrapped");
    let seed = seed_from("replay wrapped");
    let mut content = random_bytes(seed, (30 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .block_size(bs)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let mut txns = Vec::new();
    for t in 0..4usize {
        let copies: Vec<(u64, Vec<u8>)> = (0..5)
            .map(|i| (blocks[t * 3 + i], block(bs, seed ^ (100 * t + i) as u64)))
            .collect();
        for (i, (_, data)) in copies.iter().enumerate() {
            with_block(&mut content, bs, t * 3 + i, data);
        }
        txns.push(Txn::new(copies));
    }
    write_journal(&dir, &image, "-c", &txns);
    rotate_log(&image, bs, 10);
    let writes = [("/data.bin", vec![(5000, random_bytes(seed ^ 1, 20_000))])];
    check_replayed(&dir, &image, bs, &writes, &[("/data.bin", Some(&content))]);
}

/// `needs_recovery` with an empty log: nothing to write but the journal
/// superblock (next transaction) and the flag, as e2fsck does.
#[test]
fn replay_empty_log() {
    let dir = TestDir::new("replay empty log");
    let content = random_bytes(8, 50_000);
    let image = ImageBuilder::new(FsType::Ext4)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    debugfs_write(&image, &["feature needs_recovery".to_string()]);
    let writes = [("/data.bin", vec![(49_000, vec![0x5a; 1000])])];
    let log = check_replayed(
        &dir,
        &image,
        4096,
        &writes,
        &[("/data.bin", Some(&content))],
    );
    assert!(
        log.contains("replayed 0 blocks of the journal into the image"),
        "{log}"
    );
}

/// A transaction with a corrupt commit block: e2fsck would drop it and mark
/// the filesystem as having errors, which the filter cannot repair.  With
/// `ext2journal=replay` it says so, replays in memory and serves read-only;
/// not a byte is written.
#[test]
fn replay_refused_for_a_corrupt_transaction() {
    let bs = 4096;
    let dir = TestDir::new("replay corrupt commit");
    let mut content = random_bytes(41, (20 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum,64bit")
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let (a, b) = (block(bs, 1), block(bs, 2));
    write_journal(
        &dir,
        &image,
        "-c",
        &[
            Txn::new(vec![(blocks[0], a.clone())]),
            Txn::new(vec![(blocks[1], b)]),
        ],
    );
    let commits = logdump(&image).commits;
    let second = commits.iter().find(|(seq, _)| *seq == 2).unwrap().1;
    overwrite_host_file(
        &image,
        journal_image_block(&image, second) * u64::from(bs) + 100,
        &[0x5a],
    );
    with_block(&mut content, bs, 0, &a);
    let before = sha256(&image);
    let out = nbdkit_run(
        &[],
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=/data.bin",
            "ext2journal=replay",
        ],
        "nbdsh -u \"$uri\" -c 'import sys; print(h.is_read_only()); sys.stdout.flush(); \
         sys.stdout.buffer.write(h.pread(h.get_size(), 0))'",
    );
    out.assert_success();
    assert!(out.stdout.starts_with(b"True\n"), "not read-only");
    assert_bytes_eq(&out.stdout[5..], &content, "served in memory");
    assert!(
        out.stderr.contains("ext2journal=replay does not write")
            && out.stderr.contains("transaction 2 is corrupt"),
        "{}",
        out.stderr
    );
    assert_eq!(sha256(&image), before, "the image changed");
    assert!(needs_recovery(&image));
}

/// With `-r`, `ext2journal=replay` writes nothing: the journal is replayed
/// in memory and the image served read-only, as without it.
#[test]
fn replay_with_readonly_server_writes_nothing() {
    let bs = 4096;
    let dir = TestDir::new("replay -r");
    let mut content = random_bytes(42, (10 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let x = block(bs, 9);
    write_journal(&dir, &image, "", &[Txn::new(vec![(blocks[2], x.clone())])]);
    with_block(&mut content, bs, 2, &x);
    let before = sha256(&image);
    let out = nbdkit_run(
        &["-r"],
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=/data.bin",
            "ext2journal=replay",
        ],
        "nbdsh -u \"$uri\" -c 'import sys; sys.stdout.buffer.write(h.pread(h.get_size(), 0))'",
    );
    out.assert_success();
    assert_bytes_eq(&out.stdout, &content, "served in memory");
    assert!(out.stderr.contains("ext2journal=replay"), "{}", out.stderr);
    assert_eq!(sha256(&image), before, "the image changed");
}

/// The file plugin's arguments, through `eval`, with writes that fail from
/// the `fail_from`-th one on (counting from 0) with EIO.
fn failing_plugin_args(dir: &TestDir, image: &Path, fail_from: u32) -> Vec<String> {
    let counter = dir.unique_file("writes");
    fs::write(&counter, "0").unwrap();
    let log = dir.unique_file("calls.log");
    let counter = shell_quote(counter.to_str().unwrap());
    let img = shell_quote(image.to_str().unwrap());
    eval_plugin_args(image, &log)
        .into_iter()
        .map(|arg| {
            if arg.starts_with("pwrite=") {
                format!(
                    "pwrite=n=$(cat {counter}); echo $((n + 1)) > {counter}; \
                     if [ $n -ge {fail_from} ]; then echo 'EIO injected write failure' >&2; exit 1; fi; \
                     dd of={img} seek=$4 oflag=seek_bytes conv=notrunc status=none"
                )
            } else {
                arg
            }
        })
        .collect()
}

/// Writing the replay fails partway: the connection fails with a message,
/// the journal and `needs_recovery` are untouched, and a later try (here
/// with a plugin that works) finishes the job as if nothing had happened.
///
/// The transaction also logs the primary superblock as it was before the
/// journal was written, without `needs_recovery`: written as logged it
/// would clear the flag while the journal still holds the transaction.
/// Failing each write in turn, up to the journal superblock's (after every
/// replayed block is in place), shows the flag stays set until the journal
/// is empty.
#[test]
fn replay_write_failure_leaves_recovery_needed() {
    let bs = 1024;
    let name = "replay write failure";
    let dir = TestDir::new(name);
    let seed = seed_from(name);
    let mut content = random_bytes(seed, (30 * bs) as usize);
    let pristine = ImageBuilder::new(FsType::Ext4)
        .block_size(bs)
        .mkfs_option("-O")
        .mkfs_option("metadata_csum")
        .file("/data.bin", &content)
        .build(&dir, "pristine.img");
    let blocks = debugfs_blocks(&pristine, "/data.bin");
    let superblock = read_file(&pristine)[1024..2048].to_vec();
    let mut copies: Vec<(u64, Vec<u8>)> = vec![(1, superblock)];
    for i in [0usize, 1, 10] {
        let data = block(bs, seed ^ i as u64);
        with_block(&mut content, bs, i, &data);
        copies.push((blocks[i], data));
    }
    write_journal(&dir, &pristine, "-c", &[Txn::new(copies.clone())]);
    // Plugin writes of the replay: one per run of consecutive blocks.
    let mut homes: Vec<u64> = copies.iter().map(|(b, _)| *b).collect();
    homes.sort_unstable();
    let runs = 1 + homes.windows(2).filter(|w| w[1] != w[0] + 1).count() as u32;
    assert!(runs >= 3, "test premise: separate runs {homes:?}");
    for fail_from in 0..=runs {
        let what = format!("{name}, failing from write {fail_from} of {runs} runs");
        let image = dir.unique_file("fs.img");
        fs::copy(&pristine, &image).unwrap();
        let before = sha256(&image);
        let journal_before = journal_superblock(&image, bs);
        let mut args = failing_plugin_args(&dir, &image, fail_from);
        args.push("ext2file=/data.bin".to_string());
        args.push("ext2journal=replay".to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = nbdkit_run(&[], &args, "nbdcopy \"$uri\" /dev/null");
        assert!(!out.success(), "{what}: served although writing failed");
        let message = if fail_from < runs {
            "the journal still needs recovery"
        } else {
            "marking the journal empty failed"
        };
        assert!(out.stderr.contains(message), "{what}: {}", out.stderr);
        assert!(needs_recovery(&image), "{what}: needs_recovery was cleared");
        assert_eq!(
            journal_superblock(&image, bs),
            journal_before,
            "{what}: journal superblock"
        );
        if fail_from == 0 {
            assert_eq!(sha256(&image), before, "{what}: the image changed");
        }
        let writes = [("/data.bin", vec![(100, vec![1u8; 3000])])];
        check_replayed(&dir, &image, bs, &writes, &[("/data.bin", Some(&content))]);
        let _ = fs::remove_file(&image);
    }
}

/// The parameter is documented and checked.
#[test]
fn ext2journal_parameter() {
    let out = nbdkit_query(&["--help"], &["file"]);
    let text = out.stdout_text() + &out.stderr;
    assert!(
        text.contains("ext2journal=<MODE>"),
        "--help output:\n{text}"
    );
    let dir = TestDir::new("ext2journal parameter");
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", b"data")
        .build(&dir, "fs.img");
    let out = nbdkit_run(
        &[],
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=/data.bin",
            "ext2journal=always",
        ],
        "true",
    );
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("could not parse ext2journal: always: expecting 'memory' or 'replay'"),
        "{}",
        out.stderr
    );
    // On a clean image the parameter changes nothing.
    let out = nbdkit_run(
        &[],
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=/data.bin",
            "ext2journal=replay",
        ],
        "nbdsh -u \"$uri\" -c 'h.pwrite(b\"DATA\", 0); h.flush()'",
    );
    out.assert_success();
    assert_eq!(debugfs_dump(&image, "/data.bin"), b"DATA");
    assert!(!out.stderr.contains("journal"), "{}", out.stderr);
    e2fsck_clean(&image);
}

/// An unclean journal is replayed in memory once, at start (`.after_fork`), before
/// any client connects; every connection after that serves the replayed bytes
/// without reading the journal again.
#[test]
fn journal_is_replayed_once_at_start() {
    let bs = 4096;
    let dir = TestDir::new("replayed once at start");
    let mut content = random_bytes(44, (8 * bs) as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .file("/data.bin", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/data.bin");
    let x = block(bs, 10);
    write_journal(&dir, &image, "", &[Txn::new(vec![(blocks[3], x.clone())])]);
    with_block(&mut content, bs, 3, &x);
    let before = sha256(&image);
    let mut server = Server::start(
        &dir,
        &["-v", "-D", "ext2.journal=1"],
        &["file", image.to_str().unwrap(), "ext2file=/data.bin"],
    );
    // Server::start waits until nbdkit greets, i.e. after `.after_fork`: no
    // client has opened anything yet.
    let replayed = |log: &str| log.matches("replayed in memory").count();
    assert_eq!(replayed(&server.log()), 1, "{}", server.log());
    for _ in 0..3 {
        assert_bytes_eq(
            &nbdcopy_read(&server.uri(), &dir, &[]),
            &content,
            "served with the journal replayed",
        );
    }
    let log = server.log();
    assert_eq!(replayed(&log), 1, "the journal was replayed again:\n{log}");
    server.stop();
    assert_eq!(sha256(&image), before, "the image changed");
}
