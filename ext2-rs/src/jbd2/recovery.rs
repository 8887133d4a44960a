//! Journal recovery, computed instead of performed: which log block holds
//! the copy that recovery would write over each filesystem block.
//!
//! The rules are those of `e2fsck/recovery.c` in e2fsprogs 1.47.0 (the
//! kernel's `fs/jbd2/recovery.c`), which makes three passes over the log
//! from `s_start`, transaction `s_sequence` on:
//!
//! 1. **scan**: find the end of the log.  A transaction counts only when
//!    its commit block is found where expected, with the expected sequence
//!    number and, with checksums, a good checksum.  A bad commit checksum
//!    ends the log there (with async commit, the scan goes on and the last
//!    bad commit ends it).  A bad descriptor or revoke checksum ends the log
//!    quietly if the commit that follows is older than the previous one (a
//!    stale block left from before), and fails recovery otherwise.
//! 2. **revoke**: collect revoke records, each block keeping the newest
//!    transaction that revoked it.
//! 3. **replay**: every tagged copy in a committed transaction is written,
//!    later ones over earlier ones, unless its block was revoked by the same
//!    or a later transaction, or (v2/v3) the copy fails its tag checksum.
//!
//! Nothing here reads the image or logs anything: the caller passes a
//! function that reads a journal block by its logical number, so all of it
//! is unit-tested with journals built in memory.

use std::collections::HashMap;
use std::fmt;

use crate::crc::crc32_be;
use crate::error::{Errno, Error, Result};
use crate::format::le16;
use crate::jbd2::block::commit_checksum_ok;
use crate::jbd2::block::{
    count_tags, revoke_records, tag_checksum_ok, tags, tail_checksum_ok, Commit, Header,
    COMMIT_BLOCK, DESCRIPTOR_BLOCK, REVOKE_BLOCK,
};
use crate::jbd2::superblock::Journal;

/// The fast-commit tag that opens a fast commit (little-endian, unlike
/// everything else in the journal).
const FC_TAG_HEAD: u16 = 9;

/// Where recovery would take the contents of one filesystem block from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCopy {
    /// Logical block of the journal holding the copy.
    pub log_block: u32,
    /// The copy's first four bytes must be put back to the journal magic.
    pub escaped: bool,
    /// The transaction the copy belongs to.
    pub sequence: u32,
}

/// What recovery did with one committed transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransactionReport {
    pub sequence: u32,
    /// Log block of its first block.
    pub log_block: u64,
    /// Copies written over their filesystem blocks.
    pub replayed: usize,
    /// Copies skipped because a revoke record (in this or a later
    /// transaction) covers their block.
    pub skipped_revoked: usize,
    /// Copies skipped because their tag checksum is wrong.
    pub bad_checksums: usize,
    /// Revoke records this transaction carries.
    pub revoke_records: usize,
}

/// Why the scan stopped looking for more transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The next block is not a journal block: the normal end of the log.
    NoMagic,
    /// The next block belongs to another transaction (an older lap of the
    /// circular log).
    OtherSequence(u32),
    /// The next block has a type recovery does not know.
    UnknownBlockType(u32),
    /// The commit block's checksum is wrong: the transaction is corrupt.
    BadCommitChecksum,
    /// A block failed its checksum and the commit after it is older than
    /// the previous one: stale blocks from an earlier use of the log.
    StaleBlock,
    /// A copy needed for the v1 checksum lies outside the journal.
    UnreadableCopy,
}

impl fmt::Display for EndReason {
    /// Says what the block where the scan stopped is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::NoMagic => f.write_str("is not a journal block"),
            EndReason::OtherSequence(seq) => write!(f, "belongs to transaction {seq}"),
            EndReason::UnknownBlockType(t) => write!(f, "has unknown block type {t}"),
            EndReason::BadCommitChecksum => f.write_str("is a commit block with a bad checksum"),
            EndReason::StaleBlock => {
                f.write_str("is an older commit block after blocks with bad checksums (stale)")
            }
            EndReason::UnreadableCopy => {
                f.write_str("is a descriptor announcing copies outside the journal")
            }
        }
    }
}

/// Where and why the scan pass stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// The transaction the scan was looking for when it stopped.
    pub sequence: u32,
    /// The log block where that transaction begins.
    pub transaction_block: u64,
    /// The log block the scan stopped at.
    pub log_block: u64,
    pub reason: EndReason,
    /// Blocks of that transaction were already found: it is incomplete
    /// (uncommitted or corrupt) and dropped, not merely absent.
    pub incomplete: bool,
}

