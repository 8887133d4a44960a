//! A libext2fs `io_manager` whose device is a [`BlockDevice`].
//!
//! libext2fs reaches its device only through this table.  An io_manager's
//! `open` receives nothing but a name, so the device is found by the name
//! [`register`] hands out.  Nothing is cached here: every request goes to
//! the device as it comes, so the host decides what is cached or held back.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_ulong, c_ulonglong, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::BlockDevice;
use crate::error::Errno;
use crate::ffi;
use crate::sys;

/// Devices reachable by channel name, e.g. `ext2-rs-device:1`.
static REGISTRY: Mutex<Option<HashMap<String, Arc<dyn BlockDevice>>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
const NAME_PREFIX: &str = "ext2-rs-device:";

/// Makes `device` openable by libext2fs under the returned name, until
/// [`unregister`] (after the filesystem is closed).
pub fn register(device: Arc<dyn BlockDevice>) -> CString {
    let name = format!("{NAME_PREFIX}{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    REGISTRY
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(name.clone(), device);
    CString::new(name).expect("the name has no NUL")
}

pub fn unregister(name: &CStr) {
    let mut registry = REGISTRY.lock();
    if let Some(map) = registry.as_mut() {
        map.remove(name.to_str().unwrap_or_default());
        if map.is_empty() {
            // Free the table itself: a host may unload us.
            *registry = None;
        }
    }
}

fn lookup(name: &str) -> Option<Arc<dyn BlockDevice>> {
    REGISTRY.lock().as_ref()?.get(name).cloned()
}

/// What each open channel keeps in `private_data` (see [`ffi::into_raw`]).
struct Channel {
    device: Arc<dyn BlockDevice>,
}

/// The io_manager table; libext2fs wants a mutable pointer to it but never
/// writes through it.
#[repr(transparent)]
pub struct Manager(std::cell::UnsafeCell<sys::struct_io_manager>);

// SAFETY: the table is never modified after construction; libext2fs only reads it.
unsafe impl Sync for Manager {}

impl Manager {
    pub fn as_ptr(&self) -> sys::io_manager {
        self.0.get()
    }
}

pub static MANAGER: Manager = Manager(std::cell::UnsafeCell::new(sys::struct_io_manager {
    magic: sys::EXT2_ET_MAGIC_IO_MANAGER as sys::errcode_t,
    name: c"ext2-rs block device I/O manager".as_ptr(),
    open: Some(channel_open),
    close: Some(channel_close),
    set_blksize: Some(channel_set_blksize),
    read_blk: Some(channel_read_blk),
    write_blk: Some(channel_write_blk),
    flush: Some(channel_flush),
    write_byte: Some(channel_write_byte),
    set_option: Some(channel_set_option),
    get_stats: None,
    read_blk64: Some(channel_read_blk64),
    write_blk64: Some(channel_write_blk64),
    discard: None,
    cache_readahead: None,
    zeroout: Some(channel_zeroout),
    reserved: [0; 14],
}));

/// The `errcode_t` libext2fs expects: 0, or an errno, which the library
/// passes through as a system error.
fn code(result: Result<(), Errno>) -> sys::errcode_t {
    match result {
        Ok(()) => 0,
        Err(e) => sys::errcode_t::from(e.get()),
    }
}

/// A live channel of ours, and its block size.
///
/// # Safety
/// `channel` is NULL or a channel opened by `channel_open` and not closed.
unsafe fn channel_state<'a>(channel: sys::io_channel) -> Result<(&'a Channel, u64), Errno> {
    if channel.is_null() {
        return Err(Errno::EINVAL);
    }
    // SAFETY: guaranteed by the caller; private_data came from ffi::into_raw.
    unsafe {
        let ch = &*channel;
        let state = ffi::borrow::<Channel>(ch.private_data).ok_or(Errno::EINVAL)?;
        Ok((state, ch.block_size as u64))
    }
}

/// Byte offset and length of a block request; a negative count is bytes.
fn extent_of(block: u64, count: c_int, block_size: u64) -> Result<(u64, usize), Errno> {
    let len = if count < 0 {
        u64::from(count.unsigned_abs())
    } else {
        u64::try_from(count).map_err(|_| Errno::EINVAL)? * block_size
    };
    let offset = block.checked_mul(block_size).ok_or(Errno::EIO)?;
    Ok((offset, usize::try_from(len).map_err(|_| Errno::EINVAL)?))
}

