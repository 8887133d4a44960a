//! The C face of the filter: `filter_init`, the callback table, and one
//! `extern "C"` function per callback.
//!
//! This is the only module that knows both nbdkit's ABI and the filter's
//! logic.  Each function runs its body in [`ffi::guard`], the crate's one C
//! boundary, which turns a panic into what the body's result type declares
//! ([`ext2_rs::ffi::AfterPanic`]: an error for a `Result`, `None` for an
//! `Option`).  The body converts the raw arguments and returns a Rust value;
//! turning that into nbdkit's conventions (a message via `nbdkit_error`, an
//! errno in `*err`, -1 or NULL) happens after the guard, in code that cannot
//! panic.
//!
//! Where the filter API differs between nbdkit releases, build.rs sets a
//! `cfg` from what the header declares (`nbdkit_thread_model_takes_next`,
//! `nbdkit_filter_dump_plugin`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, OnceLock};

use crate::abi::nbdkit::{self, Backend, Context};
use crate::abi::plugin::Plugin;
use crate::abi::report;
use crate::abi::state;
use crate::abi::sys;
use crate::file::Status;
use crate::server::{self, Connection};
use ext2_rs::error::{Errno, Error};
use ext2_rs::ffi;

/// The table nbdkit copies at load time.
struct Table(sys::nbdkit_filter);

// SAFETY: the table is built once and only read afterwards; its pointers are
// to static strings and functions.
unsafe impl Sync for Table {}
// SAFETY: as above.
unsafe impl Send for Table {}

static TABLE: OnceLock<Table> = OnceLock::new();

/// Called by nbdkit after `dlopen`; the version string is the one of the
/// nbdkit headers we were built against, which nbdkit insists on.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn filter_init() -> *const sys::nbdkit_filter {
    ffi::guard("filter_init", || Some(&TABLE.get_or_init(build_table).0))
        .map_or(std::ptr::null(), |table| table as *const sys::nbdkit_filter)
}

fn build_table() -> Table {
    Table(sys::nbdkit_filter {
        _api_version: sys::NBDKIT_FILTER_API_VERSION as c_int,
        _version: sys::NBDKIT_VERSION_STRING.as_ptr().cast(),
        name: c"ext2".as_ptr(),
        longname: c"nbdkit ext2 filter (Rust)".as_ptr(),
        description: std::ptr::null(),
        load: Some(load),
        unload: Some(unload),
        config: Some(config),
        config_complete: Some(config_complete),
        config_help: HELP.get_or_init(config_help).as_ptr(),
        thread_model: Some(thread_model),
        #[cfg(nbdkit_filter_dump_plugin)]
        dump_plugin: Some(dump_plugin),
        get_ready: Some(get_ready),
        after_fork: Some(after_fork),
        cleanup: Some(cleanup),
        list_exports: Some(list_exports),
        default_export: Some(default_export),
        open: Some(open),
        close: Some(close),
        prepare: Some(prepare),
        finalize: Some(finalize),
        get_size: Some(get_size),
        export_description: Some(export_description),
        block_size: Some(block_size),
        can_write: Some(can_write),
        can_flush: Some(can_flush),
        can_trim: Some(can_trim),
        can_zero: Some(can_zero),
        can_fast_zero: Some(can_fast_zero),
        can_extents: Some(can_extents),
        can_fua: Some(can_fua),
        can_multi_conn: Some(can_multi_conn),
        can_cache: Some(can_cache),
        pread: Some(pread),
        pwrite: Some(pwrite),
        flush: Some(flush),
        trim: Some(trim),
        zero: Some(zero),
        extents: Some(extents),
        ..Default::default()
    })
}

/// The help text `nbdkit --help` shows, kept for the life of the process.
static HELP: OnceLock<CString> = OnceLock::new();

fn config_help() -> CString {
    CString::new(server::config::HELP).expect("the help text has no NUL")
}

// ---------------------------------------------------------------------------
// From a body's result to nbdkit's conventions, after the guard
// ---------------------------------------------------------------------------

