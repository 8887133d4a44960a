//! The fuzz targets: plain functions over one input each, run in process
//! on an in-memory device ([`ext2_rs::testing::MemDevice`]).  The AFL
//! binary (`src/bin/fuzz-afl.rs`), the replayer (`src/bin/replay.rs`) and
//! the normal test suite (`tests/fuzz_corpus.rs`, which includes this file)
//! all call [`run`].
//!
//! A target returns normally whatever the image holds: a damaged image is
//! an error returned cleanly, never a panic, an abort or a hang.  Where an
//! invariant of ours can be checked cheaply, a target asserts it.
//!
//! # Input format
//!
//! Images are mostly zeroes, so an input holds only the 512-byte sectors
//! that are not (see [`decode`]):
//!
//! ```text
//! u32 LE   device size in bytes (clamped to MIN_DEVICE..=MAX_DEVICE, whole sectors)
//! u16 LE   N, the number of sector records
//! N times  u16 LE sector index (modulo the device's sectors), 512 bytes
//! rest     the target's parameters (see each target)
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use ext2_rs::dir::read_dir;
use ext2_rs::error::{Errno, Error};
use ext2_rs::extent_map::{Content, Extent, FileMap, Piece};
use ext2_rs::fs::{Access, Filesystem, Ino, InodeInfo, Layout};
use ext2_rs::jbd2::{self, Replay, JBD2_MAGIC};
use ext2_rs::lazy_map::{LazyMap, MapSource};
use ext2_rs::mapping;
use ext2_rs::quota::{tree, Kind, Owner, Quotas};
use ext2_rs::testing::MemDevice;
use ext2_rs::txn::{self, Durability, Transactions};
use ext2_rs::BlockDevice;

/// A target: runs one input.
pub type Target = fn(&[u8]);

/// Every target, by the name `scripts/fuzz.sh` lists.
pub const TARGETS: &[(&str, Target)] = &[
    ("read", read),
    ("journal", journal),
    ("quota", quota),
    ("quota-tree", quota_tree),
    ("write", write),
];

/// Runs target `name` on `data`; `false` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, target)) => {
            target(data);
            true
        }
        None => false,
    }
}

pub const SECTOR: usize = 512;
pub const MIN_DEVICE: usize = 64 << 10;
pub const MAX_DEVICE: usize = 4 << 20;

/// An input's image and the parameters after it.
pub fn decode(data: &[u8]) -> (Vec<u8>, &[u8]) {
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let size = (u32_at(0).unwrap_or(0) as usize).clamp(MIN_DEVICE, MAX_DEVICE) / SECTOR * SECTOR;
    let count = data
        .get(4..6)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let mut image = vec![0u8; size];
    let sectors = size / SECTOR;
    let mut at = 6.min(data.len());
    for _ in 0..count {
        let Some(index) = data.get(at..at + 2) else {
            break;
        };
        let sector = u16::from_le_bytes([index[0], index[1]]) as usize % sectors;
        let bytes = &data[at + 2..(at + 2 + SECTOR).min(data.len())];
        image[sector * SECTOR..sector * SECTOR + bytes.len()].copy_from_slice(bytes);
        at = (at + 2 + SECTOR).min(data.len());
    }
    (image, &data[at..])
}

/// The input for `image` (whole sectors, at most [`MAX_DEVICE`] bytes)
/// with parameters `params`: the inverse of [`decode`].
pub fn encode(image: &[u8], params: &[u8]) -> Vec<u8> {
    assert!(image.len() <= MAX_DEVICE && image.len() % SECTOR == 0);
    let mut out = (image.len() as u32).to_le_bytes().to_vec();
    let records: Vec<(usize, &[u8])> = image
        .chunks(SECTOR)
        .enumerate()
        .filter(|(_, s)| s.iter().any(|&b| b != 0))
        .collect();
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    for (index, sector) in records {
        out.extend_from_slice(&(index as u16).to_le_bytes());
        out.extend_from_slice(sector);
    }
    out.extend_from_slice(params);
    out
}

/// Whether `EXT2_FUZZ_VERBOSE` asks for notes on what each target did.
fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("EXT2_FUZZ_VERBOSE").is_some())
}

