//! The v2 quota file format, revision 1 ("vfsv1", what mke2fs and the
//! kernel's hidden ext4 quota inodes use), in pure Rust over any store of
//! 1 KiB blocks.
//!
//! The layout (kernel fs/quota/quotaio_v2.h and quota_tree.c):
//! - block 0: a header (magic per quota type, version 1) and the info
//!   (grace times, flags, the file's block count, the head of the free
//!   block list and of the list of data blocks with free entries);
//! - block 1: the root of a radix tree four levels deep; each tree block
//!   holds 256 little-endian block numbers, indexed by one byte of the id,
//!   most significant first; the fourth level points at data blocks;
//! - data blocks: a 16-byte header (next and previous block in the
//!   free-entry list, entry count) and 14 entries of 72 bytes, one per id.
//!
//! Only what the kernel does while a filesystem is mounted is implemented:
//! finding an id's entry, inserting one (growing the tree and taking blocks
//! from the free list or the end of the file), and changing its usage.
//! Entries are never deleted: an id that owns a file keeps its inode count.

use crate::error::{Errno, Error, Result};
use crate::format::{le16, le32, le64, put_le16, put_le32, put_le64};

/// Quota files are addressed in 1 KiB blocks whatever the filesystem's
/// block size (`QT_BLKSIZE_BITS`).
pub const BLOCK: usize = 1024;
pub type Block = [u8; BLOCK];

/// `QT_TREEOFF`: the tree's root.
const ROOT: u32 = 1;
/// `QT_TREEDEPTH`.
const DEPTH: u32 = 4;
const REFS_PER_BLOCK: u32 = (BLOCK / 4) as u32;
/// The info follows the 8-byte header in block 0 (`V2_DQINFOOFF`).
const INFO_AT: usize = 8;
/// `struct qt_disk_dqdbheader`.
const DATA_HEADER: usize = 16;
/// `struct v2r1_disk_dqblk`.
pub const ENTRY: usize = 72;
const ENTRIES_PER_BLOCK: usize = (BLOCK - DATA_HEADER) / ENTRY;
/// The quota format revision this module reads and writes.
const VERSION_R1: u32 = 1;

/// Offsets inside an entry.
const ENTRY_ID: usize = 0;
const ENTRY_CURINODES: usize = 24;
const ENTRY_CURSPACE: usize = 48;
const ENTRY_ITIME: usize = 64;

/// Which ids a quota file counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    User,
    Group,
    Project,
}

impl Kind {
    /// The header's magic number (`V2_INITQMAGICS`).
    fn magic(self) -> u32 {
        match self {
            Kind::User => 0xd9c0_1f11,
            Kind::Group => 0xd9c0_1927,
            Kind::Project => 0xd9c0_3f14,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Group => "group",
            Kind::Project => "project",
        }
    }
}

/// A quota file as an array of 1 KiB blocks.
pub trait Store {
    /// Reads block `index`; a block past the end of the file reads as zeroes.
    fn read(&mut self, index: u32) -> Result<Block>;
    /// Writes block `index`, growing the file if it lies past the end.
    fn write(&mut self, index: u32, block: &Block) -> Result<()>;
}

/// `struct v2_disk_dqinfo`: the part of block 0 after the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Info {
    /// Blocks in the file (`dqi_blocks`).
    blocks: u32,
    /// First block of the free block list, 0 if none (`dqi_free_blk`).
    free_block: u32,
    /// First data block with a free entry, 0 if none (`dqi_free_entry`).
    free_entry: u32,
}

const INFO_BLOCKS: usize = INFO_AT + 12;
const INFO_FREE_BLOCK: usize = INFO_AT + 16;
const INFO_FREE_ENTRY: usize = INFO_AT + 20;

/// A data block's header fields.
const NEXT_FREE: usize = 0;
const PREV_FREE: usize = 4;
const ENTRIES: usize = 8;

fn damaged(kind: Kind, what: impl std::fmt::Display) -> Error {
    Error::other(
        Errno::EIO,
        format!(
            "the {} quota file is damaged: {what} (run e2fsck)",
            kind.name()
        ),
    )
}

/// Where an id's entry lives: its byte offset in the quota file.
pub type EntryOffset = u64;

/// An open quota file of one kind.
pub struct QuotaTree<S: Store> {
    store: S,
    kind: Kind,
    info: Info,
}