/// Logs an error (unless the plugin already did) and returns its errno.
fn report(err: &Error) -> Errno {
    if err.needs_report() {
        report::error(&err.to_string());
    }
    err.errno()
}

/// The value of an int callback, or -1 with the error logged.
fn int_result(result: Result<c_int, Error>) -> c_int {
    result.unwrap_or_else(|e| {
        report(&e);
        -1
    })
}

/// 0, or -1 with the error logged.
fn status(result: Result<(), Error>) -> c_int {
    int_result(result.map(|()| 0))
}

/// 1 or 0 for a `can_*` callback, or -1 with the error logged.
fn boolean(result: Result<bool, Error>) -> c_int {
    int_result(result.map(c_int::from))
}

/// A data callback's 0, or -1 with the error logged and its errno in `*err`.
///
/// # Safety
/// `err` is the pointer nbdkit passed to the callback.
unsafe fn data_status(err: *mut c_int, result: Result<(), Error>) -> c_int {
    match result {
        Ok(()) => 0,
        Err(e) => {
            let errno = report(&e);
            // SAFETY: guaranteed by the caller.
            unsafe { nbdkit::set_err(err, errno) };
            -1
        }
    }
}

/// A string nbdkit keeps for the connection, or NULL.
fn interned(result: Result<Option<String>, Error>) -> *const c_char {
    match result {
        Ok(Some(s)) => nbdkit::intern(&s),
        Ok(None) => std::ptr::null(),
        Err(e) => {
            report(&e);
            std::ptr::null()
        }
    }
}

// ---------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------

/// What `.open` hands nbdkit (through [`ffi::into_raw`]): our context and the
/// connection's state.
struct Handle {
    context: Context,
    /// The plugin context shared by every connection, attached to this one
    /// in `.prepare`.
    plugin: Arc<Plugin>,
    conn: Connection,
}

fn not_a_handle() -> Error {
    Error::other(Errno::EIO, "internal error: not a connection handle")
}

/// The connection behind a handle.
///
/// # Safety
/// `handle` is the pointer `.open` returned, not yet passed to `.close`.
unsafe fn conn<'a>(handle: *mut c_void) -> Result<&'a Connection, Error> {
    // SAFETY: guaranteed by the caller; only `.prepare` mutates, and nbdkit
    // runs it alone on the handle.
    let handle = unsafe { ffi::borrow::<Handle>(handle) };
    handle.map(|h| &h.conn).ok_or_else(not_a_handle)
}

// ---------------------------------------------------------------------------
// Life cycle
// ---------------------------------------------------------------------------

extern "C" fn load() {
    ffi::guard("load", || {
        // libext2fs's messages name its error codes; ext2-rs reports
        // through nbdkit from now on.
        ext2_rs::load();
        report::install_sink();
    })
}

extern "C" fn unload() {
    ffi::guard("unload", || {
        state::unload();
        ext2_rs::unload();
    })
}

/// Takes our parameters; any other goes on to the plugin exactly as given
/// (its bytes need not be UTF-8).  A value of ours must be UTF-8.
unsafe extern "C" fn config(
    next: sys::nbdkit_next_config,
    nxdata: *mut sys::nbdkit_backend,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    int_result(ffi::guard("config", || {
        // SAFETY: nbdkit passes NUL-terminated strings valid for the call.
        let (Some(k), Some(v)) = (unsafe { nbdkit::str_arg(key) }, unsafe {
            nbdkit::str_arg(value)
        }) else {
            return Err(Error::other(Errno::EINVAL, "config: no key or value"));
        };
        let ours = k.to_str().ok().filter(|k| server::config::is_ours(k));
        let Some(key_text) = ours else {
            let next = next.ok_or_else(|| Error::other(Errno::EIO, "no next config"))?;
            // SAFETY: passing the parameter on to the next layer, as given.
            return Ok(unsafe { next(nxdata, key, value) });
        };
        let value_text = v
            .to_str()
            .map_err(|_| Error::other(Errno::EINVAL, server::config::not_utf8(key_text)))?;
        match state::config(key_text, value_text) {
            Ok(_) => Ok(0),
            Err(msg) => Err(Error::other(Errno::EINVAL, msg)),
        }
    }))
}

