//! What nbdkit's callbacks share across the process, from `.config` to
//! `.unload`: nbdkit calls a filter through plain functions, so the
//! configuration and the started server live here, and only here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::abi::nbdkit::Backend;
use crate::abi::plugin::Plugin;
use crate::server::config::{Config, ConfigBuilder, Target};
use crate::server::Server;
use ext2_rs::error::{Errno, Error, Result};

static BUILDER: Mutex<Option<ConfigBuilder>> = Mutex::new(None);
/// Set by `.config_complete`, cleared by `.unload` (so that nothing is left
/// allocated when nbdkit unloads us).
static CONFIG: Mutex<Option<Arc<Config>>> = Mutex::new(None);
/// Whether the plugin takes only one request at a time per handle.
static SERIALIZE_PLUGIN: AtomicBool = AtomicBool::new(false);
/// What `.after_fork` started, until `.cleanup`.
static STARTED: Mutex<Option<Started>> = Mutex::new(None);

/// The plugin context every connection shares, and the server over it.
#[derive(Clone)]
pub struct Started {
    pub plugin: Arc<Plugin>,
    pub server: Arc<Server>,
}

/// `.config`: `Ok(true)` if the key was ours.
pub fn config(key: &str, value: &str) -> std::result::Result<bool, String> {
    BUILDER
        .lock()
        .get_or_insert_with(ConfigBuilder::default)
        .set(key, value)
}

/// `.config_complete`
pub fn config_complete() -> std::result::Result<(), String> {
    let builder = BUILDER.lock().take().unwrap_or_default();
    *CONFIG.lock() = Some(Arc::new(builder.finish()?));
    Ok(())
}

/// `.unload`: frees the configuration.
pub fn unload() {
    BUILDER.lock().take();
    CONFIG.lock().take();
}

fn current_config() -> Arc<Config> {
    CONFIG
        .lock()
        .clone()
        .expect("config_complete ran before any connection")
}

pub fn exportname_mode() -> bool {
    current_config().target == Target::ExportName
}

/// The file served for export "" in exportname mode, if one was chosen.
pub fn default_export() -> Option<String> {
    current_config().default_export.clone()
}

/// `.get_ready`: learns the thread model nbdkit settled on.
pub fn get_ready(serialize_requests: bool) {
    SERIALIZE_PLUGIN.store(serialize_requests, Ordering::Relaxed);
}

/// `.after_fork`: opens a read-only plugin context on `backend` that
/// outlives every connection, and starts the server over it.
pub fn after_fork(backend: Backend) -> Result<()> {
    let serialize = SERIALIZE_PLUGIN.load(Ordering::Relaxed);
    let plugin = Arc::new(Plugin::open(backend, true, serialize).map_err(Error::reported)?);
    // On failure the plugin context is closed as it is dropped.
    let server = Arc::new(Server::start(current_config(), plugin.clone())?);
    *STARTED.lock() = Some(Started { plugin, server });
    Ok(())
}

/// What `.after_fork` started, while it runs.
pub fn started() -> Result<Started> {
    STARTED
        .lock()
        .clone()
        .ok_or_else(|| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))
}

/// `.cleanup`: closes the filesystem (writing its metadata) and the plugin.
pub fn cleanup() {
    if let Some(started) = STARTED.lock().take() {
        started.server.shutdown();
    }
    crate::pool::shutdown();
}
