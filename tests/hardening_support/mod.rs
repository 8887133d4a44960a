//! Helpers for the hardening tests (`tests/hardening_*.rs`, `tests/fuzz.rs`), on top of
//! `tests/common`:
//!
//! - [`Nbd`]: a minimal raw NBD client speaking the fixed-newstyle protocol over a Unix
//!   socket. It sends export names as arbitrary bytes (empty, huge, non-UTF-8), requests
//!   anywhere (past the end, zero length, unknown commands), and costs no process per
//!   connection, so thousands of connections and hundreds of fuzz cases fit in seconds.
//! - [`Srv`]: a background nbdkit server like `common::Server`, plus the health checks the
//!   hardening tests need (still running, no panic/assertion/crash in its log, clean exit
//!   after SIGTERM) and an optional valgrind wrapper: with `EXT2FILTER_VALGRIND=1` every
//!   server these tests start runs as `valgrind --tool=memcheck ... nbdkit ...` (the
//!   options of `common::valgrind_options`, with `tests/valgrind.supp`, plus
//!   `--track-origins=yes`), and stopping it fails the test when memcheck reported errors
//!   or definite leaks. `EXT2FILTER_VALGRIND_OPTS` adds memcheck options.
//! - [`Layout`]: where an image keeps its metadata (from `dumpe2fs` and `debugfs`), so
//!   damage can be aimed at what matters.
//! - [`det_image`]: byte-for-byte reproducible images (fixed UUID, hash seed, times), so a
//!   fuzz case is fully named by a base image and a seed.

#![allow(dead_code)]

use std::env;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{self, run, run_command, TestDir};

// ---------------------------------------------------------------------------------------
// The raw NBD client
// ---------------------------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_FAST_ZERO: u16 = 16;

/// Transmission flags (NBD_INFO_EXPORT).
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;

/// NBD error numbers (the protocol's, which match Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// How long any single socket read or write may block before the server counts as hung.
pub fn io_timeout() -> Duration {
    if valgrind_enabled() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    }
}

/// Why a connection was not established.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the option with an error reply (`NBD_REP_ERR_*`).
    Refused { reply: u32, message: String },
    /// The socket failed or the server broke the protocol (or died).
    Io(io::Error),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused { reply, message } => {
                write!(f, "refused (reply {:#x}): {message}", reply)
            }
            ConnectError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

fn read_u16(s: &mut UnixStream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut UnixStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut UnixStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Opens the socket and does the fixed-newstyle greeting; returns the stream ready for
/// options.
pub fn greet(socket: &Path) -> io::Result<UnixStream> {
    greet_timeout(socket, io_timeout())
}

/// [`greet`] with a chosen timeout for every later socket read and write.
pub fn greet_timeout(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    // nbdkit creates its socket before it listens on it: a refused connection right
    // after start is retried for a while.
    let started = Instant::now();
    let mut s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(e),
        }
    };
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let magic = read_u64(&mut s)?;
    let opt = read_u64(&mut s)?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(protocol_error(format!("bad greeting {magic:#x} {opt:#x}")));
    }
    let server_flags = read_u16(&mut s)?;
    // FIXED_NEWSTYLE and NO_ZEROES, as far as the server offers them.
    s.write_all(&u32::from(server_flags & 3).to_be_bytes())?;
    Ok(s)
}

