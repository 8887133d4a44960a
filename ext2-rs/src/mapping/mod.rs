//! Reading and changing where a file's blocks live.
//!
//! Reading builds the extent list the data path works from.  Changing is
//! done in the order that keeps a crash from exposing stale image contents:
//! new blocks are allocated and filled by the caller BEFORE they are linked
//! into the file, and unwritten extents are marked written only after their
//! data is in place.

use std::ffi::{c_int, c_void};
use std::ptr;

use crate::error::{check, Errno, Error, Ext2Code, Result};
use crate::extent_map::Extent;
use crate::ffi::{self, Walk};
use crate::format::EXT_INIT_MAX_LEN;
use crate::fs::{Filesystem, Ino, Layout};
use crate::sys;
use crate::undo;

mod leaves;

/// Runs of image blocks: (first block, count).
pub type BlockRuns = Vec<(u64, u64)>;

/// An open extent handle, freed on drop.
struct ExtentHandle(sys::ext2_extent_handle_t);

impl ExtentHandle {
    fn open(fs: &mut Filesystem, ino: Ino) -> Result<ExtentHandle> {
        let mut handle: sys::ext2_extent_handle_t = ptr::null_mut();
        // SAFETY: open filesystem; the library reads the inode itself.
        let code = unsafe { sys::ext2fs_extent_open2(fs.raw(), ino, ptr::null_mut(), &mut handle) };
        check(code, || "extent_open".into())?;
        Ok(ExtentHandle(handle))
    }

    /// Moves the handle and returns the extent it lands on.
    fn get(&mut self, op: u32) -> std::result::Result<sys::ext2fs_extent, sys::errcode_t> {
        let mut e = sys::ext2fs_extent::default();
        // SAFETY: open handle, valid out-pointer.
        match unsafe { sys::ext2fs_extent_get(self.0, op as c_int, &mut e) } {
            0 => Ok(e),
            code => Err(code),
        }
    }

    /// Moves to the leaf extent holding `block`; `false` when the block is in
    /// a hole (the handle then rests on a neighbouring extent, if any).
    fn goto(&mut self, block: u64) -> Result<bool> {
        // SAFETY: open handle.
        match unsafe { sys::ext2fs_extent_goto(self.0, block) } {
            0 => Ok(true),
            code if code == sys::EXT2_ET_EXTENT_NOT_FOUND as sys::errcode_t => Ok(false),
            code => Err(Error::ext2("extent_goto", code)),
        }
    }

    fn replace(&mut self, e: &sys::ext2fs_extent) -> Result<()> {
        let mut e = *e;
        // SAFETY: open handle positioned on a leaf extent.
        let code = unsafe { sys::ext2fs_extent_replace(self.0, 0, &mut e) };
        check(code, || "extent_replace".into())
    }

    fn insert(&mut self, after: bool, e: &sys::ext2fs_extent) -> Result<()> {
        let mut e = *e;
        let flags = if after {
            sys::EXT2_EXTENT_INSERT_AFTER as c_int
        } else {
            0
        };
        // SAFETY: open handle; the library splits nodes as needed.
        let code = unsafe { sys::ext2fs_extent_insert(self.0, flags, &mut e) };
        check(code, || "extent_insert".into())
    }

    fn fix_parents(&mut self) -> Result<()> {
        // SAFETY: open handle.
        let code = unsafe { sys::ext2fs_extent_fix_parents(self.0) };
        check(code, || "extent_fix_parents".into())
    }

    /// Updates the index entries above the current extent if it is the
    /// first of a node below the root, whose start its parent must repeat.
    /// (`ext2fs_extent_fix_parents` walks the tree from the root again
    /// afterwards even when there is nothing to fix: a cost on every
    /// insert otherwise.)
    fn fix_parents_if_first(&mut self) -> Result<()> {
        let mut info = sys::ext2_extent_info::default();
        // SAFETY: open handle, valid out-pointer.
        let code = unsafe { sys::ext2fs_extent_get_info(self.0, &mut info) };
        check(code, || "extent_get_info".into())?;
        // Entry 0 is the node's header: the first extent is entry 1.
        if info.curr_level > 0 && info.curr_entry <= 1 {
            self.fix_parents()?;
        }
        Ok(())
    }

    /// Records written extent `new` where the handle rests (after a
    /// `goto` to its start that found a hole, or after the extent just
    /// before it): extends the current extent when they are contiguous,
    /// inserts otherwise.
    fn add_written(&mut self, new: &sys::ext2fs_extent) -> Result<()> {
        let (logical, physical, len) = (new.e_lblk, new.e_pblk, u64::from(new.e_len));
        match self.get(sys::EXT2_EXTENT_CURRENT) {
            // An empty tree: the first extent goes into the root.
            Err(_) => self.insert(false, new)?,
            Ok(cur) => {
                let cur_end = cur.e_lblk + u64::from(cur.e_len);
                let contiguous = cur_end == logical
                    && cur.e_pblk + u64::from(cur.e_len) == physical
                    && cur.e_flags & sys::EXT2_EXTENT_FLAGS_UNINIT == 0
                    && u64::from(cur.e_len) + len <= EXT_INIT_MAX_LEN;
                if contiguous {
                    // The start stays: no parent to fix.
                    return self.replace(&raw_extent(
                        cur.e_lblk,
                        cur.e_pblk,
                        u64::from(cur.e_len) + len,
                        false,
                    ));
                }
                self.insert(cur.e_lblk < logical, new)?;
            }
        }
        self.fix_parents_if_first()
    }
}

