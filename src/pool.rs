//! A small, fixed set of worker threads that a request borrows to issue
//! several plugin calls at once (pieces of a fragmented file, map blocks):
//! the caller works through its own items too, and does not return until
//! every item is done, so items may borrow from the caller's stack.
//!
//! The threads start with the first request that fans out (never before
//! nbdkit forks) and are stopped by [`shutdown`] at `.cleanup`.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar};
use std::thread::JoinHandle;

use parking_lot::Mutex;

/// Worker threads: plugin calls mostly wait, so more than the cores.
pub const WORKERS: usize = 32;
/// Items of one request in flight at once, the caller included.
pub const FAN_OUT: usize = 8;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Workers {
    jobs: Sender<Job>,
    threads: Vec<JoinHandle<()>>,
}

static WORKERS_RUNNING: Mutex<Option<Workers>> = Mutex::new(None);

fn start() -> Option<Workers> {
    let (jobs, queue) = channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    let mut threads = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let queue = queue.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ext2-io-{i}"))
            .spawn(move || loop {
                let job = queue.lock().recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => break,
                }
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(_) => break,
        }
    }
    if threads.is_empty() {
        return None;
    }
    Some(Workers { jobs, threads })
}

/// Stops the workers (`.cleanup`); a later fan-out starts them again.
pub fn shutdown() {
    let workers = WORKERS_RUNNING.lock().take();
    if let Some(workers) = workers {
        drop(workers.jobs);
        for thread in workers.threads {
            let _ = thread.join();
        }
    }
}

/// Runs `job` on a worker later (background work such as reading map
/// blocks ahead); runs it here if no worker can be started.
pub fn spawn(job: Box<dyn FnOnce() + Send>) {
    let mut workers = WORKERS_RUNNING.lock();
    if workers.is_none() {
        *workers = start();
    }
    let unsent = match workers.as_ref() {
        Some(w) => w.jobs.send(job).err().map(|e| e.0),
        None => Some(job),
    };
    drop(workers);
    if let Some(job) = unsent {
        job();
    }
}

/// Counts helpers still running; the caller waits for zero.
struct Pending {
    count: std::sync::Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn finish_one(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count -= 1;
        if *count == 0 {
            self.done.notify_all();
        }
    }

    fn wait(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = self.done.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Waits for the helpers however the caller leaves (a panic included):
/// they borrow from its stack.
struct WaitOnDrop<'a>(&'a Pending);

impl Drop for WaitOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

/// Runs `work` on every item, up to `limit` at once when `parallel`, and
/// returns the results in the items' order.  Without `parallel`, or with
/// one item, everything runs on the calling thread.
pub fn run_all<T: Send, R: Send>(
    parallel: bool,
    limit: usize,
    items: Vec<T>,
    work: &(dyn Fn(T) -> R + Sync),
) -> Vec<R> {
    let n = items.len();
    if !parallel || n <= 1 {
        return items.into_iter().map(work).collect();
    }
    let queue: Mutex<VecDeque<(usize, T)>> = Mutex::new(items.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    let drain = || loop {
        let Some((i, item)) = queue.lock().pop_front() else {
            break;
        };
        let r = work(item);
        results.lock()[i] = Some(r);
    };
    let helpers = (n - 1).min(limit.max(1) - 1);
    let pending = Pending {
        count: std::sync::Mutex::new(0),
        done: Condvar::new(),
    };
    {
        let _wait = WaitOnDrop(&pending);
        let mut workers = WORKERS_RUNNING.lock();
        if workers.is_none() {
            *workers = start();
        }
        if let Some(workers) = workers.as_ref() {
            for _ in 0..helpers {
                *pending.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                let pending_ref = &pending;
                let drain_ref = &drain;
                let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
                    // A panic in `work` must still count the helper done.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(drain_ref));
                    pending_ref.finish_one();
                });
                // SAFETY: the job borrows `pending`, `drain` (and through it
                // the queue, the results and `work`), all of which outlive
                // it: `_wait` blocks until every helper has called
                // `finish_one`, on every way out of this block, before any
                // of them is dropped.
                let job: Job = unsafe { std::mem::transmute(job) };
                if let Err(unsent) = workers.jobs.send(job) {
                    // No worker will run it: run it here.
                    (unsent.0)();
                }
            }
        }
        drop(workers);
        drain();
    }
    results
        .into_inner()
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn items_borrow_from_the_caller_and_run_together() {
        let mut buffers = vec![vec![0u8; 4]; 8];
        let items: Vec<(usize, &mut Vec<u8>)> = buffers.iter_mut().enumerate().collect();
        let start = Instant::now();
        let results = run_all(true, FAN_OUT, items, &|(i, buf): (usize, &mut Vec<u8>)| {
            std::thread::sleep(Duration::from_millis(50));
            buf.fill(i as u8);
            i * 2
        });
        let took = start.elapsed();
        assert_eq!(results, (0..8).map(|i| i * 2).collect::<Vec<_>>());
        assert!(buffers.iter().enumerate().all(|(i, b)| b == &[i as u8; 4]));
        assert!(took < Duration::from_millis(300), "took {took:?}");
        shutdown();
    }

    #[test]
    fn without_parallel_everything_runs_here_in_order() {
        let me = std::thread::current().id();
        let results = run_all(false, FAN_OUT, vec![1, 2, 3], &|i| {
            assert_eq!(std::thread::current().id(), me);
            i + 1
        });
        assert_eq!(results, vec![2, 3, 4]);
    }
}
