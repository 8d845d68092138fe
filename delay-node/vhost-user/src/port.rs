//! [`VhostPort`]: the vhost-user-net backend of one VM NIC, serving a unix
//! socket that QEMU connects to (one QEMU at a time; a restored VM's new QEMU
//! reconnects to the same path).
//!
//! Threads per port: one accept/connection thread (runs the vhost-user
//! message loop of the current connection through `vhost-user-backend`), one
//! vring worker per connection (TX kicks, RX refill kicks). [`VhostPort::deliver`]
//! runs on the caller's thread and writes the RX ring under the ring's lock.
//!
//! Device state: the port is *running* while both queues are started
//! (`SET_VRING_KICK` seen, no `GET_VRING_BASE` since) and enabled
//! (`SET_VRING_ENABLE 1`). The first transition out of running is the stop
//! marker ([`PortEvent::Stopped`]); QEMU sends it synchronously inside QMP
//! `stop`, before its reply. Once not running, `deliver` writes nothing, so the
//! ring indices QEMU reads with `GET_VRING_BASE` (and migrates) are final.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;

use stasis_core::clock::{mono_ns, MonoNs};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::net_hdr::{HdrLayout, OFFERED_FEATURES};
use crate::proxy;
use crate::ring::{deliver_frame, drain_tx, Delivery, RingError, MAX_TX_CHAINS_PER_DRAIN};

/// Frames a port hands to its consumer before the consumer says it took them
/// ([`VhostPort::tx_consumed`]): beyond this the port leaves the guest's
/// chains in its TX ring (the guest sees a full ring, as with a slow NIC)
/// instead of copying more of its memory into the host. 1024 frames are at
/// most 64 MiB per port and far more than a TCG guest sends between two
/// turns of the node's loop.
pub const MAX_TX_BACKLOG: usize = 1024;

type Bitmap = BitmapMmapRegion;
type Mem = GuestMemoryAtomic<GuestMemoryMmap<Bitmap>>;

const RX: usize = 0;
const TX: usize = 1;
const NUM_QUEUES: usize = 2;
/// Largest ring QEMU may configure (its default is 256 for both queues).
const MAX_QUEUE_SIZE: usize = 1024;

/// What a port reports to its owner. Called on the port's own threads; the
/// callback must not block for long (it delays the guest's TX ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEvent {
    /// A frame the guest transmitted (Ethernet, no FCS, no virtio header).
    Frame(Vec<u8>),
    /// The guest posted receive buffers: a good moment to retry frames that
    /// [`VhostPort::deliver`] refused.
    RxReady,
    /// Both queues are started and enabled: `deliver` can succeed.
    Started,
    /// The device stopped (QMP `stop`, migration end, guest reset or QEMU gone).
    /// `at` is when the first stop message was handled; nothing is written to
    /// the guest after it.
    Stopped { at: MonoNs },
    /// QEMU closed the socket. The port keeps listening for the next QEMU.
    Disconnected,
}

/// Errors of [`VhostPort`] operations.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot listen on {path}: {msg}")]
    Listen { path: PathBuf, msg: String },
    #[error("cannot spawn the port thread")]
    Spawn(#[source] io::Error),
    #[error("receive ring")]
    Ring(#[from] RingError),
}

/// Counters of one port since it was created (all connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames taken from the guest's TX ring.
    pub tx_frames: u64,
    /// Frames published in the guest's RX ring.
    pub rx_frames: u64,
    /// `deliver` calls refused for lack of a buffer or a stopped device.
    pub rx_refused: u64,
    /// TX chains refused because their length cannot be a frame (the guest
    /// got them back as used, nothing was read).
    pub tx_refused: u64,
    /// QEMU connections accepted.
    pub connections: u64,
}

type Callback = Box<dyn FnMut(PortEvent) + Send>;

#[derive(Default)]
struct QueueFlags {
    ready: bool,
    enabled: bool,
}

#[derive(Default)]
struct RunState {
    queues: [QueueFlags; NUM_QUEUES],
    running: bool,
}

/// The current connection's rings, as `deliver` needs them.
struct Conn {
    rx: NetVring,
    tx: NetVring,
    mem: Mem,
}

