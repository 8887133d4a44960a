//! The ext2/ext4 on-disk format: constants this crate needs that the
//! libext2fs headers do not give, and the byte readers and writers every
//! parser of raw blocks uses.

/// The little-endian u16 at `at`.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian u32 at `at`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
