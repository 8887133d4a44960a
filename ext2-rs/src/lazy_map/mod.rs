//! A served file's block map, read lazily: opening a file reads only its
//! inode; the extent tree's index and leaf blocks, or the indirect blocks,
//! are read when a request first touches their range, checked as the
//! kernel checks them, and kept in a [`MapCache`] shared by every file,
//! whose memory is bounded (evicted blocks are read again when needed).
//!
//! The reader is plain Rust over the [`BlockDevice`] that libext2fs also
//! reads through, so it needs no library lock and sees libext2fs's own
//! writes.  Blocks that lie next to each other in the image are read in
//! one request, and a reader that walks the file in order gets the next
//! map blocks read ahead.
//!
//! The map of a file changes only under its owner's exclusive lock; the
//! owner then calls [`LazyMap::reload`], which starts a new epoch of the
//! tree (so no block cached from before is used again) and re-reads the
//! root from the inode.

mod cache;
mod extent_node;
mod geometry;
mod inode;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use cache::{CacheStats, MapCache, Node, NodeKey};
pub use extent_node::{ExtentNode, IndexEntry, Place};
pub use geometry::Geometry;
pub use inode::{MapKind, RawInode};

use crate::device::BlockDevice;
use crate::error::{Errno, Error, Result};
use crate::extent_map::{pieces_in, Extent, FileMap, Piece};
use crate::format::{i_block_bytes, le32};
use crate::fs::{Filesystem, Ino};

/// Map blocks read ahead of a reader that walks a file in order.
const READ_AHEAD_NODES: usize = 128;
/// The largest run of adjacent map blocks read as one request.
const MAX_BATCH_BYTES: u64 = 1 << 20;

/// Runs a job on another thread, later (the host's worker pool).
pub type Spawn = dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync;

/// Where every file's map blocks come from: the device libext2fs reads,
/// the filesystem's geometry, the shared cache, and (if the host has one)
/// a way to read ahead in the background.
#[derive(Clone)]
pub struct MapSource {
    pub device: Arc<dyn BlockDevice>,
    pub geometry: Arc<Geometry>,
    pub cache: Arc<MapCache>,
    pub background: Option<Arc<Spawn>>,
}

impl MapSource {
    /// The source for `fs`, whose blocks `device` reads, with a cache of
    /// about `cache_bytes`.
    pub fn new(fs: &Filesystem, device: Arc<dyn BlockDevice>, cache_bytes: usize) -> MapSource {
        MapSource {
            device,
            geometry: Arc::new(Geometry::new(fs)),
            cache: Arc::new(MapCache::new(cache_bytes)),
            background: None,
        }
    }

    /// Map blocks are read ahead with `spawn` rather than by the request
    /// that finds them missing.
    pub fn with_background(mut self, spawn: Arc<Spawn>) -> MapSource {
        self.background = Some(spawn);
        self
    }
}

/// What kind of map block is expected at a place in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// An extent tree node of this depth.
    Extents(u16),
    /// An indirect block.
    Pointers,
}

/// Reads, checks, parses and caches map blocks of one version of one
/// file's map; cheap to clone, so a background job can own one.
#[derive(Clone)]
struct Reader {
    source: MapSource,
    name: Arc<str>,
    map: u64,
    epoch: u64,
    csum_seed: Option<u32>,
}

impl Reader {
    fn key(&self, block: u64) -> NodeKey {
        NodeKey {
            map: self.map,
            epoch: self.epoch,
            block,
        }
    }

    fn damaged(&self, why: impl std::fmt::Display) -> Error {
        Error::other(
            Errno::EIO,
            format!("{}: {why}: the image is damaged", self.name),
        )
    }

    fn parse(&self, bytes: &[u8], block: u64, shape: Shape) -> std::result::Result<Node, String> {
        let geometry = &self.source.geometry;
        match shape {
            Shape::Extents(depth) => ExtentNode::parse(
                bytes,
                Place::Block {
                    block,
                    csum_seed: self.csum_seed,
                },
                Some(depth),
                geometry,
            )
            .map(Node::Extents),
            Shape::Pointers => {
                let pointers: Box<[u32]> =
                    (0..bytes.len() / 4).map(|i| le32(bytes, i * 4)).collect();
                for (i, &p) in pointers.iter().enumerate() {
                    if p != 0 {
                        if let Some(why) = geometry.bad_blocks(u64::from(p), 1) {
                            return Err(format!(
                                "indirect block {block}: pointer {i} ({p}) points at {why}"
                            ));
                        }
                    }
                }
                Ok(Node::Pointers(pointers))
            }
        }
    }

