//! Journals built in memory for the unit tests: a superblock and log blocks
//! written the way JBD2 writes them, with every checksum flavour.

use crate::crc::crc32_be;
use crate::error::{Errno, Error, Result};
use crate::jbd2::recovery::{recover, Recovery};
use crate::jbd2::superblock::tests::{set_start, superblock};
use crate::jbd2::superblock::Journal;
use crate::jbd2::writer::{
    commit_block, descriptor_block, revoke_block, tags_per_descriptor, CommitTime,
};

pub struct LogBuilder {
    pub bs: usize,
    pub journal: Journal,
    pub blocks: Vec<Vec<u8>>,
    /// Next log block to write.
    pub pos: u32,
    /// The v1 checksum of the transaction being written.
    crc_v1: u32,
    /// Commit time of the next commit block.
    pub time: u64,
}

impl LogBuilder {
    /// A journal of `maxlen` blocks of `bs` bytes, log from block 1.
    pub fn new(bs: usize, maxlen: u32, incompat: u32, compat: u32) -> LogBuilder {
        let sb = superblock(bs, maxlen, incompat, compat);
        let journal = Journal::parse(&sb, bs as u32, maxlen).expect("test superblock");
        let mut blocks = vec![vec![0u8; bs]; maxlen as usize];
        blocks[0] = sb;
        LogBuilder {
            bs,
            journal,
            blocks,
            pos: 1,
            crc_v1: !0,
            time: 1000,
        }
    }

    /// Moves the write position.
    pub fn at(&mut self, pos: u32) -> &mut Self {
        self.pos = pos;
        self
    }

    /// Writes `block` at the write position and advances it, wrapping.
    fn put(&mut self, block: Vec<u8>) -> u32 {
        let at = self.pos;
        self.blocks[at as usize] = block;
        self.pos = self.journal.wrap(u64::from(at) + 1) as u32;
        at
    }

    /// A descriptor block for `copies` (filesystem block, contents),
    /// followed by the copies; returns the log blocks of the copies.
    pub fn descriptor(&mut self, sequence: u32, copies: &[(u64, Vec<u8>)]) -> Vec<u32> {
        assert!(copies.len() <= tags_per_descriptor(&self.journal));
        let refs: Vec<(u64, &[u8])> = copies.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        let (desc, logged) = descriptor_block(&self.journal, sequence, &refs);
        self.crc_v1 = crc32_be(self.crc_v1, &desc);
        self.put(desc);
        logged
            .into_iter()
            .map(|data| {
                self.crc_v1 = crc32_be(self.crc_v1, &data);
                self.put(data)
            })
            .collect()
    }

    /// A revoke block for `blocks`.
    pub fn revoke(&mut self, sequence: u32, blocks: &[u64]) -> u32 {
        let b = revoke_block(&self.journal, sequence, blocks);
        self.put(b)
    }

    /// A commit block closing transaction `sequence`; returns its log block.
    pub fn commit(&mut self, sequence: u32) -> u32 {
        let time = CommitTime {
            sec: self.time,
            nsec: 0,
        };
        let b = commit_block(&self.journal, sequence, time, self.crc_v1);
        self.time += 1;
        self.crc_v1 = !0;
        self.put(b)
    }

    /// One whole transaction of copies.
    pub fn transaction(&mut self, sequence: u32, copies: &[(u64, Vec<u8>)]) -> Vec<u32> {
        let logged = self.descriptor(sequence, copies);
        self.commit(sequence);
        logged
    }

    /// Records where the log starts and its first transaction.
    pub fn start(&mut self, start: u32, sequence: u32) -> &mut Self {
        set_start(&mut self.blocks[0], start, sequence);
        self.journal = Journal::parse(&self.blocks[0], self.bs as u32, self.blocks.len() as u32)
            .expect("test superblock");
        self
    }

    pub fn recover(&self) -> Result<Recovery> {
        let mut read = |logical: u32| -> Result<Vec<u8>> {
            self.blocks
                .get(logical as usize)
                .cloned()
                .ok_or_else(|| Error::other(Errno::EIO, "test read beyond the journal"))
        };
        recover(self.bs as u32, self.blocks.len() as u32, &mut read)
    }
}

/// A block of `bs` bytes filled with `byte`.
pub fn filled(bs: usize, byte: u8) -> Vec<u8> {
    vec![byte; bs]
}