impl Drop for ExtentHandle {
    fn drop(&mut self) {
        // SAFETY: opened by ExtentHandle::open, freed once.
        unsafe { sys::ext2fs_extent_free(self.0) }
    }
}

fn raw_extent(logical: u64, physical: u64, len: u64, unwritten: bool) -> sys::ext2fs_extent {
    sys::ext2fs_extent {
        e_pblk: physical,
        e_lblk: logical as sys::blk64_t,
        e_len: len as u32,
        e_flags: if unwritten {
            sys::EXT2_EXTENT_FLAGS_UNINIT
        } else {
            0
        },
    }
}

/// Reads the whole block map of a file with extents or block pointers.
pub fn read_map(fs: &mut Filesystem, ino: Ino, layout: Layout) -> Result<Vec<Extent>> {
    let extents = match layout {
        Layout::Extents => read_extent_tree(fs, ino)?,
        Layout::Indirect => read_block_pointers(fs, ino)?,
        Layout::Inline => Vec::new(),
    };
    let limit = fs.blocks_count();
    if let Some(bad) = extents.iter().find(|e| {
        e.physical
            .checked_add(e.len)
            .map_or(true, |end| end > limit)
    }) {
        return Err(Error::other(
            Errno::EIO,
            format!(
                "file block {} maps to image block {} beyond the end of the filesystem ({limit} blocks): the image is damaged",
                bad.logical, bad.physical
            ),
        ));
    }
    if let Some((bad, block)) = extents
        .iter()
        .find_map(|e| fs.first_reserved_in(e.physical, e.len).map(|b| (e, b)))
    {
        return Err(Error::other(
            Errno::EIO,
            format!(
                "file block {} maps to image block {block}, which holds the filesystem's own metadata: the image is damaged",
                bad.logical + (block - bad.physical)
            ),
        ));
    }
    Ok(extents)
}

/// The error for a block bitmap that offers the filesystem's own blocks.
fn bitmap_offers_metadata(block: u64) -> Error {
    Error::other(
        Errno::EIO,
        format!(
            "the block bitmap offers block {block}, which holds the filesystem's own metadata: the image is damaged (run e2fsck)"
        ),
    )
}

fn read_extent_tree(fs: &mut Filesystem, ino: Ino) -> Result<Vec<Extent>> {
    let limit = fs.blocks_count();
    let mut handle = ExtentHandle::open(fs, ino)?;
    let mut out = Vec::new();
    let mut op = sys::EXT2_EXTENT_ROOT;
    loop {
        let e = match handle.get(op) {
            Ok(e) => e,
            Err(code) if code == sys::EXT2_ET_EXTENT_NO_NEXT as sys::errcode_t => break,
            // An inode with an empty extent tree has no current extent.
            Err(code)
                if op == sys::EXT2_EXTENT_ROOT
                    && code == sys::EXT2_ET_NO_CURRENT_NODE as sys::errcode_t =>
            {
                break
            }
            Err(code) => return Err(Error::ext2("extent_get", code)),
        };
        op = sys::EXT2_EXTENT_NEXT_LEAF;
        if e.e_flags & sys::EXT2_EXTENT_FLAGS_LEAF == 0 || e.e_len == 0 {
            continue;
        }
        out.push(Extent {
            logical: e.e_lblk,
            physical: e.e_pblk,
            len: u64::from(e.e_len),
            unwritten: e.e_flags & sys::EXT2_EXTENT_FLAGS_UNINIT != 0,
        });
        // A damaged tree can loop; no file has more extents than the image
        // has blocks.
        if out.len() as u64 > limit {
            return Err(Error::other(
                Errno::EIO,
                "the extent tree loops: the image is damaged",
            ));
        }
    }
    Ok(out)
}

/// State for the block iterator callback.
struct PointerWalk {
    extents: Vec<Extent>,
    /// Valid block numbers: `first..limit`.
    first: u64,
    limit: u64,
    damaged: Option<String>,
}

unsafe extern "C" fn collect_block(
    _fs: sys::ext2_filsys,
    blocknr: *mut sys::blk64_t,
    blockcnt: sys::e2_blkcnt_t,
    _ref_blk: sys::blk64_t,
    _ref_offset: c_int,
    private: *mut c_void,
) -> c_int {
    let walk = ffi::guard("block iterator", || {
        // SAFETY: `private` is the PointerWalk lent by read_block_pointers
        // for the whole iteration; blocknr points at a valid block number.
        let (Some(walk), physical) = (unsafe { ffi::lent::<PointerWalk>(private) }, unsafe {
            *blocknr
        }) else {
            return Walk::Abort;
        };
        walk.visit(blockcnt, physical)
    });
    match walk {
        Walk::Continue => 0,
        Walk::Abort => sys::BLOCK_ABORT as c_int,
    }
}