struct Shared {
    name: String,
    events: Mutex<Callback>,
    conn: Mutex<Option<Conn>>,
    run: Mutex<RunState>,
    acked_features: AtomicU64,
    /// `hold()` in force: no guest-memory writes (RX or TX) at all.
    held: AtomicBool,
    /// A TX kick arrived while held.
    tx_pending: AtomicBool,
    shutdown: AtomicBool,
    /// The current QEMU connection, to cut it on drop.
    shutdown_handle: Mutex<Option<UnixStream>>,
    tx_frames: AtomicU64,
    tx_refused: AtomicU64,
    /// Frames emitted and not yet acknowledged by the consumer.
    tx_backlog: AtomicUsize,
    rx_frames: AtomicU64,
    rx_refused: AtomicU64,
    connections: AtomicU64,
}

impl Shared {
    fn emit(&self, ev: PortEvent) {
        let mut cb = self.events.lock().unwrap_or_else(|p| p.into_inner());
        (cb)(ev);
    }

    /// Records a queue flag change and emits Started/Stopped on transitions.
    fn queue_changed(&self, index: usize, ready: Option<bool>, enabled: Option<bool>) {
        let at = mono_ns();
        tracing::trace!(port = %self.name, index, ?ready, ?enabled, "queue state");
        let transition = {
            let mut run = self.run.lock().unwrap_or_else(|p| p.into_inner());
            let q = &mut run.queues[index];
            if let Some(r) = ready {
                q.ready = r;
            }
            if let Some(e) = enabled {
                q.enabled = e;
            }
            let now = run.queues.iter().all(|q| q.ready && q.enabled);
            let was = std::mem::replace(&mut run.running, now);
            (was, now)
        };
        match transition {
            (false, true) => {
                info!(port = %self.name, "device started");
                self.emit(PortEvent::Started);
            }
            (true, false) => {
                info!(port = %self.name, queue = index, "device stopped");
                self.emit(PortEvent::Stopped { at });
            }
            _ => {}
        }
    }

    fn layout(&self) -> HdrLayout {
        HdrLayout::from_features(self.acked_features.load(Ordering::Acquire))
    }
}

thread_local! {
    /// Vrings created by `VhostUserDaemon::new` on this thread, in queue order.
    /// `vhost-user-backend` creates the rings itself and hands them only to the
    /// backend's event handler; collecting them here is how the port gets the
    /// RX ring for `deliver` and installs its state hooks.
    static NEW_VRINGS: RefCell<Vec<NetVring>> = const { RefCell::new(Vec::new()) };
}

/// A `VringRwLock` that tells its port when the frontend starts, stops,
/// enables or disables it.
#[derive(Clone)]
pub struct NetVring {
    inner: VringRwLock<Mem>,
    hook: Arc<OnceLock<(usize, Weak<Shared>)>>,
}

impl NetVring {
    fn notify(&self, ready: Option<bool>, enabled: Option<bool>) {
        if let Some((index, shared)) = self.hook.get() {
            if let Some(shared) = shared.upgrade() {
                shared.queue_changed(*index, ready, enabled);
            }
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for NetVring {
    type G = <VringRwLock<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for NetVring {
    type G = <VringRwLock<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for NetVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let v = NetVring { inner: VringRwLock::new(mem, max_queue_size)?, hook: Arc::new(OnceLock::new()) };
        NEW_VRINGS.with(|c| c.borrow_mut().push(v.clone()));
        Ok(v)
    }
    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }
    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }
    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }
    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }
    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }
    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }
    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        self.notify(None, Some(enabled));
    }
    fn set_queue_info(&self, desc_table: u64, avail_ring: u64, used_ring: u64) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }
    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }
    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }
    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }
    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }
    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }
    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }
    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        self.notify(Some(ready), None);
    }
    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }
    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }
    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }
    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

/// The `vhost-user-backend` device implementation (one per connection).
struct NetBackend {
    shared: Arc<Shared>,
    mem: Mem,
}

