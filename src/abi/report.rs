//! Messages to nbdkit's log, and the `-D ext2.NAME=1` debug flags.

use std::ffi::CString;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::abi::sys;

/// Turns a message into a C string, replacing any NUL so nothing is lost.
fn c_message(msg: &str) -> CString {
    CString::new(msg.replace('\0', "\\0")).unwrap_or_default()
}

/// Reports an error through `nbdkit_error`.  nbdkit sends the last error of a
/// failed callback to the client, so the message is what the user sees.
pub fn error(msg: &str) {
    let msg = c_message(msg);
    // SAFETY: a fixed "%s" format with one NUL-terminated string argument.
    unsafe { sys::nbdkit_error(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Writes a line to nbdkit's debug output (shown with `nbdkit -v`).
pub fn debug(msg: &str) {
    let msg = c_message(msg);
    // SAFETY: a fixed "%s" format with one NUL-terminated string argument.
    unsafe { sys::nbdkit_debug(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Prints a line on standard output through C's stdio, in order with what
/// nbdkit prints there (`nbdkit --dump-plugin`).
pub fn print_line(line: &str) {
    let line = c_message(line);
    // SAFETY: a fixed "%s\n" format with one NUL-terminated string argument.
    unsafe { libc::printf(c"%s\n".as_ptr(), line.as_ptr()) };
}

/// A debug flag that nbdkit sets before `.load` from `-D ext2.NAME=1`.
///
/// nbdkit finds the exported symbol `ext2_debug_NAME` with `dlsym` and stores
/// an `int` into it; `AtomicI32` has the layout of an `int`.
#[repr(transparent)]
pub struct DebugFlag(AtomicI32);

impl Default for DebugFlag {
    fn default() -> Self {
        Self::new()
    }
}

impl DebugFlag {
    pub const fn new() -> Self {
        DebugFlag(AtomicI32::new(0))
    }

    pub fn enabled(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }
}

// The flags are exported under nbdkit's names (`ext2_debug_NAME`), which
// are not Rust's style for statics.  Unit-test binaries keep them
// unexported, like `filter_init`.

/// `-D ext2.map=1`: log how served files are mapped and remapped.
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static ext2_debug_map: DebugFlag = DebugFlag::new();

/// `-D ext2.lock=1`: log waits on the filesystem lock.
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static ext2_debug_lock: DebugFlag = DebugFlag::new();

/// `-D ext2.journal=1`: log the journal transactions replayed in memory.
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static ext2_debug_journal: DebugFlag = DebugFlag::new();

/// `nbdkit_error` with `format!` arguments.
macro_rules! nbd_error {
    ($($arg:tt)*) => { $crate::abi::report::error(&format!($($arg)*)) };
}

pub(crate) use nbd_error;

/// Sends ext2-rs's messages to nbdkit, its debug topics behind our flags.
pub fn install_sink() {
    fn enabled(topic: ext2_rs::log::Topic) -> bool {
        use ext2_rs::log::Topic;
        match topic {
            Topic::Map => ext2_debug_map.enabled(),
            Topic::Lock => ext2_debug_lock.enabled(),
            Topic::Journal => ext2_debug_journal.enabled(),
        }
    }
    ext2_rs::log::set_sink(ext2_rs::log::Sink {
        error,
        debug,
        enabled,
    });
}