/// A note on what a target did, shown with `EXT2_FUZZ_VERBOSE`.
fn note(what: impl FnOnce() -> String) {
    if verbose() {
        eprintln!("  {}", what());
    }
}

/// Reads parameters a byte or a word at a time; zeroes past the end.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | u16::from(self.byte()) << 8
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Opens the filesystem on `device` as the filter does at start: refused
/// when larger than its device.
fn open(device: Arc<dyn BlockDevice>, access: Access) -> Option<Filesystem> {
    let fs = Filesystem::open(device.clone(), access).ok()?;
    let blocks = device.size() / u64::from(fs.block_size());
    (fs.blocks_count() <= blocks).then_some(fs)
}

/// An image whose reads see a journal's replay, as the filter serves an
/// image whose journal needs recovery: read-only.
struct Replayed {
    base: Arc<MemDevice>,
    replay: Replay,
    bs: u64,
}

impl BlockDevice for Replayed {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.base.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        let mut block = offset / self.bs;
        while block * self.bs < end {
            if let Some(copy) = self.replay.copy_of(block) {
                let mut whole = vec![0u8; self.bs as usize];
                self.base.read_at(&mut whole, copy.image_block * self.bs)?;
                if copy.escaped {
                    whole[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                }
                let from = (block * self.bs).max(offset);
                let to = ((block + 1) * self.bs).min(end);
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                    &whole[(from - block * self.bs) as usize..(to - block * self.bs) as usize],
                );
            }
            block += 1;
        }
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> Result<(), Errno> {
        Err(Errno::EROFS)
    }

    fn zero_at(&self, _: u64, _: u64) -> Result<(), Errno> {
        Err(Errno::EROFS)
    }

    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
}

/// The journal's replay of the filesystem on `device`, as the filter loads
/// it (`jbd2::load`, the raw image read a block at a time).
fn load_replay(fs: &mut Filesystem, device: &MemDevice) -> ext2_rs::Result<Replay> {
    let bs = u64::from(fs.block_size());
    let read_block = |block: u64, buf: &mut [u8]| -> Result<(), Errno> {
        device.read_at(buf, block.checked_mul(bs).ok_or(Errno::EIO)?)
    };
    jbd2::load(fs, &read_block)
}

/// Opens the filesystem on `base` read-only as the filter does at start:
/// a journal needing recovery is replayed in memory.
fn open_served(base: &Arc<MemDevice>) -> Option<(Filesystem, Arc<dyn BlockDevice>)> {
    let mut fs = open(base.clone(), Access::ReadOnly)?;
    if !fs.needs_recovery() {
        return Some((fs, base.clone()));
    }
    let replay = load_replay(&mut fs, base).ok()?;
    let bs = u64::from(fs.block_size());
    drop(fs);
    let device: Arc<dyn BlockDevice> = Arc::new(Replayed {
        base: base.clone(),
        replay,
        bs,
    });
    let fs = open(device.clone(), Access::ReadOnly)?;
    Some((fs, device))
}

/// The most directory entries a walk looks at.
const WALK_ENTRIES: usize = 200;
/// The deepest a walk goes.
const WALK_DEPTH: usize = 6;

/// The files under the root: (path, inode, what it is), directories
/// first visited first, each inode once.
fn walk(fs: &mut Filesystem) -> Vec<(String, Ino, InodeInfo)> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let mut dirs = vec![(String::new(), ext2_rs::sys::EXT2_ROOT_INO, 0)];
    seen.insert(ext2_rs::sys::EXT2_ROOT_INO);
    let mut entries = 0;
    while let Some((path, dir, depth)) = dirs.pop() {
        let Ok(list) = read_dir(fs, dir) else {
            continue;
        };
        for entry in list {
            entries += 1;
            if entries > WALK_ENTRIES {
                return found;
            }
            if entry.name == b"." || entry.name == b".." || !seen.insert(entry.ino) {
                continue;
            }
            let name = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
            let Ok(info) = fs.inode(entry.ino) else {
                continue;
            };
            if info.is_dir() && depth < WALK_DEPTH {
                dirs.push((name.clone(), entry.ino, depth + 1));
            }
            found.push((name, entry.ino, info));
        }
    }
    found
}

/// The first bytes of a file whose map is read: more is left to requests
/// a client would make, a window at a time.
const READ_SPAN: u64 = 8 << 20;

