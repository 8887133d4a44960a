//! Errors: what went wrong, the errno a host hands on for it, and, where a
//! caller decides on it, what kind of failure it is ([`Error::ReadOnly`],
//! [`Error::NoSpace`], [`Error::Device`]).

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

    /// The errno `value`, or `None` for zero (no errno).
    pub fn new(value: i32) -> Option<Errno> {
        NonZeroI32::new(value).map(Errno)
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
        return Errno::new(code as i32).unwrap_or(Errno::EIO);
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

/// Everything that can go wrong in this crate, and above it in its host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libext2fs call failed; `context` says which call on what, the
    /// outermost first.
    #[error("{context}: {code}")]
    Ext2 { context: String, code: Ext2Code },
    /// The block device failed a request and has already reported why
    /// ([`Error::reported`]): nothing more is to be said (errno as given).
    #[error("device request failed (errno {})", .0.get())]
    Device(Errno),
    /// The filesystem may be read but not written: the kernel's rules for
    /// its features, multi-mount protection, or quota files that cannot be
    /// kept say so, and why.  A host may serve it read-only (errno EROFS).
    #[error("{0}")]
    ReadOnly(String),
    /// Too few free blocks for what was asked (errno ENOSPC).  A caller
    /// with a way that makes room first may take it (see
    /// `txn::Transactions::reserve_hole`).
    #[error("{0}")]
    NoSpace(String),
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

    /// A failure that was reported where it happened (a block device's
    /// own): [`Error::Device`].  Only for those: any other failure owes its
    /// message ([`Error::other`]).
    pub fn reported(errno: Errno) -> Error {
        Error::Device(errno)
    }

    pub fn other(errno: Errno, message: impl Into<String>) -> Error {
        Error::Other {
            message: message.into(),
            errno,
        }
    }

    /// Adds what the error was about in front of what it says, keeping
    /// the rest (the library's code and words, the kind, the errno):
    /// `namei: File not found by ext2_lookup` in context `/nonexistent`
    /// says `/nonexistent: namei: File not found by ext2_lookup`.  A
    /// failure already reported stays as it is.
    pub fn in_context(self, context: impl Into<String>) -> Error {
        let context = context.into();
        let add = |inner: String| format!("{context}: {inner}");
        match self {
            Error::Ext2 {
                context: inner,
                code,
            } => Error::Ext2 {
                context: add(inner),
                code,
            },
            Error::ReadOnly(why) => Error::ReadOnly(add(why)),
            Error::NoSpace(why) => Error::NoSpace(add(why)),
            Error::Other { message, errno } => Error::Other {
                message: add(message),
                errno,
            },
            reported @ Error::Device(_) => reported,
        }
    }

    pub fn errno(&self) -> Errno {
        match self {
            Error::Ext2 { code, .. } => code.errno(),
            Error::Device(errno) => *errno,
            Error::ReadOnly(_) => Errno::EROFS,
            Error::NoSpace(_) => Errno::ENOSPC,
            Error::Other { errno, .. } => *errno,
        }
    }

    /// Whether the host still needs to report the message (a device's own
    /// failures were reported by the device).
    pub fn needs_report(&self) -> bool {
        !matches!(self, Error::Device(_))
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
    fn zero_is_no_errno() {
        assert_eq!(Errno::new(0), None);
        assert_eq!(Errno::new(libc::EROFS), Some(Errno::EROFS));
    }

    #[test]
    fn context_is_added_not_replaced() {
        let not_found = code(sys::EXT2_ET_FILE_NOT_FOUND);
        let e = Error::ext2("namei", not_found).in_context("/nonexistent");
        // (`File not found by ext2_lookup` once `crate::load` ran.)
        let words = Ext2Code(not_found).message();
        assert_eq!(e.to_string(), format!("/nonexistent: namei: {words}"));
        assert_eq!(e.errno(), Errno::ENOENT);
        let e = Error::ReadOnly("the filesystem has mmp".into()).in_context("open");
        assert!(matches!(&e, Error::ReadOnly(why) if why == "open: the filesystem has mmp"));
        assert!(matches!(
            Error::reported(Errno::EIO).in_context("x"),
            Error::Device(Errno::EIO)
        ));
    }
}
