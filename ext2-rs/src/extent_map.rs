//! The map of one served file: which file blocks live at which image blocks.
//!
//! Pure Rust with no library calls, so the data path can split requests
//! without taking the filesystem lock, and so it can be unit-tested.
//! Runs that are adjacent in both the file and the image are merged, so a
//! contiguous file of any size costs one entry.

use std::cmp::{max, min};
use std::collections::BTreeMap;
use std::ops::Range;

/// One run of file blocks stored contiguously in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First file block.
    pub logical: u64,
    /// First image block.
    pub physical: u64,
    /// Number of blocks.
    pub len: u64,
    /// Allocated but never written: reads as zeroes.
    pub unwritten: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical + self.len
    }

    /// The part of the extent inside file blocks `blocks`, if any.
    pub fn clipped_to(&self, blocks: &Range<u64>) -> Option<Extent> {
        let from = self.logical.max(blocks.start);
        let to = self.end().min(blocks.end);
        (from < to).then(|| Extent {
            logical: from,
            physical: self.physical + (from - self.logical),
            len: to - from,
            unwritten: self.unwritten,
        })
    }

    /// Runs of image blocks `(physical, len)` laid out in file order from
    /// file block `logical`, as written extents.
    pub fn written_runs(logical: u64, runs: &[(u64, u64)]) -> Vec<Extent> {
        let mut at = logical;
        runs.iter()
            .map(|&(physical, len)| {
                let e = Extent {
                    logical: at,
                    physical,
                    len,
                    unwritten: false,
                };
                at += len;
                e
            })
            .collect()
    }

    /// Whether `next` continues this run in both spaces with the same state.
    fn continued_by(&self, next: &Extent) -> bool {
        self.end() == next.logical
            && self.physical + self.len == next.physical
            && self.unwritten == next.unwritten
    }
}

/// What a piece of a request finds in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Written data at this byte offset of the image.
    Data { image_offset: u64 },
    /// Allocated, unwritten blocks: zeroes until written.
    Unwritten { image_offset: u64 },
    /// No blocks at all (a hole, or past the end of the file): zeroes.
    Hole,
}

/// A piece of a request: `len` bytes at `file_offset` that are all alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    pub len: u64,
    pub content: Content,
}

impl Piece {
    /// `len` bytes of written data at `image_offset`.
    pub fn data(file_offset: u64, len: u64, image_offset: u64) -> Piece {
        Piece {
            file_offset,
            len,
            content: Content::Data { image_offset },
        }
    }

    /// `len` bytes of hole.
    pub fn hole(file_offset: u64, len: u64) -> Piece {
        Piece {
            file_offset,
            len,
            content: Content::Hole,
        }
    }
}

/// The block map of one file, sorted by logical block, without overlaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMap {
    block_size: u64,
    extents: Vec<Extent>,
}

impl FileMap {
    /// Builds a map from extents in any order; overlaps are a corrupt file.
    pub fn new(block_size: u32, mut extents: Vec<Extent>) -> Result<FileMap, String> {
        extents.retain(|e| e.len > 0);
        extents.sort_by_key(|e| e.logical);
        for pair in extents.windows(2) {
            if pair[0].end() > pair[1].logical {
                return Err(format!(
                    "file blocks {}..{} are mapped twice",
                    pair[1].logical,
                    min(pair[0].end(), pair[1].end())
                ));
            }
        }
        let mut map = FileMap {
            block_size: u64::from(block_size),
            extents: Vec::with_capacity(extents.len()),
        };
        for e in extents {
            map.push_merged(e);
        }
        map.extents.shrink_to_fit();
        Ok(map)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Bytes of memory the map holds (for debug output).
    pub fn memory(&self) -> usize {
        self.extents.capacity() * std::mem::size_of::<Extent>()
    }

    fn push_merged(&mut self, e: Extent) {
        match self.extents.last_mut() {
            Some(last) if last.continued_by(&e) => last.len += e.len,
            _ => self.extents.push(e),
        }
    }

    /// Index of the first extent that ends after `block`.
    fn first_ending_after(&self, block: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= block)
    }

