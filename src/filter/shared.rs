//! The one filesystem all connections share, and the registry of files
//! being served from it.
//!
//! Lock order, outermost first: the registry, a file's map, the allocation
//! gate, the filesystem lock.  Plugin I/O for file data happens under a
//! file's map lock at most, never under the filesystem lock.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::error::{Errno, Error, Result};
use crate::ext2::{io_shim, mapping, Access, Filesystem, Ino, Layout};
use crate::extent_map::FileMap;
use crate::filter::config::JournalMode;
use crate::filter::file::ServedFile;
use crate::image::Image;
use crate::journal::Replay;
use crate::nbdkit::report::{ext2_debug_journal, ext2_debug_lock, ext2_debug_map, nbd_debug};
use crate::nbdkit::Plugin;

pub struct Shared {
    /// Where file data and metadata are read and written.
    pub image: Arc<Image>,
    /// The process-wide libext2fs lock: every library call holds it.
    fs: Mutex<Filesystem>,
    /// Held shared from allocating blocks until they are linked into a file,
    /// and exclusively by flush, so a flush never records blocks as in use
    /// that no file owns yet.
    alloc_gate: RwLock<()>,
    files: Mutex<HashMap<Ino, Weak<ServedFile>>>,
    pub block_size: u32,
    pub access: Access,
}

impl Shared {
    /// Opens the filesystem over `plugin`.  A filesystem libext2fs can only
    /// read is served read-only with a message saying why.  One whose
    /// journal needs recovery is served read-only with the journal replayed
    /// in memory, with a message; or, with `ext2journal=replay` when it
    /// could be written, has the replay written into the image first (see
    /// [`replay_into_image`]) and is served read-write.
    pub fn open(plugin: Plugin, want_write: bool, journal: JournalMode) -> Result<Shared> {
        let plugin = Arc::new(plugin);
        let mut image = Arc::new(Image::new(plugin.clone()));
        let can_write = want_write && plugin.capabilities().can_write;
        // Look read-only first: opening read-write reads and checks the
        // bitmaps, which in an image whose journal needs recovery may not
        // match their checksums (in the group descriptors) until the
        // journal is replayed.
        let mut fs = Filesystem::open(io_shim::register(image.clone()), Access::ReadOnly)?;
        let mut access = Access::ReadOnly;
        if !fs.needs_recovery() {
            if can_write {
                drop(fs);
                (fs, access) = open_writable(&image)?;
            }
        } else {
            let unwritable =
                fs.super_block().s_feature_ro_compat & !crate::sys::EXT2_LIB_FEATURE_RO_COMPAT_SUPP;
            let mut write_out = can_write && journal == JournalMode::Replay;
            if can_write && unwritable != 0 {
                crate::nbdkit::report::error(
                    "the filesystem has features libext2fs can read but not write: serving read-only",
                );
                write_out = false;
            } else if can_write && !write_out {
                crate::nbdkit::report::error(
                    "the filesystem's journal needs recovery: replaying it in memory and \
                     serving read-only (run e2fsck on the image, or add ext2journal=replay, \
                     to serve it read-write)",
                );
            } else if !can_write && journal == JournalMode::Replay {
                crate::nbdkit::report::error(
                    "ext2journal=replay: the image cannot be written (-r, or a plugin that \
                     cannot write): the journal is replayed in memory only and the image \
                     served read-only",
                );
            }
            // The journal is read with the filesystem open read-only:
            // nothing is written before the replay is known to be good.
            let bs = u64::from(fs.block_size());
            let read_block = |block: u64, buf: &mut [u8]| -> std::result::Result<(), Errno> {
                plugin.pread(buf, block.checked_mul(bs).ok_or(Errno::EIO)?)
            };
            let replay = crate::journal::load(&mut fs, &read_block)?;
            drop(fs);
            let refusal = match replay.checkpoint() {
                Some(checkpoint) => checkpoint.errors.clone(),
                None => Some("the journal superblock is unknown".to_string()),
            };
            match refusal {
                None if write_out => {
                    let count = replay_into_image(&plugin, replay, bs)?;
                    let after = |e: Error, what: &str| {
                        rename_context(
                            e,
                            format!(
                                "journal: the replay is written and the journal marked empty, \
                                 but {what} failed (needs_recovery is still set: e2fsck or the \
                                 kernel will clear it)"
                            ),
                        )
                    };
                    access = Access::ReadWrite;
                    fs = Filesystem::open(io_shim::register(image.clone()), access)
                        .map_err(|e| after(e, "opening the filesystem read-write"))?;
                    fs.clear_needs_recovery()
                        .map_err(|e| after(e, "clearing needs_recovery"))?;
                    crate::nbdkit::report::error(&format!(
                        "replayed {count} blocks of the journal into the image; the journal is \
                         marked empty and needs_recovery cleared, as e2fsck does: serving read-write"
                    ));
                }
                _ => {
                    if let (true, Some(why)) = (write_out, refusal) {
                        crate::nbdkit::report::error(&format!(
                            "the filesystem's journal needs recovery, but ext2journal=replay does \
                             not write it into the image: {why}, and e2fsck would mark the \
                             filesystem as having errors and check it: replaying it in memory \
                             and serving read-only (run e2fsck on the image)"
                        ));
                    }
                    image = Arc::new(Image::with_replay(plugin.clone(), replay, bs));
                    fs = Filesystem::open(io_shim::register(image.clone()), access)?;
                }
            }
        }
        Ok(Shared {
            block_size: fs.block_size(),
            image,
            fs: Mutex::new(fs),
            alloc_gate: RwLock::new(()),
            files: Mutex::new(HashMap::new()),
            access,
        })
    }

