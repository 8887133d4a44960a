//! The part of an on-disk inode the map reader needs: its flags and its
//! `i_block` (the extent tree's root, or the block pointers), read from the
//! image and checked the way the kernel checks them when it loads an inode.

use crate::crc::crc32c;
use crate::format::{
    inode_csum_seed, le16, le32, GOOD_OLD_INODE_SIZE, I_BLOCK, I_BLOCK_LEN, I_CHECKSUM_HI,
    I_CHECKSUM_LO, I_EXTRA_ISIZE, I_FLAGS, I_GENERATION,
};
use crate::lazy_map::geometry::Geometry;
use crate::sys;

/// What kind of map an inode's flags say it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Extents,
    Pointers,
    Inline,
}

/// The fields of one inode the map reader uses.
#[derive(Clone, Debug)]
pub struct RawInode {
    pub kind: MapKind,
    pub i_block: [u8; I_BLOCK_LEN],
    /// The seed of the inode's metadata checksums (extent blocks), with
    /// `metadata_csum`.
    pub csum_seed: Option<u32>,
}

/// The inode's checksum as the kernel computes it (`ext4_inode_csum`), and
/// whether its high half is stored.
fn inode_checksum(raw: &[u8], seed: u32) -> (u32, bool) {
    let mut csum = crc32c(seed, &raw[..I_CHECKSUM_LO]);
    csum = crc32c(csum, &[0, 0]);
    csum = crc32c(csum, &raw[I_CHECKSUM_LO + 2..GOOD_OLD_INODE_SIZE]);
    let mut has_hi = false;
    if raw.len() > GOOD_OLD_INODE_SIZE {
        let extra = usize::from(le16(raw, I_EXTRA_ISIZE));
        csum = crc32c(csum, &raw[GOOD_OLD_INODE_SIZE..I_CHECKSUM_HI]);
        let mut rest = I_CHECKSUM_HI;
        if I_CHECKSUM_HI + 2 <= GOOD_OLD_INODE_SIZE + extra {
            csum = crc32c(csum, &[0, 0]);
            rest += 2;
            has_hi = true;
        }
        csum = crc32c(csum, &raw[rest..]);
    }
    (csum, has_hi)
}

impl RawInode {
    /// Parses inode `ino` from its `geometry.inode_size()` bytes as stored
    /// in the image, checking its checksum; `Err` says why the image is
    /// damaged.
    pub fn parse(raw: &[u8], ino: u32, geometry: &Geometry) -> Result<RawInode, String> {
        if raw.len() < GOOD_OLD_INODE_SIZE {
            return Err(format!("inode {ino} is truncated"));
        }
        let inode = RawInode::from_fields(
            le32(raw, I_FLAGS),
            &raw[I_BLOCK..I_BLOCK + I_BLOCK_LEN],
            le32(raw, I_GENERATION),
            ino,
            geometry,
        )?;
        if let Some(seed) = inode.csum_seed {
            if raw.len() > GOOD_OLD_INODE_SIZE
                && GOOD_OLD_INODE_SIZE + usize::from(le16(raw, I_EXTRA_ISIZE)) > raw.len()
            {
                return Err(format!("inode {ino} has a bad extra size"));
            }
            let (want, has_hi) = inode_checksum(raw, seed);
            let mut stored = u32::from(le16(raw, I_CHECKSUM_LO));
            let want = if has_hi {
                stored |= u32::from(le16(raw, I_CHECKSUM_HI)) << 16;
                want
            } else {
                want & 0xffff
            };
            if stored != want {
                return Err(format!("inode {ino} fails its checksum"));
            }
        }
        Ok(inode)
    }

    /// The map fields of inode `ino` (as libext2fs, which checked its
    /// checksum, read them): flags, `i_block` and generation.
    pub fn from_fields(
        flags: u32,
        i_block: &[u8],
        generation: u32,
        ino: u32,
        geometry: &Geometry,
    ) -> Result<RawInode, String> {
        let csum_seed = geometry
            .csum_seed
            .map(|fs_seed| inode_csum_seed(fs_seed, ino, generation));
        let kind = match (
            flags & sys::EXT4_INLINE_DATA_FL != 0,
            flags & sys::EXT4_EXTENTS_FL != 0,
        ) {
            (true, true) => {
                return Err(format!(
                    "inode {ino} has both the inline-data and the extents flag"
                ))
            }
            (true, false) if !geometry.inline_data => {
                return Err(format!(
                    "inode {ino} has the inline-data flag on a filesystem without inline data"
                ))
            }
            (true, false) => MapKind::Inline,
            (false, true) => MapKind::Extents,
            (false, false) => MapKind::Pointers,
        };
        let mut block = [0u8; I_BLOCK_LEN];
        block.copy_from_slice(&i_block[..I_BLOCK_LEN]);
        Ok(RawInode {
            kind,
            i_block: block,
            csum_seed,
        })
    }

    /// The 15 block pointers of a block-mapped inode.
    pub fn pointers(&self) -> [u32; 15] {
        let mut out = [0u32; 15];
        for (i, p) in out.iter_mut().enumerate() {
            *p = le32(&self.i_block, i * 4);
        }
        out
    }
}
