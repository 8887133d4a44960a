//! Errors, and how each becomes the errno an NBD client receives.

use std::ffi::CStr;
use std::fmt;
use std::num::NonZeroI32;

use crate::sys;

/// An errno value; never zero, so a failure always carries a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(NonZeroI32);

impl Errno {
    pub const EIO: Errno = Errno::new_const(libc::EIO);
    pub const EROFS: Errno = Errno::new_const(libc::EROFS);
    pub const ENOSPC: Errno = Errno::new_const(libc::ENOSPC);
    pub const ENOENT: Errno = Errno::new_const(libc::ENOENT);
    pub const EINVAL: Errno = Errno::new_const(libc::EINVAL);
    pub const ENOMEM: Errno = Errno::new_const(libc::ENOMEM);
    pub const ENOTSUP: Errno = Errno::new_const(libc::ENOTSUP);
    pub const EFBIG: Errno = Errno::new_const(libc::EFBIG);
    pub const ELOOP: Errno = Errno::new_const(libc::ELOOP);
    pub const ENOTDIR: Errno = Errno::new_const(libc::ENOTDIR);
    pub const ENAMETOOLONG: Errno = Errno::new_const(libc::ENAMETOOLONG);
    pub const EISDIR: Errno = Errno::new_const(libc::EISDIR);
    pub const ESHUTDOWN: Errno = Errno::new_const(libc::ESHUTDOWN);
    pub const EBUSY: Errno = Errno::new_const(libc::EBUSY);

    const fn new_const(value: i32) -> Errno {
        match NonZeroI32::new(value) {
            Some(v) => Errno(v),
            None => panic!("errno constants are non-zero"),
        }
    }

    /// The errno a plugin call reported; a plugin that forgot one gets EIO.
    pub fn from_plugin(err: i32) -> Errno {
        NonZeroI32::new(err).map(Errno).unwrap_or(Errno::EIO)
    }

    pub fn get(self) -> i32 {
        self.0.get()
    }
}

/// A libext2fs error code (`errcode_t`), never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext2Code(pub sys::errcode_t);

impl Ext2Code {
    /// The library's own message for the code, as `error_message` gives it.
    pub fn message(self) -> String {
        // SAFETY: error_message returns a pointer to a static or thread-local
        // NUL-terminated string for any code; we copy it at once.
        let ptr = unsafe { sys::error_message(self.0) };
        if ptr.is_null() {
            return format!("unknown error {}", self.0);
        }
        // SAFETY: non-null and NUL-terminated, see above.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }

    /// Maps the library's code to the errno the client should see.
    ///
    /// libext2fs passes system errors through as plain errno values (below
    /// its own table base); its own codes are mapped by meaning.
    pub fn errno(self) -> Errno {
        errno_for_ext2_code(self.0)
    }
}

impl fmt::Display for Ext2Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

/// Pure mapping from an `errcode_t` to an errno (unit-tested).
pub fn errno_for_ext2_code(code: sys::errcode_t) -> Errno {
    let base = sys::EXT2_ET_BASE as sys::errcode_t;
    if code > 0 && code < 4096 {
        // A system errno passed through (e.g. EIO from our io_manager).
        return Errno::from_plugin(code as i32);
    }
    if !(base..base + 256).contains(&code) {
        return Errno::EIO;
    }
    let is = |c: u32| code == c as sys::errcode_t;
    if is(sys::EXT2_ET_BLOCK_ALLOC_FAIL)
        || is(sys::EXT2_ET_INODE_ALLOC_FAIL)
        || is(sys::EXT2_ET_DIR_NO_SPACE)
        || is(sys::EXT2_ET_TOOSMALL)
        || is(sys::EXT2_ET_RES_GDT_BLOCKS)
        || is(sys::EXT2_ET_EA_NO_SPACE)
        || is(sys::EXT2_ET_INLINE_DATA_NO_SPACE)
    {
        Errno::ENOSPC
    } else if is(sys::EXT2_ET_RO_FILSYS)
        || is(sys::EXT2_ET_FILE_RO)
        || is(sys::EXT2_ET_RO_UNSUPP_FEATURE)
        || is(sys::EXT2_ET_RO_BLOCK_ITERATE)
    {
        Errno::EROFS
    } else if is(sys::EXT2_ET_FILE_NOT_FOUND) || is(sys::EXT2_ET_NO_DIRECTORY) {
        Errno::ENOENT
    } else if is(sys::EXT2_ET_SYMLINK_LOOP) {
        Errno::ELOOP
    } else if is(sys::EXT2_ET_NO_MEMORY) {
        Errno::ENOMEM
    } else if is(sys::EXT2_ET_FILE_TOO_BIG) || is(sys::EXT2_ET_EXTENT_NOT_SUPPORTED) {
        Errno::EFBIG
    } else if is(sys::EXT2_ET_UNIMPLEMENTED) || is(sys::EXT2_ET_OP_NOT_SUPPORTED) {
        Errno::ENOTSUP
    } else if is(sys::EXT2_ET_INVALID_ARGUMENT) {
        Errno::EINVAL
    } else {
        // Corruption, bad magic numbers, checksum failures, short reads.
        Errno::EIO
    }
}

/// Everything that can go wrong in this crate, and above it in the filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libext2fs call failed; `context` says which call on what.
    #[error("{context}: {code}")]
    Ext2 { context: String, code: Ext2Code },
    /// The block device failed a request; it has already reported why
    /// (for the filter: the plugin, through nbdkit).
    #[error("device request failed (errno {})", .0.get())]
    Device(Errno),
    /// Anything else, with the errno the client gets.
    #[error("{message}")]
    Other { message: String, errno: Errno },
}

