//! Safe wrappers over nbdkit's filter API: the plugin context beneath us,
//! reporting, and the small conversions every callback needs.

pub mod next;
pub mod report;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use crate::sys;
use ext2_rs::error::Errno;
pub use next::{Plugin, RawNext};

/// The backend (the next layer) a filter may open contexts on.
#[derive(Clone, Copy, Debug)]
pub struct Backend(NonNull<sys::nbdkit_backend>);

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

    pub fn backend(self) -> Option<Backend> {
        // SAFETY: the context is live during the callback that passed it.
        Backend::new(unsafe { sys::nbdkit_context_get_backend(self.0.as_ptr()) })
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

/// Runs a callback body, turning a panic into `on_panic` with an error
/// logged: a panic must never unwind into nbdkit.
pub fn guard<T>(name: &str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            report::error(&format!("ext2: internal error in {name}: {what}"));
            on_panic
        }
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

/// Boxes connection state into the `void *` nbdkit keeps for us.
pub fn into_handle<T>(value: T) -> *mut c_void {
    Box::into_raw(Box::new(value)).cast()
}

/// Borrows the state behind a handle from `into_handle`.
///
/// # Safety
/// `handle` must come from `into_handle::<T>` and not yet be freed; nbdkit
/// guarantees that between `.open` and `.close`.
pub unsafe fn handle_ref<'a, T>(handle: *mut c_void) -> &'a T {
    // SAFETY: guaranteed by the caller.
    unsafe { &*handle.cast::<T>() }
}

/// Mutable access for the callbacks nbdkit never runs concurrently with any
/// other on the same handle (`.prepare`, `.finalize`).
///
/// # Safety
/// As `handle_ref`, plus no other reference to the state may be live.
pub unsafe fn handle_mut<'a, T>(handle: *mut c_void) -> &'a mut T {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *handle.cast::<T>() }
}

/// Takes back and frees the state behind a handle, in `.close`.
///
/// # Safety
/// `handle` must come from `into_handle::<T>`; it is invalid afterwards.
pub unsafe fn from_handle<T>(handle: *mut c_void) -> T {
    // SAFETY: guaranteed by the caller.
    *unsafe { Box::from_raw(handle.cast::<T>()) }
}