    /// Reads and parses `blocks`, adjacent ones in one request each, the
    /// requests together; caches the good ones.  Each block's outcome is
    /// returned (a failure matters only to a caller that needs that block).
    fn read_nodes(&self, blocks: &[u64], shape: Shape) -> Vec<(u64, Result<Arc<Node>>)> {
        let bs = self.source.geometry.block_size;
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let max_run = (MAX_BATCH_BYTES / bs).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in &sorted {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == b && *len < max_run => *len += 1,
                _ => runs.push((b, 1)),
            }
        }
        let mut buffers: Vec<Vec<u8>> = runs
            .iter()
            .map(|&(_, len)| vec![0u8; (len * bs) as usize])
            .collect();
        let mut requests: Vec<(u64, &mut [u8])> = runs
            .iter()
            .zip(buffers.iter_mut())
            .map(|(&(start, _), buf)| (start * bs, buf.as_mut_slice()))
            .collect();
        let outcomes = self.source.device.read_many(&mut requests);
        drop(requests);
        let mut out = Vec::with_capacity(sorted.len());
        for ((&(start, len), buf), outcome) in runs.iter().zip(&buffers).zip(outcomes) {
            for i in 0..len {
                let block = start + i;
                let result = match outcome {
                    Err(errno) => Err(Error::other(
                        errno,
                        format!("{}: reading map block {block} failed", self.name),
                    )),
                    Ok(()) => {
                        let bytes = &buf[(i * bs) as usize..((i + 1) * bs) as usize];
                        match self.parse(bytes, block, shape) {
                            Ok(node) => {
                                let node = Arc::new(node);
                                self.source.cache.insert(self.key(block), node.clone());
                                Ok(node)
                            }
                            Err(why) => Err(self.damaged(why)),
                        }
                    }
                };
                out.push((block, result));
            }
        }
        out
    }
}

/// The root of a file's map, held in the inode.
#[derive(Clone, Debug)]
enum Root {
    Extents(ExtentNode),
    Pointers([u32; 15]),
    Inline,
}

pub struct LazyMap {
    id: u64,
    epoch: u64,
    ino: Ino,
    /// How messages name the file.
    name: Arc<str>,
    inode_offset: u64,
    source: MapSource,
    root: Root,
    /// The inode's checksum seed (with `metadata_csum`).
    csum_seed: Option<u32>,
    /// The root must be read again before the map is used.
    stale: bool,
}

static NEXT_MAP_ID: AtomicU64 = AtomicU64::new(1);

impl LazyMap {
    /// The map of inode `ino` (named `name` in messages), from the inode
    /// as libext2fs holds it: no map block is read yet.  Fails, naming the
    /// file, if the inode's flags or root are damaged.
    pub fn open(fs: &mut Filesystem, source: MapSource, ino: Ino, name: &str) -> Result<LazyMap> {
        let inode_offset = source.geometry.inode_offset(fs, ino)?;
        let raw = fs.read_inode_raw(ino)?;
        let i_block = i_block_bytes(&raw.i_block);
        let mut map = LazyMap {
            id: NEXT_MAP_ID.fetch_add(1, Ordering::Relaxed),
            epoch: 0,
            ino,
            name: Arc::from(name),
            inode_offset,
            source,
            root: Root::Inline,
            csum_seed: None,
            stale: false,
        };
        let inode = RawInode::from_fields(
            raw.i_flags,
            &i_block,
            raw.i_generation,
            ino,
            &map.source.geometry,
        )
        .map_err(|why| map.damaged(why))?;
        map.root = map.parse_root(&inode)?;
        map.csum_seed = inode.csum_seed;
        Ok(map)
    }

    fn damaged(&self, why: impl std::fmt::Display) -> Error {
        Error::other(
            Errno::EIO,
            format!("{}: {why}: the image is damaged", self.name),
        )
    }

    fn parse_root(&self, inode: &RawInode) -> Result<Root> {
        let geometry = &self.source.geometry;
        match inode.kind {
            MapKind::Inline => Ok(Root::Inline),
            MapKind::Extents => {
                let node = ExtentNode::parse(&inode.i_block, Place::Root, None, geometry)
                    .map_err(|why| self.damaged(why))?;
                Ok(Root::Extents(node))
            }
            MapKind::Pointers => {
                let pointers = inode.pointers();
                for (i, &p) in pointers.iter().enumerate() {
                    if p != 0 {
                        if let Some(why) = geometry.bad_blocks(u64::from(p), 1) {
                            return Err(self.damaged(format!(
                                "block pointer {i} of inode {} ({p}) points at {why}",
                                self.ino
                            )));
                        }
                    }
                }
                Ok(Root::Pointers(pointers))
            }
        }
    }

