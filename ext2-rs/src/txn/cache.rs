//! The metadata block cache libext2fs reads and writes through.
//!
//! Every write libext2fs makes lands here, never on the device: a change
//! in progress writes into an overlay that is dropped if the change fails
//! and merged if it succeeds; merged blocks are *dirty* (part of the
//! running transaction) until the transaction takes them
//! ([`MetaCache::take_dirty`]) and writes them itself, in the order its
//! crash-consistency rules ask for.  Reads see the overlay, then the
//! cached blocks (dirty or clean), then the device; blocks read from the
//! device are kept clean, within a memory budget, so metadata is not read
//! again for every change.  `flush` does nothing: durability is the
//! transaction's business.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::thread::{self, ThreadId};

use parking_lot::Mutex;

use crate::device::BlockDevice;
use crate::error::Errno;

const IGNORE_CSUM_ERRORS: i32 = crate::sys::EXT2_FLAG_IGNORE_CSUM_ERRORS as i32;

/// Memory kept for clean blocks by default.
const DEFAULT_CLEAN_BUDGET: u64 = 32 << 20;
/// The largest zeroing libext2fs may ask for: it only zeroes new
/// metadata blocks (indirect blocks, extent nodes).
const MAX_ZERO_BYTES: u64 = 16 << 20;

pub struct MetaCache {
    raw: Arc<dyn BlockDevice>,
    bs: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Current contents of cached blocks; dirty ones are in `dirty`.
    blocks: HashMap<u64, Cached>,
    /// Blocks of the running transaction, in block order.
    dirty: BTreeSet<u64>,
    /// The writes of the change in progress, if any.
    overlay: Option<HashMap<u64, Vec<u8>>>,
    clean_bytes: u64,
    budget: u64,
    tick: u64,
    /// Blocks were taken and may not be home yet: evict nothing.
    pinned: bool,
    /// Commits in progress: blocks read from the device are kept.
    sessions: usize,
    /// Blocks the change in progress read from the device: trusted if it
    /// succeeds, forgotten if not.
    loaded: Vec<u64>,
    /// libext2fs's `flags` of the filesystem the change in progress runs
    /// on (see [`MetaCache::begin_change`]).
    fs_flags: Option<*mut i32>,
    /// The thread running the change in progress: only its reads see the
    /// change's overlay and count as the change's own.  Others (a host's
    /// readers of metadata that need no library lock) see the blocks as
    /// the last finished change left them.
    change_thread: Option<ThreadId>,
}

// SAFETY: `fs_flags` is only set for the duration of a change, by the
// thread that holds the filesystem (and so its flags) exclusively, and only
// used by that thread's reads, which libext2fs makes during the change.
unsafe impl Send for Inner {}

struct Cached {
    data: Vec<u8>,
    /// Last use, for evicting the least recently used clean blocks.
    used: u64,
    /// libext2fs wrote it, or read it in a change that succeeded (so any
    /// checksum it has passed): it need not be checked again.
    trusted: bool,
}

/// Keeps blocks read from the device cached while it lives (a commit).
pub struct Remembering<'a>(&'a MetaCache);

impl Drop for Remembering<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().sessions -= 1;
    }
}

/// A contiguous run of whole blocks inside a byte request.
struct Piece {
    block: u64,
    /// Byte range of the block the request covers.
    from: usize,
    to: usize,
    /// Where in the request's buffer it starts.
    at: usize,
}

fn pieces(offset: u64, len: usize, bs: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len as u64;
    let first = offset / bs;
    let last = end.div_ceil(bs);
    (first..last).map(move |block| {
        let start = (block * bs).max(offset);
        let stop = ((block + 1) * bs).min(end);
        Piece {
            block,
            from: (start - block * bs) as usize,
            to: (stop - block * bs) as usize,
            at: (start - offset) as usize,
        }
    })
}

