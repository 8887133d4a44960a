//! Writing transactions into a JBD2 log: the other half of `recovery`.
//!
//! [`write_transaction`] lays out one transaction exactly as the kernel's
//! `jbd2_journal_commit_transaction` does: revoke blocks first, then
//! descriptor blocks each followed by the copies its tags announce, then a
//! commit block.  Every flavour the parser reads is written: 32- and 64-bit
//! block numbers, checksum v1 (CRC32 of the descriptors and copies in the
//! commit block), v2 and v3 (CRC32C of each tag's copy, of each descriptor
//! and revoke block's tail, of the commit block), and copies that start
//! with the JBD2 magic are escaped.  Nothing here does I/O: the caller
//! writes the log blocks, makes them durable, then writes the commit block
//! (see `crate::txn`).  [`set_log_start`] rewrites the journal superblock
//! to say where the log now begins.
//!
//! The unit tests replay what is written here with [`crate::jbd2::recover`].

use crate::crc::{crc32_be, crc32c};
use crate::error::{Errno, Error, Result};
use crate::format::{be32, put_be16, put_be32, put_be64};
use crate::jbd2::block::{
    COMMIT_BLOCK, CRC32_CHKSUM, CRC32_CHKSUM_SIZE, C_CHKSUM, C_CHKSUM_SIZE, C_CHKSUM_TYPE,
    C_COMMIT_NSEC, C_COMMIT_SEC, DESCRIPTOR_BLOCK, FLAG_ESCAPE, FLAG_LAST_TAG, FLAG_SAME_UUID,
    HEADER_BYTES, REVOKE_BLOCK, REVOKE_HEADER_BYTES, R_COUNT,
};
use crate::jbd2::superblock::{
    superblock_checksum, Journal, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3, S_CHECKSUM,
    S_FEATURE_INCOMPAT, S_SEQUENCE, S_START, UUID_BYTES,
};
use crate::jbd2::JBD2_MAGIC;

/// One transaction laid out in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedTransaction {
    /// Revoke, descriptor and copy blocks, in log order: (log block, bytes).
    /// They must be durable before the commit block is written.
    pub blocks: Vec<(u32, Vec<u8>)>,
    /// The commit block: (log block, bytes).
    pub commit: (u32, Vec<u8>),
    /// The log block after the commit block, where the next transaction goes.
    pub next: u32,
}

/// When the transaction commits, for `h_commit_sec`/`h_commit_nsec`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitTime {
    pub sec: u64,
    pub nsec: u32,
}

impl CommitTime {
    pub fn now() -> CommitTime {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        CommitTime {
            sec: now.as_secs(),
            nsec: now.subsec_nanos(),
        }
    }
}

fn header(bs: usize, block_type: u32, sequence: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    put_be32(&mut b, 0, JBD2_MAGIC);
    put_be32(&mut b, 4, block_type);
    put_be32(&mut b, 8, sequence);
    b
}

/// How many tags fit in one descriptor block (the first followed by the
/// journal's UUID, the others marked `SAME_UUID`), before the checksum tail.
pub fn tags_per_descriptor(journal: &Journal) -> usize {
    let room = journal.block_size - journal.tail_bytes() - HEADER_BYTES - UUID_BYTES;
    room / journal.features.tag_bytes()
}

/// How many revoke records fit in one revoke block.
pub fn records_per_revoke_block(journal: &Journal) -> usize {
    let room = journal.block_size - journal.tail_bytes() - REVOKE_HEADER_BYTES;
    room / record_bytes(journal)
}

fn record_bytes(journal: &Journal) -> usize {
    if journal.features.is_64bit() {
        8
    } else {
        4
    }
}

/// The log blocks a transaction of `copies` copies and `revoked` revoke
/// records takes, commit block included.
pub fn blocks_needed(journal: &Journal, copies: usize, revoked: usize) -> u64 {
    let descriptors = copies.div_ceil(tags_per_descriptor(journal));
    let revokes = revoked.div_ceil(records_per_revoke_block(journal));
    (revokes + descriptors + copies + 1) as u64
}

/// The blocks of the main log area a transaction may use: `s_first` up to
/// (not including) `s_maxlen`.
pub fn log_capacity(journal: &Journal) -> u64 {
    u64::from(journal.wrap_at.saturating_sub(journal.first))
}