    pub fn plugin(&self) -> &Plugin {
        self.image.plugin()
    }

    pub fn writable(&self) -> bool {
        self.access == Access::ReadWrite
    }

    /// Takes the libext2fs lock.
    pub fn lock_fs(&self) -> MutexGuard<'_, Filesystem> {
        if !ext2_debug_lock.enabled() {
            return self.fs.lock();
        }
        let start = Instant::now();
        let guard = self.fs.lock();
        let waited = start.elapsed();
        if waited.as_micros() >= 1000 {
            nbd_debug!(
                ext2_debug_lock,
                "waited {:?} for the filesystem lock",
                waited
            );
        }
        guard
    }

    pub fn allocation_pass(&self) -> RwLockReadGuard<'_, ()> {
        self.alloc_gate.read()
    }

    /// The shared state of the file at `path`, building its block map the
    /// first time any connection opens it.
    pub fn open_file(&self, path: &str) -> Result<Arc<ServedFile>> {
        let lookup = crate::filter::config::lookup_path(path)
            .map_err(|msg| Error::other(Errno::ENOTDIR, msg))?;
        let mut files = self.files.lock();
        let mut fs = self.lock_fs();
        let ino = fs
            .lookup(&lookup)
            .map_err(|e| rename_context(e, format!("{path}: namei")))?;
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let info = fs
            .inode(ino)
            .map_err(|e| rename_context(e, format!("{path}: inode")))?;
        if !info.is_regular() {
            return Err(Error::other(
                if info.is_dir() {
                    Errno::EISDIR
                } else {
                    Errno::EINVAL
                },
                format!("{path}: must be a regular file in the disk image"),
            ));
        }
        let extents = mapping::read_map(&mut fs, ino, info.layout)
            .map_err(|e| rename_context(e, path.to_string()))?;
        let count = extents.len();
        let map = FileMap::new(fs.block_size(), extents).map_err(|msg| {
            Error::other(Errno::EIO, format!("{path}: {msg}: the image is damaged"))
        })?;
        nbd_debug!(
            ext2_debug_map,
            "{path}: inode {ino}, {} bytes, {:?}, {count} extents in {} runs ({} bytes of map)",
            info.size,
            info.layout,
            map.extents().len(),
            map.memory()
        );
        drop(fs);
        let file = Arc::new(ServedFile::new(
            ino,
            path.to_string(),
            info.size,
            info.layout,
            map,
        ));
        files.retain(|_, weak| weak.strong_count() > 0);
        files.insert(ino, Arc::downgrade(&file));
        Ok(file)
    }

    /// Makes the filesystem's metadata and then the plugin durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable() {
            let _no_allocations = self.alloc_gate.write();
            // ext2fs_flush2 ends with a flush of our channel, i.e. the plugin.
            self.lock_fs().flush()
        } else {
            self.image.flush().map_err(Error::from)
        }
    }

    pub fn layout_supports_write(layout: Layout) -> bool {
        layout != Layout::Inline
    }
}

