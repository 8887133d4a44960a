//! The one C boundary, for this crate and the crates built on it.
//!
//! Every `extern "C"` function (libext2fs's io_manager entry points and
//! iterator callbacks here, a host's own callbacks above) runs its body
//! in [`guard`], which catches a panic before it reaches C (since Rust 1.81
//! a panic escaping an `extern "C"` function aborts the process) and returns
//! what the body's result type declares for that case ([`AfterPanic`]).
//! The body returns a Rust value; turning it into the C return value
//! happens after the guard, in code that cannot panic.
//!
//! Rust values handed to C as `void *` go through [`into_raw`] (owned, e.g.
//! a connection handle or an io channel's private data) or [`lend`] (lent
//! for the length of one call, e.g. an iterator's private data), and come
//! back only through [`borrow`], [`borrow_mut`], [`lent`] or [`from_raw`],
//! which check that the pointer carries the type asked for.

use std::any::TypeId;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Errno, Error};

/// What a result type gives back when the body computing it panicked.
pub trait AfterPanic {
    fn after_panic() -> Self;
}

impl AfterPanic for () {
    fn after_panic() -> Self {}
}

/// "Nothing": a NULL pointer, once converted.
impl<T> AfterPanic for Option<T> {
    fn after_panic() -> Self {
        None
    }
}

/// EIO, the errno of an internal failure.
impl<T> AfterPanic for Result<T, Errno> {
    fn after_panic() -> Self {
        Err(Errno::EIO)
    }
}

/// EIO, with a message saying it was an internal error.
impl<T> AfterPanic for Result<T, Error> {
    fn after_panic() -> Self {
        Err(Error::other(Errno::EIO, "internal error"))
    }
}

/// What an iterator callback tells libext2fs: go on, or stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    Continue,
    Abort,
}

/// A panicking iterator callback stops the iteration.
impl AfterPanic for Walk {
    fn after_panic() -> Self {
        Walk::Abort
    }
}

/// Runs the body of an `extern "C"` function named `what`: a panic is
/// reported (with its message) and becomes `R::after_panic()`.
pub fn guard<R: AfterPanic>(what: &str, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            crate::log::error(&format!("internal error (panic) in {what}: {message}"));
            R::after_panic()
        }
    }
}

/// How a value was handed to C, so that it comes back the same way.
struct Owned<T>(PhantomData<T>);
struct Lent<T>(PhantomData<T>);

/// What C holds: a type tag, then the value (owned) or a pointer to it (lent).
#[repr(C)]
struct Tagged<V> {
    tag: TypeId,
    value: V,
}

/// Reads the tag of a pointer from [`into_raw`] or [`lend`].
///
/// # Safety
/// `ptr` is non-null and points to a live `Tagged<_>`.
unsafe fn tag_of(ptr: *const c_void) -> TypeId {
    // SAFETY: every Tagged is repr(C) with the tag first.
    unsafe { *ptr.cast::<TypeId>() }
}

/// Hands `value` to C, which keeps it until it gives it back to
/// [`from_raw`].
pub fn into_raw<T: 'static>(value: T) -> *mut c_void {
    Box::into_raw(Box::new(Tagged {
        tag: TypeId::of::<Owned<T>>(),
        value,
    }))
    .cast()
}

/// Borrows a value handed to C with [`into_raw`]; `None` for NULL or a
/// pointer to a value of another type.
///
/// # Safety
/// `ptr` is NULL or came from [`into_raw`] or [`lend`] (of any type) and is
/// still live; nothing mutates the value while the borrow lasts.
pub unsafe fn borrow<'a, T: 'static>(ptr: *const c_void) -> Option<&'a T> {
    // SAFETY: guaranteed by the caller; the tag proves the layout.
    unsafe {
        (!ptr.is_null() && tag_of(ptr) == TypeId::of::<Owned<T>>())
            .then(|| &(*ptr.cast::<Tagged<T>>()).value)
    }
}