/// Reads the map of every regular file found, and follows paths (symlinks
/// in any component), as the filter serves files: looked up by path, maps
/// read lazily through a cache of `cache_bytes`, inline files through the
/// library.
fn serve_files(fs: &mut Filesystem, device: &Arc<dyn BlockDevice>, params: &mut Params) {
    let cache_bytes = 256usize << (params.byte() % 12);
    let source = MapSource::new(fs, device.clone(), cache_bytes);
    let files = walk(fs);
    for (path, _, _) in &files {
        // What a client names: found again by path, symlinks followed.
        let Ok(ino) = fs.lookup(path) else {
            continue;
        };
        let Ok(info) = fs.inode(ino) else {
            continue;
        };
        if !info.is_regular() {
            continue;
        }
        note(|| format!("{path}: {info:?}"));
        read_file(fs, &source, ino, path, &info);
    }
    // Paths from the parameters (symlink loops, `..`, long names).
    while !params.is_empty() {
        let len = usize::from(params.byte() % 64);
        let bytes: Vec<u8> = (0..len).map(|_| params.byte()).collect();
        let path = format!("/{}", String::from_utf8_lossy(&bytes));
        if let Ok(ino) = fs.lookup(&path) {
            if let Ok(info) = fs.inode(ino) {
                if info.is_regular() {
                    note(|| format!("{path:?} found: {info:?}"));
                    read_file(fs, &source, ino, &path, &info);
                }
            }
        }
    }
}

fn read_file(fs: &mut Filesystem, source: &MapSource, ino: Ino, path: &str, info: &InodeInfo) {
    if let ext2_rs::policy::Verdict::Refused(_) = ext2_rs::policy::file(path, info.flags) {
        return;
    }
    if info.layout == Layout::Inline {
        let mut buf = vec![0u8; info.size.min(4096) as usize];
        let _ = fs.read_via_library(ino, &mut buf, 0);
        return;
    }
    let Ok(map) = LazyMap::open(fs, source.clone(), ino, path) else {
        return;
    };
    let bs = map.block_size();
    let mut pieces = Vec::new();
    let span = info.size.min(READ_SPAN);
    let mut at = 0;
    while at < span {
        let len = (256 << 10).min(span - at);
        if let Err(e) = map.pieces(at, len, &mut pieces) {
            note(|| format!("{path}: {e}"));
            return;
        }
        check_pieces(&pieces, at, len);
        at += len;
    }
    // The end of a long file, as a client reading its last blocks.
    if info.size > span {
        let last = info.size.div_ceil(bs).saturating_sub(16);
        if let Ok(window) = map.window(last..last + 16) {
            let _ = window.pieces(last * bs, 16 * bs);
        }
    }
}

/// Pieces must tile the range they describe, in order.
fn check_pieces(pieces: &[Piece], offset: u64, len: u64) {
    let mut pos = offset;
    for piece in pieces {
        assert_eq!(piece.file_offset, pos, "pieces out of order: {pieces:?}");
        assert!(piece.len > 0, "an empty piece: {pieces:?}");
        pos += piece.len;
    }
    assert_eq!(
        pos,
        offset + len,
        "pieces do not cover the range: {pieces:?}"
    );
}

/// `read`: opens the image as the filter does at start (read-only, a
/// journal replayed in memory), walks its directories and reads every
/// regular file's map, the files found again by path with symlinks
/// followed.  Parameters: the map cache's size (one byte, 256 B to
/// 512 KiB), then paths to look up (length byte, bytes).
pub fn read(data: &[u8]) {
    let (image, params) = decode(data);
    let mut params = Params(params);
    let base = Arc::new(MemDevice::new(image));
    let Some((mut fs, device)) = open_served(&base) else {
        return;
    };
    serve_files(&mut fs, &device, &mut params);
}

