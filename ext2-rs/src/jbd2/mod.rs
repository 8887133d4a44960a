//! The journal of an unclean ext3/ext4 filesystem, replayed in memory.
//!
//! A [`Replay`] says, for each filesystem block that recovery would
//! overwrite, where in the image its newest committed copy lies.  The
//! host's block device (the filter's image) consults it on every read, so
//! the filesystem and the served file look exactly as they would after
//! `e2fsck` replayed the journal, while the image itself is never written.
//!
//! [`load`] finds the journal inode, reads the journal through a caller's
//! block reader, and turns what [`recover`] computes into a [`Replay`].
//! The parsing and the recovery passes are pure (`superblock`, `block`,
//! `recovery`, `map`) and unit-tested with journals built in memory.
//!
//! With `ext2journal=replay` the replay is also written into the image
//! (by the host): its [`Checkpoint`] gives the journal superblock as
//! e2fsck leaves it after recovery (empty, next transaction, checksum), and
//! [`keep_needs_recovery`] keeps a replayed superblock from clearing
//! `needs_recovery` before the journal is empty.

mod block;
mod map;
mod recovery;
mod superblock;
#[cfg(test)]
mod testlog;
mod writer;

use std::collections::HashMap;

use crate::debug;
use crate::error::{Errno, Error, Result};
use crate::fs::{Filesystem, Layout};
use crate::log::{self, Topic};
use crate::sb;
use crate::sys;

pub use map::JournalMap;
pub use recovery::{recover, EndReason, LogCopy, Recovery, ScanEnd, TransactionReport};
pub use superblock::{Features, Journal, INCOMPAT_64BIT, INCOMPAT_REVOKE};
pub use writer::{
    blocks_needed, log_capacity, set_log_start, write_transaction, CommitTime, LoggedTransaction,
};

/// Where the replayed contents of one filesystem block come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalCopy {
    /// The image block (in filesystem blocks) holding the journal's copy.
    pub image_block: u64,
    /// JBD2 "escaped" the copy: its first four bytes were the journal magic
    /// and were zeroed when it was logged; they must be put back on read.
    pub escaped: bool,
}

impl JournalCopy {
    /// Turns `block`, read from [`JournalCopy::image_block`], into the
    /// replayed contents: an escaped copy gets its magic back.
    pub fn unescape(&self, block: &mut [u8]) {
        if self.escaped {
            block[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        }
    }
}

/// The in-memory result of replaying a journal.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    copies: HashMap<u64, JournalCopy>,
    checkpoint: Option<Checkpoint>,
}

/// What it takes to finish recovery in the image once the replayed blocks
/// are written to their places: the journal superblock to rewrite as empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The image block (in filesystem blocks) of the journal superblock.
    pub superblock_block: u64,
    /// The journal superblock as it was read and validated for the replay.
    pub superblock: Vec<u8>,
    /// Its `s_sequence` once empty ([`Recovery::next_sequence`]).
    pub next_sequence: u32,
    /// Why e2fsck would leave the filesystem marked as having errors after
    /// this recovery ([`Recovery::leaves_errors`]): then it must not be
    /// written out, only replayed in memory.
    pub errors: Option<String>,
}

impl Checkpoint {
    /// The journal superblock rewritten as e2fsck leaves it after recovery:
    /// the log empty, the next transaction [`Checkpoint::next_sequence`].
    pub fn empty_superblock(&self) -> Result<Vec<u8>> {
        let mut block = self.superblock.clone();
        superblock::mark_empty(&mut block, self.next_sequence)?;
        Ok(block)
    }
}

/// The JBD2 magic number, big-endian on disk.
pub const JBD2_MAGIC: u32 = 0xc03b_3998;

impl Replay {
    pub fn from_copies(copies: HashMap<u64, JournalCopy>) -> Replay {
        Replay {
            copies,
            checkpoint: None,
        }
    }

    /// How to mark the journal empty after writing this replay into the
    /// image; `None` only for replays built without a journal (tests).
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }

    /// The journal copy standing in for filesystem block `block`, if any.
    pub fn copy_of(&self, block: u64) -> Option<JournalCopy> {
        self.copies.get(&block).copied()
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// All replayed blocks, in block order.
    pub fn blocks(&self) -> Vec<(u64, JournalCopy)> {
        let mut all: Vec<(u64, JournalCopy)> = self.copies.iter().map(|(b, c)| (*b, *c)).collect();
        all.sort_by_key(|(b, _)| *b);
        all
    }
}