/// Mutably borrows a value handed to C with [`into_raw`].
///
/// # Safety
/// As [`borrow`], and no other reference to the value is live.
pub unsafe fn borrow_mut<'a, T: 'static>(ptr: *mut c_void) -> Option<&'a mut T> {
    // SAFETY: guaranteed by the caller; the tag proves the layout.
    unsafe {
        (!ptr.is_null() && tag_of(ptr) == TypeId::of::<Owned<T>>())
            .then(|| &mut (*ptr.cast::<Tagged<T>>()).value)
    }
}

/// Takes back a value handed to C with [`into_raw`]; `ptr` is dangling
/// afterwards.  `None` (and nothing freed) for NULL or another type.
///
/// # Safety
/// As [`borrow_mut`]; C never uses `ptr` again.
pub unsafe fn from_raw<T: 'static>(ptr: *mut c_void) -> Option<T> {
    // SAFETY: guaranteed by the caller; the tag proves it is our Box.
    unsafe {
        (!ptr.is_null() && tag_of(ptr) == TypeId::of::<Owned<T>>())
            .then(|| Box::from_raw(ptr.cast::<Tagged<T>>()).value)
    }
}

/// Lends `value` to C for the length of `call`, as the `void *` it is given
/// (an iterator's private data); callbacks get it back with [`lent`].
pub fn lend<T: 'static, R>(value: &mut T, call: impl FnOnce(*mut c_void) -> R) -> R {
    let mut tagged = Tagged {
        tag: TypeId::of::<Lent<T>>(),
        value: value as *mut T,
    };
    call((&mut tagged as *mut Tagged<*mut T>).cast())
}

/// The value lent with [`lend`]; `None` for NULL or another type.
///
/// # Safety
/// `ptr` is NULL or the pointer [`lend`] (or [`into_raw`]) gave C, and the
/// call it was lent for is still running; no other reference to the value
/// is live.
pub unsafe fn lent<'a, T: 'static>(ptr: *mut c_void) -> Option<&'a mut T> {
    // SAFETY: guaranteed by the caller; the tag proves the layout, and
    // `lend` keeps the value borrowed for the whole call.
    unsafe {
        (!ptr.is_null() && tag_of(ptr) == TypeId::of::<Lent<T>>())
            .then(|| &mut *(*ptr.cast::<Tagged<*mut T>>()).value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_values_come_back_only_as_their_type() {
        let ptr = into_raw(String::from("handle"));
        // SAFETY: `ptr` came from into_raw and is live.
        unsafe {
            assert!(borrow::<u32>(ptr).is_none());
            assert!(lent::<String>(ptr).is_none());
            assert_eq!(borrow::<String>(ptr).map(String::as_str), Some("handle"));
            borrow_mut::<String>(ptr).unwrap().push('!');
            assert!(from_raw::<Vec<u8>>(ptr).is_none());
            assert_eq!(from_raw::<String>(ptr).as_deref(), Some("handle!"));
            assert!(borrow::<String>(std::ptr::null()).is_none());
        }
    }

    #[test]
    fn lent_values_come_back_during_the_call() {
        let mut count = 0u64;
        lend(&mut count, |ptr| {
            // SAFETY: the pointer lend gave us, during its call.
            unsafe {
                assert!(lent::<u32>(ptr).is_none());
                assert!(borrow::<u64>(ptr).is_none());
                *lent::<u64>(ptr).unwrap() += 5;
            }
        });
        assert_eq!(count, 5);
    }

    #[test]
    fn a_panic_becomes_the_types_fallback() {
        let r: Result<u8, Errno> = guard("test", || panic!("boom"));
        assert_eq!(r, Err(Errno::EIO));
        assert_eq!(guard("test", || -> Walk { panic!("boom") }), Walk::Abort);
        assert_eq!(guard("test", || -> Option<u8> { panic!() }), None);
        assert_eq!(guard("test", || Some(3)), Some(3));
    }
}
