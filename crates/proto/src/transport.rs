//! The protocol over TCP (tokio): the agent's [`Listener`], the
//! coordinator's [`Connection::connect`], typed `send`/`recv` of sealed
//! frames, and [`run_round`], which drives a [`CoordinatorCore`] over real
//! connections.
//!
//! Handshakes run in their own tasks with a timeout, so a client that
//! stalls, sends garbage or has the wrong key is refused (reported by
//! [`Listener::accept`]) while other connections are served. Before a peer
//! has authenticated it gets little: frames of at most
//! [`PRE_AUTH_MAX_FRAME`] bytes, [`HELLO_TIMEOUT`] to send its Hello, and at
//! most [`MAX_HANDSHAKES_PER_SOURCE`] handshakes in progress per source
//! address out of [`MAX_PENDING_HANDSHAKES`]; connections beyond either are
//! closed at once instead of waiting, so a flood from one address cannot lock
//! out a coordinator connecting from another.
//!
//! The coordinator proves the key first (see [`crate::auth`]). Every
//! connection has TCP keepalive and a user timeout ([`KEEPALIVE_IDLE`],
//! [`USER_TIMEOUT`]), so a peer whose host vanished is noticed even while
//! both sides are silent; [`RecvHalf::recv_within`] is the application's
//! idle timeout for a peer alive at the TCP level that says nothing.