/// The outcome of recovering a journal in memory.
#[derive(Debug)]
pub struct Recovery {
    pub journal: Journal,
    /// The first transaction in the log (`s_sequence`).
    pub first_transaction: u32,
    /// The first transaction not replayed.
    pub end_transaction: u32,
    /// Where the scan stopped; `None` when the journal was empty.
    pub scan_end: Option<ScanEnd>,
    /// A transaction whose commit checksum failed: it and all later ones
    /// are dropped, and e2fsck marks the filesystem as having errors.
    pub failed_commit: Option<u32>,
    /// The transactions replayed, in log order.
    pub transactions: Vec<TransactionReport>,
    /// For each filesystem block recovery writes, the copy it ends up with.
    pub copies: HashMap<u64, LogCopy>,
    /// Recovery failed (e2fsck would report this error and then repair the
    /// filesystem in a full check).  `copies` holds what was written before.
    pub failure: Option<Error>,
}

impl Recovery {
    /// Whether there was anything to replay (`s_start != 0`).
    pub fn needed(&self) -> bool {
        self.journal.start != 0
    }

    /// The journal's `s_sequence` once recovery has marked it empty: the
    /// log restarts after the last transaction recovery looked at, so no
    /// commit block left in it can pass for a new one.  That is
    /// `++info.end_transaction` in `jbd2_journal_recover` (or `s_sequence +
    /// 1` for an empty log), which `e2fsck_journal_release` writes out.
    pub fn next_sequence(&self) -> u32 {
        if self.needed() {
            self.end_transaction.wrapping_add(1)
        } else {
            self.journal.sequence.wrapping_add(1)
        }
    }

    /// Why e2fsck, having replayed this journal, would mark the filesystem
    /// as having errors and check it in full: a transaction was dropped for
    /// a bad commit checksum (`recover_ext3_journal` records `-EINVAL` in
    /// `s_errno`), or the journal already records an error (`s_errno`), which
    /// `e2fsck_check_ext3_journal` turns into `EXT2_ERROR_FS`.
    pub fn leaves_errors(&self) -> Option<String> {
        if let Some(failed) = self.failed_commit {
            Some(format!(
                "journal transaction {failed} is corrupt (bad commit checksum)"
            ))
        } else if self.journal.errno != 0 {
            Some(format!(
                "the journal records error {} (it was aborted)",
                self.journal.errno
            ))
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Scan,
    Revoke,
    Replay,
}

/// Why a pass stopped early.
enum Stop {
    /// Recovery fails, as it would in e2fsck.
    Failed(Error),
    /// Reading the image failed: not a property of the journal.
    Io(Error),
}

fn failed(message: impl fmt::Display) -> Stop {
    Stop::Failed(Error::other(Errno::EIO, format!("journal: {message}")))
}

/// Transaction ids compare modulo 2^32, as `tid_gt` / `tid_geq` do.
fn tid_gt(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) > 0
}

fn tid_geq(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) >= 0
}

struct Recoverer<'a> {
    journal: Journal,
    read: &'a mut dyn FnMut(u32) -> Result<Vec<u8>>,
    /// First transaction not to replay; 0 stands for "not known yet", a
    /// convention of recovery.c that we keep for identical behaviour.
    end_transaction: u32,
    /// 0 for none, as in recovery.c.
    failed_commit: u32,
    scan_end: Option<ScanEnd>,
    /// Block -> newest transaction revoking it.
    revoked: HashMap<u64, u32>,
    revokes_per_transaction: HashMap<u32, usize>,
    copies: HashMap<u64, LogCopy>,
    transactions: Vec<TransactionReport>,
}

