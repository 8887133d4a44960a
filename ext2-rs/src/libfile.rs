//! A file read and written through libext2fs's own file code
//! (`ext2fs_file_*`): for the few files whose bytes are not worth a map of
//! their own (inline-data files, quota files).  The library maps, allocates
//! and grows the file, and keeps its size and block count.

use std::marker::PhantomData;
use std::ptr;

use crate::error::{check, Result};
use crate::handle::{Handle, Ino};
use crate::sys;

/// An open `ext2_file_t`, closed on drop; it borrows the filesystem.
pub(crate) struct LibraryFile<'fs> {
    file: sys::ext2_file_t,
    _fs: PhantomData<&'fs mut Handle>,
}

impl<'fs> LibraryFile<'fs> {
    /// Opens inode `ino`, for writing too if `write`.
    pub(crate) fn open(fs: &'fs mut Handle, ino: Ino, write: bool) -> Result<LibraryFile<'fs>> {
        let flags = if write {
            sys::EXT2_FILE_WRITE as i32
        } else {
            0
        };
        let mut file: sys::ext2_file_t = ptr::null_mut();
        // SAFETY: open filesystem; the library reads the inode itself and
        // `file` is a valid out-pointer; closed by Drop or `close`.
        let code =
            unsafe { sys::ext2fs_file_open2(fs.raw(), ino, ptr::null_mut(), flags, &mut file) };
        check(code, || "file_open".into())?;
        Ok(LibraryFile {
            file,
            _fs: PhantomData,
        })
    }

    fn seek(&mut self, offset: u64) -> Result<()> {
        // SAFETY: `file` is open.
        let code = unsafe {
            sys::ext2fs_file_llseek(
                self.file,
                offset,
                sys::EXT2_SEEK_SET as i32,
                ptr::null_mut(),
            )
        };
        check(code, || "llseek".into())
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as
    /// zeroes.
    pub(crate) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.seek(offset)?;
        let mut done = 0usize;
        while done < buf.len() {
            let mut got: u32 = 0;
            let want = (buf.len() - done).min(u32::MAX as usize) as u32;
            // SAFETY: `file` is open; the buffer has `want` bytes left.
            let code = unsafe {
                sys::ext2fs_file_read(self.file, buf[done..].as_mut_ptr().cast(), want, &mut got)
            };
            check(code, || "read".into())?;
            if got == 0 {
                buf[done..].fill(0);
                break;
            }
            done += got as usize;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, allocating blocks and growing the file as
    /// needed.
    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.seek(offset)?;
        let mut done = 0usize;
        while done < buf.len() {
            let mut wrote: u32 = 0;
            let want = (buf.len() - done).min(u32::MAX as usize) as u32;
            // SAFETY: `file` is open for writing; `want` bytes are readable.
            let code = unsafe {
                sys::ext2fs_file_write(self.file, buf[done..].as_ptr().cast(), want, &mut wrote)
            };
            check(code, || "write".into())?;
            if wrote == 0 {
                return Err(crate::error::Error::other(
                    crate::error::Errno::EIO,
                    "write: libext2fs wrote nothing",
                ));
            }
            done += wrote as usize;
        }
        Ok(())
    }

    /// Writes out the file's buffered block and inode, and closes it.
    pub(crate) fn close(mut self) -> Result<()> {
        let file = std::mem::replace(&mut self.file, ptr::null_mut());
        // SAFETY: `file` is open and closed once (Drop sees NULL).
        let code = unsafe { sys::ext2fs_file_close(file) };
        check(code, || "file_close".into())
    }
}

impl Drop for LibraryFile<'_> {
    fn drop(&mut self) {
        if !self.file.is_null() {
            // SAFETY: `file` is open and closed once.
            unsafe { sys::ext2fs_file_close(self.file) };
        }
    }
}
