//! How the shared filesystem is opened: read-only at start (in
//! `.after_fork`), with an unclean journal replayed in memory; then, once,
//! read-write for the first writable connection when it can be, with
//! `ext2journal=replay` writing the replay into the image first, its
//! metadata changed from then on only through crash-consistent
//! transactions (`ext2_rs::txn`: [`open_writable`]).
//!
//! nbdkit tells a filter about `-r` only per connection, so the start
//! cannot know whether the server may write: it opens the plugin and the
//! filesystem read-only, writing nothing, and only a connection that may
//! write opens them again read-write.  `nbdkit -r` never does.

use std::sync::Arc;

use crate::device::Device;
use crate::image::{Image, RawDevice};
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::jbd2::Replay;
use ext2_rs::log::{self, Topic};
use ext2_rs::mmp::{MmpConfig, Protection};
use ext2_rs::policy::{Features, Verdict};
use ext2_rs::txn::Transactions;
use ext2_rs::{Access, Filesystem};

/// What to do with an image whose journal needs recovery (`ext2journal=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JournalMode {
    /// `memory` (the default): replay the journal in memory only and serve
    /// the image read-only; nothing is written.
    #[default]
    Memory,
    /// `replay`: when the server and the device can write, write the replay
    /// into the image, mark the journal empty and clear `needs_recovery` as
    /// e2fsck does, then serve read-write.
    Replay,
}

/// What [`reopen_writable`] made of the filesystem.
pub enum Reopened {
    /// It stays as it was: read-only (the log says why).
    Unchanged,
    /// Opened again read-only (the log says why): this one replaces it.
    ReadOnly(Filesystem),
    /// Opened read-write, changed through `tx`, under the MMP block `held`
    /// if it has the `mmp` feature.
    Writable {
        fs: Filesystem,
        tx: Box<Transactions>,
        held: Option<Protection>,
    },
}

/// Opens the filesystem over `device` (not open for writing yet)
/// read-only.  One whose journal needs recovery has it replayed in memory,
/// once, here: the image reads as `e2fsck` would leave it.
pub fn open_read_only(device: Arc<dyn Device>) -> Result<(Arc<Image>, Filesystem)> {
    let image = Arc::new(Image::new(device.clone()));
    let mut fs = open_checked(&image, Access::ReadOnly)?;
    if !fs.needs_recovery() {
        return Ok((image, fs));
    }
    let bs = u64::from(fs.block_size());
    let read_block = |block: u64, buf: &mut [u8]| -> std::result::Result<(), Errno> {
        device.pread(buf, block.checked_mul(bs).ok_or(Errno::EIO)?)
    };
    let replay = ext2_rs::jbd2::load(&mut fs, &read_block)?;
    drop(fs);
    let image = Arc::new(Image::with_replay(device, replay, bs));
    let fs = open_checked(&image, Access::ReadOnly)?;
    Ok((image, fs))
}

/// Opens the filesystem on `image`, refusing one larger than the image as
/// the kernel refuses to mount it: its files would be served until a read
/// reaches the missing part and fails.
fn open_checked(image: &Arc<Image>, access: Access) -> Result<Filesystem> {
    let fs = Filesystem::open(image.clone(), access)?;
    check_geometry(image, &fs)?;
    Ok(fs)
}

/// Refuses a filesystem `fs` larger than `image`.
fn check_geometry(image: &Image, fs: &Filesystem) -> Result<()> {
    let device_blocks = image.size() / u64::from(fs.block_size());
    if fs.blocks_count() > device_blocks {
        return Err(Error::other(
            Errno::EINVAL,
            format!(
                "open: bad geometry: block count {} exceeds size of device ({device_blocks} blocks)",
                fs.blocks_count()
            ),
        ));
    }
    Ok(())
}

/// Why the filesystem must stay read-only whatever the server allows, if
/// it must: a feature the kernel only mounts read-only (`ext2_rs::policy`).
fn unwritable_features(fs: &Filesystem) -> Option<String> {
    match ext2_rs::policy::filesystem(Features::of(fs.super_block())) {
        Verdict::ReadOnly(why) => Some(format!("{why}: serving read-only")),
        // One it refuses was not opened at all.
        _ => None,
    }
}

