//! How the shared filesystem is opened: read-write when it can be, read-only
//! when it must be, and with an unclean journal replayed in memory or, on
//! request, into the image.

use std::sync::Arc;

use crate::filter::config::JournalMode;
use crate::image::{Image, PluginDevice};
use crate::nbdkit::report::{ext2_debug_journal, ext2_debug_lock, nbd_debug};
use crate::nbdkit::Plugin;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::jbd2::Replay;
use ext2_rs::mmp::{MmpConfig, Protection};
use ext2_rs::policy::{Features, Verdict};
use ext2_rs::{Access, Filesystem};

/// An open filesystem: its image, the filesystem, how it is open, and the
/// multi-mount protection it is written under (with the `mmp` feature).
pub type Opened = (Arc<Image>, Filesystem, Access, Option<Protection>);

/// Opens the filesystem over `plugin`.  A filesystem the kernel would only
/// read is served read-only with a message saying why (`ext2_rs::policy`).
/// One whose journal needs recovery is served read-only with the journal
/// replayed in memory, with a message; or, with `ext2journal=replay` when
/// it could be written, has the replay written into the image first (see
/// [`replay_into_image`]) and is served read-write.  One with `mmp` is
/// written only once its MMP block is taken (see [`protect`]).
pub fn open_filesystem(plugin: Plugin, want_write: bool, journal: JournalMode) -> Result<Opened> {
    let plugin = Arc::new(plugin);
    let image = Arc::new(Image::new(plugin.clone()));
    let can_write = want_write && plugin.capabilities().can_write;
    // Look read-only first: opening read-write reads and checks the
    // bitmaps, which in an image whose journal needs recovery may not
    // match their checksums (in the group descriptors) until the
    // journal is replayed.
    let mut fs = Filesystem::open(image.clone(), Access::ReadOnly)?;
    if fs.needs_recovery() {
        return open_unclean(plugin, image, fs, can_write, journal);
    }
    if !can_write {
        return Ok((image, fs, Access::ReadOnly, None));
    }
    // Decided before the MMP block is taken, which may take seconds.
    if let Verdict::ReadOnly(why) = ext2_rs::policy::filesystem(Features::of(fs.super_block())) {
        crate::nbdkit::report::error(&format!("{why}: serving read-only"));
        return Ok((image, fs, Access::ReadOnly, None));
    }
    let mmp = MmpConfig::of(&mut fs)?;
    drop(fs);
    let held = protect(&image, mmp)?;
    let (fs, access) = open_writable(&image, held.as_ref())?;
    // Served read-only after all: the block is released (marked clean).
    let held = held.filter(|_| access == Access::ReadWrite);
    Ok((image, fs, access, held))
}

/// Takes the MMP block of a filesystem with the `mmp` feature (`config`),
/// as the kernel does at a read-write mount, before anything is written:
/// refused, with a message naming the node, while another node holds it.
/// Once taken, `image` refuses every write if another node takes it over.
fn protect(image: &Arc<Image>, config: Option<MmpConfig>) -> Result<Option<Protection>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let device = Arc::new(PluginDevice(image.plugin().clone()));
    let host = ext2_rs::mmp::host_name();
    let name = format!("nbdkit[{}]", std::process::id());
    nbd_debug!(
        ext2_debug_lock,
        "multi-mount protection: taking MMP block {} (update interval {} s)",
        config.block,
        config.update_interval
    );
    let held = Protection::take(device, config, &host, &name)?;
    image.fence(held.watch());
    Ok(Some(held))
}

/// Opens the filesystem on `image` read-write, under `held` if it has mmp.
fn open_read_write(image: &Arc<Image>, held: Option<&Protection>) -> Result<Filesystem> {
    match held {
        Some(held) => Filesystem::open_protected(image.clone(), held),
        None => Filesystem::open(image.clone(), Access::ReadWrite),
    }
}

/// Opens a filesystem whose journal needs recovery (`fs` is it, open
/// read-only): the journal is replayed in memory and served read-only, or,
/// with `ext2journal=replay` on a writable server, written into the image
/// first and then served read-write.
fn open_unclean(
    plugin: Arc<Plugin>,
    mut image: Arc<Image>,
    mut fs: Filesystem,
    can_write: bool,
    journal: JournalMode,
) -> Result<Opened> {
    let mut access = Access::ReadOnly;
    let mut held = None;
    let verdict = ext2_rs::policy::filesystem(Features::of(fs.super_block()));
    let mut write_out = can_write && journal == JournalMode::Replay;
    if let (true, Verdict::ReadOnly(why)) = (can_write, &verdict) {
        crate::nbdkit::report::error(&format!(
            "{why}: the journal is replayed in memory and the filesystem served read-only"
        ));
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
    let replay = ext2_rs::jbd2::load(&mut fs, &read_block)?;
    let mmp = if write_out {
        MmpConfig::of(&mut fs)?
    } else {
        None
    };
    drop(fs);
    let refusal = match replay.checkpoint() {
        Some(checkpoint) => checkpoint.errors.clone(),
        None => Some("the journal superblock is unknown".to_string()),
    };
    match refusal {
        None if write_out => {
            held = protect(&image, mmp)?;
            let count = replay_into_image(&plugin, replay, bs)?;
            let after = |e: Error, what: &str| {
                e.in_context(format!(
                    "journal: the replay is written and the journal marked empty, \
                         but {what} failed (needs_recovery is still set: e2fsck or the \
                         kernel will clear it)"
                ))
            };
            access = Access::ReadWrite;
            fs = open_read_write(&image, held.as_ref())
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
            fs = Filesystem::open(image.clone(), access)?;
        }
    }
    Ok((image, fs, access, held))
}

/// Opens the filesystem on `image` read-write (under `held`, with mmp) or,
/// when ext2-rs will not write it (quotas it cannot keep: see
/// `ext2_rs::policy` and `ext2_rs::quota`), read-only with a message
/// saying why.
fn open_writable(image: &Arc<Image>, held: Option<&Protection>) -> Result<(Filesystem, Access)> {
    match open_read_write(image, held) {
        Err(e) if e.errno() == Errno::EROFS => {
            crate::nbdkit::report::error(&format!("{e}: serving read-only"));
            let fs = Filesystem::open(image.clone(), Access::ReadOnly)?;
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
///    ([`ext2_rs::jbd2::keep_needs_recovery`]), and the plugin is flushed;
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
        if ext2_rs::jbd2::keep_needs_recovery(&mut buf, offset) {
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