impl<S: Store> QuotaTree<S> {
    /// Checks the header (magic number of `kind`, revision 1) and reads the
    /// info.
    pub fn open(mut store: S, kind: Kind) -> Result<QuotaTree<S>> {
        let head = store.read(0)?;
        let (magic, version) = (le32(&head, 0), le32(&head, 4));
        if magic != kind.magic() {
            return Err(damaged(kind, format_args!("bad magic number {magic:#x}")));
        }
        if version != VERSION_R1 {
            return Err(Error::other(
                Errno::EROFS,
                format!(
                    "the {} quota file has format revision {version}; only revision 1 \
                     (vfsv1) is written",
                    kind.name()
                ),
            ));
        }
        let info = Info {
            blocks: le32(&head, INFO_BLOCKS),
            free_block: le32(&head, INFO_FREE_BLOCK),
            free_entry: le32(&head, INFO_FREE_ENTRY),
        };
        let tree = QuotaTree { store, kind, info };
        if info.blocks <= ROOT {
            return Err(damaged(kind, "it has no tree"));
        }
        tree.check_ref(info.free_block, "the free block list")?;
        tree.check_ref(info.free_entry, "the free entry list")?;
        Ok(tree)
    }

    /// A block reference read from the file: 0 (none) or a block after the
    /// root and inside the file (the kernel's `do_check_range`).
    fn check_ref(&self, block: u32, what: &str) -> Result<()> {
        if block == 0 || (block > ROOT && block < self.info.blocks) {
            Ok(())
        } else {
            Err(damaged(
                self.kind,
                format_args!(
                    "{what} points at block {block}, outside 2..{}",
                    self.info.blocks
                ),
            ))
        }
    }

    fn write_info(&mut self) -> Result<()> {
        let mut head = self.store.read(0)?;
        put_le32(&mut head, INFO_BLOCKS, self.info.blocks);
        put_le32(&mut head, INFO_FREE_BLOCK, self.info.free_block);
        put_le32(&mut head, INFO_FREE_ENTRY, self.info.free_entry);
        self.store.write(0, &head)
    }

    /// The slot of `id` in a tree block at `depth` (0 is the root).
    fn index(id: u32, depth: u32) -> usize {
        let shift = 8 * (DEPTH - 1 - depth);
        ((id >> shift) % REFS_PER_BLOCK) as usize
    }

    /// Where `id`'s entry is, if it has one.
    pub fn find(&mut self, id: u32) -> Result<Option<EntryOffset>> {
        let mut block = ROOT;
        for depth in 0..DEPTH {
            let node = self.store.read(block)?;
            let next = le32(&node, 4 * Self::index(id, depth));
            if next == 0 {
                return Ok(None);
            }
            self.check_ref(next, "a tree block")?;
            block = next;
        }
        let data = self.store.read(block)?;
        Ok((0..ENTRIES_PER_BLOCK)
            .find(|&i| {
                let entry = &data[entry_at(i)..entry_at(i) + ENTRY];
                !entry_unused(entry) && le32(entry, ENTRY_ID) == id
            })
            .map(|i| offset_of(block, i)))
    }

    /// Gives `id` a new, empty entry (the kernel's `dq_insert_tree`) and
    /// returns where it is.  The caller knows `id` has none.
    pub fn insert(&mut self, id: u32) -> Result<EntryOffset> {
        let mut path = Vec::with_capacity(DEPTH as usize);
        let mut block = ROOT;
        // Walk down, creating the tree blocks that are missing.
        for depth in 0..DEPTH {
            let mut node = self.store.read(block)?;
            let slot = 4 * Self::index(id, depth);
            let next = le32(&node, slot);
            if depth == DEPTH - 1 && next != 0 {
                // The leaf slot already points at a data block: entries of
                // ids sharing their top three bytes live in any data block,
                // but the tree has one slot per id; a used slot means the
                // id is present (the kernel refuses too).
                return Err(damaged(
                    self.kind,
                    format_args!("id {id} is in the tree but not in its data block"),
                ));
            }
            if next != 0 {
                self.check_ref(next, "a tree block")?;
                block = next;
                continue;
            }
            let new = if depth == DEPTH - 1 {
                self.take_free_entry(id)?.0
            } else {
                self.take_free_block()?
            };
            put_le32(&mut node, slot, new);
            path.push((block, node));
            block = new;
        }
        for (at, node) in path.iter().rev() {
            self.store.write(*at, node)?;
        }
        self.write_info()?;
        self.find(id)?
            .ok_or_else(|| damaged(self.kind, format_args!("id {id} vanished after insertion")))
    }