/// `journal`: replays the journal of the image in memory (whether or not
/// it needs recovery), serves the replayed image read-only, and, as
/// `ext2journal=replay` does, writes the replay into a copy of the image,
/// marks the journal empty, clears `needs_recovery`, and opens the result.
pub fn journal(data: &[u8]) {
    let (image, params) = decode(data);
    let base = Arc::new(MemDevice::new(image));
    let Some(mut fs) = open(base.clone(), Access::ReadOnly) else {
        return;
    };
    let has_journal =
        fs.super_block().s_feature_compat & ext2_rs::sys::EXT3_FEATURE_COMPAT_HAS_JOURNAL != 0;
    if !has_journal {
        return;
    }
    let needs_recovery = fs.needs_recovery();
    let replay = match load_replay(&mut fs, &base) {
        Ok(replay) => replay,
        Err(e) => return note(|| format!("load: {e}")),
    };
    note(|| {
        format!(
            "replay of {} blocks: {:?}",
            replay.len(),
            replay.checkpoint().map(|c| &c.errors)
        )
    });
    let bs = u64::from(fs.block_size());
    drop(fs);
    // As served read-only.
    let served: Arc<dyn BlockDevice> = Arc::new(Replayed {
        base: base.clone(),
        replay: replay.clone(),
        bs,
    });
    if let Some(mut fs) = open(served.clone(), Access::ReadOnly) {
        serve_files(&mut fs, &served, &mut Params(params));
    }
    // As written out.
    if !needs_recovery {
        return;
    }
    let Some(checkpoint) = replay.checkpoint().cloned() else {
        return;
    };
    if checkpoint.errors.is_some() {
        return;
    }
    let Ok(empty) = checkpoint.empty_superblock() else {
        return;
    };
    let out = Arc::new(MemDevice::new(base.snapshot()));
    for (block, _) in replay.blocks() {
        let mut buf = vec![0u8; bs as usize];
        served
            .read_at(&mut buf, block * bs)
            .expect("a replayed block lies inside the filesystem");
        jbd2::keep_needs_recovery(&mut buf, block * bs);
        out.write_at(&buf, block * bs).expect("inside the device");
    }
    out.write_at(&empty, checkpoint.superblock_block * bs)
        .expect("the journal superblock lies inside the device");
    let Some(mut fs) = open(out.clone(), Access::ReadWrite) else {
        return;
    };
    if fs.needs_recovery() && fs.clear_needs_recovery().is_err() {
        return;
    }
    note(|| "replay written out".into());
    drop(fs);
    let Some(mut fs) = open(out.clone(), Access::ReadOnly) else {
        return;
    };
    let device: Arc<dyn BlockDevice> = out;
    serve_files(&mut fs, &device, &mut Params(params));
}

/// `quota`: opens the image read-write (which loads and checks its quota
/// files), lists every record, charges owners from the parameters (uid,
/// gid, project as u16s, then a signed byte of KiB), flushes, and opens and
/// lists again.
pub fn quota(data: &[u8]) {
    let (image, params) = decode(data);
    let mut params = Params(params);
    let base = Arc::new(MemDevice::new(image));
    let Some(mut fs) = open(base.clone(), Access::ReadWrite) else {
        return;
    };
    let Ok(Some(mut quotas)) = Quotas::load(fs.handle()) else {
        return;
    };
    let kinds = [Kind::User, Kind::Group, Kind::Project];
    for kind in kinds {
        let _ = quotas.records(fs.handle(), kind);
    }
    for _ in 0..8 {
        if params.is_empty() {
            break;
        }
        let owner = Owner {
            uid: u32::from(params.u16()),
            gid: u32::from(params.u16()),
            project: u32::from(params.u16()),
        };
        let delta = i64::from(params.byte() as i8) * 1024;
        if let Err(e) = quotas.add_space(fs.handle(), owner, delta) {
            note(|| format!("add_space: {e}"));
            break;
        }
        note(|| format!("{owner:?} charged {delta}"));
    }
    if fs.flush().is_err() {
        return;
    }
    drop(fs);
    let Some(mut fs) = open(base, Access::ReadWrite) else {
        return;
    };
    if let Ok(Some(quotas)) = Quotas::load(fs.handle()) {
        for kind in kinds {
            let _ = quotas.records(fs.handle(), kind);
        }
    }
}

/// A quota file in memory, 1 KiB blocks (at most [`QUOTA_FILE_BLOCKS`]).
struct QuotaFile(Vec<tree::Block>);

/// The most blocks a fuzzed quota file grows to.
const QUOTA_FILE_BLOCKS: usize = 4096;