/// Keeps `needs_recovery` set in a replayed copy of the primary superblock
/// about to be written into the image.  `buf` holds image bytes from
/// `offset` on; if it covers the primary superblock and that is a valid
/// one without the flag, the flag is set and, with `metadata_csum`, its
/// checksum recomputed (`ext2fs_superblock_csum`: CRC32C from `!0` over
/// the bytes before `s_checksum`).  Returns whether it changed anything.
///
/// The copy logged in a journal normally has the flag set already (the
/// kernel sets it while the filesystem is mounted), but nothing promises
/// it.  Written as logged, a copy without it would clear the flag while
/// the journal still holds transactions, and a crash before the journal
/// is marked empty would leave a kernel to discard them.  The flag is
/// cleared last, once the journal is empty.
pub fn keep_needs_recovery(buf: &mut [u8], offset: u64) -> bool {
    let Some(at) = sb::OFFSET
        .checked_sub(offset)
        .and_then(|at| usize::try_from(at).ok())
    else {
        return false;
    };
    match buf.get_mut(at..at.saturating_add(sb::BYTES)) {
        Some(superblock) => sb::set_needs_recovery(superblock, true),
        None => false,
    }
}

/// Reads the raw image from a filesystem block on:
/// `read_block(image_block, buf)` fills `buf` (one block or more).
pub type ReadBlock<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), Errno> + 'a;

/// The journal is read ahead in requests of up to this many bytes: its
/// passes walk the log in order, a block at a time.
const JOURNAL_READ_AHEAD: u64 = 1 << 20;

/// Journal blocks read ahead of recovery, one request per run that is
/// contiguous in the image.
struct ReadAhead<'a> {
    map: &'a JournalMap,
    read_block: &'a ReadBlock<'a>,
    block_size: usize,
    /// The journal blocks held: `first..first + count`, their bytes.
    first: u32,
    count: u32,
    bytes: Vec<u8>,
}

impl ReadAhead<'_> {
    fn block(&mut self, logical: u32) -> Result<Vec<u8>> {
        if logical < self.first || logical - self.first >= self.count {
            self.fill(logical)?;
        }
        let at = (logical - self.first) as usize * self.block_size;
        Ok(self.bytes[at..at + self.block_size].to_vec())
    }

    fn fill(&mut self, logical: u32) -> Result<()> {
        let image_block = self.map.image_block(logical).ok_or_else(|| {
            Error::other(
                Errno::EIO,
                format!("journal: log block {logical} is not mapped"),
            )
        })?;
        let most = (JOURNAL_READ_AHEAD / self.block_size as u64).max(1) as u32;
        let count = self.map.contiguous_from(logical).clamp(1, most);
        self.bytes.resize(count as usize * self.block_size, 0);
        self.count = 0;
        (self.read_block)(image_block, &mut self.bytes).map_err(|errno| {
            Error::other(
                errno,
                format!(
                    "journal: reading log blocks {logical}-{} (image block {image_block}) failed",
                    logical + count - 1
                ),
            )
        })?;
        self.first = logical;
        self.count = count;
        Ok(())
    }
}

