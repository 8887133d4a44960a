//! What may be done with a filesystem and with a file in it: written, only
//! read, or not served at all.  The one place these rules live.
//!
//! The rules are the kernel's (fs/ext4/super.c and ext4.h for features,
//! fs/ext4/inode.c and file.c for inode flags), not libext2fs's: its
//! `EXT2_LIB_FEATURE_RO_COMPAT_SUPP` is what e2fsck can repair, which
//! includes features (`shared_blocks`, `read-only`) the kernel only mounts
//! read-only.  A writer that must leave a filesystem the kernel will mount
//! writes only what the kernel would write.
//!
//! - A compat feature never stops anyone from writing (that is what compat
//!   means); none is listed.
//! - An incompat feature the kernel does not know is refused, whether or not
//!   libext2fs could read it: the kernel refuses to mount it at all.
//! - A ro_compat feature is written only if it is in [`WRITABLE_RO_COMPAT`]:
//!   what the kernel writes and the host keeps consistent (quotas are kept,
//!   see [`crate::quota`]).  Any other (and the `read-only` feature itself)
//!   means read-only, with the feature named.
//! - `mmp` is writable only while the host runs the protocol
//!   ([`crate::mmp`]); [`crate::Filesystem::open`] refuses to write such a
//!   filesystem otherwise.

use std::fmt;

use crate::format::{le16, le32, RO_COMPAT_BTREE_DIR};
use crate::sb;
use crate::sys;

/// A feature bit and the name e2fsprogs (`tune2fs -O`, `dumpe2fs`) gives it.
type Named = (u32, &'static str);

/// Incompat features the kernel reads and writes: any other is refused.
const KNOWN_INCOMPAT: &[Named] = &[
    (sys::EXT2_FEATURE_INCOMPAT_FILETYPE, "filetype"),
    // The journal needs recovery: how that is served is the host's choice
    // (replayed in memory, or into the image), see crate::jbd2.
    (sys::EXT3_FEATURE_INCOMPAT_RECOVER, "needs_recovery"),
    (sys::EXT2_FEATURE_INCOMPAT_META_BG, "meta_bg"),
    (sys::EXT3_FEATURE_INCOMPAT_EXTENTS, "extent"),
    (sys::EXT4_FEATURE_INCOMPAT_64BIT, "64bit"),
    (sys::EXT4_FEATURE_INCOMPAT_MMP, "mmp"),
    (sys::EXT4_FEATURE_INCOMPAT_FLEX_BG, "flex_bg"),
    (sys::EXT4_FEATURE_INCOMPAT_EA_INODE, "ea_inode"),
    (sys::EXT4_FEATURE_INCOMPAT_CSUM_SEED, "metadata_csum_seed"),
    (sys::EXT4_FEATURE_INCOMPAT_LARGEDIR, "large_dir"),
    // Inline-data and encrypted files are each handled per file.
    (sys::EXT4_FEATURE_INCOMPAT_INLINE_DATA, "inline_data"),
    (sys::EXT4_FEATURE_INCOMPAT_ENCRYPT, "encrypt"),
    (sys::EXT4_FEATURE_INCOMPAT_CASEFOLD, "casefold"),
];

/// Incompat features the kernel refuses, by name, for messages.
const REFUSED_INCOMPAT: &[Named] = &[
    (sys::EXT2_FEATURE_INCOMPAT_COMPRESSION, "compression"),
    (sys::EXT3_FEATURE_INCOMPAT_JOURNAL_DEV, "journal_dev"),
    (sys::EXT4_FEATURE_INCOMPAT_DIRDATA, "dirdata"),
];

/// Ro_compat features the filter writes as the kernel does: the kernel's
/// `EXT4_FEATURE_RO_COMPAT_SUPP`.
pub const WRITABLE_RO_COMPAT: &[Named] = &[
    (sys::EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER, "sparse_super"),
    (sys::EXT2_FEATURE_RO_COMPAT_LARGE_FILE, "large_file"),
    (RO_COMPAT_BTREE_DIR, "btree_dir"),
    (sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE, "huge_file"),
    (sys::EXT4_FEATURE_RO_COMPAT_GDT_CSUM, "uninit_bg"),
    (sys::EXT4_FEATURE_RO_COMPAT_DIR_NLINK, "dir_nlink"),
    (sys::EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE, "extra_isize"),
    // Usage is kept for every block allocated or freed (crate::quota).
    (sys::EXT4_FEATURE_RO_COMPAT_QUOTA, "quota"),
    (sys::EXT4_FEATURE_RO_COMPAT_BIGALLOC, "bigalloc"),
    (sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM, "metadata_csum"),
    (sys::EXT4_FEATURE_RO_COMPAT_PROJECT, "project"),
    // Verity files themselves are read-only (see `FileAccess`).
    (sys::EXT4_FEATURE_RO_COMPAT_VERITY, "verity"),
    (sys::EXT4_FEATURE_RO_COMPAT_ORPHAN_PRESENT, "orphan_present"),
];

/// Ro_compat features that mean read-only, by name, for messages.
const READ_ONLY_RO_COMPAT: &[Named] = &[
    (sys::EXT4_FEATURE_RO_COMPAT_HAS_SNAPSHOT, "snapshot_bitmap"),
    (sys::EXT4_FEATURE_RO_COMPAT_REPLICA, "replica"),
    (sys::EXT4_FEATURE_RO_COMPAT_READONLY, "read-only"),
    (sys::EXT4_FEATURE_RO_COMPAT_SHARED_BLOCKS, "shared_blocks"),
];

/// A superblock's feature words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
}

