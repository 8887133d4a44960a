//! The journal superblock (logical block 0 of the journal): what the log
//! looks like and where recovery starts.
//!
//! The checks are the ones `e2fsck` makes before it replays a journal
//! (`e2fsck_get_journal` and `e2fsck_journal_load` in e2fsprogs 1.47.0).
//! Where e2fsck would repair or discard the journal instead of replaying
//! it, we refuse with an error: we cannot serve what e2fsck would make of
//! the filesystem afterwards.  Big-endian throughout.

use std::ops::RangeInclusive;

use crate::crc::crc32c;
use crate::error::{Errno, Error, Result};
use crate::format::be32;
use crate::jbd2::JBD2_MAGIC;

pub const SUPERBLOCK_V1: u32 = 3;
pub const SUPERBLOCK_V2: u32 = 4;

/// A journal smaller than this is refused (by the kernel and e2fsck alike).
pub const MIN_JOURNAL_BLOCKS: u32 = 1024;
/// Fast-commit area size when the superblock leaves it at zero.
const DEFAULT_FAST_COMMIT_BLOCKS: u32 = 256;

pub const COMPAT_CHECKSUM: u32 = 0x1;

pub const INCOMPAT_REVOKE: u32 = 0x1;
pub const INCOMPAT_64BIT: u32 = 0x2;
pub const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub const INCOMPAT_CSUM_V2: u32 = 0x8;
pub const INCOMPAT_CSUM_V3: u32 = 0x10;
pub const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const KNOWN_INCOMPAT: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

/// `s_checksum_type` for CRC32C, the only one checksum v2/v3 allow.
const CHECKSUM_TYPE_CRC32C: u8 = 4;

// Field offsets in the on-disk journal superblock.
const H_MAGIC: usize = 0;
const H_BLOCKTYPE: usize = 4;
const S_BLOCKSIZE: usize = 0x0c;
const S_MAXLEN: usize = 0x10;
const S_FIRST: usize = 0x14;
pub(crate) const S_SEQUENCE: usize = 0x18;
pub(crate) const S_START: usize = 0x1c;
const S_ERRNO: usize = 0x20;
/// From here on, fields exist only in a version 2 superblock.
const S_FEATURE_COMPAT: usize = 0x24;
pub(crate) const S_FEATURE_INCOMPAT: usize = 0x28;
const S_FEATURE_RO_COMPAT: usize = 0x2c;
const S_UUID: usize = 0x30;
/// The bytes of a journal's UUID (here and after a block tag).
pub(crate) const UUID_BYTES: usize = 16;
const S_NR_USERS: usize = 0x40;
const S_CHECKSUM_TYPE: usize = 0x50;
const S_NUM_FC_BLKS: usize = 0x54;
pub(crate) const S_CHECKSUM: usize = 0xfc;
/// The size of the structure the superblock checksum covers.
const SUPERBLOCK_SIZE: usize = 0x400;

/// The journal's feature flags (all zero in a version 1 journal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
}

impl Features {
    /// The old whole-transaction CRC32 in the commit block.
    pub fn checksum_v1(&self) -> bool {
        self.compat & COMPAT_CHECKSUM != 0
    }

    pub fn csum_v2(&self) -> bool {
        self.incompat & INCOMPAT_CSUM_V2 != 0
    }

    pub fn csum_v3(&self) -> bool {
        self.incompat & INCOMPAT_CSUM_V3 != 0
    }

    /// Per-block CRC32C checksums (descriptor tails, tags, commit blocks).
    pub fn csum_v2_or_v3(&self) -> bool {
        self.csum_v2() || self.csum_v3()
    }

    pub fn is_64bit(&self) -> bool {
        self.incompat & INCOMPAT_64BIT != 0
    }

    pub fn async_commit(&self) -> bool {
        self.incompat & INCOMPAT_ASYNC_COMMIT != 0
    }

    pub fn fast_commit(&self) -> bool {
        self.incompat & INCOMPAT_FAST_COMMIT != 0
    }

    /// Bytes of one block tag in a descriptor block (not counting the UUID
    /// that follows a tag without `SAME_UUID`).
    pub fn tag_bytes(&self) -> usize {
        if self.csum_v3() {
            return 16;
        }
        let mut size = 12;
        if self.csum_v2() {
            size += 2;
        }
        if self.is_64bit() {
            size
        } else {
            size - 4
        }
    }