impl MetaCache {
    /// A cache of `block_size`-byte blocks over `raw`.
    pub fn new(raw: Arc<dyn BlockDevice>, block_size: u64) -> MetaCache {
        MetaCache {
            raw,
            bs: block_size,
            inner: Mutex::new(Inner {
                budget: DEFAULT_CLEAN_BUDGET,
                ..Inner::default()
            }),
        }
    }

    pub fn raw(&self) -> &Arc<dyn BlockDevice> {
        &self.raw
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Keeps what is read from the device cached until the guard drops.
    pub fn remembering(&self) -> Remembering<'_> {
        self.inner.lock().sessions += 1;
        Remembering(self)
    }

    /// Starts holding a change's writes in an overlay.
    pub fn begin_change(&self) {
        let mut inner = self.inner.lock();
        inner.overlay = Some(HashMap::new());
        inner.loaded.clear();
        inner.change_thread = Some(thread::current().id());
    }

    /// Like [`MetaCache::begin_change`], for a change on the filesystem
    /// whose libext2fs `flags` field `fs_flags` points to: during the
    /// change, each read that only touches trusted blocks sets
    /// `EXT2_FLAG_IGNORE_CSUM_ERRORS` there, and any other read clears it,
    /// so that libext2fs verifies the checksums of what comes from the
    /// device and not again of what it wrote or verified already (as the
    /// kernel verifies a buffer once, when it reads it).  libext2fs checks
    /// the flag right after the read it verifies.
    ///
    /// # Safety
    /// `fs_flags` points to the flags of an open filesystem that the
    /// caller holds exclusively until [`MetaCache::end_change`].
    pub unsafe fn begin_change_verifying_once(&self, fs_flags: *mut i32) {
        self.begin_change();
        self.inner.lock().fs_flags = Some(fs_flags);
    }

    /// Blocks the change in progress has written so far.
    pub fn change_len(&self) -> usize {
        self.inner.lock().overlay.as_ref().map_or(0, HashMap::len)
    }

    /// Ends the change: `keep` merges its writes into the running
    /// transaction (those that change a block), otherwise they are dropped.
    /// Returns the blocks it wrote, if kept.
    pub fn end_change(&self, keep: bool) -> Vec<u64> {
        let mut inner = self.inner.lock();
        inner.change_thread = None;
        if let Some(flags) = inner.fs_flags.take() {
            // SAFETY: see begin_change_verifying_once; still held.
            unsafe { *flags &= !IGNORE_CSUM_ERRORS };
        }
        let loaded = std::mem::take(&mut inner.loaded);
        for block in loaded {
            if keep {
                if let Some(cached) = inner.blocks.get_mut(&block) {
                    cached.trusted = true;
                }
            } else if !inner.dirty.contains(&block) {
                // It may have failed a check: read (and check) it again.
                if let Some(cached) = inner.blocks.remove(&block) {
                    inner.clean_bytes -= cached.data.len() as u64;
                }
            }
        }
        let Some(overlay) = inner.overlay.take() else {
            return Vec::new();
        };
        if !keep {
            return Vec::new();
        }
        let mut written = Vec::with_capacity(overlay.len());
        for (block, data) in overlay {
            inner.store(block, data);
            written.push(block);
        }
        written
    }

    /// Blocks of the running transaction.
    pub fn dirty_len(&self) -> usize {
        self.inner.lock().dirty.len()
    }

    /// Whether `block` was written since the last commit took the
    /// running transaction's blocks (by it, or by the change in progress).
    pub fn written(&self, block: u64) -> bool {
        let inner = self.inner.lock();
        inner.dirty.contains(&block)
            || inner
                .overlay
                .as_ref()
                .is_some_and(|o| o.contains_key(&block))
    }

    pub fn dirty_blocks(&self) -> Vec<u64> {
        self.inner.lock().dirty.iter().copied().collect()
    }

