//! What the map reader must know about the filesystem to check the blocks
//! it reads on its own, without libext2fs: block size and count, the blocks
//! the filesystem keeps for itself, and how metadata checksums are seeded.

use crate::error::{Errno, Error, Result};
use crate::fs::{Filesystem, Ino};
use crate::reserved::Reserved;
use crate::sys;

/// Filesystem facts taken once, under the library lock, when it is opened.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub block_size: u64,
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub reserved: Reserved,
    /// The filesystem's checksum seed when it has `metadata_csum`.
    pub csum_seed: Option<u32>,
    pub inline_data: bool,
    inode_size: u64,
    inodes_per_group: u64,
}

impl Geometry {
    pub fn new(fs: &Filesystem) -> Geometry {
        let sb = fs.super_block();
        Geometry {
            block_size: u64::from(fs.block_size()),
            blocks_count: fs.blocks_count(),
            first_data_block: u64::from(sb.s_first_data_block),
            reserved: fs.reserved().clone(),
            csum_seed: fs.metadata_csum_seed(),
            inline_data: sb.s_feature_incompat & sys::EXT4_FEATURE_INCOMPAT_INLINE_DATA != 0,
            inode_size: u64::from(sb.s_inode_size).max(128),
            inodes_per_group: u64::from(sb.s_inodes_per_group),
        }
    }

    /// Why `[start, start + len)` cannot hold a file's blocks, if it cannot:
    /// outside the filesystem, or on its own metadata (the kernel's
    /// `ext4_inode_block_valid`).
    pub fn bad_blocks(&self, start: u64, len: u64) -> Option<String> {
        let end = start.checked_add(len);
        if start < self.first_data_block || end.map_or(true, |end| end > self.blocks_count) {
            return Some(format!(
                "blocks {start}..{} lie outside the filesystem ({} blocks)",
                start.saturating_add(len),
                self.blocks_count
            ));
        }
        self.reserved
            .first_in(start, len)
            .map(|block| format!("block {block} holds the filesystem's own metadata"))
    }

    pub fn inode_size(&self) -> u64 {
        self.inode_size
    }

    /// The byte offset of inode `ino` in the image (asks libext2fs where its
    /// group's inode table lies).
    pub fn inode_offset(&self, fs: &mut Filesystem, ino: Ino) -> Result<u64> {
        let index = u64::from(ino)
            .checked_sub(1)
            .ok_or_else(|| Error::other(Errno::EINVAL, "inode 0"))?;
        let group = index / self.inodes_per_group.max(1);
        let group = u32::try_from(group).map_err(|_| damaged_inode(ino))?;
        // SAFETY: open filesystem with its group descriptors loaded; the
        // group number came from a valid inode number.
        let table = unsafe { sys::ext2fs_inode_table_loc(fs.raw(), group) };
        let within = index % self.inodes_per_group.max(1);
        table
            .checked_mul(self.block_size)
            .and_then(|at| at.checked_add(within * self.inode_size))
            .ok_or_else(|| damaged_inode(ino))
    }
}

fn damaged_inode(ino: Ino) -> Error {
    Error::other(
        Errno::EIO,
        format!("inode {ino} lies outside the filesystem: the image is damaged"),
    )
}