/// Sets the tail checksum of a descriptor or revoke block (v2/v3).
fn seal_tail(journal: &Journal, block: &mut [u8]) {
    if journal.features.csum_v2_or_v3() {
        let at = journal.block_size - 4;
        block[at..].fill(0);
        let sum = crc32c(journal.csum_seed, block);
        put_be32(block, at, sum);
    }
}

/// Lays out transaction `sequence` from log block `start`: `copies` are
/// (filesystem block, its new contents, one filesystem block each) and
/// `revoked` the blocks whose older logged copies recovery must not replay.
///
/// Fails if a block number does not fit the journal's tags (a block past
/// 2^32 in a journal without the 64-bit feature), a copy has the wrong
/// size, or the transaction does not fit in the log at all.  The caller
/// makes sure it does not overwrite transactions still needed.
pub fn write_transaction(
    journal: &Journal,
    sequence: u32,
    start: u32,
    copies: &[(u64, &[u8])],
    revoked: &[u64],
    time: CommitTime,
) -> Result<LoggedTransaction> {
    let bs = journal.block_size;
    let features = journal.features;
    let too_big = |what: String| Error::other(Errno::EFBIG, format!("journal: {what}"));
    if blocks_needed(journal, copies.len(), revoked.len()) > log_capacity(journal) {
        return Err(too_big(format!(
            "a transaction of {} blocks does not fit in a log of {} blocks",
            blocks_needed(journal, copies.len(), revoked.len()),
            log_capacity(journal)
        )));
    }
    if let Some(block) = copies
        .iter()
        .map(|(block, _)| *block)
        .chain(revoked.iter().copied())
        .find(|&block| !features.is_64bit() && block > u64::from(u32::MAX))
    {
        return Err(too_big(format!(
            "block {block} needs 64-bit block numbers, which the journal lacks"
        )));
    }
    if let Some((block, data)) = copies.iter().find(|(_, data)| data.len() != bs) {
        return Err(Error::other(
            Errno::EINVAL,
            format!(
                "journal: the copy of block {block} has {} bytes, not {bs}",
                data.len()
            ),
        ));
    }

    let mut pos = start;
    let advance = |pos: &mut u32| -> u32 {
        let at = *pos;
        *pos = journal.wrap(u64::from(at) + 1) as u32;
        at
    };
    let mut blocks = Vec::new();

    // Revoke records first, as the kernel writes them.
    for chunk in revoked.chunks(records_per_revoke_block(journal)) {
        blocks.push((advance(&mut pos), revoke_block(journal, sequence, chunk)));
    }

    // Descriptor blocks, each followed by its copies.  The v1 checksum
    // covers exactly these, as recovery sums them.
    let mut crc_v1 = !0u32;
    for chunk in copies.chunks(tags_per_descriptor(journal)) {
        let (desc, logged) = descriptor_block(journal, sequence, chunk);
        crc_v1 = crc32_be(crc_v1, &desc);
        blocks.push((advance(&mut pos), desc));
        for copy in logged {
            crc_v1 = crc32_be(crc_v1, &copy);
            blocks.push((advance(&mut pos), copy));
        }
    }

    let commit = commit_block(journal, sequence, time, crc_v1);
    let commit_at = advance(&mut pos);
    Ok(LoggedTransaction {
        blocks,
        commit: (commit_at, commit),
        next: pos,
    })
}

/// A revoke block of transaction `sequence` for `blocks` (which must fit:
/// see [`records_per_revoke_block`]).
pub(crate) fn revoke_block(journal: &Journal, sequence: u32, blocks: &[u64]) -> Vec<u8> {
    let record = record_bytes(journal);
    let mut b = header(journal.block_size, REVOKE_BLOCK, sequence);
    let mut at = REVOKE_HEADER_BYTES;
    for &block in blocks {
        if record == 8 {
            put_be64(&mut b, at, block);
        } else {
            put_be32(&mut b, at, block as u32);
        }
        at += record;
    }
    put_be32(&mut b, R_COUNT, at as u32);
    seal_tail(journal, &mut b);
    b
}

