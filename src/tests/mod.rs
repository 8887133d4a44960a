//! In-process tests of the filter's core: the real libext2fs and the real
//! server, volume and served files over an in-memory device
//! (`device::memory`), judged by e2fsprogs (`e2fsck -fn`, `debugfs`) and
//! ext2-rs's crash judges.  nbdkit itself is tested in `tests/`.

mod discard;
mod faults;
mod holes;
mod mmp;
mod read;
mod upgrade;
mod write;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use ext2_rs::testing::MemDevice;
use ext2_rs::BlockDevice;

use crate::device::memory::MemoryDevice;
use crate::device::Device;
use crate::server::config::ConfigBuilder;
use crate::server::{Connection, Server};

/// A directory of its own for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ext2filter-core-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file to put into a new image: its path and how to fill it.
pub enum Content {
    /// These bytes.
    Bytes(Vec<u8>),
    /// A sparse file of this size with these `(offset, bytes)` written.
    Sparse(u64, Vec<(u64, Vec<u8>)>),
    Dir,
    Symlink(&'static str),
}

/// Bytes that tell their offset apart: `seed` and the offset mixed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

fn load_library() {
    static LOAD: Once = Once::new();
    LOAD.call_once(ext2_rs::load);
}

/// An image made by `mke2fs` with `args` (`-t ext4`, `-b 1024`...) of
/// `size`, holding `files`; `debugfs` runs `edits` on it after.
pub fn image_with(
    args: &[&str],
    size: &str,
    files: &[(&str, Content)],
    edits: &[&str],
) -> Arc<MemDevice> {
    load_library();
    let dir = TempDir::new();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    for (path, content) in files {
        let at = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        match content {
            Content::Bytes(bytes) => std::fs::write(&at, bytes).unwrap(),
            Content::Sparse(size, writes) => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::create(&at).unwrap();
                f.set_len(*size).unwrap();
                for (offset, bytes) in writes {
                    f.write_all_at(bytes, *offset).unwrap();
                }
            }
            Content::Dir => std::fs::create_dir_all(&at).unwrap(),
            Content::Symlink(target) => std::os::unix::fs::symlink(target, &at).unwrap(),
        }
    }
    let root_arg = root.to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-d", &root_arg]);
    let device = MemDevice::mkfs(&all, size);
    if !edits.is_empty() {
        let image = dir.path().join("edit.img");
        std::fs::write(&image, device.snapshot()).unwrap();
        for edit in edits {
            let out = Command::new("debugfs")
                .args(["-w", "-R", edit])
                .arg(&image)
                .output()
                .expect("debugfs runs");
            assert!(out.status.success(), "debugfs {edit}: {out:?}");
        }
        return Arc::new(MemDevice::from_file(&image));
    }
    Arc::new(device)
}

/// [`image_with`] without edits.
pub fn image(args: &[&str], size: &str, files: &[(&str, Content)]) -> Arc<MemDevice> {
    image_with(args, size, files, &[])
}

/// The configuration nbdkit would build from `params`.
pub fn config(params: &[(&str, &str)]) -> Arc<crate::server::config::Config> {
    let mut builder = ConfigBuilder::default();
    for (key, value) in params {
        assert_eq!(builder.set(key, value), Ok(true), "{key}={value}");
    }
    Arc::new(builder.finish().expect("a complete configuration"))
}

/// A server started over `device` as `.after_fork` starts it.
pub fn serve(device: Arc<dyn Device>, params: &[(&str, &str)]) -> Server {
    load_library();
    Server::start(config(params), device).expect("the server starts")
}

/// A prepared connection, as `.open` and `.prepare` make it.
pub fn connect(server: &Server, readonly: bool, export: &str) -> Connection {
    let mut conn = server
        .connect(readonly, export)
        .expect("the connection opens");
    conn.prepare().expect("the connection is prepared");
    conn
}

/// A memory device over `bytes` that can do everything once writable.
pub fn device_over(bytes: &Arc<MemDevice>) -> Arc<MemoryDevice> {
    Arc::new(MemoryDevice::new(bytes.clone() as Arc<dyn BlockDevice>))
}

/// Runs `program` with `args` and the image file last; returns its exit
/// code and output.
fn run_on(program: &str, args: &[&str], image: &Path) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Asserts that `e2fsck -fn` finds nothing wrong with `bytes`.
pub fn assert_fsck_clean(bytes: &[u8]) {
    let dir = TempDir::new();
    let image = dir.path().join("check.img");
    std::fs::write(&image, bytes).unwrap();
    let (code, text) = run_on("e2fsck", &["-fn"], &image);
    assert_eq!(code, 0, "e2fsck -fn:\n{text}");
}

/// `bytes` as boot leaves it after a power cut: the journal replayed
/// (`e2fsck -p -E journal_only`), then checked clean by `e2fsck -fn`.
pub fn recovered(bytes: &[u8]) -> Vec<u8> {
    let dir = TempDir::new();
    let image = dir.path().join("crashed.img");
    std::fs::write(&image, bytes).unwrap();
    let (code, text) = run_on("e2fsck", &["-p", "-E", "journal_only"], &image);
    assert!(code <= 1, "journal replay:\n{text}");
    let recovered = std::fs::read(&image).unwrap();
    assert_fsck_clean(&recovered);
    recovered
}

/// What `debugfs` dumps of `path` in `bytes`.
pub fn dump(bytes: &[u8], path: &str) -> Vec<u8> {
    let dir = TempDir::new();
    let image = dir.path().join("dump.img");
    std::fs::write(&image, bytes).unwrap();
    crash_judge::judge::dump(&image, path, dir.path()).expect("debugfs dumps the file")
}

/// The free blocks `dumpe2fs -h` reports for `bytes`.
pub fn free_blocks(bytes: &[u8]) -> u64 {
    let dir = TempDir::new();
    let image = dir.path().join("free.img");
    std::fs::write(&image, bytes).unwrap();
    let (_, text) = run_on("dumpe2fs", &["-h"], &image);
    text.lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("dumpe2fs -h:\n{text}"))
}

/// Reads `len` bytes at `offset` through `conn`.
pub fn read(conn: &Connection, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    conn.pread(&mut buf, offset).expect("the read succeeds");
    buf
}