impl Features {
    pub fn of(sb: &sys::ext2_super_block) -> Features {
        Features {
            compat: sb.s_feature_compat,
            incompat: sb.s_feature_incompat,
            ro_compat: sb.s_feature_ro_compat,
        }
    }

    /// The feature words of a raw superblock (the 1024 bytes at offset
    /// 1024 of an image), without libext2fs; `None` if `sb` is too short
    /// or lacks the ext2 magic number.
    pub fn parse(sb: &[u8]) -> Option<Features> {
        let field16 = |at: usize| Some(le16(sb.get(at..at + 2)?, 0));
        let field32 = |at: usize| Some(le32(sb.get(at..at + 4)?, 0));
        if field16(sb::S_MAGIC)? != sys::EXT2_SUPER_MAGIC as u16 {
            return None;
        }
        Some(Features {
            compat: field32(sb::S_FEATURE_COMPAT)?,
            incompat: field32(sb::S_FEATURE_INCOMPAT)?,
            ro_compat: field32(sb::S_FEATURE_RO_COMPAT)?,
        })
    }

    pub fn has_incompat(&self, bit: u32) -> bool {
        self.incompat & bit != 0
    }

    pub fn has_ro_compat(&self, bit: u32) -> bool {
        self.ro_compat & bit != 0
    }
}

/// Whether a filesystem (or a file) may be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    ReadWrite,
    /// Served, never written; the reason names the feature or flag.
    ReadOnly(String),
    /// Not served at all; the reason names the feature or flag.
    Refused(String),
}

impl Verdict {
    pub fn writable(&self) -> bool {
        *self == Verdict::ReadWrite
    }

    /// The stricter of two verdicts (refused, then read-only, then
    /// read-write); the first reason wins among equals.
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (v @ Verdict::Refused(_), _) | (_, v @ Verdict::Refused(_)) => v,
            (v @ Verdict::ReadOnly(_), _) | (_, v @ Verdict::ReadOnly(_)) => v,
            _ => Verdict::ReadWrite,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::ReadWrite => f.write_str("read-write"),
            Verdict::ReadOnly(why) => write!(f, "read-only: {why}"),
            Verdict::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// The name of a feature bit in `table`, or e2fsprogs' name for an unknown
/// bit (`FEATURE_I31`, `FEATURE_R20`).
fn name(table: &[&[Named]], bit: u32, unknown_prefix: char) -> String {
    table
        .iter()
        .flat_map(|t| t.iter())
        .find(|(b, _)| *b == bit)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("FEATURE_{unknown_prefix}{}", bit.trailing_zeros()))
}