impl VhostUserBackend for NetBackend {
    type Bitmap = Bitmap;
    type Vring = NetVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }
    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }
    fn acked_features(&self, features: u64) {
        debug!(port = %self.shared.name, features = format_args!("{features:#x}"), "features acked");
        self.shared.acked_features.store(features, Ordering::Release);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: QEMU shares its dirty log with us (VHOST_F_LOG_ALL); without
        // it QEMU blocks migration. Nothing else: no REPLY_ACK (see `proxy`).
        VhostUserProtocolFeatures::LOG_SHMFD
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The handler swaps the regions inside the `GuestMemoryAtomic` that
        // `Conn::mem` shares; nothing to copy.
        Ok(())
    }
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker thread never ends and dropping the
        // daemon would hang.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
    fn handle_event(&self, device_event: u16, _evset: EventSet, vrings: &[NetVring], _thread: usize) -> io::Result<()> {
        match device_event as usize {
            RX => self.shared.emit(PortEvent::RxReady),
            TX => transmit(&self.shared, &vrings[TX], &self.mem)?,
            other => warn!(port = %self.shared.name, event = other, "unexpected vring event"),
        }
        Ok(())
    }
}

/// Takes every frame the guest queued on its TX ring (unless the port is
/// held) and reports them.
fn transmit(shared: &Shared, vring: &NetVring, mem: &Mem) -> io::Result<()> {
    {
        let mut st = vring.get_mut();
        // Checked under the ring lock, so `hold()` waits for a drain in progress.
        if shared.held.load(Ordering::SeqCst) {
            shared.tx_pending.store(true, Ordering::SeqCst);
            return Ok(());
        }
        if !(st.is_enabled() && st.get_queue().ready()) {
            return Ok(());
        }
        let m = mem.memory();
        let mut any = false;
        loop {
            // Backpressure: the consumer has not taken what we gave it yet.
            // The rest stays in the ring; `tx_consumed` drains it later.
            if shared.tx_backlog.load(Ordering::SeqCst) >= MAX_TX_BACKLOG {
                shared.tx_pending.store(true, Ordering::SeqCst);
                // Checked again after the flag is up: a consumer that caught
                // up in between may have seen no pending kick.
                if shared.tx_backlog.load(Ordering::SeqCst) >= MAX_TX_BACKLOG {
                    break;
                }
            }
            let d = drain_tx(st.get_queue_mut(), &*m, shared.layout(), MAX_TX_CHAINS_PER_DRAIN)
                .map_err(io::Error::other)?;
            if d.refused > 0 {
                shared.tx_refused.fetch_add(d.refused, Ordering::Relaxed);
                warn!(port = %shared.name, chains = d.refused, "refused TX chains that cannot hold a frame");
            }
            // Report the frames before the ring lock is released: QEMU's stop
            // (GET_VRING_BASE) takes the same lock, so by the time QMP `stop`
            // returns, every frame the guest sees as sent is already in the
            // caller's queue — a save right after the stop cannot miss one,
            // however late this thread is scheduled.
            shared.tx_frames.fetch_add(d.frames.len() as u64, Ordering::Relaxed);
            shared.tx_backlog.fetch_add(d.frames.len(), Ordering::SeqCst);
            any |= !d.frames.is_empty() || d.refused > 0;
            for f in d.frames {
                shared.emit(PortEvent::Frame(f));
            }
            if !d.more {
                break;
            }
        }
        if any {
            st.signal_used_queue()?;
        }
    };
    Ok(())
}

