//! The primary superblock as bytes in the image: the two flags a writer
//! flips directly, outside any transaction, the way the kernel does at
//! mount and unmount (`needs_recovery` with a journal, `EXT2_VALID_FS`
//! without), with its checksum kept right.

use crate::crc::crc32c;
use crate::format::{le16, le32};
use crate::sys;

/// Where the primary superblock lies in the image, and its size.
pub const OFFSET: u64 = 1024;
pub const BYTES: usize = 1024;
// Field offsets (little-endian).
const S_MAGIC: usize = 0x38;
const S_STATE: usize = 0x3a;
const S_FEATURE_INCOMPAT: usize = 0x60;
const S_FEATURE_RO_COMPAT: usize = 0x64;
const S_CHECKSUM: usize = 0x3fc;

/// Whether `sb` (the superblock's 1024 bytes) carries the ext2 magic.
pub fn is_superblock(sb: &[u8]) -> bool {
    sb.len() >= BYTES && u32::from(le16(sb, S_MAGIC)) == sys::EXT2_SUPER_MAGIC
}

/// Recomputes the checksum, with `metadata_csum` (`ext2fs_superblock_csum`:
/// CRC32C from `!0` over the bytes before `s_checksum`).
fn seal(sb: &mut [u8]) {
    if le32(sb, S_FEATURE_RO_COMPAT) & sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM != 0 {
        let sum = crc32c(!0, &sb[..S_CHECKSUM]);
        sb[S_CHECKSUM..S_CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
    }
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
    sb[S_FEATURE_INCOMPAT..S_FEATURE_INCOMPAT + 4].copy_from_slice(&incompat.to_le_bytes());
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
    sb[S_STATE..S_STATE + 2].copy_from_slice(&state.to_le_bytes());
    seal(sb);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(ro_compat: u32) -> Vec<u8> {
        let mut sb = vec![0x11u8; BYTES];
        sb[S_MAGIC..S_MAGIC + 2].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[S_STATE..S_STATE + 2].copy_from_slice(&1u16.to_le_bytes());
        sb[S_FEATURE_INCOMPAT..S_FEATURE_INCOMPAT + 4].copy_from_slice(&0x2c2u32.to_le_bytes());
        sb[S_FEATURE_RO_COMPAT..S_FEATURE_RO_COMPAT + 4].copy_from_slice(&ro_compat.to_le_bytes());
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
