//! The C face of the filter: `filter_init`, the callback table, and one
//! `extern "C"` function per callback.
//!
//! This is the only module that knows both nbdkit's ABI and the filter's
//! logic.  Each function converts its raw arguments, runs the logic inside
//! a panic guard, and turns errors into nbdkit's conventions (a message via
//! `nbdkit_error`, an errno in `*err`, -1 or NULL).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::filter::{self, file::Status, Connection};
use crate::nbdkit::{self, report, Context};
use crate::sys;
use ext2_rs::error::{Errno, Error};

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
    &TABLE.get_or_init(build_table).0
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
        config_help: CONFIG_HELP.as_ptr(),
        thread_model: Some(thread_model),
        get_ready: Some(get_ready),
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

const CONFIG_HELP: &std::ffi::CStr = {
    // Must match filter::config::HELP (checked by a unit test).
    c"ext2file=<FILENAME>  (required) Absolute name of file to serve inside the\n                     disk image, or 'exportname' for client choice.\next2exports=<N>      With ext2file=exportname: list at most N files\n                     (default 1000, 0 lists none).\next2default=<FILE>   With ext2file=exportname: the file for export \"\".\next2journal=<MODE>   If the journal needs recovery: 'memory' (default)\n                     replays it in memory and serves read-only; 'replay'\n                     writes it into the image and serves read-write.\next2mapcache=<SIZE>  Memory for files' map blocks (default 16M)."
};

/// Logs an error (unless the plugin already did) and returns its errno.
fn report(err: &Error) -> Errno {
    if err.needs_report() {
        report::error(&err.to_string());
    }
    err.errno()
}

/// Runs a data callback body: 0 on success, -1 with `*err` set on failure.
fn data_call(name: &str, err: *mut c_int, body: impl FnOnce() -> Result<(), Error>) -> c_int {
    let result = nbdkit::guard(name, Err(Errno::EIO), || body().map_err(|e| report(&e)));
    match result {
        Ok(()) => 0,
        Err(errno) => {
            // SAFETY: `err` is the pointer nbdkit passed to this callback.
            unsafe { nbdkit::set_err(err, errno) };
            -1
        }
    }
}

/// Runs a body that returns an int, -1 on error.
fn int_call(name: &str, body: impl FnOnce() -> Result<c_int, Error>) -> c_int {
    nbdkit::guard(name, -1, || {
        body().unwrap_or_else(|e| {
            report(&e);
            -1
        })
    })
}

/// The connection behind a handle.
fn conn<'a>(handle: *mut c_void) -> &'a Handle {
    // SAFETY: nbdkit passes back the handle `open` returned, until `close`.
    unsafe { nbdkit::handle_ref::<Handle>(handle) }
}

/// What `.open` hands nbdkit: our context and the connection's state.
struct Handle {
    context: Context,
    conn: Connection,
}

extern "C" fn load() {
    nbdkit::guard("load", (), || {
        // libext2fs's messages name its error codes; ext2-rs reports
        // through nbdkit from now on.
        ext2_rs::load();
        report::install_sink();
    })
}

extern "C" fn unload() {
    nbdkit::guard("unload", (), || {
        filter::unload();
        ext2_rs::unload();
    });
}

unsafe extern "C" fn config(
    next: sys::nbdkit_next_config,
    nxdata: *mut sys::nbdkit_backend,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    nbdkit::guard("config", -1, || {
        // SAFETY: nbdkit passes NUL-terminated strings valid for the call.
        let (Some(k), Some(v)) = (unsafe { nbdkit::str_arg(key) }, unsafe {
            nbdkit::str_arg(value)
        }) else {
            return -1;
        };
        match filter::config(&k.to_string_lossy(), &v.to_string_lossy()) {
            Ok(true) => 0,
            // SAFETY: passing the parameter on to the next layer, as given.
            Ok(false) => unsafe { next.expect("next config")(nxdata, key, value) },
            Err(msg) => {
                report::error(&msg);
                -1
            }
        }
    })
}

unsafe extern "C" fn config_complete(
    next: sys::nbdkit_next_config_complete,
    nxdata: *mut sys::nbdkit_backend,
) -> c_int {
    nbdkit::guard("config_complete", -1, || match filter::config_complete() {
        // SAFETY: continuing nbdkit's chain with the pointer it gave us.
        Ok(()) => unsafe { next.expect("next config_complete")(nxdata) },
        Err(msg) => {
            report::error(&msg);
            -1
        }
    })
}