/// Sends one option with its data.
pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// Reads one option reply: (reply type, data).
pub fn read_option_reply(s: &mut UnixStream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let magic = read_u64(s)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(protocol_error(format!("bad option reply magic {magic:#x}")));
    }
    let opt = read_u32(s)?;
    if opt != option {
        return Err(protocol_error(format!(
            "reply for option {opt}, expected {option}"
        )));
    }
    let reply = read_u32(s)?;
    let len = read_u32(s)? as usize;
    if len > 1 << 24 {
        return Err(protocol_error(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok((reply, data))
}

/// The data of NBD_OPT_GO / NBD_OPT_INFO for `name`, asking for no extra information.
fn go_data(name: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(6 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Sends NBD_OPT_INFO or NBD_OPT_GO for `name` and reads the replies up to the final
/// one: the export's (size, transmission flags) or why it was refused.
pub fn info_or_go(
    s: &mut UnixStream,
    option: u32,
    name: &[u8],
) -> Result<(u64, u16), ConnectError> {
    send_option(s, option, &go_data(name))?;
    let mut export: Option<(u64, u16)> = None;
    loop {
        let (reply, data) = read_option_reply(s, option)?;
        match reply {
            REP_ACK => {
                return export.ok_or_else(|| {
                    ConnectError::Io(protocol_error("ACK without NBD_INFO_EXPORT".into()))
                })
            }
            REP_INFO => {
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == 0 {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
            }
            r if r & REP_FLAG_ERROR != 0 => {
                return Err(ConnectError::Refused {
                    reply: r,
                    message: String::from_utf8_lossy(&data).into_owned(),
                })
            }
            r => {
                return Err(ConnectError::Io(protocol_error(format!(
                    "unexpected option reply {r:#x}"
                ))))
            }
        }
    }
}

/// The export names NBD_OPT_LIST returns, or why it failed.
pub fn list_exports(socket: &Path) -> Result<Vec<Vec<u8>>, ConnectError> {
    list_exports_timeout(socket, io_timeout())
}

pub fn list_exports_timeout(
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, ConnectError> {
    let mut s = greet_timeout(socket, timeout)?;
    send_option(&mut s, OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (reply, data) = read_option_reply(&mut s, OPT_LIST)?;
        match reply {
            REP_ACK => break,
            REP_SERVER => {
                if data.len() < 4 {
                    return Err(ConnectError::Io(protocol_error("short REP_SERVER".into())));
                }
                let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                if 4 + n > data.len() {
                    return Err(ConnectError::Io(protocol_error("bad REP_SERVER".into())));
                }
                names.push(data[4..4 + n].to_vec());
            }
            r if r & REP_FLAG_ERROR != 0 => {
                return Err(ConnectError::Refused {
                    reply: r,
                    message: String::from_utf8_lossy(&data).into_owned(),
                })
            }
            r => {
                return Err(ConnectError::Io(protocol_error(format!(
                    "unexpected list reply {r:#x}"
                ))))
            }
        }
    }
    let _ = send_option(&mut s, OPT_ABORT, &[]);
    Ok(names)
}

/// One connection in the transmission phase, using simple replies only.
pub struct Nbd {
    stream: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

/// The result of one request: Ok, or the NBD error number the server sent.
pub type Reply<T> = Result<T, u32>;

impl Nbd {
    /// Connects to export `name` (any bytes) with NBD_OPT_GO.
    pub fn connect(socket: &Path, name: &[u8]) -> Result<Nbd, ConnectError> {
        Self::connect_timeout(socket, name, io_timeout())
    }

    pub fn connect_timeout(
        socket: &Path,
        name: &[u8],
        timeout: Duration,
    ) -> Result<Nbd, ConnectError> {
        let mut stream = greet_timeout(socket, timeout)?;
        let (size, flags) = info_or_go(&mut stream, OPT_GO, name)?;
        Ok(Nbd {
            stream,
            size,
            flags,
            cookie: 1,
        })
    }

    /// Enters transmission on an already negotiated stream (after a successful GO).
    pub fn from_stream(stream: UnixStream, size: u64, flags: u16) -> Nbd {
        Nbd {
            stream,
            size,
            flags,
            cookie: 1,
        }
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sends a request header (and `payload`, for writes) without reading the reply.
    pub fn send_request(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&command.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg)?;
        Ok(cookie)
    }

    /// Reads a simple reply header for `cookie`: the error number.
    pub fn read_reply(&mut self, cookie: u64) -> io::Result<u32> {
        let magic = read_u32(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol_error(format!("bad reply magic {magic:#x}")));
        }
        let error = read_u32(&mut self.stream)?;
        let got = read_u64(&mut self.stream)?;
        if got != cookie {
            return Err(protocol_error(format!(
                "reply for cookie {got}, expected {cookie}"
            )));
        }
        Ok(error)
    }

    /// Reads the next simple reply header, whatever its cookie (replies to requests in
    /// flight come in any order): (cookie, error). Reads carry data: use only for
    /// requests without reply data, or read the data yourself.
    pub fn read_any_reply(&mut self) -> io::Result<(u64, u32)> {
        let magic = read_u32(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol_error(format!("bad reply magic {magic:#x}")));
        }
        let error = read_u32(&mut self.stream)?;
        let cookie = read_u64(&mut self.stream)?;
        Ok((cookie, error))
    }

    fn simple(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Reply<()>> {
        let cookie = self.send_request(flags, command, offset, length, payload)?;
        let error = self.read_reply(cookie)?;
        Ok(if error == 0 { Ok(()) } else { Err(error) })
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Reply<Vec<u8>>> {
        let cookie = self.send_request(0, CMD_READ, offset, len, &[])?;
        let error = self.read_reply(cookie)?;
        if error != 0 {
            return Ok(Err(error));
        }
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(Ok(buf))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<Reply<()>> {
        self.simple(flags, CMD_WRITE, offset, data.len() as u32, data)
    }

    pub fn flush(&mut self) -> io::Result<Reply<()>> {
        self.simple(0, CMD_FLUSH, 0, 0, &[])
    }

    pub fn trim(&mut self, offset: u64, len: u32, flags: u16) -> io::Result<Reply<()>> {
        self.simple(flags, CMD_TRIM, offset, len, &[])
    }

    pub fn zero(&mut self, offset: u64, len: u32, flags: u16) -> io::Result<Reply<()>> {
        self.simple(flags, CMD_WRITE_ZEROES, offset, len, &[])
    }

    pub fn cache(&mut self, offset: u64, len: u32) -> io::Result<Reply<()>> {
        self.simple(0, CMD_CACHE, offset, len, &[])
    }

    /// Reads the whole export (in `chunk`-byte requests), or the first error.
    pub fn read_all(&mut self, chunk: u32) -> io::Result<Reply<Vec<u8>>> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut off = 0u64;
        while off < self.size {
            let n = (self.size - off).min(u64::from(chunk)) as u32;
            match self.read(off, n)? {
                Ok(buf) => out.extend_from_slice(&buf),
                Err(e) => return Ok(Err(e)),
            }
            off += u64::from(n);
        }
        Ok(Ok(out))
    }

    /// NBD_CMD_DISC, then closes the socket.
    pub fn disconnect(mut self) {
        let _ = self.send_request(0, CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Unwraps the socket level of a request result, panicking with `what` if the
/// connection broke (the server died or dropped us).
#[track_caller]
pub fn ok_io<T>(result: io::Result<T>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: the connection broke: {e}"))
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn valgrind_enabled() -> bool {
    common::valgrind_enabled()
}

/// Words in nbdkit's stderr that mean the filter or the server went wrong, whatever
/// the client saw.
pub const BAD_LOG_MARKERS: &[&str] = &[
    "panicked",
    "Assertion",
    "assertion failed",
    "SIGSEGV",
    "Segmentation fault",
    "internal error",
    "stack overflow",
    "double free or corruption",
    "malloc(): ",
    "free(): invalid",
    "core dumped",
];

/// What became of a server started with [`Srv::start_or_stop`].
pub enum Started {
    /// nbdkit serves: it greeted a connection.
    Serving(Srv),
    /// nbdkit stopped at start the way a failed `.after_fork` stops it (a bad image
    /// or path): exit status 1, an error in its log, no crash. Its log.
    Stopped(String),
}

/// A background `nbdkit -f -U SOCKET [--filter=ours] ...` (optionally under valgrind).
pub struct Srv {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    valgrind_logs: common::ValgrindLogs,
    description: String,
}

impl Srv {
    /// Starts nbdkit with our filter first (outermost), then `plugin_args` (further
    /// filters, the plugin and parameters), and waits for its socket.
    pub fn start(dir: &Path, options: &[&str], plugin_args: &[&str]) -> Srv {
        Self::try_start(dir, options, plugin_args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(dir: &Path, options: &[&str], plugin_args: &[&str]) -> Result<Srv, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let socket = dir.join(format!("h{n}.sock"));
        let log = dir.join(format!("h{n}.log"));
        let log_file = File::create(&log).unwrap();
        let mut nbdkit = common::Nbdkit::serve_on(&socket)
            .options(options)
            // Memcheck tells where an uninitialised value came from; a plugin's forks
            // (the eval plugin's scripts) are not checked.
            .valgrind_options(&["--track-origins=yes", "--child-silent-after-fork=yes"]);
        // EXT2FILTER_HARDENING_DEBUG=1: nbdkit's debug output and the filter's map
        // changes in the server logs (kept with EXT2FILTER_TEST_KEEP=1).
        if env::var_os("EXT2FILTER_HARDENING_DEBUG").is_some() {
            nbdkit = nbdkit.options(&["-v", "-D", "ext2.map=1"]);
        }
        let (mut cmd, valgrind_logs) = nbdkit.plugin(plugin_args).command();
        let description = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {description}: {e}"))?;
        let mut srv = Srv {
            child: Some(child),
            socket,
            log,
            valgrind_logs,
            description,
        };
        let started = Instant::now();
        let limit = if valgrind_enabled() { 600 } else { 30 };
        while !srv.socket.exists() {
            if !srv.is_running() {
                return Err(format!(
                    "nbdkit exited before creating its socket: {}\n{}",
                    srv.description,
                    srv.log()
                ));
            }
            if started.elapsed() > Duration::from_secs(limit) {
                return Err(format!(
                    "nbdkit did not create its socket in {limit} s: {}",
                    srv.description
                ));
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(srv)
    }

    /// Starts nbdkit as [`Srv::start`] does and waits until it serves (it greets a
    /// connection, which it does only after `.after_fork`) or has stopped at start
    /// ([`Started::Stopped`]); `Err` if it did anything else (crashed, exited
    /// otherwise, a memcheck error).
    pub fn start_or_stop(
        dir: &Path,
        options: &[&str],
        plugin_args: &[&str],
    ) -> Result<Started, String> {
        let mut srv = Self::try_start(dir, options, plugin_args)?;
        if srv.greets() {
            return Ok(Started::Serving(srv));
        }
        srv.stopped_at_start().map(Started::Stopped)
    }

    /// Whether nbdkit accepts a connection and sends the NBD greeting. The probe
    /// connection is closed at once; nbdkit logs nothing for it.
    fn greets(&mut self) -> bool {
        let started = Instant::now();
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(io_timeout()));
                    let mut magic = [0u8; 8];
                    return stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC";
                }
                // The socket exists a moment before nbdkit listens on it.
                Err(_) if self.is_running() && started.elapsed() < io_timeout() => {
                    thread::sleep(Duration::from_millis(2))
                }
                Err(_) => return false,
            }
        }
    }

    /// `Ok(log)` if nbdkit exits (soon) the way a failed `.after_fork` stops it.
    fn stopped_at_start(&mut self) -> Result<String, String> {
        let limit = Duration::from_secs(if valgrind_enabled() { 600 } else { 30 });
        let mut child = self.child.take().ok_or("the server was already stopped")?;
        let status = common::wait_or_kill(&mut child, limit).ok_or_else(|| {
            format!(
                "nbdkit neither served nor stopped within {limit:?}: {}\n{}",
                self.description,
                tail(&self.log(), 6000)
            )
        })?;
        let log = self.log();
        if status.code() != Some(1) || !log.contains("error:") {
            return Err(format!(
                "nbdkit stopped at start with {status} and no message: {}\n{}",
                self.description,
                tail(&log, 6000)
            ));
        }
        if let Some(line) = self.bad_log_line() {
            return Err(format!(
                "nbdkit's log shows a failure: {line}\n--- log ---\n{}",
                tail(&log, 6000)
            ));
        }
        if let Some(report) = self.valgrind_report() {
            return Err(report);
        }
        Ok(log)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// URI for libnbd clients (`nbdsh`, `nbdcopy`) of export `name`.
    pub fn uri(&self, name: &str) -> String {
        let mut enc = String::new();
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        format!("nbd+unix:///{enc}?socket={}", self.socket.display())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().expect("try_wait").is_none(),
        }
    }

    /// The first line of the log showing a crash, panic or assertion, if any.
    pub fn bad_log_line(&self) -> Option<String> {
        let log = self.log();
        log.lines()
            .find(|line| BAD_LOG_MARKERS.iter().any(|m| line.contains(m)))
            .map(str::to_string)
    }

    /// `Err` (with the log) unless the server still runs and its log shows no crash.
    pub fn check_alive(&mut self, context: &str) -> Result<(), String> {
        if !self.is_running() {
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            return Err(format!(
                "{context}: nbdkit is no longer running ({status:?})\n--- log ---\n{}",
                tail(&self.log(), 6000)
            ));
        }
        if let Some(line) = self.bad_log_line() {
            return Err(format!(
                "{context}: nbdkit's log shows a failure: {line}\n--- log ---\n{}",
                tail(&self.log(), 6000)
            ));
        }
        Ok(())
    }

    #[track_caller]
    pub fn assert_alive(&mut self, context: &str) {
        if let Err(e) = self.check_alive(context) {
            panic!("{e}");
        }
    }

    /// SIGTERM and wait (up to `limit`); the exit status, or Err on timeout (the server
    /// is then killed).
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("server already stopped".into());
        };
        let _ = run("kill", &["-TERM", &child.id().to_string()]);
        common::wait_or_kill(&mut child, limit).ok_or_else(|| {
            format!(
                "nbdkit did not exit within {limit:?} of SIGTERM\n{}",
                tail(&self.log(), 6000)
            )
        })
    }

    /// Stops the server with SIGTERM (it closes the filesystem and the plugin): `Err`
    /// unless it exits 0 in time with a clean log and, under valgrind, no memcheck
    /// errors.
    pub fn check_stop(&mut self) -> Result<(), String> {
        let limit = Duration::from_secs(if valgrind_enabled() { 600 } else { 60 });
        if let Some(pid) = self.pid() {
            common::valgrind_wait_for_connections(pid);
        }
        let status = self.terminate(limit)?;
        if !status.success() {
            return Err(format!(
                "nbdkit exited with {status} after SIGTERM\n--- log ---\n{}{}",
                tail(&self.log(), 6000),
                self.valgrind_report().unwrap_or_default()
            ));
        }
        if let Some(line) = self.bad_log_line() {
            return Err(format!(
                "nbdkit's log shows a failure: {line}\n--- log ---\n{}",
                tail(&self.log(), 6000)
            ));
        }
        if let Some(report) = self.valgrind_report() {
            return Err(report);
        }
        Ok(())
    }

    #[track_caller]
    pub fn stop(&mut self) {
        if let Err(e) = self.check_stop() {
            panic!("{e}");
        }
    }

    /// `kill -9`: no cleanup, no final flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Memcheck's complaints, if it ran and found any.
    pub fn valgrind_report(&self) -> Option<String> {
        let problems: Vec<String> = self
            .valgrind_logs
            .paths()
            .iter()
            .filter_map(|path| {
                let text = fs::read_to_string(path).ok()?;
                valgrind_problems(&text).map(|p| format!("valgrind ({}):\n{p}", path.display()))
            })
            .collect();
        (!problems.is_empty()).then(|| problems.join("\n"))
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Memcheck's error records and the summary line, if the log reports any error or a
/// definite leak.
pub fn valgrind_problems(text: &str) -> Option<String> {
    common::valgrind_log_problems(text).map(|_| tail(text, 20_000))
}

pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &text[cut..])
}

/// nbdkit arguments for serving `image` with the file plugin and our filter.
pub fn file_plugin(image: &Path, ext2file: &str) -> Vec<String> {
    vec![
        "file".into(),
        image.to_str().unwrap().into(),
        format!("ext2file={ext2file}"),
    ]
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------
// Reproducible images and where their metadata lives
// ---------------------------------------------------------------------------------------

pub const FIXED_UUID: &str = "6a1d52b0-3c4e-4f1a-9d2b-7e5c8f90a1b2";
pub const FIXED_TIME: &str = "1600000000";

/// One thing to put into a reproducible image.
#[derive(Clone, Debug)]
pub enum Item {
    File(&'static str, Vec<u8>),
    /// (path, size, pieces of data)
    Sparse(&'static str, u64, Vec<(u64, Vec<u8>)>),
    Dir(&'static str),
    Symlink(&'static str, &'static str),
    Fifo(&'static str),
}

/// Builds an image with `mke2fs -d` whose bytes depend only on the arguments: fixed
/// UUID, hash seed and times (`E2FSPROGS_FAKE_TIME`, inode times reset with debugfs),
/// then runs `debugfs_cmds` (e.g. `punch` to fragment a file), also at the fixed time.
pub fn det_image(
    dir: &Path,
    name: &str,
    mkfs: &[&str],
    size_kib: u64,
    items: &[Item],
    debugfs_cmds: &[String],
) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).unwrap();
    let mut paths: Vec<&str> = Vec::new();
    for item in items {
        let p = |path: &str| -> PathBuf {
            let full = src.join(path.trim_start_matches('/'));
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            full
        };
        match item {
            Item::File(path, data) => {
                fs::write(p(path), data).unwrap();
                paths.push(path);
            }
            Item::Sparse(path, size, pieces) => {
                use std::io::{Seek, SeekFrom};
                let mut f = File::create(p(path)).unwrap();
                f.set_len(*size).unwrap();
                for (off, data) in pieces {
                    f.seek(SeekFrom::Start(*off)).unwrap();
                    f.write_all(data).unwrap();
                }
                paths.push(path);
            }
            Item::Dir(path) => {
                fs::create_dir_all(p(path)).unwrap();
                paths.push(path);
            }
            Item::Symlink(path, target) => {
                std::os::unix::fs::symlink(target, p(path)).unwrap();
                paths.push(path);
            }
            Item::Fifo(path) => {
                run("mkfifo", &[p(path).to_str().unwrap()]).assert_success();
                paths.push(path);
            }
        }
    }
    // Parent directories created implicitly need fixed times too.
    let mut all: Vec<String> = vec!["/".into()];
    for path in &paths {
        let mut acc = String::new();
        for part in path.trim_start_matches('/').split('/') {
            acc.push('/');
            acc.push_str(part);
            if !all.contains(&acc) {
                all.push(acc.clone());
            }
        }
    }
    let image = dir.join(name);
    let size = format!("{size_kib}k");
    let mut cmd = common::command("mke2fs");
    cmd.env("E2FSPROGS_FAKE_TIME", FIXED_TIME);
    cmd.args(["-q", "-F", "-U", FIXED_UUID, "-E"]);
    cmd.arg(format!("hash_seed={FIXED_UUID}"));
    cmd.args(mkfs);
    cmd.args(["-d", src.to_str().unwrap(), image.to_str().unwrap(), &size]);
    run_command(cmd, &[]).assert_success();
    let mut script = String::new();
    for cmd in debugfs_cmds {
        script.push_str(cmd);
        script.push('\n');
    }
    for path in all
        .iter()
        .chain(std::iter::once(&"/lost+found".to_string()))
    {
        for field in ["ctime", "atime", "mtime", "crtime"] {
            script.push_str(&format!("sif {path} {field} {FIXED_TIME}\n"));
        }
    }
    let mut cmd = common::command("debugfs");
    cmd.env("E2FSPROGS_FAKE_TIME", FIXED_TIME);
    cmd.args(["-w", "-f", "-", image.to_str().unwrap()]);
    let out = run_command(cmd, script.as_bytes());
    out.assert_success();
    let _ = fs::remove_dir_all(&src);
    image
}

/// Block groups' metadata, from `dumpe2fs`.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub superblock: Option<u64>,
    pub descriptors: Option<Range<u64>>,
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: Range<u64>,
}

/// Where an image keeps its metadata.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub block_size: u64,
    pub blocks_count: u64,
    pub inode_size: u64,
    pub groups: Vec<Group>,
    pub journal_inode: Option<u64>,
}

fn parse_range(text: &str) -> Option<Range<u64>> {
    let text = text.trim().trim_end_matches(',');
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text, text),
    };
    Some(a.parse().ok()?..b.parse::<u64>().ok()? + 1)
}

impl Layout {
    pub fn of(image: &Path) -> Layout {
        let out = run("dumpe2fs", &[image.to_str().unwrap()]);
        out.assert_success();
        let text = out.stdout_text();
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let mut layout = Layout {
            block_size: field("Block size:").expect("block size"),
            blocks_count: field("Block count:").expect("block count"),
            inode_size: field("Inode size:").unwrap_or(128),
            groups: Vec::new(),
            journal_inode: field("Journal inode:"),
        };
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("Group ") && line.contains("(Blocks") {
                layout.groups.push(Group::default());
                continue;
            }
            let Some(g) = layout.groups.last_mut() else {
                continue;
            };
            for part in line.split(", ") {
                let part = part.trim();
                if let Some(rest) = part
                    .strip_prefix("Primary superblock at ")
                    .or_else(|| part.strip_prefix("Backup superblock at "))
                {
                    g.superblock = rest.split_whitespace().next().and_then(|v| v.parse().ok());
                } else if let Some(rest) = part.strip_prefix("Group descriptors at ") {
                    g.descriptors = parse_range(rest.split_whitespace().next().unwrap_or(""));
                } else if let Some(rest) = part.strip_prefix("Block bitmap at ") {
                    g.block_bitmap = rest.split_whitespace().next().unwrap().parse().unwrap();
                } else if let Some(rest) = part.strip_prefix("Inode bitmap at ") {
                    g.inode_bitmap = rest.split_whitespace().next().unwrap().parse().unwrap();
                } else if let Some(rest) = part.strip_prefix("Inode table at ") {
                    g.inode_table = parse_range(rest.split_whitespace().next().unwrap()).unwrap();
                }
            }
        }
        layout
    }
}

/// The inode number of `path` and the byte offset of its on-disk inode in the image.
pub fn inode_location(image: &Path, path: &str) -> (u64, u64) {
    let out = run(
        "debugfs",
        &["-R", &format!("imap {path}"), image.to_str().unwrap()],
    );
    out.assert_success();
    let text = out.stdout_text();
    // "Inode 14 is part of block group 0\n\tlocated at block 68, offset 0x0100"
    let ino: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("debugfs imap {path}: {text}"));
    let block: u64 = text
        .split("located at block ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("debugfs imap {path}: {text}"));
    let offset = text
        .split("offset 0x")
        .nth(1)
        .and_then(|r| u64::from_str_radix(r.trim(), 16).ok())
        .unwrap_or_else(|| panic!("debugfs imap {path}: {text}"));
    let bs = Layout::block_size_of(image);
    (ino, block * bs + offset)
}

impl Layout {
    pub fn block_size_of(image: &Path) -> u64 {
        let out = run("dumpe2fs", &["-h", image.to_str().unwrap()]);
        out.stdout_text()
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("block size")
    }
}

/// The mapping blocks of a file as debugfs `stat` names them: `ETB0`, `ETB1` (extent
/// tree nodes), `IND`, `DIND`, `TIND` (indirect blocks), with their block numbers.
pub fn mapping_blocks(image: &Path, path: &str) -> Vec<(String, u64)> {
    let text = common::debugfs(image, &format!("stat {path}"));
    let mut out = Vec::new();
    for token in text.split(|c: char| c == ',' || c.is_whitespace()) {
        let Some(rest) = token.strip_prefix('(') else {
            continue;
        };
        let Some((kind, block)) = rest.split_once("):") else {
            continue;
        };
        if kind.starts_with(|c: char| c.is_ascii_alphabetic()) {
            if let Some(r) = parse_range(block) {
                for b in r {
                    out.push((kind.to_string(), b));
                }
            }
        }
    }
    out
}

/// The data blocks of a directory (or any file), in logical order.
pub fn data_blocks(image: &Path, path: &str) -> Vec<u64> {
    common::debugfs_mapping(image, path)
        .iter()
        .flat_map(|r| r.physical..r.physical + r.count)
        .collect()
}

/// Copies `from` over `to` (e.g. to repair a damaged image under a running server,
/// which opens the filesystem lazily and retries a failed open on the next connection).
pub fn restore(from: &Path, to: &Path) {
    let bytes = fs::read(from).unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(false)
        .open(to)
        .unwrap();
    f.write_all(&bytes).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    f.sync_all().unwrap();
}

/// A scratch directory for one test.
pub fn test_dir(name: &str) -> TestDir {
    TestDir::new(name)
}

/// The number of seconds a stress loop runs: `EXT2FILTER_STRESS_SECS`, else `default`.
pub fn stress_secs(default: u64) -> Duration {
    Duration::from_secs(
        env::var("EXT2FILTER_STRESS_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

// ---------------------------------------------------------------------------------------
// What a file should hold
// ---------------------------------------------------------------------------------------

/// The expected contents of a file, byte by byte: known, or unknown (a write that
/// failed may have landed in part).
#[derive(Clone, Debug)]
pub struct ByteModel {
    bytes: Vec<u8>,
    unknown: Vec<bool>,
}

impl ByteModel {
    pub fn new(initial: Vec<u8>) -> ByteModel {
        let n = initial.len();
        ByteModel {
            bytes: initial,
            unknown: vec![false; n],
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.unknown[at..at + data.len()].fill(false);
    }

    /// The byte at `at`, if known.
    pub fn known_at(&self, at: usize) -> Option<u8> {
        (!self.unknown[at]).then(|| self.bytes[at])
    }

    pub fn forget(&mut self, offset: u64, len: usize) {
        let at = offset as usize;
        self.unknown[at..at + len].fill(true);
    }

    /// `Err` describing the first differences of `actual` from the known bytes.
    pub fn check(&self, actual: &[u8], what: &str) -> Result<(), String> {
        if actual.len() != self.bytes.len() {
            return Err(format!(
                "{what}: {} bytes, expected {}",
                actual.len(),
                self.bytes.len()
            ));
        }
        let bad: Vec<usize> = (0..actual.len())
            .filter(|&i| !self.unknown[i] && actual[i] != self.bytes[i])
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{what}: {} bytes differ; first at {} (actual {:02x?}, expected {:02x?}), last at {}",
            bad.len(),
            bad[0],
            &actual[bad[0]..(bad[0] + 8).min(actual.len())],
            &self.bytes[bad[0]..(bad[0] + 8).min(actual.len())],
            bad[bad.len() - 1]
        ))
    }
}

/// `e2fsck -fn`'s verdict: Ok, or its output.
pub fn e2fsck(image: &Path) -> Result<(), String> {
    let out = run("e2fsck", &["-fn", image.to_str().unwrap()]);
    if out.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} ({}):\n{}{}",
            image.display(),
            out.status,
            out.stdout_text(),
            out.stderr
        ))
    }
}

/// `touch`/`rm` of an error-filter trigger file.
pub fn set_trigger(path: &Path, on: bool) {
    if on {
        fs::write(path, b"").unwrap();
    } else {
        let _ = fs::remove_file(path);
    }
}
