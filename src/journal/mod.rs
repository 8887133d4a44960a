//! The journal of an unclean ext3/ext4 filesystem, replayed in memory.
//!
//! A [`Replay`] says, for each filesystem block that recovery would
//! overwrite, where in the image its newest committed copy lies.  The
//! [`crate::image::Image`] consults it on every read, so the filesystem and
//! the served file look exactly as they would after `e2fsck` replayed the
//! journal, while the image itself is never written.
//!
//! [`load`] finds the journal inode, reads the journal through a caller's
//! block reader, and turns what [`recover`] computes into a [`Replay`].
//! The parsing and the recovery passes are pure (`superblock`, `block`,
//! `recovery`, `map`) and unit-tested with journals built in memory.

mod block;
mod crc;
mod map;
mod recovery;
mod superblock;
#[cfg(test)]
mod testlog;

use std::collections::HashMap;

use crate::error::{Errno, Error, Result};
use crate::ext2::{Filesystem, Layout};
use crate::nbdkit::report::{ext2_debug_journal, nbd_debug, nbd_error};
use crate::sys;

pub use map::JournalMap;
pub use recovery::{recover, EndReason, LogCopy, Recovery, ScanEnd, TransactionReport};
pub use superblock::{Features, Journal};

/// Where the replayed contents of one filesystem block come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalCopy {
    /// The image block (in filesystem blocks) holding the journal's copy.
    pub image_block: u64,
    /// JBD2 "escaped" the copy: its first four bytes were the journal magic
    /// and were zeroed when it was logged; they must be put back on read.
    pub escaped: bool,
}

/// The in-memory result of replaying a journal.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    copies: HashMap<u64, JournalCopy>,
}

/// The JBD2 magic number, big-endian on disk.
pub const JBD2_MAGIC: u32 = 0xc03b_3998;

impl Replay {
    pub fn from_copies(copies: HashMap<u64, JournalCopy>) -> Replay {
        Replay { copies }
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

/// Reads one filesystem block of the raw image: `read_block(image_block, buf)`.
pub type ReadBlock<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), Errno> + 'a;

/// Replays, in memory, the journal of `fs` (opened on the raw image) the
/// way `e2fsck` would, and says where each replayed block's copy lies.
///
/// `read_block(image_block, buf)` reads one filesystem block of the raw
/// image.  Nothing is written.  An empty journal (`s_start == 0`) gives an
/// empty replay.  Fails when the journal is external, unusable (e2fsck
/// would reset or delete it rather than replay it), holds fast commits, or
/// when recovery itself fails (e2fsck would then repair the filesystem,
/// which cannot be done in memory).  A transaction with a bad commit
/// checksum is dropped with everything after it, as recovery drops it, and
/// reported with `nbdkit_error`.
pub fn load(fs: &mut Filesystem, read_block: &ReadBlock) -> Result<Replay> {
    let (ino, map) = locate(fs)?;
    let block_size = fs.block_size();
    let mut read = |logical: u32| -> Result<Vec<u8>> {
        let image_block = map.image_block(logical).ok_or_else(|| {
            Error::other(
                Errno::EIO,
                format!("journal: log block {logical} is not mapped"),
            )
        })?;
        let mut buf = vec![0u8; block_size as usize];
        read_block(image_block, &mut buf).map_err(|errno| {
            Error::other(
                errno,
                format!("journal: reading log block {logical} (image block {image_block}) failed"),
            )
        })?;
        Ok(buf)
    };
    let recovery = recover(block_size, map.len(), &mut read)?;
    log_recovery(ino, &recovery);
    let (replay, beyond) = to_replay(&recovery, &map, fs.blocks_count())?;
    if beyond > 0 {
        nbd_debug!(
            ext2_debug_journal,
            "journal: ignored {beyond} logged blocks beyond the end of the filesystem"
        );
    }
    if recovery.needed() {
        let (first, end) = (recovery.first_transaction, recovery.end_transaction);
        if first == end {
            nbd_debug!(
                ext2_debug_journal,
                "journal: no committed transaction to replay"
            );
        } else {
            nbd_debug!(
                ext2_debug_journal,
                "journal: transactions {first} to {} replayed in memory: {} blocks",
                end.wrapping_sub(1),
                replay.len()
            );
        }
    }
    Ok(replay)
}

/// The internal journal's inode and block map.
fn locate(fs: &mut Filesystem) -> Result<(u32, JournalMap)> {
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
    let extents = crate::ext2::mapping::read_map(fs, inum, info.layout).map_err(context)?;
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
    nbd_debug!(
        ext2_debug_journal,
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
        nbd_debug!(
            ext2_debug_journal,
            "journal: the log is empty (s_start is 0): nothing to replay"
        );
        return;
    }
    for t in &r.transactions {
        nbd_debug!(
            ext2_debug_journal,
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
            nbd_debug!(
                ext2_debug_journal,
                "journal: transaction {} from log block {} is dropped, not committed: log block {} {}",
                end.sequence,
                end.transaction_block,
                end.log_block,
                end.reason
            );
        } else {
            nbd_debug!(
                ext2_debug_journal,
                "journal: the log ends before transaction {}: log block {} {}",
                end.sequence,
                end.log_block,
                end.reason
            );
        }
    }
    let scanned_to = r.scan_end.as_ref().map(|end| end.sequence);
    if r.failed_commit.is_none() && scanned_to.is_some_and(|seq| seq != r.end_transaction) {
        nbd_debug!(
            ext2_debug_journal,
            "journal: transactions {} and later are dropped: a commit block checksum \
             failed (async commit lets the scan go past it)",
            r.end_transaction
        );
    }
    if let Some(failed) = r.failed_commit {
        nbd_error!(
            "journal: transaction {failed} is corrupt (bad commit checksum): it and any later \
             transactions are not replayed, as e2fsck would do (e2fsck also marks the filesystem \
             as having errors)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::Extent;
    use crate::journal::testlog::{filled, LogBuilder};

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

    #[test]
    fn an_empty_journal_replays_nothing() {
        let log = LogBuilder::new(1024, 1024, 0, 0);
        let r = log.recover().unwrap();
        let (replay, _) = to_replay(&r, &map(1024), 10_000).unwrap();
        assert!(replay.is_empty());
    }
}