/// A descriptor block of transaction `sequence` tagging `copies` (which
/// must fit: see [`tags_per_descriptor`]), and the copies as they go into
/// the log after it (escaped where they start with the JBD2 magic).
pub(crate) fn descriptor_block(
    journal: &Journal,
    sequence: u32,
    copies: &[(u64, &[u8])],
) -> (Vec<u8>, Vec<Vec<u8>>) {
    let features = journal.features;
    let tag_bytes = features.tag_bytes();
    let mut desc = header(journal.block_size, DESCRIPTOR_BLOCK, sequence);
    let mut logged = Vec::with_capacity(copies.len());
    let mut at = HEADER_BYTES;
    for (i, (block, data)) in copies.iter().enumerate() {
        let mut copy = data.to_vec();
        let mut flags = 0u16;
        if i > 0 {
            flags |= FLAG_SAME_UUID;
        }
        if i + 1 == copies.len() {
            flags |= FLAG_LAST_TAG;
        }
        if be32(&copy, 0) == JBD2_MAGIC {
            copy[..4].fill(0);
            flags |= FLAG_ESCAPE;
        }
        // The tag checksum covers the copy as it lies in the log.
        let sum = crc32c(crc32c(journal.csum_seed, &sequence.to_be_bytes()), &copy);
        put_be32(&mut desc, at, *block as u32);
        if features.csum_v3() {
            put_be32(&mut desc, at + 4, u32::from(flags));
            put_be32(&mut desc, at + 12, sum);
        } else {
            if features.csum_v2() {
                put_be16(&mut desc, at + 4, sum as u16);
            }
            put_be16(&mut desc, at + 6, flags);
        }
        if features.is_64bit() {
            put_be32(&mut desc, at + 8, (*block >> 32) as u32);
        }
        at += tag_bytes;
        if i == 0 {
            desc[at..at + UUID_BYTES].copy_from_slice(&journal.uuid);
            at += UUID_BYTES;
        }
        logged.push(copy);
    }
    seal_tail(journal, &mut desc);
    (desc, logged)
}

/// The commit block of transaction `sequence`; `crc_v1` is the CRC32 of
/// its descriptor and copy blocks (used with checksum v1 only).
pub(crate) fn commit_block(
    journal: &Journal,
    sequence: u32,
    time: CommitTime,
    crc_v1: u32,
) -> Vec<u8> {
    let features = journal.features;
    let mut commit = header(journal.block_size, COMMIT_BLOCK, sequence);
    put_be64(&mut commit, C_COMMIT_SEC, time.sec);
    put_be32(&mut commit, C_COMMIT_NSEC, time.nsec);
    if features.checksum_v1() {
        commit[C_CHKSUM_TYPE] = CRC32_CHKSUM;
        commit[C_CHKSUM_SIZE] = CRC32_CHKSUM_SIZE;
        put_be32(&mut commit, C_CHKSUM, crc_v1);
    } else if features.csum_v2_or_v3() {
        // Type and size stay zero; the checksum covers the whole block.
        let sum = crc32c(journal.csum_seed, &commit);
        put_be32(&mut commit, C_CHKSUM, sum);
    }
    commit
}

