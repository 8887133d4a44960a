//! The background commit: metadata changes wait in memory for a client's
//! flush, but not longer than [`INTERVAL`] (as the kernel's journal commits
//! every few seconds), so that a crash loses at most that much of the
//! filesystem's bookkeeping even when no client flushes.
//!
//! The thread starts with the first change (after nbdkit has forked, as
//! threads must) and is stopped and joined at shutdown.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use ext2_rs::log::Topic;

/// How long a metadata change may wait for its commit.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Signal {
    stop: Mutex<bool>,
    wake: Condvar,
}

#[derive(Default)]
pub struct Committer {
    running: Mutex<Option<(Arc<Signal>, JoinHandle<()>)>>,
}

impl Committer {
    /// Starts the thread, unless it runs already or was stopped: it calls
    /// `tick` every half [`INTERVAL`] until stopped (`tick` commits what
    /// has waited an [`INTERVAL`]).
    pub fn ensure_started(&self, tick: impl Fn() + Send + 'static) {
        let mut running = self.running.lock();
        if running.is_some() {
            return;
        }
        let signal = Arc::new(Signal::default());
        let thread_signal = Arc::clone(&signal);
        let spawned = std::thread::Builder::new()
            .name("ext2-commit".into())
            .spawn(move || run(&thread_signal, tick));
        match spawned {
            Ok(handle) => *running = Some((signal, handle)),
            Err(e) => ext2_rs::debug!(
                Topic::Journal,
                "cannot start the commit thread ({e}): metadata is committed at flushes only"
            ),
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&self) {
        let Some((signal, handle)) = self.running.lock().take() else {
            return;
        };
        *signal.stop.lock() = true;
        signal.wake.notify_all();
        let _ = handle.join();
    }
}

fn run(signal: &Signal, tick: impl Fn()) {
    loop {
        {
            let mut stop = signal.stop.lock();
            if !*stop {
                signal.wake.wait_for(&mut stop, INTERVAL / 2);
            }
            if *stop {
                return;
            }
        }
        tick();
    }
}