/// One VM NIC served over vhost-user. Dropping it closes the connection
/// (QEMU sees its backend vanish) and removes the socket file.
pub struct VhostPort {
    shared: Arc<Shared>,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl VhostPort {
    /// Listens on `socket` (an existing file there is replaced) and serves
    /// QEMU connections one after another until dropped. `events` receives
    /// everything the guest and QEMU do.
    pub fn serve(socket: &Path, events: impl FnMut(PortEvent) + Send + 'static) -> Result<VhostPort, VhostError> {
        // Owner-only from the start: whoever connects drives the guest's rings.
        let listener = stasis_core::private::bind_unix(socket)
            .map_err(|e| VhostError::Listen { path: socket.to_path_buf(), msg: e.to_string() })?;
        let name = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "vhost".into());
        let shared = Arc::new(Shared {
            name: name.clone(),
            events: Mutex::new(Box::new(events)),
            conn: Mutex::new(None),
            run: Mutex::new(RunState::default()),
            acked_features: AtomicU64::new(0),
            held: AtomicBool::new(false),
            tx_pending: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            shutdown_handle: Mutex::new(None),
            tx_frames: AtomicU64::new(0),
            tx_refused: AtomicU64::new(0),
            tx_backlog: AtomicUsize::new(0),
            rx_frames: AtomicU64::new(0),
            rx_refused: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn({
                let socket = socket.to_path_buf();
                move || accept_loop(s, listener, socket)
            })
            .map_err(VhostError::Spawn)?;
        Ok(VhostPort { shared, socket: socket.to_path_buf(), thread: Some(thread) })
    }

    /// Puts one Ethernet frame into the guest's RX ring. `Ok(false)`: no free
    /// buffer, or the device is not running (the caller keeps the frame).
    /// `Ok(true)`: the frame is in the used ring, so from now on it is in the
    /// guest's memory (and in any checkpoint taken after this call).
    pub fn deliver(&self, frame: &[u8]) -> Result<bool, VhostError> {
        let (rx, mem) = {
            let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
            match conn.as_ref() {
                Some(c) => (c.rx.clone(), c.mem.clone()),
                None => return Ok(self.refused()),
            }
        };
        let mut st = rx.get_mut();
        // Checked under the ring lock: a stop message or `hold()` cannot slip in between.
        if self.shared.held.load(Ordering::SeqCst) || !(st.is_enabled() && st.get_queue().ready()) {
            return Ok(self.refused());
        }
        let m = mem.memory();
        match deliver_frame(st.get_queue_mut(), &*m, frame, self.shared.layout())? {
            Delivery::Delivered { .. } => {
                if let Err(e) = st.signal_used_queue() {
                    warn!(port = %self.shared.name, error = %e, "cannot signal the guest");
                }
                self.shared.rx_frames.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Delivery::NoBuffer => Ok(self.refused()),
        }
    }

    fn refused(&self) -> bool {
        self.shared.rx_refused.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Stops every write into the guest's memory — `deliver` refuses and the
    /// TX ring is left alone — while the VM keeps running, e.g. while QEMU
    /// saves its memory in a background (live) snapshot, whose write
    /// protection does not see the port's mapping. Returns once no write is
    /// in progress. Undo with [`VhostPort::release`].
    pub fn hold(&self) {
        self.shared.held.store(true, Ordering::SeqCst);
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conn.as_ref() {
            // Taking each ring lock once waits out a deliver or drain in progress.
            drop(c.rx.get_mut());
            drop(c.tx.get_mut());
        }
    }

    /// Ends a [`VhostPort::hold`]: frames the guest queued meanwhile are taken
    /// now (reported as `Frame` events on this thread); the caller should retry
    /// the frames `deliver` refused.
    pub fn release(&self) {
        self.shared.held.store(false, Ordering::SeqCst);
        self.retry_tx();
    }

    /// The consumer of this port's events has taken `n` more `Frame`s off
    /// its queue. Until it does, at most [`MAX_TX_BACKLOG`] frames are handed
    /// out; chains left in the guest's ring meanwhile are drained here.
    pub fn tx_consumed(&self, n: usize) {
        let _ = self.shared.tx_backlog.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| Some(b.saturating_sub(n)));
        if self.shared.tx_backlog.load(Ordering::SeqCst) < MAX_TX_BACKLOG && !self.shared.held.load(Ordering::SeqCst) {
            self.retry_tx();
        }
    }

    /// Drains the TX ring now if a kick was left pending (held, or backlog).
    fn retry_tx(&self) {
        if self.shared.tx_pending.swap(false, Ordering::SeqCst) {
            let ring = {
                let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
                conn.as_ref().map(|c| (c.tx.clone(), c.mem.clone()))
            };
            if let Some((tx, mem)) = ring {
                if let Err(e) = transmit(&self.shared, &tx, &mem) {
                    warn!(port = %self.shared.name, error = %e, "transmit after release");
                }
            }
        }
    }

    /// True while [`VhostPort::hold`] is in force.
    pub fn is_held(&self) -> bool {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// True between [`PortEvent::Started`] and [`PortEvent::Stopped`].
    pub fn is_running(&self) -> bool {
        self.shared.run.lock().unwrap_or_else(|p| p.into_inner()).running
    }

    /// Counters since the port was created.
    pub fn stats(&self) -> PortStats {
        let s = &self.shared;
        PortStats {
            tx_frames: s.tx_frames.load(Ordering::Relaxed),
            tx_refused: s.tx_refused.load(Ordering::Relaxed),
            rx_frames: s.rx_frames.load(Ordering::Relaxed),
            rx_refused: s.rx_refused.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
        }
    }

    /// The socket path QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for VhostPort {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        if let Some(qemu) = self.shared.shutdown_handle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = qemu.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Waits up to 100 ms for the listener to become readable.
fn poll_readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, 100) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener, socket: PathBuf) {
    while !shared.shutdown.load(Ordering::Acquire) {
        if !poll_readable(listener.as_raw_fd()) {
            continue;
        }
        let qemu = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(port = %shared.name, error = %e, "accept failed");
                continue;
            }
        };
        if let Err(e) = serve_one(&shared, qemu, &socket) {
            warn!(port = %shared.name, error = %e, "vhost-user connection failed");
        }
        *shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *shared.shutdown_handle.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A QEMU that vanished without a stop still stopped the device.
        {
            let mut run = shared.run.lock().unwrap_or_else(|p| p.into_inner());
            let was = run.running;
            *run = RunState::default();
            drop(run);
            if was {
                shared.emit(PortEvent::Stopped { at: mono_ns() });
            }
        }
        info!(port = %shared.name, "frontend disconnected");
        shared.emit(PortEvent::Disconnected);
    }
}

/// Serves one QEMU connection: the crate's daemon listens on a private
/// socket beside ours and the shim in `proxy` relays between the two.
fn serve_one(shared: &Arc<Shared>, qemu: UnixStream, socket: &Path) -> Result<(), String> {
    let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(NetBackend { shared: shared.clone(), mem: mem.clone() });
    NEW_VRINGS.with(|c| c.borrow_mut().clear());
    let mut daemon = VhostUserDaemon::new(shared.name.clone(), backend, mem.clone()).map_err(|e| e.to_string())?;
    let vrings = NEW_VRINGS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if vrings.len() != NUM_QUEUES {
        return Err(format!("expected {NUM_QUEUES} vrings, the daemon made {}", vrings.len()));
    }
    for (i, v) in vrings.iter().enumerate() {
        let _ = v.hook.set((i, Arc::downgrade(shared)));
    }
    *shared.conn.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Conn { rx: vrings[RX].clone(), tx: vrings[TX].clone(), mem });