impl tree::Store for QuotaFile {
    fn read(&mut self, index: u32) -> ext2_rs::Result<tree::Block> {
        Ok(self
            .0
            .get(index as usize)
            .copied()
            .unwrap_or([0; tree::BLOCK]))
    }

    fn write(&mut self, index: u32, block: &tree::Block) -> ext2_rs::Result<()> {
        let index = index as usize;
        if index >= QUOTA_FILE_BLOCKS {
            return Err(ext2_rs::Error::other(Errno::EFBIG, "quota file too large"));
        }
        if index >= self.0.len() {
            self.0.resize(index + 1, [0; tree::BLOCK]);
        }
        self.0[index] = *block;
        Ok(())
    }
}

/// `quota-tree`: the quota file format alone (`ext2_rs::quota::tree`),
/// in memory.  Input: the kind (a byte, modulo 3), the number of requests
/// (a byte, at most 64), the requests (an operation byte, then an id as a
/// u32: find, find or insert as the quota code charges an owner, add to
/// its space, list every entry), then the file's bytes.
pub fn quota_tree(data: &[u8]) {
    let mut params = Params(data);
    let kind = [Kind::User, Kind::Group, Kind::Project][usize::from(params.byte() % 3)];
    let count = usize::from(params.byte() % 65);
    let requests: Vec<(u8, u32)> = (0..count)
        .map(|_| {
            let op = params.byte();
            let id = u32::from(params.u16()) | u32::from(params.u16()) << 16;
            (op, id)
        })
        .collect();
    let blocks = params
        .0
        .chunks(tree::BLOCK)
        .map(|chunk| {
            let mut block = [0u8; tree::BLOCK];
            block[..chunk.len()].copy_from_slice(chunk);
            block
        })
        .collect();
    let Ok(mut quota) = tree::QuotaTree::open(QuotaFile(blocks), kind) else {
        return;
    };
    for (op, id) in requests {
        let result = match op % 4 {
            0 => quota.find(id).map(drop),
            1 => match quota.find(id) {
                Ok(Some(at)) => quota.entry(at).map(drop),
                Ok(None) => quota.insert(id).map(drop),
                Err(e) => Err(e),
            },
            2 => match quota.find(id) {
                Ok(Some(at)) => quota
                    .update_entry(at, |entry| {
                        entry.add_space(i64::from(op as i8) << 10);
                        Ok(())
                    })
                    .map(drop),
                other => other.map(drop),
            },
            _ => quota.all_entries().map(drop),
        };
        note(|| format!("quota tree request {op} for {id}: {result:?}"));
    }
}

/// One served file being written, as the filter's `ServedFile`.
struct Writer {
    fs: Filesystem,
    tx: Transactions,
    image: Arc<MemDevice>,
    map: LazyMap,
    ino: Ino,
    layout: Layout,
    size: u64,
    bs: u64,
    ratio: u64,
}

/// The most blocks one change links, as the filter's `HOLE_CHUNK_BLOCKS`.
const HOLE_CHUNK: u64 = 1024;

impl Writer {
    /// The file's map of `blocks`, with the writes into holes not yet
    /// linked laid over it.
    fn window(&mut self, blocks: std::ops::Range<u64>) -> ext2_rs::Result<FileMap> {
        if self.map.is_stale() {
            self.map.reload()?;
        }
        let mut window = self.map.window(blocks.clone())?;
        for (logical, physical, len) in self.tx.unlinked(self.ino) {
            let e = Extent {
                logical,
                physical,
                len,
                unwritten: false,
            };
            if let Some(e) = e.clipped_to(&blocks) {
                window.replace_range(e.logical, e.end(), &[e]);
            }
        }
        Ok(window)
    }

    /// The tree may have changed: read it again.
    fn tree_changed(&mut self) -> ext2_rs::Result<()> {
        self.map.reload()
    }