impl Recoverer<'_> {
    /// Reads log block `pos`, which must lie inside the journal (`jread`).
    fn read_log(&mut self, pos: u64) -> Result<Vec<u8>, Stop> {
        let logical = self.check_in_journal(pos)?;
        let block = (self.read)(logical).map_err(Stop::Io)?;
        if block.len() != self.journal.block_size {
            return Err(Stop::Io(Error::other(
                Errno::EIO,
                format!(
                    "journal: reading log block {logical} returned {} bytes",
                    block.len()
                ),
            )));
        }
        Ok(block)
    }

    fn check_in_journal(&self, pos: u64) -> Result<u32, Stop> {
        match u32::try_from(pos) {
            Ok(logical) if logical < self.journal.len => Ok(logical),
            _ => Err(failed(format!(
                "log block {pos} lies beyond the journal's {} blocks: the journal superblock is corrupt",
                self.journal.len
            ))),
        }
    }

    fn is_revoked(&self, block: u64, sequence: u32) -> bool {
        self.revoked
            .get(&block)
            .is_some_and(|&newest| !tid_gt(sequence, newest))
    }

    fn revoke(&mut self, block: u64, sequence: u32) {
        self.revoked
            .entry(block)
            .and_modify(|newest| {
                if tid_gt(sequence, *newest) {
                    *newest = sequence
                }
            })
            .or_insert(sequence);
    }

    /// Adds a descriptor block and the copies it announces to the v1
    /// (whole-transaction CRC32) checksum; `false` if a copy lies outside
    /// the journal, which ends the log.
    fn sum_v1(&mut self, descriptor: &[u8], pos: &mut u64, crc: &mut u32) -> Result<bool, Stop> {
        *crc = crc32_be(*crc, descriptor);
        for _ in 0..count_tags(&self.journal, descriptor) {
            let at = *pos;
            *pos = self.journal.wrap(*pos + 1);
            match self.read_log(at) {
                Ok(copy) => *crc = crc32_be(*crc, &copy),
                Err(Stop::Failed(_)) => return Ok(false),
                Err(io) => return Err(io),
            }
        }
        Ok(true)
    }

    /// One pass over the log.
    fn walk(&mut self, pass: Pass) -> Result<(), Stop> {
        let j = self.journal.clone();
        let mut next_id = j.sequence;
        let mut pos = u64::from(j.start);
        // The v1 checksum of the transaction so far.
        let mut crc_v1: u32 = !0;
        // A descriptor or revoke block failed its checksum in the scan:
        // the next commit decides between stale and corrupt.
        let mut need_check_commit_time = false;
        let mut last_commit_time = 0u64;
        // Recovery goes on past these, but fails at the end.
        let mut deferred: Option<Stop> = None;
        let mut report = TransactionReport {
            sequence: next_id,
            log_block: pos,
            ..TransactionReport::default()
        };
        let mut incomplete = false;
        let mut transaction_block = pos;

        let (stopped_at, reason) = loop {
            if pass != Pass::Scan && tid_geq(next_id, self.end_transaction) {
                break (pos, None);
            }
            let at = pos;
            let block = self.read_log(at)?;
            pos = j.wrap(pos + 1);
            let Some(header) = Header::parse(&block) else {
                break (at, Some(EndReason::NoMagic));
            };
            if header.sequence != next_id {
                break (at, Some(EndReason::OtherSequence(header.sequence)));
            }
            match header.block_type {
                DESCRIPTOR_BLOCK => {
                    incomplete = true;
                    if !tail_checksum_ok(&j, &block) {
                        if pass != Pass::Scan {
                            return Err(failed(format!(
                                "descriptor block at log block {at} (transaction {next_id}) has a bad checksum"
                            )));
                        }
                        need_check_commit_time = true;
                    }
                    if pass != Pass::Replay {
                        if pass == Pass::Scan
                            && j.features.checksum_v1()
                            && !need_check_commit_time
                            && self.end_transaction == 0
                        {
                            if !self.sum_v1(&block, &mut pos, &mut crc_v1)? {
                                break (at, Some(EndReason::UnreadableCopy));
                            }
                            continue;
                        }
                        pos = j.wrap(pos + count_tags(&j, &block));
                        continue;
                    }
                    for tag in tags(&j, &block) {
                        let copy_at = pos;
                        pos = j.wrap(pos + 1);
                        // Recovery reads every copy; only a checksum needs
                        // its bytes, so without one we just check the range.
                        let data = if j.features.csum_v2_or_v3() {
                            match self.read_log(copy_at) {
                                Ok(data) => Some(data),
                                Err(Stop::Failed(e)) => {
                                    deferred = Some(Stop::Failed(e));
                                    continue;
                                }
                                Err(io) => return Err(io),
                            }
                        } else {
                            if let Err(e) = self.check_in_journal(copy_at) {
                                deferred = Some(e);
                                continue;
                            }
                            None
                        };
                        if self.is_revoked(tag.block, next_id) {
                            report.skipped_revoked += 1;
                            continue;
                        }
                        if let Some(data) = &data {
                            if !tag_checksum_ok(&j, &tag, data, header.sequence) {
                                report.bad_checksums += 1;
                                deferred = Some(failed(format!(
                                    "the copy of block {} at log block {copy_at} (transaction {next_id}) has a bad checksum",
                                    tag.block
                                )));
                                continue;
                            }
                        }
                        self.copies.insert(
                            tag.block,
                            LogCopy {
                                log_block: copy_at as u32,
                                escaped: tag.escaped(),
                                sequence: next_id,
                            },
                        );
                        report.replayed += 1;
                    }
                    continue;
                }
                COMMIT_BLOCK => {
                    let commit = Commit::parse(&block);
                    if need_check_commit_time {
                        if commit.time >= last_commit_time {
                            return Err(failed(format!(
                                "transaction {next_id} has a block with a bad checksum"
                            )));
                        }
                        break (at, Some(EndReason::StaleBlock));
                    }
                    let mut bad = false;
                    if pass == Pass::Scan && j.features.checksum_v1() {
                        if self.end_transaction != 0 {
                            self.failed_commit = self.end_transaction;
                            break (at, Some(EndReason::BadCommitChecksum));
                        }
                        if commit.v1_checksum_ok(crc_v1) {
                            crc_v1 = !0;
                        } else {
                            bad = true;
                        }
                    }
                    if !bad && pass == Pass::Scan && !commit_checksum_ok(&j, &block) {
                        bad = true;
                    }
                    if bad {
                        if commit.time < last_commit_time {
                            break (at, Some(EndReason::StaleBlock));
                        }
                        self.end_transaction = next_id;
                        if !j.features.async_commit() {
                            self.failed_commit = next_id;
                            break (at, Some(EndReason::BadCommitChecksum));
                        }
                    }
                    if pass == Pass::Scan {
                        last_commit_time = commit.time;
                    }
                    if pass == Pass::Replay {
                        report.revoke_records = self
                            .revokes_per_transaction
                            .get(&next_id)
                            .copied()
                            .unwrap_or(0);
                        self.transactions.push(report);
                    }
                    next_id = next_id.wrapping_add(1);
                    report = TransactionReport {
                        sequence: next_id,
                        log_block: pos,
                        ..TransactionReport::default()
                    };
                    incomplete = false;
                    transaction_block = pos;
                    continue;
                }
                REVOKE_BLOCK => {
                    incomplete = true;
                    if pass == Pass::Scan && !tail_checksum_ok(&j, &block) {
                        need_check_commit_time = true;
                    }
                    if pass != Pass::Revoke {
                        continue;
                    }
                    let records = revoke_records(&j, &block).map_err(|msg| {
                        failed(format!("log block {at} (transaction {next_id}): {msg}"))
                    })?;
                    *self.revokes_per_transaction.entry(next_id).or_default() += records.len();
                    for block in records {
                        self.revoke(block, next_id);
                    }
                    continue;
                }
                other => break (at, Some(EndReason::UnknownBlockType(other))),
            }
        };

        if pass == Pass::Scan {
            if self.end_transaction == 0 {
                self.end_transaction = next_id;
            }
            self.scan_end = reason.map(|reason| ScanEnd {
                sequence: next_id,
                transaction_block,
                log_block: stopped_at,
                reason,
                incomplete,
            });
        } else if self.end_transaction != next_id && deferred.is_none() {
            deferred = Some(failed(format!(
                "a recovery pass ended at transaction {next_id}, the scan at {}",
                self.end_transaction
            )));
        }
        match deferred {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }

    /// Refuses a journal with fast commits to replay: those are logical
    /// operations (extents, links, inodes) we do not redo.
    fn check_fast_commits(&mut self) -> Result<(), Stop> {
        let Some(area) = self.journal.fast_commit.clone() else {
            return Ok(());
        };
        let block = self.read_log(u64::from(*area.start()))?;
        if le16(&block, 0) == FC_TAG_HEAD {
            return Err(Stop::Io(Error::other(
                Errno::ENOTSUP,
                "journal: the journal holds fast commits, which this filter cannot replay \
                 (run e2fsck on the image)",
            )));
        }
        Ok(())
    }
}

