//! The ext2/ext4 on-disk format where this crate reads or writes it as
//! bytes (outside libext2fs): the byte readers and writers every parser of
//! raw blocks uses, and the layout of inodes and extent-tree nodes, with
//! the constants the libext2fs headers do not give.  The superblock's
//! fields live in [`crate::sb`], the journal's in [`crate::jbd2`], the
//! quota files' in [`crate::quota::tree`], the MMP block's in
//! [`crate::mmp`].

use crate::crc::crc32c;
use crate::sys;

/// The little-endian u16 at `at`.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian u32 at `at`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The little-endian u64 at `at`.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The big-endian u16 at `at` (the journal is big-endian).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian u32 at `at`.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The big-endian u64 at `at`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Stores `v` little-endian at `at`.
pub(crate) fn put_le16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at `at`.
pub(crate) fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at `at`.
pub(crate) fn put_le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` big-endian at `at`.
pub(crate) fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Stores `v` big-endian at `at`.
pub(crate) fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Stores `v` big-endian at `at`.
pub(crate) fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// `EXT2_FEATURE_RO_COMPAT_BTREE_DIR`: defined by the kernel, never used,
/// and not in libext2fs's headers.
pub const RO_COMPAT_BTREE_DIR: u32 = 0x4;

// ---- Inodes (`struct ext2_inode_large`): the fields read from raw bytes.

pub(crate) const I_FLAGS: usize = 0x20;
pub(crate) const I_BLOCK: usize = 0x28;
/// `i_block`'s size in bytes: 15 words.
pub const I_BLOCK_LEN: usize = 60;
pub(crate) const I_GENERATION: usize = 0x64;
pub(crate) const I_CHECKSUM_LO: usize = 0x7c;
pub(crate) const GOOD_OLD_INODE_SIZE: usize = sys::EXT2_GOOD_OLD_INODE_SIZE as usize;
pub(crate) const I_EXTRA_ISIZE: usize = 0x80;
pub(crate) const I_CHECKSUM_HI: usize = 0x82;

/// The seed of an inode's metadata checksums (its extent blocks): the
/// filesystem's seed, then the inode's number and generation.
pub(crate) fn inode_csum_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc32c(
        crc32c(fs_seed, &ino.to_le_bytes()),
        &generation.to_le_bytes(),
    )
}

/// An inode's `i_block` words (as libext2fs holds them) as the bytes on
/// disk: an extent tree's root node, or the block pointers.
pub(crate) fn i_block_bytes(words: &[u32; 15]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Stores the on-disk bytes of `i_block` back into its words.
pub(crate) fn set_i_block(words: &mut [u32; 15], bytes: &[u8]) {
    for (i, word) in words.iter_mut().enumerate() {
        *word = le32(bytes, i * 4);
    }
}

// ---- Extent-tree nodes (`ext3_extents.h`): a 12-byte header, then
// 12-byte entries (index entries above the leaves, extents in them), then,
// in a node of its own block, a checksum after room for `max` entries.

pub const EXTENT_MAGIC: u16 = sys::EXT3_EXT_MAGIC as u16;
pub const EXTENT_HEADER_BYTES: usize = 12;
pub const EXTENT_ENTRY_BYTES: usize = 12;
/// The kernel's deepest tree (`EXT4_MAX_EXTENT_DEPTH`).
pub const MAX_EXTENT_DEPTH: u16 = 5;
/// The longest written extent (`EXT_INIT_MAX_LEN`); a longer stored length
/// marks an unwritten extent of that length less this.
pub const EXT_INIT_MAX_LEN: u64 = 1 << 15;

/// The header of an extent node (`struct ext3_extent_header`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentHeader {
    pub magic: u16,
    pub entries: u16,
    pub max: u16,
    pub depth: u16,
}

impl ExtentHeader {
    /// The header at the start of `node` (at least its 12 bytes).
    pub fn read(node: &[u8]) -> ExtentHeader {
        ExtentHeader {
            magic: le16(node, 0),
            entries: le16(node, 2),
            max: le16(node, 4),
            depth: le16(node, 6),
        }
    }

    /// Stores the entry count of `node`.
    pub fn set_entries(node: &mut [u8], entries: u16) {
        put_le16(node, 2, entries);
    }
}

/// Where entry `i` of a node starts.
pub fn extent_entry_at(i: usize) -> usize {
    EXTENT_HEADER_BYTES + i * EXTENT_ENTRY_BYTES
}

/// One extent of a leaf (`struct ext3_extent`), its length as the kernel
/// counts it, the unwritten flag apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawExtent {
    pub logical: u32,
    pub len: u64,
    pub physical: u64,
    pub unwritten: bool,
}

impl RawExtent {
    /// The extent stored at `at` of a leaf.
    pub fn read(node: &[u8], at: usize) -> RawExtent {
        let raw_len = u64::from(le16(node, at + 4));
        let (len, unwritten) = if raw_len > EXT_INIT_MAX_LEN {
            (raw_len - EXT_INIT_MAX_LEN, true)
        } else {
            (raw_len, false)
        };
        RawExtent {
            logical: le32(node, at),
            len,
            physical: u64::from(le16(node, at + 6)) << 32 | u64::from(le32(node, at + 8)),
            unwritten,
        }
    }

    /// Stores the extent at `at` of a leaf.
    pub fn write(&self, node: &mut [u8], at: usize) {
        let raw_len = if self.unwritten {
            self.len + EXT_INIT_MAX_LEN
        } else {
            self.len
        };
        put_le32(node, at, self.logical);
        put_le16(node, at + 4, raw_len as u16);
        put_le16(node, at + 6, (self.physical >> 32) as u16);
        put_le32(node, at + 8, self.physical as u32);
    }
}

/// The index entry (`struct ext3_extent_idx`) at `at` of an index node:
/// (first file block below it, child block).
pub fn index_entry(node: &[u8], at: usize) -> (u32, u64) {
    let child = u64::from(le32(node, at + 4)) | u64::from(le16(node, at + 8)) << 32;
    (le32(node, at), child)
}

/// Where the checksum of an extent block with room for `max` entries lies
/// (`struct ext4_extent_tail`).
pub fn extent_tail_at(max: u16) -> usize {
    extent_entry_at(usize::from(max))
}

/// Whether extent block `node` carries the right checksum for `seed` (the
/// inode's, see [`inode_csum_seed`]).
pub fn extent_csum_ok(node: &[u8], seed: u32) -> bool {
    let tail = extent_tail_at(ExtentHeader::read(node).max);
    tail + 4 <= node.len() && crc32c(seed, &node[..tail]) == le32(node, tail)
}

/// Stores the checksum of extent block `node` for `seed`.
pub fn seal_extent_block(node: &mut [u8], seed: u32) {
    let tail = extent_tail_at(ExtentHeader::read(node).max);
    let sum = crc32c(seed, &node[..tail]);
    put_le32(node, tail, sum);
}

/// Points the index entry at `at` to child block `block`.
pub fn set_index_child(node: &mut [u8], at: usize, block: u64) {
    put_le32(node, at + 4, block as u32);
    put_le16(node, at + 8, (block >> 32) as u16);
}
