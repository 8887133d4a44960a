//! A safe wrapper over one open libext2fs filesystem.
//!
//! libext2fs is not thread-safe, not even for reads (its inode cache and
//! lazily loaded bitmaps are shared state), so a [`Filesystem`] is `Send`
//! but not `Sync`, and every method that calls the library takes
//! `&mut self`: its owner serializes the calls (the filter holds one
//! process-wide lock around it).

use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{check, Errno, Error, Ext2Code, Result};
use crate::handle::Handle;
pub use crate::handle::Ino;
use crate::mmp::{MmpConfig, Protection};
use crate::policy::{self, Features, Verdict};
use crate::quota::{self, Quotas};
use crate::reserved::{self, Reserved};
use crate::sys;
use crate::undo;

/// How a file's blocks are recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// An ext4 extent tree.
    Extents,
    /// ext2/ext3 direct and indirect block pointers.
    Indirect,
    /// The bytes live inside the inode itself.
    Inline,
}

/// What the filter needs to know about an inode.
#[derive(Clone, Copy, Debug)]
pub struct InodeInfo {
    pub mode: u16,
    pub size: u64,
    pub layout: Layout,
    /// `i_flags` (immutable, append-only, encrypted...: see
    /// [`crate::policy::file`]).
    pub flags: u32,
}

impl InodeInfo {
    pub fn is_regular(&self) -> bool {
        u32::from(self.mode) & sys::LINUX_S_IFMT == sys::LINUX_S_IFREG
    }

    pub fn is_dir(&self) -> bool {
        u32::from(self.mode) & sys::LINUX_S_IFMT == sys::LINUX_S_IFDIR
    }
}

/// How the filesystem was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// An open filesystem, made of its library handle and what was read from
/// it at open: the blocks it keeps for itself and its quota files.
pub struct Filesystem {
    handle: Handle,
    access: Access,
    reserved: Reserved,
    /// The quota files kept while open read-write.
    quotas: Option<Quotas>,
}

impl Filesystem {
    /// Opens the filesystem on `device`.  The error text names the call and
    /// gives the library's words (`open: Bad magic number in super-block`).
    ///
    /// Read-write only where [`crate::policy::filesystem`] allows it, and
    /// not for a filesystem with `mmp` (see [`Filesystem::open_protected`]);
    /// otherwise the error is [`Error::ReadOnly`] and says why.  Read-write also
    /// loads the quota files ([`crate::quota`]): a filesystem whose quotas
    /// cannot be kept is not opened read-write either.
    pub fn open(device: Arc<dyn BlockDevice>, access: Access) -> Result<Filesystem> {
        Filesystem::open_as(device, access, false)
    }

    /// Opens read-write a filesystem with the `mmp` feature, while `held`
    /// runs the multi-mount protection protocol on its device.
    pub fn open_protected(device: Arc<dyn BlockDevice>, _held: &Protection) -> Result<Filesystem> {
        Filesystem::open_as(device, Access::ReadWrite, true)
    }

    fn open_as(device: Arc<dyn BlockDevice>, access: Access, mmp_held: bool) -> Result<Filesystem> {
        // libext2fs would run MMP itself by opening the device by name
        // (with O_DIRECT), bypassing the io_manager: the host runs it.
        let mut flags = (sys::EXT2_FLAG_64BITS | sys::EXT2_FLAG_SKIP_MMP) as i32;
        if access == Access::ReadWrite {
            flags |= sys::EXT2_FLAG_RW as i32;
        }
        let mut handle = match Handle::open(device.clone(), flags) {
            Ok(handle) => handle,
            Err(code) => return Err(open_failure(&*device, code)),
        };
        let features = Features::of(handle.super_block());
        if let Err(e) = permitted(features, access, mmp_held) {
            handle.free_unclosed();
            return Err(e);
        }
        let reserved = reserved::collect(&mut handle)?;
        // SAFETY: `fs` is open; flags is a plain field.
        unsafe {
            // Rewrite only the primary superblock and descriptors on flush:
            // rewriting every backup on every client flush is slow and
            // e2fsck only needs the primary to be right.
            (*handle.raw()).flags |= sys::EXT2_FLAG_MASTER_SB_ONLY as i32;
        }
        let mut quotas = None;
        if access == Access::ReadWrite {
            // SAFETY: `fs` is open.
            let code = unsafe { sys::ext2fs_read_bitmaps(handle.raw()) };
            check(code, || "read_bitmaps".into())?;
            undo::install(&mut handle);
            quotas = Quotas::load(&mut handle).map_err(|e| {
                Error::ReadOnly(format!(
                    "quotas cannot be kept ({e}): the filesystem is not written"
                ))
            })?;
        }
        Ok(Filesystem {
            handle,
            access,
            reserved,
            quotas,
        })
    }