unsafe extern "C" fn config_complete(
    next: sys::nbdkit_next_config_complete,
    nxdata: *mut sys::nbdkit_backend,
) -> c_int {
    int_result(ffi::guard("config_complete", || {
        state::config_complete().map_err(|msg| Error::other(Errno::EINVAL, msg))?;
        let next = next.ok_or_else(|| Error::other(Errno::EIO, "no next config_complete"))?;
        // SAFETY: continuing nbdkit's chain with the pointer it gave us.
        Ok(unsafe { next(nxdata) })
    }))
}

/// Parallel: the filter serializes what must be (libext2fs calls, and the
/// plugin's requests when its own model asks for it, learnt in `.get_ready`).
fn our_thread_model() -> c_int {
    int_result(ffi::guard("thread_model", || {
        Ok(sys::NBDKIT_THREAD_MODEL_PARALLEL as c_int)
    }))
}

#[cfg(not(nbdkit_thread_model_takes_next))]
extern "C" fn thread_model() -> c_int {
    our_thread_model()
}

/// nbdkit 1.43.9 on also tells us the next layer's model; nbdkit takes the
/// more serialized of the two anyway.
#[cfg(nbdkit_thread_model_takes_next)]
extern "C" fn thread_model(_next_thread_model: c_int) -> c_int {
    our_thread_model()
}

/// `nbdkit --dump-plugin`: nbdkit prints the filter's path and name, then
/// these lines.
#[cfg(nbdkit_filter_dump_plugin)]
extern "C" fn dump_plugin() {
    ffi::guard("dump_plugin", || {
        for (key, value) in server::dump_fields() {
            report::print_line(&format!("ext2_{key}={value}"));
        }
    })
}

extern "C" fn get_ready(thread_model: c_int) -> c_int {
    status(ffi::guard("get_ready", || {
        state::get_ready(thread_model == sys::NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS as c_int);
        Ok(())
    }))
}

/// Opens the plugin and the filesystem, read-only, for every connection to
/// share; a failure stops nbdkit at start with the message.
extern "C" fn after_fork(backend: *mut sys::nbdkit_backend) -> c_int {
    status(ffi::guard("after_fork", || {
        let backend = Backend::new(backend)
            .ok_or_else(|| Error::other(Errno::EIO, "after_fork: no backend"))?;
        state::after_fork(backend)
    }))
}