    /// The blocks a change of `[offset, offset + len)` looks at, as the
    /// filter's `change_window`: the block before (where new blocks go)
    /// too, rounded out to whole clusters (bigalloc places a block in the
    /// cluster its neighbours already have).
    fn window_blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = (offset / self.bs).saturating_sub(1) / self.ratio * self.ratio;
        let end = (offset + len).div_ceil(self.bs).div_ceil(self.ratio) * self.ratio;
        first..end
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> ext2_rs::Result<()> {
        let len = data.len() as u64;
        // Kept up to date for the rest of the request, as the filter's.
        let mut window = self.window(self.window_blocks(offset, len))?;
        for piece in window.pieces(offset, len) {
            let at = (piece.file_offset - offset) as usize;
            let bytes = &data[at..at + piece.len as usize];
            match piece.content {
                Content::Data { image_offset } => self
                    .image
                    .write_at(bytes, image_offset)
                    .map_err(Error::reported)?,
                Content::Hole => self.fill_hole(&mut window, &piece, bytes)?,
                Content::Unwritten { image_offset } => {
                    self.fill_unwritten(&mut window, &piece, image_offset, bytes)?
                }
            }
        }
        Ok(())
    }

    /// The whole blocks `piece` touches and their new bytes, zeroes around
    /// the piece's.
    fn padded(&self, piece: &Piece, bytes: &[u8]) -> (std::ops::Range<u64>, Vec<u8>) {
        let first = piece.file_offset / self.bs;
        let end = (piece.file_offset + piece.len).div_ceil(self.bs);
        let mut buf = vec![0u8; ((end - first) * self.bs) as usize];
        let at = (piece.file_offset - first * self.bs) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        (first..end, buf)
    }

    fn fill_hole(
        &mut self,
        window: &mut FileMap,
        piece: &Piece,
        bytes: &[u8],
    ) -> ext2_rs::Result<()> {
        let (blocks, buf) = self.padded(piece, bytes);
        let chunk = HOLE_CHUNK.max(self.ratio);
        let mut start = blocks.start;
        while start < blocks.end {
            let end = ((start / chunk + 1) * chunk).min(blocks.end);
            let at = ((start - blocks.start) * self.bs) as usize;
            let part = &buf[at..at + ((end - start) * self.bs) as usize];
            self.fill_chunk(window, start..end, part)?;
            start = end;
        }
        Ok(())
    }

    fn fill_chunk(
        &mut self,
        window: &mut FileMap,
        blocks: std::ops::Range<u64>,
        buf: &[u8],
    ) -> ext2_rs::Result<()> {
        let (ino, layout, bs, ratio) = (self.ino, self.layout, self.bs, self.ratio);
        let count = blocks.end - blocks.start;
        let image = self.image.clone();
        let before = blocks
            .start
            .checked_sub(1)
            .map(|b| window.pieces(b * bs, 1)[0].content);
        let near = match before {
            Some(Content::Data { image_offset }) | Some(Content::Unwritten { image_offset }) => {
                Some(image_offset / bs + 1)
            }
            _ => None,
        };
        let write_runs = |runs: &mapping::BlockRuns| -> ext2_rs::Result<()> {
            let mut at = 0usize;
            for &(physical, len) in runs {
                let n = (len * bs) as usize;
                image
                    .write_at(&buf[at..at + n], physical * bs)
                    .map_err(Error::reported)?;
                at += n;
            }
            Ok(())
        };
        if layout == Layout::Extents && ratio == 1 {
            let links = self.tx.links_made();
            let result =
                self.tx
                    .fill_hole(&mut self.fs, ino, blocks.start, count, near, |fs, goal| {
                        let runs = mapping::allocate(fs, goal, count)?;
                        write_runs(&runs)?;
                        Ok(runs)
                    });
            if self.tx.links_made() != links {
                self.tree_changed()?;
            }
            let runs = result?;
            window.replace_range(
                blocks.start,
                blocks.end,
                &Extent::written_runs(blocks.start, &runs),
            );
            Ok(())
        } else {
            let result = self.tx.change_allocating(&mut self.fs, ino, count, |fs| {
                let goal = match near {
                    Some(goal) => goal,
                    None => mapping::goal_for(fs, ino, blocks.start)?,
                };
                let (runs, new) = if ratio == 1 {
                    let runs = mapping::allocate(fs, goal, count)?;
                    (runs.clone(), runs)
                } else {
                    let existing = |cluster: u64| physical_cluster(&*window, cluster, ratio);
                    mapping::allocate_clustered(fs, blocks.clone(), existing, goal)?
                };
                write_runs(&runs)?;
                let new_count = new.iter().map(|r| r.1).sum::<u64>() / ratio;
                mapping::link_blocks(fs, ino, layout, blocks.start, &runs, new_count)?;
                Ok(runs)
            });
            self.tree_changed()?;
            let runs = result?;
            window.replace_range(
                blocks.start,
                blocks.end,
                &Extent::written_runs(blocks.start, &runs),
            );
            Ok(())
        }
    }

