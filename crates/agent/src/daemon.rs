//! The agent daemon of one host (`stasis-agent`): it serves the coordinator
//! over the authenticated protocol of `stasis-proto`, runs this host's share
//! of a multi-host experiment (its VMs, and the delay node when it is placed
//! here), and carries out checkpoint rounds with [`AgentCore`].
//!
//! One checkpoint round, seen from one agent (instants on the agent's
//! synchronised clock: PTP when configured, else CLOCK_REALTIME):
//! ```text
//!  coordinator               agent (this module)              delay node / QEMU (local)
//!     |-- Prepare{T, lead, deadline} -->|  attach QMP + control socket, begin local part
//!     |                                 |-- freeze_at(T, lead) --------->| (delay node, if here)
//!     |                                 |   (at T) stop ---------------->| every local VM: stamps s_k
//!     |                                 |   save delay node, then VMs --->| into a pending dir of the local store
//!     |                                 |   seal the part: fsync + size + BLAKE3 of every file (crate::part)
//!     |<-- Saved{[name, bytes, blake3, s_k]} --|  or SaveFailed{reason, stops}: part removed
//!     |   (coordinator: all Saved → catalogue manifest durable = checkpoint exists)
//!     |-- Commit{D} / Abort{D} -------->|  cont each VM at s_k + D, thaw node at F + D
//!     |                                 |  Abort: remove the local part
//!     |<-- Resumed{[name, s_k, r_k]} ---|
//!     |                                 |  Commit: chunk the sealed part into the store (running, not frozen)
//!     |<-- Stored{started, commit_ns, error?} --|  error: the part is removed; the checkpoint is not restorable
//! ```
//! An agent that dies between Saved and Stored leaves the part sealed (never
//! removed as stale); the next agent commits it when it starts, and a
//! restore commits it first if it is still sealed.
//! A lost coordinator connection or silence past the deadline makes the
//! agent resume on its own ([`AgentCore::disconnected`], [`AgentCore::tick`]).
//! Operations outside rounds arrive as [`stasis_proto::msg::Request`]s: `Start` (this host's
//! VMs and/or delay node, fresh or from this host's part of a checkpoint,
//! then stopped until `ResumeAt`), `ResumeAt`, `Down`, `Status`, `Forget`.
//! One coordinator connection is served at a time; others wait.

use crate::event::{Event, EventLog, Observer, Quiet};
use crate::freeze::StopStamp;
use crate::host::{self, DelayProc, Tools, UpError, VmProc};
use crate::layout::Layout;
use crate::part;
use crate::part::part_name;
use crate::placement;
use crate::serial::ReadyWatch;
use delay_node::control::Client as DelayClient;
use futures::future::join_all;
use stasis_core::clock::{mono_ns, realtime_ns, MonoNs};
use stasis_core::spec::Experiment;
use stasis_core::versioned::{self, FormatVersion, Persisted};
use stasis_proto::msg::{CkptId, Component, ErrorCode, ErrorMsg, Op, Reply, ResumedComponent};
use stasis_proto::transport::{BindError, Connection, Listener};
use stasis_proto::{AgentAction, AgentConfig, AgentCore, AgentState, Key, Message};
use stasis_qemu::vm::Vm;
use stasis_store::manifest::{ComponentDraft, ComponentKind, ExperimentRef, FreezeReport, ManifestDraft, Timings};
use stasis_store::Store;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::Mutex;

/// The clock every instant of the protocol is read on.
pub trait SyncClock: Send + Sync + 'static {
    /// Now, in nanoseconds of the synchronised clock.
    fn now(&self) -> u64;
    /// The local CLOCK_MONOTONIC instant of synchronised instant `t`.
    fn mono_of_synced(&self, t: u64) -> MonoNs;
    /// The synchronised instant of local CLOCK_MONOTONIC instant `m`.
    fn synced_of_mono(&self, m: MonoNs) -> u64;
    /// State and error estimates for `Status` (JSON; null when none).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The agent's PTP-synchronised clock (clock-sync: statime over the host's
/// network interface; the system clock is never touched).
#[derive(Clone)]
pub struct PtpClock(pub stasis_clock_sync::SyncedClock);

impl SyncClock for PtpClock {
    fn now(&self) -> u64 {
        self.0.now().max(0) as u64
    }
    fn mono_of_synced(&self, t: u64) -> MonoNs {
        self.0.mono_at(i128::from(t))
    }
    fn synced_of_mono(&self, m: MonoNs) -> u64 {
        let off = realtime_ns() as i128 - mono_ns() as i128;
        self.0.synced_at_host((m as i128 + off).max(0) as u64).max(0) as u64
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.0.metrics()).unwrap_or(serde_json::Value::Null)
    }
}

/// CLOCK_REALTIME as the common clock (hosts kept together by NTP, or
/// network namespaces of one machine, which share it exactly).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealtimeClock;

impl SyncClock for RealtimeClock {
    fn now(&self) -> u64 {
        realtime_ns()
    }
    fn mono_of_synced(&self, t: u64) -> MonoNs {
        let off = realtime_ns() as i128 - mono_ns() as i128;
        (t as i128 - off).max(0) as u64
    }
    fn synced_of_mono(&self, m: MonoNs) -> u64 {
        let off = realtime_ns() as i128 - mono_ns() as i128;
        (m as i128 + off).max(0) as u64
    }
}

/// Deliberate failures, for fault tests and drills only.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Report every save as failed (after freezing).
    pub fail_save: bool,
    /// Wait this long after freezing before saving.
    pub save_delay: Duration,
    /// Read at each round: `fail` fails the save, `delay <ms>` waits before
    /// saving; absent or empty: no fault. Lets a test change faults without
    /// restarting the agent.
    pub file: Option<PathBuf>,
}

