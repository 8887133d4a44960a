//! One open libext2fs handle (`ext2_filsys`), closed on drop: the part of a
//! [`crate::fs::Filesystem`] that its helpers ([`crate::libfile`],
//! [`crate::quota`], [`crate::reserved`], [`crate::undo`]) work on, so that
//! they sit below the filesystem that is made of them.
//!
//! Every library call takes `&mut Handle`: its owner serializes the calls.

use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::Ext2Code;
use crate::io;
use crate::sys;

/// An inode number.
pub type Ino = sys::ext2_ino_t;

/// An open `ext2_filsys` on a device registered with [`crate::io`].
pub struct Handle {
    fs: sys::ext2_filsys,
    device: CString,
}

// SAFETY: the handle is only used behind its owner's lock (`&mut` for every
// library call); libext2fs keeps no thread-affine state.
unsafe impl Send for Handle {}

impl Handle {
    /// Opens the filesystem on `device` with `ext2fs_open` flags `flags`;
    /// the library's code if it fails.
    pub(crate) fn open(device: Arc<dyn BlockDevice>, flags: i32) -> Result<Handle, sys::errcode_t> {
        let device = io::register(device);
        let mut fs: sys::ext2_filsys = ptr::null_mut();
        // SAFETY: the device name is NUL-terminated, the manager table is
        // static, and `fs` is a valid out-pointer.
        let code = unsafe {
            sys::ext2fs_open(device.as_ptr(), flags, 0, 0, io::MANAGER.as_ptr(), &mut fs)
        };
        if code != 0 {
            io::unregister(&device);
            return Err(code);
        }
        Ok(Handle { fs, device })
    }

    /// Gives the handle up without closing it: closing could write the
    /// superblock of a filesystem that must not be written.
    pub(crate) fn free_unclosed(mut self) {
        // SAFETY: `fs` is open and not used again: Drop sees NULL.
        unsafe { sys::ext2fs_free(self.fs) };
        self.fs = ptr::null_mut();
        io::unregister(&self.device);
    }

    /// The raw handle, for library calls.
    pub(crate) fn raw(&mut self) -> sys::ext2_filsys {
        self.fs
    }

    /// The handle's plain fields (block size, group count...).
    pub(crate) fn fields(&self) -> &sys::struct_ext2_filsys {
        // SAFETY: open filesystem; the library changes it only in calls
        // made through `&mut self`, which this borrow excludes.
        unsafe { &*self.fs }
    }

    pub fn super_block(&self) -> &sys::ext2_super_block {
        // SAFETY: an open filesystem always has its superblock loaded.
        unsafe { &*self.fields().super_ }
    }

    /// The name the device is registered under with [`crate::io`].
    pub fn device(&self) -> &CStr {
        &self.device
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.fs.is_null() {
            return; // freed by `free_unclosed`
        }
        // SAFETY: open filesystem, closed (and freed) exactly once; close
        // writes out any dirty metadata first.
        let code = unsafe { sys::ext2fs_close2(self.fs, 0) };
        if code != 0 {
            crate::log::error(&format!("close: {}", Ext2Code(code).message()));
            // ext2fs_close2 does not free on failure; free the memory anyway.
            // SAFETY: the handle is not used again.
            unsafe { sys::ext2fs_free(self.fs) };
        }
        io::unregister(&self.device);
    }
}