/// Why the filesystem, whose journal needs `replay`, stays read-only in
/// `ext2journal=` mode `journal`, if it does.
fn journal_refusal(replay: &Replay, journal: JournalMode) -> Option<String> {
    if journal == JournalMode::Memory {
        return Some(
            "the filesystem's journal needs recovery: replaying it in memory and \
             serving read-only (run e2fsck on the image, or add ext2journal=replay, \
             to serve it read-write)"
                .to_string(),
        );
    }
    replay_refusal(replay).map(|why| {
        format!(
            "the filesystem's journal needs recovery, but ext2journal=replay does \
             not write it into the image: {why}, and e2fsck would mark the \
             filesystem as having errors and check it: replaying it in memory \
             and serving read-only (run e2fsck on the image)"
        )
    })
}

/// Why a journal replay must not be written into the image, if it must not:
/// e2fsck would mark the filesystem as having errors after it.
fn replay_refusal(replay: &Replay) -> Option<String> {
    match replay.checkpoint() {
        Some(checkpoint) => checkpoint.errors.clone(),
        None => Some("the journal superblock is unknown".to_string()),
    }
}

/// What a read-only connection is told about `ext2journal=replay` while the
/// journal is replayed in memory only; `None` when there is nothing to say.
pub fn read_only_note(image: &Image, journal: JournalMode) -> Option<&'static str> {
    (journal == JournalMode::Replay && image.replaying()).then_some(
        "ext2journal=replay: the image cannot be written (-r, or a plugin that \
         cannot write): the journal is replayed in memory only and the image \
         served read-only",
    )
}

/// For the first connection that may write: opens the device for writing
/// and the filesystem `fs` on `image` again read-write, unless the image
/// must stay read-only (then with a message saying why).  With
/// `ext2journal=replay` an unclean journal is first written into the image.
///
/// `Ok` once that is settled either way; `Err` (the connection fails) when
/// it failed, leaving the filesystem read-only for the next connection that
/// may write to try again.  The caller holds the library lock throughout, so
/// requests of other connections wait, and then see the re-opened
/// filesystem.
pub fn reopen_writable(
    image: &Arc<Image>,
    fs: &mut Filesystem,
    journal: JournalMode,
) -> Result<Reopened> {
    if let Some(why) = unwritable_features(fs) {
        log::error(&why);
        return Ok(Reopened::Unchanged);
    }
    // As the kernel, multi-mount protection comes before the journal: a
    // filesystem another node has open (its journal in use) is refused
    // for that, not served read-only for the journal it is writing.
    let mmp = fs.mmp_config()?;
    let refusal = image
        .replay()
        .and_then(|replay| journal_refusal(replay, journal));
    if let (Some(why), None) = (&refusal, &mmp) {
        log::error(why);
        return Ok(Reopened::Unchanged);
    }
    let device = image.device();
    device.open_writable().map_err(Error::reported)?;
    if !device.capabilities().can_write {
        if let Some(note) = read_only_note(image, journal) {
            log::error(note);
        }
        return Ok(Reopened::Unchanged);
    }
    // Nothing is written before the MMP block is ours (`mmp`).
    let held = protect(image, mmp)?;
    if let Some(why) = refusal {
        // Released (marked clean) with `held`.
        log::error(&why);
        return Ok(Reopened::Unchanged);
    }
    let bs = u64::from(fs.block_size());
    let replayed = match image.replay() {
        Some(replay) => {
            let count = replay_into_image(image, replay, bs)?;
            image.replay_is_written();
            Some(count)
        }
        None => None,
    };
    let after = |e: Error, what: &str| {
        e.in_context(format!(
            "journal: the replay is written and the journal marked empty, \
             but {what} failed (needs_recovery is still set: e2fsck or the \
             kernel will clear it)"
        ))
    };
    // A replay written into the image, here or by an earlier try, leaves
    // `needs_recovery` set over an empty journal: cleared first, directly,
    // as e2fsck does (the transactions would keep it set).
    if image.replay_was_written()
        && clear_needs_recovery(image, held.as_ref())
            .map_err(|e| after(e, "clearing needs_recovery"))?
    {
        log::error(&format!(
            "replayed {} blocks of the journal into the image; the journal is \
             marked empty and needs_recovery cleared, as e2fsck does: serving read-write",
            replayed.unwrap_or_default()
        ));
    }
    Ok(
        match open_writable(image, held.as_ref()).map_err(|e| match replayed {
            Some(_) => after(e, "opening the filesystem read-write"),
            None => e,
        })? {
            (fs, Some(tx)) => Reopened::Writable {
                fs,
                tx: Box::new(tx),
                held,
            },
            // The MMP block is released (marked clean) with `held`.
            (fs, None) => Reopened::ReadOnly(fs),
        },
    )
}

