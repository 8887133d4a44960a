//! The plugin beneath us: a safe wrapper over one `nbdkit_next` context.
//!
//! nbdkit asserts (and so aborts the whole server) when a filter sends a
//! request its backend did not advertise or that lies outside the backend's
//! size.  [`Plugin`] learns the capabilities once and turns every such request
//! into an error instead, so no corrupt image or bug of ours can trip them.

use std::ffi::{c_int, CStr};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::abi::nbdkit::{Backend, RawNext};
use crate::abi::report::nbd_error;
use crate::abi::sys;
use crate::device::{Capabilities, Device};
use ext2_rs::error::Errno;

/// The largest single request we hand to the plugin (its count is a u32).
const MAX_REQUEST: usize = 1 << 30;

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
pub struct Caps {
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
///
/// It is opened read-only at start; the first connection of a writable
/// server replaces it, once, by a read-write one ([`Plugin::reopen`]),
/// without stopping requests for longer than the swap.
pub struct Plugin {
    /// The layer beneath us, on which contexts are opened.
    backend: Backend,
    state: RwLock<State>,
    /// Held around each request when the plugin cannot take parallel requests
    /// on one handle (thread model `serialize_requests`): all our connections
    /// share this one handle, so nbdkit's own per-connection lock is not enough.
    gate: Option<Mutex<()>>,
}

struct State {
    /// The context requests go to; `None` once closed (at `.cleanup`, which
    /// may come while connections still exist).  Requests hold the state
    /// shared, so a context is never closed or replaced under one.
    current: Option<(RawNext, Caps)>,
    /// Whether the current context was opened read-only.
    readonly: bool,
    /// Contexts [`Plugin::reopen`] replaced.  Connections prepared before may
    /// still have one attached (nbdkit calls through it for what the filter
    /// leaves to the plugin), so they are closed only with the plugin.
    retired: Vec<RawNext>,
}

/// Permission to make requests: the context stays open and current meanwhile.
struct Entry<'a> {
    state: RwLockReadGuard<'a, State>,
    _gate: Option<MutexGuard<'a, ()>>,
}

impl Entry<'_> {
    fn raw(&self) -> RawNext {
        self.state.current.as_ref().expect("checked by enter").0
    }

    fn caps(&self) -> &Caps {
        &self.state.current.as_ref().expect("checked by enter").1
    }

    /// Fails unless `[offset, offset + len)` lies inside the image.
    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), Errno> {
        let size = self.caps().size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => {
                nbd_error!(
                    "{what} of {len} bytes at offset {offset} is beyond the end of the image ({size} bytes): the filesystem is damaged or truncated"
                );
                Err(Errno::EIO)
            }
        }
    }

    fn check_writable(&self) -> Result<(), Errno> {
        if self.caps().can_write {
            Ok(())
        } else {
            nbd_error!("the plugin is read-only");
            Err(Errno::EROFS)
        }
    }

    /// Splits `len` bytes into requests the plugin can take (its count is a
    /// u32), makes each with `one(raw, done, n, &mut err)`, and turns a -1
    /// into the plugin's errno.
    fn in_requests(
        &self,
        len: u64,
        mut one: impl FnMut(RawNext, u64, u32, &mut c_int) -> c_int,
    ) -> Result<(), Errno> {
        let raw = self.raw();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST as u64);
            let mut err: c_int = 0;
            if one(raw, done, n as u32, &mut err) == -1 {
                return Err(Errno::new(err).unwrap_or(Errno::EIO));
            }
            done += n;
        }
        Ok(())
    }
}

/// Opens, prepares and queries a context that outlives any connection.  A
/// failure has already been reported by nbdkit or the plugin.
fn open_context(backend: Backend, readonly: bool) -> Result<(RawNext, Caps), Errno> {
    // SAFETY: `backend` is the one nbdkit handed to the calling callback;
    // the empty export name asks for the plugin's default export.
    let ptr = unsafe {
        sys::nbdkit_next_context_open(backend.as_ptr(), readonly as c_int, c"".as_ptr(), 1)
    };
    let raw = RawNext::new(ptr).ok_or(Errno::EIO)?;
    let prepared = call!(raw, prepare) != -1;
    match prepared.then(|| query(raw)) {
        Some(Ok(caps)) => Ok((raw, caps)),
        failed => {
            close_context(raw, prepared);
            Err(failed.map_or(Errno::EIO, |r| r.err().unwrap_or(Errno::EIO)))
        }
    }
}

