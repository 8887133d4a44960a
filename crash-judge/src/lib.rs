//! For tests only, never shipped: crash states of a device rebuilt from a
//! record of every write and flush that reached it (the CrashMonkey model),
//! and their judges (`e2fsck`, and the kernel through `mount -o loop`).
//!
//! The filter's `tests/crash.rs` uses it as a dev-dependency, so that
//! `cargo build` of the filter never compiles it and `ext2-rs` ships
//! without it. `ext2-rs`'s own unit tests compile the same module
//! (`src/crash/`) as `ext2_rs::crash`, under `cfg(test)`; its paths
//! (`crate::device`, `crate::error`, `crate::testing`) name `ext2-rs`'s
//! modules there, and the imports below here.

use ext2_rs::{device, error, testing};

mod crash;

pub use crash::*;