/// Opens the filesystem on `image` read-write or, when it has features
/// libext2fs can read but not write, read-only with a message.
fn open_writable(image: &Arc<Image>) -> Result<(Filesystem, Access)> {
    match Filesystem::open(io_shim::register(image.clone()), Access::ReadWrite) {
        Err(Error::Ext2 { code, .. })
            if code.0 == crate::sys::EXT2_ET_RO_UNSUPP_FEATURE as crate::sys::errcode_t =>
        {
            crate::nbdkit::report::error(
                "the filesystem has features libext2fs can read but not write: serving read-only",
            );
            let fs = Filesystem::open(io_shim::register(image.clone()), Access::ReadOnly)?;
            Ok((fs, Access::ReadOnly))
        }
        other => Ok((other?, Access::ReadWrite)),
    }
}

/// The largest run of replayed blocks read and written as one request.
const REPLAY_RUN_BYTES: u64 = 1 << 20;

/// Writes a journal's replay into the image as e2fsck's recovery does, and
/// returns how many blocks it wrote.  The order keeps a crash at any point
/// recoverable:
///
/// 1. every replayed block is written to its place, with exactly the bytes
///    the in-memory replay serves (escaped copies get their magic back),
///    except that a replayed primary superblock keeps `needs_recovery` set
///    ([`crate::journal::keep_needs_recovery`]), and the plugin is flushed;
/// 2. the journal superblock is rewritten as empty (`s_start = 0`,
///    `s_sequence` past the last transaction, checksum), and the plugin is
///    flushed;
/// 3. (the caller) `needs_recovery` is cleared and flushed.
///
/// Before 2 completes the journal still holds every transaction, so e2fsck
/// or the kernel replays it again, writing the same blocks; after it, an
/// empty journal with `needs_recovery` set has nothing to replay.  A
/// failure returns an error saying the journal still needs recovery.
fn replay_into_image(plugin: &Arc<Plugin>, replay: Replay, bs: u64) -> Result<usize> {
    let checkpoint = replay
        .checkpoint()
        .cloned()
        .ok_or_else(|| Error::other(Errno::EIO, "journal: the journal superblock is unknown"))?;
    let empty = checkpoint.empty_superblock()?;
    let blocks: Vec<u64> = replay
        .blocks()
        .into_iter()
        .map(|(block, _)| block)
        .collect();
    let replayed = Image::with_replay(plugin.clone(), replay, bs);
    let still = "the journal still needs recovery: it and needs_recovery are unchanged, and \
                 replaying it again (on the next connection, or with e2fsck) writes the same \
                 blocks";
    let max_run = (REPLAY_RUN_BYTES / bs).max(1) as usize;
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i];
        let mut n = 1;
        while n < max_run && i + n < blocks.len() && blocks[i + n] == first + n as u64 {
            n += 1;
        }
        let last = first + n as u64 - 1;
        let offset = first * bs;
        let mut buf = vec![0u8; n * bs as usize];
        replayed.pread(&mut buf, offset).map_err(|errno| {
            Error::other(
                errno,
                format!(
                    "journal: reading the logged copies of blocks {first}-{last} failed: {still}"
                ),
            )
        })?;
        if crate::journal::keep_needs_recovery(&mut buf, offset) {
            nbd_debug!(
                ext2_debug_journal,
                "journal: the replayed superblock lacks needs_recovery: it is written with \
                 the flag set, which is cleared once the journal is empty"
            );
        }
        plugin.pwrite(&buf, offset, false).map_err(|errno| {
            Error::other(
                errno,
                format!("journal: writing replayed blocks {first}-{last} into the image failed: {still}"),
            )
        })?;
        i += n;
    }
    plugin.flush().map_err(|errno| {
        Error::other(
            errno,
            format!("journal: flushing the replayed blocks failed: {still}"),
        )
    })?;
    nbd_debug!(
        ext2_debug_journal,
        "journal: {} replayed blocks written and flushed; marking the journal empty \
         (image block {}, next transaction {})",
        blocks.len(),
        checkpoint.superblock_block,
        checkpoint.next_sequence
    );
    plugin
        .pwrite(&empty, checkpoint.superblock_block * bs, false)
        .and_then(|()| plugin.flush())
        .map_err(|errno| {
            Error::other(
                errno,
                "journal: the replayed blocks are written, but marking the journal empty failed: \
                 the journal may still need recovery (e2fsck or the kernel replays it again)",
            )
        })?;
    Ok(blocks.len())
}

/// Prefixes a library error with what it was about, as the C filter does
/// (`/nonexistent: namei: File not found by ext2_lookup`).
fn rename_context(err: Error, context: String) -> Error {
    match err {
        Error::Ext2 { code, .. } => Error::Ext2 { context, code },
        Error::Other { message, errno } => Error::Other {
            message: format!("{context}: {message}"),
            errno,
        },
        other => other,
    }
}