    /// Whether block changes are charged to quota files ([`crate::quota`]).
    pub fn keeps_quotas(&self) -> bool {
        self.quotas.is_some()
    }

    /// The quota files kept, if any.
    pub fn quotas(&self) -> Option<&Quotas> {
        self.quotas.as_ref()
    }

    /// Runs `f` with the quota state taken out of the filesystem (both are
    /// needed mutably); an error if there is none.
    pub(crate) fn with_quotas<T>(
        &mut self,
        f: impl FnOnce(&mut Handle, &mut Quotas) -> Result<T>,
    ) -> Result<T> {
        let quotas = self
            .quotas
            .as_mut()
            .ok_or_else(|| Error::other(Errno::EINVAL, "the filesystem keeps no quotas"))?;
        f(&mut self.handle, quotas)
    }

    /// Runs `op`, a change of inode `ino`'s blocks, and charges its owner
    /// the bytes it added or freed, in the same change (see
    /// [`crate::quota`]).  Does nothing more than `op` on a filesystem
    /// without quotas.
    pub(crate) fn charging<T>(
        &mut self,
        ino: Ino,
        op: impl FnOnce(&mut Filesystem) -> Result<T>,
    ) -> Result<T> {
        if !self.keeps_quotas() {
            return op(self);
        }
        let (owner, before) = quota::owner_and_usage(&mut self.handle, ino)?;
        let value = op(self)?;
        let (_, after) = quota::owner_and_usage(&mut self.handle, ino)?;
        let delta = i64::try_from(i128::from(after) - i128::from(before)).map_err(|_| {
            Error::other(
                Errno::EIO,
                "the block count changed by more than 2^63 bytes",
            )
        })?;
        self.with_quotas(|handle, quotas| quotas.add_space(handle, owner, delta))?;
        Ok(value)
    }

    /// The first block of `[start, start + len)` that the filesystem keeps
    /// for its own structures, if any.
    pub fn first_reserved_in(&self, start: u64, len: u64) -> Option<u64> {
        self.reserved.first_in(start, len)
    }

    /// The blocks the filesystem keeps for itself.
    pub fn reserved(&self) -> &Reserved {
        &self.reserved
    }

    pub fn access(&self) -> Access {
        self.access
    }

    pub fn super_block(&self) -> &sys::ext2_super_block {
        self.handle.super_block()
    }

    /// The multi-mount protection parameters (see [`crate::mmp`]), or
    /// `None` without `mmp`.  An MMP block outside the filesystem is an
    /// error, as in the kernel.
    pub fn mmp_config(&mut self) -> Result<Option<MmpConfig>> {
        let fs = self;
        let sb = fs.super_block();
        if sb.s_feature_incompat & sys::EXT4_FEATURE_INCOMPAT_MMP == 0 {
            return Ok(None);
        }
        let block = sb.s_mmp_block;
        let first = u64::from(sb.s_first_data_block);
        let interval = match u64::from(sb.s_mmp_update_interval) {
            0 => u64::from(sys::EXT4_MMP_UPDATE_INTERVAL),
            n => n.min(u64::from(sys::EXT4_MMP_MAX_UPDATE_INTERVAL)),
        };
        if block < first || block >= fs.blocks_count() {
            return Err(Error::other(
                Errno::EIO,
                format!("multi-mount protection: invalid MMP block {block} in the superblock"),
            ));
        }
        Ok(Some(MmpConfig {
            block,
            block_size: fs.block_size(),
            update_interval: interval,
            checksum_seed: fs.metadata_csum_seed(),
        }))
    }