/// Recovers, in memory, the journal whose logical blocks `read` returns
/// (each exactly `block_size` bytes; block 0 is the journal superblock).
/// `journal_blocks` is the journal inode's size in blocks.
///
/// Errors: the journal superblock is unusable (e2fsck would repair or drop
/// the journal rather than replay it), the journal holds fast commits, or
/// `read` failed.  A journal that recovery fails on partway is not an
/// error here: it is reported in [`Recovery::failure`].
pub fn recover(
    block_size: u32,
    journal_blocks: u32,
    read: &mut dyn FnMut(u32) -> Result<Vec<u8>>,
) -> Result<Recovery> {
    let superblock = read(0)?;
    let journal = Journal::parse(&superblock, block_size, journal_blocks)?;
    let mut r = Recoverer {
        journal,
        read,
        end_transaction: 0,
        failed_commit: 0,
        scan_end: None,
        revoked: HashMap::new(),
        revokes_per_transaction: HashMap::new(),
        copies: HashMap::new(),
        transactions: Vec::new(),
    };
    let outcome = if r.journal.start == 0 {
        r.end_transaction = r.journal.sequence;
        Ok(())
    } else {
        r.check_fast_commits()
            .and_then(|()| r.walk(Pass::Scan))
            .and_then(|()| r.walk(Pass::Revoke))
            .and_then(|()| r.walk(Pass::Replay))
    };
    let failure = match outcome {
        Ok(()) => None,
        Err(Stop::Failed(e)) => Some(e),
        Err(Stop::Io(e)) => return Err(e),
    };
    Ok(Recovery {
        first_transaction: r.journal.sequence,
        end_transaction: r.end_transaction,
        scan_end: r.scan_end,
        failed_commit: (r.failed_commit != 0).then_some(r.failed_commit),
        transactions: r.transactions,
        copies: r.copies,
        failure,
        journal: r.journal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jbd2::superblock::{
        COMPAT_CHECKSUM, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3,
        INCOMPAT_FAST_COMMIT, INCOMPAT_REVOKE,
    };
    use crate::jbd2::testlog::{filled, LogBuilder};
    use crate::jbd2::JBD2_MAGIC;

    fn copy(log_block: u32, sequence: u32) -> LogCopy {
        LogCopy {
            log_block,
            escaped: false,
            sequence,
        }
    }

    fn ok(log: &LogBuilder) -> Recovery {
        let r = log.recover().expect("recover");
        assert!(r.failure.is_none(), "unexpected failure: {:?}", r.failure);
        r
    }

    #[test]
    fn committed_transaction_is_replayed() {
        let mut log = LogBuilder::new(4096, 1024, 0, 0);
        let at = log.transaction(1, &[(100, filled(4096, 1)), (101, filled(4096, 2))]);
        log.start(1, 1);
        let r = ok(&log);
        assert!(r.needed());
        assert_eq!(at, vec![2, 3]);
        assert_eq!(r.copies.len(), 2);
        assert_eq!(r.copies[&100], copy(2, 1));
        assert_eq!(r.copies[&101], copy(3, 1));
        assert_eq!((r.first_transaction, r.end_transaction), (1, 2));
        assert_eq!(r.transactions.len(), 1);
        assert_eq!(r.transactions[0].replayed, 2);
        assert_eq!(r.transactions[0].log_block, 1);
        let end = r.scan_end.unwrap();
        assert_eq!(
            (end.sequence, end.transaction_block, end.log_block),
            (2, 5, 5)
        );
        assert_eq!(end.reason, EndReason::NoMagic);
        assert!(!end.incomplete);
        assert_eq!(r.failed_commit, None);
    }

    #[test]
    fn next_sequence_follows_the_last_transaction_looked_at() {
        // Committed 1 and 2, uncommitted 3: the log restarts at 4, past
        // the uncommitted transaction's blocks.
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        log.transaction(2, &[(101, filled(1024, 2))]);
        log.descriptor(3, &[(102, filled(1024, 3))]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.end_transaction, 3);
        assert_eq!(r.next_sequence(), 4);
        assert_eq!(r.leaves_errors(), None);

        // An empty log (s_start == 0) still moves on by one.
        let mut empty = LogBuilder::new(1024, 1024, 0, 0);
        empty.start(0, 41);
        let r = ok(&empty);
        assert!(!r.needed());
        assert_eq!(r.next_sequence(), 42);

        // Transaction ids wrap.
        let mut wrap = LogBuilder::new(1024, 1024, 0, 0);
        wrap.transaction(u32::MAX, &[(100, filled(1024, 1))]);
        wrap.start(1, u32::MAX);
        let r = ok(&wrap);
        assert_eq!((r.end_transaction, r.next_sequence()), (0, 1));
    }

    #[test]
    fn a_corrupt_transaction_or_journal_error_leaves_errors() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let bad = log.transaction(2, &[(101, filled(1024, 2))])[0] + 1;
        log.blocks[bad as usize][60] ^= 1;
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.failed_commit, Some(2));
        assert_eq!(r.next_sequence(), 3);
        assert!(r
            .leaves_errors()
            .unwrap()
            .contains("transaction 2 is corrupt"));

        let mut aborted = LogBuilder::new(1024, 1024, 0, 0);
        aborted.transaction(1, &[(100, filled(1024, 1))]);
        aborted.blocks[0][0x20..0x24].copy_from_slice(&(-5i32).to_be_bytes());
        aborted.start(1, 1);
        let r = ok(&aborted);
        assert!(r.leaves_errors().unwrap().contains("error -5"));
    }

    #[test]
    fn empty_journal_replays_nothing() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        // s_start == 0: the log is clean whatever it holds.
        let r = ok(&log);
        assert!(!r.needed());
        assert!(r.copies.is_empty());
        assert!(r.scan_end.is_none());
    }

    #[test]
    fn uncommitted_tail_is_dropped() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        log.transaction(5, &[(100, filled(1024, 1))]);
        log.descriptor(6, &[(100, filled(1024, 9)), (200, filled(1024, 9))]);
        log.revoke(6, &[100]);
        log.start(1, 5);
        let r = ok(&log);
        assert_eq!(r.copies.len(), 1);
        assert_eq!(r.copies[&100], copy(2, 5));
        assert_eq!(r.end_transaction, 6);
        let end = r.scan_end.unwrap();
        assert_eq!(end.sequence, 6);
        assert_eq!((end.transaction_block, end.log_block), (4, 8));
        assert!(end.incomplete);
        assert_eq!(end.reason, EndReason::NoMagic);
    }

    #[test]
    fn later_copies_win() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(100, filled(1024, 1)), (101, filled(1024, 1))]);
        let second = log.transaction(2, &[(100, filled(1024, 2))]);
        // The same block twice in one transaction: the second copy wins.
        let third = log.transaction(3, &[(101, filled(1024, 3)), (101, filled(1024, 4))]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies[&100], copy(second[0], 2));
        assert_eq!(r.copies[&101], copy(third[1], 3));
        assert_eq!(r.transactions.len(), 3);
    }

    #[test]
    fn revoked_blocks_are_skipped_up_to_the_revoking_transaction() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        let first = log.transaction(1, &[(100, filled(1024, 1)), (101, filled(1024, 1))]);
        // Transaction 2 revokes 100 and 102, and logs 102 after revoking it
        // in the same transaction: revoked too (revoke sequence >= copy's).
        log.revoke(2, &[100, 102]);
        log.descriptor(2, &[(102, filled(1024, 2))]);
        log.commit(2);
        let third = log.transaction(3, &[(100, filled(1024, 3))]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(
            r.copies[&100],
            copy(third[0], 3),
            "a later copy survives the revoke"
        );
        assert_eq!(r.copies[&101], copy(first[1], 1));
        assert!(!r.copies.contains_key(&102));
        let reports = &r.transactions;
        assert_eq!(reports[0].skipped_revoked, 1);
        assert_eq!(reports[1].skipped_revoked, 1);
        assert_eq!(reports[1].revoke_records, 2);
        assert_eq!(reports[2].replayed, 1);
    }

    #[test]
    fn revoke_in_an_uncommitted_transaction_is_ignored() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        let first = log.transaction(1, &[(100, filled(1024, 1))]);
        log.revoke(2, &[100]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies[&100], copy(first[0], 1));
    }

    #[test]
    fn newest_revoke_counts() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        log.revoke(1, &[100]);
        log.commit(1);
        log.transaction(2, &[(100, filled(1024, 2))]);
        log.revoke(3, &[100]);
        log.commit(3);
        log.revoke(4, &[100]);
        log.commit(4);
        log.start(1, 1);
        let r = ok(&log);
        assert!(r.copies.is_empty());
        assert_eq!(r.transactions[1].skipped_revoked, 1);
    }

    #[test]
    fn log_wraps_around() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.at(1020);
        let copies: Vec<(u64, Vec<u8>)> =
            (0..6).map(|i| (500 + i, filled(1024, i as u8))).collect();
        let at = log.transaction(7, &copies);
        assert_eq!(at, vec![1021, 1022, 1023, 1, 2, 3]);
        // The next transaction starts after the commit at block 4.
        let next = log.transaction(8, &[(500, filled(1024, 99))]);
        assert_eq!(next, vec![6]);
        log.start(1020, 7);
        let r = ok(&log);
        assert_eq!(r.copies[&501], copy(1022, 7));
        assert_eq!(r.copies[&505], copy(3, 7));
        assert_eq!(r.copies[&500], copy(6, 8));
        assert_eq!(r.end_transaction, 9);
    }

    #[test]
    fn older_lap_of_the_log_ends_it() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        // An old transaction 3 left at block 4, then the log restarts at 1
        // with transaction 10 ending at block 3.
        log.at(4).transaction(3, &[(100, filled(1024, 3))]);
        log.at(1).transaction(10, &[(100, filled(1024, 10))]);
        log.start(1, 10);
        let r = ok(&log);
        assert_eq!(r.copies[&100], copy(2, 10));
        let end = r.scan_end.unwrap();
        assert_eq!(end.reason, EndReason::OtherSequence(3));
        assert!(!end.incomplete);
    }

    #[test]
    fn escaped_copy() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        let mut data = filled(1024, 0x42);
        data[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        let at = log.transaction(1, &[(100, data), (101, filled(1024, 1))]);
        log.start(1, 1);
        assert_eq!(&log.blocks[at[0] as usize][..4], &[0; 4], "logged escaped");
        let r = ok(&log);
        assert!(r.copies[&100].escaped);
        assert!(!r.copies[&101].escaped);
    }

    #[test]
    fn tags_64bit() {
        let mut log = LogBuilder::new(4096, 1024, INCOMPAT_64BIT | INCOMPAT_REVOKE, 0);
        let high = 0x1_2345_6789u64;
        let at = log.transaction(1, &[(high, filled(4096, 1)), (high + 1, filled(4096, 2))]);
        log.revoke(2, &[high + 1]);
        log.commit(2);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies[&high], copy(at[0], 1));
        assert!(!r.copies.contains_key(&(high + 1)));
        assert!(!r.copies.contains_key(&0x2345_6789));
    }

    #[test]
    fn checksum_v3_good_journal() {
        let mut log = LogBuilder::new(
            4096,
            1024,
            INCOMPAT_CSUM_V3 | INCOMPAT_64BIT | INCOMPAT_REVOKE,
            0,
        );
        let first = log.transaction(1, &[(100, filled(4096, 1)), (101, filled(4096, 1))]);
        log.revoke(2, &[101]);
        log.commit(2);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies[&100], copy(first[0], 1));
        assert!(!r.copies.contains_key(&101));
    }

    #[test]
    fn bad_commit_checksum_drops_that_transaction_and_later_ones() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3, 0);
        let first = log.transaction(1, &[(100, filled(1024, 1))]);
        log.descriptor(2, &[(100, filled(1024, 2)), (101, filled(1024, 2))]);
        let bad = log.commit(2);
        log.transaction(3, &[(102, filled(1024, 3))]);
        log.blocks[bad as usize][60] ^= 1;
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies.len(), 1);
        assert_eq!(r.copies[&100], copy(first[0], 1));
        assert_eq!(r.failed_commit, Some(2));
        assert_eq!(r.end_transaction, 2);
        let end = r.scan_end.unwrap();
        assert_eq!(end.reason, EndReason::BadCommitChecksum);
        assert!(end.incomplete);
    }

    #[test]
    fn async_commit_scans_past_a_bad_commit() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3 | INCOMPAT_ASYNC_COMMIT, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        log.descriptor(2, &[(101, filled(1024, 2))]);
        let bad = log.commit(2);
        log.transaction(3, &[(102, filled(1024, 3))]);
        log.blocks[bad as usize][60] ^= 1;
        log.start(1, 1);
        let r = ok(&log);
        // The scan reaches the end of the log, but the replay stops before
        // the corrupt transaction; no failed commit is recorded.
        assert_eq!(r.end_transaction, 2);
        assert_eq!(r.failed_commit, None);
        assert_eq!(r.copies.keys().copied().collect::<Vec<_>>(), vec![100]);
        assert_eq!(r.scan_end.unwrap().sequence, 4);
    }

    #[test]
    fn stale_commit_with_bad_checksum_ends_the_log_quietly() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3, 0);
        log.time = 500;
        log.transaction(1, &[(100, filled(1024, 1))]);
        // A commit older than the previous one with a bad checksum is a
        // leftover: the log ends, nothing fails.
        log.time = 10;
        log.descriptor(2, &[(101, filled(1024, 2))]);
        let bad = log.commit(2);
        log.blocks[bad as usize][60] ^= 1;
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies.len(), 1);
        assert_eq!(r.failed_commit, None);
        assert_eq!(r.scan_end.unwrap().reason, EndReason::StaleBlock);
    }

    #[test]
    fn bad_descriptor_checksum_fails_unless_stale() {
        for (time, fails) in [(2000u64, true), (10, false)] {
            let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3, 0);
            log.time = 1000;
            log.transaction(1, &[(100, filled(1024, 1))]);
            log.time = time;
            let desc = log.pos;
            log.transaction(2, &[(101, filled(1024, 2))]);
            log.blocks[desc as usize][40] ^= 1;
            log.start(1, 1);
            let r = log.recover().unwrap();
            if fails {
                let msg = r.failure.expect("recovery fails").to_string();
                assert!(msg.contains("bad checksum"), "{msg}");
                assert!(r.copies.is_empty(), "nothing replayed when the scan fails");
            } else {
                assert!(r.failure.is_none());
                assert_eq!(r.copies.keys().copied().collect::<Vec<_>>(), vec![100]);
                assert_eq!(r.scan_end.unwrap().reason, EndReason::StaleBlock);
            }
        }
    }

    #[test]
    fn bad_revoke_checksum_fails_like_a_descriptor() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3 | INCOMPAT_REVOKE, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let revoke = log.revoke(2, &[100]);
        log.commit(2);
        log.blocks[revoke as usize][17] ^= 1;
        log.start(1, 1);
        let r = log.recover().unwrap();
        assert!(r.failure.is_some());
    }

    #[test]
    fn bad_tag_checksum_skips_only_that_copy_but_fails_recovery() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V3, 0);
        let at = log.transaction(1, &[(100, filled(1024, 1)), (101, filled(1024, 1))]);
        log.blocks[at[0] as usize][5] ^= 1;
        log.start(1, 1);
        let r = log.recover().unwrap();
        let msg = r
            .failure
            .expect("recovery reports the bad copy")
            .to_string();
        assert!(msg.contains("copy of block 100"), "{msg}");
        assert_eq!(r.copies.keys().copied().collect::<Vec<_>>(), vec![101]);
        assert_eq!(r.transactions[0].bad_checksums, 1);
    }

    #[test]
    fn checksum_v2_tags() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_CSUM_V2, 0);
        let at = log.transaction(1, &[(100, filled(1024, 1)), (101, filled(1024, 2))]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies[&101], copy(at[1], 1));
        log.blocks[at[1] as usize][9] ^= 1;
        assert!(log.recover().unwrap().failure.is_some());
    }

    #[test]
    fn checksum_v1_whole_transaction() {
        let mut log = LogBuilder::new(1024, 1024, 0, COMPAT_CHECKSUM);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let at = log.transaction(2, &[(101, filled(1024, 2)), (102, filled(1024, 2))]);
        log.transaction(3, &[(103, filled(1024, 3))]);
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies.len(), 4);
        // Corrupt a copy of transaction 2: its commit checksum no longer
        // matches, so 2 and 3 are dropped.
        log.blocks[at[1] as usize][7] ^= 1;
        let r = ok(&log);
        assert_eq!(r.failed_commit, Some(2));
        assert_eq!(r.copies.keys().copied().collect::<Vec<_>>(), vec![100]);
    }

    #[test]
    fn checksum_v1_unused_checksum_is_accepted() {
        let mut log = LogBuilder::new(1024, 1024, 0, COMPAT_CHECKSUM);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let commit = log.pos - 1;
        log.blocks[commit as usize][12..20].fill(0);
        log.start(1, 1);
        assert_eq!(ok(&log).copies.len(), 1);
    }

    #[test]
    fn several_descriptors_in_one_transaction() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        let a = log.descriptor(4, &[(100, filled(1024, 1))]);
        let b = log.descriptor(4, &[(200, filled(1024, 2)), (201, filled(1024, 2))]);
        log.commit(4);
        log.start(1, 4);
        let r = ok(&log);
        assert_eq!(r.copies[&100], copy(a[0], 4));
        assert_eq!(r.copies[&201], copy(b[1], 4));
        assert_eq!(r.transactions[0].replayed, 3);
    }

    #[test]
    fn transaction_ids_wrap() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        log.transaction(u32::MAX, &[(100, filled(1024, 1)), (101, filled(1024, 1))]);
        // Transaction 0 comes after u32::MAX and its revoke covers it.
        log.revoke(0, &[101]);
        let at = log.transaction(0, &[(102, filled(1024, 2))]);
        log.start(1, u32::MAX);
        let r = ok(&log);
        assert_eq!(r.end_transaction, 1);
        assert!(r.copies.contains_key(&100));
        assert!(!r.copies.contains_key(&101));
        assert_eq!(r.copies[&102], copy(at[0], 0));
    }

    #[test]
    fn unknown_block_type_ends_the_log() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let mut odd = vec![0u8; 1024];
        odd[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        odd[4..8].copy_from_slice(&77u32.to_be_bytes());
        odd[8..12].copy_from_slice(&2u32.to_be_bytes());
        let at = log.pos as usize;
        log.blocks[at] = odd;
        log.start(1, 1);
        let r = ok(&log);
        assert_eq!(r.copies.len(), 1);
        assert_eq!(r.scan_end.unwrap().reason, EndReason::UnknownBlockType(77));
    }

    #[test]
    fn start_beyond_the_journal_fails_recovery() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.start(5000, 1);
        let r = log.recover().unwrap();
        assert!(r
            .failure
            .unwrap()
            .to_string()
            .contains("beyond the journal"));
    }

    #[test]
    fn oversized_revoke_count_fails_recovery() {
        let mut log = LogBuilder::new(1024, 1024, INCOMPAT_REVOKE, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        let revoke = log.revoke(2, &[100]);
        log.commit(2);
        log.blocks[revoke as usize][12..16].copy_from_slice(&4000u32.to_be_bytes());
        log.start(1, 1);
        let r = log.recover().unwrap();
        assert!(r.failure.unwrap().to_string().contains("revoke block"));
        assert!(r.copies.is_empty());
    }

    #[test]
    fn fast_commits_are_refused_only_when_present() {
        let mut log = LogBuilder::new(1024, 2048, INCOMPAT_FAST_COMMIT, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        log.start(1, 1);
        assert_eq!(ok(&log).copies.len(), 1);
        let fc_first = *log.journal.fast_commit.clone().unwrap().start() as usize;
        log.blocks[fc_first][..2].copy_from_slice(&9u16.to_le_bytes());
        let err = log.recover().unwrap_err();
        assert!(err.to_string().contains("fast commits"), "{err}");
    }

    #[test]
    fn read_errors_are_errors() {
        let mut log = LogBuilder::new(1024, 1024, 0, 0);
        log.transaction(1, &[(100, filled(1024, 1))]);
        log.start(1, 1);
        let mut read = |logical: u32| -> Result<Vec<u8>> {
            if logical == 3 {
                Err(Error::reported(Errno::EIO))
            } else {
                Ok(log.blocks[logical as usize].clone())
            }
        };
        assert!(recover(1024, 1024, &mut read).is_err());
    }
}
