//! The plugin beneath us: a safe wrapper over one `nbdkit_next` context.
//!
//! nbdkit asserts (and so aborts the whole server) when a filter sends a
//! request its backend did not advertise or that lies outside the backend's
//! size.  [`Plugin`] learns the capabilities once and turns every such request
//! into an error instead, so no corrupt image or bug of ours can trip them.

use std::ffi::{c_int, CStr};
use std::ptr::NonNull;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::nbdkit::report::nbd_error;
use crate::nbdkit::Backend;
use crate::sys;
use ext2_rs::error::Errno;

/// The largest single request we hand to the plugin (its count is a u32).
const MAX_REQUEST: usize = 1 << 30;

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

    fn ops(&self) -> &sys::nbdkit_next_ops {
        // SAFETY: an nbdkit_next is a struct nbdkit_next_ops that lives until
        // nbdkit_next_context_close, which only `Plugin::drop` calls.
        unsafe { self.0.as_ref() }
    }
}

/// Calls a `nbdkit_next_ops` function pointer with the context first.
macro_rules! call {
    ($raw:expr, $name:ident $(, $arg:expr)*) => {{
        let raw = $raw;
        let f = raw.ops().$name.expect(concat!("nbdkit_next_ops.", stringify!($name)));
        // SAFETY: the context is open and prepared; arguments are valid for the
        // duration of the call (buffers are borrowed slices).
        unsafe { f(raw.as_ptr() $(, $arg)*) }
    }};
}

/// What the plugin said it can do, asked once after it was prepared.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    pub size: u64,
    pub can_write: bool,
    pub can_flush: bool,
    pub fua: i32,
    pub zero: i32,
    pub can_fast_zero: bool,
    pub can_trim: bool,
    pub can_multi_conn: bool,
}

/// The plugin context that the filter shares between all connections.
pub struct Plugin {
    raw: RawNext,
    caps: Capabilities,
    /// Held around each request when the plugin cannot take parallel requests
    /// on one handle (thread model `serialize_requests`): all our connections
    /// share this one handle, so nbdkit's own per-connection lock is not enough.
    gate: Option<Mutex<()>>,
    /// False once the context is closed (at `.cleanup`, which may come while
    /// connections still exist); requests hold it shared, so the context is
    /// never closed under one.
    live: RwLock<bool>,
}

/// Permission to make one request: the context stays open meanwhile.
struct Entry<'a> {
    _live: RwLockReadGuard<'a, bool>,
    _gate: Option<MutexGuard<'a, ()>>,
}

impl Plugin {
    /// Opens, prepares and queries a context that outlives any connection.
    /// A failure has already been reported by nbdkit or the plugin.
    pub fn open(backend: Backend, readonly: bool, serialize: bool) -> Result<Plugin, Errno> {
        // SAFETY: `backend` is the one nbdkit handed to the calling callback;
        // the empty export name asks for the plugin's default export.
        let ptr = unsafe {
            sys::nbdkit_next_context_open(backend.as_ptr(), readonly as c_int, c"".as_ptr(), 1)
        };
        let raw = RawNext::new(ptr).ok_or(Errno::EIO)?;
        let mut plugin = Plugin {
            raw,
            caps: Capabilities::default(),
            gate: serialize.then(|| Mutex::new(())),
            live: RwLock::new(true),
        };
        if call!(raw, prepare) == -1 {
            return Err(Errno::EIO);
        }
        plugin.caps = plugin.query()?;
        Ok(plugin)
    }

    fn query(&self) -> Result<Capabilities, Errno> {
        let raw = self.raw;
        let check = |r: c_int| if r == -1 { Err(Errno::EIO) } else { Ok(r) };
        let size = call!(raw, get_size);
        if size < 0 {
            return Err(Errno::EIO);
        }
        let can_write = check(call!(raw, can_write))? == 1;
        Ok(Capabilities {
            size: size as u64,
            can_write,
            can_flush: check(call!(raw, can_flush))? == 1,
            fua: if can_write {
                check(call!(raw, can_fua))?
            } else {
                0
            },
            zero: if can_write {
                check(call!(raw, can_zero))?
            } else {
                0
            },
            can_fast_zero: can_write && check(call!(raw, can_fast_zero))? == 1,
            can_trim: can_write && check(call!(raw, can_trim))? == 1,
            can_multi_conn: check(call!(raw, can_multi_conn))? == 1,
        })
    }