/// The bits of `word` outside `allowed`, lowest first.
fn bits_outside(word: u32, allowed: &[Named]) -> impl Iterator<Item = u32> {
    let allowed = allowed.iter().fold(0, |acc, (bit, _)| acc | bit);
    let rest = word & !allowed;
    (0..32)
        .map(|i| 1u32 << i)
        .filter(move |bit| rest & bit != 0)
}

/// What the kernel's rules allow for a filesystem with these features.
pub fn filesystem(features: Features) -> Verdict {
    let unknown: Vec<String> = bits_outside(features.incompat, KNOWN_INCOMPAT)
        .map(|bit| name(&[REFUSED_INCOMPAT], bit, 'I'))
        .collect();
    if !unknown.is_empty() {
        return Verdict::Refused(format!(
            "the filesystem has the incompat feature{} {}, which the kernel does not \
             mount and the filter does not read",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", ")
        ));
    }
    if features.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_READONLY) {
        return Verdict::ReadOnly(
            "the filesystem has the read-only feature: the kernel mounts it read-only".into(),
        );
    }
    let unwritable: Vec<String> = bits_outside(features.ro_compat, WRITABLE_RO_COMPAT)
        .map(|bit| name(&[READ_ONLY_RO_COMPAT], bit, 'R'))
        .collect();
    if !unwritable.is_empty() {
        return Verdict::ReadOnly(format!(
            "the filesystem has the ro_compat feature{} {}, which the kernel mounts \
             read-only and the filter does not write",
            if unwritable.len() > 1 { "s" } else { "" },
            unwritable.join(", ")
        ));
    }
    Verdict::ReadWrite
}

/// The names of the incompat features in `features` the kernel does not
/// know (to name them where libext2fs only says "unsupported feature(s)").
pub fn unknown_incompat(features: Features) -> Vec<String> {
    bits_outside(features.incompat, KNOWN_INCOMPAT)
        .map(|bit| name(&[REFUSED_INCOMPAT], bit, 'I'))
        .collect()
}

/// `EXT2_DIRTY_FL` and `EXT2_COMPRBLK_FL`: set by the old ext2 compression
/// patches on files whose blocks hold compressed clusters.  (`EXT2_COMPR_FL`
/// alone only asks for compression; the kernel ignores it and the blocks
/// hold plain data, as they do under `chattr +c` on ext4.)
const COMPRESSED_DATA_FLAGS: u32 = sys::EXT2_DIRTY_FL | sys::EXT2_COMPRBLK_FL;