    /// Splits `[offset, offset + len)` of the file into pieces of like
    /// content, merging neighbours that are contiguous in the image so that
    /// each `Data` piece is one device request.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        pieces_in(self.block_size, &self.extents, offset, len, &mut out);
        out
    }

    /// Replaces whatever maps file blocks `[start, end)` with `extents`, which
    /// must lie inside that range (as re-read from the filesystem after it
    /// changed there).
    pub fn replace_range(&mut self, start: u64, end: u64, extents: &[Extent]) {
        let first = self.first_ending_after(start);
        let last = self.extents.partition_point(|e| e.logical < end);
        let mut replacement: Vec<Extent> = Vec::new();
        // Keep the parts of the boundary extents that lie outside the range.
        if let Some(e) = self.extents.get(first).filter(|e| e.logical < start) {
            replacement.push(Extent {
                len: start - e.logical,
                ..*e
            });
        }
        replacement.extend(
            extents
                .iter()
                .filter(|e| e.len > 0)
                .map(|e| clip(e, start, end))
                .filter(|e| e.len > 0),
        );
        if last > 0 {
            if let Some(e) = self.extents.get(last - 1).filter(|e| e.end() > end) {
                let skip = max(end, e.logical) - e.logical;
                replacement.push(Extent {
                    logical: e.logical + skip,
                    physical: e.physical + skip,
                    len: e.len - skip,
                    unwritten: e.unwritten,
                });
            }
        }
        // Merge across both seams: the replacement with the extents either
        // side of it, spliced in place (one move of the tail, not a push
        // per extent: a write into a hole of a file of many extents does
        // this every time).
        let hi = max(first, last);
        let from = first.saturating_sub(1);
        let to = (hi + 1).min(self.extents.len());
        let mut window: Vec<Extent> = Vec::with_capacity(replacement.len() + 2);
        let neighbours = self.extents[from..first]
            .iter()
            .copied()
            .chain(replacement)
            .chain(self.extents[hi..to].iter().copied());
        for e in neighbours {
            match window.last_mut() {
                Some(prev) if prev.continued_by(&e) => prev.len += e.len,
                _ => window.push(e),
            }
        }
        self.extents.splice(from..to, window);
    }
}

/// Extents of a file keyed by their first block, for a map that grows one
/// extent at a time among thousands (a [`FileMap`] moves its whole tail
/// for each): sorted, not overlapping, neighbours that continue each other
/// merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet {
    extents: BTreeMap<u64, Extent>,
}