impl PointerWalk {
    /// One block of the walk: a data block (`blockcnt` >= 0) or an
    /// indirect one.
    fn visit(&mut self, blockcnt: sys::e2_blkcnt_t, physical: u64) -> Walk {
        let Ok(logical) = u64::try_from(blockcnt) else {
            // An indirect block.  libext2fs 1.47.0 notices one outside the
            // filesystem but then numbers every later block wrongly (it
            // skips the lost range without counting it), so we stop here.
            if !(self.first..self.limit).contains(&physical) {
                self.damaged = Some(format!(
                    "an indirect block pointer ({physical}) lies outside the filesystem"
                ));
                return Walk::Abort;
            }
            return Walk::Continue;
        };
        if self.extents.len() as u64 > self.limit {
            self.damaged = Some("the block map loops".into());
            return Walk::Abort;
        }
        match self.extents.last_mut() {
            Some(last)
                if last.logical + last.len == logical && last.physical + last.len == physical =>
            {
                last.len += 1
            }
            _ => self.extents.push(Extent {
                logical,
                physical,
                len: 1,
                unwritten: false,
            }),
        }
        Walk::Continue
    }
}

fn read_block_pointers(fs: &mut Filesystem, ino: Ino) -> Result<Vec<Extent>> {
    let mut walk = PointerWalk {
        extents: Vec::new(),
        first: u64::from(fs.super_block().s_first_data_block),
        limit: fs.blocks_count(),
        damaged: None,
    };
    // Indirect blocks are visited too (no BLOCK_FLAG_DATA_ONLY), to check them.
    let flags = sys::BLOCK_FLAG_READ_ONLY as c_int;
    let raw = fs.raw();
    let code = ffi::lend(&mut walk, |private| {
        // SAFETY: open filesystem; the callback only touches the walk lent
        // for this call.
        unsafe {
            sys::ext2fs_block_iterate3(
                raw,
                ino,
                flags,
                ptr::null_mut(),
                Some(collect_block),
                private,
            )
        }
    });
    if let Some(why) = walk.damaged {
        return Err(Error::other(
            Errno::EIO,
            format!("{why}: the image is damaged"),
        ));
    }
    check(code, || "block_iterate".into())?;
    Ok(walk.extents)
}

/// Allocates up to `len` free blocks near `goal`, marking them in use
/// ([`Error::NoSpace`] if there are not that many).
/// Returns the runs allocated (their total is `len`), not yet linked to any
/// file; give them back with [`free_blocks`] if linking fails.
pub fn allocate(fs: &mut Filesystem, goal: u64, len: u64) -> Result<BlockRuns> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut want = len;
    let mut goal = goal;
    while want > 0 {
        let mut start: sys::blk64_t = 0;
        let mut got: sys::blk64_t = 0;
        // SAFETY: open read-write filesystem with its bitmaps loaded.
        let code = unsafe {
            sys::ext2fs_new_range(
                fs.raw(),
                0,
                goal,
                want,
                ptr::null_mut(),
                &mut start,
                &mut got,
            )
        };
        if code != 0 {
            free_blocks(fs, &runs);
            if code == sys::EXT2_ET_BLOCK_ALLOC_FAIL as sys::errcode_t {
                return Err(Error::NoSpace(format!("allocate: {}", Ext2Code(code))));
            }
            return Err(Error::ext2("allocate", code));
        }
        let got = got.min(want);
        if let Some(block) = fs.first_reserved_in(start, got) {
            free_blocks(fs, &runs);
            return Err(bitmap_offers_metadata(block));
        }
        undo::block_stats_range(fs.handle(), start, got, 1);
        runs.push((start, got));
        want -= got;
        goal = start + got;
    }
    Ok(runs)
}

/// Returns blocks (or, with bigalloc, whole clusters) from [`allocate`] or
/// [`allocate_clustered`] that were never linked into a file.
pub fn free_blocks(fs: &mut Filesystem, runs: &[(u64, u64)]) {
    let ratio = fs.cluster_ratio();
    for &(start, len) in runs {
        if ratio == 1 {
            undo::block_stats_range(fs.handle(), start, len, -1);
        } else {
            for cluster_start in (start..start + len).step_by(ratio as usize) {
                // SAFETY: as above, one cluster at a time.
                unsafe { sys::ext2fs_block_alloc_stats2(fs.raw(), cluster_start, -1) };
            }
        }
    }
}

