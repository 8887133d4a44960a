//! Turning a request's pieces into as few plugin requests as possible:
//! pieces whose image bytes follow each other are read or written as one
//! request even when holes (or unwritten blocks) separate them in the file;
//! the bytes between them in the client's buffer are zeroes on a read.  A
//! read may also span a small gap in the image (an indirect or extent block
//! between two runs of data): one request costs less than two, however
//! slow the plugin.

use std::ops::Range;

use ext2_rs::extent_map::{Content, Piece};

/// One plugin request serving a run of pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Where the request starts in the image.
    pub image_offset: u64,
    /// How many image bytes it moves.
    pub image_len: u64,
    /// The part of the client's buffer the run's pieces cover (from its
    /// first data piece to its last, holes between them included).
    pub span: Range<usize>,
    /// The pieces it serves, as indexes into the request's pieces.
    pub pieces: Range<usize>,
}

impl Run {
    /// The run moves the bytes of one piece, straight to or from the
    /// client's buffer.
    pub fn is_direct(&self) -> bool {
        self.pieces.len() == 1
    }
}

/// Where in a buffer holding the request from `offset` a piece lies.
pub fn span(piece: &Piece, offset: u64) -> Range<usize> {
    let start = (piece.file_offset - offset) as usize;
    start..start + piece.len as usize
}

/// The data pieces of a request (at `offset`) grouped into runs that are
/// contiguous in the image but for gaps of at most `max_gap` bytes, in file
/// order.  Pieces that are not data and lie outside every run are the
/// caller's to zero.
pub fn runs(pieces: &[Piece], offset: u64, max_gap: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let Content::Data { image_offset } = pieces[i].content else {
            i += 1;
            continue;
        };
        let mut image_end = image_offset + pieces[i].len;
        let mut last = i;
        for (j, p) in pieces.iter().enumerate().skip(i + 1) {
            match p.content {
                Content::Data { image_offset: at }
                    if at >= image_end && at - image_end <= max_gap =>
                {
                    image_end = at + p.len;
                    last = j;
                }
                Content::Data { .. } => break,
                Content::Hole | Content::Unwritten { .. } => {}
            }
        }
        out.push(Run {
            image_offset,
            image_len: image_end - image_offset,
            span: span(&pieces[i], offset).start..span(&pieces[last], offset).end,
            pieces: i..last + 1,
        });
        i = last + 1;
    }
    out
}

/// Copies a run's image bytes (`from`, read in one request) into its part
/// of the client's buffer (`to`, which starts at the run's span), zeroing
/// the holes between its pieces.
pub fn scatter(run: &Run, pieces: &[Piece], offset: u64, from: &[u8], to: &mut [u8]) {
    let base = run.span.start;
    for p in &pieces[run.pieces.clone()] {
        let s = span(p, offset);
        let dst = &mut to[s.start - base..s.end - base];
        if let Content::Data { image_offset } = p.content {
            let at = (image_offset - run.image_offset) as usize;
            dst.copy_from_slice(&from[at..at + dst.len()]);
        } else {
            dst.fill(0);
        }
    }
}

/// The image bytes of a run without gaps, gathered from the client's
/// buffer (`from`, which starts at the run's span) for one write request.
pub fn gather(run: &Run, pieces: &[Piece], offset: u64, from: &[u8]) -> Vec<u8> {
    let base = run.span.start;
    let mut out = Vec::with_capacity(run.image_len as usize);
    for p in &pieces[run.pieces.clone()] {
        if let Content::Data { .. } = p.content {
            let s = span(p, offset);
            out.extend_from_slice(&from[s.start - base..s.end - base]);
        }
    }
    debug_assert_eq!(out.len() as u64, run.image_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(file_offset: u64, len: u64, image_offset: u64) -> Piece {
        Piece::data(file_offset, len, image_offset)
    }

    fn hole(file_offset: u64, len: u64) -> Piece {
        Piece::hole(file_offset, len)
    }

    #[test]
    fn blocks_adjacent_in_the_image_are_one_run_across_holes() {
        // File blocks 0, 2, 4 stored in image blocks 10, 11, 12.
        let pieces = [
            data(0, 1024, 10 * 1024),
            hole(1024, 1024),
            data(2048, 1024, 11 * 1024),
            hole(3072, 1024),
            data(4096, 1024, 12 * 1024),
        ];
        let runs = runs(&pieces, 0, 0);
        assert_eq!(
            runs,
            vec![Run {
                image_offset: 10 * 1024,
                image_len: 3072,
                span: 0..5120,
                pieces: 0..5,
            }]
        );
        let image: Vec<u8> = (0..3072u32).map(|i| (i / 1024 + 1) as u8).collect();
        let mut buf = vec![0xaau8; 5120];
        scatter(&runs[0], &pieces, 0, &image, &mut buf);
        let want: Vec<u8> = [1u8, 0, 2, 0, 3].iter().flat_map(|&b| [b; 1024]).collect();
        assert!(buf == want, "scattered bytes differ");
        assert!(gather(&runs[0], &pieces, 0, &want) == image);
    }

    #[test]
    fn a_jump_in_the_image_starts_a_new_run() {
        let pieces = [
            data(100, 924, 5000),
            hole(1024, 1024),
            data(2048, 1024, 9000),
            data(3072, 10, 5924),
        ];
        let runs = runs(&pieces, 100, 0);
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(Run::is_direct));
        assert_eq!(runs[0].span, 0..924);
        assert_eq!(runs[2].span, 2972..2982);
    }

    #[test]
    fn a_read_spans_small_gaps_in_the_image() {
        // Data in image blocks 10, 12 (11 is an indirect block), then 40.
        let pieces = [
            data(0, 1024, 10 * 1024),
            data(1024, 1024, 12 * 1024),
            data(2048, 1024, 40 * 1024),
        ];
        let runs = runs(&pieces, 0, 1024);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].image_len, 3 * 1024);
        assert_eq!(runs[0].pieces, 0..2);
        let image: Vec<u8> = (0..3072u32).map(|i| (i / 1024 + 1) as u8).collect();
        let mut buf = vec![0u8; 2048];
        scatter(&runs[0], &pieces, 0, &image, &mut buf);
        assert!(buf[..1024].iter().all(|&b| b == 1) && buf[1024..].iter().all(|&b| b == 3));
    }

    #[test]
    fn trailing_holes_stay_outside_the_run() {
        let pieces = [data(0, 512, 0), hole(512, 512)];
        let runs = runs(&pieces, 0, 0);
        assert_eq!(runs[0].span, 0..512);
        assert_eq!(runs[0].pieces, 0..1);
    }
}