    /// A zeroed block for the tree: from the free block list, or a new one
    /// at the end of the file (the kernel's `get_free_dqblk`).
    fn take_free_block(&mut self) -> Result<u32> {
        let zero = [0u8; BLOCK];
        if self.info.free_block != 0 {
            let block = self.info.free_block;
            let old = self.store.read(block)?;
            let next = le32(&old, NEXT_FREE);
            self.check_ref(next, "the free block list")?;
            self.info.free_block = next;
            self.store.write(block, &zero)?;
            return Ok(block);
        }
        let block = self.info.blocks;
        let grown = block
            .checked_add(1)
            .ok_or_else(|| damaged(self.kind, "it cannot grow"))?;
        self.store.write(block, &zero)?;
        self.info.blocks = grown;
        Ok(block)
    }

    /// Claims a free entry for `id` in a data block (the kernel's
    /// `find_free_dqentry`), writes it with `id`, and returns the block and
    /// the entry's index.
    fn take_free_entry(&mut self, id: u32) -> Result<(u32, usize)> {
        let (block, mut data) = if self.info.free_entry != 0 {
            let block = self.info.free_entry;
            (block, self.store.read(block)?)
        } else {
            let block = self.take_free_block()?;
            self.info.free_entry = block;
            (block, [0u8; BLOCK])
        };
        let count = usize::from(le16(&data, ENTRIES));
        if count >= ENTRIES_PER_BLOCK {
            return Err(damaged(
                self.kind,
                format_args!("data block {block} on the free entry list is full"),
            ));
        }
        if count + 1 >= ENTRIES_PER_BLOCK {
            self.unlink_free_entry_block(&mut data)?;
        }
        put_le16(&mut data, ENTRIES, (count + 1) as u16);
        let slot = (0..ENTRIES_PER_BLOCK)
            .find(|&i| entry_unused(&data[entry_at(i)..entry_at(i) + ENTRY]))
            .ok_or_else(|| {
                damaged(
                    self.kind,
                    format_args!("data block {block} counts {count} entries but has no free one"),
                )
            })?;
        let entry = &mut data[entry_at(slot)..entry_at(slot) + ENTRY];
        put_le32(entry, ENTRY_ID, id);
        mark_used(entry);
        self.store.write(block, &data)?;
        Ok((block, slot))
    }

    /// Takes a data block that is about to be full off the free-entry list
    /// (the kernel's `remove_free_dqentry`); `data` is its content.
    fn unlink_free_entry_block(&mut self, data: &mut Block) -> Result<()> {
        let next = le32(data, NEXT_FREE);
        let prev = le32(data, PREV_FREE);
        self.check_ref(next, "the free entry list")?;
        self.check_ref(prev, "the free entry list")?;
        if next != 0 {
            let mut b = self.store.read(next)?;
            put_le32(&mut b, PREV_FREE, prev);
            self.store.write(next, &b)?;
        }
        if prev != 0 {
            let mut b = self.store.read(prev)?;
            put_le32(&mut b, NEXT_FREE, next);
            self.store.write(prev, &b)?;
        } else {
            self.info.free_entry = next;
        }
        put_le32(data, NEXT_FREE, 0);
        put_le32(data, PREV_FREE, 0);
        Ok(())
    }

    /// Reads the entry at `at`.
    pub fn entry(&mut self, at: EntryOffset) -> Result<Entry> {
        self.check_ref(block_of(at), "an entry")?;
        let (block, within) = locate(self.kind, at)?;
        let data = self.store.read(block)?;
        Ok(Entry(
            data[within..within + ENTRY].try_into().expect("72 bytes"),
        ))
    }

    /// Changes the entry at `at` with `change` (see [`update_entry`]).
    pub fn update_entry(
        &mut self,
        at: EntryOffset,
        change: impl FnOnce(&mut Entry) -> Result<()>,
    ) -> Result<Entry> {
        self.check_ref(block_of(at), "an entry")?;
        update_entry(&mut self.store, self.kind, at, change)
    }

    /// Every entry in the file, by walking the tree (for checks and tests).
    pub fn all_entries(&mut self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.walk(ROOT, 0, &mut seen, &mut out)?;
        out.sort_by_key(Entry::id);
        Ok(out)
    }