    let mut inner_path = socket.as_os_str().to_owned();
    inner_path.push(".backend");
    let inner_path = PathBuf::from(inner_path);
    let mut inner = Listener::new(&inner_path, true).map_err(|e| format!("private socket: {e}"))?;
    // A connect to a listening socket completes before accept, so the daemon's
    // accept below returns at once.
    let backend_end = UnixStream::connect(&inner_path).map_err(|e| format!("private socket: {e}"))?;
    let started = daemon.start(&mut inner);
    let _ = std::fs::remove_file(&inner_path);
    started.map_err(|e| e.to_string())?;
    shared.connections.fetch_add(1, Ordering::Relaxed);
    info!(port = %shared.name, "frontend connected");

    let clone = |s: &UnixStream| s.try_clone().map_err(|e| e.to_string());
    *shared.shutdown_handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone(&qemu)?);
    if shared.shutdown.load(Ordering::Acquire) {
        let _ = qemu.shutdown(Shutdown::Both);
    }
    let (q2, b2) = (clone(&qemu)?, clone(&backend_end)?);
    let replies = std::thread::Builder::new()
        .name(format!("vhost-{}-replies", shared.name))
        .spawn(move || proxy::pump_replies(b2, q2))
        .map_err(|e| e.to_string())?;
    let requests = proxy::pump_requests(qemu, backend_end, &shared.name);
    let _ = replies.join();
    let waited = match daemon.wait() {
        // QEMU closing the socket is the normal end of a connection.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = requests {
        debug!(port = %shared.name, error = %e, "request relay ended");
    }
    waited
}
