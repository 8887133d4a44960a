//! The files being served, one [`ServedFile`] per inode however many
//! connections serve it, and what must reach every one of them: a flush
//! (each file's writes into holes linked, then one commit) and shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::file::ServedFile;
use crate::volume::{JournalMode, Volume};
use ext2_rs::error::{Error, Result};
use ext2_rs::log;
use ext2_rs::Ino;

pub struct Files {
    volume: Arc<Volume>,
    /// Held around opening a file and around linking the writes of files
    /// no connection serves, so that none is opened meanwhile.
    served: Mutex<HashMap<Ino, Weak<ServedFile>>>,
}

impl Files {
    pub fn new(volume: Arc<Volume>) -> Files {
        Files {
            volume,
            served: Mutex::new(HashMap::new()),
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Readies the volume for a connection (see [`Volume::admit`]).
    pub fn admit(&self, writable: bool, journal: JournalMode) -> Result<()> {
        self.volume.admit(writable, journal)
    }

    /// The served file at `path`, reading its inode the first time any
    /// connection opens it.
    pub fn open(&self, path: &str) -> Result<Arc<ServedFile>> {
        let mut served = self.served.lock();
        let ino = self.volume.lookup(path)?;
        if let Some(file) = served.get(&ino).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let found = self.volume.open_inode(ino, path)?;
        if let Some(why) = &found.read_only {
            log::error(&format!("{why}: serving it read-only"));
        }
        let file = Arc::new(ServedFile::new(path.to_string(), found));
        served.retain(|_, weak| weak.strong_count() > 0);
        served.insert(ino, Arc::downgrade(&file));
        Ok(file)
    }

    /// Links every file's writes into holes that wait: each served file's
    /// under its map lock (see `ServedFile::link_unlinked`), then those of
    /// files no connection serves any more, whose trees nobody reads.
    fn link_all(&self) -> Result<()> {
        let live: Vec<Arc<ServedFile>> = self
            .served
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for file in &live {
            file.link_unlinked(&self.volume)?;
        }
        drop(live);
        let served = self.served.lock();
        let is_served: HashSet<Ino> = served
            .iter()
            .filter(|(_, weak)| weak.strong_count() > 0)
            .map(|(ino, _)| *ino)
            .collect();
        self.volume
            .with_transactions_if_writable(|fs, tx| {
                for ino in tx.pending_inodes() {
                    if !is_served.contains(&ino) {
                        tx.link_pending(fs, ino)?;
                    }
                }
                Ok(())
            })
            .map(drop)
    }

    /// Makes everything durable: links the writes into holes that wait,
    /// commits the metadata home and flushes the device.  Writes that
    /// complete while it runs may stay pending: they came after the flush.
    pub fn flush(&self) -> Result<()> {
        if !self.volume.writable() {
            return self.volume.image.flush().map_err(Error::reported);
        }
        self.link_all()?;
        self.volume.commit()
    }

    /// `.cleanup`: see [`Volume::shutdown`].
    pub fn shutdown(&self) {
        self.volume.shutdown(|| self.link_all());
    }
}
