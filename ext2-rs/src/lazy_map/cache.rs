//! The map blocks of every served file, parsed, in one cache with a memory
//! bound.  Eviction is CLOCK (second chance): a hit only sets a flag, so
//! lookups share a read lock and never reorder anything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::lazy_map::extent_node::ExtentNode;

/// A parsed map block.
#[derive(Debug)]
pub enum Node {
    Extents(ExtentNode),
    /// An indirect block: its block pointers, every one checked.
    Pointers(Box<[u32]>),
}

impl Node {
    /// Bytes of memory the node holds, with a share of the table's.
    pub fn memory(&self) -> usize {
        let own = match self {
            Node::Extents(n) => n.memory(),
            Node::Pointers(p) => p.len() * 4,
        };
        own + 96
    }
}

/// Hashes [`NodeKey`]s, three integers, with one multiply and rotate per
/// word (as FxHash) instead of SipHash: every lookup of every request asks
/// the table about many keys, and a crafted image can at worst slow its
/// own lookups down.
#[derive(Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyHash = BuildHasherDefault<KeyHasher>;

/// A map block of one version of one file's tree: the file's map id, the
/// tree's epoch (bumped whenever the file's map changes), the image block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub map: u64,
    pub epoch: u64,
    pub block: u64,
}

struct Slot {
    node: Arc<Node>,
    referenced: AtomicBool,
}

#[derive(Default)]
struct Table {
    slots: HashMap<NodeKey, Slot, KeyHash>,
    /// Keys in insertion order: the clock hand sweeps from the front.
    clock: VecDeque<NodeKey>,
    bytes: usize,
}

/// What the cache did, for debug output and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub inserted: u64,
    pub evicted: u64,
    pub bytes: usize,
    pub entries: usize,
}

pub struct MapCache {
    budget: usize,
    table: RwLock<Table>,
    /// Blocks some request or read-ahead is reading now.
    loading: Mutex<HashSet<NodeKey, KeyHash>>,
    loaded: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    evicted: AtomicU64,
}

impl MapCache {
    /// A cache holding at most about `budget` bytes of parsed map blocks.
    pub fn new(budget: usize) -> MapCache {
        MapCache {
            budget,
            table: RwLock::new(Table::default()),
            loading: Mutex::new(HashSet::default()),
            loaded: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn get(&self, key: &NodeKey) -> Option<Arc<Node>> {
        let table = self.table.read();
        match table.slots.get(key) {
            Some(slot) => {
                if !slot.referenced.load(Ordering::Relaxed) {
                    slot.referenced.store(true, Ordering::Relaxed);
                }
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(slot.node.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn contains(&self, key: &NodeKey) -> bool {
        self.table.read().slots.contains_key(key)
    }

    /// Cached, or being read.
    pub fn known(&self, key: &NodeKey) -> bool {
        self.contains(key) || self.loading.lock().contains(key)
    }

    /// Claims `key` for reading: `false` if it is cached or someone else
    /// is reading it.  The claimer calls [`MapCache::release`] when done.
    pub fn claim(&self, key: NodeKey) -> bool {
        let mut loading = self.loading.lock();
        if self.contains(&key) {
            return false;
        }
        loading.insert(key)
    }

    pub fn release(&self, key: &NodeKey) {
        self.loading.lock().remove(key);
        self.loaded.notify_all();
    }

    /// Waits while someone reads `key` (at most a few seconds: a reader
    /// that is stuck must not hold others forever; they read it then).
    pub fn wait_for(&self, key: &NodeKey) {
        let mut loading = self.loading.lock();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while loading.contains(key) {
            if self.loaded.wait_until(&mut loading, deadline).timed_out() {
                break;
            }
        }
    }

    /// Adds a node (replacing any with the same key), then evicts until the
    /// cache is within its budget again.
    pub fn insert(&self, key: NodeKey, node: Arc<Node>) {
        let mut table = self.table.write();
        let bytes = node.memory();
        let old = table.slots.insert(
            key,
            Slot {
                node,
                referenced: AtomicBool::new(false),
            },
        );
        match old {
            Some(old) => table.bytes -= old.node.memory(),
            None => table.clock.push_back(key),
        }
        table.bytes += bytes;
        self.inserted.fetch_add(1, Ordering::Relaxed);
        self.evict(&mut table);
    }

    fn evict(&self, table: &mut Table) {
        // Each slot gets at most one second chance per sweep.
        let mut spared = 0usize;
        while table.bytes > self.budget {
            let Some(key) = table.clock.pop_front() else {
                break;
            };
            let Some(slot) = table.slots.get(&key) else {
                continue;
            };
            if slot.referenced.swap(false, Ordering::Relaxed) && spared < table.clock.len() + 1 {
                spared += 1;
                table.clock.push_back(key);
                continue;
            }
            if let Some(slot) = table.slots.remove(&key) {
                table.bytes -= slot.node.memory();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Moves map `map`'s nodes cached for epoch `from` to epoch `to`,
    /// those of the blocks `keep` accepts, in their place in the clock;
    /// the others are dropped.
    pub fn carry_over(&self, map: u64, from: u64, to: u64, keep: impl Fn(u64) -> bool) {
        let mut table = self.table.write();
        let Table {
            slots,
            clock,
            bytes,
        } = &mut *table;
        let mut swept = VecDeque::with_capacity(clock.len());
        for key in clock.drain(..) {
            if key.map != map || key.epoch != from {
                swept.push_back(key);
                continue;
            }
            let Some(slot) = slots.remove(&key) else {
                continue;
            };
            let moved = NodeKey { epoch: to, ..key };
            if keep(key.block) && !slots.contains_key(&moved) {
                slots.insert(moved, slot);
                swept.push_back(moved);
            } else {
                *bytes -= slot.node.memory();
            }
        }
        *clock = swept;
    }

    pub fn stats(&self) -> CacheStats {
        let table = self.table.read();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            bytes: table.bytes,
            entries: table.slots.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u64) -> NodeKey {
        NodeKey {
            map: 1,
            epoch: 0,
            block,
        }
    }

    fn node(pointers: usize) -> Arc<Node> {
        Arc::new(Node::Pointers(vec![0u32; pointers].into_boxed_slice()))
    }

    #[test]
    fn stays_within_its_budget() {
        let one = node(256).memory();
        let cache = MapCache::new(one * 4);
        for b in 0..100 {
            cache.insert(key(b), node(256));
            assert!(cache.stats().bytes <= one * 4);
        }
        assert_eq!(cache.stats().entries, 4);
        assert_eq!(cache.stats().evicted, 96);
        assert!(cache.get(&key(99)).is_some());
        assert!(cache.get(&key(0)).is_none());
    }

    #[test]
    fn referenced_entries_get_a_second_chance() {
        let one = node(256).memory();
        let cache = MapCache::new(one * 3);
        for b in 0..3 {
            cache.insert(key(b), node(256));
        }
        assert!(cache.get(&key(0)).is_some());
        cache.insert(key(3), node(256));
        // Block 0 was used since it came in: block 1 goes instead.
        assert!(cache.contains(&key(0)));
        assert!(!cache.contains(&key(1)));
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = MapCache::new(0);
        cache.insert(key(1), node(1));
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().bytes, 0);
    }
}