extern "C" fn thread_model() -> c_int {
    sys::NBDKIT_THREAD_MODEL_PARALLEL as c_int
}

extern "C" fn get_ready(thread_model: c_int) -> c_int {
    filter::get_ready(thread_model == sys::NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS as c_int);
    0
}

extern "C" fn cleanup(_backend: *mut sys::nbdkit_backend) {
    nbdkit::guard("cleanup", (), filter::cleanup)
}

unsafe extern "C" fn list_exports(
    _next: sys::nbdkit_next_list_exports,
    nxdata: *mut sys::nbdkit_backend,
    readonly: c_int,
    _is_tls: c_int,
    exports: *mut sys::nbdkit_exports,
) -> c_int {
    nbdkit::guard("list_exports", -1, || {
        if filter::exportname_mode() {
            let Some(backend) = nbdkit::Backend::new(nxdata) else {
                return -1;
            };
            match filter::list_exports(backend, readonly != 0) {
                Ok(files) => {
                    for file in files {
                        let description = format!("regular file, {} bytes", file.size);
                        // SAFETY: the list nbdkit passed to this callback.
                        if !unsafe { nbdkit::add_export(exports, &file.path, &description) } {
                            return -1;
                        }
                    }
                    0
                }
                Err(e) => {
                    report(&e);
                    -1
                }
            }
        } else {
            // One file, whatever the name: advertise just the default.
            // SAFETY: the list nbdkit passed to this callback.
            unsafe { nbdkit::use_default_export(exports) }
        }
    })
}

unsafe extern "C" fn default_export(
    _next: sys::nbdkit_next_default_export,
    _nxdata: *mut sys::nbdkit_backend,
    _readonly: c_int,
    _is_tls: c_int,
) -> *const c_char {
    nbdkit::guard("default_export", std::ptr::null(), || {
        // In exportname mode "" is refused unless ext2default= names a file.
        if filter::exportname_mode() {
            filter::default_export().map_or(std::ptr::null(), |d| nbdkit::intern(&d))
        } else {
            c"".as_ptr()
        }
    })
}

unsafe extern "C" fn open(
    _next: sys::nbdkit_next_open,
    context: *mut sys::nbdkit_context,
    readonly: c_int,
    exportname: *const c_char,
    _is_tls: c_int,
) -> *mut c_void {
    nbdkit::guard("open", std::ptr::null_mut(), || {
        let Some(context) = Context::new(context) else {
            return std::ptr::null_mut();
        };
        let Some(backend) = context.backend() else {
            report::error("no backend beneath the filter");
            return std::ptr::null_mut();
        };
        // SAFETY: nbdkit passes a NUL-terminated export name.
        let raw_name = unsafe { nbdkit::str_arg(exportname) };
        // NBD export names are UTF-8; "repairing" other bytes could name
        // another file, so such names are refused.
        let Ok(name) = raw_name.map_or(Ok(""), |n| n.to_str()) else {
            report::error("the export name is not valid UTF-8");
            return std::ptr::null_mut();
        };
        match Connection::open(backend, readonly != 0, name) {
            Ok(conn) => nbdkit::into_handle(Handle { context, conn }),
            Err(e) => {
                report(&e);
                std::ptr::null_mut()
            }
        }
    })
}

unsafe extern "C" fn close(handle: *mut c_void) {
    nbdkit::guard("close", (), || {
        // SAFETY: the handle from `open`, freed once here.
        drop(unsafe { nbdkit::from_handle::<Handle>(handle) });
    })
}

unsafe extern "C" fn prepare(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    _readonly: c_int,
) -> c_int {
    int_call("prepare", || {
        // SAFETY: nbdkit runs .prepare alone on this handle.
        let h = unsafe { nbdkit::handle_mut::<Handle>(handle) };
        h.conn.prepare()?;
        // Last, so that a failed prepare never leaves the shared context
        // attached for nbdkit to close with this connection.
        h.context.set_next(Some(h.conn.plugin().raw()));
        Ok(0)
    })
}

unsafe extern "C" fn finalize(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    nbdkit::guard("finalize", -1, || {
        // The shared context outlives the connection: detach it.
        conn(handle).context.set_next(None);
        0
    })
}

