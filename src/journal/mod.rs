//! The journal of an unclean ext3/ext4 filesystem, replayed in memory.
//!
//! A [`Replay`] says, for each filesystem block that recovery would
//! overwrite, where in the image its newest committed copy lies.  The
//! [`crate::image::Image`] consults it on every read, so the filesystem and
//! the served file look exactly as they would after `e2fsck` replayed the
//! journal, while the image itself is never written.

use std::collections::HashMap;

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
