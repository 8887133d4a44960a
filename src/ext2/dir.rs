//! Reading directories, for listing the files an image can serve.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use crate::error::Result;
use crate::ext2::fs::{check, Filesystem, Ino};
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
    // SAFETY: `private` is the Vec passed by `read_dir`, alive for the whole
    // iteration; `dirent` is a valid entry whose name has `name_len` bytes.
    unsafe {
        let out = &mut *private.cast::<Vec<DirEntry>>();
        let len = sys::ext2fs_dirent_name_len(dirent).clamp(0, 255) as usize;
        let name = std::slice::from_raw_parts((*dirent).name.as_ptr().cast::<u8>(), len);
        if (*dirent).inode != 0 && name != b"." && name != b".." {
            out.push(DirEntry {
                name: name.to_vec(),
                ino: (*dirent).inode,
            });
        }
    }
    0
}

/// The entries of directory `dir`, without `.` and `..`.
pub fn read_dir(fs: &mut Filesystem, dir: Ino) -> Result<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    // SAFETY: open filesystem; the callback only appends to `out`, which
    // outlives the call.
    let code = unsafe {
        sys::ext2fs_dir_iterate2(
            fs.raw(),
            dir,
            0,
            ptr::null_mut(),
            Some(collect_entry),
            (&mut out as *mut Vec<DirEntry>).cast(),
        )
    };
    check(code, || "dir_iterate".into())?;
    Ok(out)
}