/// Places file blocks `blocks` (a hole) on a bigalloc filesystem, where
/// space is allocated in clusters of `fs.cluster_ratio()` blocks and a
/// block must sit at the same offset in its physical cluster as in its
/// logical one.  A logical cluster that already has a physical cluster
/// (`existing`) reuses it; others get new clusters, marked in use.
/// Returns the block runs in file order and the new clusters (as block
/// runs, for [`free_blocks`] and the inode's block count).
pub fn allocate_clustered(
    fs: &mut Filesystem,
    blocks: std::ops::Range<u64>,
    existing: impl Fn(u64) -> Option<u64>,
    goal: u64,
) -> Result<(BlockRuns, BlockRuns)> {
    let ratio = fs.cluster_ratio();
    let mut runs = BlockRuns::new();
    let mut new = BlockRuns::new();
    let mut goal = goal;
    let mut current: Option<(u64, u64)> = None; // (logical, physical) cluster
    for block in blocks {
        let logical_cluster = block / ratio;
        let physical_cluster = match current {
            Some((l, p)) if l == logical_cluster => p,
            _ => match existing(logical_cluster) {
                Some(p) => p,
                None => {
                    let mut found: sys::blk64_t = 0;
                    // SAFETY: open read-write filesystem with its bitmaps
                    // loaded; NULL means the filesystem's own bitmap.
                    let code = unsafe {
                        sys::ext2fs_new_block2(fs.raw(), goal, ptr::null_mut(), &mut found)
                    };
                    if code != 0 {
                        free_blocks(fs, &new);
                        return Err(Error::ext2("allocate", code));
                    }
                    let p = found / ratio;
                    if let Some(block) = fs.first_reserved_in(p * ratio, ratio) {
                        free_blocks(fs, &new);
                        return Err(bitmap_offers_metadata(block));
                    }
                    // SAFETY: as above; marks the whole cluster in use.
                    unsafe { sys::ext2fs_block_alloc_stats2(fs.raw(), p * ratio, 1) };
                    new.push((p * ratio, ratio));
                    goal = (p + 1) * ratio;
                    p
                }
            },
        };
        current = Some((logical_cluster, physical_cluster));
        let physical = physical_cluster * ratio + block % ratio;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == physical => *len += 1,
            _ => runs.push((physical, 1)),
        }
    }
    Ok((runs, new))
}

/// Where to look for free blocks for file block `logical`.
pub fn goal_for(fs: &mut Filesystem, ino: Ino, logical: u64) -> Result<u64> {
    let mut inode = fs.read_inode_raw(ino)?;
    // SAFETY: open filesystem, inode read just above.
    Ok(unsafe { sys::ext2fs_find_inode_goal(fs.raw(), ino, &mut inode, logical) })
}

/// Where new blocks for file block `logical` of `ino` go: `near` (a
/// neighbour the caller knows, else after the last run pending for the
/// file), else libext2fs's goal for the block.
pub fn hole_goal(fs: &mut Filesystem, ino: Ino, logical: u64, near: Option<u64>) -> Result<u64> {
    match near {
        Some(goal) => Ok(goal),
        None => goal_for(fs, ino, logical),
    }
}

/// Links already-filled blocks into a file: `runs` are (first image block,
/// count) laid out in order from file block `logical`, which must be a hole.
/// Adds `new_clusters` (blocks, without bigalloc) to the inode's count, and
/// charges the owner's quotas with what the file grew by (tree blocks too).
pub fn link_blocks(
    fs: &mut Filesystem,
    ino: Ino,
    layout: Layout,
    logical: u64,
    runs: &[(u64, u64)],
    new_clusters: u64,
) -> Result<()> {
    fs.charging(ino, |fs| {
        link_uncharged(fs, ino, layout, logical, runs, new_clusters)
    })
}

fn link_uncharged(
    fs: &mut Filesystem,
    ino: Ino,
    layout: Layout,
    logical: u64,
    runs: &[(u64, u64)],
    new_clusters: u64,
) -> Result<()> {
    match layout {
        Layout::Extents => {
            let mut at = logical;
            let laid_out = runs.iter().map(|&(physical, len)| {
                at += len;
                (at - len, physical, len)
            });
            for (logical, physical, len) in extent_sized(laid_out) {
                insert_extent(fs, ino, logical, physical, len)?;
            }
        }
        Layout::Indirect => link_block_pointers(fs, ino, logical, runs)?,
        Layout::Inline => {
            return Err(Error::other(
                Errno::ENOTSUP,
                "inline-data files have no blocks",
            ))
        }
    }
    add_to_block_count(fs, ino, new_clusters)
}

/// `(logical, physical, len)` runs cut into pieces one written extent can
/// hold.
fn extent_sized(runs: impl IntoIterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut pieces = Vec::new();
    for (logical, physical, len) in runs {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(EXT_INIT_MAX_LEN);
            pieces.push((logical + done, physical + done, n));
            done += n;
        }
    }
    pieces
}

