//! A small async client of QMP, QEMU's JSON machine protocol, over a unix socket.
//!
//! One command at a time: [`Qmp::execute`] writes a command tagged with an
//! `id` and reads messages until the reply with that id. Asynchronous events
//! that arrive meanwhile (any name, known or not) are kept in arrival order
//! for [`Qmp::drain_events`] / [`Qmp::wait_event`]. Replies carrying a stale id
//! (from a command whose caller gave up) are logged and skipped.
//!
//! QEMU serves one QMP client per socket at a time: a second client connects
//! but gets no greeting until the first one disconnects, which [`Qmp::connect`]
//! reports as a timeout.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stasis_core::clock::{mono_ns, wait_until, MonoNs};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Longest a single command may take before [`QmpError::Timeout`], unless changed
/// with [`Qmp::set_command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest to wait for QEMU's greeting after connecting.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept before the oldest are dropped (a client that never drains them).
pub const MAX_KEPT_EVENTS: usize = 10_000;
/// The longest QMP line (one message) read from QEMU; a longer one is
/// [`QmpError::LineTooLong`] and never buffered whole. Replies stasis asks for
/// are small; the largest QMP reply there is, `query-qmp-schema`, is ~200 KiB.
pub const MAX_LINE: usize = 1 << 20;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8192;

/// The two host instants around a command: just before the command was
/// written, and just after its reply was read. The command took effect in QEMU
/// somewhere within `[sent, replied]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub sent: MonoNs,
    pub replied: MonoNs,
}