use crate::auth::{Direction, Key, OpenError, Opener, Sealer};
use crate::coordinator::{CoordAction, CoordConfig, CoordinatorCore, Outcome};
use crate::msg::{
    Auth, CkptId, Component, DecodeError, ErrorCode, ErrorMsg, Hello, Message, Welcome, MAGIC, MAX_VERSION, MIN_VERSION,
};
use crate::wire::{check_len, encode_frame, FrameError};
use rand::RngCore;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; further connections are closed.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in progress at once from one source address.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4;
/// How long a new connection has to send its whole Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest frame accepted before authentication: a handshake message is
/// under 100 bytes, an error message a little more.
pub const PRE_AUTH_MAX_FRAME: usize = 256;
/// TCP keepalive on every connection: the first probe after this much
/// silence, then every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] times,
/// so a peer whose host lost power (no FIN, no RST) is noticed within
/// about 25 s even when neither side has anything to say.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_PROBES: u32 = 3;
/// `TCP_USER_TIMEOUT`: sent data unacknowledged this long breaks the
/// connection (a peer that vanished while we were talking to it).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Keepalive and user timeout on `s` (see [`KEEPALIVE_IDLE`], [`USER_TIMEOUT`]).
fn set_keepalive(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> std::io::Result<()> {
        // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from the live c_int `v`, on a socket `s` keeps open.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE.as_secs() as libc::c_int)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL.as_secs() as libc::c_int)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES as libc::c_int)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, USER_TIMEOUT.as_millis() as libc::c_int)
}

/// The keepalive settings of a connected socket, as the kernel reports them:
/// (SO_KEEPALIVE, TCP_KEEPIDLE s, TCP_KEEPINTVL s, TCP_KEEPCNT, TCP_USER_TIMEOUT ms).
pub fn keepalive_of(fd: std::os::fd::RawFd) -> std::io::Result<(bool, u32, u32, u32, u32)> {
    let get = |level: libc::c_int, name: libc::c_int| -> std::io::Result<u32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the live c_int `v` and updates `len`.
        let rc = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if rc == 0 {
            Ok(v as u32)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    Ok((
        get(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
        get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
    ))
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("connection closed")]
    Closed,
    #[error("reading a frame")]
    Io(#[source] std::io::Error),
    #[error("bad frame")]
    Frame(#[from] FrameError),
    #[error("frame of {len} bytes before authentication (at most {max})")]
    PreAuthTooLong { len: usize, max: usize },
    #[error("refused frame")]
    Open(#[from] OpenError),
    #[error("nothing received for {0:?}")]
    Idle(Duration),
}

/// Why a frame could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("message too large")]
    Frame(#[from] FrameError),
    #[error("writing a frame")]
    Io(#[from] std::io::Error),
}

/// Why a handshake failed (either side).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error("handshake I/O")]
    Recv(#[from] RecvError),
    #[error("handshake I/O")]
    Send(#[from] SendError),
    #[error("undecodable handshake message")]
    Decode(#[from] DecodeError),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("bad magic {0:?}")]
    BadMagic([u8; 4]),
    #[error("no common protocol version: ours {ours_min}..={ours_max}, theirs {theirs_min}..={theirs_max}")]
    VersionMismatch { ours_min: u16, ours_max: u16, theirs_min: u16, theirs_max: u16 },
    #[error("peer failed authentication (wrong key?)")]
    AuthFailed,
    #[error("the agent's proof of the key is wrong (an impostor, or another host's key)")]
    AgentAuthFailed,
    #[error("peer refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("handshake timed out")]
    Timeout,
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("{MAX_HANDSHAKES_PER_SOURCE} handshakes from {0} already in progress")]
    TooManyFromSource(std::net::IpAddr),
    #[error("{MAX_PENDING_HANDSHAKES} handshakes already in progress")]
    Busy,
}

/// Why the agent could not listen.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("refusing to bind the wildcard address {0}: configure the address to serve on")]
    Wildcard(SocketAddr),
    #[error("binding {0}")]
    Io(SocketAddr, #[source] std::io::Error),
}

async fn read_frame(r: &mut BufReader<OwnedReadHalf>) -> Result<Vec<u8>, RecvError> {
    read_frame_max(r, crate::wire::MAX_FRAME).await
}

/// One frame of at most `max` bytes; the length is checked before anything
/// is allocated for it.
async fn read_frame_max(r: &mut BufReader<OwnedReadHalf>, max: usize) -> Result<Vec<u8>, RecvError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(RecvError::Closed),
        Err(e) => return Err(RecvError::Io(e)),
    }
    let len = check_len(u32::from_be_bytes(len) as usize)?;
    if len > max {
        return Err(RecvError::PreAuthTooLong { len, max });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(RecvError::Io)?;
    Ok(buf)
}

async fn write_frame(w: &mut OwnedWriteHalf, payload: &[u8]) -> Result<(), SendError> {
    w.write_all(&encode_frame(payload)?).await?;
    Ok(())
}

/// The sending half of a connection.
pub struct SendHalf {
    w: OwnedWriteHalf,
    sealer: Sealer,
}

impl SendHalf {
    pub async fn send(&mut self, msg: &Message) -> Result<(), SendError> {
        let payload = self.sealer.seal(msg);
        write_frame(&mut self.w, &payload).await
    }
}

/// The receiving half of a connection.
pub struct RecvHalf {
    r: BufReader<OwnedReadHalf>,
    opener: Opener,
}

impl RecvHalf {
    /// The next authenticated message. After an error the connection is
    /// unusable (the sequence is lost): drop it.
    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        let f = read_frame(&mut self.r).await?;
        Ok(self.opener.open(&f)?)
    }

    /// [`RecvHalf::recv`], or [`RecvError::Idle`] if no whole frame came
    /// within `idle` (the application-level idle timeout: a peer alive at
    /// the TCP level that says nothing). After `Idle` the connection may be
    /// mid-frame: drop it.
    pub async fn recv_within(&mut self, idle: Duration) -> Result<Message, RecvError> {
        match tokio::time::timeout(idle, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(RecvError::Idle(idle)),
        }
    }

    /// The socket's file descriptor (to inspect its options).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.r.get_ref().as_ref().as_raw_fd()
    }
}

/// An authenticated connection.
pub struct Connection {
    tx: SendHalf,
    rx: RecvHalf,
    peer: SocketAddr,
    version: u16,
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn send_plain(w: &mut OwnedWriteHalf, m: &Message) -> Result<(), SendError> {
    write_frame(w, &m.encode()).await
}

async fn recv_plain(r: &mut BufReader<OwnedReadHalf>) -> Result<Message, HandshakeError> {
    let f = read_frame_max(r, PRE_AUTH_MAX_FRAME).await?;
    Ok(Message::decode(&f)?)
}

fn refusal(m: Message, expected: &'static str) -> HandshakeError {
    match m {
        Message::Error(e) => HandshakeError::Refused { code: e.code, message: e.message },
        other => HandshakeError::Unexpected { expected, got: other.name() },
    }
}

impl Connection {
    /// Connect to an agent and authenticate (coordinator side).
    pub async fn connect(addr: SocketAddr, key: &Key) -> Result<Connection, HandshakeError> {
        Self::connect_versions(addr, key, MIN_VERSION, MAX_VERSION).await
    }

    /// [`Connection::connect`] offering the versions `min..=max` (for
    /// compatibility tests).
    pub async fn connect_versions(
        addr: SocketAddr,
        key: &Key,
        min: u16,
        max: u16,
    ) -> Result<Connection, HandshakeError> {
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| HandshakeError::Timeout)?
            .map_err(HandshakeError::Connect)?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::client_handshake(stream, key, min, max))
            .await
            .map_err(|_| HandshakeError::Timeout)?
    }

    async fn client_handshake(stream: TcpStream, key: &Key, min: u16, max: u16) -> Result<Connection, HandshakeError> {
        stream.set_nodelay(true).map_err(HandshakeError::Connect)?;
        set_keepalive(&stream).map_err(HandshakeError::Connect)?;
        let peer = stream.peer_addr().map_err(HandshakeError::Connect)?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let nonce_c = nonce();
        send_plain(&mut w, &Message::Hello(Hello { magic: MAGIC, min_version: min, max_version: max, nonce: nonce_c }))
            .await?;
        let Welcome { version, nonce: nonce_a } = match recv_plain(&mut r).await? {
            Message::Welcome(w) => w,
            other => return Err(refusal(other, "Welcome")),
        };
        if !(min..=max).contains(&version) {
            return Err(HandshakeError::VersionMismatch {
                ours_min: min,
                ours_max: max,
                theirs_min: version,
                theirs_max: version,
            });
        }
        // The client proves the key first; the agent proves it back.
        send_plain(&mut w, &Message::Auth(Auth { proof: key.coord_proof(version, (min, max), &nonce_c, &nonce_a) }))
            .await?;
        let proof = match recv_plain(&mut r).await? {
            Message::Auth(a) => a.proof,
            Message::Error(e) if e.code == ErrorCode::AuthFailed => return Err(HandshakeError::AuthFailed),
            other => return Err(refusal(other, "Auth")),
        };
        if !key.verify(true, version, (min, max), &nonce_c, &nonce_a, &proof) {
            let _ = send_plain(
                &mut w,
                &Message::Error(ErrorMsg { code: ErrorCode::AuthFailed, message: "agent proof invalid".into() }),
            )
            .await;
            return Err(HandshakeError::AgentAuthFailed);
        }
        let session = key.session(version, (min, max), &nonce_c, &nonce_a);
        Ok(Connection {
            tx: SendHalf { w, sealer: Sealer::new(session.clone(), Direction::ToAgent) },
            rx: RecvHalf { r, opener: Opener::new(session, Direction::ToCoordinator) },
            peer,
            version,
        })
    }

    async fn server_handshake(stream: TcpStream, key: &Key) -> Result<Connection, HandshakeError> {
        stream.set_nodelay(true).map_err(HandshakeError::Connect)?;
        set_keepalive(&stream).map_err(HandshakeError::Connect)?;
        let peer = stream.peer_addr().map_err(HandshakeError::Connect)?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, recv_plain(&mut r)).await {
            Ok(m) => m?,
            Err(_) => return Err(HandshakeError::HelloTimeout(HELLO_TIMEOUT)),
        };
        let hello = match hello {
            Message::Hello(h) => h,
            other => return Err(refusal(other, "Hello")),
        };
        let fail = |code, message: String| Message::Error(ErrorMsg { code, message });
        if hello.magic != MAGIC {
            let _ = send_plain(&mut w, &fail(ErrorCode::BadMagic, "bad magic".into())).await;
            return Err(HandshakeError::BadMagic(hello.magic));
        }
        let version = MAX_VERSION.min(hello.max_version);
        if version < MIN_VERSION.max(hello.min_version) {
            let e = HandshakeError::VersionMismatch {
                ours_min: MIN_VERSION,
                ours_max: MAX_VERSION,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            };
            let _ = send_plain(&mut w, &fail(ErrorCode::VersionMismatch, e.to_string())).await;
            return Err(e);
        }
        let nonce_a = nonce();
        let offered = (hello.min_version, hello.max_version);
        // Nothing computed from the key goes to a peer that has not proved it.
        send_plain(&mut w, &Message::Welcome(Welcome { version, nonce: nonce_a })).await?;
        let auth = match recv_plain(&mut r).await? {
            Message::Auth(a) => a,
            other => return Err(refusal(other, "Auth")),
        };
        if !key.verify(false, version, offered, &hello.nonce, &nonce_a, &auth.proof) {
            let _ =
                send_plain(&mut w, &fail(ErrorCode::AuthFailed, "coordinator proof invalid (wrong key?)".into())).await;
            return Err(HandshakeError::AuthFailed);
        }
        let proof = key.agent_proof(version, offered, &hello.nonce, &nonce_a);
        send_plain(&mut w, &Message::Auth(Auth { proof })).await?;
        let session = key.session(version, offered, &hello.nonce, &nonce_a);
        Ok(Connection {
            tx: SendHalf { w, sealer: Sealer::new(session.clone(), Direction::ToCoordinator) },
            rx: RecvHalf { r, opener: Opener::new(session, Direction::ToAgent) },
            peer,
            version,
        })
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), SendError> {
        self.tx.send(msg).await
    }

    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        self.rx.recv().await
    }

    /// See [`RecvHalf::recv_within`].
    pub async fn recv_within(&mut self, idle: Duration) -> Result<Message, RecvError> {
        self.rx.recv_within(idle).await
    }

    /// The socket's file descriptor (to inspect its options).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.rx.raw_fd()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn into_split(self) -> (SendHalf, RecvHalf) {
        (self.tx, self.rx)
    }
}