    /// Names of the features set, for messages.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.checksum_v1() {
            names.push("checksum");
        }
        for (bit, name) in [
            (INCOMPAT_REVOKE, "revoke"),
            (INCOMPAT_64BIT, "64bit"),
            (INCOMPAT_ASYNC_COMMIT, "async_commit"),
            (INCOMPAT_CSUM_V2, "csum_v2"),
            (INCOMPAT_CSUM_V3, "csum_v3"),
            (INCOMPAT_FAST_COMMIT, "fast_commit"),
        ] {
            if self.incompat & bit != 0 {
                names.push(name);
            }
        }
        names
    }
}

/// A validated journal superblock, with the geometry recovery works from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// 1 or 2.
    pub version: u32,
    pub block_size: usize,
    /// Journal blocks recovery may read (`j_total_len`).
    pub len: u32,
    /// First block of the log (`s_first`).
    pub first: u32,
    /// End of the main log (`j_last`): `s_maxlen` less any fast-commit area.
    pub last: u32,
    /// Where a log position wraps back to `first`.  e2fsprogs 1.47.0 wraps
    /// at the end of the fast-commit area when that feature is on, which is
    /// `s_maxlen` either way.
    pub wrap_at: u32,
    /// First transaction expected in the log (`s_sequence`).
    pub sequence: u32,
    /// Log block of that transaction; 0 means the journal is empty.
    pub start: u32,
    /// Error recorded by a journal abort (`s_errno`).
    pub errno: i32,
    pub features: Features,
    pub uuid: [u8; 16],
    /// CRC32C of the UUID: the seed of every v2/v3 checksum.
    pub csum_seed: u32,
    /// The fast-commit blocks, if the journal has that feature.
    pub fast_commit: Option<RangeInclusive<u32>>,
}

fn corrupt(message: impl std::fmt::Display) -> Error {
    Error::other(Errno::EIO, format!("journal: {message}"))
}

/// The superblock's own checksum: CRC32C of the structure with its
/// checksum field zeroed.
pub fn superblock_checksum(block: &[u8]) -> u32 {
    let mut copy = block[..SUPERBLOCK_SIZE].to_vec();
    copy[S_CHECKSUM..S_CHECKSUM + 4].fill(0);
    crc32c(!0, &copy)
}

