//! The blocks of the log: the common header, descriptor blocks and their
//! block tags, commit blocks and revoke blocks, and their checksums.
//!
//! Layouts follow `lib/ext2fs/kernel-jbd.h`; the checksum rules follow
//! `e2fsck/recovery.c` (e2fsprogs 1.47.0).  Big-endian throughout.

use crate::crc::crc32c;
use crate::format::{be16, be32, be64};
use crate::jbd2::superblock::{Journal, UUID_BYTES};
use crate::jbd2::JBD2_MAGIC;

pub const DESCRIPTOR_BLOCK: u32 = 1;
pub const COMMIT_BLOCK: u32 = 2;
pub const REVOKE_BLOCK: u32 = 5;

/// The header every journal block starts with.
pub const HEADER_BYTES: usize = 12;

/// The copy was "escaped": its first four bytes were the journal magic
/// and were zeroed in the log.
pub const FLAG_ESCAPE: u16 = 1;
/// No UUID follows this tag.
pub const FLAG_SAME_UUID: u16 = 2;
/// The last tag of the descriptor block.
pub const FLAG_LAST_TAG: u16 = 8;

/// `h_chksum_type` of a v1 (whole-transaction CRC32) commit checksum.
pub const CRC32_CHKSUM: u8 = 1;
pub const CRC32_CHKSUM_SIZE: u8 = 4;

// Commit block fields.
pub(crate) const C_CHKSUM_TYPE: usize = 12;
pub(crate) const C_CHKSUM_SIZE: usize = 13;
pub(crate) const C_CHKSUM: usize = 16;
pub(crate) const C_COMMIT_SEC: usize = 48;
pub(crate) const C_COMMIT_NSEC: usize = 56;

// Revoke block: the header, then the count of bytes used (header included).
pub(crate) const R_COUNT: usize = 12;
pub(crate) const REVOKE_HEADER_BYTES: usize = 16;

/// The header of a block carrying the journal magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub block_type: u32,
    pub sequence: u32,
}

impl Header {
    /// The header of `block`, or `None` if it does not start with the magic.
    pub fn parse(block: &[u8]) -> Option<Header> {
        if block.len() < HEADER_BYTES || be32(block, 0) != JBD2_MAGIC {
            return None;
        }
        Some(Header {
            block_type: be32(block, 4),
            sequence: be32(block, 8),
        })
    }
}

/// One block tag of a descriptor block: the filesystem block whose copy is
/// the next data block of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub block: u64,
    pub flags: u16,
    /// The stored checksum: 16 bits for v2, 32 bits for v3.
    pub checksum: u32,
}

impl Tag {
    pub fn escaped(&self) -> bool {
        self.flags & FLAG_ESCAPE != 0
    }
}

/// The tags of a descriptor block, in order, walked exactly as recovery
/// walks them: while a whole tag fits before the checksum tail, stepping
/// over the UUID after any tag without `SAME_UUID`, stopping after
/// `LAST_TAG`.
pub struct Tags<'a> {
    block: &'a [u8],
    at: usize,
    limit: usize,
    tag_bytes: usize,
    is_64bit: bool,
    csum_v3: bool,
    csum_v2: bool,
    done: bool,
}

pub fn tags<'a>(journal: &Journal, block: &'a [u8]) -> Tags<'a> {
    let features = journal.features;
    Tags {
        block,
        at: HEADER_BYTES,
        limit: journal.block_size - journal.tail_bytes(),
        tag_bytes: features.tag_bytes(),
        is_64bit: features.is_64bit(),
        csum_v3: features.csum_v3(),
        csum_v2: features.csum_v2(),
        done: false,
    }
}