    /// Takes the running transaction's blocks and their contents, in block
    /// order; they stay cached, now clean (the caller writes them home, or
    /// gives them back with [`MetaCache::mark_dirty`] if it cannot).
    pub fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut inner = self.inner.lock();
        inner.pinned = true;
        let dirty = std::mem::take(&mut inner.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for block in dirty {
            if let Some(cached) = inner.blocks.get(&block) {
                out.push((block, cached.data.clone()));
                inner.clean_bytes += cached.data.len() as u64;
            }
        }
        // Nothing is evicted until `trim`: until the caller has written
        // them home, these copies are newer than the device's.
        out
    }

    /// Ends a commit that took `taken`: if it failed, they go back into
    /// the running transaction; then clean blocks beyond the budget go.
    pub fn end_commit(&self, taken: &[(u64, Vec<u8>)], ok: bool) {
        if !ok {
            self.mark_dirty(taken.iter().map(|(block, _)| *block));
        }
        self.trim();
    }

    /// Evicts clean blocks beyond the memory budget, once a commit has
    /// written what it took home (or given it back).
    pub fn trim(&self) {
        let mut inner = self.inner.lock();
        inner.pinned = false;
        inner.evict();
    }

    /// Replaces the clean copy of `block`, if one is cached, with `data`
    /// (just written to the device directly).
    pub fn refresh_clean(&self, block: u64, data: &[u8]) {
        let mut inner = self.inner.lock();
        if inner.dirty.contains(&block) {
            return;
        }
        if let Some(cached) = inner.blocks.get_mut(&block) {
            cached.data.copy_from_slice(data);
        }
    }

    /// Puts blocks back into the running transaction (a commit that failed).
    pub fn mark_dirty(&self, blocks: impl IntoIterator<Item = u64>) {
        let mut inner = self.inner.lock();
        for block in blocks {
            if let Some(cached) = inner.blocks.get(&block) {
                let len = cached.data.len() as u64;
                if inner.dirty.insert(block) {
                    inner.clean_bytes -= len;
                }
            }
        }
    }

    /// Drops a block from the running transaction and the cache (a block
    /// that was freed: its contents no longer matter).
    pub fn discard(&self, block: u64) {
        let mut inner = self.inner.lock();
        if let Some(cached) = inner.blocks.remove(&block) {
            if !inner.dirty.remove(&block) {
                inner.clean_bytes -= cached.data.len() as u64;
            }
        }
    }

    /// Forgets clean copies of blocks `start..start + count` (they may be
    /// written as file data now, or were changed on the device directly).
    pub fn forget_clean(&self, start: u64, count: u64) {
        let mut inner = self.inner.lock();
        if count > inner.blocks.len() as u64 {
            let Inner {
                blocks,
                dirty,
                clean_bytes,
                ..
            } = &mut *inner;
            blocks.retain(|block, cached| {
                let gone = (start..start + count).contains(block) && !dirty.contains(block);
                if gone {
                    *clean_bytes -= cached.data.len() as u64;
                }
                !gone
            });
            return;
        }
        for block in start..start + count {
            if !inner.dirty.contains(&block) {
                if let Some(cached) = inner.blocks.remove(&block) {
                    inner.clean_bytes -= cached.data.len() as u64;
                }
            }
        }
    }

    /// The current contents of `block`, from the cache or the device.
    pub fn block(&self, block: u64) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; self.bs as usize];
        self.read_at(&mut buf, block * self.bs)?;
        Ok(buf)
    }

    /// Sets how much memory clean blocks may use.
    pub fn set_clean_budget(&self, bytes: u64) {
        let mut inner = self.inner.lock();
        inner.budget = bytes;
        inner.evict();
    }

    /// A write of whole or partial blocks, into the overlay of the change
    /// in progress or else straight into the running transaction.
    fn write_pieces(&self, buf: Option<&[u8]>, offset: u64, len: usize) -> Result<(), Errno> {
        for piece in pieces(offset, len, self.bs) {
            let whole = piece.from == 0 && piece.to == self.bs as usize;
            let mut data = if whole {
                vec![0u8; self.bs as usize]
            } else {
                self.block(piece.block)?
            };
            match buf {
                Some(buf) => data[piece.from..piece.to]
                    .copy_from_slice(&buf[piece.at..piece.at + piece.to - piece.from]),
                None => data[piece.from..piece.to].fill(0),
            }
            let mut inner = self.inner.lock();
            match inner.overlay.as_mut() {
                Some(overlay) => {
                    overlay.insert(piece.block, data);
                }
                None => inner.store(piece.block, data),
            }
        }
        Ok(())
    }
}