/// Replays, in memory, the journal of `fs` (opened on the raw image) the
/// way `e2fsck` would, and says where each replayed block's copy lies.
///
/// `read_block(image_block, buf)` reads the raw image; the log is read
/// ahead in requests of up to 1 MiB.  Nothing is written.  An empty journal
/// (`s_start == 0`) gives an empty replay.  Fails when the journal is
/// external, unusable (e2fsck would reset or delete it rather than replay
/// it), holds fast commits, or when recovery itself fails (e2fsck would
/// then repair the filesystem, which cannot be done in memory).  A
/// transaction with a bad commit checksum is dropped with everything after
/// it, as recovery drops it, and reported as an error ([`crate::log`]).
pub fn load(fs: &mut Filesystem, read_block: &ReadBlock) -> Result<Replay> {
    let (ino, map) = locate(fs)?;
    let block_size = fs.block_size();
    let mut superblock: Option<Vec<u8>> = None;
    let mut ahead = ReadAhead {
        map: &map,
        read_block,
        block_size: block_size as usize,
        first: 0,
        count: 0,
        bytes: Vec::new(),
    };
    let mut read = |logical: u32| -> Result<Vec<u8>> {
        let buf = ahead.block(logical)?;
        if logical == 0 && superblock.is_none() {
            superblock = Some(buf.clone());
        }
        Ok(buf)
    };
    let recovery = recover(block_size, map.len(), &mut read)?;
    log_recovery(ino, &recovery);
    let (mut replay, beyond) = to_replay(&recovery, &map, fs.blocks_count())?;
    replay.checkpoint = Some(Checkpoint {
        superblock_block: map.image_block(0).ok_or_else(|| {
            Error::other(Errno::EIO, "journal: the journal superblock is not mapped")
        })?,
        superblock: superblock.ok_or_else(|| {
            Error::other(Errno::EIO, "journal: the journal superblock was not read")
        })?,
        next_sequence: recovery.next_sequence(),
        errors: recovery.leaves_errors(),
    });
    if beyond > 0 {
        debug!(
            Topic::Journal,
            "journal: ignored {beyond} logged blocks beyond the end of the filesystem"
        );
    }
    if recovery.needed() {
        let (first, end) = (recovery.first_transaction, recovery.end_transaction);
        if first == end {
            debug!(
                Topic::Journal,
                "journal: no committed transaction to replay"
            );
        } else {
            debug!(
                Topic::Journal,
                "journal: transactions {first} to {} replayed in memory: {} blocks",
                end.wrapping_sub(1),
                replay.len()
            );
        }
    }
    Ok(replay)
}

/// The internal journal's inode and block map.
pub(crate) fn locate(fs: &mut Filesystem) -> Result<(u32, JournalMap)> {
    let sb = fs.super_block();
    let (inum, dev, uuid) = (sb.s_journal_inum, sb.s_journal_dev, sb.s_journal_uuid);
    let has_journal = sb.s_feature_compat & sys::EXT3_FEATURE_COMPAT_HAS_JOURNAL != 0;
    if !has_journal {
        return Err(Error::other(
            Errno::EIO,
            "journal: the filesystem needs recovery but has no journal (has_journal is clear; \
             e2fsck would drop the journal): run e2fsck on the image",
        ));
    }
    if uuid != [0u8; 16] {
        let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        return Err(Error::other(
            Errno::ENOTSUP,
            format!(
                "journal: the journal is on an external device (UUID {hex}, device {dev:#x}), \
                 which this filter cannot read: recover it with e2fsck -E journal_only first"
            ),
        ));
    }
    if inum == 0 {
        return Err(Error::other(
            Errno::EIO,
            format!("journal: the superblock names no journal inode (journal device {dev:#x})"),
        ));
    }
    let context = |e: Error| match e {
        Error::Ext2 { code, .. } => Error::Ext2 {
            context: format!("journal inode {inum}"),
            code,
        },
        other => other,
    };
    let info = fs.inode(inum).map_err(context)?;
    if !info.is_regular() || info.layout == Layout::Inline {
        return Err(Error::other(
            Errno::EIO,
            format!("journal: inode {inum} is not a journal (e2fsck would delete the journal)"),
        ));
    }
    let blocks = u32::try_from(info.size / u64::from(fs.block_size())).unwrap_or(u32::MAX);
    let extents = crate::mapping::read_map(fs, inum, info.layout).map_err(context)?;
    Ok((inum, JournalMap::new(extents, blocks)?))
}

/// Turns a recovery into the blocks the image reads from the journal, and
/// how many logged blocks lie beyond the filesystem's `blocks_count` (e2fsck
/// would write them past its end, where nothing reads them: we drop them).
pub fn to_replay(
    recovery: &Recovery,
    map: &JournalMap,
    blocks_count: u64,
) -> Result<(Replay, usize)> {
    if let Some(failure) = &recovery.failure {
        return Err(Error::other(
            Errno::EIO,
            format!(
                "{failure}: journal recovery fails, and e2fsck would go on to repair the filesystem, \
                 which cannot be done in memory: run e2fsck on the image"
            ),
        ));
    }
    let mut copies = HashMap::with_capacity(recovery.copies.len());
    let mut beyond = 0;
    for (&block, copy) in &recovery.copies {
        if block >= blocks_count {
            beyond += 1;
            continue;
        }
        if map.holds_image_block(block) {
            return Err(Error::other(
                Errno::EIO,
                format!(
                    "journal: transaction {} replays block {block}, which belongs to the journal itself: \
                     the journal is damaged",
                    copy.sequence
                ),
            ));
        }
        let image_block = map.image_block(copy.log_block).ok_or_else(|| {
            Error::other(
                Errno::EIO,
                format!("journal: log block {} is not mapped", copy.log_block),
            )
        })?;
        copies.insert(
            block,
            JournalCopy {
                image_block,
                escaped: copy.escaped,
            },
        );
    }
    Ok((Replay::from_copies(copies), beyond))
}