    fn walk(
        &mut self,
        block: u32,
        depth: u32,
        seen: &mut std::collections::HashSet<u32>,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        let data = self.store.read(block)?;
        if depth == DEPTH {
            // Several leaf slots may share a data block: read it once.
            if seen.insert(block) {
                out.extend(
                    (0..ENTRIES_PER_BLOCK)
                        .map(|i| &data[entry_at(i)..entry_at(i) + ENTRY])
                        .filter(|e| !entry_unused(e))
                        .map(|e| Entry(e.try_into().expect("72 bytes"))),
                );
            }
            return Ok(());
        }
        for slot in 0..REFS_PER_BLOCK as usize {
            let next = le32(&data, 4 * slot);
            if next != 0 {
                self.check_ref(next, "a tree block")?;
                self.walk(next, depth + 1, seen, out)?;
            }
        }
        Ok(())
    }

    /// Gives the store back (to close the file it wraps).
    pub fn into_store(self) -> S {
        self.store
    }
}

fn block_of(at: EntryOffset) -> u32 {
    u32::try_from(at / BLOCK as u64).unwrap_or(u32::MAX)
}

/// The data block and the byte within it of the entry at `at`.
fn locate(kind: Kind, at: EntryOffset) -> Result<(u32, usize)> {
    let block = block_of(at);
    let within = (at % BLOCK as u64) as usize;
    if block <= ROOT || within < DATA_HEADER || (within - DATA_HEADER) % ENTRY != 0 {
        return Err(damaged(kind, format_args!("no entry at byte {at}")));
    }
    Ok((block, within))
}

/// Reads the entry at `at` of a `kind` quota file (an offset found in its
/// tree earlier), lets `change` change it, and writes it back, with one read
/// and one write of its block; nothing is written if `change` fails.
pub fn update_entry<S: Store>(
    store: &mut S,
    kind: Kind,
    at: EntryOffset,
    change: impl FnOnce(&mut Entry) -> Result<()>,
) -> Result<Entry> {
    let (block, within) = locate(kind, at)?;
    let mut data = store.read(block)?;
    let mut entry = Entry(data[within..within + ENTRY].try_into().expect("72 bytes"));
    change(&mut entry)?;
    // An all-zero entry would read as free (id 0 with nothing used and no
    // limits): mark it, as the kernel's v2r1_mem2diskdqblk does.
    mark_used(&mut entry.0);
    data[within..within + ENTRY].copy_from_slice(&entry.0);
    store.write(block, &data)?;
    Ok(entry)
}

fn entry_at(index: usize) -> usize {
    DATA_HEADER + index * ENTRY
}

fn offset_of(block: u32, index: usize) -> EntryOffset {
    u64::from(block) * BLOCK as u64 + entry_at(index) as u64
}

/// The kernel's `qtree_entry_unused`: an all-zero entry is free.
fn entry_unused(entry: &[u8]) -> bool {
    entry.iter().all(|&b| b == 0)
}

/// Makes an entry that would be all zeroes read as used (`dqb_itime = 1`).
fn mark_used(entry: &mut [u8]) {
    if entry_unused(entry) {
        put_le64(entry, ENTRY_ITIME, 1);
    }
}

/// One id's record (`struct v2r1_disk_dqblk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry(pub [u8; ENTRY]);

impl Entry {
    pub fn id(&self) -> u32 {
        le32(&self.0, ENTRY_ID)
    }

    /// Bytes in use (`dqb_curspace`).
    pub fn space(&self) -> u64 {
        le64(&self.0, ENTRY_CURSPACE)
    }

    pub fn inodes(&self) -> u64 {
        le64(&self.0, ENTRY_CURINODES)
    }