    pub fn kind(&self) -> MapKind {
        match self.root {
            Root::Extents(_) => MapKind::Extents,
            Root::Pointers(_) => MapKind::Pointers,
            Root::Inline => MapKind::Inline,
        }
    }

    pub fn block_size(&self) -> u64 {
        self.source.geometry.block_size
    }

    /// The root must be read again ([`LazyMap::reload`]) before use.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// After the file's map changed: forgets every map block read so far
    /// and re-reads the root from the inode, through the device.  On
    /// failure the map stays stale and every lookup fails until a reload
    /// succeeds.
    pub fn reload(&mut self) -> Result<()> {
        self.epoch += 1;
        self.stale = true;
        let mut raw = vec![0u8; self.source.geometry.inode_size() as usize];
        self.source
            .device
            .read_at(&mut raw, self.inode_offset)
            .map_err(|errno| {
                Error::other(
                    errno,
                    format!("{}: reading inode {} failed", self.name, self.ino),
                )
            })?;
        let inode = RawInode::parse(&raw, self.ino, &self.source.geometry)
            .map_err(|why| self.damaged(why))?;
        self.root = self.parse_root(&inode)?;
        self.csum_seed = inode.csum_seed;
        self.stale = false;
        Ok(())
    }

    /// [`LazyMap::reload`] after a change that wrote only the map blocks
    /// `rewritten` (and perhaps the inode): the nodes of every other block
    /// read so far are kept.
    pub fn reload_except(&mut self, rewritten: &[u64]) -> Result<()> {
        let before = self.epoch;
        self.reload()?;
        let rewritten: std::collections::HashSet<u64> = rewritten.iter().copied().collect();
        self.source
            .cache
            .carry_over(self.id, before, self.epoch, |block| {
                !rewritten.contains(&block)
            });
        Ok(())
    }

    fn check_fresh(&self) -> Result<()> {
        if self.stale {
            return Err(Error::other(
                Errno::EIO,
                format!("{}: the block map could not be read again", self.name),
            ));
        }
        Ok(())
    }

    /// Appends the extents that map any of file blocks `blocks`, in order
    /// (whole, not clipped to the range).
    pub fn extents(&self, blocks: Range<u64>, out: &mut Vec<Extent>) -> Result<()> {
        self.check_fresh()?;
        if blocks.is_empty() {
            return Ok(());
        }
        match &self.root {
            Root::Inline => Ok(()),
            Root::Extents(node) => self.collect_extents(node, 0..1 << 32, &blocks, out),
            Root::Pointers(pointers) => self.collect_pointers(pointers, &blocks, out),
        }
    }

    /// Splits `[offset, offset + len)` of the file into pieces of like
    /// content (see [`FileMap::pieces`]), into `out`.
    pub fn pieces(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        out.clear();
        self.check_fresh()?;
        let bs = self.block_size();
        match &self.root {
            // The common small file: the whole map is in the inode.
            Root::Extents(ExtentNode::Leaf(extents)) => pieces_in(bs, extents, offset, len, out),
            _ => {
                let mut extents = Vec::new();
                let end = offset.saturating_add(len).div_ceil(bs);
                self.extents(offset / bs..end, &mut extents)?;
                pieces_in(bs, &extents, offset, len, out);
            }
        }
        Ok(())
    }

    /// The map of file blocks `blocks` alone, as a [`FileMap`] (for code
    /// that changes the map there; outside the range it reads as holes).
    pub fn window(&self, blocks: Range<u64>) -> Result<FileMap> {
        let mut extents = Vec::new();
        self.extents(blocks.clone(), &mut extents)?;
        let clipped = extents
            .iter()
            .filter_map(|e| e.clipped_to(&blocks))
            .collect();
        FileMap::new(self.block_size() as u32, clipped).map_err(|why| self.damaged(why))
    }

    fn reader(&self) -> Reader {
        Reader {
            source: self.source.clone(),
            name: self.name.clone(),
            map: self.id,
            epoch: self.epoch,
            csum_seed: self.csum_seed,
        }
    }