extern "C" fn cleanup(_backend: *mut sys::nbdkit_backend) {
    ffi::guard("cleanup", state::cleanup)
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

unsafe extern "C" fn list_exports(
    _next: sys::nbdkit_next_list_exports,
    _nxdata: *mut sys::nbdkit_backend,
    _readonly: c_int,
    _is_tls: c_int,
    exports: *mut sys::nbdkit_exports,
) -> c_int {
    int_result(ffi::guard("list_exports", || {
        if !state::exportname_mode() {
            // One file, whatever the name: advertise just the default.
            // SAFETY: the list nbdkit passed to this callback.
            return Ok(unsafe { nbdkit::use_default_export(exports) });
        }
        for file in state::started()?.server.list_exports()? {
            let description = format!("regular file, {} bytes", file.size);
            // SAFETY: the list nbdkit passed to this callback.
            if !unsafe { nbdkit::add_export(exports, &file.path, &description) } {
                return Ok(-1); // nbdkit said why
            }
        }
        Ok(0)
    }))
}

unsafe extern "C" fn default_export(
    _next: sys::nbdkit_next_default_export,
    _nxdata: *mut sys::nbdkit_backend,
    _readonly: c_int,
    _is_tls: c_int,
) -> *const c_char {
    interned(ffi::guard("default_export", || {
        // In exportname mode "" is refused unless ext2default= names a file.
        Ok(if state::exportname_mode() {
            state::default_export()
        } else {
            Some(String::new())
        })
    }))
}

unsafe extern "C" fn open(
    _next: sys::nbdkit_next_open,
    context: *mut sys::nbdkit_context,
    readonly: c_int,
    exportname: *const c_char,
    _is_tls: c_int,
) -> *mut c_void {
    let opened = ffi::guard("open", || {
        let context =
            Context::new(context).ok_or_else(|| Error::other(Errno::EIO, "open: no context"))?;
        // SAFETY: nbdkit passes a NUL-terminated export name.
        let raw_name = unsafe { nbdkit::str_arg(exportname) };
        // NBD export names are UTF-8; "repairing" other bytes could name
        // another file, so such names are refused.
        let name = raw_name
            .map_or(Ok(""), CStr::to_str)
            .map_err(|_| Error::other(Errno::EINVAL, "the export name is not valid UTF-8"))?;
        let started = state::started()?;
        let conn = started.server.connect(readonly != 0, name)?;
        Ok(Handle {
            context,
            plugin: started.plugin,
            conn,
        })
    });
    match opened {
        Ok(handle) => ffi::into_raw(handle),
        Err(e) => {
            report(&e);
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn close(handle: *mut c_void) {
    ffi::guard("close", || {
        // SAFETY: the handle from `open`, freed once here.
        drop(unsafe { ffi::from_raw::<Handle>(handle) });
    })
}

unsafe extern "C" fn prepare(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    _readonly: c_int,
) -> c_int {
    status(ffi::guard("prepare", || {
        // SAFETY: the handle from `open`; nbdkit runs .prepare alone on it.
        let h = unsafe { ffi::borrow_mut::<Handle>(handle) }.ok_or_else(not_a_handle)?;
        h.conn.prepare()?;
        let raw = h
            .plugin
            .raw()
            .ok_or_else(|| Error::other(Errno::ESHUTDOWN, "the server is shutting down"))?;
        // Last, so that a failed prepare never leaves the shared context
        // attached for nbdkit to close with this connection.
        h.context.set_next(Some(raw));
        Ok(())
    }))
}

unsafe extern "C" fn finalize(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    status(ffi::guard("finalize", || {
        // SAFETY: the handle from `open`.
        let h = unsafe { ffi::borrow::<Handle>(handle) }.ok_or_else(not_a_handle)?;
        // The shared context outlives the connection: detach it.
        h.context.set_next(None);
        Ok(())
    }))
}

unsafe extern "C" fn get_size(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> i64 {
    let size = ffi::guard("get_size", || {
        // SAFETY: the handle from `open`.
        let size = unsafe { conn(handle) }?.size()?;
        i64::try_from(size).map_err(|_| Error::other(Errno::EFBIG, "the file is too large"))
    });
    size.unwrap_or_else(|e| {
        report(&e);
        -1
    })
}

unsafe extern "C" fn export_description(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
) -> *const c_char {
    interned(ffi::guard("export_description", || {
        // SAFETY: the handle from `open`.
        Ok(unsafe { conn(handle) }?.description())
    }))
}

unsafe extern "C" fn block_size(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    minimum: *mut u32,
    preferred: *mut u32,
    maximum: *mut u32,
) -> c_int {
    status(ffi::guard("block_size", || {
        // SAFETY: the handle from `open`.
        let preferred_size = unsafe { conn(handle) }?.block_size().clamp(512, 64 * 1024);
        // SAFETY: nbdkit passes three valid out-pointers.
        unsafe {
            *minimum = 1;
            *preferred = preferred_size;
            *maximum = u32::MAX;
        }
        Ok(())
    }))
}

unsafe extern "C" fn can_write(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_write", || {
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.can_write()
    }))
}

/// Flush always means something: it writes the filesystem's metadata.
unsafe extern "C" fn can_flush(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_flush", || Ok(true)))
}

/// Trim frees blocks only where libext2fs 1.47.0 can do it safely: files
/// with extents.
unsafe extern "C" fn can_trim(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_trim", || {
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.can_trim()
    }))
}

/// Zero is ours: holes need nothing, data blocks are zeroed in place.
unsafe extern "C" fn can_zero(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    int_result(ffi::guard("can_zero", || {
        Ok(sys::NBDKIT_ZERO_NATIVE as c_int)
    }))
}

/// Fast zero succeeds where no data must be written (holes, unwritten
/// blocks, or a plugin that zeroes quickly) and fails fast elsewhere.
unsafe extern "C" fn can_fast_zero(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_fast_zero", || Ok(true)))
}

