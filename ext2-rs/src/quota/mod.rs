//! Quota usage kept as the kernel keeps it.
//!
//! With the `quota` feature (and `project`), ext4 keeps hidden quota files
//! whose usage must match what the inodes hold: every block given to a file
//! or taken from it changes its owner's `dqb_curspace` in the user, group
//! and project files, in the same change as the allocation, or `e2fsck -fn`
//! reports `Usage inconsistent`.  libext2fs's quota code lives in e2fsprogs'
//! internal support library, which distributions do not install, so the
//! format ([`tree`]) is ours, read and written through libext2fs's file
//! code ([`crate::libfile`]).
//!
//! A change to a file's blocks runs inside `Filesystem::charging`: the inode's block
//! count (`i_blocks`, which counts extent-tree and indirect blocks and whole
//! clusters on bigalloc, exactly what the kernel charges) is read before
//! and after, and the difference goes to the owner's three records.  An
//! owner without a record gets one, as the kernel gives one at first use.
//! Limits are not enforced: ext4 enforces them only when mounted with
//! quota options, and the filter never creates inodes.

pub mod tree;

use std::collections::HashMap;

use crate::error::{check, Errno, Error, Result};
use crate::handle::{Handle, Ino};
use crate::libfile::LibraryFile;
use crate::sys;
pub use tree::Kind;
use tree::{Block, EntryOffset, QuotaTree, Store, BLOCK};

/// The quota files of a filesystem opened read-write, and where each id's
/// record was last found.
#[derive(Debug, Default)]
pub struct Quotas {
    files: Vec<(Kind, Ino)>,
    found: HashMap<(Kind, u32), EntryOffset>,
}

/// The ids a file's blocks are charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub project: u32,
}

impl Owner {
    fn id(&self, kind: Kind) -> u32 {
        match kind {
            Kind::User => self.uid,
            Kind::Group => self.gid,
            Kind::Project => self.project,
        }
    }
}

/// A quota file as 1 KiB blocks, through libext2fs's file code.
struct InodeStore<'fs>(LibraryFile<'fs>);

impl Store for InodeStore<'_> {
    fn read(&mut self, index: u32) -> Result<Block> {
        let mut block = [0u8; BLOCK];
        self.0
            .read_at(&mut block, u64::from(index) * BLOCK as u64)?;
        Ok(block)
    }

    fn write(&mut self, index: u32, block: &Block) -> Result<()> {
        self.0.write_at(block, u64::from(index) * BLOCK as u64)
    }
}

impl Quotas {
    /// The quota files the superblock names, each checked (header, format
    /// revision); `None` when the filesystem keeps no quotas.  An error
    /// means the files cannot be kept: the filesystem must not be written.
    pub fn load(fs: &mut Handle) -> Result<Option<Quotas>> {
        let sb = fs.super_block();
        if sb.s_feature_ro_compat & sys::EXT4_FEATURE_RO_COMPAT_QUOTA == 0 {
            return Ok(None);
        }
        let project = sb.s_feature_ro_compat & sys::EXT4_FEATURE_RO_COMPAT_PROJECT != 0;
        let files: Vec<(Kind, Ino)> = [
            (Kind::User, sb.s_usr_quota_inum),
            (Kind::Group, sb.s_grp_quota_inum),
            (Kind::Project, if project { sb.s_prj_quota_inum } else { 0 }),
        ]
        .into_iter()
        .filter(|&(_, ino)| ino != 0)
        .collect();
        let inodes = sb.s_inodes_count;
        for &(kind, ino) in &files {
            if ino > inodes {
                return Err(Error::other(
                    Errno::EIO,
                    format!(
                        "the superblock names inode {ino} as the {} quota file, past the \
                         last inode {inodes}: the image is damaged",
                        kind.name()
                    ),
                ));
            }
            let file = LibraryFile::open(fs, ino, false)
                .map_err(|e| e.in_context(format!("the {} quota file", kind.name())))?;
            QuotaTree::open(InodeStore(file), kind)?;
        }
        Ok(Some(Quotas {
            files,
            found: HashMap::new(),
        }))
    }

    /// Which quota files are kept, and in which inodes.
    pub fn files(&self) -> &[(Kind, Ino)] {
        &self.files
    }