impl Faults {
    /// The faults of this round: (fail, delay).
    fn now(&self) -> (bool, Duration) {
        let (mut fail, mut delay) = (self.fail_save, self.save_delay);
        if let Some(text) = self.file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            for line in text.lines() {
                let mut w = line.split_whitespace();
                match (w.next(), w.next().and_then(|v| v.parse::<u64>().ok())) {
                    (Some("fail"), _) => fail = true,
                    (Some("delay"), Some(ms)) => delay = Duration::from_millis(ms),
                    _ => {}
                }
            }
        }
        (fail, delay)
    }
}

/// How the daemon runs.
#[derive(Clone)]
pub struct DaemonConfig {
    /// The one address served (never a wildcard).
    pub listen: SocketAddr,
    pub key: Key,
    /// Experiments, runtimes and this host's checkpoint parts.
    pub state_dir: PathBuf,
    pub tools: Tools,
    pub clock: Arc<dyn SyncClock>,
    pub agent: AgentConfig,
    pub faults: Faults,
    pub sessions: SessionLimits,
    /// Directories besides the default guest's that a spec's `kernel` and
    /// `initrd` may name (`stasis-agent --allow-files`).
    pub file_roots: Vec<PathBuf>,
}

/// How long a coordinator's session may stay silent. One coordinator is
/// served at a time; a coordinator that hangs, or whose host vanished
/// before TCP keepalive notices, must not lock the others out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// A session silent this long while no round runs gives way to the
    /// next authenticated coordinator waiting to be served. A live
    /// coordinator between two requests is silent for milliseconds; one
    /// that has just connected may be connecting to its other agents (up
    /// to the coordinator's connect timeout, 10 s) before its first request.
    pub takeover_idle: Duration,
    /// A session silent this long while no round runs is ended.
    pub idle_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits { takeover_idle: Duration::from_secs(15), idle_timeout: Duration::from_secs(600) }
    }
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen")]
    Bind(#[from] BindError),
}