impl ExtentSet {
    /// The set of `extents`, in any order; overlaps are an error.
    pub fn new(block_size: u32, extents: Vec<Extent>) -> Result<ExtentSet, String> {
        let map = FileMap::new(block_size, extents)?;
        Ok(ExtentSet {
            extents: map.extents.into_iter().map(|e| (e.logical, e)).collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// How many blocks the extents map.
    pub fn blocks(&self) -> u64 {
        self.extents.values().map(|e| e.len).sum()
    }

    /// All extents, in order.
    pub fn to_vec(&self) -> Vec<Extent> {
        self.extents.values().copied().collect()
    }

    /// The parts of the extents inside file blocks `blocks`, in order.
    pub fn clipped(&self, blocks: Range<u64>) -> impl Iterator<Item = Extent> + '_ {
        self.overlapping(blocks.clone())
            .filter_map(move |e| e.clipped_to(&blocks))
    }

    /// The extents that map any of file blocks `blocks`, whole, in order.
    fn overlapping(&self, blocks: Range<u64>) -> impl Iterator<Item = Extent> + '_ {
        let straddling = self
            .extents
            .range(..blocks.start)
            .next_back()
            .map(|(_, e)| *e)
            .filter(|e| e.end() > blocks.start);
        let inside = self.extents.range(blocks).map(|(_, e)| *e);
        straddling.into_iter().chain(inside)
    }

    /// Maps `e`'s blocks as `e` says, replacing whatever mapped them.
    pub fn insert(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        let end = e.end();
        // Whatever overlaps goes, but for its parts either side of `e`.
        let overlapping: Vec<Extent> = self.overlapping(e.logical..end).collect();
        for old in overlapping {
            self.extents.remove(&old.logical);
            if old.logical < e.logical {
                let head = Extent {
                    len: e.logical - old.logical,
                    ..old
                };
                self.extents.insert(old.logical, head);
            }
            if old.end() > end {
                let skip = end - old.logical;
                let tail = Extent {
                    logical: end,
                    physical: old.physical + skip,
                    len: old.len - skip,
                    unwritten: old.unwritten,
                };
                self.extents.insert(end, tail);
            }
        }
        let mut new = e;
        if let Some((&start, prev)) = self.extents.range(..new.logical).next_back() {
            if prev.continued_by(&new) {
                new = Extent {
                    len: prev.len + new.len,
                    ..*prev
                };
                self.extents.remove(&start);
            }
        }
        if let Some(next) = self.extents.get(&new.end()).copied() {
            if new.continued_by(&next) {
                new.len += next.len;
                self.extents.remove(&next.logical);
            }
        }
        self.extents.insert(new.logical, new);
    }
}

/// Splits `[offset, offset + len)` of a file whose map (or the part of it
/// covering the range) is `extents`, sorted and not overlapping, with
/// blocks of `bs` bytes, into pieces of like content appended to `out`,
/// merging neighbours that are contiguous in the image so that each `Data`
/// piece is one device request.
pub fn pieces_in(bs: u64, extents: &[Extent], offset: u64, len: u64, out: &mut Vec<Piece>) {
    let end = offset + len;
    let mut pos = offset;
    let mut i = extents.partition_point(|e| e.end() <= offset / bs);
    while pos < end {
        let (content, piece_end) = match extents.get(i) {
            Some(e) if e.logical * bs <= pos => {
                let image_offset = e.physical * bs + (pos - e.logical * bs);
                let content = if e.unwritten {
                    Content::Unwritten { image_offset }
                } else {
                    Content::Data { image_offset }
                };
                i += 1;
                (content, min(end, e.end() * bs))
            }
            Some(e) => (Content::Hole, min(end, e.logical * bs)),
            None => (Content::Hole, end),
        };
        push_piece(
            out,
            Piece {
                file_offset: pos,
                len: piece_end - pos,
                content,
            },
        );
        pos = piece_end;
    }
}

/// The part of `e` inside blocks `[start, end)`.
fn clip(e: &Extent, start: u64, end: u64) -> Extent {
    let from = max(e.logical, start);
    let to = min(e.end(), end);
    if from >= to {
        return Extent { len: 0, ..*e };
    }
    Extent {
        logical: from,
        physical: e.physical + (from - e.logical),
        len: to - from,
        unwritten: e.unwritten,
    }
}

/// Appends `p`, merging it into the previous piece when they are contiguous.
fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = out.last_mut() {
        let merged = match (last.content, p.content) {
            (Content::Hole, Content::Hole) => true,
            (Content::Data { image_offset: a }, Content::Data { image_offset: b })
            | (Content::Unwritten { image_offset: a }, Content::Unwritten { image_offset: b }) => {
                a + last.len == b
            }
            _ => false,
        };
        if merged {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            unwritten: false,
        }
    }

    #[test]
    fn runs_become_extents_in_file_order() {
        assert_eq!(
            Extent::written_runs(10, &[(500, 2), (900, 3)]),
            vec![ext(10, 500, 2), ext(12, 900, 3)]
        );
        assert!(Extent::written_runs(7, &[]).is_empty());
    }

