//! Journals built in memory for the unit tests: a superblock and log blocks
//! written the way JBD2 writes them, with every checksum flavour.

use crate::error::{Errno, Error, Result};
use crate::jbd2::block::{
    COMMIT_BLOCK, CRC32_CHKSUM, CRC32_CHKSUM_SIZE, DESCRIPTOR_BLOCK, FLAG_ESCAPE, FLAG_LAST_TAG,
    FLAG_SAME_UUID, REVOKE_BLOCK,
};
use crate::jbd2::crc::{crc32_be, crc32c};
use crate::jbd2::recovery::{recover, Recovery};
use crate::jbd2::superblock::tests::{set_start, superblock};
use crate::jbd2::superblock::Journal;
use crate::jbd2::JBD2_MAGIC;

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

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn header(bs: usize, block_type: u32, sequence: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    put32(&mut b, 0, JBD2_MAGIC);
    put32(&mut b, 4, block_type);
    put32(&mut b, 8, sequence);
    b
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

    fn seal_tail(&self, b: &mut [u8]) {
        if self.journal.features.csum_v2_or_v3() {
            let at = self.bs - 4;
            b[at..].fill(0);
            let sum = crc32c(self.journal.csum_seed, b);
            put32(b, at, sum);
        }
    }

    /// A descriptor block for `copies` (filesystem block, contents),
    /// followed by the copies; returns the log blocks of the copies.
    pub fn descriptor(&mut self, sequence: u32, copies: &[(u64, Vec<u8>)]) -> Vec<u32> {
        let f = self.journal.features;
        let tag_bytes = f.tag_bytes();
        let mut desc = header(self.bs, DESCRIPTOR_BLOCK, sequence);
        let mut logged = Vec::new();
        let mut at = 12;
        for (i, (block, data)) in copies.iter().enumerate() {
            let mut data = data.clone();
            let mut flags = 0u16;
            if i > 0 {
                flags |= FLAG_SAME_UUID;
            }
            if i + 1 == copies.len() {
                flags |= FLAG_LAST_TAG;
            }
            if data[..4] == JBD2_MAGIC.to_be_bytes() {
                data[..4].fill(0);
                flags |= FLAG_ESCAPE;
            }
            let sum = crc32c(
                crc32c(self.journal.csum_seed, &sequence.to_be_bytes()),
                &data,
            );
            assert!(at + tag_bytes + 16 <= self.bs - self.journal.tail_bytes());
            put32(&mut desc, at, *block as u32);
            if f.csum_v3() {
                put32(&mut desc, at + 4, u32::from(flags));
                put32(&mut desc, at + 12, sum);
            } else {
                if f.csum_v2() {
                    desc[at + 4..at + 6].copy_from_slice(&(sum as u16).to_be_bytes());
                }
                desc[at + 6..at + 8].copy_from_slice(&flags.to_be_bytes());
            }
            if f.is_64bit() {
                put32(&mut desc, at + 8, (*block >> 32) as u32);
            }
            at += tag_bytes;
            if i == 0 {
                desc[at..at + 16].copy_from_slice(&self.journal.uuid);
                at += 16;
            }
            logged.push(data);
        }
        self.seal_tail(&mut desc);
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
        let mut b = header(self.bs, REVOKE_BLOCK, sequence);
        let mut at = 16;
        for &block in blocks {
            if self.journal.features.is_64bit() {
                b[at..at + 8].copy_from_slice(&block.to_be_bytes());
                at += 8;
            } else {
                put32(&mut b, at, block as u32);
                at += 4;
            }
        }
        put32(&mut b, 12, at as u32);
        self.seal_tail(&mut b);
        self.put(b)
    }

    /// A commit block closing transaction `sequence`; returns its log block.
    pub fn commit(&mut self, sequence: u32) -> u32 {
        let mut b = header(self.bs, COMMIT_BLOCK, sequence);
        if self.journal.features.checksum_v1() {
            b[12] = CRC32_CHKSUM;
            b[13] = CRC32_CHKSUM_SIZE;
            put32(&mut b, 16, self.crc_v1);
        }
        b[48..56].copy_from_slice(&self.time.to_be_bytes());
        self.time += 1;
        if self.journal.features.csum_v2_or_v3() {
            let sum = crc32c(self.journal.csum_seed, &b);
            put32(&mut b, 16, sum);
        }
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