    /// Adds `delta` bytes to the space in use; a release of more than is
    /// counted leaves zero, as the kernel's `dquot_decr_space`.
    pub fn add_space(&mut self, delta: i64) {
        let space = self.space();
        let new = if delta >= 0 {
            space.saturating_add(delta.unsigned_abs())
        } else {
            space.saturating_sub(delta.unsigned_abs())
        };
        put_le64(&mut self.0, ENTRY_CURSPACE, new);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A quota file in memory.
    #[derive(Default)]
    pub(crate) struct MemStore(pub Vec<Block>);

    impl Store for MemStore {
        fn read(&mut self, index: u32) -> Result<Block> {
            Ok(self.0.get(index as usize).copied().unwrap_or([0; BLOCK]))
        }

        fn write(&mut self, index: u32, block: &Block) -> Result<()> {
            let i = index as usize;
            if self.0.len() <= i {
                self.0.resize(i + 1, [0; BLOCK]);
            }
            self.0[i] = *block;
            Ok(())
        }
    }

    /// An empty quota file as mke2fs writes it: header, info, empty root.
    pub(crate) fn empty(kind: Kind) -> MemStore {
        let mut head = [0u8; BLOCK];
        put_le32(&mut head, 0, kind.magic());
        put_le32(&mut head, 4, 1);
        put_le32(&mut head, INFO_AT, 604800);
        put_le32(&mut head, INFO_AT + 4, 604800);
        put_le32(&mut head, INFO_BLOCKS, 2);
        MemStore(vec![head, [0; BLOCK]])
    }

    #[test]
    fn inserted_ids_are_found_and_keep_their_usage() {
        let mut tree = QuotaTree::open(empty(Kind::User), Kind::User).unwrap();
        let ids = [0u32, 1, 255, 256, 1000, 65536, 0xdead_beef, u32::MAX];
        for (n, &id) in ids.iter().enumerate() {
            assert_eq!(tree.find(id).unwrap(), None, "{id} before insertion");
            let at = tree.insert(id).unwrap();
            let e = tree.entry(at).unwrap();
            assert_eq!((e.id(), e.space(), e.inodes()), (id, 0, 0));
            tree.update_entry(at, |e| {
                e.add_space(1024 * (n as i64 + 1));
                Ok(())
            })
            .unwrap();
        }
        for (n, &id) in ids.iter().enumerate() {
            let at = tree.find(id).unwrap().expect("present");
            assert_eq!(tree.entry(at).unwrap().space(), 1024 * (n as u64 + 1));
        }
        let all: Vec<u32> = tree.all_entries().unwrap().iter().map(Entry::id).collect();
        let mut sorted = ids.to_vec();
        sorted.sort();
        assert_eq!(all, sorted);
    }

    #[test]
    fn id_zero_with_nothing_used_stays_used() {
        let mut tree = QuotaTree::open(empty(Kind::Group), Kind::Group).unwrap();
        let at = tree.insert(0).unwrap();
        tree.update_entry(at, |_| Ok(())).unwrap();
        assert_eq!(tree.find(0).unwrap(), Some(at));
    }

    #[test]
    fn data_blocks_fill_up_and_leave_the_free_list() {
        let mut tree = QuotaTree::open(empty(Kind::Project), Kind::Project).unwrap();
        // 29 ids sharing their top three bytes: 14 + 14 + 1 entries.
        for id in 0..29 {
            tree.insert(id).unwrap();
        }
        // Root, three tree levels, three data blocks, header.
        assert_eq!(tree.info.blocks, 8);
        let full: Vec<u32> = (0..29)
            .map(|id| (tree.find(id).unwrap().unwrap() / BLOCK as u64) as u32)
            .collect();
        assert!(full[..14].iter().all(|&b| b == full[0]));
        assert!(full[14..28].iter().all(|&b| b == full[14]));
        assert_eq!(tree.info.free_entry, full[28]);
    }

    #[test]
    fn usage_never_goes_below_zero() {
        let mut e = Entry([0; ENTRY]);
        e.add_space(4096);
        e.add_space(-10_000);
        assert_eq!(e.space(), 0);
        e.add_space(i64::MAX);
        e.add_space(i64::MAX);
        e.add_space(i64::MAX);
        assert_eq!(e.space(), u64::MAX);
    }

    #[test]
    fn damaged_files_are_errors() {
        let mut store = empty(Kind::User);
        assert!(QuotaTree::open(empty(Kind::Group), Kind::User).is_err());
        store.0[0][4] = 0;
        assert_eq!(
            QuotaTree::open(store, Kind::User).err().map(|e| e.errno()),
            Some(Errno::EROFS)
        );
        // A root slot pointing past the end of the file.
        let mut store = empty(Kind::User);
        put_le32(&mut store.0[1], 0, 99);
        let mut tree = QuotaTree::open(store, Kind::User).unwrap();
        assert!(tree.find(5).is_err());
        assert!(tree.insert(5).is_err());
        // A tree that points back at the root cannot loop: depth is fixed.
        let mut store = empty(Kind::User);
        store.0.push([0; BLOCK]);
        put_le32(&mut store.0[0], INFO_BLOCKS, 3);
        put_le32(&mut store.0[1], 0, 2);
        put_le32(&mut store.0[2], 0, 2);
        let mut tree = QuotaTree::open(store, Kind::User).unwrap();
        assert!(tree.find(0).is_err() || tree.find(0).unwrap().is_none());
    }
}