/// Rewrites the journal superblock `block` (as read from the image) the way
/// e2fsck leaves it once recovery has written the log's blocks to their
/// places (`e2fsck_journal_release` with `reset`, e2fsprogs 1.47.0): the
/// log is empty (`s_start = 0`) and the next transaction is `sequence`.
///
/// Like `e2fsck -y`, version 2 fields that recovery ignores (in a version 1
/// superblock that has any of them set, or an internal journal claiming
/// several users) are zeroed (`clear_v2_journal_fields`).  With checksum v2/v3 the superblock checksum
/// is recomputed.  Only the first `SUPERBLOCK_SIZE` bytes are structure;
/// the rest of the block is left alone unless the v2 fields are cleared,
/// which zeroes to the end of the block as e2fsck does.
pub fn mark_empty(block: &mut [u8], sequence: u32) -> Result<()> {
    if block.len() < SUPERBLOCK_SIZE || be32(block, H_MAGIC) != JBD2_MAGIC {
        return Err(corrupt(
            "the journal superblock has no JBD2 magic number: not marking it empty",
        ));
    }
    let version2 = match be32(block, H_BLOCKTYPE) {
        SUPERBLOCK_V1 => false,
        SUPERBLOCK_V2 => true,
        other => {
            return Err(corrupt(format!(
                "unexpected journal superblock type {other}: not marking it empty"
            )))
        }
    };
    let v2_fields_used = [
        S_FEATURE_COMPAT,
        S_FEATURE_INCOMPAT,
        S_FEATURE_RO_COMPAT,
        S_NR_USERS,
    ]
    .iter()
    .any(|&at| be32(block, at) != 0);
    let ignored = if version2 {
        be32(block, S_NR_USERS) > 1
    } else {
        v2_fields_used
    };
    if ignored {
        block[S_FEATURE_COMPAT..].fill(0);
    }
    block[S_SEQUENCE..S_SEQUENCE + 4].copy_from_slice(&sequence.to_be_bytes());
    block[S_START..S_START + 4].copy_from_slice(&0u32.to_be_bytes());
    let incompat = be32(block, S_FEATURE_INCOMPAT);
    if version2 && incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0 {
        let sum = superblock_checksum(block);
        block[S_CHECKSUM..S_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(())
}

impl Journal {
    /// Validates the journal superblock `block` of a journal whose inode
    /// holds `inode_blocks` blocks, on a filesystem with `fs_block_size`.
    pub fn parse(block: &[u8], fs_block_size: u32, inode_blocks: u32) -> Result<Journal> {
        if block.len() != fs_block_size as usize || block.len() < SUPERBLOCK_SIZE {
            return Err(corrupt(format!(
                "superblock read returned {} bytes, expected {fs_block_size}",
                block.len()
            )));
        }
        if inode_blocks < MIN_JOURNAL_BLOCKS {
            return Err(corrupt(format!(
                "the journal inode holds {inode_blocks} blocks, fewer than the minimum {MIN_JOURNAL_BLOCKS} \
                 (e2fsck would delete the journal)"
            )));
        }
        if be32(block, H_MAGIC) != JBD2_MAGIC {
            return Err(corrupt(
                "the journal superblock has no JBD2 magic number (e2fsck would delete the journal)",
            ));
        }
        // e2fsck (answering yes) zeroes the version 2 fields of a version 1
        // superblock, and of an internal journal claiming several users.
        let (version, v2_fields) = match be32(block, H_BLOCKTYPE) {
            SUPERBLOCK_V1 => (1, false),
            SUPERBLOCK_V2 => (2, be32(block, S_NR_USERS) <= 1),
            other @ 1..=5 => {
                return Err(corrupt(format!(
                    "the journal superblock has the type of a log block ({other})"
                )))
            }
            other => {
                return Err(corrupt(format!(
                    "unsupported journal superblock version (block type {other})"
                )))
            }
        };
        let field = |at: usize| if v2_fields { be32(block, at) } else { 0 };
        let features = Features {
            compat: field(S_FEATURE_COMPAT),
            incompat: field(S_FEATURE_INCOMPAT),
            ro_compat: field(S_FEATURE_RO_COMPAT),
        };
        let unknown = features.incompat & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(corrupt(format!(
                "unsupported incompatible journal features {unknown:#x}"
            )));
        }
        if features.ro_compat != 0 {
            return Err(corrupt(format!(
                "unsupported read-only journal features {:#x}",
                features.ro_compat
            )));
        }
        if features.csum_v2() && features.csum_v3() {
            return Err(corrupt(
                "the journal claims both checksum v2 and v3 (e2fsck would reset the journal)",
            ));
        }
        if features.csum_v2_or_v3() && features.checksum_v1() {
            return Err(corrupt(
                "the journal claims both checksum v1 and v2/v3 (e2fsck would reset the journal)",
            ));
        }
        let mut uuid = [0u8; 16];
        if v2_fields {
            uuid.copy_from_slice(&block[S_UUID..S_UUID + UUID_BYTES]);
        }
        let mut csum_seed = 0;
        if features.csum_v2_or_v3() {
            if block[S_CHECKSUM_TYPE] != CHECKSUM_TYPE_CRC32C {
                return Err(corrupt(format!(
                    "journal checksum type {} is not crc32c (e2fsck would reset the journal)",
                    block[S_CHECKSUM_TYPE]
                )));
            }
            let stored = be32(block, S_CHECKSUM);
            let computed = superblock_checksum(block);
            if stored != computed {
                return Err(corrupt(format!(
                    "the journal superblock checksum is wrong ({stored:#010x}, computed {computed:#010x}; \
                     e2fsck would reset the journal)"
                )));
            }
            csum_seed = crc32c(!0, &uuid);
        }
        let block_size = be32(block, S_BLOCKSIZE);
        if block_size != fs_block_size {
            return Err(corrupt(format!(
                "the journal's block size {block_size} differs from the filesystem's {fs_block_size}"
            )));
        }
        let maxlen = be32(block, S_MAXLEN);
        if maxlen > inode_blocks {
            return Err(corrupt(format!(
                "the journal superblock claims {maxlen} blocks but the inode holds only {inode_blocks}"
            )));
        }
        let len = maxlen;
        let (last, fast_commit) = if features.fast_commit() {
            let fc_blocks = match field(S_NUM_FC_BLKS) {
                0 => DEFAULT_FAST_COMMIT_BLOCKS,
                n => n,
            };
            if maxlen
                .checked_sub(fc_blocks)
                .map_or(true, |main| main < MIN_JOURNAL_BLOCKS)
            {
                return Err(corrupt(format!(
                    "{fc_blocks} fast-commit blocks leave too small a log in {maxlen} blocks"
                )));
            }
            let last = maxlen - fc_blocks;
            (last, Some(last + 1..=maxlen))
        } else {
            (maxlen, None)
        };
        Ok(Journal {
            version,
            block_size: block.len(),
            len,
            first: be32(block, S_FIRST),
            last,
            wrap_at: maxlen,
            sequence: be32(block, S_SEQUENCE),
            start: be32(block, S_START),
            errno: be32(block, S_ERRNO) as i32,
            features,
            uuid,
            csum_seed,
            fast_commit,
        })
    }

    /// The log position after `pos`, wrapped as e2fsck wraps it.
    pub fn wrap(&self, pos: u64) -> u64 {
        let at = u64::from(self.wrap_at);
        if pos >= at {
            pos.wrapping_sub(at.wrapping_sub(u64::from(self.first)))
        } else {
            pos
        }
    }

    /// Bytes at the end of descriptor and revoke blocks taken by their
    /// checksum tail.
    pub fn tail_bytes(&self) -> usize {
        if self.features.csum_v2_or_v3() {
            4
        } else {
            0
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A version 2 superblock for a journal of `maxlen` blocks.
    pub fn superblock(bs: usize, maxlen: u32, incompat: u32, compat: u32) -> Vec<u8> {
        let mut b = vec![0u8; bs];
        let put =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put(&mut b, H_MAGIC, JBD2_MAGIC);
        put(&mut b, H_BLOCKTYPE, SUPERBLOCK_V2);
        put(&mut b, S_BLOCKSIZE, bs as u32);
        put(&mut b, S_MAXLEN, maxlen);
        put(&mut b, S_FIRST, 1);
        put(&mut b, S_SEQUENCE, 1);
        put(&mut b, S_FEATURE_COMPAT, compat);
        put(&mut b, S_FEATURE_INCOMPAT, incompat);
        put(&mut b, S_NR_USERS, 1);
        for (i, byte) in b[S_UUID..S_UUID + 16].iter_mut().enumerate() {
            *byte = 0xa0 + i as u8;
        }
        if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0 {
            b[S_CHECKSUM_TYPE] = CHECKSUM_TYPE_CRC32C;
        }
        seal(&mut b);
        b
    }

    /// Sets the start and sequence fields and recomputes the checksum.
    pub fn set_start(b: &mut [u8], start: u32, sequence: u32) {
        b[S_START..S_START + 4].copy_from_slice(&start.to_be_bytes());
        b[S_SEQUENCE..S_SEQUENCE + 4].copy_from_slice(&sequence.to_be_bytes());
        seal(b);
    }

    pub fn seal(b: &mut [u8]) {
        let sum = superblock_checksum(b);
        b[S_CHECKSUM..S_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    }

    fn err(block: &[u8], bs: u32, blocks: u32) -> String {
        Journal::parse(block, bs, blocks).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_plain_v2_superblock() {
        let mut b = superblock(4096, 1024, INCOMPAT_REVOKE, 0);
        set_start(&mut b, 7, 42);
        let j = Journal::parse(&b, 4096, 1024).unwrap();
        assert_eq!(j.version, 2);
        assert_eq!((j.first, j.last, j.wrap_at, j.len), (1, 1024, 1024, 1024));
        assert_eq!((j.start, j.sequence), (7, 42));
        assert_eq!(j.features.tag_bytes(), 8);
        assert_eq!(j.tail_bytes(), 0);
    }

    #[test]
    fn tag_sizes() {
        let f = |incompat| Features {
            incompat,
            ..Features::default()
        };
        assert_eq!(f(0).tag_bytes(), 8);
        assert_eq!(f(INCOMPAT_64BIT).tag_bytes(), 12);
        assert_eq!(f(INCOMPAT_CSUM_V2).tag_bytes(), 10);
        assert_eq!(f(INCOMPAT_CSUM_V2 | INCOMPAT_64BIT).tag_bytes(), 14);
        assert_eq!(f(INCOMPAT_CSUM_V3).tag_bytes(), 16);
        assert_eq!(f(INCOMPAT_CSUM_V3 | INCOMPAT_64BIT).tag_bytes(), 16);
    }

    #[test]
    fn checksummed_superblock_is_verified() {
        let b = superblock(1024, 2048, INCOMPAT_CSUM_V3, 0);
        let j = Journal::parse(&b, 1024, 4096).unwrap();
        assert_eq!(j.csum_seed, crc32c(!0, &j.uuid));
        assert_eq!(
            j.len, 2048,
            "maxlen below the inode size limits the journal"
        );
        let mut bad = b.clone();
        bad[S_START + 3] ^= 1;
        assert!(err(&bad, 1024, 4096).contains("checksum is wrong"));
        let mut wrong_type = b;
        wrong_type[S_CHECKSUM_TYPE] = 1;
        seal(&mut wrong_type);
        assert!(err(&wrong_type, 1024, 4096).contains("not crc32c"));
    }

    #[test]
    fn refuses_what_e2fsck_would_not_replay() {
        let good = superblock(1024, 1024, 0, 0);
        let mut no_magic = good.clone();
        no_magic[0] = 0;
        assert!(err(&no_magic, 1024, 1024).contains("magic"));
        assert!(err(&good, 4096, 1024).contains("returned 1024 bytes"));
        assert!(err(&good, 1024, 1000).contains("fewer than the minimum"));
        assert!(err(&superblock(1024, 2000, 0, 0), 1024, 1024).contains("holds only 1024"));
        assert!(err(&superblock(1024, 1024, 0x100, 0), 1024, 1024).contains("incompatible"));
        assert!(err(
            &superblock(1024, 1024, INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3, 0),
            1024,
            1024
        )
        .contains("both checksum v2 and v3"));
        assert!(err(
            &superblock(1024, 1024, INCOMPAT_CSUM_V3, COMPAT_CHECKSUM),
            1024,
            1024
        )
        .contains("v1 and v2/v3"));
        let mut other_bs = superblock(1024, 1024, 0, 0);
        other_bs[S_BLOCKSIZE..S_BLOCKSIZE + 4].copy_from_slice(&2048u32.to_be_bytes());
        assert!(err(&other_bs, 1024, 1024).contains("block size 2048"));
        let mut log_type = good;
        log_type[H_BLOCKTYPE + 3] = 2;
        assert!(err(&log_type, 1024, 1024).contains("type of a log block"));
    }

    #[test]
    fn marked_empty_as_e2fsck_leaves_it() {
        for incompat in [
            0,
            INCOMPAT_REVOKE | INCOMPAT_64BIT,
            INCOMPAT_CSUM_V2,
            INCOMPAT_CSUM_V3,
        ] {
            let mut b = superblock(1024, 1024, incompat, 0);
            set_start(&mut b, 17, 40);
            let before = b.clone();
            mark_empty(&mut b, 45).unwrap();
            let j = Journal::parse(&b, 1024, 1024).expect("still a valid superblock");
            assert_eq!((j.start, j.sequence), (0, 45));
            assert_eq!(j.features.incompat, incompat);
            // Only s_sequence, s_start and the checksum change.
            let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != before[i]).collect();
            assert!(
                changed
                    .iter()
                    .all(|&i| (S_SEQUENCE..S_START + 4).contains(&i)
                        || (S_CHECKSUM..S_CHECKSUM + 4).contains(&i)),
                "{incompat:#x}: changed bytes {changed:?}"
            );
            let checksummed = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
            assert_eq!(
                b[S_CHECKSUM..S_CHECKSUM + 4] != before[S_CHECKSUM..S_CHECKSUM + 4],
                checksummed,
                "{incompat:#x}: checksum"
            );
            if checksummed {
                assert_eq!(be32(&b, S_CHECKSUM), superblock_checksum(&b));
            }
        }
    }

    #[test]
    fn marked_empty_checksum_v3_known_value() {
        // The checksum is CRC32C (seed !0, no final inversion) of the first
        // 1024 bytes with the checksum field zeroed, as e2fsprogs computes it.
        let mut b = superblock(4096, 2048, INCOMPAT_CSUM_V3 | INCOMPAT_64BIT, 0);
        set_start(&mut b, 9, 0xffff_fffe);
        b[2000] = 0x77; // beyond the structure: not covered, not touched
        mark_empty(&mut b, 0xffff_ffff).unwrap();
        let mut zeroed = b[..1024].to_vec();
        zeroed[S_CHECKSUM..S_CHECKSUM + 4].fill(0);
        assert_eq!(be32(&b, S_CHECKSUM), crc32c(!0, &zeroed));
        assert_eq!(be32(&b, S_START), 0);
        assert_eq!(be32(&b, S_SEQUENCE), 0xffff_ffff);
        assert_eq!(b[2000], 0x77);
    }

    #[test]
    fn marked_empty_clears_ignored_v2_fields() {
        // A version 1 superblock with junk where v2 fields would be, and a
        // shared internal journal: e2fsck -y zeroes the v2 fields.
        let mut v1 = superblock(1024, 1024, INCOMPAT_CSUM_V3, 0);
        v1[H_BLOCKTYPE..H_BLOCKTYPE + 4].copy_from_slice(&SUPERBLOCK_V1.to_be_bytes());
        set_start(&mut v1, 5, 7);
        mark_empty(&mut v1, 9).unwrap();
        assert!(v1[S_FEATURE_COMPAT..].iter().all(|&b| b == 0));
        assert_eq!((be32(&v1, S_START), be32(&v1, S_SEQUENCE)), (0, 9));
        assert_eq!(be32(&v1, S_MAXLEN), 1024, "v1 fields are kept");

        let mut shared = superblock(1024, 1024, INCOMPAT_CSUM_V3, 0);
        shared[S_NR_USERS..S_NR_USERS + 4].copy_from_slice(&2u32.to_be_bytes());
        mark_empty(&mut shared, 3).unwrap();
        assert!(shared[S_FEATURE_COMPAT..].iter().all(|&b| b == 0));
        let j = Journal::parse(&shared, 1024, 1024).unwrap();
        assert_eq!((j.version, j.start, j.sequence), (2, 0, 3));
    }

    #[test]
    fn marking_a_non_superblock_empty_is_refused() {
        let mut zero = vec![0u8; 1024];
        assert!(mark_empty(&mut zero, 1)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut log_block = superblock(1024, 1024, 0, 0);
        log_block[H_BLOCKTYPE + 3] = 2;
        assert!(mark_empty(&mut log_block, 1).is_err());
    }

    #[test]
    fn version_1_has_no_features() {
        let mut b = superblock(1024, 1024, INCOMPAT_64BIT, COMPAT_CHECKSUM);
        b[H_BLOCKTYPE..H_BLOCKTYPE + 4].copy_from_slice(&SUPERBLOCK_V1.to_be_bytes());
        let j = Journal::parse(&b, 1024, 1024).unwrap();
        assert_eq!(j.version, 1);
        assert_eq!(j.features, Features::default());
        assert_eq!(j.uuid, [0; 16]);
    }

    #[test]
    fn shared_internal_journal_loses_its_v2_fields() {
        let mut b = superblock(1024, 1024, INCOMPAT_64BIT, 0);
        b[S_NR_USERS..S_NR_USERS + 4].copy_from_slice(&3u32.to_be_bytes());
        let j = Journal::parse(&b, 1024, 1024).unwrap();
        assert_eq!(j.features, Features::default());
    }

    #[test]
    fn fast_commit_area_is_split_off_but_wrapping_uses_maxlen() {
        let b = superblock(1024, 2048, INCOMPAT_FAST_COMMIT, 0);
        let j = Journal::parse(&b, 1024, 2048).unwrap();
        assert_eq!(j.last, 2048 - 256);
        assert_eq!(j.fast_commit, Some(2048 - 255..=2048));
        assert_eq!(j.wrap_at, 2048);
        assert_eq!(j.wrap(2048), 1);
        assert_eq!(j.wrap(2047), 2047);
        let small = superblock(1024, 1100, INCOMPAT_FAST_COMMIT, 0);
        assert!(err(&small, 1024, 1100).contains("fast-commit"));
    }
}