unsafe extern "C" fn get_size(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> i64 {
    nbdkit::guard("get_size", -1, || match conn(handle).conn.size() {
        Ok(size) => i64::try_from(size).unwrap_or(-1),
        Err(e) => {
            report(&e);
            -1
        }
    })
}

unsafe extern "C" fn export_description(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
) -> *const c_char {
    nbdkit::guard("export_description", std::ptr::null(), || {
        match conn(handle).conn.description() {
            Some(d) => nbdkit::intern(&d),
            None => std::ptr::null(),
        }
    })
}

unsafe extern "C" fn block_size(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    minimum: *mut u32,
    preferred: *mut u32,
    maximum: *mut u32,
) -> c_int {
    nbdkit::guard("block_size", -1, || {
        let preferred_size = conn(handle).conn.block_size().clamp(512, 64 * 1024);
        // SAFETY: nbdkit passes three valid out-pointers.
        unsafe {
            *minimum = 1;
            *preferred = preferred_size;
            *maximum = u32::MAX;
        }
        0
    })
}

unsafe extern "C" fn can_write(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    int_call("can_write", || Ok(conn(handle).conn.can_write()? as c_int))
}

/// Flush always means something: it writes the filesystem's metadata.
unsafe extern "C" fn can_flush(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    1
}

/// Trim frees blocks only where libext2fs 1.47.0 can do it safely: files
/// with extents.
unsafe extern "C" fn can_trim(_next: *mut sys::nbdkit_next, handle: *mut c_void) -> c_int {
    int_call("can_trim", || Ok(conn(handle).conn.can_trim()? as c_int))
}

/// Zero is ours: holes need nothing, data blocks are zeroed in place.
unsafe extern "C" fn can_zero(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    sys::NBDKIT_ZERO_NATIVE as c_int
}

/// Fast zero succeeds where no data must be written (holes, unwritten
/// blocks, or a plugin that zeroes quickly) and fails fast elsewhere.
unsafe extern "C" fn can_fast_zero(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    1
}

/// Block status comes from the file's own map, never the image's.
unsafe extern "C" fn can_extents(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    1
}

unsafe extern "C" fn can_fua(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    sys::NBDKIT_FUA_NATIVE as c_int
}

/// All connections share one plugin context and one block map, and a flush
/// on any connection flushes that one context: what one connection wrote is
/// what every other reads, and durable after any flush.
unsafe extern "C" fn can_multi_conn(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    1
}

/// nbdkit implements cache requests by reading through us.
unsafe extern "C" fn can_cache(_next: *mut sys::nbdkit_next, _handle: *mut c_void) -> c_int {
    sys::NBDKIT_CACHE_EMULATE as c_int
}

unsafe extern "C" fn pread(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    buf: *mut c_void,
    count: u32,
    offset: u64,
    _flags: u32,
    err: *mut c_int,
) -> c_int {
    data_call("pread", err, || {
        // SAFETY: nbdkit passes a buffer of `count` writable bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), count as usize) };
        conn(handle).conn.pread(buf, offset)
    })
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
    data_call("pwrite", err, || {
        // SAFETY: nbdkit passes a buffer of `count` readable bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), count as usize) };
        conn(handle)
            .conn
            .pwrite(data, offset, flags & sys::NBDKIT_FLAG_FUA != 0)
    })
}

unsafe extern "C" fn zero(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    count: u32,
    offset: u64,
    flags: u32,
    err: *mut c_int,
) -> c_int {
    data_call("zero", err, || {
        conn(handle).conn.zero(
            offset,
            u64::from(count),
            flags & sys::NBDKIT_FLAG_MAY_TRIM != 0,
            flags & sys::NBDKIT_FLAG_FAST_ZERO != 0,
            flags & sys::NBDKIT_FLAG_FUA != 0,
        )
    })
}

unsafe extern "C" fn trim(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    count: u32,
    offset: u64,
    flags: u32,
    err: *mut c_int,
) -> c_int {
    data_call("trim", err, || {
        conn(handle)
            .conn
            .trim(offset, u64::from(count), flags & sys::NBDKIT_FLAG_FUA != 0)
    })
}

unsafe extern "C" fn flush(
    _next: *mut sys::nbdkit_next,
    handle: *mut c_void,
    _flags: u32,
    err: *mut c_int,
) -> c_int {
    data_call("flush", err, || conn(handle).conn.flush())
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
    data_call("extents", err, || {
        let runs = conn(handle).conn.status(offset, u64::from(count))?;
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
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn help_text_matches_the_config_module() {
        assert_eq!(
            super::CONFIG_HELP.to_str().unwrap(),
            crate::filter::config::HELP
        );
    }
}