/// Why a request failed (sent back as the reply's message).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("spec does not parse")]
    Spec(#[from] stasis_core::spec::SpecError),
    #[error("the spec has no [[host]]: not a multi-host experiment")]
    NotMultiHost,
    #[error("the spec has no host {0:?}")]
    UnknownHost(String),
    #[error("this agent listens on {listen}, but the spec places host {host:?} at {spec}")]
    WrongAgent { host: String, listen: SocketAddr, spec: SocketAddr },
    #[error("this agent runs host {running_host:?} of experiment {running:?}; run Down first")]
    Busy { running: String, running_host: String },
    #[error("{what} already runs here; run Down first")]
    AlreadyRunning { what: String },
    #[error("a checkpoint round is in progress")]
    InRound,
    #[error("nothing runs here")]
    NothingRunning,
    #[error("starting")]
    Up(#[from] UpError),
    #[error("VM {node:?} did not start")]
    Vm {
        node: String,
        #[source]
        source: stasis_qemu::vm::LaunchError,
    },
    #[error("VM {node:?} did not load its state")]
    Incoming {
        node: String,
        #[source]
        source: stasis_qemu::vm::VmError,
    },
    #[error("resuming VM {node:?}")]
    Resume {
        node: String,
        #[source]
        source: stasis_qemu::vm::VmError,
    },
    #[error("delay node")]
    Delay(#[from] delay_node::control::ControlError),
    #[error("checkpoint store")]
    Store(#[from] stasis_store::StoreError),
    #[error("this host's part")]
    Part(#[from] part::PartError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node:?}: {field} {} is outside the directories this agent boots guests from ({roots}); start the agent with --allow-files DIR to add one", path.display())]
    BootFileOutside { node: String, field: &'static str, path: PathBuf, roots: String },
    #[error("node {node:?}: {field} {}", path.display())]
    BootFile {
        node: String,
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directories a spec's kernel and initrd may come from on this agent:
/// those of its own default guest, and the configured ones (canonical).
fn boot_file_roots(cfg: &DaemonConfig) -> Vec<PathBuf> {
    // The default guest's directory counts only where its files are.
    let defaults = [&cfg.tools.default_kernel, &cfg.tools.default_initrd]
        .into_iter()
        .filter_map(|f| Some(f.canonicalize().ok()?.parent()?.to_owned()));
    let mut roots: Vec<PathBuf> = defaults.chain(cfg.file_roots.iter().filter_map(|d| d.canonicalize().ok())).collect();
    roots.dedup();
    roots
}

/// A coordinator holds the key, not this host: the kernel and initrd its
/// spec names for a node here are files this agent (root) would hand to
/// QEMU and so to the guest, so they must lie in `roots` once every symlink
/// is resolved — never `/etc/shadow` as an initrd.
fn confine_boot_files(node: &stasis_core::spec::Node, roots: &[PathBuf]) -> Result<(), RequestError> {
    for (field, path) in [("kernel", &node.kernel), ("initrd", &node.initrd)] {
        let Some(path) = path else { continue };
        let resolved = path.canonicalize().map_err(|source| RequestError::BootFile {
            node: node.name.clone(),
            field,
            path: path.clone(),
            source,
        })?;
        if !roots.iter().any(|r| resolved.starts_with(r)) {
            let shown: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(RequestError::BootFileOutside {
                node: node.name.clone(),
                field,
                path: path.clone(),
                roots: if shown.is_empty() { "none".into() } else { shown.join(", ") },
            });
        }
    }
    Ok(())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// This host's share of the running experiment.
struct Share {
    exp: Experiment,
    host: String,
    layout: Layout,
    incarnation: u32,
    delay: Option<DelayProc>,
    /// Restored from a checkpoint and not yet thawed.
    delay_frozen: bool,
    vms: Vec<VmProc>,
    /// Restored VMs, stopped until `ResumeAt`.
    stopped: Vec<(String, Vm)>,
    /// What `status` has read of each VM's serial log, so a poll reads only
    /// what the guest appended since the last one.
    ready: Vec<ReadyWatch>,
}

/// The share as persisted in `<state>/share.json` after every request, so
/// an agent that was restarted takes its running VMs and delay node back.
#[derive(serde::Serialize, serde::Deserialize)]
struct ShareRecord {
    spec_toml: String,
    host: String,
    incarnation: u32,
    delay: Option<DelayProc>,
    delay_frozen: bool,
    vms: Vec<VmProc>,
}

impl Persisted for ShareRecord {
    const FORMAT: &'static str = "stasis-share";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

fn share_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("share.json")
}

/// The share a previous life of this agent left running, if any of it runs.
fn load_share(state_dir: &std::path::Path) -> Option<Share> {
    let path = share_file(state_dir);
    let rec: ShareRecord = match versioned::read_opt(&path) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged share record");
            return None;
        }
    };
    let exp = Experiment::from_toml_str(&rec.spec_toml, None).ok()?;
    // A host with nothing placed on it still takes part in every round.
    let empty = rec.vms.is_empty() && rec.delay.is_none();
    let alive =
        rec.vms.iter().any(|v| host::pid_alive(v.pid)) || rec.delay.as_ref().is_some_and(|d| host::pid_alive(d.pid));
    if !alive && !empty {
        let _ = std::fs::remove_file(&path);
        return None;
    }
    tracing::info!(experiment = %exp.name, host = %rec.host, vms = rec.vms.len(), "took back the share a previous agent left running");
    Some(Share {
        layout: Layout::new(state_dir, &exp.name),
        exp,
        host: rec.host,
        incarnation: rec.incarnation,
        delay: rec.delay,
        delay_frozen: rec.delay_frozen,
        vms: rec.vms,
        // QMP handles of restored, still stopped VMs are gone with the old agent.
        stopped: vec![],
        ready: vec![],
    })
}

/// What the round task reports.
enum HostEvent {
    Frozen,
    Saved(Vec<Component>),
    SaveFailed(String, Vec<u64>),
    Resumed(Vec<ResumedComponent>),
    /// The sealed part's store commit ended (synchronised start, duration, error).
    Stored {
        started_ns: u64,
        commit_ns: u64,
        error: Option<String>,
    },
}

struct Agent {
    cfg: DaemonConfig,
    core: AgentCore,
    share: Option<Share>,
    host_tx: mpsc::UnboundedSender<HostEvent>,
    host_rx: mpsc::UnboundedReceiver<HostEvent>,
    resume_tx: Option<mpsc::UnboundedSender<u64>>,
    discard: Option<CkptId>,
    /// Held by every store commit of a part and every restore from one, so
    /// a part is never committed twice at once (the start-up commit of
    /// parts left sealed runs while the agent already serves).
    parts: Arc<Mutex<()>>,
}

/// Serve until the process is killed.
pub async fn serve(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let mut listener = Listener::bind(cfg.listen, cfg.key.clone()).await?;
    tracing::info!(addr = %listener.local_addr(), "agent listening");
    let (host_tx, host_rx) = mpsc::unbounded_channel();
    let share = load_share(&cfg.state_dir);
    let parts = Arc::new(Mutex::new(()));
    // Parts a previous agent sealed but never committed (it died between
    // SAVED and its store commit): the coordinator may list them.
    let guard = parts.clone().lock_owned().await;
    let state_dir = cfg.state_dir.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let done = stasis_core::background::run(|| part::store_all_sealed(&state_dir));
        if !done.is_empty() {
            tracing::info!(parts = ?done, "committed the parts left sealed");
        }
    });
    let mut agent =
        Agent { core: AgentCore::new(cfg.agent), cfg, share, host_tx, host_rx, resume_tx: None, discard: None, parts };
    let mut next = None;
    loop {
        let conn = match next.take() {
            Some(conn) => conn,
            None => match listener.accept().await {
                Ok(conn) => conn,
                // Logged by the listener; it keeps serving.
                Err(refused) => {
                    tracing::debug!(peer = %refused.peer, "refused");
                    continue;
                }
            },
        };
        tracing::info!(peer = %conn.peer(), "coordinator connected");
        next = agent.session(conn, &mut listener).await;
    }
}

impl Agent {
    fn now(&self) -> u64 {
        self.cfg.clock.now()
    }

    /// No round runs and none is to resume: a session may end or give way.
    fn idle(&self) -> bool {
        self.core.state() == &AgentState::Idle && self.resume_tx.is_none()
    }

    /// [`Agent::idle`], and nothing restored here waits for its `ResumeAt`:
    /// the session may give way to another coordinator or time out.
    fn may_let_go(&self) -> bool {
        self.idle() && self.share.as_ref().is_none_or(|s| s.stopped.is_empty() && !s.delay_frozen)
    }

    /// Serve one coordinator until it leaves, its session times out, or
    /// (silent and idle, see [`SessionLimits`]) a new authenticated
    /// coordinator takes over: then that connection is returned, to be
    /// served next.
    async fn session(&mut self, conn: Connection, listener: &mut Listener) -> Option<Connection> {
        let peer = conn.peer();
        let limits = self.cfg.sessions;
        let mut next = None;
        let mut last_heard = tokio::time::Instant::now();
        let (tx, mut rx) = conn.into_split();
        let mut tx = Some(tx);
        let (net_tx, mut net_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let r = rx.recv().await;
                let stop = r.is_err();
                if net_tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        let mut timer: Option<u64> = None;
        loop {
            if tx.is_none() && self.idle() {
                break;
            }
            let sleep = timer
                .map(|at| Duration::from_nanos(at.saturating_sub(self.now())))
                .unwrap_or(Duration::from_secs(3600));
            // While idle and connected: past `takeover_idle` of silence a
            // waiting coordinator is taken, past `idle_timeout` the session
            // ends; `wake` re-evaluates at the next of those instants.
            let watch = tx.is_some() && self.may_let_go();
            let silent = last_heard.elapsed();
            let may_take_over = watch && silent >= limits.takeover_idle;
            let wake =
                last_heard + if silent < limits.takeover_idle { limits.takeover_idle } else { limits.idle_timeout };
            let acts = tokio::select! {
                c = listener.accept(), if may_take_over => match c {
                    Ok(conn) => {
                        tracing::warn!(%peer, new = %conn.peer(), silent_ms = silent.as_millis() as u64,
                            "the idle coordinator session gives way to a new coordinator");
                        next = Some(conn);
                        tx = None;
                        vec![]
                    }
                    Err(refused) => {
                        tracing::debug!(peer = %refused.peer, "refused");
                        vec![]
                    }
                },
                _ = tokio::time::sleep_until(wake), if watch => {
                    if last_heard.elapsed() >= limits.idle_timeout {
                        tracing::warn!(%peer, silent_s = limits.idle_timeout.as_secs(), "coordinator silent: session ended");
                        tx = None;
                    }
                    vec![]
                }
                m = net_rx.recv(), if tx.is_some() => { last_heard = tokio::time::Instant::now(); match m {
                    Some(Ok(Message::Request(r))) => {
                        let reply = if self.core.state() == &AgentState::Idle && self.resume_tx.is_none() {
                            let reply = self.request(r.op).await;
                            self.persist();
                            reply
                        } else {
                            Err(RequestError::InRound)
                        };
                        let reply = match reply {
                            Ok(detail) => Reply { id: r.id, ok: true, message: String::new(), detail: detail.to_string() },
                            Err(e) => {
                                tracing::warn!(error = %chain(&e), "request failed");
                                Reply { id: r.id, ok: false, message: chain(&e), detail: "null".into() }
                            }
                        };
                        vec![AgentAction::Send(Message::Reply(reply))]
                    }
                    Some(Ok(msg)) => {
                        let name = msg.name();
                        match self.core.on_message(self.now(), msg) {
                            Ok(acts) => acts,
                            Err(refusal) => {
                                tracing::warn!(%refusal, got = name, "refused");
                                vec![AgentAction::Send(Message::Error(ErrorMsg { code: ErrorCode::OutOfOrder, message: refusal.to_string() }))]
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "coordinator connection lost");
                        tx = None;
                        self.core.disconnected(self.now())
                    }
                    None => {
                        tx = None;
                        self.core.disconnected(self.now())
                    }
                }},
                ev = self.host_rx.recv() => match ev.expect("the agent holds a sender") {
                    HostEvent::Frozen => self.core.frozen(self.now()).unwrap_or_default(),
                    HostEvent::Saved(c) => self.core.saved(self.now(), c).unwrap_or_default(),
                    HostEvent::SaveFailed(reason, stops) => self.core.save_failed(self.now(), reason, stops).unwrap_or_default(),
                    HostEvent::Resumed(c) => {
                        self.resume_tx = None;
                        if let Some(ckpt) = self.discard.take() {
                            self.forget(ckpt);
                        }
                        self.core.resumed(self.now(), c).unwrap_or_default()
                    }
                    HostEvent::Stored { started_ns, commit_ns, error } => {
                        self.core.stored(self.now(), started_ns, commit_ns, error).unwrap_or_default()
                    }
                },
                _ = tokio::time::sleep(sleep) => {
                    timer = None;
                    self.core.tick(self.now())
                }
            };
            for a in acts {
                match a {
                    AgentAction::Send(m) => {
                        if let Some(t) = tx.as_mut() {
                            if let Err(e) = t.send(&m).await {
                                tracing::warn!(error = %e, "cannot send to the coordinator");
                                tx = None;
                                // Handled like a lost connection on the next turn.
                                let more = self.core.disconnected(self.now());
                                self.carry_out_local(more, &mut timer);
                            }
                        }
                    }
                    other => self.carry_out_local(vec![other], &mut timer),
                }
            }
        }
        reader.abort();
        tracing::info!(%peer, "coordinator session ended");
        next
    }

    fn carry_out_local(&mut self, acts: Vec<AgentAction>, timer: &mut Option<u64>) {
        for a in acts {
            match a {
                AgentAction::FreezeAndSave { ckpt, at, hold_lead_ns } => self.start_round(ckpt, at, hold_lead_ns),
                AgentAction::Resume { ckpt, after_ns } => match self.resume_tx.as_ref() {
                    Some(tx) => {
                        let _ = tx.send(after_ns);
                    }
                    None => {
                        tracing::warn!(%ckpt, "resume without a round task");
                        let _ = self.host_tx.send(HostEvent::Resumed(vec![]));
                    }
                },
                // After the resume when one is under way (an Abort), else now
                // (a part whose store commit failed).
                AgentAction::Discard { ckpt } if self.resume_tx.is_some() => self.discard = Some(ckpt),
                AgentAction::Discard { ckpt } => self.forget(ckpt),
                AgentAction::StorePart { ckpt } => self.store_part(ckpt),
                AgentAction::SetTimer { at } => *timer = Some(timer.map_or(at, |t| t.min(at))),
                AgentAction::Send(_) => unreachable!("sends are handled by the session"),
            }
        }
    }

    /// Record the share (or its absence) for a restarted agent.
    fn persist(&self) {
        let path = share_file(&self.cfg.state_dir);
        let Some(s) = &self.share else {
            let _ = std::fs::remove_file(&path);
            return;
        };
        let rec = ShareRecord {
            spec_toml: s.exp.to_toml(),
            host: s.host.clone(),
            incarnation: s.incarnation,
            delay: s.delay.clone(),
            delay_frozen: s.delay_frozen,
            vms: s.vms.clone(),
        };
        if let Err(e) = versioned::write_atomic(&path, &rec) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the share");
        }
    }

    fn start_round(&mut self, ckpt: CkptId, at: u64, hold_lead_ns: u64) {
        let (resume_tx, resume_rx) = mpsc::unbounded_channel();
        self.resume_tx = Some(resume_tx);
        let job = RoundJob {
            ckpt,
            at,
            hold_lead_ns,
            clock: self.cfg.clock.clone(),
            faults: self.cfg.faults.clone(),
            share: self.share.as_ref().map(|s| ShareView {
                exp: ExperimentRef { name: s.exp.name.clone(), digest: s.exp.digest(), spec_toml: s.exp.to_toml() },
                store_root: s.layout.checkpoints(),
                events: s.layout.events_file(),
                delay: s.delay.clone(),
                vms: s.vms.clone(),
            }),
        };
        tokio::spawn(job.run(self.host_tx.clone(), resume_rx));
    }

    fn forget(&self, ckpt: CkptId) {
        let Some(s) = &self.share else { return };
        part::remove(&s.layout.checkpoints(), ckpt);
    }

    /// Commit this host's sealed part of `ckpt` into its store, in the
    /// background (everything runs again), then report [`HostEvent::Stored`].
    fn store_part(&self, ckpt: CkptId) {
        let tx = self.host_tx.clone();
        let clock = self.cfg.clock.clone();
        let parts = self.parts.clone();
        let share = self.share.as_ref().map(|s| (s.layout.checkpoints(), s.layout.events_file()));
        tokio::spawn(async move {
            let _guard = parts.lock().await;
            let t0 = mono_ns();
            let result = match share {
                None => Err("nothing runs on this host".to_owned()),
                Some((root, events)) => {
                    let r = tokio::task::spawn_blocking(move || {
                        // The guests run again: the commit takes only the CPU they leave.
                        let r = stasis_core::background::run(|| part::store(&root, ckpt));
                        if let Ok(info) = &r {
                            EventLog::open(&events, &Quiet)
                                .event(&Event::Committed { checkpoint: info.id.clone(), name: part_name(ckpt) });
                        }
                        r
                    })
                    .await;
                    match r {
                        Ok(r) => r.map(|_| ()).map_err(|e| chain(&e)),
                        Err(e) => Err(format!("the store commit task failed: {e}")),
                    }
                }
            };
            let commit_ns = mono_ns() - t0;
            match &result {
                Ok(()) => tracing::info!(%ckpt, commit_ms = commit_ns as f64 / 1e6, "part stored"),
                Err(e) => tracing::error!(%ckpt, error = %e, "this host's part could not be stored"),
            }
            let _ = tx.send(HostEvent::Stored { started_ns: clock.synced_of_mono(t0), commit_ns, error: result.err() });
        });
    }

    async fn request(&mut self, op: Op) -> Result<serde_json::Value, RequestError> {
        match op {
            Op::Start { spec_toml, host, delay, vms, restore } => {
                self.start(&spec_toml, &host, delay, vms, restore).await
            }
            Op::ResumeAt { at } => self.resume_at(at).await,
            Op::Down => Ok(serde_json::json!({ "stopped": self.down().await })),
            Op::Status => Ok(self.status()),
            Op::Forget { ckpt } => {
                self.forget(ckpt);
                Ok(serde_json::Value::Null)
            }
        }
    }

    async fn start(
        &mut self,
        spec_toml: &str,
        host: &str,
        delay: bool,
        vms: bool,
        restore: Option<CkptId>,
    ) -> Result<serde_json::Value, RequestError> {
        let exp = Experiment::from_toml_str(spec_toml, None)?;
        let placement = exp.placement.as_ref().ok_or(RequestError::NotMultiHost)?;
        let me = placement.host(host).ok_or_else(|| RequestError::UnknownHost(host.into()))?;
        if me.agent != self.cfg.listen {
            return Err(RequestError::WrongAgent { host: host.into(), listen: self.cfg.listen, spec: me.agent });
        }
        if let Some(s) = &self.share {
            if s.exp.name != exp.name || s.host != host {
                return Err(RequestError::Busy { running: s.exp.name.clone(), running_host: s.host.clone() });
            }
        }
        if vms {
            let roots = boot_file_roots(&self.cfg);
            for node in placement::nodes_on(&exp, host) {
                confine_boot_files(node, &roots)?;
            }
        }
        if self.share.is_none() {
            let layout = Layout::new(&self.cfg.state_dir, &exp.name);
            stasis_core::private::create_dir_all(layout.root())
                .map_err(|source| RequestError::Io { path: layout.root().to_owned(), source })?;
            let incarnation = host::next_incarnation(&layout)?;
            self.share = Some(Share {
                exp: exp.clone(),
                host: host.into(),
                layout,
                incarnation,
                delay: None,
                delay_frozen: false,
                vms: vec![],
                stopped: vec![],
                ready: vec![],
            });
        }
        let share = self.share.as_mut().expect("set above");
        let layout = share.layout.clone();
        let part = match restore {
            Some(ckpt)
                if (delay && placement::runs_delay_node(&exp, host))
                    || (vms && !placement::nodes_on(&exp, host).is_empty()) =>
            {
                let _guard = self.parts.lock().await;
                let c = part::open(&layout.checkpoints(), ckpt)?;
                Some(c.materialized(&layout.root().join("restore"))?)
            }
            _ => None,
        };
        let mut started = serde_json::Map::new();
        if delay && placement::runs_delay_node(&exp, host) {
            if share.delay.as_ref().is_some_and(|d| host::pid_alive(d.pid)) {
                return Err(RequestError::AlreadyRunning { what: "the delay node".into() });
            }
            let topo = placement::topology_on_delay_host(&exp, &layout);
            let state = part.as_ref().map(|c| c.file("delay-node"));
            let d = host::spawn_delay_node(&layout, &self.cfg.tools, &topo, share.incarnation, state.as_deref())?;
            started.insert("delay-node".into(), d.pid.into());
            share.delay_frozen = state.is_some();
            share.delay = Some(d);
        }
        if vms {
            for node in placement::nodes_on(&exp, host) {
                if share.vms.iter().any(|v| v.name == node.name && host::pid_alive(v.pid)) {
                    return Err(RequestError::AlreadyRunning { what: format!("VM {}", node.name) });
                }
                let spec = placement::vm_spec_on_host(&exp, node, &layout, &self.cfg.tools)?;
                stasis_core::private::create_dir_all(&spec.run_dir)
                    .map_err(|source| RequestError::Io { path: spec.run_dir.clone(), source })?;
                let serial = layout.serial_log(&node.name, share.incarnation);
                let incoming = part.as_ref().map(|c| c.file(&format!("vm-{}", node.name)));
                let mut vm = Vm::launch(&spec, &serial, incoming.as_deref())
                    .await
                    .map_err(|source| RequestError::Vm { node: node.name.clone(), source })?;
                share.vms.retain(|v| v.name != node.name);
                share.vms.push(VmProc {
                    name: node.name.clone(),
                    pid: vm.pid,
                    qmp: vm.qmp_path.clone(),
                    serial_log: serial,
                    disk: None,
                    machine: vm.machine.clone(),
                    base: None,
                });
                started.insert(node.name.clone(), vm.pid.into());
                if incoming.is_some() {
                    vm.wait_incoming(Duration::from_secs(120))
                        .await
                        .map_err(|source| RequestError::Incoming { node: node.name.clone(), source })?;
                    share.stopped.push((node.name.clone(), vm));
                }
            }
        }
        Ok(serde_json::Value::Object(started))
    }

    async fn resume_at(&mut self, at: u64) -> Result<serde_json::Value, RequestError> {
        let share = self.share.as_mut().ok_or(RequestError::NothingRunning)?;
        let clock = self.cfg.clock.clone();
        let t = clock.mono_of_synced(at);
        let mut stopped = std::mem::take(&mut share.stopped);
        let vm_futs = stopped.iter_mut().map(|(node, vm)| async move {
            let r = host::cont_vm_at(vm, t, 0, false).await;
            (node.clone(), r)
        });
        let delay = if share.delay_frozen { share.delay.as_ref().map(|d| d.control.clone()) } else { None };
        let node_fut = async move {
            match delay {
                Some(control) => {
                    let mut c = DelayClient::connect(&control).await?;
                    c.thaw_at(t).await.map(|r| Some(r.thawed_at))
                }
                None => Ok(None),
            }
        };
        let (results, thaw) = futures::join!(join_all(vm_futs), node_fut);
        share.delay_frozen = false;
        let mut out = serde_json::Map::new();
        if let Some(at) = thaw? {
            out.insert("delay-node".into(), clock.synced_of_mono(at).into());
        }
        for (node, r) in results {
            let s = r.map_err(|source| RequestError::Resume { node: node.clone(), source })?;
            out.insert(node, clock.synced_of_mono(s.instant()).into());
        }
        Ok(serde_json::Value::Object(out))
    }

    async fn down(&mut self) -> usize {
        let Some(share) = self.share.take() else { return 0 };
        drop(share.stopped);
        let mut pids: Vec<(u32, &std::path::Path)> = share.vms.iter().map(|v| (v.pid, v.qmp.as_path())).collect();
        if let Some(d) = &share.delay {
            pids.push((d.pid, d.control.as_path()));
        }
        let mut killed = Vec::new();
        for &(pid, own) in &pids {
            if host::pid_alive(pid) && host::is_ours(pid, own) {
                // SAFETY: plain kill(2) of a process this agent started (checked above).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                killed.push(pid);
            }
        }
        for &pid in &killed {
            for _ in 0..200 {
                if !host::pid_alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = std::fs::remove_dir_all(share.layout.run_dir().join("p"));
        tracing::info!(killed = killed.len(), "share stopped");
        killed.len()
    }

    fn status(&mut self) -> serde_json::Value {
        let Some(s) = &mut self.share else {
            return serde_json::json!({ "running": false, "clock": self.cfg.clock.metrics() });
        };
        // One watch per current serial log (a restore starts new ones).
        s.ready.retain(|w| s.vms.iter().any(|v| v.serial_log == w.path()));
        for v in &s.vms {
            if !s.ready.iter().any(|w| w.path() == v.serial_log) {
                s.ready.push(ReadyWatch::new(&v.serial_log));
            }
        }
        let ready: Vec<bool> = s
            .vms
            .iter()
            .map(|v| s.ready.iter_mut().find(|w| w.path() == v.serial_log).is_some_and(|w| w.poll().unwrap_or(false)))
            .collect();
        let s = &*s;
        let vms: Vec<_> = s
            .vms
            .iter()
            .zip(ready)
            .map(|(v, ready)| {
                serde_json::json!({ "name": v.name, "pid": v.pid, "alive": host::pid_alive(v.pid), "ready": ready, "console": v.serial_log })
            })
            .collect();
        // Every part held, committed or sealed (the coordinator removes those
        // of checkpoints it does not list).
        let (committed, sealed) = part::names(&s.layout.checkpoints());
        let parts: Vec<String> = committed.into_iter().chain(sealed.iter().cloned()).collect();
        serde_json::json!({
            "running": true,
            "experiment": s.exp.name,
            "host": s.host,
            "incarnation": s.incarnation,
            "delay_node": s.delay.as_ref().map(|d| serde_json::json!({ "pid": d.pid, "alive": host::pid_alive(d.pid) })),
            "vms": vms,
            "parts": parts,
            "sealed": sealed,
            "clock": self.cfg.clock.metrics(),
        })
    }
}

/// What a round needs of the share (cloned: the task runs on its own).
struct ShareView {
    exp: ExperimentRef,
    store_root: PathBuf,
    /// `<state>/<exp>/events.jsonl` (crate::event), as on one host.
    events: PathBuf,
    delay: Option<DelayProc>,
    vms: Vec<VmProc>,
}

struct RoundJob {
    ckpt: CkptId,
    at: u64,
    hold_lead_ns: u64,
    clock: Arc<dyn SyncClock>,
    faults: Faults,
    share: Option<ShareView>,
}

/// The frozen state of one round, kept until the resume.
struct Frozen {
    vms: Vec<(String, Vm, Option<StopStamp>)>,
    delay: Option<(DelayClient, MonoNs)>,
}

impl RoundJob {
    async fn run(self, ev: mpsc::UnboundedSender<HostEvent>, mut resume_rx: mpsc::UnboundedReceiver<u64>) {
        let (frozen, outcome) = self.freeze_and_save(&ev).await;
        let _ = ev.send(match outcome {
            Ok(c) => HostEvent::Saved(c),
            Err((reason, stops)) => {
                tracing::warn!(ckpt = %self.ckpt, %reason, "save failed");
                HostEvent::SaveFailed(reason, stops)
            }
        });
        // Commit or Abort (or an orphaned agent's own decision) names D.
        let Some(d) = resume_rx.recv().await else { return };
        let resumed = self.resume(frozen, d).await;
        let _ = ev.send(HostEvent::Resumed(resumed));
    }

    async fn freeze_and_save(
        &self,
        ev: &mpsc::UnboundedSender<HostEvent>,
    ) -> (Frozen, Result<Vec<Component>, (String, Vec<u64>)>) {
        let mut frozen = Frozen { vms: vec![], delay: None };
        let Some(share) = &self.share else {
            let _ = ev.send(HostEvent::Frozen);
            return (frozen, Err(("nothing runs on this host".into(), vec![])));
        };
        let clock = &self.clock;
        let t = clock.mono_of_synced(self.at);
        let log = EventLog::open(&share.events, &Quiet);
        let ckpt_name = part_name(self.ckpt);
        log.event(&Event::Planned { checkpoint: ckpt_name.clone(), freeze_at: t });
        let fail = |frozen: Frozen, reason: String| {
            log.event(&Event::Aborted { checkpoint: ckpt_name.clone(), reason: reason.clone() });
            let stops =
                frozen.vms.iter().filter_map(|(_, _, s)| s.map(|s| clock.synced_of_mono(s.instant()))).collect();
            (frozen, Err((reason, stops)))
        };
        // Attach before T.
        for v in &share.vms {
            match Vm::attach(&v.name, &v.qmp, v.pid).await {
                Ok(vm) => frozen.vms.push((v.name.clone(), vm, None)),
                Err(e) => return fail(frozen, format!("cannot reach VM {}: {e}", v.name)),
            }
        }
        if let Some(d) = &share.delay {
            match DelayClient::connect(&d.control).await {
                Ok(mut c) => match c.freeze_at(t, self.hold_lead_ns).await {
                    Ok(()) => frozen.delay = Some((c, t)),
                    Err(e) => return fail(frozen, format!("delay node refused the freeze: {e}")),
                },
                Err(e) => return fail(frozen, format!("cannot reach the delay node: {e}")),
            }
        }
        let store = match Store::open(&share.store_root) {
            Ok(s) => s,
            Err(e) => return fail(frozen, format!("checkpoint store: {e}")),
        };
        let pending = match store.begin(Some(&part_name(self.ckpt))) {
            Ok(p) => p,
            Err(e) => return fail(frozen, format!("checkpoint store: {e}")),
        };
        // Stop every VM at T. The host-clock instants of the plan and of the
        // wake-up are logged: agents on one machine share the real clock, so
        // their spread across agents is the true freeze skew (clock error,
        // then actuation).
        let planned_realtime_ns = (t as i128 + realtime_ns() as i128 - mono_ns() as i128) as u64;
        host::sleep_until(t).await;
        tracing::info!(ckpt = %self.ckpt, planned_realtime_ns, fired_realtime_ns = realtime_ns(), "freeze fired");
        let stops = join_all(frozen.vms.iter_mut().map(|(_, vm, _)| vm.stop())).await;
        let mut failure = None;
        for ((node, vm, stamp), r) in frozen.vms.iter_mut().zip(stops) {
            match r {
                Ok(s) => {
                    log.event(&Event::Stopped { component: node.clone(), sent: s.sent, replied: s.replied });
                    *stamp = Some(StopStamp {
                        sent: s.sent,
                        replied: s.replied,
                        reported: host::reported_instant(vm, "STOP"),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(format!("stopping VM {node}: {e}"));
                }
            }
        }
        let _ = ev.send(HostEvent::Frozen);
        tracing::info!(ckpt = %self.ckpt, vms = frozen.vms.len(), "frozen");
        let (fail_save, save_delay) = self.faults.now();
        if !save_delay.is_zero() {
            tracing::warn!(?save_delay, "fault drill: delaying the save");
            tokio::time::sleep(save_delay).await;
        }
        if fail_save {
            failure.get_or_insert("injected save failure (fault drill)".into());
        }
        let mut drafts = Vec::new();
        let mut node_report = None;
        if failure.is_none() {
            if let Some((c, _)) = frozen.delay.as_mut() {
                let t0 = mono_ns();
                match c.save(&pending.path("delay-node")).await {
                    Ok(r) => {
                        log.event(&Event::Saved {
                            component: "delay-node".into(),
                            bytes: r.bytes,
                            save_ns: mono_ns() - t0,
                        });
                        node_report = Some((r, mono_ns() - t0));
                    }
                    Err(e) => failure = Some(format!("saving the delay node: {e}")),
                }
            }
        }
        if let (Some((r, _)), Some((_, at))) = (&node_report, frozen.delay.as_mut()) {
            *at = r.frozen_at;
        }
        if failure.is_none() {
            let saves = join_all(frozen.vms.iter_mut().map(|(node, vm, _)| {
                let path = pending.path(&format!("vm-{node}"));
                async move {
                    let t0 = mono_ns();
                    (vm.save(&path).await, mono_ns() - t0)
                }
            }))
            .await;
            for ((node, _, stamp), (r, save_ns)) in frozen.vms.iter().zip(saves) {
                match r {
                    Ok(rep) => {
                        log.event(&Event::Saved { component: node.clone(), bytes: rep.bytes, save_ns });
                        let stop = stamp.map(|s| s.instant()).unwrap_or(t);
                        drafts.push(ComponentDraft {
                            name: node.clone(),
                            kind: ComponentKind::Vm,
                            file: format!("vm-{node}"),
                            stop_ns: stop,
                            resume_ns: 0,
                            frozen_ns: 0,
                            save_ns,
                        });
                    }
                    Err(e) => {
                        failure.get_or_insert(format!("saving VM {node}: {e}"));
                    }
                }
            }
        }
        if let Some(reason) = failure {
            pending.abort();
            return fail(frozen, reason);
        }
        let (frames_in_flight, frames_held) =
            node_report.as_ref().map(|(r, _)| (r.frames_in_flight, r.frames_held)).unwrap_or((0, 0));
        if let (Some((_, save_ns)), Some((_, at))) = (&node_report, &frozen.delay) {
            drafts.push(ComponentDraft {
                name: "delay-node".into(),
                kind: ComponentKind::DelayNode,
                file: "delay-node".into(),
                stop_ns: *at,
                resume_ns: 0,
                frozen_ns: 0,
                save_ns: *save_ns,
            });
        }
        let stops: Vec<u64> = drafts.iter().map(|d| d.stop_ns).collect();
        let skew = stops.iter().max().unwrap_or(&0) - stops.iter().min().unwrap_or(&0);
        let draft = ManifestDraft {
            parent: None,
            experiment: share.exp.clone(),
            components: drafts,
            files: vec![],
            freeze: FreezeReport {
                planned_ns: t,
                lead_ns: self.hold_lead_ns,
                stop_skew_ns: skew,
                frozen_duration_ns: 0,
                frames_in_flight,
                frames_held,
            },
            timings: Timings { total_save_ns: mono_ns().saturating_sub(t), commit_ns: 0, extra: Default::default() },
        };
        // Durable before SAVED: once the coordinator's manifest names this
        // part, it exists here. Sealed, not committed: the files are fsynced
        // and hashed (from the page cache, each fsync beside its hashing,
        // right after the save — QEMU writes through its own migration
        // channel, so hashing while writing would cost a copy through this
        // process); the chunking waits until everything runs again.
        let saved_at = mono_ns();
        let by_file: Vec<(String, String, u64)> =
            draft.components.iter().map(|c| (c.file.clone(), c.name.clone(), c.stop_ns)).collect();
        let sealed = match pending.seal(draft) {
            Ok(s) => s,
            Err(e) => return fail(frozen, format!("sealing this host's part: {}", chain(&e))),
        };
        tracing::info!(
            ckpt = %self.ckpt,
            stopped_late_ms = stops.iter().map(|s| s.saturating_sub(t)).max().unwrap_or(0) as f64 / 1e6,
            save_ms = saved_at.saturating_sub(t) as f64 / 1e6,
            seal_ms = (mono_ns() - saved_at) as f64 / 1e6,
            "part saved"
        );
        let components = sealed
            .files()
            .iter()
            .filter_map(|f| {
                let (_, name, stop) = by_file.iter().find(|(file, _, _)| *file == f.file)?;
                Some(Component {
                    name: name.clone(),
                    bytes: f.bytes,
                    blake3: hex32(&f.blake3),
                    stop_ns: clock.synced_of_mono(*stop),
                })
            })
            .collect();
        (frozen, Ok(components))
    }

    /// Resume every stopped VM at its own stop + `d`, the delay node at its
    /// freeze + `d`.
    async fn resume(&self, mut frozen: Frozen, d: u64) -> Vec<ResumedComponent> {
        let clock = &self.clock;
        let log = self.share.as_ref().map(|s| EventLog::open(&s.events, &Quiet));
        let vm_futs = frozen.vms.iter_mut().filter_map(|(node, vm, s)| {
            let s = (*s)?;
            let at = s.instant() + d;
            Some(async move {
                let r = host::cont_vm_at(vm, at, 0, false).await;
                (node.clone(), s.instant(), r)
            })
        });
        let node_fut = async {
            match frozen.delay.as_mut() {
                Some((c, at)) => Some((*at, c.thaw_at(*at + d).await)),
                None => None,
            }
        };
        let (vms, node) = futures::join!(join_all(vm_futs), node_fut);
        let mut out = Vec::new();
        for (node, stop, r) in vms {
            match r {
                Ok(s) => {
                    if let Some(l) = &log {
                        l.event(&Event::Resumed { component: node.clone(), at: s.instant(), planned: stop + d });
                    }
                    out.push(ResumedComponent {
                        name: node,
                        stop_ns: clock.synced_of_mono(stop),
                        resume_ns: clock.synced_of_mono(s.instant()),
                    });
                }
                Err(e) => tracing::error!(%node, error = %e, "VM did not resume"),
            }
        }
        match node {
            Some((at, Ok(r))) => {
                if let Some(l) = &log {
                    l.event(&Event::Resumed { component: "delay-node".into(), at: r.thawed_at, planned: at + d });
                }
                out.push(ResumedComponent {
                    name: "delay-node".into(),
                    stop_ns: clock.synced_of_mono(at),
                    resume_ns: clock.synced_of_mono(r.thawed_at),
                });
            }
            Some((_, Err(e))) => tracing::error!(error = %e, "delay node did not thaw"),
            None => {}
        }
        tracing::info!(ckpt = %self.ckpt, resumed = out.len(), d_ns = d, "resumed");
        out
    }
}

fn hex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_clock_maps_both_ways() {
        let c = RealtimeClock;
        let m = mono_ns();
        let back = c.mono_of_synced(c.synced_of_mono(m));
        assert!(back.abs_diff(m) < 1_000_000, "{back} vs {m}");
        assert!(c.now().abs_diff(c.synced_of_mono(mono_ns())) < 1_000_000);
    }

    #[test]
    fn fault_file_is_read_at_each_round() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("faults");
        let faults = Faults { file: Some(f.clone()), ..Faults::default() };
        assert_eq!(faults.now(), (false, Duration::ZERO), "absent: no fault");
        std::fs::write(&f, "fail\ndelay 250\n").unwrap();
        assert_eq!(faults.now(), (true, Duration::from_millis(250)));
        std::fs::write(&f, "").unwrap();
        assert_eq!(faults.now(), (false, Duration::ZERO));
    }

    #[test]
    fn hex_digests_decode() {
        let h = "00ff10".to_string() + &"ab".repeat(29);
        let b = hex32(&h);
        assert_eq!(&b[..3], &[0, 255, 16]);
        assert_eq!(b[31], 0xab);
        assert_eq!(part_name(CkptId::new(7).unwrap()), "mh-7");
    }
}