/// Rewrites the journal superblock `block` to say the log begins with
/// transaction `sequence` at log block `start` (0: the log is empty and
/// the next transaction will be `sequence`), with `incompat` feature bits
/// added, and its checksum (v2/v3) recomputed.
pub fn set_log_start(block: &mut [u8], start: u32, sequence: u32, incompat: u32) -> Result<()> {
    if block.len() < 0x400 || be32(block, 0) != JBD2_MAGIC {
        return Err(Error::other(
            Errno::EIO,
            "journal: the journal superblock has no JBD2 magic number",
        ));
    }
    put_be32(block, S_SEQUENCE, sequence);
    put_be32(block, S_START, start);
    let features = be32(block, S_FEATURE_INCOMPAT) | incompat;
    put_be32(block, S_FEATURE_INCOMPAT, features);
    if features & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0 {
        let sum = superblock_checksum(block);
        put_be32(block, S_CHECKSUM, sum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jbd2::recovery::recover;
    use crate::jbd2::superblock::tests::superblock;
    use crate::jbd2::superblock::{
        COMPAT_CHECKSUM, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT, INCOMPAT_REVOKE,
    };

    /// An in-memory journal to write into and recover from.
    struct Log {
        blocks: Vec<Vec<u8>>,
        journal: Journal,
    }

    impl Log {
        fn new(bs: usize, maxlen: u32, incompat: u32, compat: u32) -> Log {
            let sb = superblock(bs, maxlen, incompat, compat);
            let journal = Journal::parse(&sb, bs as u32, maxlen).unwrap();
            let mut blocks = vec![vec![0u8; bs]; maxlen as usize];
            blocks[0] = sb;
            Log { blocks, journal }
        }

        fn write(&mut self, t: &LoggedTransaction, with_commit: bool) {
            for (at, b) in &t.blocks {
                self.blocks[*at as usize] = b.clone();
            }
            if with_commit {
                self.blocks[t.commit.0 as usize] = t.commit.1.clone();
            }
        }

        fn start(&mut self, start: u32, sequence: u32) {
            set_log_start(&mut self.blocks[0], start, sequence, 0).unwrap();
        }

        fn recover(&self) -> crate::jbd2::Recovery {
            let mut read =
                |logical: u32| -> Result<Vec<u8>> { Ok(self.blocks[logical as usize].clone()) };
            let r = recover(
                self.journal.block_size as u32,
                self.blocks.len() as u32,
                &mut read,
            )
            .unwrap();
            assert!(r.failure.is_none(), "recovery failed: {:?}", r.failure);
            r
        }

        /// Filesystem block -> the bytes recovery writes there.
        fn replayed(&self) -> std::collections::BTreeMap<u64, Vec<u8>> {
            let r = self.recover();
            r.copies
                .iter()
                .map(|(&block, copy)| {
                    let mut data = self.blocks[copy.log_block as usize].clone();
                    if copy.escaped {
                        data[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                    }
                    (block, data)
                })
                .collect()
        }
    }

    fn content(bs: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..bs)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const FLAVOURS: [(u32, u32); 8] = [
        (0, 0),
        (INCOMPAT_REVOKE, 0),
        (INCOMPAT_REVOKE | INCOMPAT_64BIT, 0),
        (INCOMPAT_REVOKE, COMPAT_CHECKSUM),
        (INCOMPAT_REVOKE | INCOMPAT_CSUM_V2, 0),
        (INCOMPAT_REVOKE | INCOMPAT_CSUM_V2 | INCOMPAT_64BIT, 0),
        (INCOMPAT_REVOKE | INCOMPAT_CSUM_V3, 0),
        (
            INCOMPAT_REVOKE | INCOMPAT_CSUM_V3 | INCOMPAT_64BIT | INCOMPAT_ASYNC_COMMIT,
            0,
        ),
    ];

    #[test]
    fn every_flavour_replays_what_was_written() {
        for bs in [1024usize, 4096] {
            for (incompat, compat) in FLAVOURS {
                let mut log = Log::new(bs, 1024, incompat, compat);
                // Enough copies for several descriptor blocks, one escaped,
                // and (64-bit journals) a block past 2^32.
                let mut copies: Vec<(u64, Vec<u8>)> = (0..300u64)
                    .map(|i| (1000 + i * 3, content(bs, i)))
                    .collect();
                copies[7].1[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                if incompat & INCOMPAT_64BIT != 0 {
                    copies.push((0x1_0000_0042, content(bs, 999)));
                }
                let refs: Vec<(u64, &[u8])> =
                    copies.iter().map(|(b, d)| (*b, d.as_slice())).collect();
                let t =
                    write_transaction(&log.journal, 5, 1, &refs, &[], CommitTime::now()).unwrap();
                assert_eq!(
                    u64::from(t.next - 1),
                    blocks_needed(&log.journal, copies.len(), 0),
                    "bs {bs} {incompat:#x}/{compat:#x}: block count"
                );
                log.write(&t, true);
                log.start(1, 5);
                let replayed = log.replayed();
                assert_eq!(replayed.len(), copies.len());
                for (block, data) in &copies {
                    assert!(
                        replayed.get(block) == Some(data),
                        "bs {bs} {incompat:#x}/{compat:#x}: block {block} replays other bytes"
                    );
                }
            }
        }
    }

    #[test]
    fn without_its_commit_block_a_transaction_is_dropped() {
        for (incompat, compat) in FLAVOURS {
            let mut log = Log::new(1024, 1024, incompat, compat);
            let a = content(1024, 1);
            let t1 =
                write_transaction(&log.journal, 9, 1, &[(50, &a)], &[], CommitTime::now()).unwrap();
            log.write(&t1, true);
            let b = content(1024, 2);
            let t2 = write_transaction(
                &log.journal,
                10,
                t1.next,
                &[(50, &b), (51, &b)],
                &[],
                CommitTime::now(),
            )
            .unwrap();
            log.write(&t2, false);
            log.start(1, 9);
            let replayed = log.replayed();
            assert_eq!(replayed.len(), 1, "{incompat:#x}/{compat:#x}");
            assert!(replayed[&50] == a);
            let r = log.recover();
            assert_eq!(r.end_transaction, 10);
        }
    }

    #[test]
    fn revoke_records_hide_older_copies_only() {
        for (incompat, compat) in FLAVOURS {
            if incompat & INCOMPAT_REVOKE == 0 {
                continue;
            }
            let mut log = Log::new(4096, 1024, incompat, compat);
            let old = content(4096, 1);
            let t1 = write_transaction(
                &log.journal,
                1,
                1,
                &[(70, &old), (71, &old), (72, &old)],
                &[],
                CommitTime::now(),
            )
            .unwrap();
            log.write(&t1, true);
            // Transaction 2 revokes 70 and 72 (many records, spanning
            // revoke blocks) and logs 72 again: its own copy is revoked too,
            // as JBD2 rules say, so callers never log what they revoke.
            let mut revoked: Vec<u64> = (100_000..101_500).collect();
            revoked.extend([70, 72]);
            let new = content(4096, 2);
            let t2 = write_transaction(
                &log.journal,
                2,
                t1.next,
                &[(80, &new)],
                &revoked,
                CommitTime::now(),
            )
            .unwrap();
            log.write(&t2, true);
            log.start(1, 1);
            let replayed = log.replayed();
            assert!(!replayed.contains_key(&70), "{incompat:#x}/{compat:#x}");
            assert!(!replayed.contains_key(&72));
            assert!(replayed[&71] == old);
            assert!(replayed[&80] == new);
            let r = log.recover();
            assert_eq!(r.transactions[1].revoke_records, revoked.len());
        }
    }

    #[test]
    fn transactions_wrap_around_the_end_of_the_log() {
        let mut log = Log::new(1024, 1024, INCOMPAT_REVOKE | INCOMPAT_CSUM_V3, 0);
        let copies: Vec<(u64, Vec<u8>)> = (0..40u64).map(|i| (i + 10, content(1024, i))).collect();
        let refs: Vec<(u64, &[u8])> = copies.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        let t = write_transaction(&log.journal, 77, 1010, &refs, &[], CommitTime::now()).unwrap();
        assert!(t.next < 1010, "wrapped to {}", t.next);
        assert!(
            t.blocks.iter().any(|(at, _)| *at == 1) && t.blocks.iter().any(|(at, _)| *at == 1023)
        );
        log.write(&t, true);
        log.start(1010, 77);
        let replayed = log.replayed();
        for (block, data) in &copies {
            assert!(replayed[block] == *data, "block {block}");
        }
    }

    #[test]
    fn refuses_what_the_journal_cannot_hold() {
        let log = Log::new(1024, 1024, 0, 0);
        let data = content(1024, 1);
        let high = write_transaction(
            &log.journal,
            1,
            1,
            &[(1 << 33, &data)],
            &[],
            CommitTime::now(),
        );
        assert!(high.unwrap_err().to_string().contains("64-bit"));
        let many: Vec<(u64, &[u8])> = (0..1100u64).map(|b| (b, data.as_slice())).collect();
        let big = write_transaction(&log.journal, 1, 1, &many, &[], CommitTime::now());
        assert!(big.unwrap_err().to_string().contains("does not fit"));
        let short = write_transaction(
            &log.journal,
            1,
            1,
            &[(5, &data[..10])],
            &[],
            CommitTime::now(),
        );
        assert!(short.is_err());
    }

    #[test]
    fn log_start_is_set_and_checksummed() {
        for incompat in [0, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3] {
            let mut sb = superblock(1024, 1024, incompat, 0);
            set_log_start(&mut sb, 17, 40, INCOMPAT_REVOKE).unwrap();
            let j = Journal::parse(&sb, 1024, 1024).expect("valid after the update");
            assert_eq!((j.start, j.sequence), (17, 40));
            assert_eq!(j.features.incompat, incompat | INCOMPAT_REVOKE);
            set_log_start(&mut sb, 0, 41, 0).unwrap();
            let j = Journal::parse(&sb, 1024, 1024).unwrap();
            assert_eq!((j.start, j.sequence), (0, 41));
        }
        assert!(set_log_start(&mut [0u8; 1024], 1, 1, 0).is_err());
    }
}
