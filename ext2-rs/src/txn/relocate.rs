//! Copy-on-write of extent-tree nodes, for filesystems without a journal.
//!
//! Without a journal, the blocks a commit writes may reach the disk in any
//! subset until the next flush.  An extent tree whose change touches two
//! existing nodes (a leaf split rewrites the leaf and its parent; a new
//! first extent changes the parent's index) is then seen half old, half
//! new: extents missing, or out of the range their index allows, which
//! `e2fsck -p` will not repair without asking.  So before such a commit,
//! every existing node the transaction changed is moved to a new block, and
//! so is every node above it, up to the root in the inode: the new nodes
//! are written (and flushed) before the inode, and the one inode write
//! switches from the whole old tree to the whole new one.  The old nodes
//! are freed only after that (see `ordered`).

use std::ptr;

use crate::error::{check, Error, Result};
use crate::format::{
    extent_entry_at, i_block_bytes, index_entry, set_i_block, set_index_child, ExtentHeader,
    EXTENT_MAGIC,
};
use crate::fs::{Filesystem, Ino};
use crate::sys;

/// The child block an index entry points at.
pub(super) fn index_leaf(node: &[u8], i: usize) -> u64 {
    index_entry(node, extent_entry_at(i)).1
}

fn set_index_leaf(node: &mut [u8], i: usize, block: u64) {
    set_index_child(node, extent_entry_at(i), block);
}

/// (entries, depth) of a node, checked.
fn header(node: &[u8], what: impl Fn() -> String) -> Result<(usize, u16)> {
    if node.len() < extent_entry_at(0) || ExtentHeader::read(node).magic != EXTENT_MAGIC {
        return Err(Error::other(
            crate::Errno::EIO,
            format!("{}: not an extent node", what()),
        ));
    }
    let header = ExtentHeader::read(node);
    let entries = usize::from(header.entries);
    if extent_entry_at(entries) > node.len() {
        return Err(Error::other(
            crate::Errno::EIO,
            format!("{}: {entries} extent entries overflow the node", what()),
        ));
    }
    Ok((entries, header.depth))
}

struct Walk<'a> {
    fs: &'a mut Filesystem,
    ino: Ino,
    /// The block was in use at the last commit: it is part of the tree on
    /// disk and must not be rewritten in place.
    existing: &'a dyn Fn(u64) -> bool,
    /// The block was written since the last commit.
    dirty: &'a dyn Fn(u64) -> bool,
    /// Old nodes moved away, to free once the new tree is on disk.
    moved: Vec<u64>,
    bs: usize,
}

impl Walk<'_> {
    fn read(&mut self, block: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.bs];
        self.fs
            .read_block(block, &mut buf)
            .map_err(|e| e.in_context(format!("reading extent node {block}")))?;
        Ok(buf)
    }

    fn write(&mut self, block: u64, node: &mut [u8]) -> Result<()> {
        let raw = self.fs.raw();
        // SAFETY: open filesystem; `node` is a whole extent block starting
        // with its header, which the checksum code reads and completes.
        let code = unsafe {
            sys::ext2fs_extent_block_csum_set(
                raw,
                self.ino,
                node.as_mut_ptr().cast::<sys::ext3_extent_header>(),
            )
        };
        check(code, || format!("checksumming extent node {block}"))?;
        self.fs
            .write_block(block, node)
            .map_err(|e| e.in_context(format!("writing extent node {block}")))
    }

    fn allocate_near(&mut self, goal: u64) -> Result<u64> {
        let mut found: sys::blk64_t = 0;
        // SAFETY: open read-write filesystem with its bitmaps loaded; NULL
        // means the filesystem's own bitmap.
        let code =
            unsafe { sys::ext2fs_new_block2(self.fs.raw(), goal, ptr::null_mut(), &mut found) };
        check(code, || "allocating a block for an extent node".into())?;
        if let Some(block) = self.fs.first_reserved_in(found, 1) {
            return Err(Error::other(
                crate::Errno::EIO,
                format!("the block bitmap offers block {block}, which holds the filesystem's own metadata: the image is damaged (run e2fsck)"),
            ));
        }
        // SAFETY: as above; marks it in use (the undo recording sees it).
        unsafe { sys::ext2fs_block_alloc_stats2(self.fs.raw(), found, 1) };
        Ok(found)
    }

    /// Visits the children of the index node `node` (at `depth` > 0),
    /// moving those that must move; returns whether `node` changed.
    fn visit(&mut self, node: &mut [u8], depth: u16, hops: &mut u32) -> Result<bool> {
        *hops += 1;
        if *hops > 1 << 20 {
            return Err(Error::other(
                crate::Errno::EIO,
                format!("inode {}: the extent tree loops", self.ino),
            ));
        }
        let ino = self.ino;
        let (entries, _) = header(node, || format!("inode {ino}"))?;
        let mut changed = false;
        for i in 0..entries {
            let child = index_leaf(node, i);
            let mut child_node = None;
            let mut child_changed = false;
            if depth > 1 {
                let mut buf = self.read(child)?;
                let (_, child_depth) = header(&buf, || format!("inode {ino} block {child}"))?;
                if child_depth + 1 != depth {
                    return Err(Error::other(
                        crate::Errno::EIO,
                        format!("inode {ino}: extent node {child} has the wrong depth"),
                    ));
                }
                child_changed = self.visit(&mut buf, depth - 1, hops)?;
                child_node = Some(buf);
            }
            let existing = (self.existing)(child);
            if existing && (child_changed || (self.dirty)(child)) {
                let mut buf = match child_node {
                    Some(buf) => buf,
                    None => self.read(child)?,
                };
                let new = self.allocate_near(child)?;
                self.write(new, &mut buf)?;
                set_index_leaf(node, i, new);
                self.moved.push(child);
                changed = true;
            } else if child_changed {
                // A node new in this transaction: nothing on disk points at
                // it yet, so it is rewritten where it is.
                let mut buf = child_node.expect("read above");
                self.write(child, &mut buf)?;
            }
        }
        Ok(changed)
    }
}

/// Moves to new blocks every node of `ino`'s extent tree that `existing`
/// says is on disk and that `dirty` says was written since, and every node
/// above those, rewriting the root in the inode.  Returns the old blocks,
/// which no longer belong to the tree but are still marked in use: the
/// caller frees them once the new tree is durable.
pub fn relocate_changed_nodes(
    fs: &mut Filesystem,
    ino: Ino,
    existing: &dyn Fn(u64) -> bool,
    dirty: &dyn Fn(u64) -> bool,
) -> Result<Vec<u64>> {
    let mut inode = fs.read_inode_raw(ino)?;
    if inode.i_flags & sys::EXT4_EXTENTS_FL == 0 {
        return Ok(Vec::new());
    }
    let mut root = i_block_bytes(&inode.i_block);
    let (_, depth) = header(&root, || format!("inode {ino}"))?;
    if depth == 0 {
        return Ok(Vec::new());
    }
    let bs = fs.block_size() as usize;
    let mut walk = Walk {
        fs,
        ino,
        existing,
        dirty,
        moved: Vec::new(),
        bs,
    };
    let mut hops = 0;
    if walk.visit(&mut root, depth, &mut hops)? {
        set_i_block(&mut inode.i_block, &root);
        walk.fs.write_inode_raw(ino, &mut inode)?;
    }
    Ok(walk.moved)
}
