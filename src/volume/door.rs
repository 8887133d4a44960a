//! The one door into libext2fs: the process-wide lock every library call
//! holds (the library is not thread-safe, not even for reads), and what
//! waits at the door to be handed in at the next lock.

use std::time::Instant;

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::log::{self, Topic};
use ext2_rs::mapping::BlockRuns;
use ext2_rs::txn::Transactions;
use ext2_rs::{Filesystem, Ino};

/// The filesystem and, when it is writable, its running transaction:
/// what the lock guards.
pub struct FsState {
    pub fs: Filesystem,
    pub tx: Option<Transactions>,
}

/// Blocks `runs` reserved for file blocks from `logical` of `ino` now
/// hold their data.
struct Filled {
    ino: Ino,
    logical: u64,
    runs: BlockRuns,
}

pub struct Door {
    /// Emptied at shutdown: later locks fail with ESHUTDOWN.
    state: Mutex<Option<FsState>>,
    /// Writes into holes whose data is in, for the transactions to take at
    /// the next lock: a write needs the library lock once, not twice.
    filled: Mutex<Vec<Filled>>,
}

impl Door {
    pub fn new(state: FsState) -> Door {
        Door {
            state: Mutex::new(Some(state)),
            filled: Mutex::new(Vec::new()),
        }
    }

    /// Takes the lock; the writes into holes filled since the last lock
    /// go to the transactions first.
    pub fn lock(&self) -> Result<MappedMutexGuard<'_, FsState>> {
        let start = log::enabled(Topic::Lock).then(Instant::now);
        let guard = self.state.lock();
        if let Some(waited) = start.map(|s| s.elapsed()) {
            if waited.as_micros() >= 1000 {
                ext2_rs::debug!(Topic::Lock, "waited {waited:?} for the filesystem lock");
            }
        }
        let mut state = MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))?;
        self.hand_over_filled(&mut state);
        Ok(state)
    }

    /// Takes the lock and what it guards, for good (shutdown).
    pub fn take(&self) -> Option<FsState> {
        let mut guard = self.state.lock();
        if let Some(state) = guard.as_mut() {
            self.hand_over_filled(state);
        }
        guard.take()
    }

    /// The data of `runs`, reserved for file blocks from `logical` of
    /// `ino`, is written: they wait to be linked from the next lock on.
    pub fn hole_filled(&self, ino: Ino, logical: u64, runs: BlockRuns) {
        self.filled.lock().push(Filled { ino, logical, runs });
    }

    fn hand_over_filled(&self, state: &mut FsState) {
        if let Some(tx) = state.tx.as_mut() {
            for Filled { ino, logical, runs } in self.filled.lock().drain(..) {
                tx.hole_filled(ino, logical, &runs);
            }
        }
    }
}