/// Takes the MMP block of a filesystem with the `mmp` feature (`config`),
/// as the kernel does at a read-write mount, before anything is written:
/// refused, with a message naming the node, while another node holds it.
/// Once taken, `image` refuses every write if another node takes it over.
fn protect(image: &Arc<Image>, config: Option<MmpConfig>) -> Result<Option<Protection>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let device = Arc::new(RawDevice(image.device().clone()));
    let host = ext2_rs::mmp::host_name();
    let name = format!("nbdkit[{}]", std::process::id());
    ext2_rs::debug!(
        Topic::Lock,
        "multi-mount protection: taking MMP block {} (update interval {} s)",
        config.block,
        config.update_interval
    );
    let held = Protection::take(device, config, &host, &name)?;
    image.fence(held.watch());
    Ok(Some(held))
}

/// Opens the filesystem on `image` read-write (under `held`, with `mmp`),
/// its metadata changed only through crash-consistent transactions
/// (`ext2_rs::txn`, which says how it keeps them, and why when it cannot
/// use the journal), or, when ext2-rs will not write it (features libext2fs
/// cannot write, quota files ext2-rs cannot keep: see `ext2_rs::policy`
/// and `ext2_rs::quota`), read-only with a message saying why.
fn open_writable(
    image: &Arc<Image>,
    held: Option<&Protection>,
) -> Result<(Filesystem, Option<Transactions>)> {
    match ext2_rs::txn::open_read_write(image.clone(), held) {
        Err(e @ Error::ReadOnly(_)) => {
            log::error(&format!("{e}: serving read-only"));
            let fs = open_checked(image, Access::ReadOnly)?;
            Ok((fs, None))
        }
        Err(e) => Err(e),
        Ok((fs, tx)) => {
            check_geometry(image, &fs)?;
            Ok((fs, Some(tx)))
        }
    }
}

/// Clears `needs_recovery` on the device directly, if it is set, as
/// e2fsck does once a journal replayed into the image is marked empty;
/// says whether it was set.
fn clear_needs_recovery(image: &Arc<Image>, held: Option<&Protection>) -> Result<bool> {
    let mut fs = match held {
        Some(held) => Filesystem::open_protected(image.clone(), held)?,
        None => Filesystem::open(image.clone(), Access::ReadWrite)?,
    };
    check_geometry(image, &fs)?;
    if !fs.needs_recovery() {
        return Ok(false);
    }
    fs.clear_needs_recovery()?;
    Ok(true)
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
fn replay_into_image(image: &Image, replay: &Replay, bs: u64) -> Result<usize> {
    let device = image.device();
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
        image.pread(&mut buf, offset).map_err(|errno| {
            Error::other(
                errno,
                format!(
                    "journal: reading the logged copies of blocks {first}-{last} failed: {still}"
                ),
            )
        })?;
        if ext2_rs::jbd2::keep_needs_recovery(&mut buf, offset) {
            ext2_rs::debug!(
                Topic::Journal,
                "journal: the replayed superblock lacks needs_recovery: it is written with \
                 the flag set, which is cleared once the journal is empty"
            );
        }
        device.pwrite(&buf, offset, false).map_err(|errno| {
            Error::other(
                errno,
                format!("journal: writing replayed blocks {first}-{last} into the image failed: {still}"),
            )
        })?;
        i += n;
    }
    device.flush().map_err(|errno| {
        Error::other(
            errno,
            format!("journal: flushing the replayed blocks failed: {still}"),
        )
    })?;
    ext2_rs::debug!(
        Topic::Journal,
        "journal: {} replayed blocks written and flushed; marking the journal empty \
         (image block {}, next transaction {})",
        blocks.len(),
        checkpoint.superblock_block,
        checkpoint.next_sequence
    );
    device
        .pwrite(&empty, checkpoint.superblock_block * bs, false)
        .and_then(|()| device.flush())
        .map_err(|errno| {
            Error::other(
                errno,
                "journal: the replayed blocks are written, but marking the journal empty failed: \
                 the journal may still need recovery (e2fsck or the kernel replays it again)",
            )
        })?;
    Ok(blocks.len())
}