    /// The nodes at `blocks` (children of one parent, in file order),
    /// reading those neither cached nor being read (adjacent ones in one
    /// request each) and waiting for those being read.  When the reader
    /// walks the file in order (the sibling `before` the first one is
    /// cached, or it needs several), the siblings `ahead` are read ahead,
    /// in the background when the host can.
    fn load_children(
        &self,
        blocks: &[u64],
        ahead: &[u64],
        shape: Shape,
        before: Option<u64>,
    ) -> Result<Vec<Arc<Node>>> {
        let cache = &self.source.cache;
        let key = |block| NodeKey {
            map: self.id,
            epoch: self.epoch,
            block,
        };
        let mut found: Vec<Option<Arc<Node>>> =
            blocks.iter().map(|&b| cache.get(&key(b))).collect();
        let in_order = blocks.len() > 1
            || before.is_some_and(|b| cache.contains(&key(b)))
            || ahead.first().is_some_and(|&b| cache.known(&key(b)));
        let mut mine: Vec<u64> = Vec::new();
        let mut theirs: Vec<u64> = Vec::new();
        for (slot, &b) in found.iter().zip(blocks) {
            if slot.is_none() {
                if cache.claim(key(b)) {
                    mine.push(b);
                } else {
                    theirs.push(b);
                }
            }
        }
        let mut read_ahead: Vec<u64> = Vec::new();
        if in_order {
            let window = &ahead[..ahead.len().min(READ_AHEAD_NODES)];
            // Read ahead on a miss, or once the reader has used up half
            // the window: when the sibling half a window ahead is not
            // known.  (One look, not one per sibling: a random reader of a
            // cached map asks this at every lookup.)
            let due = if mine.is_empty() {
                window
                    .get(window.len() / 2)
                    .is_some_and(|&b| !cache.known(&key(b)))
            } else {
                !window.is_empty()
            };
            if due {
                read_ahead = window
                    .iter()
                    .copied()
                    .filter(|&b| cache.claim(key(b)))
                    .collect();
            }
        }
        if mine.is_empty() && read_ahead.is_empty() && theirs.is_empty() {
            return Ok(found.into_iter().flatten().collect());
        }
        let reader = self.reader();
        match (&self.source.background, read_ahead.is_empty()) {
            (Some(spawn), false) => {
                let behind = reader.clone();
                let blocks = std::mem::take(&mut read_ahead);
                spawn(Box::new(move || {
                    behind.read_nodes(&blocks, shape);
                    for b in blocks {
                        behind.source.cache.release(&behind.key(b));
                    }
                }));
            }
            _ => mine.append(&mut read_ahead),
        }
        let mut loaded = if mine.is_empty() {
            Vec::new()
        } else {
            let loaded = reader.read_nodes(&mine, shape);
            for &b in &mine {
                cache.release(&reader.key(b));
            }
            loaded
        };
        // Blocks another request is reading: wait, then take them from the
        // cache, or read them here if that failed (or they were evicted).
        for &b in &theirs {
            cache.wait_for(&reader.key(b));
        }
        for (slot, &block) in found.iter_mut().zip(blocks) {
            if slot.is_some() {
                continue;
            }
            if let Some(node) = cache.get(&reader.key(block)) {
                *slot = Some(node);
                continue;
            }
            let at = match loaded.iter().position(|(b, _)| *b == block) {
                Some(at) => at,
                None => {
                    loaded.extend(reader.read_nodes(&[block], shape));
                    loaded.len() - 1
                }
            };
            match &loaded[at].1 {
                Ok(node) => *slot = Some(node.clone()),
                Err(_) => {
                    let (_, failed) = loaded.swap_remove(at);
                    return failed.map(|_| Vec::new());
                }
            }
        }
        Ok(found.into_iter().flatten().collect())
    }

