//! The I/O layer: one thread, non-blocking unix sockets, `ppoll` with a
//! nanosecond timeout, then a short spin to each deadline the scheduler core
//! names. Stream ports are listening sockets a VM's QEMU (`-netdev stream`,
//! client mode) connects to; vhost-user ports are [`VhostPort`]s whose
//! events (from the port's own threads) are queued and wake the loop through
//! a socket pair. The control socket is bound last, so its existence means
//! "ready".

use crate::config::{PortKind, Topology};
use crate::control::{PortThawReport, Request, SaveReport};
use crate::events::EventLog;
use crate::frame::{encode_into, FrameDecoder, FrameError, PREFIX};
use crate::pcap::PcapWriter;
use crate::sched::{Action, PortId, Scheduler};
use crate::state::NodeState;
use serde_json::json;
use stasis_core::clock::{mono_ns, MonoNs};
use stasis_vhost_user::{PortEvent, VhostPort};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Deadlines closer than this are spun for rather than slept for.
const SPIN_NS: u64 = 200_000;
/// Start offset of an output entry that is the rest of a partly written frame.
const PARTIAL: usize = usize::MAX;
/// Bytes read from one connection per loop iteration (fairness between ports).
const READ_BUDGET: usize = 1 << 20;

/// Why the node cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the events file")]
    Events(#[source] std::io::Error),
    #[error("cannot restore the saved state")]
    Restore(#[from] crate::sched::RestoreError),
    #[error("poll failed")]
    Poll(#[source] std::io::Error),
    #[error("cannot serve vhost-user port {path}")]
    Vhost {
        path: PathBuf,
        #[source]
        source: stasis_vhost_user::VhostError,
    },
    #[error("cannot create the wake-up socket pair")]
    Wake(#[source] std::io::Error),
    #[error("cannot confine the node's files to {path}")]
    Confine {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A stream port's listening socket: unix, or TCP for a VM on another host
/// (with the one address it accepts connections from).
enum PortListener {
    Unix(UnixListener),
    Tcp(std::net::TcpListener, std::net::IpAddr),
}

/// A connection a TCP port refused: it came from another address than the
/// VM's host.
struct Refused(std::net::SocketAddr);

impl PortListener {
    fn as_raw_fd(&self) -> i32 {
        match self {
            PortListener::Unix(l) => l.as_raw_fd(),
            PortListener::Tcp(l, _) => l.as_raw_fd(),
        }
    }

    /// The next connection; `Ok(Err(_))` for one refused (and already closed).
    fn accept(&self) -> std::io::Result<Result<PortStream, Refused>> {
        match self {
            PortListener::Unix(l) => l.accept().map(|(s, _)| Ok(PortStream::Unix(s))),
            PortListener::Tcp(l, allowed) => {
                let (s, peer) = l.accept()?;
                if peer.ip() != *allowed {
                    // Dropping `s` closes it before a byte is read.
                    return Ok(Err(Refused(peer)));
                }
                tracing::debug!(%peer, "TCP port connection");
                // Frames are latency-sensitive: no Nagle batching.
                s.set_nodelay(true)?;
                Ok(Ok(PortStream::Tcp(s)))
            }
        }
    }
}

/// One VM's connection to a stream port.
enum PortStream {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl PortStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            PortStream::Unix(s) => s.set_nonblocking(on),
            PortStream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    fn as_raw_fd(&self) -> i32 {
        match self {
            PortStream::Unix(s) => s.as_raw_fd(),
            PortStream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for PortStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PortStream::Unix(s) => s.read(buf),
            PortStream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for PortStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PortStream::Unix(s) => s.write(buf),
            PortStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Most bytes queued for one stream-mode VM that its QEMU has not read yet.
pub const MAX_STREAM_OUT: usize = 4 << 20;

struct Conn {
    stream: PortStream,
    dec: FrameDecoder,
    /// Encoded frames not yet (completely) written: `(start, end, due_vt)` of
    /// each in `out`; `start == PARTIAL` for the rest of a partly written frame.
    out: Vec<u8>,
    out_pos: usize,
    ends: VecDeque<(usize, usize, u64)>,
}

struct PortIo {
    path: PathBuf,
    /// Stream ports only.
    listener: Option<PortListener>,
    conn: Option<Conn>,
    pcap: Option<PcapWriter>,
    /// Vhost-user ports only.
    vhost: Option<VhostIo>,
    /// TCP ports only: connections refused (from another address than the VM's host).
    refused: u64,
}

struct VhostIo {
    port: VhostPort,
    /// Between `Started` and `Stopped` (as seen by the loop).
    running: bool,
}

/// Events of every vhost-user port, stamped when they happened, and the
/// wake-up of the node's loop (one byte per batch).
struct VhostEvents {
    queue: Mutex<Vec<(PortId, PortEvent, MonoNs)>>,
    signalled: AtomicBool,
    wake_tx: UnixStream,
}

impl VhostEvents {
    fn push(&self, port: PortId, ev: PortEvent) {
        let now = mono_ns();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push((port, ev, now));
        if !self.signalled.swap(true, Ordering::AcqRel) {
            // A full socket pair already means "wake up".
            let _ = (&self.wake_tx).write(&[1]);
        }
    }
}

enum Waiting {
    Save(PathBuf),
    Thaw(MonoNs),
    ThawPort(PortId, MonoNs),
}

struct Ctl {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    waiting: Option<Waiting>,
    closed: bool,
}

/// A delay node with its sockets bound.
pub struct Node {
    sched: Scheduler,
    ports: Vec<PortIo>,
    control_path: PathBuf,
    control: UnixListener,
    ctls: Vec<Ctl>,
    events: EventLog,
    actions: Vec<Action>,
    buf: Vec<u8>,
    shutdown: bool,
    release_err: ErrHist,
    spin_ns: Option<u64>,
    vhost_events: Arc<VhostEvents>,
    wake_rx: UnixStream,
    /// Where `save`, `pcap` and `restore` may name files (canonical
    /// directories); `None`: anywhere (a node run by hand).
    confine: Option<Vec<PathBuf>>,
}

/// Release lateness histogram: 1 µs buckets up to 10 ms.
struct ErrHist {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl ErrHist {
    const N: usize = 10_000;
    fn new() -> ErrHist {
        ErrHist { buckets: vec![0; Self::N + 1], count: 0, max: 0 }
    }
    fn record(&mut self, ns: u64) {
        self.buckets[((ns / 1000) as usize).min(Self::N)] += 1;
        self.count += 1;
        self.max = self.max.max(ns);
    }
    fn quantile(&self, q: f64) -> u64 {
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= want {
                return if i == Self::N { self.max } else { (i as u64 + 1) * 1000 };
            }
        }
        self.max
    }
    fn summary(&self) -> crate::sched::ReleaseError {
        crate::sched::ReleaseError {
            count: self.count,
            p50_ns: self.quantile(0.5),
            p99_ns: self.quantile(0.99),
            max_ns: self.max,
        }
    }
}

/// An owner-only (0600) socket at `path`, replacing a stale one from an
/// earlier run: whoever can connect can save, restore and capture the
/// experiment's traffic.
fn bind(path: &Path) -> Result<UnixListener, NodeError> {
    let l =
        stasis_core::private::bind_unix(path).map_err(|source| NodeError::Bind { path: path.to_owned(), source })?;
    l.set_nonblocking(true).map_err(|source| NodeError::Bind { path: path.to_owned(), source })?;
    Ok(l)
}

/// Listen on exactly the `ip:port` written in a TCP port's `socket`.
fn bind_tcp(addr: &Path) -> Result<std::net::TcpListener, NodeError> {
    let bad = |m: &str| NodeError::Bind {
        path: addr.to_owned(),
        source: std::io::Error::new(ErrorKind::InvalidInput, m.to_owned()),
    };
    let a: std::net::SocketAddr =
        addr.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("a TCP port needs an ip:port address"))?;
    if a.ip().is_unspecified() {
        return Err(bad("refusing a wildcard address for a TCP port: name the host's address"));
    }
    let l = std::net::TcpListener::bind(a).map_err(|source| NodeError::Bind { path: addr.to_owned(), source })?;
    l.set_nonblocking(true).map_err(|source| NodeError::Bind { path: addr.to_owned(), source })?;
    Ok(l)
}

impl Node {
    /// Bind every port, then the control socket. With `restore` the node starts frozen with the saved frames.
    pub fn bind(
        topology: &Topology,
        control: &Path,
        restore: Option<&NodeState>,
        events: Option<&Path>,
    ) -> Result<Node, NodeError> {
        // A stale control socket from a dead node would announce readiness too early.
        if let Ok(meta) = std::fs::symlink_metadata(control) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(control);
            }
        }
        let sched = match restore {
            Some(st) => Scheduler::restore(topology, st)?,
            None => Scheduler::new(topology, mono_ns()),
        };
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(NodeError::Wake)?;
        wake_rx.set_nonblocking(true).map_err(NodeError::Wake)?;
        wake_tx.set_nonblocking(true).map_err(NodeError::Wake)?;
        let vhost_events =
            Arc::new(VhostEvents { queue: Mutex::new(Vec::new()), signalled: AtomicBool::new(false), wake_tx });
        let mut sched = sched;
        let mut ports = Vec::new();
        for (i, p) in topology.ports.iter().enumerate() {
            match p.kind {
                PortKind::Stream => ports.push(PortIo {
                    path: p.socket.clone(),
                    listener: Some(PortListener::Unix(bind(&p.socket)?)),
                    conn: None,
                    pcap: None,
                    vhost: None,
                    refused: 0,
                }),
                PortKind::Tcp => ports.push(PortIo {
                    // Nothing to remove on exit.
                    path: PathBuf::new(),
                    listener: Some(PortListener::Tcp(
                        bind_tcp(&p.socket)?,
                        // Topology::validate requires it; an absent one accepts no one.
                        p.peer.unwrap_or(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
                    )),
                    conn: None,
                    pcap: None,
                    vhost: None,
                    refused: 0,
                }),
                PortKind::VhostUser => {
                    let ev = vhost_events.clone();
                    let port = VhostPort::serve(&p.socket, move |e| ev.push(i, e))
                        .map_err(|source| NodeError::Vhost { path: p.socket.clone(), source })?;
                    // Frames wait at the port until its device runs.
                    sched.set_connected(i, true);
                    sched.set_blocked(i, true);
                    ports.push(PortIo {
                        path: p.socket.clone(),
                        listener: None,
                        conn: None,
                        pcap: None,
                        vhost: Some(VhostIo { port, running: false }),
                        refused: 0,
                    });
                }
            }
        }
        let mut events = EventLog::open(events).map_err(NodeError::Events)?;
        let (in_flight, held) = sched.frame_counts();
        events.emit_now(
            "started",
            json!({ "restored": restore.is_some(), "frozen": sched.is_frozen(), "frames_in_flight": in_flight, "frames_held": held }),
        );
        let control_l = bind(control)?;
        Ok(Node {
            sched,
            ports,
            control_path: control.to_owned(),
            control: control_l,
            ctls: Vec::new(),
            events,
            actions: Vec::new(),
            buf: vec![0; 256 * 1024],
            shutdown: false,
            release_err: ErrHist::new(),
            spin_ns: None,
            vhost_events,
            wake_rx,
            confine: None,
        })
    }

    /// Spin this long before each release instead of sleeping (default 200 µs).
    /// Longer is more precise on a busy host and costs CPU.
    pub fn set_spin_ns(&mut self, ns: u64) {
        self.spin_ns = Some(ns);
    }

    /// Confine the files the control socket's `save`, `pcap` and `restore`
    /// name to `dirs` (and below): whoever can reach the socket then cannot
    /// make the node (root, on an agent) write or read elsewhere. The agent
    /// confines every node it starts to the experiment's directory.
    pub fn confine_paths(&mut self, dirs: &[PathBuf]) -> Result<(), NodeError> {
        let mut roots = Vec::new();
        for d in dirs {
            roots.push(std::fs::canonicalize(d).map_err(|source| NodeError::Confine { path: d.to_owned(), source })?);
        }
        self.confine = Some(roots);
        Ok(())
    }

    /// `path` as the control socket may use it: when the node is confined,
    /// inside one of its directories once every symlink is
    /// resolved — the file itself when it must exist (`restore`), its
    /// directory when it is to be created (`save`, `pcap`; created without
    /// following a symlink in its last component).
    fn allowed_path(&self, path: &Path, exists: bool) -> Result<PathBuf, String> {
        let Some(roots) = &self.confine else { return Ok(path.to_owned()) };
        let shown = path.display();
        // A relative path is the node's working directory's (the agent's).
        let resolved = if exists {
            std::fs::canonicalize(path).map_err(|e| format!("{shown}: {e}"))?
        } else {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(format!("{shown}: not a file path"));
            };
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            std::fs::canonicalize(dir).map_err(|e| format!("{shown}: {e}"))?.join(name)
        };
        if roots.iter().any(|r| resolved.starts_with(r)) {
            Ok(resolved)
        } else {
            Err(format!("{shown}: outside the directories this node may use"))
        }
    }

    /// Serve until a `shutdown` request; removes the sockets on return.
    pub fn run(mut self) -> Result<(), NodeError> {
        let r = self.serve();
        for p in &mut self.ports {
            if let Some(w) = p.pcap.take() {
                let _ = w.finish();
            }
            // Dropping a vhost port cuts its QEMU connection and removes the socket.
            p.vhost = None;
            let _ = std::fs::remove_file(&p.path);
        }
        let _ = std::fs::remove_file(&self.control_path);
        r
    }

    fn serve(&mut self) -> Result<(), NodeError> {
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes the calling thread's timer slack; 1 ns makes ppoll wake on time.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        // Also under a real-time policy: a 30 µs spin measured a 16-21 µs
        // median lateness on this PVM host even under SCHED_FIFO.
        let spin = self.spin_ns.unwrap_or(SPIN_NS);
        tracing::debug!(spin_ns = spin, "serving");
        // Syscalls are expensive here (PVM), so each pass touches only the
        // sockets `ppoll` reported ready.
        #[derive(Clone, Copy)]
        enum Tag {
            Listener(usize),
            Conn(usize),
            Control,
            Ctl(usize),
            Wake,
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut tags: Vec<Tag> = Vec::new();
        let mut ready = Ready::default();
        while !self.shutdown {
            let now = mono_ns();
            self.step(now, &ready);
            // Sleep until the next deadline (less a spin margin) or until a socket is ready.
            let deadline = self.deadline();
            let now = mono_ns();
            let timeout_ns = match deadline {
                Some(d) if d <= now + spin => 0,
                Some(d) => d - now - spin,
                None => 1_000_000_000,
            };
            fds.clear();
            tags.clear();
            fds.push(pfd(self.wake_rx.as_raw_fd(), libc::POLLIN));
            tags.push(Tag::Wake);
            for (i, p) in self.ports.iter().enumerate() {
                if let Some(l) = &p.listener {
                    fds.push(pfd(l.as_raw_fd(), libc::POLLIN));
                    tags.push(Tag::Listener(i));
                }
                if let Some(c) = &p.conn {
                    let ev = if c.out_pos < c.out.len() { libc::POLLIN | libc::POLLOUT } else { libc::POLLIN };
                    fds.push(pfd(c.stream.as_raw_fd(), ev));
                    tags.push(Tag::Conn(i));
                }
            }
            fds.push(pfd(self.control.as_raw_fd(), libc::POLLIN));
            tags.push(Tag::Control);
            for (i, c) in self.ctls.iter().enumerate() {
                let ev = if c.out.is_empty() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
                fds.push(pfd(c.stream.as_raw_fd(), ev));
                tags.push(Tag::Ctl(i));
            }
            let ts = libc::timespec {
                tv_sec: (timeout_ns / 1_000_000_000) as _,
                tv_nsec: (timeout_ns % 1_000_000_000) as _,
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds and `ts` a valid timespec, both live for the call.
            let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(NodeError::Poll(e));
                }
            }
            ready.clear(self.ports.len(), self.ctls.len());
            for (f, t) in fds.iter().zip(&tags) {
                if f.revents == 0 {
                    continue;
                }
                match *t {
                    Tag::Listener(i) => ready.listeners[i] = true,
                    Tag::Conn(i) => ready.conns[i] = true,
                    Tag::Control => ready.control = true,
                    Tag::Ctl(i) => ready.ctls[i] = true,
                    Tag::Wake => ready.wake = true,
                }
            }
        }
        // Answer whatever is still queued for control clients.
        for c in &mut self.ctls {
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.write_all(&c.out);
        }
        Ok(())
    }

    fn deadline(&self) -> Option<MonoNs> {
        let mut d = self.sched.next_deadline();
        for c in &self.ctls {
            let t = match c.waiting {
                Some(Waiting::Thaw(at)) | Some(Waiting::ThawPort(_, at)) => Some(at),
                _ => None,
            };
            if let Some(t) = t {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        }
        d
    }

    /// One pass: accept, read, schedule, write, serve control requests.
    fn step(&mut self, now: MonoNs, ready: &Ready) {
        // Control first: a thaw that is due must happen before frames are read,
        // or frames sent after the thaw instant would be stamped as frozen.
        if ready.control {
            self.accept_control();
        }
        self.serve_control(&ready.ctls);
        for i in 0..self.ports.len() {
            if ready.listeners.get(i).copied().unwrap_or(false) {
                self.accept_port(i);
            }
        }
        for i in 0..self.ports.len() {
            if ready.conns.get(i).copied().unwrap_or(false) {
                self.read_port(i);
            }
        }
        if ready.wake {
            let mut sink = [0u8; 64];
            while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        }
        self.vhost_events();
        self.release(mono_ns());
        let _ = now;
    }

    fn release(&mut self, now: MonoNs) {
        let mut actions = std::mem::take(&mut self.actions);
        self.sched.poll(now, &mut actions);
        // Frames a vhost port refused, in order; they go back to the scheduler.
        let mut refused: Vec<(PortId, Vec<u8>, u64)> = Vec::new();
        for a in actions.drain(..) {
            match a {
                Action::Deliver { port, frame, due, due_vt } => {
                    let p = &mut self.ports[port];
                    // Stream mode: a VM whose QEMU stops reading must not grow
                    // our buffer without bound. Past the cap the port blocks
                    // like a vhost port without buffers (due frames wait in the
                    // scheduler's bounded backlog) until the socket drains.
                    if let Some(c) = &p.conn {
                        let earlier = refused.iter().any(|r| r.0 == port);
                        if earlier || c.out.len() - c.out_pos >= MAX_STREAM_OUT {
                            refused.push((port, frame, due_vt));
                            continue;
                        }
                    }
                    if let Some(v) = &p.vhost {
                        // Once a port refused a frame, later ones queue behind it.
                        let earlier = refused.iter().any(|r| r.0 == port);
                        let ok = !earlier
                            && match v.port.deliver(&frame) {
                                Ok(ok) => ok,
                                Err(e) => {
                                    tracing::warn!(port = %self.sched.port_name(port), error = %e, "vhost delivery failed");
                                    false
                                }
                            };
                        if !ok {
                            refused.push((port, frame, due_vt));
                            continue;
                        }
                    }
                    self.release_err.record(now.saturating_sub(due));
                    if let Some(w) = &mut p.pcap {
                        let _ = w.record(now, &frame);
                    }
                    if let Some(c) = &mut p.conn {
                        let start = c.out.len();
                        encode_into(&frame, &mut c.out);
                        c.ends.push_back((start, c.out.len(), due_vt));
                    }
                }
                Action::Frozen { at } => {
                    tracing::info!(at, "frozen");
                    self.events.emit(at, "freeze", json!({}));
                }
                Action::PortFrozen { port, at } => {
                    self.events.emit(at, "port_freeze", json!({ "port": self.sched.port_name(port) }));
                }
            }
        }
        self.actions = actions;
        for (port, frame, due_vt) in refused.into_iter().rev() {
            self.sched.set_blocked(port, true);
            self.sched.unsend(port, frame, due_vt);
        }
        for i in 0..self.ports.len() {
            self.flush_port(i);
        }
    }

    /// Apply the queued events of the vhost-user ports.
    fn vhost_events(&mut self) {
        self.vhost_events.signalled.store(false, Ordering::Release);
        let evs = std::mem::take(&mut *self.vhost_events.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, ev, at) in evs {
            let name = self.sched.port_name(i).to_owned();
            let Some(v) = self.ports[i].vhost.as_mut() else {
                continue;
            };
            match ev {
                PortEvent::Frame(f) => {
                    v.port.tx_consumed(1);
                    if let Some(w) = &mut self.ports[i].pcap {
                        let _ = w.record(at, &f);
                    }
                    if f.len() < crate::frame::MIN_FRAME || f.len() > crate::frame::MAX_FRAME {
                        self.sched.note_port_error(i);
                        continue;
                    }
                    // Frames taken from the TX ring just before a stop arrive
                    // after `Stopped`: they left the guest before it stopped.
                    self.sched.ingress(at, i, f);
                }
                PortEvent::RxReady => {
                    if v.running {
                        self.sched.set_blocked(i, false);
                    }
                }
                PortEvent::Started => {
                    v.running = true;
                    self.sched.set_blocked(i, false);
                    tracing::info!(port = %name, "vhost device started");
                    self.events.emit(at, "port_started", json!({ "port": name }));
                }
                PortEvent::Stopped { at: stop } => {
                    v.running = false;
                    self.sched.set_blocked(i, true);
                    tracing::info!(port = %name, at = stop, "vhost device stopped");
                    self.events.emit(stop, "port_stopped", json!({ "port": name, "at": stop }));
                }
                PortEvent::Disconnected => {
                    v.running = false;
                    self.sched.set_blocked(i, true);
                    self.events.emit(
                        at,
                        "port_disconnected",
                        json!({ "port": name, "reason": "vhost-user frontend closed" }),
                    );
                }
            }
        }
    }

    fn flush_port(&mut self, i: usize) {
        let Some(c) = &mut self.ports[i].conn else {
            return;
        };
        while c.out_pos < c.out.len() {
            match c.stream.write(&c.out[c.out_pos..]) {
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.disconnect(i, &format!("write failed: {e}"));
                    return;
                }
            }
        }
        while let Some(&(_, end, _)) = c.ends.front() {
            if end > c.out_pos {
                break;
            }
            c.ends.pop_front();
        }
        if c.out.len() - c.out_pos < MAX_STREAM_OUT / 2 && self.ports[i].vhost.is_none() && self.sched.is_blocked(i) {
            // The reader caught up with a buffer that had reached its cap.
            self.sched.set_blocked(i, false);
        }
        let Some(c) = &mut self.ports[i].conn else {
            return;
        };
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
            c.ends.clear();
        } else if c.out_pos > 1 << 20 {
            // A slow reader: drop the written prefix so the buffer does not grow forever.
            let shift = c.out_pos;
            c.out.drain(..shift);
            c.out_pos = 0;
            for e in c.ends.iter_mut() {
                if e.0 != PARTIAL {
                    e.0 = e.0.saturating_sub(shift);
                }
                e.1 -= shift;
            }
        }
    }

    fn accept_port(&mut self, i: usize) {
        {
            loop {
                let Some(l) = &self.ports[i].listener else {
                    return;
                };
                match l.accept() {
                    Ok(Err(Refused(peer))) => {
                        let io = &mut self.ports[i];
                        io.refused += 1;
                        let name = self.sched.port_name(i).to_owned();
                        // Logged and recorded once per power of two: a flood
                        // of connections cannot flood the log.
                        if io.refused.is_power_of_two() {
                            tracing::warn!(port = %name, %peer, refused = io.refused, "refused a connection from another address than the VM's host");
                            self.events.emit_now(
                                "port_refused",
                                json!({ "port": name, "peer": peer.to_string(), "refused": io.refused }),
                            );
                        }
                    }
                    Ok(Ok(stream)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let name = self.sched.port_name(i).to_owned();
                        if self.ports[i].conn.is_some() {
                            tracing::info!(port = %name, "new connection replaces the old one");
                            self.disconnect(i, "replaced by a new connection");
                        }
                        tracing::info!(port = %name, "VM connected");
                        self.events.emit_now("port_connected", json!({ "port": name }));
                        self.ports[i].conn = Some(Conn {
                            stream,
                            dec: FrameDecoder::new(),
                            out: Vec::new(),
                            out_pos: 0,
                            ends: VecDeque::new(),
                        });
                        self.sched.set_connected(i, true);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                }
            }
        }
    }

    fn disconnect(&mut self, i: usize, why: &str) {
        if let Some(c) = self.ports[i].conn.take() {
            let name = self.sched.port_name(i).to_owned();
            let unsent = c.ends.len();
            // Frames released to this VM but not written are lost with the connection.
            tracing::info!(port = %name, why, unsent, "VM disconnected");
            self.events.emit_now("port_disconnected", json!({ "port": name, "reason": why, "unsent_frames": unsent }));
        }
        self.sched.set_connected(i, false);
    }

    /// Read whatever the port's socket holds (up to a budget) and hand frames to the core.
    fn read_port(&mut self, i: usize) {
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let PortIo { conn, pcap, .. } = &mut self.ports[i];
            let Some(c) = conn else { return };
            let n = match c.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.disconnect(i, "end of stream");
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.disconnect(i, &format!("read failed: {e}"));
                    return;
                }
            };
            budget = budget.saturating_sub(n);
            let now = mono_ns();
            c.dec.extend(&self.buf[..n]);
            let err: Option<FrameError> = loop {
                match c.dec.next_frame() {
                    Ok(Some(f)) => {
                        if let Some(w) = pcap {
                            let _ = w.record(now, f);
                        }
                        self.sched.ingress(now, i, f.to_vec());
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if let Some(e) = err {
                let name = self.sched.port_name(i).to_owned();
                tracing::error!(port = %name, error = %e, "bad framing; dropping the connection");
                self.events.emit_now("port_error", json!({ "port": name, "error": e.to_string() }));
                self.sched.note_port_error(i);
                self.disconnect(i, "bad framing");
                return;
            }
        }
    }

    fn accept_control(&mut self) {
        loop {
            match self.control.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.ctls.push(Ctl {
                            stream,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            waiting: None,
                            closed: false,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    break;
                }
            }
        }
    }

    fn serve_control(&mut self, ready: &[bool]) {
        for ci in 0..self.ctls.len() {
            // Read (new connections are read once unconditionally).
            let is_ready = ready.get(ci).copied().unwrap_or(true);
            loop {
                let c = &mut self.ctls[ci];
                if c.closed || !is_ready {
                    break;
                }
                let mut tmp = [0u8; 4096];
                match c.stream.read(&mut tmp) {
                    Ok(0) => c.closed = true,
                    Ok(n) => {
                        c.inbuf.extend_from_slice(&tmp[..n]);
                        if c.inbuf.len() > 1 << 20 {
                            c.closed = true;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => c.closed = true,
                }
            }
            // Finish a waiting request, then take new lines one at a time.
            loop {
                if let Some(w) = self.ctls[ci].waiting.take() {
                    match self.try_finish(w) {
                        Ok(reply) => self.reply(ci, reply),
                        Err(w) => {
                            self.ctls[ci].waiting = Some(w);
                            break;
                        }
                    }
                }
                let c = &mut self.ctls[ci];
                let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
                let reply = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => self.handle(ci, req),
                    Err(e) => Some(Err(format!("bad request: {e}"))),
                };
                if let Some(r) = reply {
                    self.reply(ci, r);
                }
            }
            // Write.
            let c = &mut self.ctls[ci];
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(n) => {
                        c.out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.closed = true;
                        c.out.clear();
                    }
                }
            }
        }
        self.ctls.retain(|c| !c.closed);
    }

    fn reply(&mut self, ci: usize, r: Result<serde_json::Value, String>) {
        let v = match r {
            Ok(ok) => json!({ "ok": ok }),
            Err(e) => json!({ "error": e }),
        };
        let c = &mut self.ctls[ci];
        c.out.extend_from_slice(v.to_string().as_bytes());
        c.out.push(b'\n');
    }

    /// Handle a request; `None` means it waits (see `try_finish`).
    fn handle(&mut self, ci: usize, req: Request) -> Option<Result<serde_json::Value, String>> {
        let now = mono_ns();
        let port = |s: &Scheduler, name: &str| s.port_id(name).ok_or_else(|| format!("unknown port {name:?}"));
        Some(match req {
            Request::FreezeAt { at, hold_lead_ns } => {
                self.sched.schedule_freeze(now, at, hold_lead_ns).map(|_| json!(null)).map_err(|e| e.to_string())
            }
            Request::FreezePortAt { port: name, at, hold_lead_ns } => port(&self.sched, &name).map(|p| {
                self.sched.schedule_port_freeze(now, p, at, hold_lead_ns);
                json!(null)
            }),
            Request::Save { path } => match self.allowed_path(&path, false) {
                Err(e) => Err(format!("cannot save: {e}")),
                Ok(_) if !self.sched.freeze_pending_or_done() => {
                    Err("cannot save: the node is not frozen and no freeze is scheduled".to_owned())
                }
                Ok(path) => {
                    self.ctls[ci].waiting = Some(Waiting::Save(path));
                    return None;
                }
            },
            Request::ThawAt { at } => {
                if !self.sched.freeze_pending_or_done() {
                    Err("cannot thaw: the node is not frozen and no freeze is scheduled".to_owned())
                } else {
                    self.ctls[ci].waiting = Some(Waiting::Thaw(at));
                    return None;
                }
            }
            Request::ThawPortAt { port: name, at } => match port(&self.sched, &name) {
                Ok(p) => {
                    self.ctls[ci].waiting = Some(Waiting::ThawPort(p, at));
                    return None;
                }
                Err(e) => Err(e),
            },
            Request::HoldPort { port: name } => match port(&self.sched, &name) {
                Ok(p) => match &self.ports[p].vhost {
                    Some(v) => {
                        v.port.hold();
                        tracing::info!(port = %name, "vhost port held");
                        self.events.emit_now("port_hold", json!({ "port": name }));
                        Ok(json!({ "vhost": true }))
                    }
                    None => Ok(json!({ "vhost": false })),
                },
                Err(e) => Err(e),
            },
            Request::ReleasePort { port: name } => match port(&self.sched, &name) {
                Ok(p) => match &self.ports[p].vhost {
                    Some(v) => {
                        // TX the guest queued meanwhile comes back as Frame events.
                        v.port.release();
                        if v.running {
                            self.sched.set_blocked(p, false);
                        }
                        tracing::info!(port = %name, "vhost port released");
                        self.events.emit_now("port_release", json!({ "port": name }));
                        Ok(json!({ "vhost": true }))
                    }
                    None => Ok(json!({ "vhost": false })),
                },
                Err(e) => Err(e),
            },
            Request::Stats => {
                let mut st = self.sched.stats(now);
                st.release_error = Some(self.release_err.summary());
                for (ps, port) in st.ports.iter_mut().zip(&self.ports) {
                    ps.vhost_held = port.vhost.as_ref().is_some_and(|v| v.port.is_held());
                }
                serde_json::to_value(st).map_err(|e| e.to_string())
            }
            Request::Pcap { port: name, path } => port(&self.sched, &name).and_then(|p| {
                if let Some(w) = self.ports[p].pcap.take() {
                    w.finish().map_err(|e| format!("cannot finish capture: {e}"))?;
                }
                if let Some(path) = path {
                    let path = self.allowed_path(&path, false).map_err(|e| format!("cannot capture: {e}"))?;
                    self.ports[p].pcap =
                        Some(PcapWriter::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?);
                }
                Ok(json!(null))
            }),
            Request::Restore { path } => self
                .allowed_path(&path, true)
                .map_err(|e| format!("cannot restore: {e}"))
                .and_then(|path| self.restore_from(&path))
                .map(|_| json!(null)),
            Request::Shutdown => {
                self.shutdown = true;
                Ok(json!(null))
            }
        })
    }

    fn restore_from(&mut self, path: &Path) -> Result<(), String> {
        if !self.sched.is_frozen() {
            return Err("cannot restore: the node is not frozen".into());
        }
        let st = NodeState::read_file(path).map_err(|e| error_chain(&e))?;
        let mut s = Scheduler::restore(self.sched.topology(), &st).map_err(|e| error_chain(&e))?;
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let Some(v) = &p.vhost {
                s.set_connected(i, true);
                s.set_blocked(i, !v.running);
                continue;
            }
            s.set_connected(i, p.conn.is_some());
            if let Some(c) = &mut p.conn {
                // Frames released before the restore belong to the abandoned timeline.
                c.out.clear();
                c.out_pos = 0;
                c.ends.clear();
            }
        }
        self.sched = s;
        self.events.emit_now("restored", json!({ "path": path }));
        Ok(())
    }

    /// Complete a waiting request if its time has come.
    fn try_finish(&mut self, w: Waiting) -> Result<Result<serde_json::Value, String>, Waiting> {
        match w {
            Waiting::Save(path) => {
                if !self.sched.is_frozen() {
                    if !self.sched.freeze_pending_or_done() {
                        return Ok(Err("the freeze was cancelled".into()));
                    }
                    return Err(Waiting::Save(path));
                }
                Ok(self.save(&path).map(|r| serde_json::to_value(r).expect("plain struct")))
            }
            Waiting::Thaw(at) => {
                let now = mono_ns();
                if now + SPIN_NS < at || !self.sched.is_frozen() {
                    if !self.sched.freeze_pending_or_done() {
                        return Ok(Err("the node is not frozen".into()));
                    }
                    return Err(Waiting::Thaw(at));
                }
                let reached = stasis_core::clock::wait_until(at);
                let rep = self.sched.thaw(at).map_err(|e| e.to_string());
                if let Ok(r) = &rep {
                    tracing::info!(at, late_ns = reached - at, held = r.held_frames, "thawed");
                    self.events.emit(reached, "thaw", json!({ "at": at, "held_frames": r.held_frames, "max_hold_lateness_ns": r.max_hold_lateness_ns }));
                }
                self.release(mono_ns());
                Ok(rep.map(|r| serde_json::to_value(r).expect("plain struct")))
            }
            Waiting::ThawPort(p, at) => {
                if mono_ns() + SPIN_NS < at {
                    return Err(Waiting::ThawPort(p, at));
                }
                let reached = stasis_core::clock::wait_until(at);
                let rep = self.sched.thaw_port(at, p).map_err(|e| e.to_string());
                if let Ok((held, late)) = rep {
                    self.events.emit(
                        reached,
                        "port_thaw",
                        json!({ "port": self.sched.port_name(p), "held_frames": held }),
                    );
                    self.release(mono_ns());
                    return Ok(Ok(serde_json::to_value(PortThawReport {
                        thawed_at: at,
                        held_frames: held,
                        max_hold_lateness_ns: late,
                    })
                    .expect("plain struct")));
                }
                Ok(rep.map(|_| json!(null)))
            }
        }
    }

    /// Drain the (stopped) VMs' sockets, take back unwritten frames, write the state.
    fn save(&mut self, path: &Path) -> Result<SaveReport, String> {
        // Frames the stopped guests sent are queued events or socket bytes.
        self.vhost_events();
        for i in 0..self.ports.len() {
            self.read_port(i);
        }
        for i in 0..self.ports.len() {
            self.flush_port(i);
            let Some(c) = &mut self.ports[i].conn else {
                continue;
            };
            if c.ends.is_empty() {
                continue;
            }
            // A frame already partly written cannot be taken back: its rest stays
            // queued for this connection (the stopped VM may never read it; then it
            // is lost with the connection, like the bytes already in the socket).
            let mut frames: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut partial = None;
            for &(start, end, due_vt) in &c.ends {
                if start != PARTIAL && start >= c.out_pos {
                    frames.push((c.out[start + PREFIX..end].to_vec(), due_vt));
                } else {
                    partial = Some((end, due_vt));
                }
            }
            match partial {
                Some((end, due_vt)) => {
                    c.out.truncate(end);
                    c.out.drain(..c.out_pos);
                    c.out_pos = 0;
                    c.ends.clear();
                    c.ends.push_back((PARTIAL, c.out.len(), due_vt));
                    tracing::warn!(port = %self.sched.port_name(i), "a frame was partly written when the VM stopped");
                }
                None => {
                    c.out.clear();
                    c.out_pos = 0;
                    c.ends.clear();
                }
            }
            for (f, due_vt) in frames.into_iter().rev() {
                self.sched.unsend(i, f, due_vt);
            }
        }
        let st = self.sched.save().map_err(|e| e.to_string())?;
        let (inflight, held) = self.sched.frame_counts();
        let w = st.write_file(path).map_err(|e| error_chain(&e))?;
        let rep = SaveReport {
            bytes: w.bytes,
            frames_in_flight: inflight,
            frames_held: held,
            frozen_at: self.sched.frozen_at().unwrap_or(0),
            blake3: Some(w.blake3),
        };
        tracing::info!(path = %path.display(), bytes = rep.bytes, inflight, held, "saved");
        self.events.emit_now(
            "saved",
            json!({ "path": path, "bytes": rep.bytes, "frames_in_flight": inflight, "frames_held": held }),
        );
        Ok(rep)
    }
}

/// Which sockets the last `ppoll` reported ready.
#[derive(Default)]
struct Ready {
    listeners: Vec<bool>,
    conns: Vec<bool>,
    control: bool,
    ctls: Vec<bool>,
    wake: bool,
}

impl Ready {
    fn clear(&mut self, ports: usize, ctls: usize) {
        self.listeners.clear();
        self.listeners.resize(ports, false);
        self.conns.clear();
        self.conns.resize(ports, false);
        self.control = false;
        self.wake = false;
        self.ctls.clear();
        self.ctls.resize(ctls, false);
    }
}

fn pfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// `e` and its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod mode_tests {
    use super::*;
    use crate::config::PortConfig;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Whoever connects to the control socket can save, restore and capture
    /// traffic, and to a port socket can play the VM: none may be reachable
    /// by other users, even though this test runs under umask 022 (the
    /// binary's umask 077 is not there to help a library caller).
    #[test]
    fn control_and_port_sockets_and_the_event_log_are_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let port = |name: &str, kind| PortConfig {
            name: name.into(),
            socket: t.path().join(format!("{name}.sock")),
            kind,
            peer: None,
        };
        let topo = Topology {
            ports: vec![port("s", PortKind::Stream), port("v", PortKind::VhostUser)],
            lans: vec![],
            links: vec![],
            seed: 0,
        };
        let control = t.path().join("ctl");
        let events = t.path().join("events.jsonl");
        let node = Node::bind(&topo, &control, None, Some(&events)).unwrap();
        for p in [&control, &topo.ports[0].socket, &topo.ports[1].socket, &events] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        drop(node);
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;

    #[test]
    fn tcp_ports_bind_only_a_named_address() {
        for bad in ["0.0.0.0:7800", "[::]:7800", "/tmp/x.sock", "127.0.0.1"] {
            let e = bind_tcp(Path::new(bad)).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains(bad), "{e}");
        }
        let l = bind_tcp(Path::new("127.0.0.1:0")).unwrap();
        assert!(l.local_addr().unwrap().ip().is_loopback());
    }
}