impl Error {
    pub fn ext2(context: impl Into<String>, code: sys::errcode_t) -> Error {
        Error::Ext2 {
            context: context.into(),
            code: Ext2Code(code),
        }
    }

    pub fn other(errno: Errno, message: impl Into<String>) -> Error {
        Error::Other {
            message: message.into(),
            errno,
        }
    }

    /// Names what the error was about, as the C filter does
    /// (`/nonexistent: namei: File not found by ext2_lookup`).
    pub fn in_context(self, context: impl Into<String>) -> Error {
        let context = context.into();
        match self {
            Error::Ext2 { code, .. } => Error::Ext2 { context, code },
            Error::Other { message, errno } => Error::Other {
                message: format!("{context}: {message}"),
                errno,
            },
            other => other,
        }
    }

    pub fn errno(&self) -> Errno {
        match self {
            Error::Ext2 { code, .. } => code.errno(),
            Error::Device(errno) => *errno,
            Error::Other { errno, .. } => *errno,
        }
    }

    /// Whether the host still needs to report the message (a device's own
    /// failures were reported by the device).
    pub fn needs_report(&self) -> bool {
        !matches!(self, Error::Device(_))
    }
}

impl From<Errno> for Error {
    fn from(errno: Errno) -> Error {
        Error::Device(errno)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Turns a libext2fs return code into a Result.
pub(crate) fn check(code: sys::errcode_t, context: impl FnOnce() -> String) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::ext2(context(), code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: u32) -> sys::errcode_t {
        c as sys::errcode_t
    }

    #[test]
    fn library_codes_map_by_meaning() {
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_BLOCK_ALLOC_FAIL)),
            Errno::ENOSPC
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_RO_FILSYS)),
            Errno::EROFS
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_FILE_NOT_FOUND)),
            Errno::ENOENT
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_SYMLINK_LOOP)),
            Errno::ELOOP
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_NO_MEMORY)),
            Errno::ENOMEM
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_BAD_MAGIC)),
            Errno::EIO
        );
        assert_eq!(
            errno_for_ext2_code(code(sys::EXT2_ET_SHORT_READ)),
            Errno::EIO
        );
    }

    #[test]
    fn system_errors_pass_through() {
        assert_eq!(errno_for_ext2_code(libc::ENOSPC as _), Errno::ENOSPC);
        assert_eq!(errno_for_ext2_code(libc::EIO as _), Errno::EIO);
    }

    #[test]
    fn unknown_codes_are_eio() {
        assert_eq!(errno_for_ext2_code(-1), Errno::EIO);
        assert_eq!(errno_for_ext2_code(1 << 40), Errno::EIO);
    }

    #[test]
    fn plugin_without_errno_is_eio() {
        assert_eq!(Errno::from_plugin(0), Errno::EIO);
        assert_eq!(Errno::from_plugin(libc::EROFS), Errno::EROFS);
    }
}