impl Stamp {
    /// Width of the uncertainty window.
    pub fn round_trip_ns(&self) -> u64 {
        self.replied.saturating_sub(self.sent)
    }
    /// Middle of the window: the best single estimate of when it took effect.
    pub fn midpoint(&self) -> MonoNs {
        self.sent + self.round_trip_ns() / 2
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, … or anything newer.
    pub name: String,
    /// The event's `data` member (`Null` if absent).
    pub data: Value,
    /// QEMU's own timestamp: host wall-clock microseconds since the epoch.
    pub qemu_time_us: Option<u64>,
    /// When this client read it, on the host monotonic clock.
    pub received: MonoNs,
}

/// Errors of QMP operations.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket I/O")]
    Io(#[from] io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// QEMU sent a line longer than `cap` bytes (a broken or hostile QEMU);
    /// the session is unusable after it.
    #[error("QMP line longer than {cap} bytes")]
    LineTooLong { cap: usize },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read but not yet split into messages; never more than
    /// [`MAX_LINE`] + 1 without a newline.
    buf: Vec<u8>,
    /// Prefix of `buf` already searched for a newline.
    scanned: usize,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    greeting: Value,
    command_timeout: Duration,
}

impl Qmp {
    /// Connect, read the greeting, and leave negotiation mode (`qmp_capabilities`).
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::connect_with_timeout(path, GREETING_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with a chosen wait for the greeting (which
    /// never comes while another client holds the socket).
    pub async fn connect_with_timeout(path: &Path, greeting_timeout: Duration) -> Result<Qmp, QmpError> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let mut qmp = Qmp::over(stream, path);
        let greeting = tokio::time::timeout(greeting_timeout, qmp.read_message()).await.map_err(|_| {
            QmpError::Timeout(format!("the QMP greeting on {} (is another client connected?)", path.display()))
        })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected a greeting, got {greeting}")));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None).await?;
        tracing::debug!(path = %path.display(), "QMP connected");
        Ok(qmp)
    }

    /// A session on `stream` before the greeting.
    fn over(stream: UnixStream, path: &Path) -> Qmp {
        Qmp {
            stream,
            path: path.to_owned(),
            buf: Vec::with_capacity(4096),
            scanned: 0,
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// The socket this session is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's greeting (`{"QMP": {"version": …, "capabilities": …}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Change how long [`execute`](Self::execute) waits for a reply.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Run a command and return its `return` value. A QMP error reply becomes
    /// [`QmpError::Command`].
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timed(cmd, args).await.map(|(v, _)| v)
    }

    /// Like [`execute`](Self::execute), and also the instants around it.
    pub async fn execute_timed(&mut self, cmd: &str, args: Option<Value>) -> Result<(Value, Stamp), QmpError> {
        let (id, line) = self.command_line(cmd, args);
        let sent = mono_ns();
        self.stream.write_all(&line).await?;
        self.await_reply(cmd, id, sent).await
    }

    /// Like [`execute_timed`](Self::execute_timed), but the command goes out
    /// at the host monotonic instant `send_at`: a thread of its own sleeps,
    /// then spins, to that instant and writes the ready-made command line
    /// through a duplicate of the socket, while this task only awaits the
    /// reply. Several sessions' commands (one per VM) therefore leave at
    /// their own instants, µs-exact, without one waiting for another's task
    /// or reply. `Stamp::sent` is the instant the write began.
    pub async fn execute_at(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        send_at: MonoNs,
    ) -> Result<(Value, Stamp), QmpError> {
        let (id, line) = self.command_line(cmd, args);
        // SAFETY: dup(2) of the socket this session owns and keeps open; the
        // new descriptor is owned by the OwnedFd below and closed by it, so
        // the writer thread never touches a descriptor that might be closed
        // or reused, even if this future is dropped before it runs.
        let fd = unsafe { libc::dup(self.stream.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let writer = tokio::task::spawn_blocking(move || -> io::Result<MonoNs> {
            // A real-time thread wakes at its instant even when every host
            // CPU is busy; best effort (needs CAP_SYS_NICE), and undone
            // before the pool thread goes back to ordinary blocking work.
            let rt = RealTime::enter();
            wait_until(send_at);
            let sent = mono_ns();
            let r = write_all_fd(fd.as_raw_fd(), &line);
            drop(rt);
            r.map(|()| sent)
        });
        let sent = writer.await.map_err(|e| QmpError::Io(io::Error::other(format!("QMP writer thread: {e}"))))??;
        self.await_reply(cmd, id, sent).await
    }

    /// Run a command with a file descriptor attached (SCM_RIGHTS), as `getfd`
    /// and `add-fd` need. QEMU receives its own duplicate; the caller keeps `fd`.
    pub async fn execute_with_fd(&mut self, cmd: &str, args: Option<Value>, fd: RawFd) -> Result<Value, QmpError> {
        let (id, line) = self.command_line(cmd, args);
        let sent = mono_ns();
        let written = loop {
            self.stream.writable().await?;
            match self.stream.try_io(Interest::WRITABLE, || send_with_fd(self.stream.as_raw_fd(), &line, fd)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if written < line.len() {
            self.stream.write_all(&line[written..]).await?;
        }
        self.await_reply(cmd, id, sent).await.map(|(v, _)| v)
    }

    /// Every event seen so far and not yet taken, oldest first.
    pub fn drain_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// The first event named `name`: one already kept, or the next to arrive
    /// within `timeout`. Other events arriving meanwhile are kept.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(i).expect("index just found"));
        }
        let wait = async {
            loop {
                let msg = self.read_message().await?;
                if let Some(ev) = parse_event(&msg) {
                    if ev.name == name {
                        return Ok(ev);
                    }
                    self.keep_event(ev);
                } else {
                    tracing::warn!(%msg, "QMP reply with no command waiting; skipped");
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| QmpError::Timeout(format!("QMP event {name}")))?
    }

    fn command_line(&mut self, cmd: &str, args: Option<Value>) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value always serialises");
        line.push(b'\n');
        (id, line)
    }

    async fn await_reply(&mut self, cmd: &str, id: u64, sent: MonoNs) -> Result<(Value, Stamp), QmpError> {
        let timeout = self.command_timeout;
        let wait = async {
            loop {
                let msg = self.read_message().await?;
                let replied = mono_ns();
                if let Some(ev) = parse_event(&msg) {
                    self.keep_event(ev);
                    continue;
                }
                if msg.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::warn!(%msg, expected = id, "QMP reply to another command; skipped");
                    continue;
                }
                let stamp = Stamp { sent, replied };
                if let Some(ret) = msg.get("return") {
                    return Ok((ret.clone(), stamp));
                }
                if let Some(err) = msg.get("error") {
                    let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(QmpError::Command {
                        command: cmd.to_owned(),
                        class: field("class"),
                        desc: field("desc"),
                    });
                }
                return Err(QmpError::Protocol(format!("reply with neither return nor error: {msg}")));
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout(format!("the reply to QMP command {cmd}")))?
    }

    fn keep_event(&mut self, ev: QmpEvent) {
        tracing::trace!(event = %ev.name, "QMP event");
        if self.events.len() >= MAX_KEPT_EVENTS {
            let dropped = self.events.pop_front();
            tracing::debug!(?dropped, "too many undrained QMP events; dropped the oldest");
        }
        self.events.push_back(ev);
    }

    /// Next JSON message. Cancel-safe: bytes read stay in `self.buf`.
    /// Reads only as far as a line may reach, so a QEMU that never ends a
    /// line makes this fail at [`MAX_LINE`] instead of growing the buffer.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=self.scanned + at).collect();
                self.scanned = 0;
                let text = trim_ascii(&line);
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text).map_err(|e| {
                    let shown = &text[..text.len().min(256)];
                    QmpError::Protocol(format!("bad JSON ({e}): {}", String::from_utf8_lossy(shown)))
                });
            }
            self.scanned = self.buf.len();
            // The line so far, without its newline, is all of `buf`.
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::LineTooLong { cap: MAX_LINE });
            }
            let mut chunk = [0u8; READ_CHUNK];
            let room = (MAX_LINE + 1 - self.buf.len()).min(READ_CHUNK);
            let n = self.stream.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

/// An event message, or `None` for anything else (replies).
fn parse_event(msg: &Value) -> Option<QmpEvent> {
    let name = msg.get("event")?.as_str()?.to_owned();
    let qemu_time_us = msg.get("timestamp").and_then(|t| {
        let s = t.get("seconds")?.as_u64()?;
        let us = t.get("microseconds")?.as_u64()?;
        Some(s * 1_000_000 + us)
    });
    Some(QmpEvent { name, data: msg.get("data").cloned().unwrap_or(Value::Null), qemu_time_us, received: mono_ns() })
}

/// The calling thread in `SCHED_FIFO` (priority 1) until dropped, if allowed.
struct RealTime(Option<(libc::c_int, libc::sched_param)>);

impl RealTime {
    fn enter() -> RealTime {
        // SAFETY: pthread scheduling calls on the calling thread, with valid
        // pointers to locals.
        unsafe {
            let me = libc::pthread_self();
            let mut policy = 0;
            let mut old = libc::sched_param { sched_priority: 0 };
            if libc::pthread_getschedparam(me, &mut policy, &mut old) != 0 {
                return RealTime(None);
            }
            let param = libc::sched_param { sched_priority: 1 };
            if libc::pthread_setschedparam(me, libc::SCHED_FIFO, &param) != 0 {
                return RealTime(None);
            }
            RealTime(Some((policy, old)))
        }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if let Some((policy, old)) = self.0 {
            // SAFETY: as in `enter`, restoring what it read.
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &old) };
        }
    }
}

/// Write all of `data` to `fd` from a plain thread. The descriptor shares
/// its file description (and so O_NONBLOCK) with the session's socket: on
/// EAGAIN wait for POLLOUT and go on.
fn write_all_fd(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is a live slice; `fd` is an open descriptor owned by the caller.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd, count 1.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg` of `data` with `fd` attached as SCM_RIGHTS; returns bytes sent.
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> io::Result<usize> {
    const FD_SIZE: u32 = std::mem::size_of::<RawFd>() as u32;
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_SIZE) } as usize;
    assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `control`, which is at least `space` bytes
    // and aligned, so CMSG_FIRSTHDR returns a valid header pointer into it, and
    // CMSG_DATA points inside it with room for one descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_SIZE) as _;
        std::ptr::copy_nonoverlapping(&fd as *const RawFd as *const u8, libc::CMSG_DATA(cmsg), FD_SIZE as usize);
    }
    // SAFETY: `msg` and everything it points to (iov, data, control) live until
    // sendmsg returns; `sock` is an open socket.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_with_and_without_data() {
        let ev = parse_event(&json!({"event": "STOP", "timestamp": {"seconds": 2, "microseconds": 5}})).unwrap();
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.data, Value::Null);
        assert_eq!(ev.qemu_time_us, Some(2_000_005));
        let ev = parse_event(&json!({"event": "SOMETHING_NEW", "data": {"x": 1}})).unwrap();
        assert_eq!(ev.data["x"], 1);
        assert!(parse_event(&json!({"return": {}, "id": 3})).is_none());
    }

    #[test]
    fn trim_handles_crlf_and_blank() {
        assert_eq!(trim_ascii(b" {}\r\n"), b"{}");
        assert_eq!(trim_ascii(b"\r\n"), b"");
    }

    /// A fake QEMU on the other end of a socket pair writing `bytes`.
    fn peer(bytes: Vec<u8>) -> (Qmp, tokio::task::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            let mut theirs = theirs;
            // The client gives up part-way through a hostile line: EPIPE then.
            let _ = theirs.write_all(&bytes).await;
        });
        (Qmp::over(ours, Path::new("fake")), writer)
    }

    #[tokio::test]
    async fn a_line_longer_than_the_cap_is_refused_without_buffering_it() {
        // 3 MiB and no newline, then the peer closes: before the cap this was
        // buffered whole and reported as a closed connection.
        let (mut qmp, writer) = peer(vec![b'a'; 3 << 20]);
        match qmp.read_message().await {
            Err(QmpError::LineTooLong { cap }) => assert_eq!(cap, MAX_LINE),
            other => panic!("expected LineTooLong, got {other:?}"),
        }
        assert!(qmp.buf.len() <= MAX_LINE + 1, "buffered {} bytes", qmp.buf.len());
        assert!(QmpError::LineTooLong { cap: MAX_LINE }.to_string().contains("1048576"));
        drop(qmp);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_cap_and_the_messages_after_it_are_read() {
        let head = br#"{"event": "BIG", "data": ""#;
        let tail = br#""}"#;
        let mut line = head.to_vec();
        line.resize(MAX_LINE - tail.len(), b'x');
        line.extend_from_slice(tail);
        assert_eq!(line.len(), MAX_LINE);
        line.extend_from_slice(b"\n{\"return\": {}, \"id\": 1}\r\n");
        let (mut qmp, writer) = peer(line);
        let big = qmp.read_message().await.unwrap();
        assert_eq!(big["event"], "BIG");
        assert_eq!(big["data"].as_str().unwrap().len(), MAX_LINE - head.len() - tail.len());
        assert_eq!(qmp.read_message().await.unwrap()["id"], 1);
        writer.await.unwrap();
        assert!(matches!(qmp.read_message().await, Err(QmpError::Closed)));
    }

    #[test]
    fn stamp_midpoint() {
        let s = Stamp { sent: 100, replied: 300 };
        assert_eq!(s.round_trip_ns(), 200);
        assert_eq!(s.midpoint(), 200);
    }
}
