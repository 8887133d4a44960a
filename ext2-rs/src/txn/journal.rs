//! Commits into the filesystem's own JBD2 journal.
//!
//! One commit, in this order (each flush is the device's):
//!
//! 1. the superblock's `needs_recovery` is set directly, the first time
//!    (and, before that, a journal holding old transactions or lacking a
//!    feature we write is rewritten empty, and flushed);
//! 2. the transaction's revoke, descriptor and copy blocks are written
//!    after the log's head, then **flush**: the log blocks, the file data
//!    the transaction links (written by the host before the change) and
//!    the previous transaction's home writes are now durable;
//! 3. the commit block, and the journal superblock pointing at this
//!    transaction as the log's start (the previous one is home: step 2
//!    made it durable), then **flush**: the transaction is committed;
//! 4. the blocks are written home; with [`Durability::Home`], **flush**.
//!
//! A crash before 3 is durable leaves either the previous transaction to
//! replay (idempotent: its home writes are durable) or, if only the journal
//! superblock landed, nothing to replay over a consistent home; after it,
//! this transaction replays.  So the journal holds at most the last
//! transaction, plus any whose home writes failed.  Blocks freed by the
//! transaction are not logged and are revoked when an older transaction a
//! crash could still replay logged them.  A commit that fails keeps its
//! blocks in the running transaction and never reuses the sequence number
//! or the log space it may have written: the next attempt is a new
//! transaction after it, which supersedes it.

use std::collections::{BTreeSet, HashMap};

use crate::debug;
use crate::error::{Errno, Error, Result};
use crate::fs::Filesystem;
use crate::jbd2::{
    self, blocks_needed, log_capacity, set_log_start, write_transaction, CommitTime, Journal,
    JournalMap, INCOMPAT_64BIT, INCOMPAT_REVOKE,
};
use crate::log::Topic;
use crate::sb;
use crate::sys;
use crate::txn::touched::Touched;
use crate::txn::{capture, edit_superblock_on_disk, in_use, write_runs, Durability, MetaCache};

pub(crate) struct JournalLog {
    journal: Journal,
    map: JournalMap,
    /// The journal superblock: where it is, and its bytes as last written.
    sb_block: u64,
    superblock: Vec<u8>,
    /// Feature bits the on-disk journal superblock lacks and our
    /// transactions use.
    features_to_add: u32,
    /// The log holds old transactions that must never be replayed now.
    stale_log: bool,
    /// The next log block to write.
    head: u32,
    /// The log start of the oldest transaction a crash may still make
    /// recovery replay; `None` while the journal is empty on disk.
    tail: Option<u32>,
    next_sequence: u32,
    /// Blocks logged by transactions a crash may still replay, and in which.
    logged: HashMap<u64, u32>,
    /// Freed blocks to revoke in the next transaction.
    revoke: BTreeSet<u64>,
    /// A committed transaction whose home writes did not all complete:
    /// they are written again before the journal may be emptied.
    unfinished_home: Vec<(u64, Vec<u8>)>,
    /// `needs_recovery` is set in the superblock on the device.
    flagged_on_disk: bool,
}

fn journal_error(what: impl std::fmt::Display) -> String {
    format!("journal: {what}")
}