/// Adds `count` blocks (clusters, with bigalloc) to the inode's count.
fn add_to_block_count(fs: &mut Filesystem, ino: Ino, count: u64) -> Result<()> {
    let mut inode = fs.read_inode_raw(ino)?;
    // SAFETY: open filesystem and an inode buffer we own.
    let code = unsafe { sys::ext2fs_iblk_add_blocks(fs.raw(), &mut inode, count) };
    check(code, || "iblk_add_blocks".into())?;
    fs.write_inode_raw(ino, &mut inode)
}

/// Records one new written extent in a hole of the tree, extending the
/// extent before it when they are contiguous.
fn insert_extent(
    fs: &mut Filesystem,
    ino: Ino,
    logical: u64,
    physical: u64,
    len: u64,
) -> Result<()> {
    let mut handle = ExtentHandle::open(fs, ino)?;
    if handle.goto(logical)? {
        return Err(already_mapped(logical));
    }
    handle.add_written(&raw_extent(logical, physical, len, false))
}

fn already_mapped(logical: u64) -> Error {
    Error::other(
        Errno::EIO,
        format!("file block {logical} is already mapped"),
    )
}

/// Links extents `(logical, physical, len)`, in file order, each into a
/// hole of extent file `ino`, and adds their blocks to the inode's count.
/// Each leaf they land in is read and written once ([`leaves`]), an extent
/// joining the ones it continues in the file and the image.  Not for
/// bigalloc filesystems.  The owner's quotas are charged with what the file
/// grew by (tree blocks too).
pub fn link_extents(fs: &mut Filesystem, ino: Ino, extents: &[(u64, u64, u64)]) -> Result<()> {
    fs.charging(ino, |fs| link_extents_uncharged(fs, ino, extents))
}

fn link_extents_uncharged(
    fs: &mut Filesystem,
    ino: Ino,
    extents: &[(u64, u64, u64)],
) -> Result<()> {
    // Most go straight into their leaves.  For one that needs the tree to
    // change shape (a full leaf, a new first extent, a tree still in the
    // inode), libext2fs inserts it, splitting or growing what it must, and
    // the rest are tried again: after a split they fit.
    let mut rest = extent_sized(extents.iter().copied());
    loop {
        rest = leaves::link_in_place(fs, ino, &rest)?;
        if rest.is_empty() {
            break;
        }
        let (logical, physical, len) = rest.remove(0);
        insert_extent(fs, ino, logical, physical, len)?;
    }
    add_to_block_count(fs, ino, extents.iter().map(|e| e.2).sum())
}

/// [`link_extents`] for those of `extents` that go into their leaves as
/// they are (see [`leaves`]): the tree's shape, and every node but those
/// leaves, stay as they were.  Returns the others, in file order.
pub fn link_extents_in_place(
    fs: &mut Filesystem,
    ino: Ino,
    extents: &[(u64, u64, u64)],
) -> Result<Vec<(u64, u64, u64)>> {
    fs.charging(ino, |fs| {
        let pieces = extent_sized(extents.iter().copied());
        let refused = leaves::link_in_place(fs, ino, &pieces)?;
        let blocks = |list: &[(u64, u64, u64)]| list.iter().map(|e| e.2).sum::<u64>();
        add_to_block_count(fs, ino, blocks(&pieces) - blocks(&refused))?;
        Ok(refused)
    })
}

/// Sets block pointers one by one (ext2/ext3 have nothing better); the
/// library allocates indirect blocks as it needs them.
fn link_block_pointers(
    fs: &mut Filesystem,
    ino: Ino,
    logical: u64,
    runs: &[(u64, u64)],
) -> Result<()> {
    let mut inode = fs.read_inode_raw(ino)?;
    let mut at = logical;
    for &(physical, len) in runs {
        for i in 0..len {
            let mut block: sys::blk64_t = physical + i;
            // SAFETY: open filesystem; `inode` is ours and written back by
            // bmap2 when it allocates indirect blocks.
            let code = unsafe {
                sys::ext2fs_bmap2(
                    fs.raw(),
                    ino,
                    &mut inode,
                    ptr::null_mut(),
                    (sys::BMAP_SET | sys::BMAP_ALLOC) as c_int,
                    at + i,
                    ptr::null_mut(),
                    &mut block,
                )
            };
            check(code, || "bmap".into())?;
        }
        at += len;
    }
    Ok(())
}

/// Marks the unwritten blocks in `[start, end)` written, splitting extents
/// at the range's edges.  The caller has already filled the blocks.  A split
/// may add a tree block, charged to the owner's quotas.
pub fn mark_written(fs: &mut Filesystem, ino: Ino, start: u64, end: u64) -> Result<()> {
    fs.charging(ino, |fs| mark_written_uncharged(fs, ino, start, end))
}

