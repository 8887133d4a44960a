//! The filter's logic, in safe Rust: what each nbdkit callback does.
//!
//! `callbacks.rs` turns nbdkit's C calls into calls of the functions here;
//! nothing here touches a raw pointer.

mod change;
mod coalesce;
mod committer;
pub mod config;
pub mod exports;
pub mod file;
mod opening;
mod ranges;
pub mod shared;
mod unlinked;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::nbdkit::report::error as report_error;
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
/// What `.after_fork` opened, until `.cleanup`.
static STARTED: Mutex<Option<Arc<Started>>> = Mutex::new(None);

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
pub fn list_exports() -> Result<Vec<exports::ListedFile>> {
    let max = current_config().max_exports;
    if max == 0 {
        return Ok(Vec::new());
    }
    let shared = started()?.shared.clone();
    let mut fs = shared.lock_fs()?;
    exports::list_files(&mut fs, max)
}

/// `.dump_plugin` (nbdkit 1.43.9 on): what `nbdkit --dump-plugin` shows
/// about the filter besides its path and name, as `(key, value)` pairs:
/// our version, the libext2fs we run with, and what we can do that nbdkit's
/// C filter cannot.
pub fn dump_fields() -> Vec<(&'static str, String)> {
    let yes = || "yes".to_string();
    vec![
        ("implementation", "ext2filter (Rust)".to_string()),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("libext2fs_version", ext2_rs::library_version()),
        ("exportname", yes()),
        ("journal_replay", yes()),
        ("block_status", yes()),
        ("multi_conn", yes()),
        ("trim", yes()),
        ("fast_zero", yes()),
    ]
}

/// `.get_ready`: learns the thread model nbdkit settled on.
pub fn get_ready(serialize_requests: bool) {
    SERIALIZE_PLUGIN.store(serialize_requests, Ordering::Relaxed);
}

/// The filesystem every connection shares, opened at start.
struct Started {
    shared: Arc<Shared>,
    /// With `ext2file=/PATH`: that file, found at start and kept for every
    /// connection.
    _file: Option<Arc<ServedFile>>,
    /// Whether the first writable connection's re-open has settled; held
    /// while it runs, so that other writable connections wait for it.
    reopened: Mutex<bool>,
    /// Whether the log says why the journal stays unwritten (told once, by
    /// the first read-only connection or the re-open).
    told_read_only: AtomicBool,
}

/// `.after_fork`: opens the plugin and the filesystem, read-only, and with
/// `ext2file=/PATH` finds the file, so that a bad image or path stops nbdkit
/// at start instead of failing every client.
pub fn after_fork(backend: Backend) -> Result<()> {
    let config = current_config();
    let plugin = Plugin::open(backend, true, SERIALIZE_PLUGIN.load(Ordering::Relaxed))
        .map_err(Error::reported)?;
    let shared = Arc::new(Shared::open(plugin, config.map_cache)?);
    let file = match &config.target {
        Target::File(path) => Some(shared.open_file(path)?),
        Target::ExportName => None,
    };
    *STARTED.lock() = Some(Arc::new(Started {
        shared,
        _file: file,
        reopened: Mutex::new(false),
        told_read_only: AtomicBool::new(false),
    }));
    Ok(())
}

fn started() -> Result<Arc<Started>> {
    STARTED
        .lock()
        .clone()
        .ok_or_else(|| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))
}

impl Started {
    /// Readies the filesystem for a connection that may write (`writable`)
    /// or not.  The first that may write re-opens it read-write, once;
    /// connections arriving meanwhile wait here until that has settled.
    fn admit(&self, backend: Backend, writable: bool) -> Result<()> {
        let journal = current_config().journal;
        if !writable {
            if let Some(note) = opening::read_only_note(&self.shared, journal) {
                if !self.told_read_only.swap(true, Ordering::Relaxed) {
                    report_error(note);
                }
            }
            return Ok(());
        }
        let mut settled = self.reopened.lock();
        if !*settled {
            opening::reopen_writable(&self.shared, backend, journal)?;
            *settled = true;
            // It said why, if the image stays read-only: a read-only
            // connection has nothing to add.
            self.told_read_only.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `.cleanup`: closes the filesystem (writing its metadata) and the plugin.
pub fn cleanup() {
    if let Some(started) = STARTED.lock().take() {
        started.shared.shutdown();
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
    /// `.open`: a connection to the filesystem opened at start; the first
    /// that may write has it re-opened read-write before it goes on.
    pub fn open(backend: Backend, readonly: bool, export_name: &str) -> Result<Connection> {
        let started = started()?;
        started.admit(backend, !readonly)?;
        Ok(Connection {
            export_name: export_name.to_string(),
            readonly,
            shared: started.shared.clone(),
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