    fn fill_unwritten(
        &mut self,
        window: &mut FileMap,
        piece: &Piece,
        image_offset: u64,
        bytes: &[u8],
    ) -> ext2_rs::Result<()> {
        let (blocks, buf) = self.padded(piece, bytes);
        let physical = (image_offset - (piece.file_offset - blocks.start * self.bs)) / self.bs;
        let (ino, bs, image) = (self.ino, self.bs, self.image.clone());
        let result = self.tx.change(&mut self.fs, Some(ino), |fs| {
            image
                .write_at(&buf, physical * bs)
                .map_err(Error::reported)?;
            mapping::mark_written(fs, ino, blocks.start, blocks.end)
        });
        self.tree_changed()?;
        result?;
        let written = Extent {
            logical: blocks.start,
            physical,
            len: blocks.end - blocks.start,
            unwritten: false,
        };
        window.replace_range(blocks.start, blocks.end, &[written]);
        Ok(())
    }

    /// Frees whole blocks `blocks` (extent files without bigalloc, as the
    /// filter's trim), a change at a time.
    fn punch(&mut self, blocks: std::ops::Range<u64>) -> ext2_rs::Result<()> {
        if self.layout != Layout::Extents || self.ratio != 1 || blocks.is_empty() {
            return Ok(());
        }
        let (ino, layout) = (self.ino, self.layout);
        let budget = self.tx.change_limit();
        let mut at = blocks.start;
        while at < blocks.end {
            let result = self.tx.change(&mut self.fs, Some(ino), |fs| {
                mapping::punch(fs, ino, layout, at, blocks.end, budget)
            });
            self.tree_changed()?;
            let done = result?;
            assert!(
                done > at && done <= blocks.end,
                "punch from {at} to {} went on to {done}",
                blocks.end
            );
            at = done;
        }
        Ok(())
    }