    pub fn block_size(&self) -> u32 {
        self.handle.fields().blocksize
    }

    /// Blocks per allocation cluster: 1, or more with the bigalloc feature.
    pub fn cluster_ratio(&self) -> u64 {
        1 << self.handle.fields().cluster_ratio_bits
    }

    pub fn blocks_count(&self) -> u64 {
        // SAFETY: an open filesystem's superblock.
        unsafe { sys::ext2fs_blocks_count(self.handle.fields().super_) }
    }

    /// Whether the journal holds transactions not yet written to their
    /// places (`needs_recovery`).
    pub fn needs_recovery(&self) -> bool {
        self.super_block().s_feature_incompat & sys::EXT3_FEATURE_INCOMPAT_RECOVER != 0
    }

    /// Clears `needs_recovery` in the superblock, as e2fsck does once the
    /// journal has been replayed into the image and marked empty
    /// (`e2fsck_clear_recover`), and writes the superblock out with
    /// `ext2fs_flush2`, which then flushes the channel (and so the device).
    pub fn clear_needs_recovery(&mut self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(Error::other(
                crate::error::Errno::EROFS,
                "clearing needs_recovery: the filesystem is open read-only",
            ));
        }
        // SAFETY: an open filesystem always has its superblock loaded; we
        // hold `&mut self`, so nothing else uses the handle meanwhile.
        unsafe {
            (*(*self.raw()).super_).s_feature_incompat &= !sys::EXT3_FEATURE_INCOMPAT_RECOVER;
        }
        // SAFETY: open filesystem.
        unsafe { sys::ext2fs_mark_super_dirty(self.raw()) };
        // SAFETY: open filesystem, opened read-write.
        let code = unsafe { sys::ext2fs_flush2(self.raw(), 0) };
        check(code, || "clearing needs_recovery: flush".into())
    }

    /// Looks `path` up from the root, following symlinks (absolute ones from
    /// the image's root) in every component and at the end.
    ///
    /// Resolved here, a component at a time with `ext2fs_lookup`, rather
    /// than by `ext2fs_namei_follow`: libext2fs 1.47.0 reads an inline-data
    /// symlink into a buffer of `i_size` bytes whatever the inline data's
    /// size (a heap overflow on a damaged image, found by fuzzing), and a
    /// slow symlink's target as `i_size` bytes of a one-block buffer.  As
    /// there, at most [`MAX_NESTED_LINKS`] links are followed.
    pub fn lookup(&mut self, path: &str) -> Result<Ino> {
        if path.contains('\0') {
            return Err(Error::other(Errno::EINVAL, "file name contains a NUL byte"));
        }
        let root = sys::EXT2_ROOT_INO;
        let mut links = 0;
        self.resolve(root, path.as_bytes(), &mut links)
    }

    /// `path` from directory `dir` (from the root if absolute).
    fn resolve(&mut self, dir: Ino, path: &[u8], links: &mut u32) -> Result<Ino> {
        let (mut at, rest) = match path.strip_prefix(b"/") {
            Some(rest) => (sys::EXT2_ROOT_INO, rest),
            None => (dir, path),
        };
        for name in rest.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            let len = i32::try_from(name.len())
                .map_err(|_| Error::other(Errno::ENAMETOOLONG, "namei: file name too long"))?;
            let mut ino: Ino = 0;
            // SAFETY: open filesystem; `name` holds `len` bytes (no NUL
            // needed: the length is given); NULL asks the library for its
            // own block buffer; valid out-pointer.
            let code = unsafe {
                sys::ext2fs_lookup(
                    self.raw(),
                    at,
                    name.as_ptr().cast(),
                    len,
                    ptr::null_mut(),
                    &mut ino,
                )
            };
            check(code, || "namei".into())?;
            at = self.follow(at, ino, links)?;
        }
        Ok(at)
    }

    /// `ino` (found in directory `dir`), or where it leads if a symlink.
    fn follow(&mut self, dir: Ino, ino: Ino, links: &mut u32) -> Result<Ino> {
        let inode = self.read_raw_inode(ino)?;
        if u32::from(inode.i_mode) & sys::LINUX_S_IFMT != sys::LINUX_S_IFLNK {
            return Ok(ino);
        }
        *links += 1;
        if *links > MAX_NESTED_LINKS {
            return Err(Error::ext2(
                "namei",
                sys::EXT2_ET_SYMLINK_LOOP as sys::errcode_t,
            ));
        }
        let size = u64::from(inode.i_size) | (u64::from(inode.i_size_high) << 32);
        let mut target = Vec::new();
        let i_block_len = std::mem::size_of_val(&inode.i_block) as u64;
        if size > 0 && size < i_block_len {
            // A fast symlink: the target is in the inode's block pointers.
            for word in inode.i_block {
                target.extend_from_slice(&word.to_le_bytes());
            }
            target.truncate(size as usize);
        } else {
            if size > u64::from(self.block_size()) {
                return Err(Error::other(
                    Errno::EIO,
                    format!(
                        "namei: symlink inode {ino} is {size} bytes long, more than a block:                          the image is damaged"
                    ),
                ));
            }
            // Inline data or a block, read only as far as the inode's size.
            target.resize(size as usize, 0);
            crate::libfile::LibraryFile::open(&mut self.handle, ino, false)?
                .read_at(&mut target, 0)?;
        }
        self.resolve(dir, &target, links)
    }

    fn read_raw_inode(&mut self, ino: Ino) -> Result<sys::ext2_inode> {
        let mut inode = sys::ext2_inode::default();
        // SAFETY: open filesystem, valid out-pointer of the right type.
        let code = unsafe { sys::ext2fs_read_inode(self.raw(), ino, &mut inode) };
        check(code, || "inode".into())?;
        Ok(inode)
    }

    fn write_raw_inode(&mut self, ino: Ino, inode: &mut sys::ext2_inode) -> Result<()> {
        // SAFETY: open filesystem, inode buffer of the right type.
        let code = unsafe { sys::ext2fs_write_inode(self.raw(), ino, inode) };
        check(code, || "write_inode".into())
    }

    pub fn inode(&mut self, ino: Ino) -> Result<InodeInfo> {
        let inode = self.read_raw_inode(ino)?;
        let layout = if inode.i_flags & sys::EXT4_INLINE_DATA_FL != 0 {
            Layout::Inline
        } else if inode.i_flags & sys::EXT4_EXTENTS_FL != 0 {
            Layout::Extents
        } else {
            Layout::Indirect
        };
        Ok(InodeInfo {
            mode: inode.i_mode,
            size: u64::from(inode.i_size) | (u64::from(inode.i_size_high) << 32),
            layout,
            flags: inode.i_flags,
        })
    }

    /// Reads `buf.len()` bytes at `offset` through the library's own file
    /// code (used only for inline-data files, whose bytes live in the inode).
    pub fn read_via_library(&mut self, ino: Ino, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::libfile::LibraryFile::open(&mut self.handle, ino, false)?.read_at(buf, offset)
    }

    /// Writes bitmaps, group descriptors and the superblock, then flushes the
    /// channel (and so the device).
    pub fn flush(&mut self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        // SAFETY: open filesystem.
        let code = unsafe { sys::ext2fs_flush2(self.raw(), 0) };
        check(code, || "flush".into())
    }

    /// The raw handle, for the sibling modules that walk and change maps.
    pub(crate) fn raw(&mut self) -> sys::ext2_filsys {
        self.handle.raw()
    }

    /// The library handle, for the helpers below the filesystem.
    pub fn handle(&mut self) -> &mut Handle {
        &mut self.handle
    }

    /// Reads image block `block` into `buf` (one block) as libext2fs
    /// reads it: through the filesystem's io channel.
    pub(crate) fn read_block(&mut self, block: u64, buf: &mut [u8]) -> Result<()> {
        assert_eq!(buf.len(), self.block_size() as usize, "one block");
        // SAFETY: open filesystem; `buf` holds exactly one block.
        let code = unsafe {
            sys::io_channel_read_blk64((*self.raw()).io, block, 1, buf.as_mut_ptr().cast())
        };
        check(code, || format!("reading block {block}"))
    }

    /// Writes `buf` (one block) to image block `block` through the io
    /// channel, as libext2fs writes metadata.
    pub(crate) fn write_block(&mut self, block: u64, buf: &[u8]) -> Result<()> {
        assert_eq!(buf.len(), self.block_size() as usize, "one block");
        // SAFETY: open filesystem; `buf` holds exactly one block, which the
        // channel only reads.
        let code =
            unsafe { sys::io_channel_write_blk64((*self.raw()).io, block, 1, buf.as_ptr().cast()) };
        check(code, || format!("writing block {block}"))
    }

    /// The seed of every metadata checksum (`s_checksum_seed`, or the CRC32C
    /// of the UUID), or `None` without `metadata_csum`.
    pub fn metadata_csum_seed(&self) -> Option<u32> {
        let sb = self.super_block();
        (sb.s_feature_ro_compat & sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if sb.s_feature_incompat & sys::EXT4_FEATURE_INCOMPAT_CSUM_SEED != 0 {
                sb.s_checksum_seed
            } else {
                crate::crc::crc32c(!0, &sb.s_uuid)
            }
        })
    }

    pub(crate) fn read_inode_raw(&mut self, ino: Ino) -> Result<sys::ext2_inode> {
        self.read_raw_inode(ino)
    }

    pub(crate) fn write_inode_raw(&mut self, ino: Ino, inode: &mut sys::ext2_inode) -> Result<()> {
        self.write_raw_inode(ino, inode)
    }

    pub fn device(&self) -> &CStr {
        self.handle.device()
    }
}