impl JournalLog {
    /// Takes over the journal of `fs` for writing, or says why it cannot.
    pub(crate) fn open(
        fs: &mut Filesystem,
        cache: &MetaCache,
    ) -> std::result::Result<Self, String> {
        let sb = fs.super_block();
        if sb.s_journal_uuid != [0u8; 16] || sb.s_journal_inum == 0 {
            return Err(journal_error(
                "the journal is on an external device, which this filter does not write",
            ));
        }
        let (ino, map) = jbd2::locate(fs).map_err(|e| e.to_string())?;
        let bs = cache.block_size();
        let sb_block = map
            .image_block(0)
            .ok_or_else(|| journal_error("the journal superblock is not mapped"))?;
        let mut superblock = vec![0u8; bs as usize];
        cache
            .raw()
            .read_at(&mut superblock, sb_block * bs)
            .map_err(|e| {
                journal_error(format!("reading its superblock failed (errno {})", e.get()))
            })?;
        let mut journal =
            Journal::parse(&superblock, bs as u32, map.len()).map_err(|e| e.to_string())?;
        if journal.version != 2 {
            return Err(journal_error(
                "a version 1 journal, which this filter does not write",
            ));
        }
        if journal.features.fast_commit() {
            return Err(journal_error(
                "the journal has fast commits, which this filter does not write",
            ));
        }
        if journal.errno != 0 {
            return Err(journal_error(format!(
                "the journal records error {} (it was aborted: run e2fsck)",
                journal.errno
            )));
        }
        if log_capacity(&journal) < 64 {
            return Err(journal_error(format!(
                "a log of {} blocks is too small for our transactions",
                log_capacity(&journal)
            )));
        }
        // Revoke records are ours to write; 64-bit block numbers are
        // needed past 2^32 blocks (as the kernel sets them).
        let mut features_to_add = INCOMPAT_REVOKE & !journal.features.incompat;
        if fs.blocks_count() > u64::from(u32::MAX) && !journal.features.is_64bit() {
            features_to_add |= INCOMPAT_64BIT;
        }
        journal.features.incompat |= features_to_add;
        let stale_log = journal.start != 0;
        let next_sequence = if stale_log {
            // Old transactions without needs_recovery: the kernel would
            // discard them.  Start past the last one, as it would.
            let mut read = |logical: u32| -> Result<Vec<u8>> {
                let block = map.image_block(logical).ok_or_else(|| {
                    Error::other(Errno::EIO, format!("journal: log block {logical} unmapped"))
                })?;
                let mut buf = vec![0u8; bs as usize];
                cache
                    .raw()
                    .read_at(&mut buf, block * bs)
                    .map_err(Error::reported)?;
                Ok(buf)
            };
            let r = jbd2::recover(bs as u32, map.len(), &mut read).map_err(|e| e.to_string())?;
            r.next_sequence()
        } else {
            journal.sequence.wrapping_add(1)
        };
        let flagged_on_disk = fs.needs_recovery();
        // Every superblock written from now on (logged or home) says that
        // the journal may need recovery, as while a kernel has it mounted.
        // SAFETY: open filesystem; we hold it exclusively.
        unsafe { (*(*fs.raw()).super_).s_feature_incompat |= sys::EXT3_FEATURE_INCOMPAT_RECOVER };
        debug!(
            Topic::Journal,
            "journal: inode {ino}, {} blocks, log {}..{}, features [{}]: transactions from {next_sequence}",
            map.len(),
            journal.first,
            journal.wrap_at,
            journal.features.names().join(" ")
        );
        Ok(JournalLog {
            head: journal.first,
            journal,
            map,
            sb_block,
            superblock,
            features_to_add,
            stale_log,
            tail: None,
            next_sequence,
            logged: HashMap::new(),
            revoke: BTreeSet::new(),
            unfinished_home: Vec::new(),
            flagged_on_disk,
        })
    }

    /// The most blocks a transaction should hold: a quarter of the log.
    pub(crate) fn max_transaction(&self) -> u64 {
        log_capacity(&self.journal) / 4
    }

    /// Log blocks from the tail to the head: those recovery may still read.
    fn used(&self) -> u64 {
        let Some(tail) = self.tail else {
            return 0;
        };
        let capacity = log_capacity(&self.journal);
        (u64::from(self.head) + capacity - u64::from(tail)) % capacity
    }

    fn bs(&self) -> u64 {
        self.journal.block_size as u64
    }

    fn write_superblock(&mut self, cache: &MetaCache, start: u32, sequence: u32) -> Result<()> {
        set_log_start(&mut self.superblock, start, sequence, self.features_to_add)?;
        cache
            .raw()
            .write_at(&self.superblock, self.sb_block * self.bs())
            .map_err(Error::reported)?;
        Ok(())
    }

    /// Empties the journal on disk: everything it holds is home and
    /// flushed first, then the superblock says the log is empty.
    fn empty(&mut self, cache: &MetaCache) -> Result<()> {
        if !self.unfinished_home.is_empty() {
            write_runs(cache.raw().as_ref(), self.bs(), &self.unfinished_home)?;
            self.unfinished_home.clear();
        }
        cache.raw().flush().map_err(Error::reported)?;
        self.write_superblock(cache, 0, self.next_sequence)?;
        cache.raw().flush().map_err(Error::reported)?;
        self.features_to_add = 0;
        self.stale_log = false;
        self.tail = None;
        self.logged.clear();
        self.revoke.clear();
        debug!(
            Topic::Journal,
            "journal: checkpointed and emptied (next transaction {})", self.next_sequence
        );
        Ok(())
    }

    pub(crate) fn commit(
        &mut self,
        fs: &mut Filesystem,
        cache: &MetaCache,
        touched: &Touched,
        unlinked: &[(u64, u64)],
        durability: Durability,
    ) -> Result<()> {
        let idle = cache.dirty_len() == 0
            && touched.is_empty()
            && self.revoke.is_empty()
            && self.unfinished_home.is_empty();
        if idle {
            // Nothing changed: not even the superblock's write time.
            return match durability {
                Durability::Home => cache.raw().flush().map_err(Error::reported),
                Durability::Recoverable => Ok(()),
            };
        }
        capture(fs, unlinked)?;
        let taken = cache.take_dirty();
        let mut keep = Vec::with_capacity(taken.len());
        for (block, data) in taken {
            // A block freed by this transaction is not logged: its contents
            // no longer matter, and it may soon hold file data.
            if touched.was_used(block).is_some() && !in_use(fs, block) {
                cache.discard(block);
                if self.logged.contains_key(&block) {
                    self.revoke.insert(block);
                }
            } else {
                keep.push((block, data));
            }
        }
        let result = if keep.is_empty() && self.revoke.is_empty() {
            match durability {
                Durability::Home => cache.raw().flush().map_err(Error::reported),
                Durability::Recoverable => Ok(()),
            }
        } else {
            self.write(cache, &keep, durability)
        };
        cache.end_commit(&keep, result.is_ok());
        result
    }