    /// Adds `delta` bytes to `owner`'s usage in every quota file, creating
    /// records that are missing.
    pub fn add_space(&mut self, fs: &mut Handle, owner: Owner, delta: i64) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        for &(kind, ino) in &self.files {
            let id = owner.id(kind);
            let context = || format!("the {} quota file, id {id}", kind.name());
            let file = LibraryFile::open(fs, ino, true).map_err(|e| e.in_context(context()))?;
            let mut store = InodeStore(file);
            // Where the record is: remembered (records never move), found
            // in the tree, or new.
            let at = match self.found.get(&(kind, id)) {
                Some(&at) => at,
                None => {
                    let mut tree = QuotaTree::open(store, kind)?;
                    let at = match tree.find(id)? {
                        Some(at) => {
                            // Remembered only once found on disk: a record
                            // inserted by a change that is then rolled back
                            // must be looked for again.
                            self.found.insert((kind, id), at);
                            at
                        }
                        None => tree.insert(id)?,
                    };
                    store = tree.into_store();
                    at
                }
            };
            tree::update_entry(&mut store, kind, at, |entry| {
                if entry.id() != id {
                    return Err(Error::other(
                        Errno::EIO,
                        format!("{}: its record was overwritten", context()),
                    ));
                }
                entry.add_space(delta);
                Ok(())
            })
            .inspect_err(|_| {
                self.found.remove(&(kind, id));
            })?;
            store.0.close().map_err(|e| e.in_context(context()))?;
        }
        Ok(())
    }

    /// Every record of the `kind` file (for checks and tests): (id, space,
    /// inodes).
    pub fn records(&self, fs: &mut Handle, kind: Kind) -> Result<Vec<(u32, u64, u64)>> {
        let Some(&(_, ino)) = self.files.iter().find(|(k, _)| *k == kind) else {
            return Ok(Vec::new());
        };
        let mut tree = QuotaTree::open(InodeStore(LibraryFile::open(fs, ino, false)?), kind)?;
        Ok(tree
            .all_entries()?
            .iter()
            .map(|e| (e.id(), e.space(), e.inodes()))
            .collect())
    }
}

/// The ids a file is charged to, and the bytes it holds (`i_blocks` in
/// bytes), as e2fsck and the kernel read them.
pub fn owner_and_usage(fs: &mut Handle, ino: Ino) -> Result<(Owner, u64)> {
    let mut inode = sys::ext2_inode_large::default();
    // SAFETY: open filesystem; the buffer is an ext2_inode_large and its
    // size is passed, so the library copies at most that much.
    let code = unsafe {
        sys::ext2fs_read_inode_full(
            fs.raw(),
            ino,
            (&mut inode as *mut sys::ext2_inode_large).cast(),
            std::mem::size_of::<sys::ext2_inode_large>() as i32,
        )
    };
    check(code, || "inode".into())?;
    // SAFETY: `linux2` is the layout of Linux-created inodes; every
    // field is a plain integer, valid for any bits.
    let linux = unsafe { inode.osd2.linux2 };
    let uid = u32::from(inode.i_uid) | u32::from(linux.l_i_uid_high) << 16;
    let gid = u32::from(inode.i_gid) | u32::from(linux.l_i_gid_high) << 16;
    // i_projid exists only in large inodes whose extra fields reach it.
    let inode_size = u32::from(fs.super_block().s_inode_size);
    let projid_end = std::mem::offset_of!(sys::ext2_inode_large, i_projid) as u32 + 4;
    let project = if inode_size > sys::EXT2_GOOD_OLD_INODE_SIZE
        && sys::EXT2_GOOD_OLD_INODE_SIZE + u32::from(inode.i_extra_isize) >= projid_end
    {
        inode.i_projid
    } else {
        0
    };
    // SAFETY: open filesystem; the large inode starts with an ext2_inode.
    let sectors = unsafe {
        sys::ext2fs_get_stat_i_blocks(fs.raw(), (&mut inode as *mut sys::ext2_inode_large).cast())
    };
    Ok((Owner { uid, gid, project }, sectors.saturating_mul(512)))
}

#[cfg(test)]
mod tests;