impl Iterator for Tags<'_> {
    type Item = Tag;

    fn next(&mut self) -> Option<Tag> {
        if self.done || self.at + self.tag_bytes > self.limit {
            return None;
        }
        let b = self.block;
        let at = self.at;
        // A v3 tag has 32-bit flags where a v2 tag has its checksum and
        // 16-bit flags: the low 16 bits sit at the same place in both.
        let flags = be16(b, at + 6);
        let mut block = u64::from(be32(b, at));
        if self.is_64bit {
            block |= u64::from(be32(b, at + 8)) << 32;
        }
        let checksum = if self.csum_v3 {
            be32(b, at + 12)
        } else if self.csum_v2 {
            u32::from(be16(b, at + 4))
        } else {
            0
        };
        self.at += self.tag_bytes;
        if flags & FLAG_SAME_UUID == 0 {
            self.at += UUID_BYTES;
        }
        if flags & FLAG_LAST_TAG != 0 {
            self.done = true;
        }
        Some(Tag {
            block,
            flags,
            checksum,
        })
    }
}

/// The data blocks a descriptor block announces.
pub fn count_tags(journal: &Journal, block: &[u8]) -> u64 {
    tags(journal, block).count() as u64
}

/// CRC32C from the journal's seed over `block` with the four bytes at `at`
/// read as zero.
fn crc_with_hole(journal: &Journal, block: &[u8], at: usize) -> u32 {
    let crc = crc32c(journal.csum_seed, &block[..at]);
    let crc = crc32c(crc, &[0; 4]);
    crc32c(crc, &block[at + 4..])
}

/// The v2/v3 checksum in the tail of a descriptor or revoke block (always
/// true without v2/v3 checksums).
pub fn tail_checksum_ok(journal: &Journal, block: &[u8]) -> bool {
    if !journal.features.csum_v2_or_v3() {
        return true;
    }
    let at = journal.block_size - 4;
    be32(block, at) == crc_with_hole(journal, block, at)
}

/// The v2/v3 checksum of a commit block (always true without them).
pub fn commit_checksum_ok(journal: &Journal, block: &[u8]) -> bool {
    if !journal.features.csum_v2_or_v3() {
        return true;
    }
    be32(block, C_CHKSUM) == crc_with_hole(journal, block, C_CHKSUM)
}

/// The v2/v3 checksum of a logged copy, as it lies in the log (escaped),
/// for a tag of transaction `sequence` (always true without them).
pub fn tag_checksum_ok(journal: &Journal, tag: &Tag, data: &[u8], sequence: u32) -> bool {
    let features = journal.features;
    if !features.csum_v2_or_v3() {
        return true;
    }
    let crc = crc32c(journal.csum_seed, &sequence.to_be_bytes());
    let crc = crc32c(crc, data);
    if features.csum_v3() {
        tag.checksum == crc
    } else {
        tag.checksum == crc & 0xffff
    }
}

/// What recovery reads from a commit block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// `h_commit_sec`, compared between transactions to tell a stale block
    /// from a corrupt one.
    pub time: u64,
    pub chksum_type: u8,
    pub chksum_size: u8,
    /// `h_chksum[0]`: the v1 CRC32 (or the v2/v3 CRC32C).
    pub chksum: u32,
}

impl Commit {
    pub fn parse(block: &[u8]) -> Commit {
        Commit {
            time: be64(block, C_COMMIT_SEC),
            chksum_type: block[C_CHKSUM_TYPE],
            chksum_size: block[C_CHKSUM_SIZE],
            chksum: be32(block, C_CHKSUM),
        }
    }

    /// Whether the v1 checksum matches `crc`, the CRC32 of the
    /// transaction's descriptor and data blocks (or is left unused).
    pub fn v1_checksum_ok(&self, crc: u32) -> bool {
        (self.chksum == crc
            && self.chksum_type == CRC32_CHKSUM
            && self.chksum_size == CRC32_CHKSUM_SIZE)
            || (self.chksum_type == 0 && self.chksum_size == 0 && self.chksum == 0)
    }
}

