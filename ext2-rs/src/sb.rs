//! The primary superblock as bytes in the image: the two flags a writer
//! flips directly, outside any transaction, the way the kernel does at
//! mount and unmount (`needs_recovery` with a journal, `EXT2_VALID_FS`
//! without), with its checksum kept right.

use crate::crc::crc32c;
use crate::format::{le16, le32, put_le16, put_le32};
use crate::sys;

/// Where the primary superblock lies in the image, and its size.
pub const OFFSET: u64 = 1024;
pub const BYTES: usize = 1024;
// Field offsets (little-endian).
pub(crate) const S_LOG_BLOCK_SIZE: usize = 0x18;
pub(crate) const S_MAGIC: usize = 0x38;
pub(crate) const S_STATE: usize = 0x3a;
pub(crate) const S_FEATURE_COMPAT: usize = 0x5c;
pub(crate) const S_FEATURE_INCOMPAT: usize = 0x60;
pub(crate) const S_FEATURE_RO_COMPAT: usize = 0x64;
pub(crate) const S_CHECKSUM: usize = 0x3fc;

/// Whether `sb` (the superblock's 1024 bytes) carries the ext2 magic.
pub fn is_superblock(sb: &[u8]) -> bool {
    sb.len() >= BYTES && u32::from(le16(sb, S_MAGIC)) == sys::EXT2_SUPER_MAGIC
}

/// Recomputes the checksum, with `metadata_csum` (`ext2fs_superblock_csum`:
/// CRC32C from `!0` over the bytes before `s_checksum`).
fn seal(sb: &mut [u8]) {
    if le32(sb, S_FEATURE_RO_COMPAT) & sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM != 0 {
        let sum = crc32c(!0, &sb[..S_CHECKSUM]);
        put_le32(sb, S_CHECKSUM, sum);
    }
}

/// The block size `sb` gives, or `None` if it is not one the kernel
/// mounts (`s_log_block_size` above 6, 64 KiB).
pub fn block_size(sb: &[u8]) -> Option<u64> {
    let log = le32(sb, S_LOG_BLOCK_SIZE);
    (log <= 6).then(|| 1024 << log)
}

pub fn needs_recovery(sb: &[u8]) -> bool {
    le32(sb, S_FEATURE_INCOMPAT) & sys::EXT3_FEATURE_INCOMPAT_RECOVER != 0
}

/// Sets or clears `needs_recovery`; returns whether anything changed.
pub fn set_needs_recovery(sb: &mut [u8], on: bool) -> bool {
    if !is_superblock(sb) || needs_recovery(sb) == on {
        return false;
    }
    let incompat = le32(sb, S_FEATURE_INCOMPAT) ^ sys::EXT3_FEATURE_INCOMPAT_RECOVER;
    put_le32(sb, S_FEATURE_INCOMPAT, incompat);
    seal(sb);
    true
}

/// `EXT2_VALID_FS`: the filesystem was cleanly unmounted.
pub fn valid(sb: &[u8]) -> bool {
    u32::from(le16(sb, S_STATE)) & sys::EXT2_VALID_FS != 0
}

/// Sets or clears `EXT2_VALID_FS`; returns whether anything changed.
pub fn set_valid(sb: &mut [u8], on: bool) -> bool {
    if !is_superblock(sb) || valid(sb) == on {
        return false;
    }
    let state = le16(sb, S_STATE) ^ sys::EXT2_VALID_FS as u16;
    put_le16(sb, S_STATE, state);
    seal(sb);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(ro_compat: u32) -> Vec<u8> {
        let mut sb = vec![0x11u8; BYTES];
        put_le16(&mut sb, S_MAGIC, sys::EXT2_SUPER_MAGIC as u16);
        put_le16(&mut sb, S_STATE, 1);
        put_le32(&mut sb, S_FEATURE_INCOMPAT, 0x2c2);
        put_le32(&mut sb, S_FEATURE_RO_COMPAT, ro_compat);
        seal(&mut sb);
        sb
    }

    #[test]
    fn flags_flip_and_the_checksum_follows() {
        let csum = sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM;
        for ro_compat in [0, csum] {
            let mut sb = superblock(ro_compat);
            let before = sb.clone();
            assert!(set_needs_recovery(&mut sb, true));
            assert!(needs_recovery(&sb));
            assert!(!set_needs_recovery(&mut sb, true), "already set");
            assert!(set_valid(&mut sb, false));
            assert!(!valid(&sb));
            let stored = le32(&sb, S_CHECKSUM);
            if ro_compat != 0 {
                assert_eq!(stored, crc32c(!0, &sb[..S_CHECKSUM]));
            } else {
                assert_eq!(stored, le32(&before, S_CHECKSUM), "no checksum to keep");
            }
            assert!(set_needs_recovery(&mut sb, false) && set_valid(&mut sb, true));
            assert_eq!(sb, before, "back where it started");
        }
        let mut junk = vec![0u8; BYTES];
        assert!(!set_valid(&mut junk, false));
        assert!(junk.iter().all(|&b| b == 0));
    }
}
