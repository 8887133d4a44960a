//! One served file: its size, its block map, and its data path.  (What
//! changes its map, allocating, converting and freeing blocks, is in
//! `filter::change`.)
//!
//! Reads and writes to blocks the file already owns go straight between the
//! client's buffer and the plugin, one request per contiguous run, holding
//! the map shared and no library lock.  Writes that need new blocks (holes)
//! or that turn unwritten blocks into data hold the map exclusively, so no
//! request can use a mapping while it changes.

use std::ops::Range;

use parking_lot::RwLock;

use crate::filter::shared::Shared;
use ext2_rs::error::{Errno, Error, Result};
use ext2_rs::extent_map::{Content, FileMap, Piece};
use ext2_rs::{Ino, Layout};

pub struct ServedFile {
    pub ino: Ino,
    pub path: String,
    pub size: u64,
    pub(super) layout: Layout,
    /// Blocks can be freed (`mapping::punch`): extents, no bigalloc.
    punchable: bool,
    /// Why the file is never written, if it is not (`ext2_rs::policy::file`,
    /// or inline data).
    read_only: Option<String>,
    map: RwLock<FileMap>,
}

/// How a range of the file reads, for block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Data,
    /// Allocated but unwritten: reads as zeroes.
    Zero,
    /// Not allocated: reads as zeroes.
    Hole,
}

impl ServedFile {
    pub fn new(
        ino: Ino,
        path: String,
        size: u64,
        layout: Layout,
        cluster_ratio: u64,
        map: FileMap,
        read_only: Option<String>,
    ) -> ServedFile {
        // Inline-data files are served read-only: libext2fs 1.47.0's
        // inline-data write path corrupts them.
        let read_only = read_only.or_else(|| {
            (layout == Layout::Inline)
                .then(|| format!("{path}: writing inline-data files is not supported"))
        });
        ServedFile {
            ino,
            path,
            size,
            layout,
            punchable: layout == Layout::Extents && cluster_ratio == 1,
            read_only,
            map: RwLock::new(map),
        }
    }

    /// Whether the file may be written (see `read_only`).
    pub fn writable(&self) -> bool {
        self.read_only.is_none()
    }

    /// Where in `buf` a piece of a request starting at `offset` goes.
    pub(super) fn span(piece: &Piece, offset: u64) -> Range<usize> {
        let start = (piece.file_offset - offset) as usize;
        start..start + piece.len as usize
    }

    pub fn read(&self, shared: &Shared, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.layout == Layout::Inline {
            return shared.lock_fs()?.read_via_library(self.ino, buf, offset);
        }
        let map = self.map.read();
        for piece in map.pieces(offset, buf.len() as u64) {
            let span = Self::span(&piece, offset);
            match piece.content {
                Content::Data { image_offset } => {
                    shared.image.pread(&mut buf[span], image_offset)?
                }
                Content::Unwritten { .. } | Content::Hole => buf[span].fill(0),
            }
        }
        Ok(())
    }

    pub fn write(&self, shared: &Shared, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        if !shared.writable() {
            return Err(Error::other(Errno::EROFS, "the filesystem is read-only"));
        }
        if let Some(why) = &self.read_only {
            return Err(Error::other(Errno::EROFS, why.clone()));
        }
        {
            let map = self.map.read();
            let pieces = map.pieces(offset, data.len() as u64);
            if pieces
                .iter()
                .all(|p| matches!(p.content, Content::Data { .. }))
            {
                return write_direct(shared, &pieces, data, offset, fua);
            }
        }
        // Some blocks must be allocated or converted: take the map for
        // ourselves, then look again, as another writer may have got there.
        let mut map = self.map.write();
        let pieces = map.pieces(offset, data.len() as u64);
        let mut metadata_changed = false;
        for piece in &pieces {
            let bytes = &data[Self::span(piece, offset)];
            match piece.content {
                Content::Data { image_offset } => shared.image.pwrite(bytes, image_offset, fua)?,
                Content::Hole => {
                    self.fill_hole(shared, &mut map, piece, bytes)?;
                    metadata_changed = true;
                }
                Content::Unwritten { image_offset } => {
                    self.fill_unwritten(shared, &mut map, piece, image_offset, bytes)?;
                    metadata_changed = true;
                }
            }
        }
        drop(map);
        if fua && metadata_changed {
            shared.flush()?;
        }
        Ok(())
    }

    /// Block status of `[offset, offset + len)`, as runs of like status.
    pub fn status(&self, offset: u64, len: u64) -> Vec<(u64, Status)> {
        if self.layout == Layout::Inline {
            return vec![(len, Status::Data)];
        }
        let map = self.map.read();
        let mut out: Vec<(u64, Status)> = Vec::new();
        for piece in map.pieces(offset, len) {
            let status = match piece.content {
                Content::Data { .. } => Status::Data,
                Content::Unwritten { .. } => Status::Zero,
                Content::Hole => Status::Hole,
            };
            match out.last_mut() {
                Some((n, s)) if *s == status => *n += piece.len,
                _ => out.push((piece.len, status)),
            }
        }
        out
    }

    /// Whether trim can free blocks of this file (see `mapping::punch`).
    pub fn can_trim(&self) -> bool {
        self.punchable
    }

