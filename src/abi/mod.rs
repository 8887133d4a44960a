//! Everything that touches nbdkit's C ABI (all of the filter crate's
//! `unsafe`): the generated bindings, the `extern "C"` callbacks, and safe
//! wrappers over nbdkit's functions and the plugin beneath us.

#[cfg_attr(test, allow(dead_code))]
pub mod callbacks;
pub mod nbdkit;
pub mod plugin;
pub mod report;
pub mod state;
pub mod sys;