/// `-D ext2.journal=1` output, and the one warning recovery can leave.
fn log_recovery(ino: u32, r: &Recovery) {
    let j = &r.journal;
    debug!(
        Topic::Journal,
        "journal: inode {ino}, {} blocks of {} bytes, version {}, features [{}], \
         log from block {} (first {}), transaction {}{}",
        j.len,
        j.block_size,
        j.version,
        j.features.names().join(" "),
        j.start,
        j.first,
        j.sequence,
        if j.errno != 0 {
            format!(", journal errno {}", j.errno)
        } else {
            String::new()
        }
    );
    if !r.needed() {
        debug!(
            Topic::Journal,
            "journal: the log is empty (s_start is 0): nothing to replay"
        );
        return;
    }
    for t in &r.transactions {
        debug!(
            Topic::Journal,
            "journal: transaction {} at log block {}: applied {} blocks{}{}{}",
            t.sequence,
            t.log_block,
            t.replayed,
            if t.skipped_revoked > 0 {
                format!(", skipped {} revoked copies", t.skipped_revoked)
            } else {
                String::new()
            },
            if t.revoke_records > 0 {
                format!(", revoked {} blocks", t.revoke_records)
            } else {
                String::new()
            },
            if t.bad_checksums > 0 {
                format!(", {} copies with bad checksums", t.bad_checksums)
            } else {
                String::new()
            }
        );
    }
    if let Some(end) = &r.scan_end {
        if end.incomplete || end.reason == EndReason::BadCommitChecksum {
            debug!(
                Topic::Journal,
                "journal: transaction {} from log block {} is dropped, not committed: log block {} {}",
                end.sequence,
                end.transaction_block,
                end.log_block,
                end.reason
            );
        } else {
            debug!(
                Topic::Journal,
                "journal: the log ends before transaction {}: log block {} {}",
                end.sequence,
                end.log_block,
                end.reason
            );
        }
    }
    let scanned_to = r.scan_end.as_ref().map(|end| end.sequence);
    if r.failed_commit.is_none() && scanned_to.is_some_and(|seq| seq != r.end_transaction) {
        debug!(
            Topic::Journal,
            "journal: transactions {} and later are dropped: a commit block checksum \
             failed (async commit lets the scan go past it)",
            r.end_transaction
        );
    }
    if let Some(failed) = r.failed_commit {
        log::error(&format!(
            "journal: transaction {failed} is corrupt (bad commit checksum): it and any later \
             transactions are not replayed, as e2fsck would do (e2fsck also marks the filesystem \
             as having errors)"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crc;
    use crate::extent_map::Extent;
    use crate::format::{le32, put_le16, put_le32};
    use crate::jbd2::testlog::{filled, LogBuilder};
    use crate::sb::{
        S_CHECKSUM as FS_S_CHECKSUM, S_FEATURE_INCOMPAT as FS_S_FEATURE_INCOMPAT,
        S_FEATURE_RO_COMPAT as FS_S_FEATURE_RO_COMPAT, S_MAGIC as FS_S_MAGIC,
    };

    fn map(len: u32) -> JournalMap {
        // Journal blocks 0..10 at image 5000.., the rest at image 9000..
        JournalMap::new(
            vec![
                Extent {
                    logical: 0,
                    physical: 5000,
                    len: 10,
                    unwritten: false,
                },
                Extent {
                    logical: 10,
                    physical: 9000,
                    len: u64::from(len) - 10,
                    unwritten: false,
                },
            ],
            len,
        )
        .unwrap()
    }

    #[test]
    fn copies_point_at_the_journal_in_the_image() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.at(8);
        let mut magic = filled(1024, 1);
        magic[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        let at = log.transaction(
            1,
            &[
                (100, filled(1024, 1)),
                (101, magic),
                (20_000, filled(1024, 3)),
            ],
        );
        assert_eq!(at, vec![9, 10, 11]);
        log.start(8, 1);
        let r = log.recover().unwrap();
        let (replay, beyond) = to_replay(&r, &map(1024), 10_000).unwrap();
        assert_eq!(beyond, 1, "block 20000 is past the filesystem");
        assert_eq!(
            replay.blocks(),
            vec![
                (
                    100,
                    JournalCopy {
                        image_block: 5009,
                        escaped: false
                    }
                ),
                (
                    101,
                    JournalCopy {
                        image_block: 9000,
                        escaped: true
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_failed_recovery_is_an_error() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.start(4000, 1);
        let r = log.recover().unwrap();
        let err = to_replay(&r, &map(1024), 10_000).unwrap_err().to_string();
        assert!(err.contains("run e2fsck"), "{err}");
    }

    #[test]
    fn replaying_over_the_journal_is_refused() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(9005, filled(1024, 1))]);
        log.start(1, 1);
        let r = log.recover().unwrap();
        let err = to_replay(&r, &map(1024), 100_000).unwrap_err().to_string();
        assert!(err.contains("belongs to the journal"), "{err}");
    }

    /// A primary superblock (in a buffer starting at image byte 0) with
    /// the given features and a valid checksum when it has metadata_csum.
    fn fs_superblock(incompat: u32, ro_compat: u32) -> Vec<u8> {
        let mut b = filled(4096, 0x33);
        let sb = &mut b[1024..2048];
        put_le16(sb, FS_S_MAGIC, sys::EXT2_SUPER_MAGIC as u16);
        put_le32(sb, FS_S_FEATURE_INCOMPAT, incompat);
        put_le32(sb, FS_S_FEATURE_RO_COMPAT, ro_compat);
        let sum = crc::crc32c(!0, &sb[..FS_S_CHECKSUM]);
        put_le32(sb, FS_S_CHECKSUM, sum);
        b
    }

    fn incompat_of(b: &[u8], sb_at: usize) -> u32 {
        le32(b, sb_at + FS_S_FEATURE_INCOMPAT)
    }

    #[test]
    fn replayed_superblock_keeps_needs_recovery() {
        let recover = sys::EXT3_FEATURE_INCOMPAT_RECOVER;
        let csum = sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM;
        // 4 KiB blocks: the superblock is at 1024 in block 0.
        let mut b = fs_superblock(0x2c2, csum);
        let before = b.clone();
        assert!(keep_needs_recovery(&mut b, 0));
        assert_eq!(incompat_of(&b, 1024), 0x2c2 | recover);
        let sb = &b[1024..2048];
        let stored = le32(sb, FS_S_CHECKSUM);
        assert_eq!(stored, crc::crc32c(!0, &sb[..FS_S_CHECKSUM]));
        assert_ne!(stored.to_le_bytes(), before[1024 + FS_S_CHECKSUM..2048]);
        let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != before[i]).collect();
        let incompat_field = 1024 + FS_S_FEATURE_INCOMPAT..1024 + FS_S_FEATURE_INCOMPAT + 4;
        let checksum_field = 1024 + FS_S_CHECKSUM..2048;
        assert!(
            changed
                .iter()
                .all(|i| incompat_field.contains(i) || checksum_field.contains(i)),
            "changed bytes {changed:?}"
        );
        // Already set: untouched.
        let again = b.clone();
        assert!(!keep_needs_recovery(&mut b, 0));
        assert_eq!(b, again);

        // 1 KiB blocks: block 1 alone, at image offset 1024.
        let whole = fs_superblock(0x2, 0);
        let mut block1 = whole[1024..2048].to_vec();
        assert!(keep_needs_recovery(&mut block1, 1024));
        assert_eq!(incompat_of(&block1, 0), 0x2 | recover);
        assert_eq!(
            block1[FS_S_CHECKSUM..],
            whole[1024 + FS_S_CHECKSUM..2048],
            "no metadata_csum: the checksum field is left alone"
        );

        // Runs that do not hold the superblock, or hold no valid one.
        let mut later = fs_superblock(0x2, 0);
        assert!(!keep_needs_recovery(&mut later, 4096));
        assert!(!keep_needs_recovery(&mut later[..1024], 0));
        let mut no_magic = filled(4096, 0);
        assert!(!keep_needs_recovery(&mut no_magic, 0));
        assert!(no_magic.iter().all(|&x| x == 0));
    }

    #[test]
    fn an_empty_journal_replays_nothing() {
        let log = LogBuilder::new(1024, 1024, 0, 0);
        let r = log.recover().unwrap();
        let (replay, _) = to_replay(&r, &map(1024), 10_000).unwrap();
        assert!(replay.is_empty());
    }
}