unsafe extern "C" fn channel_open(
    name: *const c_char,
    _flags: c_int,
    channel: *mut sys::io_channel,
) -> sys::errcode_t {
    let opened = ffi::guard("io_manager open", || {
        if name.is_null() || channel.is_null() {
            return None;
        }
        // SAFETY: libext2fs passes the NUL-terminated device name it was given.
        let name = unsafe { CStr::from_ptr(name) };
        let device = name.to_str().ok().and_then(lookup)?;
        let io = Box::new(sys::struct_io_channel {
            magic: sys::EXT2_ET_MAGIC_IO_CHANNEL as sys::errcode_t,
            manager: MANAGER.as_ptr(),
            name: name.to_owned().into_raw(),
            block_size: 1024,
            refcount: 1,
            private_data: ffi::into_raw(Channel { device }),
            ..Default::default()
        });
        // SAFETY: `channel` is a valid out-pointer supplied by libext2fs.
        unsafe { *channel = Box::into_raw(io) };
        Some(())
    });
    match opened {
        Some(()) => 0,
        None => sys::EXT2_ET_BAD_DEVICE_NAME as sys::errcode_t,
    }
}

unsafe extern "C" fn channel_close(channel: sys::io_channel) -> sys::errcode_t {
    code(ffi::guard("io_manager close", || {
        if channel.is_null() {
            return Err(Errno::EINVAL);
        }
        // SAFETY: libext2fs closes only channels we opened.
        let ch = unsafe { &mut *channel };
        ch.refcount -= 1;
        if ch.refcount > 0 {
            return Ok(());
        }
        // SAFETY: these three allocations were made by channel_open with
        // ffi::into_raw, CString and Box, and are freed exactly once, here.
        unsafe {
            drop(ffi::from_raw::<Channel>(ch.private_data));
            drop(CString::from_raw(ch.name));
            drop(Box::from_raw(channel));
        }
        Ok(())
    }))
}

unsafe extern "C" fn channel_set_blksize(
    channel: sys::io_channel,
    blksize: c_int,
) -> sys::errcode_t {
    code(ffi::guard("io_manager set_blksize", || {
        if blksize <= 0 || channel.is_null() {
            return Err(Errno::EINVAL);
        }
        // SAFETY: a live channel of ours.
        unsafe { (*channel).block_size = blksize };
        Ok(())
    }))
}

unsafe extern "C" fn channel_read_blk64(
    channel: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    code(ffi::guard("io_manager read_blk64", || {
        // SAFETY: a live channel of ours.
        let (ch, bs) = unsafe { channel_state(channel) }?;
        let (offset, len) = extent_of(block, count, bs)?;
        // SAFETY: libext2fs passes a buffer of at least `len` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), len) };
        ch.device.read_at(buf, offset)
    }))
}

unsafe extern "C" fn channel_write_blk64(
    channel: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    code(ffi::guard("io_manager write_blk64", || {
        // SAFETY: a live channel of ours.
        let (ch, bs) = unsafe { channel_state(channel) }?;
        let (offset, len) = extent_of(block, count, bs)?;
        // SAFETY: libext2fs passes a buffer of at least `len` bytes.
        let buf = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        ch.device.write_at(buf, offset)
    }))
}

unsafe extern "C" fn channel_read_blk(
    channel: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    // SAFETY: same contract as the 64-bit variant, which guards itself.
    unsafe { channel_read_blk64(channel, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn channel_write_blk(
    channel: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    // SAFETY: same contract as the 64-bit variant, which guards itself.
    unsafe { channel_write_blk64(channel, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn channel_write_byte(
    channel: sys::io_channel,
    offset: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    code(ffi::guard("io_manager write_byte", || {
        // SAFETY: a live channel of ours.
        let (ch, _) = unsafe { channel_state(channel) }?;
        let len = usize::try_from(count).map_err(|_| Errno::EINVAL)?;
        // SAFETY: libext2fs passes a buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        ch.device.write_at(buf, offset)
    }))
}

unsafe extern "C" fn channel_flush(channel: sys::io_channel) -> sys::errcode_t {
    code(ffi::guard("io_manager flush", || {
        // SAFETY: a live channel of ours.
        let (ch, _) = unsafe { channel_state(channel) }?;
        ch.device.flush()
    }))
}

unsafe extern "C" fn channel_zeroout(
    channel: sys::io_channel,
    block: c_ulonglong,
    count: c_ulonglong,
) -> sys::errcode_t {
    code(ffi::guard("io_manager zeroout", || {
        // SAFETY: a live channel of ours.
        let (ch, bs) = unsafe { channel_state(channel) }?;
        let offset = block.checked_mul(bs).ok_or(Errno::EIO)?;
        let len = count.checked_mul(bs).ok_or(Errno::EIO)?;
        ch.device.zero_at(len, offset)
    }))
}

/// No options are known; nothing here can panic.
unsafe extern "C" fn channel_set_option(
    _channel: sys::io_channel,
    _option: *const c_char,
    _arg: *const c_char,
) -> sys::errcode_t {
    sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_counts_are_bytes() {
        assert_eq!(extent_of(3, -100, 4096), Ok((3 * 4096, 100)));
        assert_eq!(extent_of(3, 2, 1024), Ok((3 * 1024, 2048)));
    }

    #[test]
    fn huge_blocks_fail_instead_of_wrapping() {
        assert_eq!(extent_of(u64::MAX / 2, 1, 4096), Err(Errno::EIO));
    }
}