/// The most symlinks one lookup follows (libext2fs's
/// `EXT2FS_MAX_NESTED_LINKS`); more is `EXT2_ET_SYMLINK_LOOP`.
pub const MAX_NESTED_LINKS: u32 = 8;

/// Whether a filesystem with `features` may be opened for `access`.
fn permitted(features: Features, access: Access, mmp_held: bool) -> Result<()> {
    match policy::filesystem(features) {
        Verdict::Refused(why) => Err(Error::other(Errno::ENOTSUP, format!("open: {why}"))),
        Verdict::ReadOnly(why) if access == Access::ReadWrite => Err(Error::ReadOnly(why)),
        _ if access == Access::ReadWrite
            && features.has_incompat(sys::EXT4_FEATURE_INCOMPAT_MMP)
            && !mmp_held =>
        {
            Err(Error::ReadOnly(
                "the filesystem has the mmp feature (multi-mount protection): it is \
                 written only while the protocol runs"
                    .into(),
            ))
        }
        _ => Ok(()),
    }
}

/// The error for a failed `ext2fs_open`; where libext2fs only says it does
/// not support a feature, the features are named.
fn open_failure(device: &dyn BlockDevice, code: sys::errcode_t) -> Error {
    let unsupported = [sys::EXT2_ET_UNSUPP_FEATURE, sys::EXT2_ET_RO_UNSUPP_FEATURE]
        .iter()
        .any(|&c| code == c as sys::errcode_t);
    if unsupported {
        let mut sb = vec![0u8; 1024];
        if device.read_at(&mut sb, 1024).is_ok() {
            match Features::parse(&sb).map(policy::filesystem) {
                Some(Verdict::Refused(why)) => {
                    return Error::other(Errno::ENOTSUP, format!("open: {why}"))
                }
                Some(Verdict::ReadOnly(why)) => return Error::ReadOnly(why),
                _ => {}
            }
        }
    }
    if code == sys::EXT2_ET_RO_UNSUPP_FEATURE as sys::errcode_t {
        // Features libext2fs can read but not write.
        return Error::ReadOnly(format!("open: {}", Ext2Code(code)));
    }
    Error::ext2("open", code)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use super::{Access, Filesystem};
    use crate::testing::MemDevice;

    /// An inline-data image with `/hello.txt`, a 100-byte symlink to it
    /// (`/long`, its target kept in the inode's inline data) and a chain of
    /// nine links, after `debugfs -w` requests `edits`.
    fn image(name: &str, edits: &[&str]) -> Arc<MemDevice> {
        let dir = std::env::temp_dir().join(format!("ext2-rs-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hello.txt"), "hello\n").unwrap();
        let target = format!("/{}hello.txt", "./".repeat(45));
        std::os::unix::fs::symlink(&target, src.join("long")).unwrap();
        std::os::unix::fs::symlink("hello.txt", src.join("l0")).unwrap();
        for i in 1..9 {
            std::os::unix::fs::symlink(format!("l{}", i - 1), src.join(format!("l{i}"))).unwrap();
        }
        let img = dir.join("fs.img");
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program).args(args).output().unwrap();
            assert!(out.status.success(), "{program} {args:?}: {out:?}");
        };
        let (src_s, img_s) = (src.to_str().unwrap(), img.to_str().unwrap());
        run(
            "mke2fs",
            &[
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "1024",
                "-I",
                "256",
                "-O",
                "inline_data",
                "-d",
                src_s,
                img_s,
                "1M",
            ],
        );
        for edit in edits {
            run("debugfs", &["-w", "-R", edit, img_s]);
        }
        let device = Arc::new(MemDevice::from_file(&img));
        let _ = std::fs::remove_dir_all(&dir);
        device
    }

    #[test]
    fn symlinks_are_followed_in_every_component_up_to_eight() {
        let mut fs = Filesystem::open(image("links", &[]), Access::ReadOnly).unwrap();
        let hello = fs.lookup("/hello.txt").unwrap();
        assert_eq!(fs.lookup("/long").unwrap(), hello);
        assert_eq!(fs.lookup("l7").unwrap(), hello);
        let e = fs.lookup("/l8").unwrap_err();
        let loop_code = crate::sys::EXT2_ET_SYMLINK_LOOP as crate::sys::errcode_t;
        assert!(
            matches!(e, crate::Error::Ext2 { code, .. } if code.0 == loop_code),
            "{e:?}"
        );
        assert!(fs.lookup("/hello.txt/x").is_err());
        assert!(fs.lookup("/missing").is_err());
    }

    /// libext2fs's `ext2fs_namei_follow` copies an inline-data symlink's
    /// whole target into a buffer of `i_size` bytes: with `i_size` 0 here,
    /// 100 bytes into an empty allocation (glibc then aborts, or valgrind
    /// reports an invalid write).  Found by the `read` fuzz target.
    #[test]
    fn an_inline_symlink_longer_than_its_size_is_read_only_to_its_size() {
        let edits = ["sif /long size 0", "sif /l0 size 100"];
        let mut fs = Filesystem::open(image("short", &edits), Access::ReadOnly).unwrap();
        // An empty target leads back to the directory, as in libext2fs.
        assert_eq!(fs.lookup("/long").unwrap(), crate::sys::EXT2_ROOT_INO);
        // A fast symlink's size past its target: the bytes after it are
        // zeroes, not a name.
        assert!(fs.lookup("/l0").is_err());
        for _ in 0..100 {
            let _ = fs.lookup("/long");
        }
    }
}