    /// Zeroes a range: whole blocks punched (when punching), the rest of
    /// the data zeroed in place.
    fn zero(&mut self, offset: u64, len: u64) -> ext2_rs::Result<()> {
        let first = offset.div_ceil(self.bs);
        let end = ((offset + len).min(self.size) / self.bs).max(first);
        let end = if offset + len >= self.size {
            self.size.div_ceil(self.bs).max(first)
        } else {
            end
        };
        self.punch(first..end)?;
        let window = self.window(self.window_blocks(offset, len))?;
        for piece in window.pieces(offset, len) {
            if let Content::Data { image_offset } = piece.content {
                self.image
                    .zero_at(piece.len, image_offset)
                    .map_err(Error::reported)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> ext2_rs::Result<()> {
        let linked = self.tx.link_pending(&mut self.fs, self.ino);
        self.tree_changed()?;
        linked?;
        self.tx.commit(&mut self.fs, Durability::Home)
    }
}

/// The physical cluster already holding a block of logical cluster
/// `cluster` in `window`, if any (bigalloc).
fn physical_cluster(window: &FileMap, cluster: u64, ratio: u64) -> Option<u64> {
    let bs = window.block_size();
    window
        .pieces(cluster * ratio * bs, ratio * bs)
        .iter()
        .find_map(|p| match p.content {
            Content::Data { image_offset } | Content::Unwritten { image_offset } => {
                Some(image_offset / bs / ratio)
            }
            Content::Hole => None,
        })
}

/// `write`: opens the image read-write with transactions as the filter
/// does for a writable connection, serves one regular file (parameter: a
/// byte choosing among the files found, largest first) and runs requests on it,
/// five bytes each: an operation byte (write, trim, zero, flush, commit),
/// then the offset in blocks (u16, modulo the file's blocks plus 8) and
/// the length in blocks (u8, plus one), an odd operation byte making the
/// write unaligned.  Then shuts down cleanly and opens the result.  Any
/// error is returned cleanly; a file refused for writing is not written.
pub fn write(data: &[u8]) {
    let _ = write_images(data);
}

/// The image before and after [`write`]'s requests and clean shutdown;
/// `None` when it was not written (refused, or the shutdown failed).
pub fn write_images(data: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (image, params) = decode(data);
    let mut params = Params(params);
    let before = image.clone();
    let base = Arc::new(MemDevice::new(image));
    let choice = usize::from(params.byte());
    // The file, found as the filter finds it: read-only first.
    let (path, ino, info) = {
        let mut fs = open(base.clone(), Access::ReadOnly)?;
        if fs.needs_recovery() {
            // Served read-only in memory (ext2journal=memory).
            return None;
        }
        let mut files: Vec<_> = walk(&mut fs)
            .into_iter()
            .filter(|(_, _, info)| info.is_regular())
            .collect();
        // The largest first (the sparse and fragmented files of the seeds).
        files.sort_by_key(|(path, _, info)| (std::cmp::Reverse(info.size), path.clone()));
        if files.is_empty() {
            return None;
        }
        files[choice % files.len()].clone()
    };
    if !ext2_rs::policy::file(&path, info.flags).writable() || info.layout == Layout::Inline {
        return None;
    }
    let Ok((mut fs, tx)) = txn::open_read_write(base.clone(), None) else {
        return None;
    };
    if fs.blocks_count() > base.size() / u64::from(fs.block_size()) {
        return None;
    }
    let source = MapSource::new(&fs, tx.cache().clone(), 4096);
    let Ok(map) = LazyMap::open(&mut fs, source, ino, &path) else {
        return None;
    };
    let bs = u64::from(fs.block_size());
    let ratio = fs.cluster_ratio();
    let mut w = Writer {
        fs,
        tx,
        image: base.clone(),
        map,
        ino,
        layout: info.layout,
        size: info.size,
        bs,
        ratio,
    };
    let file_blocks = info.size.div_ceil(bs);
    if file_blocks == 0 {
        return None;
    }
    for _ in 0..32 {
        if params.is_empty() {
            break;
        }
        let op = params.byte();
        let block = u64::from(params.u16()) % file_blocks;
        let blocks = (u64::from(params.byte()) + 1).min(file_blocks - block);
        let (mut offset, mut len) = (block * bs, blocks * bs);
        if op & 1 == 1 {
            offset += u64::from(op) % bs.min(len);
            len -= offset - block * bs;
        }
        let len = len.min(info.size - offset.min(info.size));
        if len == 0 {
            continue;
        }
        let result = match op % 10 / 2 {
            0 | 1 => {
                let fill = op.wrapping_mul(0x3b) | 1;
                w.write(offset, &vec![fill; len as usize])
            }
            2 => w.punch(offset.div_ceil(bs)..(offset + len) / bs),
            3 => w.zero(offset, len),
            _ if op & 1 == 0 => w.flush(),
            _ => w.tx.commit(&mut w.fs, Durability::Recoverable),
        };
        note(|| format!("op {op} at {offset} for {len}: {result:?}"));
        if result.is_err() {
            // As the filter: the request fails, the server goes on.
            continue;
        }
    }
    let Writer { mut fs, mut tx, .. } = w;
    let shutdown = tx.shutdown(&mut fs);
    note(|| format!("shutdown: {shutdown:?}"));
    let clean = shutdown.is_ok();
    drop(tx);
    drop(fs);
    if !clean {
        return None;
    }
    if let Some((mut fs, device)) = open_served(&base) {
        serve_files(&mut fs, &device, &mut Params(&[]));
    }
    Some((before, base.snapshot()))
}

/// Once per process, before any target: libext2fs's messages registered,
/// and ext2-rs's error messages dropped unless `EXT2_FUZZ_VERBOSE` is set
/// (a fuzzer runs millions of inputs, most of them damaged images).
pub fn setup() {
    ext2_rs::load();
    if std::env::var_os("EXT2_FUZZ_VERBOSE").is_none() {
        fn silent(_: &str) {}
        fn never(_: ext2_rs::log::Topic) -> bool {
            false
        }
        ext2_rs::log::set_sink(ext2_rs::log::Sink {
            error: silent,
            debug: silent,
            enabled: never,
        });
    }
}