    fn check_writable(&self, shared: &Shared) -> Result<()> {
        match &self.read_only {
            Some(why) => Err(Error::other(Errno::EROFS, why.clone())),
            None if !shared.writable() => Err(Error::other(
                Errno::EROFS,
                format!("{}: read-only", self.path),
            )),
            None => Ok(()),
        }
    }

    /// Frees the whole blocks of a range (extent files; elsewhere a no-op,
    /// as trim is only advice).
    pub fn trim(&self, shared: &Shared, offset: u64, len: u64) -> Result<()> {
        self.check_writable(shared)?;
        if !self.can_trim() {
            return Ok(());
        }
        let mut map = self.map.write();
        let blocks = whole_blocks(map.block_size(), self.size, offset, len);
        self.punch(shared, &mut map, blocks)
    }

    /// Zeroes a range.  Holes and unwritten blocks already read as zeroes;
    /// with `may_trim`, whole blocks of an extent file are freed; the rest
    /// of the data is zeroed in place.  With `fast`, fails with ENOTSUP
    /// before changing anything if that would mean writing zeroes slowly.
    pub fn zero(
        &self,
        shared: &Shared,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
    ) -> Result<()> {
        self.check_writable(shared)?;
        let punching = may_trim && self.can_trim();
        let mut map = self.map.write();
        let bs = map.block_size();
        let freed = if punching {
            whole_blocks(bs, self.size, offset, len)
        } else {
            0..0
        };
        let in_place: Vec<Piece> = map
            .pieces(offset, len)
            .into_iter()
            .filter(|p| matches!(p.content, Content::Data { .. }))
            .flat_map(|p| outside(&p, freed.start * bs, freed.end * bs))
            .collect();
        if fast && !in_place.is_empty() && !shared.plugin().capabilities().can_fast_zero {
            return Err(Error::Device(Errno::ENOTSUP));
        }
        self.punch(shared, &mut map, freed)?;
        for piece in in_place {
            if let Content::Data { image_offset } = piece.content {
                shared.image.zero(piece.len, image_offset, may_trim, fast)?;
            }
        }
        Ok(())
    }
}

/// The whole file blocks inside `[offset, offset + len)` of a file of
/// `size` bytes.  The block holding the end of the file counts as whole
/// when the range reaches the end: its bytes past the end are never read.
fn whole_blocks(bs: u64, size: u64, offset: u64, len: u64) -> Range<u64> {
    let first = offset.div_ceil(bs);
    let end = if offset + len >= size {
        size.div_ceil(bs)
    } else {
        (offset + len) / bs
    };
    first..end.max(first)
}

/// The parts of a data piece outside the byte range `[from, to)`.
fn outside(piece: &Piece, from: u64, to: u64) -> Vec<Piece> {
    let Content::Data { image_offset } = piece.content else {
        return vec![*piece];
    };
    let end = piece.file_offset + piece.len;
    let mut out = Vec::new();
    let mut keep = |start: u64, stop: u64| {
        if start < stop {
            out.push(Piece {
                file_offset: start,
                len: stop - start,
                content: Content::Data {
                    image_offset: image_offset + (start - piece.file_offset),
                },
            });
        }
    };
    if from >= to {
        keep(piece.file_offset, end);
    } else {
        keep(piece.file_offset, end.min(from));
        keep(piece.file_offset.max(to), end);
    }
    out
}

/// Writes a request whose every byte lands in blocks the file owns.
fn write_direct(
    shared: &Shared,
    pieces: &[Piece],
    data: &[u8],
    offset: u64,
    fua: bool,
) -> Result<()> {
    for piece in pieces {
        if let Content::Data { image_offset } = piece.content {
            shared
                .image
                .pwrite(&data[ServedFile::span(piece, offset)], image_offset, fua)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(file_offset: u64, len: u64, image_offset: u64) -> Piece {
        Piece {
            file_offset,
            len,
            content: Content::Data { image_offset },
        }
    }

    #[test]
    fn whole_blocks_round_inwards() {
        assert_eq!(whole_blocks(1024, 1 << 20, 0, 1024), 0..1);
        assert_eq!(whole_blocks(1024, 1 << 20, 1, 2047), 1..2);
        assert_eq!(whole_blocks(1024, 1 << 20, 1, 1000), 1..1);
        assert_eq!(whole_blocks(4096, 1 << 20, 100, 1 << 20), 1..256);
    }

    #[test]
    fn the_last_partial_block_is_whole_when_reached() {
        // A 10,000-byte file: its third 4 KiB block holds only 1,808 bytes.
        assert_eq!(whole_blocks(4096, 10_000, 4096, 10_000 - 4096), 1..3);
        assert_eq!(whole_blocks(4096, 10_000, 4096, 4000), 1..1);
    }

    #[test]
    fn outside_keeps_both_edges() {
        let p = data(100, 5000, 7000);
        assert_eq!(
            outside(&p, 1024, 4096),
            vec![data(100, 924, 7000), data(4096, 1004, 7000 + 3996)]
        );
    }

    #[test]
    fn outside_an_empty_range_keeps_everything() {
        let p = data(100, 5000, 7000);
        assert_eq!(outside(&p, 0, 0), vec![p]);
    }

    #[test]
    fn outside_a_covering_range_keeps_nothing() {
        assert!(outside(&data(1024, 2048, 0), 0, 8192).is_empty());
    }
}