/// Block status comes from the file's own map, never the image's.
unsafe extern "C" fn can_extents(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_extents", || Ok(true)))
}

unsafe extern "C" fn can_fua(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    int_result(ffi::guard(
        "can_fua",
        || Ok(sys::NBDKIT_FUA_NATIVE as c_int),
    ))
}

/// All connections share one plugin context and one block map, and a flush
/// on any connection flushes that one context: what one connection wrote is
/// what every other reads, and durable after any flush.
unsafe extern "C" fn can_multi_conn(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    boolean(ffi::guard("can_multi_conn", || Ok(true)))
}

/// nbdkit implements cache requests by reading through us.
unsafe extern "C" fn can_cache(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    int_result(ffi::guard("can_cache", || {
        Ok(sys::NBDKIT_CACHE_EMULATE as c_int)
    }))
}

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

unsafe extern "C" fn pread(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    buf: *mut c_void,
    count: u32,
    offset: u64,
    _flags: u32,
    err: *mut c_int,
) -> c_int {
    let result = ffi::guard("pread", || {
        // SAFETY: nbdkit passes a buffer of `count` writable bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), count as usize) };
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.pread(buf, offset)
    });
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

unsafe extern "C" fn pwrite(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    buf: *const c_void,
    count: u32,
    offset: u64,
    flags: u32,
    err: *mut c_int,
) -> c_int {
    let result = ffi::guard("pwrite", || {
        // SAFETY: nbdkit passes a buffer of `count` readable bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), count as usize) };
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.pwrite(data, offset, flags & sys::NBDKIT_FLAG_FUA != 0)
    });
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

unsafe extern "C" fn zero(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    count: u32,
    offset: u64,
    flags: u32,
    err: *mut c_int,
) -> c_int {
    let result = ffi::guard("zero", || {
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.zero(
            offset,
            u64::from(count),
            flags & sys::NBDKIT_FLAG_MAY_TRIM != 0,
            flags & sys::NBDKIT_FLAG_FAST_ZERO != 0,
            flags & sys::NBDKIT_FLAG_FUA != 0,
        )
    });
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

unsafe extern "C" fn trim(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    count: u32,
    offset: u64,
    flags: u32,
    err: *mut c_int,
) -> c_int {
    let result = ffi::guard("trim", || {
        // SAFETY: the handle from `open`.
        unsafe { conn(handle) }?.trim(offset, u64::from(count), flags & sys::NBDKIT_FLAG_FUA != 0)
    });
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

unsafe extern "C" fn flush(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    _flags: u32,
    err: *mut c_int,
) -> c_int {
    // SAFETY: the handle from `open`.
    let result = ffi::guard("flush", || unsafe { conn(handle) }?.flush());
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

unsafe extern "C" fn extents(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    count: u32,
    offset: u64,
    flags: u32,
    extents: *mut sys::nbdkit_extents,
    err: *mut c_int,
) -> c_int {
    let result = ffi::guard("extents", || {
        // SAFETY: the handle from `open`.
        let runs = unsafe { conn(handle) }?.status(offset, u64::from(count))?;
        let mut at = offset;
        for (len, status) in runs {
            let kind = match status {
                Status::Data => 0,
                Status::Zero => sys::NBDKIT_EXTENT_ZERO,
                Status::Hole => sys::NBDKIT_EXTENT_HOLE | sys::NBDKIT_EXTENT_ZERO,
            };
            // SAFETY: the list nbdkit passed to this callback.
            if !unsafe { nbdkit::add_extent(extents, at, len, kind) } {
                return Err(Error::Device(Errno::EIO));
            }
            at += len;
            if flags & sys::NBDKIT_FLAG_REQ_ONE != 0 {
                break;
            }
        }
        Ok(())
    });
    // SAFETY: nbdkit's `err`.
    unsafe { data_status(err, result) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn help_text_is_a_c_string() {
        assert_eq!(
            super::config_help().to_str().unwrap(),
            crate::server::config::HELP
        );
    }
}