fn mark_written_uncharged(fs: &mut Filesystem, ino: Ino, start: u64, end: u64) -> Result<()> {
    let mut handle = ExtentHandle::open(fs, ino)?;
    let mut block = start;
    while block < end {
        if !handle.goto(block)? {
            return Err(Error::other(
                Errno::EIO,
                format!("file block {block} is not allocated"),
            ));
        }
        let cur = handle
            .get(sys::EXT2_EXTENT_CURRENT)
            .map_err(|code| Error::ext2("extent_get", code))?;
        let (c_start, c_len) = (cur.e_lblk, u64::from(cur.e_len));
        let c_end = c_start + c_len;
        let seg_end = end.min(c_end);
        if cur.e_flags & sys::EXT2_EXTENT_FLAGS_UNINIT == 0 {
            block = seg_end;
            continue;
        }
        let at = |lblk: u64| cur.e_pblk + (lblk - c_start);
        // The extent becomes up to three: [unwritten][written][unwritten].
        let mut parts = Vec::with_capacity(3);
        if c_start < block {
            parts.push(raw_extent(c_start, cur.e_pblk, block - c_start, true));
        }
        parts.push(raw_extent(block, at(block), seg_end - block, false));
        if seg_end < c_end {
            parts.push(raw_extent(seg_end, at(seg_end), c_end - seg_end, true));
        }
        handle.replace(&parts[0])?;
        for part in &parts[1..] {
            handle.insert(true, part)?;
        }
        handle.fix_parents()?;
        block = seg_end;
    }
    Ok(())
}

/// Frees the blocks of file blocks `[start, end)` of an extent file, or
/// of its first part: it stops once it has changed about `budget` metadata
/// blocks (extent edits and block groups freed into, each a node or bitmap
/// a transaction must write) and returns the file block it stopped at,
/// `end` when it is done.  Call it again from there.
///
/// Not `ext2fs_punch`: in 1.47.0 it frees far more than asked on
/// block-pointer files, overflows its count past 2^31 blocks, and ignores a
/// failed `ext2fs_extent_goto`, so a device read error in the middle makes
/// it edit the wrong node.  Here every step is checked, one extent at a
/// time.  Not on bigalloc filesystems, where a cluster may stay partly in
/// use (the caller does not offer it).
///
/// What is freed is taken off the owner's quotas.
pub fn punch(
    fs: &mut Filesystem,
    ino: Ino,
    layout: Layout,
    start: u64,
    end: u64,
    budget: u64,
) -> Result<u64> {
    fs.charging(ino, |fs| {
        punch_uncharged(fs, ino, layout, start, end, budget)
    })
}

fn punch_uncharged(
    fs: &mut Filesystem,
    ino: Ino,
    layout: Layout,
    start: u64,
    end: u64,
    budget: u64,
) -> Result<u64> {
    if layout != Layout::Extents || fs.cluster_ratio() != 1 {
        return Err(Error::other(
            Errno::ENOTSUP,
            "freeing blocks is only supported on files with extents, without bigalloc",
        ));
    }
    let mut freed = 0u64;
    let result = punch_extents(fs, ino, start, end, budget.max(1), &mut freed);
    if freed > 0 {
        // Whatever happened, the inode must count what was freed.
        let mut inode = fs.read_inode_raw(ino)?;
        // SAFETY: open filesystem and an inode buffer we own.
        let code = unsafe { sys::ext2fs_iblk_sub_blocks(fs.raw(), &mut inode, freed) };
        check(code, || "iblk_sub_blocks".into())?;
        fs.write_inode_raw(ino, &mut inode)?;
    }
    result
}