/// Finalizes (if it was prepared) and closes a context.
fn close_context(raw: RawNext, prepared: bool) {
    if prepared {
        call!(raw, finalize);
    }
    // SAFETY: the context was opened by `open_context` and is closed exactly
    // once, with no request in flight (the caller holds the state).
    unsafe { sys::nbdkit_next_context_close(raw.as_ptr()) }
}

/// What a freshly prepared context can do.
fn query(raw: RawNext) -> Result<Caps, Errno> {
    let check = |r: c_int| if r == -1 { Err(Errno::EIO) } else { Ok(r) };
    let size = call!(raw, get_size);
    if size < 0 {
        return Err(Errno::EIO);
    }
    let can_write = check(call!(raw, can_write))? == 1;
    Ok(Caps {
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

impl Plugin {
    /// Opens, prepares and queries a context on `backend` (read-only if
    /// `readonly`) that outlives any connection.  A failure has already
    /// been reported by nbdkit or the plugin.
    pub fn open(backend: Backend, readonly: bool, serialize: bool) -> Result<Plugin, Errno> {
        let current = open_context(backend, readonly)?;
        Ok(Plugin {
            backend,
            state: RwLock::new(State {
                current: Some(current),
                readonly,
                retired: Vec::new(),
            }),
            gate: serialize.then(|| Mutex::new(())),
        })
    }

    /// Replaces the context by a new one (read-write unless `readonly`),
    /// once requests in flight have finished; requests made meanwhile
    /// wait.  On failure the old context stays; nothing changes when the
    /// context is already opened that way.
    pub fn reopen(&self, readonly: bool) -> Result<(), Errno> {
        if self.state.read().readonly == readonly {
            return Ok(());
        }
        let fresh = open_context(self.backend, readonly)?;
        let mut state = self.state.write();
        match state.current.as_mut() {
            Some(current) => {
                let old = std::mem::replace(current, fresh);
                state.retired.push(old.0);
                state.readonly = readonly;
                Ok(())
            }
            None => {
                // Closed meanwhile: the server is shutting down.
                close_context(fresh.0, true);
                nbd_error!("the server is shutting down");
                Err(Errno::ESHUTDOWN)
            }
        }
    }

    fn enter(&self) -> Result<Entry<'_>, Errno> {
        let state = self.state.read();
        if state.current.is_none() {
            nbd_error!("the server is shutting down");
            return Err(Errno::ESHUTDOWN);
        }
        Ok(Entry {
            state,
            _gate: self.gate.as_ref().map(|g| g.lock()),
        })
    }

    /// Finalizes and closes the contexts, waiting for requests in flight;
    /// later requests fail with ESHUTDOWN.
    pub fn close(&self) {
        let mut state = self.state.write();
        if let Some((raw, _)) = state.current.take() {
            close_context(raw, true);
        }
        for raw in std::mem::take(&mut state.retired) {
            close_context(raw, true);
        }
    }

    /// The current context, to attach to a connection; `None` once closed.
    pub fn raw(&self) -> Option<RawNext> {
        self.state.read_recursive().current.as_ref().map(|c| c.0)
    }

    /// What the current context can do (nothing, once closed).
    fn caps(&self) -> Caps {
        self.state
            .read_recursive()
            .current
            .as_ref()
            .map(|c| c.1)
            .unwrap_or_default()
    }

    /// Whether the plugin takes parallel requests on the shared context.
    pub fn parallel(&self) -> bool {
        self.gate.is_none()
    }

    pub fn size(&self) -> u64 {
        self.caps().size
    }

    /// The plugin's export description, if it has one.
    pub fn export_description(&self) -> Option<String> {
        let entry = self.enter().ok()?;
        let ptr = call!(entry.raw(), export_description);
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

    /// Reads `buf.len()` bytes of the image at `offset`.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let entry = self.enter()?;
        let len = buf.len() as u64;
        entry.check_range("read", offset, len)?;
        entry.in_requests(len, |raw, done, n, err| {
            let chunk = &mut buf[done as usize..done as usize + n as usize];
            call!(
                raw,
                pread,
                chunk.as_mut_ptr().cast(),
                n,
                offset + done,
                0,
                err
            )
        })
    }

    /// Writes `buf` to the image at `offset`; `fua` makes it durable first.
    pub fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        let entry = self.enter()?;
        entry.check_writable()?;
        entry.check_range("write", offset, buf.len() as u64)?;
        let (flags, flush_after) = fua_plan(entry.caps(), fua);
        entry.in_requests(buf.len() as u64, |raw, done, n, err| {
            let chunk = &buf[done as usize..done as usize + n as usize];
            call!(
                raw,
                pwrite,
                chunk.as_ptr().cast(),
                n,
                offset + done,
                flags,
                err
            )
        })?;
        if flush_after {
            flush(&entry)?;
        }
        Ok(())
    }

    /// Writes zeroes with the plugin's zero request where it has one.
    /// `fast` asks the plugin to fail rather than write zeroes slowly; the
    /// caller checks `can_fast_zero` first.
    pub fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        let entry = self.enter()?;
        entry.check_writable()?;
        entry.check_range("zero", offset, len)?;
        let caps = *entry.caps();
        if fast && !caps.can_fast_zero {
            return Err(Errno::ENOTSUP);
        }
        if caps.zero == sys::NBDKIT_ZERO_NONE as i32 {
            drop(entry);
            return self.write_zeroes(len, offset);
        }
        let mut flags = 0;
        if may_trim {
            flags |= sys::NBDKIT_FLAG_MAY_TRIM;
        }
        if fast {
            flags |= sys::NBDKIT_FLAG_FAST_ZERO;
        }
        entry.in_requests(len, |raw, done, n, err| {
            call!(raw, zero, n, offset + done, flags, err)
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

    /// Tells the plugin `len` bytes at `offset` are not needed any more.
    pub fn trim(&self, len: u64, offset: u64) -> Result<(), Errno> {
        let entry = self.enter()?;
        entry.check_writable()?;
        entry.check_range("trim", offset, len)?;
        if !entry.caps().can_trim {
            return Err(Errno::ENOTSUP);
        }
        entry.in_requests(len, |raw, done, n, err| {
            call!(raw, trim, n, offset + done, 0, err)
        })
    }

    /// Makes everything written so far durable, if the plugin can.
    pub fn flush(&self) -> Result<(), Errno> {
        flush(&self.enter()?)
    }
}

/// Flushes the entry's context, if the plugin can.
fn flush(entry: &Entry<'_>) -> Result<(), Errno> {
    if !entry.caps().can_flush {
        return Ok(());
    }
    let mut err: c_int = 0;
    if call!(entry.raw(), flush, 0, &mut err) == -1 {
        return Err(Errno::new(err).unwrap_or(Errno::EIO));
    }
    Ok(())
}

/// How to honour FUA: the plugin's flag, a flush afterwards, or nothing
/// when the plugin can do neither (it then has no volatile cache to lose).
fn fua_plan(caps: &Caps, fua: bool) -> (u32, bool) {
    if !fua {
        (0, false)
    } else if caps.fua > sys::NBDKIT_FUA_NONE as i32 {
        (sys::NBDKIT_FLAG_FUA, false)
    } else {
        (0, caps.can_flush)
    }
}

/// What the filter's core sees of the plugin.
impl Device for Plugin {
    fn size(&self) -> u64 {
        Plugin::size(self)
    }

    fn capabilities(&self) -> Capabilities {
        let caps = self.caps();
        Capabilities {
            can_write: caps.can_write,
            can_flush: caps.can_flush,
            native_fua: caps.fua > sys::NBDKIT_FUA_NONE as i32,
            can_fast_zero: caps.can_fast_zero,
            can_trim: caps.can_trim,
        }
    }

    fn parallel(&self) -> bool {
        Plugin::parallel(self)
    }

    fn description(&self) -> Option<String> {
        self.export_description()
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        Plugin::pread(self, buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        Plugin::pwrite(self, buf, offset, fua)
    }

    fn zero(&self, len: u64, offset: u64, may_trim: bool, fast: bool) -> Result<(), Errno> {
        Plugin::zero(self, len, offset, may_trim, fast)
    }

    fn trim(&self, len: u64, offset: u64) -> Result<(), Errno> {
        Plugin::trim(self, len, offset)
    }

    fn flush(&self) -> Result<(), Errno> {
        Plugin::flush(self)
    }

    fn open_writable(&self) -> Result<(), Errno> {
        self.reopen(false)
    }

    fn close(&self) {
        Plugin::close(self)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.close();
    }
}