    fn enter(&self) -> Result<Entry<'_>, Errno> {
        let live = self.live.read();
        if !*live {
            nbd_error!("the server is shutting down");
            return Err(Errno::ESHUTDOWN);
        }
        Ok(Entry {
            _live: live,
            _gate: self.gate.as_ref().map(|g| g.lock()),
        })
    }

    /// Finalizes and closes the context, waiting for requests in flight;
    /// later requests fail with ESHUTDOWN.
    pub fn close(&self) {
        let mut live = self.live.write();
        if *live {
            *live = false;
            let raw = self.raw;
            call!(raw, finalize);
            // SAFETY: the context was opened by `Plugin::open` and, guarded by
            // `live`, is closed exactly once with no request in flight.
            unsafe { sys::nbdkit_next_context_close(raw.as_ptr()) }
        }
    }

    pub fn raw(&self) -> RawNext {
        self.raw
    }

    /// Whether the plugin takes parallel requests on the shared context.
    pub fn parallel(&self) -> bool {
        self.gate.is_none()
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn size(&self) -> u64 {
        self.caps.size
    }

    /// The plugin's export description, if it has one.
    pub fn export_description(&self) -> Option<String> {
        let _entry = self.enter().ok()?;
        let ptr = call!(self.raw, export_description);
        if ptr.is_null() {
            return None;
        }
        // SAFETY: nbdkit returns a NUL-terminated string valid at least until
        // the next call on this context; we copy it at once.
        Some(
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// Fails unless `[offset, offset + len)` lies inside the image.
    fn check_range(&self, what: &str, offset: u64, len: usize) -> Result<(), Errno> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.caps.size => Ok(()),
            _ => {
                nbd_error!(
                    "{what} of {len} bytes at offset {offset} is beyond the end of the image ({} bytes): the filesystem is damaged or truncated",
                    self.caps.size
                );
                Err(Errno::EIO)
            }
        }
    }

    fn check_writable(&self) -> Result<(), Errno> {
        if self.caps.can_write {
            Ok(())
        } else {
            nbd_error!("the plugin is read-only");
            Err(Errno::EROFS)
        }
    }

    /// Reads `buf.len()` bytes of the image at `offset`.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.check_range("read", offset, buf.len())?;
        let len = buf.len() as u64;
        self.in_requests(len, |done, n, err| {
            let chunk = &mut buf[done as usize..done as usize + n as usize];
            call!(
                self.raw,
                pread,
                chunk.as_mut_ptr().cast(),
                n,
                offset + done,
                0,
                err
            )
        })
    }

    /// Splits `len` bytes into requests the plugin can take (its count is a
    /// u32), makes each with `one(done, n, &mut err)`, and turns a -1 into
    /// the plugin's errno.  Each request holds an [`Entry`].
    fn in_requests(
        &self,
        len: u64,
        mut one: impl FnMut(u64, u32, &mut c_int) -> c_int,
    ) -> Result<(), Errno> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST as u64);
            let mut err: c_int = 0;
            let _entry = self.enter()?;
            if one(done, n as u32, &mut err) == -1 {
                return Err(Errno::from_plugin(err));
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` to the image at `offset`; `fua` makes it durable first.
    pub fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.check_writable()?;
        self.check_range("write", offset, buf.len())?;
        let (flags, flush_after) = self.fua_plan(fua);
        self.in_requests(buf.len() as u64, |done, n, err| {
            let chunk = &buf[done as usize..done as usize + n as usize];
            call!(
                self.raw,
                pwrite,
                chunk.as_ptr().cast(),
                n,
                offset + done,
                flags,
                err
            )
        })?;
        if flush_after {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes zeroes with the plugin's zero request where it has one.
    /// `fast` asks the plugin to fail rather than write zeroes slowly; the
    /// caller checks `can_fast_zero` first.
    pub fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        self.check_writable()?;
        self.check_range("zero", offset, len as usize)?;
        if fast && !self.caps.can_fast_zero {
            return Err(Errno::ENOTSUP);
        }
        if self.caps.zero == sys::NBDKIT_ZERO_NONE as i32 {
            return self.write_zeroes(len, offset);
        }
        let mut flags = 0;
        if may_trim {
            flags |= sys::NBDKIT_FLAG_MAY_TRIM;
        }
        if fast {
            flags |= sys::NBDKIT_FLAG_FAST_ZERO;
        }
        self.in_requests(len, |done, n, err| {
            call!(self.raw, zero, n, offset + done, flags, err)
        })
    }

    fn write_zeroes(&self, len: u64, offset: u64) -> Result<(), Errno> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.pwrite(&chunk[..n], offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes everything written so far durable, if the plugin can.
    pub fn flush(&self) -> Result<(), Errno> {
        if !self.caps.can_flush {
            return Ok(());
        }
        let mut err: c_int = 0;
        let _entry = self.enter()?;
        if call!(self.raw, flush, 0, &mut err) == -1 {
            return Err(Errno::from_plugin(err));
        }
        Ok(())
    }

    /// How to honour FUA: the plugin's flag, a flush afterwards, or nothing
    /// when the plugin can do neither (it then has no volatile cache to lose).
    fn fua_plan(&self, fua: bool) -> (u32, bool) {
        if !fua {
            (0, false)
        } else if self.caps.fua > sys::NBDKIT_FUA_NONE as i32 {
            (sys::NBDKIT_FLAG_FUA, false)
        } else {
            (0, self.caps.can_flush)
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.close();
    }
}