/// A refused incoming connection.
#[derive(Debug, thiserror::Error)]
#[error("connection from {peer} refused")]
pub struct Refused {
    pub peer: SocketAddr,
    #[source]
    pub error: HandshakeError,
}

/// Handshakes in progress per source address.
#[derive(Default)]
struct SourceCounts(std::collections::HashMap<std::net::IpAddr, usize>);

/// One handshake slot of a source address, given back on drop.
struct SourceGuard {
    counts: std::sync::Arc<std::sync::Mutex<SourceCounts>>,
    ip: std::net::IpAddr,
}

impl SourceGuard {
    fn take(counts: &std::sync::Arc<std::sync::Mutex<SourceCounts>>, ip: std::net::IpAddr) -> Option<SourceGuard> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.0.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceGuard { counts: counts.clone(), ip })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.0.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.0.remove(&self.ip);
            }
        }
    }
}

/// The agent's listening socket.
pub struct Listener {
    addr: SocketAddr,
    rx: mpsc::Receiver<Result<Connection, Refused>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Listen on exactly `addr` (a wildcard address is refused: the agent
    /// serves only the address it is configured with).
    pub async fn bind(addr: SocketAddr, key: Key) -> Result<Listener, BindError> {
        if addr.ip().is_unspecified() {
            return Err(BindError::Wildcard(addr));
        }
        let l = TcpListener::bind(addr).await.map_err(|e| BindError::Io(addr, e))?;
        let local = l.local_addr().map_err(|e| BindError::Io(addr, e))?;
        let (tx, rx) = mpsc::channel(64);
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        let sources = std::sync::Arc::new(std::sync::Mutex::new(SourceCounts::default()));
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Refusals here close the connection at once and are only
                // logged: reporting each through the channel would let a flood
                // fill it.
                let Some(source) = SourceGuard::take(&sources, peer.ip()) else {
                    tracing::warn!(%peer, error = %HandshakeError::TooManyFromSource(peer.ip()), "refused connection");
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, error = %HandshakeError::Busy, "refused connection");
                    continue;
                };
                let (tx, key) = (tx.clone(), key.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let r = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Connection::server_handshake(stream, &key))
                        .await
                    {
                        Ok(Ok(c)) => Ok(c),
                        Ok(Err(error)) => Err(Refused { peer, error }),
                        Err(_) => Err(Refused { peer, error: HandshakeError::Timeout }),
                    };
                    drop(source);
                    if let Err(r) = &r {
                        tracing::warn!(peer = %r.peer, error = %r.error, "refused connection");
                    }
                    let _ = tx.send(r).await;
                });
            }
        });
        Ok(Listener { addr: local, rx, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next handshake outcome, in completion order: an authenticated
    /// connection or a refusal (the listener keeps serving either way).
    pub async fn accept(&mut self) -> Result<Connection, Refused> {
        self.rx.recv().await.expect("the accept task runs while the listener lives")
    }
}

/// Drive one checkpoint round over `conns` (agent `i` is `conns[i]`):
/// `now` reads the synchronised clock; `commit_manifest` makes the manifest
/// durable. A connection that fails to send or receive counts as lost.
pub async fn run_round(
    conns: Vec<Connection>,
    ckpt: CkptId,
    cfg: CoordConfig,
    now: impl Fn() -> u64,
    mut commit_manifest: impl FnMut(CkptId, &[(usize, Vec<Component>)]) -> Result<(), String>,
    mut remove_partial: impl FnMut(CkptId),
) -> Outcome {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut senders: Vec<Option<SendHalf>> = Vec::with_capacity(conns.len());
    let mut readers = Vec::with_capacity(conns.len());
    for (i, c) in conns.into_iter().enumerate() {
        let (tx, mut rx) = c.into_split();
        senders.push(Some(tx));
        let ev = ev_tx.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let r = rx.recv().await;
                let stop = r.is_err();
                if ev.send((i, r)).is_err() || stop {
                    break;
                }
            }
        }));
    }
    drop(ev_tx);
    let _abort_readers = AbortOnDrop(readers);
    let mut core = CoordinatorCore::new(ckpt, senders.len(), cfg);
    let mut timers: Vec<u64> = Vec::new();
    let mut pending = core.start(now());
    let mut readers_open = true;
    loop {
        // Carry out actions; new ones (from lost connections, the manifest) queue up.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for a in pending {
                match a {
                    CoordAction::Send { to, msg } => {
                        let failed = match senders[to].as_mut() {
                            Some(s) => s.send(&msg).await.is_err(),
                            None => false,
                        };
                        if failed {
                            senders[to] = None;
                            next.extend(core.on_disconnect(now(), to));
                        }
                    }
                    CoordAction::SetTimer { at } => timers.push(at),
                    CoordAction::CommitManifest { ckpt, components } => match commit_manifest(ckpt, &components) {
                        Ok(()) => next.extend(core.manifest_committed(now())),
                        Err(reason) => next.extend(core.manifest_failed(now(), reason)),
                    },
                    CoordAction::RemovePartial { ckpt } => remove_partial(ckpt),
                    CoordAction::Done(o) => return o,
                }
            }
            pending = next;
        }
        timers.sort_unstable();
        let t = now();
        let sleep =
            timers.first().map(|&at| Duration::from_nanos(at.saturating_sub(t))).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            ev = ev_rx.recv(), if readers_open => match ev {
                Some((i, Ok(msg))) => match core.on_message(now(), i, msg) {
                    Ok(acts) => pending = acts,
                    Err(refusal) => tracing::warn!(agent = i, %refusal, "refused message"),
                },
                Some((i, Err(e))) => {
                    tracing::warn!(agent = i, error = %e, "connection lost");
                    senders[i] = None;
                    pending = core.on_disconnect(now(), i);
                }
                None => readers_open = false,
            },
            _ = tokio::time::sleep(sleep) => {
                let t = now();
                timers.retain(|&at| at > t);
                pending = core.on_timer(t);
            }
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
