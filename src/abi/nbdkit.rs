//! Safe wrappers over nbdkit's filter API: the plugin context beneath us,
//! reporting, and the small conversions every callback needs.  (The panic
//! guard and the handle conversions are ext2-rs's `ffi`, the one C boundary.)

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr::NonNull;

use crate::abi::sys;
use ext2_rs::error::Errno;

/// The backend (the next layer) a filter may open contexts on.
#[derive(Clone, Copy, Debug)]
pub struct Backend(NonNull<sys::nbdkit_backend>);

// SAFETY: a backend is nbdkit's description of the next layer, which lives
// for the whole process; nbdkit opens contexts on it from any thread.
unsafe impl Send for Backend {}
// SAFETY: as above; we only hand the pointer back to nbdkit.
unsafe impl Sync for Backend {}

impl Backend {
    pub fn new(ptr: *mut sys::nbdkit_backend) -> Option<Backend> {
        NonNull::new(ptr).map(Backend)
    }

    pub fn as_ptr(self) -> *mut sys::nbdkit_backend {
        self.0.as_ptr()
    }
}

/// Our filter's context on one connection.
#[derive(Clone, Copy, Debug)]
pub struct Context(NonNull<sys::nbdkit_context>);

// SAFETY: a context pointer is only an identifier handed back to nbdkit,
// which accepts it from any thread of the connection.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    pub fn new(ptr: *mut sys::nbdkit_context) -> Option<Context> {
        NonNull::new(ptr).map(Context)
    }

    /// Makes `next` (or nothing) the context beneath ours on this connection.
    /// The shared plugin context is attached in `.prepare` and detached in
    /// `.finalize`, so that nbdkit never finalizes or closes it with the
    /// connection.
    pub fn set_next(self, next: Option<RawNext>) {
        let ptr = next.map_or(std::ptr::null_mut(), RawNext::as_ptr);
        // SAFETY: both contexts are live; nbdkit only records the pointer.
        unsafe { sys::nbdkit_context_set_next(self.0.as_ptr(), ptr) };
    }
}

/// Reads a C string argument; `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string that outlives `'a`.
pub unsafe fn str_arg<'a>(ptr: *const c_char) -> Option<&'a CStr> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: guaranteed by the caller.
        Some(unsafe { CStr::from_ptr(ptr) })
    }
}

/// Copies a string into memory nbdkit frees when the connection ends, for
/// callbacks that return a `const char *`.
pub fn intern(s: &str) -> *const c_char {
    let Ok(c) = CString::new(s) else {
        return std::ptr::null();
    };
    // SAFETY: nbdkit copies the NUL-terminated string.
    unsafe { sys::nbdkit_strdup_intern(c.as_ptr()) }
}

/// Stores `errno` where nbdkit reads the error of a data callback.
///
/// # Safety
/// `err` must be the valid `int *` nbdkit passed to the callback.
pub unsafe fn set_err(err: *mut c_int, errno: Errno) {
    if !err.is_null() {
        // SAFETY: guaranteed by the caller.
        unsafe { *err = errno.get() };
    }
}

/// Tells nbdkit to advertise the plugin's default export only.
///
/// # Safety
/// `exports` must be the list nbdkit passed to `.list_exports`.
pub unsafe fn use_default_export(exports: *mut sys::nbdkit_exports) -> c_int {
    // SAFETY: guaranteed by the caller.
    unsafe { sys::nbdkit_use_default_export(exports) }
}

/// Adds one export to the list; `false` if nbdkit refused it (it logs why).
///
/// # Safety
/// `exports` must be the list nbdkit passed to `.list_exports`.
pub unsafe fn add_export(exports: *mut sys::nbdkit_exports, name: &str, description: &str) -> bool {
    let (Ok(name), Ok(description)) = (CString::new(name), CString::new(description)) else {
        return true; // a name with NUL cannot be asked for; skip it
    };
    // SAFETY: guaranteed by the caller; nbdkit copies both strings.
    unsafe { sys::nbdkit_add_export(exports, name.as_ptr(), description.as_ptr()) == 0 }
}

/// Appends one block-status run to nbdkit's list.
///
/// # Safety
/// `extents` must be the list nbdkit passed to `.extents`.
pub unsafe fn add_extent(
    extents: *mut sys::nbdkit_extents,
    offset: u64,
    len: u64,
    flags: u32,
) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe { sys::nbdkit_add_extent(extents, offset, len, flags) == 0 }
}

/// A raw plugin context.  nbdkit lets any thread call through it.
#[derive(Clone, Copy, Debug)]
pub struct RawNext(NonNull<sys::nbdkit_next>);

// SAFETY: nbdkit contexts may be used from any thread; requests on a shared
// context are serialized by `Plugin` when the plugin asks for that.
unsafe impl Send for RawNext {}
// SAFETY: as above.
unsafe impl Sync for RawNext {}

impl RawNext {
    pub fn new(ptr: *mut sys::nbdkit_next) -> Option<Self> {
        NonNull::new(ptr).map(RawNext)
    }

    pub fn as_ptr(self) -> *mut sys::nbdkit_next {
        self.0.as_ptr()
    }

    pub fn ops(&self) -> &sys::nbdkit_next_ops {
        // SAFETY: an nbdkit_next is a struct nbdkit_next_ops that lives until
        // nbdkit_next_context_close, which only `Plugin::close` calls.
        unsafe { self.0.as_ref() }
    }
}