/// The blocks a revoke block revokes, or why it is invalid.
pub fn revoke_records(journal: &Journal, block: &[u8]) -> Result<Vec<u64>, String> {
    let count = be32(block, R_COUNT) as usize;
    if count > journal.block_size - journal.tail_bytes() {
        return Err(format!(
            "revoke block claims {count} bytes of records in a {}-byte block",
            journal.block_size
        ));
    }
    let record = if journal.features.is_64bit() { 8 } else { 4 };
    let mut out = Vec::new();
    let mut at = REVOKE_HEADER_BYTES;
    while at + record <= count {
        out.push(if record == 8 {
            be64(block, at)
        } else {
            u64::from(be32(block, at))
        });
        at += record;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jbd2::superblock::tests::superblock;
    use crate::jbd2::superblock::{INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3};

    fn journal(bs: usize, incompat: u32) -> Journal {
        Journal::parse(&superblock(bs, 1024, incompat, 0), bs as u32, 1024).unwrap()
    }

    fn header(block: &mut [u8], block_type: u32, sequence: u32) {
        block[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        block[4..8].copy_from_slice(&block_type.to_be_bytes());
        block[8..12].copy_from_slice(&sequence.to_be_bytes());
    }

    #[test]
    fn header_needs_the_magic() {
        let mut b = vec![0u8; 1024];
        assert_eq!(Header::parse(&b), None);
        header(&mut b, COMMIT_BLOCK, 9);
        assert_eq!(
            Header::parse(&b),
            Some(Header {
                block_type: COMMIT_BLOCK,
                sequence: 9
            })
        );
    }

    #[test]
    fn tags_32bit_with_uuid_and_last_tag() {
        let j = journal(1024, 0);
        let mut b = vec![0u8; 1024];
        header(&mut b, DESCRIPTOR_BLOCK, 1);
        // First tag: block 100, no SAME_UUID, so 16 bytes of UUID follow.
        b[12..16].copy_from_slice(&100u32.to_be_bytes());
        b[18..20].copy_from_slice(&FLAG_ESCAPE.to_be_bytes());
        let second = 12 + 8 + 16;
        b[second..second + 4].copy_from_slice(&200u32.to_be_bytes());
        b[second + 6..second + 8].copy_from_slice(&(FLAG_SAME_UUID | FLAG_LAST_TAG).to_be_bytes());
        // Junk after the last tag is ignored.
        b[second + 8..second + 12].copy_from_slice(&300u32.to_be_bytes());
        let all: Vec<Tag> = tags(&j, &b).collect();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].block, all[0].escaped()), (100, true));
        assert_eq!((all[1].block, all[1].escaped()), (200, false));
        assert_eq!(count_tags(&j, &b), 2);
    }

    #[test]
    fn tags_run_to_the_end_without_last_tag() {
        let j = journal(1024, 0);
        let mut b = vec![0u8; 1024];
        header(&mut b, DESCRIPTOR_BLOCK, 1);
        for at in (12..1024).step_by(8) {
            if at + 8 <= 1024 {
                b[at + 6..at + 8].copy_from_slice(&FLAG_SAME_UUID.to_be_bytes());
            }
        }
        assert_eq!(count_tags(&j, &b), (1024 - 12) / 8);
    }

    #[test]
    fn tags_64bit_and_v3() {
        let j = journal(4096, INCOMPAT_64BIT | INCOMPAT_CSUM_V3);
        let mut b = vec![0u8; 4096];
        header(&mut b, DESCRIPTOR_BLOCK, 1);
        b[12..16].copy_from_slice(&0x0000_0010u32.to_be_bytes());
        b[16..20].copy_from_slice(&u32::from(FLAG_SAME_UUID | FLAG_LAST_TAG).to_be_bytes());
        b[20..24].copy_from_slice(&0x0000_0002u32.to_be_bytes());
        b[24..28].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        let all: Vec<Tag> = tags(&j, &b).collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].block, 0x2_0000_0010);
        assert_eq!(all[0].checksum, 0xdead_beef);
    }

    #[test]
    fn tags_stop_before_the_checksum_tail() {
        // csum v2, 32-bit: 10-byte tags; (1024 - 4 - 12) / 10 = 100 fit.
        let j = journal(1024, INCOMPAT_CSUM_V2);
        let mut b = vec![0u8; 1024];
        for at in (12..1020).step_by(10) {
            if at + 10 <= 1020 {
                b[at + 6..at + 8].copy_from_slice(&FLAG_SAME_UUID.to_be_bytes());
            }
        }
        assert_eq!(count_tags(&j, &b), 100);
    }

    #[test]
    fn checksums_v3() {
        let j = journal(1024, INCOMPAT_CSUM_V3);
        let mut b = vec![7u8; 1024];
        header(&mut b, DESCRIPTOR_BLOCK, 1);
        let mut zeroed = b.clone();
        zeroed[1020..].fill(0);
        let sum = crc32c(j.csum_seed, &zeroed);
        b[1020..].copy_from_slice(&sum.to_be_bytes());
        assert!(tail_checksum_ok(&j, &b));
        b[100] ^= 1;
        assert!(!tail_checksum_ok(&j, &b));

        let mut c = vec![0u8; 1024];
        header(&mut c, COMMIT_BLOCK, 1);
        let sum = crc32c(j.csum_seed, &c);
        c[16..20].copy_from_slice(&sum.to_be_bytes());
        assert!(commit_checksum_ok(&j, &c));
        c[60] = 1;
        assert!(!commit_checksum_ok(&j, &c));

        let data = vec![3u8; 1024];
        let crc = crc32c(crc32c(j.csum_seed, &5u32.to_be_bytes()), &data);
        let tag = Tag {
            block: 1,
            flags: 0,
            checksum: crc,
        };
        assert!(tag_checksum_ok(&j, &tag, &data, 5));
        assert!(!tag_checksum_ok(&j, &tag, &data, 6));
        let v2 = journal(1024, INCOMPAT_CSUM_V2);
        let crc2 = crc32c(crc32c(v2.csum_seed, &5u32.to_be_bytes()), &data);
        let tag2 = Tag {
            checksum: crc2 & 0xffff,
            ..tag
        };
        assert!(tag_checksum_ok(&v2, &tag2, &data, 5));
    }

    #[test]
    fn without_checksums_everything_passes() {
        let j = journal(1024, 0);
        let junk = vec![0x55u8; 1024];
        assert!(tail_checksum_ok(&j, &junk));
        assert!(commit_checksum_ok(&j, &junk));
        let tag = Tag {
            block: 1,
            flags: 0,
            checksum: 0,
        };
        assert!(tag_checksum_ok(&j, &tag, &junk, 1));
    }

    #[test]
    fn commit_v1_checksum() {
        let mut c = vec![0u8; 1024];
        header(&mut c, COMMIT_BLOCK, 1);
        assert!(Commit::parse(&c).v1_checksum_ok(0x1234), "unused checksum");
        c[12] = CRC32_CHKSUM;
        c[13] = CRC32_CHKSUM_SIZE;
        c[16..20].copy_from_slice(&0x1234u32.to_be_bytes());
        c[48..56].copy_from_slice(&77u64.to_be_bytes());
        let commit = Commit::parse(&c);
        assert_eq!(commit.time, 77);
        assert!(commit.v1_checksum_ok(0x1234));
        assert!(!commit.v1_checksum_ok(0x1235));
    }

    #[test]
    fn revoke_records_32_and_64() {
        let j = journal(1024, 0);
        let mut b = vec![0u8; 1024];
        header(&mut b, REVOKE_BLOCK, 1);
        b[12..16].copy_from_slice(&(16u32 + 8).to_be_bytes());
        b[16..20].copy_from_slice(&5u32.to_be_bytes());
        b[20..24].copy_from_slice(&6u32.to_be_bytes());
        b[24..28].copy_from_slice(&7u32.to_be_bytes()); // beyond r_count
        assert_eq!(revoke_records(&j, &b).unwrap(), vec![5, 6]);

        let j64 = journal(1024, INCOMPAT_64BIT);
        b[12..16].copy_from_slice(&(16u32 + 8).to_be_bytes());
        b[16..24].copy_from_slice(&0x1_0000_0005u64.to_be_bytes());
        assert_eq!(revoke_records(&j64, &b).unwrap(), vec![0x1_0000_0005]);

        b[12..16].copy_from_slice(&2000u32.to_be_bytes());
        assert!(revoke_records(&j, &b).is_err());
    }
}
