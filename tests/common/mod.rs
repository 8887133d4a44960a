//! Helpers shared by the integration tests: locating the filter, building ext2/3/4 images
//! with `mke2fs -d`, running nbdkit (one-shot with `--run`, or as a background server),
//! driving the NBD clients (`nbdsh`, `nbdcopy`, `nbdinfo`, `qemu-img`, `qemu-io`) and
//! checking the image afterwards with `e2fsck` and `debugfs`.
//!
//! Everything uses the standard library only. Each test works in its own directory under
//! `std::env::temp_dir()`, removed when the test ends (set `EXT2FILTER_TEST_KEEP=1` to keep it).
//!
//! `EXT2FILTER_SO` selects the filter: a path to a built `libext2filter.so`, or the bare
//! name `ext2` to run the suite against nbdkit's own C filter. Without it the filter is
//! looked up next to the test executable (`target/<profile>/libext2filter.so`).
//!
//! `EXT2FILTER_NBDKIT` selects the server: a path to an `nbdkit` (e.g. one built from
//! upstream's source, with a filter built against its headers in `EXT2FILTER_SO`), or a
//! name looked up on PATH; `nbdkit` by default. `EXT2FILTER_SO=ext2` then means that
//! nbdkit's own C filter.
//!
//! `EXT2FILTER_VALGRIND=1` runs every nbdkit these helpers start under valgrind memcheck
//! (see [`Nbdkit`], the one launcher of nbdkit); a memcheck error then fails the test.

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{self, Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long any single external command may run before the test is failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The same under valgrind, where nbdkit runs 20 to 50 times slower.
pub const VALGRIND_TIMEOUT: Duration = Duration::from_secs(600);

/// [`COMMAND_TIMEOUT`], or [`VALGRIND_TIMEOUT`] under valgrind.
pub fn command_timeout() -> Duration {
    if valgrind_enabled() {
        VALGRIND_TIMEOUT
    } else {
        COMMAND_TIMEOUT
    }
}

/// NBD block status flags (base:allocation).
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// ---------------------------------------------------------------------------------------
// The filter under test
// ---------------------------------------------------------------------------------------

/// The nbdkit under test: `$EXT2FILTER_NBDKIT`, or `nbdkit` from PATH.
pub fn nbdkit_program() -> String {
    env::var("EXT2FILTER_NBDKIT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "nbdkit".to_string())
}

/// The version of the nbdkit under test, e.g. `(1, 45, 2)`.
pub fn nbdkit_version() -> (u32, u32, u32) {
    let out = run(&nbdkit_program(), &["--version"]);
    out.assert_success();
    let text = out.stdout_text();
    let numbers: Vec<u32> = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers[..] {
        [major, minor, patch, ..] => (major, minor, patch),
        _ => panic!("cannot read nbdkit's version from {text:?}"),
    }
}

/// The name of nbdkit's installed C filter, for running the suite against it.
pub fn c_filter() -> &'static str {
    "ext2"
}

/// The value to pass as `--filter=`: `$EXT2FILTER_SO` if set (a path, or the bare name
/// `ext2` meaning nbdkit's C filter), otherwise `target/<profile>/libext2filter.so`
/// derived from the path of the running test executable. Panics if the file is missing.
pub fn filter_so() -> String {
    if let Ok(value) = env::var("EXT2FILTER_SO") {
        if value == c_filter() {
            return value;
        }
        let path = PathBuf::from(&value);
        assert!(
            path.is_file(),
            "EXT2FILTER_SO={value} does not exist (set it to a built libext2filter.so, or to `ext2` for nbdkit's C filter)"
        );
        return fs::canonicalize(&path)
            .expect("canonicalize EXT2FILTER_SO")
            .to_string_lossy()
            .into_owned();
    }
    let exe = env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>  ->  target/<profile>/libext2filter.so
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is not in target/<profile>/deps");
    let so = profile_dir.join("libext2filter.so");
    assert!(
        so.is_file(),
        "the filter under test was not found at {}: build it (`cargo build`, same profile as the tests) \
         or set EXT2FILTER_SO to its path (or to `ext2` for nbdkit's C filter)",
        so.display()
    );
    assert_not_stale(&so);
    so.to_string_lossy().into_owned()
}

/// `cargo test` builds the test executables but not the cdylib they load, so
/// a source change without `cargo build` would test the old filter: refuse
/// to, loudly.  (`scripts/test.sh` builds first.)
fn assert_not_stale(so: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let path = entry.path();
                if path.is_dir() {
                    // In-process tests (`src/tests/`) are not in the filter.
                    if path.file_name().is_some_and(|name| name == "tests") {
                        return None;
                    }
                    newest(&path)
                } else {
                    entry.metadata().ok()?.modified().ok()
                }
            })
            .max()
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = fs::metadata(so).and_then(|m| m.modified()).ok();
    let edited = [repo.join("src"), repo.join("ext2-rs/src")]
        .iter()
        .filter_map(|dir| newest(dir))
        .max();
    if let (Some(built), Some(edited)) = (built, edited) {
        assert!(
            built >= edited,
            "{} is older than the sources: run `cargo build --release` (same profile as \
             the tests) before `cargo test`",
            so.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------

static UNIQUE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_number() -> u64 {
    UNIQUE_COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(test_name: &str) -> TestDir {
        // Kept short: Unix socket paths inside the directory are limited to ~108 bytes.
        let clean_name: String = test_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let path = env::temp_dir().join(format!(
            "ext2filter-test-{}-{}-{}",
            process::id(),
            unique_number(),
            clean_name
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A new unique file name inside this directory (the file is not created).
    pub fn unique_file(&self, stem: &str) -> PathBuf {
        self.path.join(format!("{stem}-{}", unique_number()))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if env::var_os("EXT2FILTER_TEST_KEEP").is_some() {
            eprintln!("keeping test directory {}", self.path.display());
            return;
        }
        // A helper process killed with its server (e.g. an eval plugin script) may
        // still be writing here: retry once it has had time to finish.
        for _attempt in 0..20 {
            if fs::remove_dir_all(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------

/// xorshift64* pseudo-random generator: deterministic test data, the same
/// one the in-process tests use.
pub use ext2_rs::testing::Rng as XorShift;

/// `len` pseudo-random bytes determined by `seed`. Never all-zero blocks in practice.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    XorShift::new(seed).fill(&mut buf);
    buf
}

/// A seed derived from a string, so each test gets its own data.
pub fn seed_from(name: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// Panics with a short description (first difference, number of differing bytes,
/// lengths) instead of printing megabytes of data.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let common = actual.len().min(expected.len());
    let differing = (0..common).filter(|&i| actual[i] != expected[i]).count();
    let first = (0..common).find(|&i| actual[i] != expected[i]);
    let mut msg = format!(
        "{what}: bytes differ: actual length {}, expected length {}, {differing} differing bytes in the common part",
        actual.len(),
        expected.len()
    );
    if let Some(first) = first {
        let last = (0..common)
            .rev()
            .find(|&i| actual[i] != expected[i])
            .unwrap();
        let end = (first + 16).min(common);
        let _ = write!(
            msg,
            "; first difference at offset {first} (last at {last}): actual {:02x?}, expected {:02x?}",
            &actual[first..end],
            &expected[first..end]
        );
    }
    panic!("{msg}");
}

// ---------------------------------------------------------------------------------------
// Running external commands
// ---------------------------------------------------------------------------------------

/// PATH with /usr/bin first: nbdsh runs the first `python3` on PATH and the `nbd` module
/// exists only for Debian's /usr/bin/python3.
pub fn tools_path() -> String {
    let rest = env::var("PATH").unwrap_or_default();
    format!("/usr/bin:/usr/sbin:/bin:/sbin:{rest}")
}

/// A Command for `program` with the tools PATH set.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", tools_path());
    cmd
}

/// What a finished command produced.
#[derive(Debug)]
pub struct CmdOutput {
    pub description: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics, showing stdout and stderr, unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &CmdOutput {
        assert!(
            self.status.success(),
            "command failed ({}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.description,
            truncate_for_display(&self.stdout_text()),
            truncate_for_display(&self.stderr)
        );
        self
    }

    /// Panics, showing stdout and stderr, if the command exited 0.
    #[track_caller]
    pub fn assert_failure(&self) -> &CmdOutput {
        assert!(
            !self.status.success(),
            "command unexpectedly succeeded: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.description,
            truncate_for_display(&self.stdout_text()),
            truncate_for_display(&self.stderr)
        );
        self
    }
}

fn truncate_for_display(text: &str) -> String {
    const LIMIT: usize = 20_000;
    if text.len() <= LIMIT {
        return text.to_string();
    }
    let mut cut = LIMIT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}\n... ({} more bytes)", &text[..cut], text.len() - cut)
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        let shown: String = arg.chars().take(300).collect();
        let more = if shown.len() < arg.len() { "..." } else { "" };
        let _ = write!(text, " '{shown}{more}'");
    }
    text
}

/// Runs `cmd` with `stdin` as its input, capturing stdout and stderr, failing the test
/// (after killing the child) if it runs longer than [`command_timeout`].
pub fn run_command(cmd: Command, stdin: &[u8]) -> CmdOutput {
    run_command_within(cmd, stdin, command_timeout()).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd` like [`run_command`]; `Err` (after killing it) if it runs longer than
/// `timeout`.
pub fn run_command_within(
    mut cmd: Command,
    stdin: &[u8],
    timeout: Duration,
) -> Result<CmdOutput, String> {
    let description = describe(&cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    let mut child_stdin = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = thread::spawn(move || {
        // The child may exit without reading everything (e.g. a failed connection).
        let _ = child_stdin.write_all(&input);
    });
    let mut child_stdout = child.stdout.take().unwrap();
    let stdout_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = child_stdout.read_to_end(&mut buf);
        buf
    });
    let mut child_stderr = child.stderr.take().unwrap();
    let stderr_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = child_stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr_reader.join().unwrap()).into_owned();
            return Err(format!(
                "timed out after {timeout:?}: {description}\n--- stderr ---\n{}",
                truncate_for_display(&stderr)
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let stdout = stdout_reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&stderr_reader.join().unwrap()).into_owned();
    Ok(CmdOutput {
        description,
        status,
        stdout,
        stderr,
    })
}

/// Runs a program with arguments (no stdin), capturing its output.
pub fn run(program: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = command(program);
    cmd.args(args);
    run_command(cmd, &[])
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("non-UTF-8 path")
}

/// Quotes a string for /bin/sh.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------
// Building images
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext2,
    Ext3,
    Ext4,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
        }
    }
}

/// A file with holes: `len` bytes of which only `pieces` (offset, bytes) are written.
#[derive(Clone, Debug)]
pub struct SparseFile {
    pub len: u64,
    pub pieces: Vec<(u64, Vec<u8>)>,
}

impl SparseFile {
    /// The whole file's contents, holes reading as zeros.
    pub fn contents(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.len as usize];
        for (offset, bytes) in &self.pieces {
            let start = *offset as usize;
            buf[start..start + bytes.len()].copy_from_slice(bytes);
        }
        buf
    }

    fn create_at(&self, path: &Path) {
        let mut file = File::create(path).expect("create sparse source file");
        file.set_len(self.len).expect("set_len");
        for (offset, bytes) in &self.pieces {
            use std::io::{Seek, SeekFrom};
            file.seek(SeekFrom::Start(*offset)).unwrap();
            file.write_all(bytes).unwrap();
        }
    }
}

enum Entry {
    File(String, Vec<u8>),
    Sparse(String, SparseFile),
    Dir(String),
    Symlink(String, String),
    HardLink(String, String),
    Fifo(String),
}

/// Builds an ext2/3/4 image with `mke2fs -d` from a description of its contents.
pub struct ImageBuilder {
    fs_type: FsType,
    block_size: u32,
    size: u64,
    mkfs_options: Vec<String>,
    entries: Vec<Entry>,
}

impl ImageBuilder {
    /// Defaults: 4 KiB blocks, 32 MiB.
    pub fn new(fs_type: FsType) -> ImageBuilder {
        ImageBuilder {
            fs_type,
            block_size: 4096,
            size: 32 * MIB,
            mkfs_options: Vec::new(),
            entries: Vec::new(),
        }
    }

    pub fn block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }

    pub fn size(mut self, bytes: u64) -> Self {
        self.size = bytes;
        self
    }

    /// An extra mke2fs option, e.g. `-O` then `inline_data`.
    pub fn mkfs_option(mut self, option: &str) -> Self {
        self.mkfs_options.push(option.to_string());
        self
    }

    /// A regular file at absolute `path` (parent directories are created).
    pub fn file(mut self, path: &str, content: &[u8]) -> Self {
        self.entries
            .push(Entry::File(path.to_string(), content.to_vec()));
        self
    }

    /// A sparse regular file at absolute `path`.
    pub fn sparse_file(mut self, path: &str, file: &SparseFile) -> Self {
        self.entries
            .push(Entry::Sparse(path.to_string(), file.clone()));
        self
    }

    pub fn dir(mut self, path: &str) -> Self {
        self.entries.push(Entry::Dir(path.to_string()));
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries
            .push(Entry::Symlink(path.to_string(), target.to_string()));
        self
    }

    /// A second name `path` for the already added file `existing`.
    pub fn hard_link(mut self, path: &str, existing: &str) -> Self {
        self.entries
            .push(Entry::HardLink(path.to_string(), existing.to_string()));
        self
    }

    /// A named pipe (not a regular file).
    pub fn fifo(mut self, path: &str) -> Self {
        self.entries.push(Entry::Fifo(path.to_string()));
        self
    }

    /// Creates the image `name` inside `dir` and returns its path.
    pub fn build(self, dir: &TestDir, name: &str) -> PathBuf {
        let source = dir.join(&format!("{name}.source"));
        fs::create_dir_all(&source).unwrap();
        let in_source = |path: &str| -> PathBuf {
            assert!(path.starts_with('/'), "image paths are absolute: {path}");
            let full = source.join(&path[1..]);
            if let Some(parent) = full.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            full
        };
        for entry in &self.entries {
            match entry {
                Entry::File(path, content) => fs::write(in_source(path), content).unwrap(),
                Entry::Sparse(path, file) => file.create_at(&in_source(path)),
                Entry::Dir(path) => fs::create_dir_all(in_source(path)).unwrap(),
                Entry::Symlink(path, target) => symlink(target, in_source(path)).unwrap(),
                Entry::HardLink(path, existing) => {
                    fs::hard_link(in_source(existing), in_source(path)).unwrap()
                }
                Entry::Fifo(path) => {
                    run("mkfifo", &[path_str(&in_source(path))]).assert_success();
                }
            }
        }
        let image = dir.join(name);
        let size = format!("{}k", self.size / KIB);
        let block_size = self.block_size.to_string();
        let mut args: Vec<&str> = vec!["-q", "-F", "-t", self.fs_type.name(), "-b", &block_size];
        args.extend(self.mkfs_options.iter().map(String::as_str));
        args.extend(["-d", path_str(&source), path_str(&image), &size]);
        run("mke2fs", &args).assert_success();
        fs::remove_dir_all(&source).unwrap();
        image
    }
}

// ---------------------------------------------------------------------------------------
// e2fsprogs checks
// ---------------------------------------------------------------------------------------

/// Asserts `e2fsck -fn image` exits 0 (no problems found, nothing changed).
#[track_caller]
pub fn e2fsck_clean(image: &Path) {
    let out = run("e2fsck", &["-fn", path_str(image)]);
    assert!(
        out.success(),
        "e2fsck -fn {} found problems ({}):\n{}\n{}",
        image.display(),
        out.status,
        out.stdout_text(),
        out.stderr
    );
}

/// Runs one debugfs request (read-only) and returns its stdout.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = run("debugfs", &["-R", request, path_str(image)]);
    out.assert_success();
    out.stdout_text()
}

/// Runs several debugfs commands with the image opened read-write; panics if debugfs
/// reports an error for any of them.
pub fn debugfs_write(image: &Path, commands: &[String]) {
    let mut cmd = command("debugfs");
    cmd.args(["-w", "-f", "-", path_str(image)]);
    let script = commands.join("\n") + "\n";
    let out = run_command(cmd, script.as_bytes());
    out.assert_success();
    // debugfs exits 0 even when a command fails: look for its error lines.
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    assert!(
        errors.is_empty(),
        "debugfs -w reported errors for {commands:?}:\n{}",
        out.stderr
    );
}

/// The contents of `path` inside the image, extracted with `debugfs -R 'dump ...'`.
pub fn debugfs_dump(image: &Path, path: &str) -> Vec<u8> {
    let dir = image.parent().unwrap();
    let out_file = dir.join(format!("dump-{}", unique_number()));
    let out = run(
        "debugfs",
        &[
            "-R",
            &format!("dump {path} {}", path_str(&out_file)),
            path_str(image),
        ],
    );
    let bytes = fs::read(&out_file).unwrap_or_else(|e| {
        panic!(
            "debugfs could not dump {path} from {}: {e}\n{}",
            image.display(),
            out.stderr
        )
    });
    let _ = fs::remove_file(&out_file);
    bytes
}

/// Physical block numbers of a file's data (and mapping) blocks, in the order debugfs
/// `blocks` lists them.
pub fn debugfs_blocks(image: &Path, path: &str) -> Vec<u64> {
    debugfs(image, &format!("blocks {path}"))
        .split_whitespace()
        .map(|word| word.parse().expect("block number"))
        .collect()
}

/// One run of a file's block map: `count` logical blocks from `logical` stored at
/// physical blocks from `physical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRun {
    pub logical: u64,
    pub physical: u64,
    pub count: u64,
    pub unwritten: bool,
}

/// A file's data block map from the BLOCKS/EXTENTS section of debugfs `stat`
/// (mapping blocks such as (IND), (DIND) and (ETB0) are left out).
pub fn debugfs_mapping(image: &Path, path: &str) -> Vec<MappedRun> {
    let stat = debugfs(image, &format!("stat {path}"));
    let section = stat
        .split_once("BLOCKS:\n")
        .or_else(|| stat.split_once("EXTENTS:\n"))
        .map(|(_, rest)| rest)
        .unwrap_or("");
    let parse_range = |text: &str| -> (u64, u64) {
        match text.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => {
                let v = text.parse().unwrap();
                (v, v)
            }
        }
    };
    let mut runs = Vec::new();
    for token in section.split(|c: char| c == ',' || c.is_whitespace()) {
        let Some(rest) = token.strip_prefix('(') else {
            continue;
        };
        let Some((logical, physical)) = rest.split_once("):") else {
            continue;
        };
        let unwritten = logical.ends_with("[u]");
        let logical = logical.trim_end_matches("[u]");
        if !logical.starts_with(|c: char| c.is_ascii_digit()) {
            continue; // (IND), (DIND), (TIND), (ETB0)...
        }
        let (first, last) = parse_range(logical);
        let (physical_first, _) = parse_range(physical);
        runs.push(MappedRun {
            logical: first,
            physical: physical_first,
            count: last - first + 1,
            unwritten,
        });
    }
    runs
}

/// The physical block holding logical block `logical` of `path`, or None for a hole.
pub fn debugfs_bmap(image: &Path, path: &str, logical: u64) -> Option<u64> {
    let block: u64 = debugfs(image, &format!("bmap {path} {logical}"))
        .trim()
        .parse()
        .expect("debugfs bmap output");
    (block != 0).then_some(block)
}

/// The superblock's free blocks count.
pub fn free_blocks(image: &Path) -> u64 {
    let stats = debugfs(image, "stats");
    let line = stats
        .lines()
        .find(|line| line.starts_with("Free blocks:"))
        .expect("Free blocks in debugfs stats");
    line["Free blocks:".len()..].trim().parse().unwrap()
}

/// An ext4 image (4 KiB blocks) holding `/prealloc`: 409,600 bytes (100 blocks) in one
/// unwritten (uninit) extent whose disk blocks still hold the 0xaa bytes of a deleted
/// file, so reading them as data instead of zeros shows.
pub fn unwritten_extent_image(dir: &TestDir) -> PathBuf {
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .file("/junk", &vec![0xaa; 400 * KIB as usize])
        .file("/prealloc", b"")
        .build(dir, "fs.img");
    debugfs_write(
        &image,
        &[
            "rm /junk".to_string(),
            "fallocate /prealloc 0 99".to_string(),
            "sif /prealloc size 409600".to_string(),
        ],
    );
    let runs = debugfs_mapping(&image, "/prealloc");
    assert!(
        !runs.is_empty() && runs.iter().all(|run| run.unwritten),
        "test premise: /prealloc should be one unwritten extent: {runs:?}"
    );
    let image_bytes = read_file(&image);
    let stale = runs
        .iter()
        .flat_map(|run| run.physical..run.physical + run.count)
        .filter(|&block| image_bytes[(block * 4096) as usize] == 0xaa)
        .count();
    assert!(
        stale > 50,
        "test premise: /prealloc's blocks should hold the deleted file's 0xaa bytes ({stale} do)"
    );
    e2fsck_clean(&image);
    image
}

/// Reads a whole file (e.g. an image) into memory.
pub fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// nbdkit
// ---------------------------------------------------------------------------------------

/// Whether `EXT2FILTER_VALGRIND` asks for nbdkit under valgrind memcheck (set, and
/// neither empty nor `0`).
pub fn valgrind_enabled() -> bool {
    env::var("EXT2FILTER_VALGRIND").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `tests/valgrind.supp`: memcheck suppressions for nbdkit's own leaks (never ours).
pub fn valgrind_suppressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/valgrind.supp")
}

/// Where memcheck writes its logs: `$EXT2FILTER_VALGRIND_LOGDIR`, else
/// `$TMPDIR/ext2filter-valgrind`. Created on first use; the logs outlive the tests so a
/// whole run can be looked over afterwards (doc/testing.md, "Under valgrind").
pub fn valgrind_log_dir() -> PathBuf {
    let dir = env::var_os("EXT2FILTER_VALGRIND_LOGDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env::temp_dir().join("ext2filter-valgrind"));
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create valgrind log dir {}: {e}", dir.display()));
    dir
}

/// Memcheck's options (everything before the program): errors and definite leaks exit
/// 99 and are listed with their stacks, nbdkit's own leaks are suppressed, the log goes
/// to `log_file` (`%p` there is the pid of each process). `EXT2FILTER_VALGRIND_OPTS`
/// adds options (e.g. `--track-origins=yes`).
pub fn valgrind_options(log_file: &Path) -> Vec<String> {
    let mut options: Vec<String> = [
        "--tool=memcheck",
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--keep-debuginfo=yes",
        "--num-callers=40",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    options.push(format!(
        "--suppressions={}",
        valgrind_suppressions().display()
    ));
    options.push(format!("--log-file={}", log_file.display()));
    if let Ok(extra) = env::var("EXT2FILTER_VALGRIND_OPTS") {
        options.extend(extra.split_whitespace().map(str::to_string));
    }
    options
}

/// The memcheck logs of one nbdkit started by [`Nbdkit`], one per process it became
/// (`--run` serves from a forked child; a plugin's script runs in one until its exec):
/// `<valgrind_log_dir>/ext2filter-vg-<test pid>-<n>-<pid>.log`. Without valgrind, none.
#[derive(Clone, Debug)]
pub struct ValgrindLogs {
    prefix: Option<String>,
}

impl ValgrindLogs {
    /// The log files written so far.
    pub fn paths(&self) -> Vec<PathBuf> {
        let Some(prefix) = &self.prefix else {
            return Vec::new();
        };
        let dir = valgrind_log_dir();
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix.as_str()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        paths
    }

    /// `Err` with memcheck's reports if any log shows an unsuppressed error or definite
    /// leak (always `Ok` without valgrind).
    pub fn check(&self) -> Result<(), String> {
        if self.prefix.is_none() {
            return Ok(());
        }
        let paths = self.paths();
        if paths.is_empty() {
            return Err(format!(
                "no valgrind log {}/{}*",
                valgrind_log_dir().display(),
                self.prefix.as_deref().unwrap_or_default()
            ));
        }
        let mut reports = String::new();
        for path in paths {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if let Some(report) = valgrind_log_problems(&text) {
                let _ = write!(
                    reports,
                    "valgrind memcheck ({}):\n{report}\n",
                    path.display()
                );
            }
        }
        if reports.is_empty() {
            Ok(())
        } else {
            Err(reports)
        }
    }
}

/// Where a launched nbdkit listens.
#[derive(Clone, Debug)]
enum Listen {
    /// Nowhere: a query (`--help`, `--dump-plugin`) that serves nothing.
    Nowhere,
    /// `-f -U SOCKET`: a server in the foreground on a Unix socket.
    Socket(PathBuf),
    /// `-U - ... --run SCRIPT`: a private socket for one command.
    Run(String),
}

/// The one launcher of nbdkit for every test (and the shape `bench/bench.py`'s
/// `nbdkit_argv` follows too). Every command line it builds is
///
/// ```text
/// [valgrind OPTIONS] NBDKIT [-f -U SOCKET | -U -] OPTIONS --filter=FILTER PLUGIN_ARGS [--run SCRIPT]
/// ```
///
/// - NBDKIT is [`nbdkit_program`]: `$EXT2FILTER_NBDKIT`, or `nbdkit` from PATH;
/// - FILTER is [`filter_so`]: `$EXT2FILTER_SO`, or `target/<profile>/libext2filter.so`.
///   It is always the outermost filter: PLUGIN_ARGS may start with further `--filter=`
///   options (placed below ours), then the plugin's name and everyone's parameters;
/// - with `EXT2FILTER_VALGRIND=1` the whole command runs under memcheck
///   ([`valgrind_options`], one log per process, see [`ValgrindLogs`]).
///
/// ```ignore
/// let (cmd, logs) = Nbdkit::serve_on(&socket).options(&["-r"]).plugin(&args).command();
/// ```
///
/// [`nbdkit_run`], [`nbdkit_query`], [`nbdkit_start_failure`] and [`Server::start`] are
/// built on it; tests needing something else (arguments that are not UTF-8, their own
/// server type) use it directly.
#[derive(Clone, Debug)]
#[must_use]
pub struct Nbdkit {
    listen: Listen,
    options: Vec<OsString>,
    plugin_args: Vec<OsString>,
    valgrind_options: Vec<String>,
}

impl Nbdkit {
    fn with(listen: Listen) -> Nbdkit {
        Nbdkit {
            listen,
            options: Vec::new(),
            plugin_args: Vec::new(),
            valgrind_options: Vec::new(),
        }
    }

    /// nbdkit that serves nothing: `NBDKIT OPTIONS --filter=FILTER PLUGIN_ARGS`.
    pub fn query() -> Nbdkit {
        Self::with(Listen::Nowhere)
    }

    /// A server in the foreground on the Unix socket `socket`: `-f -U SOCKET`.
    pub fn serve_on(socket: &Path) -> Nbdkit {
        Self::with(Listen::Socket(socket.to_path_buf()))
    }

    /// One command run against a private socket: `-U - ... --run SCRIPT`. Under
    /// valgrind the script then waits for the server's connections to wind down (see
    /// [`valgrind_wait_for_connections`]) and exits with the script's status.
    pub fn run(script: &str) -> Nbdkit {
        Self::with(Listen::Run(script.to_string()))
    }

    /// nbdkit's own options (`-r`, `-v`, `-D ...`, `--dump-plugin`), before our filter.
    pub fn options<S: AsRef<OsStr>>(mut self, options: &[S]) -> Nbdkit {
        self.options
            .extend(options.iter().map(|o| o.as_ref().to_os_string()));
        self
    }

    /// What follows our filter: further `--filter=` options, the plugin, parameters.
    pub fn plugin<S: AsRef<OsStr>>(mut self, plugin_args: &[S]) -> Nbdkit {
        self.plugin_args
            .extend(plugin_args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Memcheck options put before the common ones, under valgrind only.
    pub fn valgrind_options(mut self, options: &[&str]) -> Nbdkit {
        self.valgrind_options
            .extend(options.iter().map(|o| o.to_string()));
        self
    }

    /// The command, and the memcheck logs to check once it has exited.
    pub fn command(self) -> (Command, ValgrindLogs) {
        let (mut cmd, logs) = if valgrind_enabled() {
            let prefix = format!("ext2filter-vg-{}-{}-", process::id(), unique_number());
            let mut cmd = command("valgrind");
            cmd.args(&self.valgrind_options);
            cmd.args(valgrind_options(
                &valgrind_log_dir().join(format!("{prefix}%p.log")),
            ));
            cmd.arg(nbdkit_program());
            let logs = ValgrindLogs {
                prefix: Some(prefix),
            };
            (cmd, logs)
        } else {
            (command(&nbdkit_program()), ValgrindLogs { prefix: None })
        };
        match &self.listen {
            Listen::Nowhere => {}
            Listen::Socket(socket) => {
                cmd.arg("-f").arg("-U").arg(socket);
            }
            Listen::Run(_) => {
                cmd.arg("-U").arg("-");
            }
        }
        cmd.args(&self.options);
        cmd.arg(format!("--filter={}", filter_so()));
        cmd.args(&self.plugin_args);
        if let Listen::Run(script) = &self.listen {
            cmd.arg("--run").arg(run_script_for(script));
        }
        (cmd, logs)
    }
}

/// Words memcheck starts its error records with (any of them, not suppressed, is a
/// finding). A log cut short by SIGKILL has records but no summary.
pub const VALGRIND_ERROR_MARKERS: &[&str] = &[
    "Invalid read",
    "Invalid write",
    "Invalid free",
    "Mismatched free",
    "uninitialised",
    "unaddressable",
    "Source and destination overlap",
    "are definitely lost",
    "Process terminating with default action",
];

/// Memcheck's verdict on one log: `Some(the log)` if it reports an unsuppressed error
/// or definite leak, `None` if it is clean.
pub fn valgrind_log_problems(text: &str) -> Option<String> {
    let count_after = |label: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.split(label).nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter_map(|n| n.replace(',', "").parse::<u64>().ok())
            .sum()
    };
    let errors = count_after("ERROR SUMMARY: ");
    let definitely_lost = count_after("definitely lost: ");
    let marked = text
        .lines()
        .any(|l| VALGRIND_ERROR_MARKERS.iter().any(|m| l.contains(m)));
    if errors > 0 || definitely_lost > 0 || marked {
        Some(truncate_for_display(text))
    } else {
        None
    }
}

/// Under valgrind, before nbdkit process `pid` is asked to exit: waits (up to 20 s)
/// until it is down to its main thread, i.e. connections the client has closed are
/// closed in nbdkit too. nbdkit 1.32 skips `.close` for a connection still winding down
/// when it quits (`free_connection` checks `quit`); memcheck then reports that
/// connection's context and our handle (which point to each other) as leaked.
pub fn valgrind_wait_for_connections(pid: u32) {
    if !valgrind_enabled() {
        return;
    }
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let threads = fs::read_dir(&tasks).map_or(0, Iterator::count);
        if threads <= 1 {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `run_script` for `nbdkit --run`; under valgrind it then waits (up to 20 s) until the
/// serving nbdkit (the child nbdkit forked, the script's sibling) is down to its main
/// thread, for the reason given at [`valgrind_wait_for_connections`], and exits with
/// the script's status.
fn run_script_for(run_script: &str) -> String {
    if !valgrind_enabled() {
        return run_script.to_string();
    }
    format!(
        "( {run_script}\n)\n\
         __ext2_rc=$?\n\
         for __ext2_p in $(pgrep -P $PPID); do\n\
         \x20 [ \"$__ext2_p\" = $$ ] && continue\n\
         \x20 __ext2_n=0\n\
         \x20 while [ \"$(ls /proc/$__ext2_p/task 2>/dev/null | wc -l)\" -gt 1 ] && [ $__ext2_n -lt 1000 ]; do\n\
         \x20   sleep 0.02; __ext2_n=$((__ext2_n + 1))\n\
         \x20 done\n\
         done\n\
         exit $__ext2_rc\n"
    )
}

/// Panics with memcheck's report for a finished one-shot nbdkit if valgrind ran it and
/// found errors (in any of its processes) or it exited with memcheck's 99.
#[track_caller]
fn assert_valgrind_clean(logs: &ValgrindLogs, output: &CmdOutput) {
    if let Err(report) = logs.check() {
        panic!("{}\n{report}", output.description);
    }
    assert!(
        !valgrind_enabled() || output.status.code() != Some(99),
        "nbdkit exited 99 (memcheck's error exit code) without a report in {:?}: {}\n{}",
        logs.paths(),
        output.description,
        truncate_for_display(&output.stderr)
    );
}

/// Runs `nbdkit -U - OPTIONS --filter=<filter> PLUGIN_ARGS --run RUN` and returns its
/// output. `plugin_args` starts with further `--filter=` options (placed below ours)
/// or the plugin name, followed by plugin and filter parameters. Under valgrind, a
/// memcheck error fails the test here, whatever nbdkit's exit status.
#[track_caller]
pub fn nbdkit_run(options: &[&str], plugin_args: &[&str], run_script: &str) -> CmdOutput {
    let (cmd, logs) = Nbdkit::run(run_script)
        .options(options)
        .plugin(plugin_args)
        .command();
    let output = run_command(cmd, &[]);
    assert_valgrind_clean(&logs, &output);
    output
}

/// Runs nbdkit without a server (e.g. `--help`, `--dump-plugin`) with our filter.
#[track_caller]
pub fn nbdkit_query(options: &[&str], plugin_args: &[&str]) -> CmdOutput {
    let (cmd, logs) = Nbdkit::query()
        .options(options)
        .plugin(plugin_args)
        .command();
    let output = run_command(cmd, &[]);
    assert_valgrind_clean(&logs, &output);
    output
}

/// Waits up to `limit` for `child` to exit: its status, or `None` once it has been
/// killed for taking longer.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// How long a server that should stop at start may take to do so.
pub fn start_failure_timeout() -> Duration {
    if valgrind_enabled() {
        VALGRIND_TIMEOUT
    } else {
        Duration::from_secs(30)
    }
}

/// Starts `nbdkit -f -U SOCKET OPTIONS --filter=<filter> PLUGIN_ARGS` and, with no
/// client ever connecting, waits for it to exit: for a server that must stop at start
/// (`.after_fork` failing on a bad image or path). Panics if it still serves after
/// [`start_failure_timeout`]. (Not `--run`: nbdkit starts the command before
/// `.after_fork` and keeps the socket open while it runs, so a command that connects
/// would wait forever.)
#[track_caller]
pub fn nbdkit_start_failure(dir: &TestDir, options: &[&str], plugin_args: &[&str]) -> CmdOutput {
    let (cmd, logs) = Nbdkit::serve_on(&dir.join(&format!("s{}.sock", unique_number())))
        .options(options)
        .plugin(plugin_args)
        .command();
    let output = run_command_within(cmd, &[], start_failure_timeout())
        .unwrap_or_else(|e| panic!("nbdkit did not stop at start: {e}"));
    assert_valgrind_clean(&logs, &output);
    output
}

/// Asserts nbdkit stopped at start the way a failed `.after_fork` stops it: exit status
/// 1 (not a signal), `message` in its stderr, and no crash.
#[track_caller]
pub fn assert_stopped_at_start(output: &CmdOutput, message: &str) {
    assert_eq!(
        output.status.code(),
        Some(1),
        "nbdkit should exit 1 at start: {}\n{}",
        output.description,
        truncate_for_display(&output.stderr)
    );
    assert!(
        output.stderr.contains(message),
        "expected {message:?} in nbdkit's stderr:\n{}",
        output.stderr
    );
    for bad in ["panicked", "Assertion", "internal error", "(null)"] {
        assert!(
            !output.stderr.contains(bad),
            "nbdkit's stderr shows {bad:?}:\n{}",
            output.stderr
        );
    }
}

/// A background `nbdkit -f -U SOCKET ...` server, killed when dropped.
pub struct Server {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    valgrind_logs: ValgrindLogs,
}

impl Server {
    /// Starts nbdkit in the foreground on a Unix socket inside `dir` and waits until the
    /// socket exists. `plugin_args` as for [`nbdkit_run`].
    pub fn start(dir: &TestDir, options: &[&str], plugin_args: &[&str]) -> Server {
        let n = unique_number();
        // Unix socket paths are limited to ~108 bytes: keep the name short.
        let socket = dir.join(&format!("s{n}.sock"));
        let log = dir.join(&format!("nbdkit-{n}.log"));
        let log_file = File::create(&log).unwrap();
        let (mut cmd, valgrind_logs) = Nbdkit::serve_on(&socket)
            .options(options)
            .plugin(plugin_args)
            .command();
        let description = describe(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
        let mut server = Server {
            child: Some(child),
            socket,
            log,
            valgrind_logs,
        };
        let started = Instant::now();
        let limit = if valgrind_enabled() {
            VALGRIND_TIMEOUT
        } else {
            Duration::from_secs(30)
        };
        while !server.socket.exists() {
            if !server.is_running() {
                panic!(
                    "nbdkit exited before creating its socket: {description}\n{}{}",
                    server.log(),
                    server.valgrind_report()
                );
            }
            if started.elapsed() > limit {
                panic!(
                    "nbdkit did not create its socket in {limit:?}: {description}\n{}",
                    server.log()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        server.wait_for_greeting(started, limit, &description);
        server
    }

    /// Waits until nbdkit greets a connection: it listens a moment after the socket
    /// appears, and accepts only once `.after_fork` (where the filter opens the image)
    /// is done. The probe reads the greeting before closing, which nbdkit does not log.
    fn wait_for_greeting(&mut self, started: Instant, limit: Duration, description: &str) {
        loop {
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.socket) {
                let _ = stream.set_read_timeout(Some(limit));
                let mut magic = [0u8; 8];
                if stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                    return;
                }
            }
            if !self.is_running() {
                panic!(
                    "nbdkit stopped at start: {description}\n{}{}",
                    self.log(),
                    self.valgrind_report()
                );
            }
            if started.elapsed() > limit {
                panic!(
                    "nbdkit did not greet a connection in {limit:?}: {description}\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// URI of the default export (export name "").
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", path_str(&self.socket))
    }

    /// URI of the export `name` (as sent on the wire, e.g. "/hello.txt" or "hello.txt").
    pub fn export_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            percent_encode(name),
            path_str(&self.socket)
        )
    }

    /// nbdkit's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server already stopped").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().expect("try_wait").is_none(),
        }
    }

    /// `kill -9` the server (no cleanup, no final flush) and wait for it. Under valgrind,
    /// panics if memcheck's log (cut short, without a leak check) already shows an error.
    #[track_caller]
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            if let Err(report) = self.valgrind_logs.check() {
                panic!("{report}");
            }
        }
    }

    /// Asks the server to exit with SIGTERM (it closes the filesystem and the plugin) and
    /// waits for it; panics if it does not exit cleanly within 60 s (600 s under
    /// valgrind), or if memcheck reported an error.
    #[track_caller]
    pub fn stop(&mut self) {
        if let Err(e) = self.try_stop() {
            panic!("{e}");
        }
    }

    /// [`Server::stop`], returning what went wrong instead of panicking.
    fn try_stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        valgrind_wait_for_connections(pid);
        run("kill", &["-TERM", &pid.to_string()]).assert_success();
        let limit = if valgrind_enabled() {
            VALGRIND_TIMEOUT
        } else {
            Duration::from_secs(60)
        };
        let Some(status) = wait_or_kill(&mut child, limit) else {
            return Err(format!(
                "nbdkit did not exit within {limit:?} of SIGTERM\n{}",
                self.log()
            ));
        };
        self.valgrind_logs.check()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "nbdkit exited with {status} after SIGTERM\n{}",
                self.log()
            ))
        }
    }

    /// Memcheck's report so far, for failure messages (empty without valgrind).
    fn valgrind_report(&self) -> String {
        match self.valgrind_logs.check() {
            Err(report) => format!("\n{report}"),
            Ok(()) => String::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !valgrind_enabled() {
            self.kill9();
            return;
        }
        // Under valgrind a server the test did not stop gets SIGTERM instead of SIGKILL,
        // so memcheck also checks the filter's cleanup and leaks. Only memcheck's errors
        // fail the test here (printed instead, if it already failed), not the exit status.
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().expect("try_wait").is_none() {
            valgrind_wait_for_connections(child.id());
            let _ = run("kill", &["-TERM", &child.id().to_string()]);
        }
        let started = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if started.elapsed() > VALGRIND_TIMEOUT {
                eprintln!("nbdkit did not exit within {VALGRIND_TIMEOUT:?} of SIGTERM: killed");
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Err(report) = self.valgrind_logs.check() {
            if thread::panicking() {
                eprintln!("{report}");
            } else {
                panic!("{report}");
            }
        }
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The eval-plugin arguments for serving `image` through shell scripts, logging to
/// `log` one line per call: `open true|false` (the `readonly` argument),
/// `pread COUNT OFFSET`, `pwrite`, `flush`.
pub fn eval_plugin_args(image: &Path, log: &Path) -> Vec<String> {
    let img = shell_quote(path_str(image));
    let log = shell_quote(path_str(log));
    vec![
        "eval".to_string(),
        format!("open=echo \"open $2\" >> {log}; echo handle"),
        format!("get_size=stat -c %s {img}"),
        format!(
            "pread=echo \"pread $3 $4\" >> {log}; dd if={img} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
        ),
        format!(
            "pwrite=echo pwrite >> {log}; dd of={img} seek=$4 oflag=seek_bytes conv=notrunc status=none"
        ),
        format!("flush=echo flush >> {log}; sync {img}"),
    ]
}

// ---------------------------------------------------------------------------------------
// NBD clients
// ---------------------------------------------------------------------------------------

/// Runs `nbdsh -u URI -c SCRIPT` with `stdin` as input. The handle `h` is connected.
pub fn nbdsh(uri: &str, script: &str, stdin: &[u8]) -> CmdOutput {
    let mut cmd = command("nbdsh");
    cmd.args(["-u", uri, "-c", script]);
    run_command(cmd, stdin)
}

/// Runs a Python script with Debian's /usr/bin/python3 (which has the `nbd` module).
pub fn python(script: &str, stdin: &[u8]) -> CmdOutput {
    let mut cmd = command("/usr/bin/python3");
    cmd.args(["-c", script]);
    run_command(cmd, stdin)
}

/// Python flag expression for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFlush {
    /// Plain writes followed by one `flush`.
    Flush,
    /// Every write with NBD_CMD_FLAG_FUA, no flush.
    Fua,
    /// Plain writes, no flush.
    Nothing,
}

/// Writes each (offset, bytes) over one connection, then flushes (or uses FUA).
#[track_caller]
pub fn nbd_pwrite_many(uri: &str, writes: &[(u64, Vec<u8>)], mode: WriteFlush) {
    let ops: Vec<String> = writes
        .iter()
        .map(|(off, data)| format!("({off},{})", data.len()))
        .collect();
    let flags = if mode == WriteFlush::Fua {
        "nbd.CMD_FLAG_FUA"
    } else {
        "0"
    };
    let flush = if mode == WriteFlush::Flush {
        "True"
    } else {
        "False"
    };
    let script = format!(
        "import sys\n\
         data = sys.stdin.buffer.read()\n\
         pos = 0\n\
         for off, n in [{}]:\n\
         \x20   h.pwrite(data[pos:pos + n], off, {flags})\n\
         \x20   pos += n\n\
         assert pos == len(data)\n\
         if {flush}:\n\
         \x20   h.flush()\n",
        ops.join(",")
    );
    let input: Vec<u8> = writes.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    nbdsh(uri, &script, &input).assert_success();
}

/// Writes `data` at `offset` and flushes.
#[track_caller]
pub fn nbd_pwrite(uri: &str, offset: u64, data: &[u8]) {
    nbd_pwrite_many(uri, &[(offset, data.to_vec())], WriteFlush::Flush);
}

/// Reads each (offset, length) over one connection.
#[track_caller]
pub fn nbd_pread_many(uri: &str, ranges: &[(u64, usize)]) -> Vec<Vec<u8>> {
    let ops: Vec<String> = ranges
        .iter()
        .map(|(off, len)| format!("({off},{len})"))
        .collect();
    let script = format!(
        "import sys\n\
         for off, n in [{}]:\n\
         \x20   sys.stdout.buffer.write(h.pread(n, off))\n\
         sys.stdout.buffer.flush()\n",
        ops.join(",")
    );
    let out = nbdsh(uri, &script, &[]);
    out.assert_success();
    let total: usize = ranges.iter().map(|(_, len)| len).sum();
    assert_eq!(out.stdout.len(), total, "nbdsh returned a short read");
    let mut pos = 0;
    ranges
        .iter()
        .map(|(_, len)| {
            let piece = out.stdout[pos..pos + len].to_vec();
            pos += len;
            piece
        })
        .collect()
}

#[track_caller]
pub fn nbd_pread(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    nbd_pread_many(uri, &[(offset, len)]).pop().unwrap()
}

/// The export's size as the client sees it.
#[track_caller]
pub fn nbd_size(uri: &str) -> u64 {
    let out = nbdsh(uri, "print(h.get_size())", &[]);
    out.assert_success();
    out.stdout_text().trim().parse().expect("size")
}

/// The whole export read with nbdcopy to a file (`extra` e.g. `--no-extents`).
#[track_caller]
pub fn nbdcopy_read(uri: &str, dir: &TestDir, extra: &[&str]) -> Vec<u8> {
    let out_file = dir.unique_file("nbdcopy-out");
    let mut args: Vec<&str> = extra.to_vec();
    args.push(uri);
    args.push(path_str(&out_file));
    run("nbdcopy", &args).assert_success();
    let bytes = read_file(&out_file);
    let _ = fs::remove_file(&out_file);
    bytes
}

/// One base:allocation extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// The export's base:allocation map from offset 0 to the end, requesting one range at a
/// time until the whole export is described.
#[track_caller]
pub fn nbd_block_status(uri: &str) -> Vec<Extent> {
    let script = format!(
        "import nbd\n\
         h = nbd.NBD()\n\
         h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n\
         h.connect_uri({uri:?})\n\
         assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n\
         size = h.get_size()\n\
         off = 0\n\
         while off < size:\n\
         \x20   got = []\n\
         \x20   def cb(ctx, start, entries, err):\n\
         \x20       if ctx == nbd.CONTEXT_BASE_ALLOCATION:\n\
         \x20           got.append((start, entries))\n\
         \x20       return 0\n\
         \x20   h.block_status(min(size - off, 1 << 30), off, cb)\n\
         \x20   assert len(got) == 1, got\n\
         \x20   start, entries = got[0]\n\
         \x20   assert start == off, (start, off)\n\
         \x20   assert entries, 'empty extent list'\n\
         \x20   for i in range(0, len(entries), 2):\n\
         \x20       length, flags = entries[i], entries[i + 1]\n\
         \x20       assert length > 0, entries\n\
         \x20       length = min(length, size - off)\n\
         \x20       print(off, length, flags)\n\
         \x20       off += length\n\
         \x20       if off >= size:\n\
         \x20           break\n"
    );
    let out = python(&script, &[]);
    out.assert_success();
    out.stdout_text()
        .lines()
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|f| f.parse().unwrap())
                .collect();
            Extent {
                offset: fields[0],
                length: fields[1],
                flags: fields[2] as u32,
            }
        })
        .collect()
}

/// Asserts a base:allocation map is consistent with the file's contents and holes:
/// no range holding non-zero bytes is reported as zero, and every byte of
/// `expected_holes` (offset, length) is reported as hole+zero.
#[track_caller]
pub fn assert_extents_describe_file(
    extents: &[Extent],
    contents: &[u8],
    expected_holes: &[(u64, u64)],
) {
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert_eq!(covered, contents.len() as u64, "extents {extents:?}");
    for extent in extents {
        let range = extent.offset as usize..(extent.offset + extent.length) as usize;
        if extent.flags & STATE_ZERO != 0 {
            let first_nonzero = contents[range.clone()].iter().position(|&b| b != 0);
            assert!(
                first_nonzero.is_none(),
                "extent {extent:?} claims zeros but the file has data at offset {}",
                range.start + first_nonzero.unwrap_or(0)
            );
        }
        for &(hole_start, hole_len) in expected_holes {
            let overlap_start = hole_start.max(extent.offset);
            let overlap_end = (hole_start + hole_len).min(extent.offset + extent.length);
            if overlap_start < overlap_end {
                assert_eq!(
                    extent.flags,
                    STATE_HOLE | STATE_ZERO,
                    "extent {extent:?} overlaps the hole at {hole_start}+{hole_len} but is not hole+zero (all extents: {extents:?})"
                );
            }
        }
    }
}

/// Overwrites part of a host file in place (used to corrupt images).
pub fn overwrite_host_file(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom};
    let mut file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(bytes).unwrap();
}