    fn collect_extents(
        &self,
        node: &ExtentNode,
        bounds: Range<u64>,
        want: &Range<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        match node {
            ExtentNode::Leaf(extents) => {
                let from = extents.partition_point(|e| e.end() <= want.start);
                out.extend(
                    extents[from..]
                        .iter()
                        .take_while(|e| e.logical < want.end)
                        .copied(),
                );
                Ok(())
            }
            ExtentNode::Index { depth, entries } => {
                let first = entries
                    .partition_point(|e| e.logical <= want.start)
                    .saturating_sub(1);
                let last = entries.partition_point(|e| e.logical < want.end);
                if first >= last {
                    return Ok(());
                }
                let blocks: Vec<u64> = entries[first..last].iter().map(|e| e.child).collect();
                let ahead: Vec<u64> = entries[last..]
                    .iter()
                    .take(READ_AHEAD_NODES)
                    .map(|e| e.child)
                    .collect();
                let before = first.checked_sub(1).map(|i| entries[i].child);
                let child_depth = depth - 1;
                let children =
                    self.load_children(&blocks, &ahead, Shape::Extents(child_depth), before)?;
                for (i, child) in (first..last).zip(children) {
                    let start = entries[i].logical;
                    let end = entries.get(i + 1).map_or(bounds.end, |e| e.logical);
                    let Node::Extents(child_node) = &*child else {
                        return Err(self.damaged(format!(
                            "extent block {} is also an indirect block",
                            entries[i].child
                        )));
                    };
                    let child_is_at = match child_node {
                        ExtentNode::Leaf(_) => 0,
                        ExtentNode::Index { depth, .. } => *depth,
                    };
                    if child_is_at != child_depth {
                        return Err(self.damaged(format!(
                            "extent block {} is reached at two depths",
                            entries[i].child
                        )));
                    }
                    child_node.check_within(start, end).map_err(|why| {
                        self.damaged(format!("extent block {}: {why}", entries[i].child))
                    })?;
                    self.collect_extents(child_node, start..end, want, out)?;
                }
                Ok(())
            }
        }
    }

    fn collect_pointers(
        &self,
        root: &[u32; 15],
        want: &Range<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        for b in want.start..want.end.min(12) {
            push_block(out, b, root[b as usize]);
        }
        let per_block = self.block_size() / 4;
        let mut base = 12u64;
        let mut span = per_block;
        for level in 1..=3u32 {
            let end = base.saturating_add(span);
            if want.start < end && base < want.end && root[11 + level as usize] != 0 {
                let top = u64::from(root[11 + level as usize]);
                let node = self.load_children(&[top], &[], Shape::Pointers, None)?;
                self.walk_pointers(&node[0], level, base, want, out)?;
            }
            base = end;
            span = span.saturating_mul(per_block);
        }
        Ok(())
    }

    /// Walks an indirect block at `level` (1: it points at data) whose
    /// first pointer maps file block `base`.
    fn walk_pointers(
        &self,
        node: &Node,
        level: u32,
        base: u64,
        want: &Range<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let Node::Pointers(pointers) = node else {
            return Err(self.damaged("an indirect block is also an extent block"));
        };
        let per_block = pointers.len() as u64;
        let child_span = per_block.pow(level - 1);
        let from = want.start.saturating_sub(base) / child_span;
        let to = (want.end.min(base + per_block * child_span) - base).div_ceil(child_span);
        let (from, to) = (from as usize, to as usize);
        if level == 1 {
            for (i, &p) in pointers[from..to].iter().enumerate() {
                push_block(out, base + (from + i) as u64, p);
            }
            return Ok(());
        }
        let used: Vec<(usize, u64)> = (from..to)
            .filter(|&i| pointers[i] != 0)
            .map(|i| (i, u64::from(pointers[i])))
            .collect();
        if used.is_empty() {
            return Ok(());
        }
        let blocks: Vec<u64> = used.iter().map(|&(_, b)| b).collect();
        let ahead: Vec<u64> = pointers[to..]
            .iter()
            .filter(|&&p| p != 0)
            .take(READ_AHEAD_NODES)
            .map(|&p| u64::from(p))
            .collect();
        let before = pointers[..from]
            .iter()
            .rev()
            .find(|&&p| p != 0)
            .map(|&p| u64::from(p));
        let children = self.load_children(&blocks, &ahead, Shape::Pointers, before)?;
        for (&(i, _), child) in used.iter().zip(children) {
            self.walk_pointers(&child, level - 1, base + i as u64 * child_span, want, out)?;
        }
        Ok(())
    }
}

/// Appends data block `physical` at file block `logical` (0 is a hole),
/// merging it into the run before it.
fn push_block(out: &mut Vec<Extent>, logical: u64, physical: u32) {
    if physical == 0 {
        return;
    }
    let physical = u64::from(physical);
    match out.last_mut() {
        Some(last) if last.end() == logical && last.physical + last.len == physical => {
            last.len += 1
        }
        _ => out.push(Extent {
            logical,
            physical,
            len: 1,
            unwritten: false,
        }),
    }
}

#[cfg(test)]
mod tests;
