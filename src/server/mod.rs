//! The server: its configuration, what it opens at start, and the
//! connections it serves, in safe Rust that never names nbdkit (`abi`
//! turns nbdkit's callbacks into calls here).

pub mod config;
pub mod exports;

use std::sync::Arc;

use crate::device::Device;
use crate::file::{Files, ServedFile, Status};
use crate::volume::Volume;
use config::{Config, Target};
use ext2_rs::error::{Errno, Error, Result};

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

/// The filesystem every connection shares, opened at start.
pub struct Server {
    config: Arc<Config>,
    files: Arc<Files>,
    /// With `ext2file=/PATH`: that file, found at start and kept for every
    /// connection.
    _file: Option<Arc<ServedFile>>,
}

impl Server {
    /// `.after_fork`: opens the filesystem over `device` read-only, and
    /// with `ext2file=/PATH` finds the file, so that a bad image or path
    /// stops nbdkit at start instead of failing every client.
    pub fn start(config: Arc<Config>, device: Arc<dyn Device>) -> Result<Server> {
        let volume = Arc::new(Volume::open(device, config.map_cache)?);
        volume.set_discard(config.discard);
        let files = Arc::new(Files::new(volume));
        let file = match &config.target {
            Target::File(path) => Some(files.open(path)?),
            Target::ExportName => None,
        };
        Ok(Server {
            config,
            files,
            _file: file,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn files(&self) -> &Arc<Files> {
        &self.files
    }

    /// `.list_exports` in exportname mode: the image's regular files.
    pub fn list_exports(&self) -> Result<Vec<exports::ListedFile>> {
        let max = self.config.max_exports;
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut fs = self.files.volume().lock_fs()?;
        exports::list_files(&mut fs, max)
    }

    /// `.open`: a connection to the filesystem opened at start; the first
    /// that may write has it re-opened read-write before it goes on.
    pub fn connect(&self, readonly: bool, export_name: &str) -> Result<Connection> {
        self.files.admit(!readonly, self.config.journal)?;
        Ok(Connection {
            export_name: export_name.to_string(),
            readonly,
            config: self.config.clone(),
            files: self.files.clone(),
            file: None,
        })
    }

    /// `.cleanup`: closes the filesystem (writing its metadata) and the
    /// device.
    pub fn shutdown(&self) {
        self.files.shutdown();
    }
}

/// Per-connection state: which file, on which shared filesystem.
pub struct Connection {
    export_name: String,
    readonly: bool,
    config: Arc<Config>,
    files: Arc<Files>,
    file: Option<Arc<ServedFile>>,
}

impl Connection {
    /// The path inside the image this connection serves.
    pub fn path(&self) -> String {
        match &self.config.default_export {
            Some(default) if self.export_name.is_empty() => default.clone(),
            _ => config::path_for(&self.config.target, &self.export_name),
        }
    }

    /// `.prepare`: resolves the file and builds (or shares) its map.
    pub fn prepare(&mut self) -> Result<()> {
        let path = self.path();
        self.file = Some(self.files.open(&path)?);
        Ok(())
    }

    fn volume(&self) -> &Volume {
        self.files.volume()
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
        self.volume().block_size
    }

    pub fn can_write(&self) -> Result<bool> {
        Ok(!self.readonly && self.volume().writable() && self.file()?.writable())
    }

    /// `.export_description`, in the C filter's words.
    pub fn description(&self) -> Option<String> {
        let base = self.volume().device().description()?;
        Some(format!(
            "embedded '{}' from within ext2 image: {base}",
            self.path()
        ))
    }

    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file()?.read(self.volume(), buf, offset)
    }

    pub fn pwrite(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.file()?.write(self.volume(), data, offset, fua)
    }

    pub fn can_trim(&self) -> Result<bool> {
        Ok(self.can_write()? && self.file()?.can_trim())
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.file()?.trim(self.volume(), offset, len)?;
        if fua {
            self.files.flush()?;
        }
        Ok(())
    }

    pub fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool, fua: bool) -> Result<()> {
        self.file()?
            .zero(self.volume(), offset, len, may_trim, fast)?;
        if fua {
            self.files.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.files.flush()
    }

    pub fn status(&self, offset: u64, len: u64) -> Result<Vec<(u64, Status)>> {
        self.file()?.status(offset, len)
    }
}