/// What the kernel's rules allow for a regular file with inode flags
/// `flags`, served as an NBD export (which can neither append nor keep a
/// verity tree up to date).  `path` names it in the reason.
pub fn file(path: &str, flags: u32) -> Verdict {
    if flags & sys::EXT4_ENCRYPT_FL != 0 {
        return Verdict::Refused(format!(
            "{path}: the file is encrypted: its blocks hold ciphertext and the filter \
             has no key (the kernel refuses to read it without one)"
        ));
    }
    if flags & COMPRESSED_DATA_FLAGS != 0 {
        return Verdict::Refused(format!(
            "{path}: the file is compressed by the old ext2 compression patches \
             (inode flags {:#x}), which neither the kernel nor the filter reads",
            flags & COMPRESSED_DATA_FLAGS
        ));
    }
    if flags & sys::EXT2_IMMUTABLE_FL != 0 {
        return Verdict::ReadOnly(format!("{path}: the file is immutable (chattr +i)"));
    }
    if flags & sys::EXT2_APPEND_FL != 0 {
        return Verdict::ReadOnly(format!(
            "{path}: the file is append-only (chattr +a), and NBD cannot append"
        ));
    }
    if flags & sys::EXT4_VERITY_FL != 0 {
        return Verdict::ReadOnly(format!(
            "{path}: the file has fs-verity, whose hashes a write would break"
        ));
    }
    Verdict::ReadWrite
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::put_le16;
    use crate::format::put_le32;

    fn ext4() -> Features {
        Features {
            compat: 0x3c,
            incompat: 0x2c2,
            ro_compat: 0x46b,
        }
    }

    #[test]
    fn a_plain_ext4_is_writable() {
        assert_eq!(filesystem(ext4()), Verdict::ReadWrite);
        assert_eq!(filesystem(Features::default()), Verdict::ReadWrite);
    }

    #[test]
    fn every_kernel_ro_compat_feature_is_writable() {
        let all = WRITABLE_RO_COMPAT.iter().fold(0, |acc, (bit, _)| acc | bit);
        let f = Features {
            ro_compat: all,
            ..ext4()
        };
        assert_eq!(filesystem(f), Verdict::ReadWrite);
    }

    #[test]
    fn shared_blocks_is_read_only_and_named() {
        let f = Features {
            ro_compat: ext4().ro_compat | sys::EXT4_FEATURE_RO_COMPAT_SHARED_BLOCKS,
            ..ext4()
        };
        match filesystem(f) {
            Verdict::ReadOnly(why) => assert!(why.contains("shared_blocks"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_read_only_feature_is_read_only_and_named() {
        let f = Features {
            ro_compat: ext4().ro_compat | sys::EXT4_FEATURE_RO_COMPAT_READONLY,
            ..ext4()
        };
        match filesystem(f) {
            Verdict::ReadOnly(why) => assert!(why.contains("read-only feature"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_ro_compat_bits_are_read_only_with_e2fsprogs_names() {
        let f = Features {
            ro_compat: ext4().ro_compat | sys::EXT4_FEATURE_RO_COMPAT_REPLICA | (1 << 20),
            ..ext4()
        };
        match filesystem(f) {
            Verdict::ReadOnly(why) => {
                assert!(why.contains("features replica, FEATURE_R20"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_incompat_bits_are_refused_even_with_read_only_ones() {
        let f = Features {
            incompat: ext4().incompat | sys::EXT2_FEATURE_INCOMPAT_COMPRESSION | (1 << 31),
            ro_compat: ext4().ro_compat | sys::EXT4_FEATURE_RO_COMPAT_READONLY,
            ..ext4()
        };
        match filesystem(f) {
            Verdict::Refused(why) => {
                assert!(why.contains("features compression, FEATURE_I31"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(unknown_incompat(f), vec!["compression", "FEATURE_I31"]);
    }

    #[test]
    fn compat_features_never_matter() {
        let f = Features {
            compat: u32::MAX,
            ..ext4()
        };
        assert_eq!(filesystem(f), Verdict::ReadWrite);
    }

    #[test]
    fn raw_superblocks_parse() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(Features::parse(&sb), None);
        put_le16(&mut sb, sb::S_MAGIC, sys::EXT2_SUPER_MAGIC as u16);
        put_le32(&mut sb, sb::S_FEATURE_COMPAT, 1);
        put_le32(&mut sb, sb::S_FEATURE_INCOMPAT, 2);
        put_le32(&mut sb, sb::S_FEATURE_RO_COMPAT, 3);
        assert_eq!(
            Features::parse(&sb),
            Some(Features {
                compat: 1,
                incompat: 2,
                ro_compat: 3
            })
        );
        assert_eq!(Features::parse(&sb[..100]), None);
    }

    #[test]
    fn file_flags_follow_the_kernel() {
        let extents = sys::EXT4_EXTENTS_FL;
        assert_eq!(file("/f", extents), Verdict::ReadWrite);
        // chattr +c alone: plain data.
        assert_eq!(file("/f", extents | sys::EXT2_COMPR_FL), Verdict::ReadWrite);
        for (flag, words) in [
            (sys::EXT2_IMMUTABLE_FL, "immutable"),
            (sys::EXT2_APPEND_FL, "append-only"),
            (sys::EXT4_VERITY_FL, "fs-verity"),
        ] {
            match file("/f", extents | flag) {
                Verdict::ReadOnly(why) => assert!(why.starts_with("/f: ") && why.contains(words)),
                other => panic!("{flag:#x}: {other:?}"),
            }
        }
        for (flag, words) in [
            (sys::EXT4_ENCRYPT_FL, "encrypted"),
            (sys::EXT2_COMPRBLK_FL, "compressed"),
            (sys::EXT2_DIRTY_FL, "compressed"),
        ] {
            match file("/f", extents | flag | sys::EXT2_IMMUTABLE_FL) {
                Verdict::Refused(why) => assert!(why.contains(words), "{why}"),
                other => panic!("{flag:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn and_keeps_the_stricter() {
        let ro = || Verdict::ReadOnly("a".into());
        let no = || Verdict::Refused("b".into());
        assert_eq!(Verdict::ReadWrite.and(ro()), ro());
        assert_eq!(ro().and(no()), no());
        assert_eq!(no().and(ro()), no());
        assert_eq!(
            Verdict::ReadWrite.and(Verdict::ReadWrite),
            Verdict::ReadWrite
        );
    }

    /// An image from mke2fs with superblock feature words changed as
    /// `tune2fs -O` / `debugfs feature` would (the superblock checksum is
    /// left stale, so use an image without metadata_csum).
    fn image_with(set: impl Fn(&mut Features)) -> std::sync::Arc<crate::testing::MemDevice> {
        let dev = crate::testing::MemDevice::mkfs(&["-t", "ext4", "-O", "^metadata_csum"], "8M");
        let mut bytes = dev.snapshot();
        let mut f = Features::parse(&bytes[1024..2048]).unwrap();
        set(&mut f);
        let sb = &mut bytes[1024..2048];
        put_le32(sb, sb::S_FEATURE_INCOMPAT, f.incompat);
        put_le32(sb, sb::S_FEATURE_RO_COMPAT, f.ro_compat);
        std::sync::Arc::new(crate::testing::MemDevice::new(bytes))
    }

    #[test]
    fn opening_read_write_follows_the_policy_and_writes_nothing() {
        use crate::fs::{Access, Filesystem};
        for (bit, name) in [
            (sys::EXT4_FEATURE_RO_COMPAT_SHARED_BLOCKS, "shared_blocks"),
            (sys::EXT4_FEATURE_RO_COMPAT_READONLY, "read-only"),
            (sys::EXT4_FEATURE_RO_COMPAT_HAS_SNAPSHOT, "snapshot_bitmap"),
        ] {
            let dev = image_with(|f| f.ro_compat |= bit);
            let before = dev.snapshot();
            let err = Filesystem::open(dev.clone(), Access::ReadWrite)
                .err()
                .unwrap_or_else(|| panic!("{name}: opened read-write"));
            assert_eq!(err.errno(), crate::error::Errno::EROFS, "{name}");
            assert!(err.to_string().contains(name), "{name}: {err}");
            Filesystem::open(dev.clone(), Access::ReadOnly)
                .unwrap_or_else(|e| panic!("{name}: read-only: {e}"));
            assert!(dev.snapshot() == before, "{name}: the image changed");
        }
    }

    #[test]
    fn opening_names_incompat_features_nobody_reads() {
        use crate::fs::{Access, Filesystem};
        for (bit, name) in [
            (sys::EXT2_FEATURE_INCOMPAT_COMPRESSION, "compression"),
            (sys::EXT4_FEATURE_INCOMPAT_DIRDATA, "dirdata"),
            (1 << 31, "FEATURE_I31"),
        ] {
            let dev = image_with(|f| f.incompat |= bit);
            for access in [Access::ReadOnly, Access::ReadWrite] {
                let err = Filesystem::open(dev.clone(), access)
                    .err()
                    .unwrap_or_else(|| panic!("{name}: opened {access:?}"));
                let text = err.to_string();
                assert!(
                    text.starts_with("open: ") && text.contains(name),
                    "{name}: {text}"
                );
            }
        }
    }
}