    fn write(
        &mut self,
        cache: &MetaCache,
        keep: &[(u64, Vec<u8>)],
        durability: Durability,
    ) -> Result<()> {
        let raw = cache.raw();
        let bs = self.bs();
        // A block both revoked and logged in one transaction would not be
        // replayed: one logged again is not revoked (JBD2 cancels it too).
        let logged_now: BTreeSet<u64> = keep.iter().map(|(block, _)| *block).collect();
        let revoked: Vec<u64> = self.revoke.difference(&logged_now).copied().collect();
        let needed = blocks_needed(&self.journal, keep.len(), revoked.len());
        let capacity = log_capacity(&self.journal);
        if needed > capacity / 2 {
            return Err(Error::other(
                Errno::EFBIG,
                format!("journal: a transaction of {needed} blocks is too large for a log of {capacity}"),
            ));
        }
        if self.stale_log || self.features_to_add != 0 || self.used() + needed > capacity {
            self.empty(cache)?;
        }
        if !self.unfinished_home.is_empty() {
            write_runs(raw.as_ref(), bs, &self.unfinished_home)?;
            self.unfinished_home.clear();
        }
        if !self.flagged_on_disk {
            edit_superblock_on_disk(cache, |sb| sb::set_needs_recovery(sb, true))?;
            self.flagged_on_disk = true;
        }
        let sequence = self.next_sequence;
        let start = self.head;
        let copies: Vec<(u64, &[u8])> = keep.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        let t = write_transaction(
            &self.journal,
            sequence,
            start,
            &copies,
            &revoked,
            CommitTime::now(),
        )?;
        // From here on the sequence number and the log space may be on the
        // device, whatever happens: never reuse them.
        self.next_sequence = sequence.wrapping_add(1);
        self.head = t.next;
        self.tail.get_or_insert(start);
        for (block, _) in keep {
            self.logged.insert(*block, sequence);
        }
        let log: Vec<(u64, Vec<u8>)> = t
            .blocks
            .into_iter()
            .map(|(at, data)| self.image_block(at).map(|block| (block, data)))
            .collect::<Result<_>>()?;
        write_runs(raw.as_ref(), bs, &log)?;
        raw.flush().map_err(Error::reported)?;
        let (commit_at, commit) = t.commit;
        raw.write_at(&commit, self.image_block(commit_at)? * bs)
            .map_err(Error::reported)?;
        self.write_superblock(cache, start, sequence)?;
        raw.flush().map_err(Error::reported)?;
        // Committed, and the journal starts with it: older transactions
        // will not be replayed, and what they revoked is gone with them.
        self.tail = Some(start);
        self.logged.retain(|_, seq| *seq == sequence);
        self.revoke.clear();
        debug!(
            Topic::Journal,
            "journal: transaction {sequence} committed: {} blocks logged at log block {start} \
             ({} log blocks, {} revoked)",
            keep.len(),
            needed,
            revoked.len()
        );
        if let Err(e) = write_runs(raw.as_ref(), bs, keep) {
            self.unfinished_home = keep.to_vec();
            return Err(e);
        }
        if durability == Durability::Home {
            raw.flush().map_err(Error::reported)?;
        }
        debug!(
            Topic::Journal,
            "journal: transaction {sequence} checkpointed: {} blocks written home{}",
            keep.len(),
            if durability == Durability::Home {
                " and flushed"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn image_block(&self, log_block: u32) -> Result<u64> {
        self.map.image_block(log_block).ok_or_else(|| {
            Error::other(
                Errno::EIO,
                format!("journal: log block {log_block} is not mapped"),
            )
        })
    }

    /// After the last commit (home and flushed): empties the journal and
    /// clears `needs_recovery`, as a clean unmount does.
    pub(crate) fn shutdown(&mut self, cache: &MetaCache) -> Result<()> {
        if self.tail.is_some() || !self.unfinished_home.is_empty() {
            self.empty(cache)?;
        }
        if self.flagged_on_disk {
            edit_superblock_on_disk(cache, |sb| sb::set_needs_recovery(sb, false))?;
            cache.raw().flush().map_err(Error::reported)?;
            self.flagged_on_disk = false;
            debug!(Topic::Journal, "journal: empty; needs_recovery cleared");
        }
        Ok(())
    }
}
