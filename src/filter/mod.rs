//! The filter's logic, in safe Rust: what each nbdkit callback does.
//!
//! `callbacks.rs` turns nbdkit's C calls into calls of the functions here;
//! nothing here touches a raw pointer.

mod change;
mod coalesce;
pub mod config;
pub mod exports;
pub mod file;
mod opening;
pub mod shared;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::nbdkit::{Backend, Plugin};
use config::{Config, ConfigBuilder, Target};
use ext2_rs::error::{Errno, Error, Result};
use file::{ServedFile, Status};
use shared::Shared;

static BUILDER: Mutex<Option<ConfigBuilder>> = Mutex::new(None);
/// Set by `.config_complete`, cleared by `.unload` (so that nothing is left
/// allocated when nbdkit unloads us).
static CONFIG: Mutex<Option<Arc<Config>>> = Mutex::new(None);
/// Whether the plugin takes only one request at a time per handle.
static SERIALIZE_PLUGIN: AtomicBool = AtomicBool::new(false);
/// The shared filesystem, opened by the first connection.
static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

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

/// `.list_exports` in exportname mode: the image's regular files.
pub fn list_exports(backend: Backend, readonly: bool) -> Result<Vec<exports::ListedFile>> {
    let max = current_config().max_exports;
    if max == 0 {
        return Ok(Vec::new());
    }
    let shared = shared(backend, readonly)?;
    let mut fs = shared.lock_fs()?;
    exports::list_files(&mut fs, max)
}

/// `.get_ready`: learns the thread model nbdkit settled on.
pub fn get_ready(serialize_requests: bool) {
    SERIALIZE_PLUGIN.store(serialize_requests, Ordering::Relaxed);
}

/// The shared filesystem, opening it if no connection has yet.
///
/// It is opened here rather than in `.after_fork` because nbdkit 1.32 tells
/// a filter about `-r` only in per-connection callbacks, and a read-only
/// server must open the plugin and the filesystem read-only.  A failure is
/// not remembered: the next connection tries again (the plugin may recover).
fn shared(backend: Backend, readonly: bool) -> Result<Arc<Shared>> {
    let mut slot = SHARED.lock();
    if let Some(shared) = slot.as_ref() {
        return Ok(shared.clone());
    }
    let plugin = Plugin::open(backend, readonly, SERIALIZE_PLUGIN.load(Ordering::Relaxed))?;
    let config = current_config();
    let shared = Arc::new(Shared::open(
        plugin,
        !readonly,
        config.journal,
        config.map_cache,
    )?);
    *slot = Some(shared.clone());
    Ok(shared)
}

/// `.cleanup`: closes the filesystem (writing its metadata) and the plugin.
pub fn cleanup() {
    if let Some(shared) = SHARED.lock().take() {
        shared.shutdown();
    }
    crate::pool::shutdown();
}

/// Per-connection state: which file, on which shared filesystem.
pub struct Connection {
    export_name: String,
    readonly: bool,
    shared: Arc<Shared>,
    file: Option<Arc<ServedFile>>,
}

impl Connection {
    /// `.open`: makes sure the shared filesystem is open.
    pub fn open(backend: Backend, readonly: bool, export_name: &str) -> Result<Connection> {
        Ok(Connection {
            export_name: export_name.to_string(),
            readonly,
            shared: shared(backend, readonly)?,
            file: None,
        })
    }

    /// The path inside the image this connection serves.
    pub fn path(&self) -> String {
        let config = current_config();
        match &config.default_export {
            Some(default) if self.export_name.is_empty() => default.clone(),
            _ => config::path_for(&config.target, &self.export_name),
        }
    }

    /// `.prepare`: resolves the file and builds (or shares) its map.
    pub fn prepare(&mut self) -> Result<()> {
        let path = self.path();
        self.file = Some(self.shared.open_file(&path)?);
        Ok(())
    }

    pub fn plugin(&self) -> &Plugin {
        self.shared.plugin()
    }

    fn file(&self) -> Result<&ServedFile> {
        self.file
            .as_deref()
            .ok_or_else(|| Error::other(Errno::EIO, "the connection has no file"))
    }

    pub fn size(&self) -> Result<u64> {
        Ok(self.file()?.size)
    }

    pub fn block_size(&self) -> u32 {
        self.shared.block_size
    }

    pub fn can_write(&self) -> Result<bool> {
        Ok(!self.readonly && self.shared.writable() && self.file()?.writable())
    }

    /// `.export_description`, in the C filter's words.
    pub fn description(&self) -> Option<String> {
        let base = self.plugin().export_description()?;
        Some(format!(
            "embedded '{}' from within ext2 image: {base}",
            self.path()
        ))
    }

    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file()?.read(&self.shared, buf, offset)
    }

    pub fn pwrite(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.file()?.write(&self.shared, data, offset, fua)
    }

    pub fn can_trim(&self) -> Result<bool> {
        Ok(self.can_write()? && self.file()?.can_trim())
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.file()?.trim(&self.shared, offset, len)?;
        if fua {
            self.shared.flush()?;
        }
        Ok(())
    }

    pub fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool, fua: bool) -> Result<()> {
        self.file()?
            .zero(&self.shared, offset, len, may_trim, fast)?;
        if fua {
            self.shared.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    pub fn status(&self, offset: u64, len: u64) -> Result<Vec<(u64, Status)>> {
        self.file()?.status(offset, len)
    }
}