    fn unwritten(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            unwritten: true,
            ..ext(logical, physical, len)
        }
    }

    fn data(file_offset: u64, len: u64, image_offset: u64) -> Piece {
        Piece::data(file_offset, len, image_offset)
    }

    fn hole(file_offset: u64, len: u64) -> Piece {
        Piece::hole(file_offset, len)
    }

    #[test]
    fn contiguous_extents_merge_into_one_entry() {
        let map = FileMap::new(
            4096,
            vec![ext(0, 100, 10), ext(10, 110, 5), ext(15, 200, 1)],
        )
        .unwrap();
        assert_eq!(map.extents(), &[ext(0, 100, 15), ext(15, 200, 1)]);
    }

    #[test]
    fn a_huge_contiguous_file_costs_one_entry() {
        // 1 TiB in 4 KiB blocks, as 32768-block ext4 extents.
        let blocks = (1u64 << 40) / 4096;
        let extents = (0..blocks / 32768)
            .map(|i| ext(i * 32768, 1_000_000 + i * 32768, 32768))
            .collect();
        let map = FileMap::new(4096, extents).unwrap();
        assert_eq!(map.extents().len(), 1);
        assert!(map.memory() <= 64);
    }

    #[test]
    fn a_hundred_thousand_extents_cost_a_few_mib() {
        let extents = (0..100_000u64)
            .map(|i| ext(i * 2, 1_000_000 + i * 3, 1))
            .collect();
        let map = FileMap::new(4096, extents).unwrap();
        assert_eq!(map.extents().len(), 100_000);
        assert!(map.memory() <= 4 << 20, "{} bytes", map.memory());
        // Lookups stay correct deep into the map.
        assert_eq!(
            map.pieces(2 * 77_777 * 4096 + 5, 1),
            vec![data(
                2 * 77_777 * 4096 + 5,
                1,
                (1_000_000 + 77_777 * 3) * 4096 + 5
            )]
        );
        assert_eq!(
            map.pieces((2 * 77_777 + 1) * 4096, 1),
            vec![hole((2 * 77_777 + 1) * 4096, 1)]
        );
    }

    #[test]
    fn overlapping_extents_are_rejected() {
        assert!(FileMap::new(1024, vec![ext(0, 10, 5), ext(4, 100, 2)]).is_err());
    }

    #[test]
    fn unwritten_and_written_do_not_merge() {
        let map = FileMap::new(1024, vec![ext(0, 10, 2), unwritten(2, 12, 2)]).unwrap();
        assert_eq!(map.extents().len(), 2);
    }

    #[test]
    fn one_byte_reads() {
        let map = FileMap::new(1024, vec![ext(1, 50, 1)]).unwrap();
        assert_eq!(map.pieces(0, 1), vec![hole(0, 1)]);
        assert_eq!(map.pieces(1023, 1), vec![hole(1023, 1)]);
        assert_eq!(map.pieces(1024, 1), vec![data(1024, 1, 50 * 1024)]);
        assert_eq!(map.pieces(2047, 1), vec![data(2047, 1, 50 * 1024 + 1023)]);
        assert_eq!(map.pieces(2048, 1), vec![hole(2048, 1)]);
    }

    #[test]
    fn request_split_at_holes_and_discontiguities() {
        let map = FileMap::new(4096, vec![ext(0, 10, 2), ext(2, 20, 1), ext(5, 30, 1)]).unwrap();
        let pieces = map.pieces(100, 6 * 4096 - 100);
        assert_eq!(
            pieces,
            vec![
                data(100, 2 * 4096 - 100, 10 * 4096 + 100),
                data(2 * 4096, 4096, 20 * 4096),
                hole(3 * 4096, 2 * 4096),
                data(5 * 4096, 4096, 30 * 4096),
            ]
        );
    }

    #[test]
    fn unwritten_pieces_keep_their_location() {
        let map = FileMap::new(1024, vec![unwritten(0, 7, 3)]).unwrap();
        assert_eq!(
            map.pieces(10, 3000),
            vec![Piece {
                file_offset: 10,
                len: 3000,
                content: Content::Unwritten {
                    image_offset: 7 * 1024 + 10
                }
            }]
        );
    }

    #[test]
    fn past_the_last_extent_is_a_hole() {
        let map = FileMap::new(1024, vec![ext(0, 7, 1)]).unwrap();
        assert_eq!(
            map.pieces(512, 2048),
            vec![data(512, 512, 7 * 1024 + 512), hole(1024, 1536)]
        );
        let empty = FileMap::new(1024, vec![]).unwrap();
        assert_eq!(empty.pieces(0, 32 << 20), vec![hole(0, 32 << 20)]);
    }

    #[test]
    fn a_32_mib_request_over_a_contiguous_file_is_one_piece() {
        let map = FileMap::new(1024, vec![ext(0, 1000, 65536)]).unwrap();
        assert_eq!(
            map.pieces(3, 32 << 20),
            vec![data(3, 32 << 20, 1000 * 1024 + 3)]
        );
    }

    #[test]
    fn pieces_cover_the_request_exactly() {
        let map = FileMap::new(
            1024,
            vec![ext(3, 100, 4), unwritten(9, 300, 2), ext(20, 5, 1)],
        )
        .unwrap();
        for offset in [0u64, 1, 1023, 1024, 3000, 9 * 1024 + 5] {
            for len in [1u64, 2, 1024, 5000, 30_000] {
                let pieces = map.pieces(offset, len);
                let mut pos = offset;
                for p in &pieces {
                    assert_eq!(p.file_offset, pos);
                    assert!(p.len > 0);
                    pos += p.len;
                }
                assert_eq!(pos, offset + len);
            }
        }
    }

    #[test]
    fn replace_fills_a_hole_and_merges_neighbours() {
        let mut map = FileMap::new(1024, vec![ext(0, 100, 2), ext(4, 104, 2)]).unwrap();
        map.replace_range(2, 4, &[ext(2, 102, 2)]);
        assert_eq!(map.extents(), &[ext(0, 100, 6)]);
    }

    #[test]
    fn replace_marks_part_of_an_unwritten_extent_written() {
        let mut map = FileMap::new(1024, vec![unwritten(0, 50, 10)]).unwrap();
        map.replace_range(3, 5, &[ext(3, 53, 2)]);
        assert_eq!(
            map.extents(),
            &[unwritten(0, 50, 3), ext(3, 53, 2), unwritten(5, 55, 5)]
        );
    }

    #[test]
    fn replace_with_nothing_punches_a_hole() {
        let mut map = FileMap::new(1024, vec![ext(0, 50, 10)]).unwrap();
        map.replace_range(2, 8, &[]);
        assert_eq!(map.extents(), &[ext(0, 50, 2), ext(8, 58, 2)]);
    }

    #[test]
    fn replace_clips_what_it_is_given() {
        let mut map = FileMap::new(1024, vec![ext(0, 50, 2), ext(10, 60, 2)]).unwrap();
        map.replace_range(2, 10, &[ext(0, 500, 20)]);
        assert_eq!(
            map.extents(),
            &[ext(0, 50, 2), ext(2, 502, 8), ext(10, 60, 2)]
        );
    }

    #[test]
    fn replace_spanning_several_extents() {
        let mut map =
            FileMap::new(1024, vec![ext(0, 10, 3), ext(5, 30, 3), ext(9, 50, 3)]).unwrap();
        map.replace_range(1, 10, &[ext(1, 11, 2)]);
        assert_eq!(map.extents(), &[ext(0, 10, 3), ext(10, 51, 2)]);
    }

    #[test]
    fn an_extent_set_merges_neighbours_and_replaces_what_it_covers() {
        let e = |logical, physical, len| Extent {
            logical,
            physical,
            len,
            unwritten: false,
        };
        let mut set = ExtentSet::new(1024, vec![e(10, 100, 5)]).unwrap();
        set.insert(e(15, 105, 2));
        set.insert(e(5, 95, 5));
        assert_eq!(set.to_vec(), vec![e(5, 95, 12)], "merged both ways");
        set.insert(e(8, 500, 2));
        assert_eq!(
            set.to_vec(),
            vec![e(5, 95, 3), e(8, 500, 2), e(10, 100, 7)],
            "split around what replaced its middle"
        );
        set.insert(e(6, 900, 6));
        assert_eq!(set.to_vec(), vec![e(5, 95, 1), e(6, 900, 6), e(12, 102, 5)]);
        assert_eq!(
            set.clipped(7..13).collect::<Vec<_>>(),
            vec![e(7, 901, 5), e(12, 102, 1)]
        );
        assert_eq!(set.clipped(0..5).count(), 0);
        assert_eq!(set.len(), 3);
        let mut as_map = FileMap::new(1024, Vec::new()).unwrap();
        let mut as_set = ExtentSet::default();
        let mut rng = crate::testing::Rng::new(3);
        for _ in 0..500 {
            let logical = rng.next_u64() % 200;
            let len = 1 + rng.next_u64() % 8;
            let physical = if rng.next_u64() % 2 == 0 {
                logical + 1000
            } else {
                rng.next_u64() % 5000
            };
            as_map.replace_range(logical, logical + len, &[e(logical, physical, len)]);
            as_set.insert(e(logical, physical, len));
            assert_eq!(as_set.to_vec(), as_map.extents(), "as a FileMap does it");
        }
        assert!(ExtentSet::new(1024, vec![e(1, 2, 3), e(2, 9, 1)]).is_err());
    }
}