impl Inner {
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Makes `data` the contents of `block` in the running transaction,
    /// unless it already is.
    fn store(&mut self, block: u64, data: Vec<u8>) {
        let used = self.touch();
        if let Some(cached) = self.blocks.get_mut(&block) {
            cached.trusted = true;
            if cached.data == data {
                return;
            }
            cached.data = data;
            cached.used = used;
            if self.dirty.insert(block) {
                self.clean_bytes -= cached.data.len() as u64;
            }
            return;
        }
        self.blocks.insert(
            block,
            Cached {
                data,
                used,
                trusted: true,
            },
        );
        self.dirty.insert(block);
    }

    /// Drops the least recently used clean blocks once they take more than
    /// the budget, down to three quarters of it.
    fn evict(&mut self) {
        if self.pinned || self.clean_bytes <= self.budget {
            return;
        }
        let mut clean: Vec<(u64, u64)> = self
            .blocks
            .iter()
            .filter(|(block, _)| !self.dirty.contains(block))
            .map(|(block, cached)| (cached.used, *block))
            .collect();
        clean.sort_unstable();
        let target = self.budget / 4 * 3;
        for (_, block) in clean {
            if self.clean_bytes <= target {
                break;
            }
            if let Some(cached) = self.blocks.remove(&block) {
                self.clean_bytes -= cached.data.len() as u64;
            }
        }
    }
}

