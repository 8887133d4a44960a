//! Reading directories, for listing the files an image can serve.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use crate::error::{check, Result};
use crate::ffi::{self, Walk};
use crate::fs::{Filesystem, Ino};
use crate::sys;

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
}

unsafe extern "C" fn collect_entry(
    _dir: sys::ext2_ino_t,
    _entry: c_int,
    dirent: *mut sys::ext2_dir_entry,
    _offset: c_int,
    _blocksize: c_int,
    _buf: *mut c_char,
    private: *mut c_void,
) -> c_int {
    let walk = ffi::guard("directory iterator", || {
        // SAFETY: `private` is the Vec lent by `read_dir` for the whole
        // iteration.
        let Some(out) = (unsafe { ffi::lent::<Vec<DirEntry>>(private) }) else {
            return Walk::Abort;
        };
        if dirent.is_null() {
            return Walk::Abort;
        }
        // SAFETY: `dirent` is a valid entry whose name has `name_len` bytes.
        let (ino, name) = unsafe {
            let len = sys::ext2fs_dirent_name_len(dirent).clamp(0, 255) as usize;
            (
                (*dirent).inode,
                std::slice::from_raw_parts((*dirent).name.as_ptr().cast::<u8>(), len),
            )
        };
        if ino != 0 && name != b"." && name != b".." {
            out.push(DirEntry {
                name: name.to_vec(),
                ino,
            });
        }
        Walk::Continue
    });
    match walk {
        Walk::Continue => 0,
        Walk::Abort => sys::DIRENT_ABORT as c_int,
    }
}

/// The entries of directory `dir`, without `.` and `..`.
pub fn read_dir(fs: &mut Filesystem, dir: Ino) -> Result<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    let raw = fs.raw();
    let code = ffi::lend(&mut out, |private| {
        // SAFETY: open filesystem; the callback only appends to the Vec lent
        // for this call.
        unsafe {
            sys::ext2fs_dir_iterate2(raw, dir, 0, ptr::null_mut(), Some(collect_entry), private)
        }
    });
    check(code, || "dir_iterate".into())?;
    Ok(out)
}
