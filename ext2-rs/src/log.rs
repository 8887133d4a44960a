//! Where the crate's messages go.
//!
//! A library cannot know its host's log: the host installs a [`Sink`] once
//! (a server its own error and debug functions).  Until then errors
//! go to standard error and debug output is off.

use parking_lot::RwLock;

/// What a debug message is about; the host decides which it shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    /// How files are mapped, allocated and freed.
    Map,
    /// Waits for locks.
    Lock,
    /// Journal replay, transactions and checkpoints.
    Journal,
}

/// The host's log.
#[derive(Clone, Copy)]
pub struct Sink {
    pub error: fn(&str),
    pub debug: fn(&str),
    pub enabled: fn(Topic) -> bool,
}

fn stderr(msg: &str) {
    eprintln!("ext2-rs: {msg}");
}

fn never(_: Topic) -> bool {
    false
}

static SINK: RwLock<Sink> = RwLock::new(Sink {
    error: stderr,
    debug: stderr,
    enabled: never,
});

/// Sends the crate's messages to `sink` from now on.
pub fn set_sink(sink: Sink) {
    *SINK.write() = sink;
}

/// Reports an error.
pub fn error(msg: &str) {
    let error = SINK.read().error;
    error(msg)
}

/// Whether debug messages about `topic` are shown.
pub fn enabled(topic: Topic) -> bool {
    let enabled = SINK.read().enabled;
    enabled(topic)
}

/// Writes a debug message (callers check [`enabled`] first; see [`debug!`]).
pub fn debug_message(msg: &str) {
    let debug = SINK.read().debug;
    debug(msg)
}

/// A debug message about a [`Topic`], formatted only when it is shown.
#[macro_export]
macro_rules! debug {
    ($topic:expr, $($arg:tt)*) => {
        if $crate::log::enabled($topic) {
            $crate::log::debug_message(&format!($($arg)*))
        }
    };
}