impl BlockDevice for MetaCache {
    fn size(&self) -> u64 {
        self.raw.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let bs = self.bs as usize;
        // Blocks neither in the overlay nor cached, read from the device in
        // runs and then kept as clean blocks.
        let mut missing: Vec<Piece> = Vec::new();
        let me = thread::current().id();
        let own;
        {
            let mut inner = self.inner.lock();
            own = inner.change_thread == Some(me);
            let mut trusted = true;
            for piece in pieces(offset, buf.len(), self.bs) {
                let out = &mut buf[piece.at..piece.at + piece.to - piece.from];
                let overlay = inner.overlay.as_ref().filter(|_| own);
                if let Some(data) = overlay.and_then(|o| o.get(&piece.block)) {
                    out.copy_from_slice(&data[piece.from..piece.to]);
                    continue;
                }
                let used = inner.touch();
                if let Some(cached) = inner.blocks.get_mut(&piece.block) {
                    cached.used = used;
                    trusted &= cached.trusted;
                    out.copy_from_slice(&cached.data[piece.from..piece.to]);
                    continue;
                }
                trusted = false;
                missing.push(piece);
            }
            if let Some(flags) = inner.fs_flags.filter(|_| own) {
                // SAFETY: see begin_change_verifying_once: the change in
                // progress holds the filesystem, and this read is its own.
                unsafe {
                    if trusted {
                        *flags |= IGNORE_CSUM_ERRORS;
                    } else {
                        *flags &= !IGNORE_CSUM_ERRORS;
                    }
                }
            }
        }
        let mut i = 0;
        while i < missing.len() {
            let first = missing[i].block;
            let mut n = 1;
            while i + n < missing.len() && missing[i + n].block == first + n as u64 {
                n += 1;
            }
            let mut run = vec![0u8; n * bs];
            self.raw.read_at(&mut run, first * self.bs)?;
            let mut inner = self.inner.lock();
            let in_change = own && inner.overlay.is_some();
            let remember = in_change || inner.sessions > 0;
            for (k, piece) in missing[i..i + n].iter().enumerate() {
                let data = &run[k * bs..(k + 1) * bs];
                buf[piece.at..piece.at + piece.to - piece.from]
                    .copy_from_slice(&data[piece.from..piece.to]);
                if remember && !inner.blocks.contains_key(&piece.block) {
                    let used = inner.touch();
                    inner.blocks.insert(
                        piece.block,
                        Cached {
                            data: data.to_vec(),
                            used,
                            trusted: false,
                        },
                    );
                    if in_change {
                        inner.loaded.push(piece.block);
                    }
                    inner.clean_bytes += bs as u64;
                }
            }
            inner.evict();
            i += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Errno> {
        self.write_pieces(Some(buf), offset, buf.len())
    }

    fn zero_at(&self, len: u64, offset: u64) -> Result<(), Errno> {
        if len > MAX_ZERO_BYTES {
            crate::log::error(&format!(
                "refusing to zero {len} bytes of metadata at offset {offset}"
            ));
            return Err(Errno::EINVAL);
        }
        self.write_pieces(None, offset, len as usize)
    }

    /// Durability is the transaction's: see `crate::txn`.
    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }

    /// Requests that touch no cached block go to the device together (in
    /// parallel, if it can); the others are served as [`Self::read_at`]
    /// serves them.  Nothing read here is kept.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        let mut outcomes: Vec<Option<Result<(), Errno>>> = vec![None; reads.len()];
        let mut direct: Vec<(usize, &mut (u64, &mut [u8]))> = Vec::new();
        let mut cached: Vec<(usize, &mut (u64, &mut [u8]))> = Vec::new();
        {
            let inner = self.inner.lock();
            let own = inner.change_thread == Some(thread::current().id());
            for (i, read) in reads.iter_mut().enumerate() {
                let touches_cache = pieces(read.0, read.1.len(), self.bs).any(|piece| {
                    inner.blocks.contains_key(&piece.block)
                        || (own
                            && inner
                                .overlay
                                .as_ref()
                                .is_some_and(|o| o.contains_key(&piece.block)))
                });
                if touches_cache {
                    cached.push((i, read));
                } else {
                    direct.push((i, read));
                }
            }
        }
        let mut batch: Vec<(u64, &mut [u8])> = direct
            .iter_mut()
            .map(|(_, read)| (read.0, &mut *read.1))
            .collect();
        let done = self.raw.read_many(&mut batch);
        drop(batch);
        for ((i, _), outcome) in direct.iter().zip(done) {
            outcomes[*i] = Some(outcome);
        }
        for (i, read) in cached {
            outcomes[i] = Some(self.read_at(read.1, read.0));
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(Errno::EIO)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemDevice;

    fn device(blocks: u64) -> Arc<MemDevice> {
        let bytes: Vec<u8> = (0..blocks * 1024).map(|i| (i / 1024) as u8).collect();
        Arc::new(MemDevice::new(bytes))
    }

    #[test]
    fn writes_stay_in_memory_until_taken() {
        let dev = device(16);
        let cache = MetaCache::new(dev.clone(), 1024);
        cache.write_at(&[0xaa; 100], 1024 * 3 + 10).unwrap();
        assert_eq!(dev.counts().writes, 0);
        let mut buf = [0u8; 200];
        cache.read_at(&mut buf, 1024 * 3).unwrap();
        assert!(buf[..10].iter().all(|&b| b == 3));
        assert!(buf[10..110].iter().all(|&b| b == 0xaa));
        assert!(buf[110..].iter().all(|&b| b == 3));
        let taken = cache.take_dirty();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, 3);
        assert_eq!(cache.dirty_len(), 0);
        // Writing what is already there dirties nothing.
        cache.write_at(&[0xaa; 100], 1024 * 3 + 10).unwrap();
        assert_eq!(cache.dirty_len(), 0);
    }

    #[test]
    fn a_dropped_change_leaves_nothing() {
        let dev = device(16);
        let cache = MetaCache::new(dev.clone(), 1024);
        cache.write_at(&[1; 1024], 2048).unwrap();
        cache.begin_change();
        cache.write_at(&[2; 2048], 2048).unwrap();
        let mut buf = [0u8; 1024];
        cache.read_at(&mut buf, 3072).unwrap();
        assert_eq!(buf, [2; 1024], "the change reads its own writes");
        assert_eq!(cache.change_len(), 2);
        cache.end_change(false);
        cache.read_at(&mut buf, 2048).unwrap();
        assert_eq!(buf, [1; 1024]);
        cache.read_at(&mut buf, 3072).unwrap();
        assert_eq!(buf, [3; 1024]);
        assert_eq!(cache.dirty_blocks(), vec![2]);
        cache.begin_change();
        cache.zero_at(1024, 4096).unwrap();
        cache.end_change(true);
        assert_eq!(cache.dirty_blocks(), vec![2, 4]);
    }

    /// A host's readers that need no library lock (lazy maps) read through
    /// the cache from other threads while a change runs: they see the
    /// blocks as the last finished change left them, and what they read
    /// from the device is not taken for the change's own (trusted).
    #[test]
    fn other_threads_do_not_see_the_change_in_progress() {
        let dev = device(16);
        let cache = Arc::new(MetaCache::new(dev.clone(), 1024));
        cache.write_at(&[1; 1024], 2048).unwrap();
        cache.begin_change();
        cache.write_at(&[2; 1024], 2048).unwrap();
        let reader = cache.clone();
        let seen = std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            reader.read_at(&mut buf, 2048).unwrap();
            let mut other = [0u8; 1024];
            reader.read_at(&mut other, 5 * 1024).unwrap();
            (buf, other)
        })
        .join()
        .unwrap();
        assert!(
            seen.0 == [1; 1024],
            "another thread saw the change in progress"
        );
        assert!(seen.1 == [5; 1024], "another thread read the wrong block");
        let mut mine = [0u8; 1024];
        cache.read_at(&mut mine, 2048).unwrap();
        assert!(mine == [2; 1024], "the change does not read its own writes");
        cache.end_change(true);
        let inner = cache.inner.lock();
        assert!(
            !inner.blocks.contains_key(&5),
            "another thread's read was kept as the change's own"
        );
    }

    #[test]
    fn clean_blocks_are_read_once_and_evicted_by_age() {
        let dev = device(64);
        let cache = MetaCache::new(dev.clone(), 1024);
        let mut buf = vec![0u8; 4096];
        cache.read_at(&mut buf, 0).unwrap();
        cache.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            dev.counts().reads,
            2,
            "outside a change or commit: not kept"
        );
        let dev = device(64);
        let cache = MetaCache::new(dev.clone(), 1024);
        let _session = cache.remembering();
        cache.read_at(&mut buf, 0).unwrap();
        cache.read_at(&mut buf, 0).unwrap();
        assert_eq!(dev.counts().reads, 1, "one run, read once");
        cache.write_at(&[9; 1024], 40 * 1024).unwrap();
        cache.set_clean_budget(2048);
        // The dirty block survives eviction.
        let mut one = [0u8; 1024];
        cache.read_at(&mut one, 40 * 1024).unwrap();
        assert_eq!(one, [9; 1024]);
        cache.read_at(&mut buf, 8 * 1024).unwrap();
        let reads = dev.counts().reads;
        cache.read_at(&mut buf[..1024], 0).unwrap();
        assert_eq!(dev.counts().reads, reads + 1, "the oldest were evicted");
        cache.forget_clean(0, 64);
        cache.read_at(&mut one, 40 * 1024).unwrap();
        assert_eq!(one, [9; 1024], "forget_clean keeps dirty blocks");
    }
}