fn punch_extents(
    fs: &mut Filesystem,
    ino: Ino,
    start: u64,
    end: u64,
    budget: u64,
    freed: &mut u64,
) -> Result<u64> {
    let first_data = u64::from(fs.super_block().s_first_data_block);
    let per_group = u64::from(fs.super_block().s_blocks_per_group).max(1);
    let mut groups = std::collections::BTreeSet::new();
    let mut edits = 0u64;
    let mut block = start;
    while block < end {
        if edits + groups.len() as u64 >= budget {
            return Ok(block);
        }
        let mut handle = ExtentHandle::open(fs, ino)?;
        let found = handle.goto(block)?;
        let cur = match handle.get(sys::EXT2_EXTENT_CURRENT) {
            Ok(cur) => cur,
            // An empty tree: nothing left to free.
            Err(code) if code == sys::EXT2_ET_NO_CURRENT_NODE as sys::errcode_t => return Ok(end),
            Err(code) => return Err(Error::ext2("extent_get", code)),
        };
        let (c_start, c_len) = (cur.e_lblk, u64::from(cur.e_len));
        let c_end = c_start + c_len;
        if !found {
            // In a hole: go on from the next extent, if it starts before `end`.
            let next = if c_start > block {
                Some(c_start)
            } else {
                match handle.get(sys::EXT2_EXTENT_NEXT_LEAF) {
                    Ok(next) => Some(next.e_lblk),
                    Err(code) if code == sys::EXT2_ET_EXTENT_NO_NEXT as sys::errcode_t => None,
                    Err(code) => return Err(Error::ext2("extent_get", code)),
                }
            };
            match next {
                Some(next) if next > block && next < end => {
                    block = next;
                    continue;
                }
                _ => return Ok(end),
            }
        }
        let cut_end = end.min(c_end);
        let unwritten = cur.e_flags & sys::EXT2_EXTENT_FLAGS_UNINIT != 0;
        let at = |lblk: u64| cur.e_pblk + (lblk - c_start);
        // What stays of the extent: up to two pieces around the cut.
        let left =
            (c_start < block).then(|| raw_extent(c_start, cur.e_pblk, block - c_start, unwritten));
        let right =
            (cut_end < c_end).then(|| raw_extent(cut_end, at(cut_end), c_end - cut_end, unwritten));
        match (left, right) {
            (None, None) => {
                // SAFETY: open handle positioned on the leaf extent to drop.
                let code = unsafe { sys::ext2fs_extent_delete(handle.0, 0) };
                check(code, || "extent_delete".into())?;
                match handle.fix_parents() {
                    Err(Error::Ext2 { code, .. })
                        if code.0 == sys::EXT2_ET_NO_CURRENT_NODE as sys::errcode_t => {}
                    other => other?,
                }
            }
            (Some(piece), None) | (None, Some(piece)) => {
                handle.replace(&piece)?;
                handle.fix_parents()?;
            }
            (Some(left), Some(right)) => {
                handle.replace(&left)?;
                handle.insert(true, &right)?;
                handle.fix_parents()?;
            }
        }
        drop(handle);
        let count = cut_end - block;
        // The blocks were the file's and are no longer referenced.
        undo::block_stats_range(fs.handle(), at(block), count, -1);
        *freed += count;
        edits += 1;
        let (g1, g2) = (
            at(block).saturating_sub(first_data) / per_group,
            (at(block) + count - 1).saturating_sub(first_data) / per_group,
        );
        groups.extend(g1..=g2.min(g1 + budget));
        block = cut_end;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::device::BlockDevice;
    use crate::fs::Access;
    use crate::testing::{Faults, MemDevice};

    /// An image whose /f holds `len` bytes of a counting pattern.
    fn image_with_file(mkfs: &[&str], len: usize) -> (Arc<MemDevice>, Vec<u8>) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ext2-rs-mapping-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("f"), &data).unwrap();
        let mut args = mkfs.to_vec();
        let d = dir.to_str().unwrap().to_string();
        args.extend(["-d", &d]);
        let dev = Arc::new(MemDevice::mkfs(&args, "8M"));
        std::fs::remove_dir_all(&dir).unwrap();
        (dev, data)
    }

    /// Reads a file through its map straight from the device, as a host's
    /// data path does.
    fn read_through_map(dev: &MemDevice, fs: &mut Filesystem, path: &str) -> Result<Vec<u8>> {
        let ino = fs.lookup(path)?;
        let info = fs.inode(ino)?;
        let bs = u64::from(fs.block_size());
        let mut out = vec![0u8; info.size as usize];
        for e in read_map(fs, ino, info.layout)? {
            for b in 0..e.len {
                let at = ((e.logical + b) * bs) as usize;
                if at >= out.len() {
                    break;
                }
                let end = (at + bs as usize).min(out.len());
                dev.read_at(&mut out[at..end], (e.physical + b) * bs)
                    .map_err(Error::reported)?;
            }
        }
        Ok(out)
    }

    #[test]
    fn maps_read_in_process_give_the_files_bytes() {
        for mkfs in [
            &["-t", "ext4", "-b", "4096"][..],
            &["-t", "ext4", "-b", "1024"],
            &["-t", "ext2", "-b", "1024"],
            &["-t", "ext3", "-b", "4096"],
        ] {
            let (dev, data) = image_with_file(mkfs, 300_000);
            let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
            let read = read_through_map(&dev, &mut fs, "/f").unwrap();
            assert!(read == data, "{mkfs:?}: the bytes differ");
        }
    }

    #[test]
    fn a_failing_device_is_an_error_not_a_panic() {
        let (dev, _) = image_with_file(&["-t", "ext2", "-b", "1024"], 600_000);
        let mut fs = Filesystem::open(dev.clone(), Access::ReadOnly).unwrap();
        let ino = fs.lookup("/f").unwrap();
        let info = fs.inode(ino).unwrap();
        // Fail every read past the inode tables: the indirect blocks.
        dev.set_faults(Faults::failing_reads(100 * 1024..dev.size()));
        assert!(read_map(&mut fs, ino, info.layout).is_err());
    }

    /// A file of 1 KiB blocks with data in every fourth block from block
    /// 2 up to `blocks` (a tree two levels deep), and its device.
    fn every_fourth_block(blocks: u64) -> Arc<MemDevice> {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("ext2-rs-leaves-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(dir.join("f")).unwrap();
        for block in (2..blocks).step_by(4) {
            f.seek(SeekFrom::Start(block * 1024)).unwrap();
            f.write_all(&[block as u8 | 1; 1024]).unwrap();
        }
        drop(f);
        let d = dir.to_str().unwrap();
        let dev = Arc::new(MemDevice::mkfs(
            &["-t", "ext4", "-b", "1024", "-O", "^has_journal", "-d", d],
            "16M",
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        dev
    }

    /// Where each file block lies, from a map.
    fn block_by_block(extents: &[Extent]) -> std::collections::BTreeMap<u64, u64> {
        extents
            .iter()
            .flat_map(|e| (0..e.len).map(move |i| (e.logical + i, e.physical + i)))
            .collect()
    }

    /// Links `batch` and checks that the map then holds it.
    fn link_and_check(
        fs: &mut Filesystem,
        ino: Ino,
        want: &mut std::collections::BTreeMap<u64, u64>,
        batch: &mut [(u64, u64, u64)],
    ) -> Vec<Extent> {
        batch.sort_unstable();
        link_extents(fs, ino, batch).unwrap();
        want.extend(
            batch
                .iter()
                .map(|&(logical, physical, _)| (logical, physical)),
        );
        let map = read_map(fs, ino, Layout::Extents).unwrap();
        assert_eq!(&block_by_block(&map), want, "the map is what was linked");
        map
    }

    /// Batches of links into a tree two levels deep: most straight into
    /// their leaves, joining the extents they continue on either side;
    /// then enough to split leaves, and a new first extent (libext2fs's).
    /// e2fsck finds the filesystem clean.
    #[test]
    fn linking_batches_into_a_deep_tree_keeps_it_whole() {
        let dev = every_fourth_block(6000);
        let mut fs = Filesystem::open(dev.clone(), Access::ReadWrite).unwrap();
        let ino = fs.lookup("/f").unwrap();
        let before = read_map(&mut fs, ino, Layout::Extents).unwrap();
        assert!(
            before.len() >= 1400,
            "test premise: {} extents",
            before.len()
        );
        let mut want = block_by_block(&before);
        // Pairs of image blocks, one linked now and its neighbour later
        // (the blocks of no pair are given back).
        let runs = allocate(&mut fs, 8000, 1000).unwrap();
        let pairs: Vec<u64> = runs
            .iter()
            .flat_map(|&(start, len)| (start..start + len / 2 * 2).step_by(2))
            .take(400)
            .collect();
        assert_eq!(pairs.len(), 400, "test premise");
        let unpaired: Vec<(u64, u64)> = runs
            .iter()
            .flat_map(|&(start, len)| start..start + len)
            .filter(|b| !pairs.iter().any(|&p| *b == p || *b == p + 1))
            .map(|b| (b, 1))
            .collect();
        free_blocks(&mut fs, &unpaired);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for (k, &p) in pairs.iter().enumerate() {
            let hole = 4 * k as u64 * 3 + 3; // file blocks hole..hole + 3
            if k % 2 == 0 {
                // Continued after: the later link joins the one before it.
                first.push((hole, p, 1));
                second.push((hole + 1, p + 1, 1));
            } else {
                // Continued before: the later link joins the one after it.
                first.push((hole + 2, p + 1, 1));
                second.push((hole + 1, p, 1));
            }
        }
        let after_first = link_and_check(&mut fs, ino, &mut want, &mut first);
        let after_second = link_and_check(&mut fs, ino, &mut want, &mut second);
        assert_eq!(after_second.len(), after_first.len(), "every link joined");
        let unjoined = after_second
            .windows(2)
            .filter(|w| w[0].end() == w[1].logical && w[0].physical + w[0].len == w[1].physical)
            .count();
        assert_eq!(unjoined, 0, "neighbours in both spaces are one extent");
        // Fresh blocks into the rest of the holes: leaves overflow.
        let fresh = allocate(&mut fs, 12000, 1001).unwrap();
        let mut fresh = fresh.iter().flat_map(|&(s, n)| s..s + n);
        let mut third: Vec<(u64, u64, u64)> = (5..6000u64)
            .step_by(4)
            .filter(|b| !want.contains_key(b))
            .take(1000)
            .map(|b| (b, fresh.next().unwrap(), 1))
            .collect();
        third.push((0, fresh.next().unwrap(), 1));
        link_and_check(&mut fs, ino, &mut want, &mut third);
        // Linking over mapped blocks is refused.
        let spare = allocate(&mut fs, 9000, 1).unwrap()[0].0;
        assert!(link_extents(&mut fs, ino, &[(2, spare, 1)]).is_err());
        // As is past the 2^32 blocks a tree maps (an error, not a loop).
        let past = link_extents(&mut fs, ino, &[(1 << 32, spare, 1)]).unwrap_err();
        assert_eq!(past.errno(), Errno::EFBIG, "{past}");
        free_blocks(&mut fs, &[(spare, 1)]);
        fs.flush().unwrap();
        drop(fs);
        let image = std::env::temp_dir().join(format!("ext2-rs-leaves-{}.img", std::process::id()));
        std::fs::write(&image, dev.snapshot()).unwrap();
        let out = std::process::Command::new("e2fsck")
            .args(["-fn"])
            .arg(&image)
            .output()
            .unwrap();
        std::fs::remove_file(&image).unwrap();
        assert!(
            out.status.success(),
            "e2fsck ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
