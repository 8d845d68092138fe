//! The benchmark's agent and coordinator, each on its own thread inside its
//! namespace with a current-thread tokio runtime: the PTP node, the real
//! protocol (`stasis_proto` transport and cores) and, on agents, one idle
//! QEMU VM (TCG, no kernel: SeaBIOS finds no boot device and halts).

use std::error::Error as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use stasis_clock_sync::actuate::{wait_until_synced_async, DEFAULT_SPIN_NS};
use stasis_clock_sync::{ServiceConfig, SyncedClock};
use stasis_core::clock::mono_ns;
use stasis_proto::coordinator::Outcome;
use stasis_proto::msg::{Component, ResumedComponent};
use stasis_proto::transport::{run_round, Connection, Listener};
use stasis_proto::{AgentAction, AgentConfig, AgentCore, CkptId, CoordConfig, Key};
use stasis_qemu::Qmp;
use tokio::sync::watch;

use super::StopRecord;

/// Errors of an agent or the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("starting the PTP node")]
    Ptp(#[from] stasis_clock_sync::StartError),
    #[error("the PTP node ended: {0}")]
    PtpEnded(String),
    #[error("starting QEMU ({binary})")]
    QemuSpawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited before answering on its QMP socket {0}")]
    QemuExited(PathBuf),
    #[error("QMP")]
    Qmp(#[from] stasis_qemu::QmpError),
    #[error("the STOP event carried no timestamp")]
    NoStamp,
    #[error("binding the agent listener")]
    Bind(#[from] stasis_proto::transport::BindError),
    #[error("connecting to agent {agent} at {addr}")]
    Connect {
        agent: usize,
        addr: SocketAddr,
        #[source]
        source: stasis_proto::transport::HandshakeError,
    },
    #[error("sending to the coordinator")]
    Send(#[from] stasis_proto::transport::SendError),
    #[error("entering the namespace")]
    Netns(#[source] super::netns::NetnsError),
    #[error("starting the thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("ended before it was told to")]
    EndedEarly,
}

/// One QEMU with no kernel and no devices, killed when dropped.
pub struct IdleVm {
    child: Child,
    pub qmp: Qmp,
}

impl IdleVm {
    /// Start `qemu-system-x86_64` (TCG, `memory_mib`) with its QMP socket in `dir`.
    pub async fn launch(dir: &Path, name: &str, memory_mib: u32) -> Result<IdleVm, NodeError> {
        let binary = stasis_qemu::vm::qemu_binary();
        let sock = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(&binary);
        cmd.args(["-accel", "tcg", "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-name", name, "-m", &memory_mib.to_string()])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe; it only sets this child's
        // parent-death signal, so QEMU dies with the agent thread that started it
        // even if the benchmark is SIGKILLed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| NodeError::QemuSpawn { binary, source })?;
        // QEMU creates the socket file before it listens on it: retry a
        // refused connection until it answers, exits, or 10 s pass.
        let mut tries = 0;
        let qmp = loop {
            match Qmp::connect(&sock).await {
                Ok(q) => break q,
                Err(stasis_qemu::QmpError::Connect { .. }) if tries < 500 => {
                    tries += 1;
                    if let Ok(Some(_)) = child.try_wait() {
                        return Err(NodeError::QemuExited(sock));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e.into());
                }
            }
        };
        Ok(IdleVm { child, qmp })
    }
}

impl Drop for IdleVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one agent is.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub index: usize,
    pub name: String,
    pub listen: SocketAddr,
    pub offset_ns: i64,
    pub drift_ppm: f64,
    pub memory_mib: u32,
    pub run_dir: PathBuf,
    /// Run the actuation (from Prepare to the QMP `stop` reply) at
    /// `SCHED_FIFO` priority 1, so that CPU-bound neighbours do not delay it.
    pub realtime: bool,
    /// Also QEMU's main and monitor I/O threads, for the whole run. Off by
    /// default: permanently FIFO threads can starve softirq network
    /// processing (ksoftirqd), which delays PTP's software timestamps.
    pub qemu_realtime: bool,
    /// Otherwise, the nice value of every QEMU thread (0: unchanged).
    pub qemu_nice: i32,
    /// The part of the wait that is spun rather than slept.
    pub spin_ns: u64,
    /// Act this long after T (benchmark only, subtracted in the analysis):
    /// staggering the agents keeps them from competing for this host's few
    /// cores at T, as agents on separate hosts would not.
    pub stagger_ns: u64,
}

/// Put thread `tid` (0: the calling thread) under `SCHED_FIFO` 1 (`on`) or
/// back under `SCHED_OTHER`. Failure (no privilege) is logged, not fatal.
pub fn set_realtime(tid: libc::pid_t, on: bool) {
    let (policy, prio) = if on { (libc::SCHED_FIFO, 1) } else { (libc::SCHED_OTHER, 0) };
    let param = libc::sched_param { sched_priority: prio };
    // SAFETY: `param` is a valid sched_param for the duration of the call;
    // sched_setscheduler only changes one thread's scheduling policy.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc != 0 {
        tracing::warn!(tid, on, error = %std::io::Error::last_os_error(), "sched_setscheduler failed");
    }
}

/// Set thread `tid`'s nice value; failure is logged, not fatal.
pub fn set_nice(tid: libc::pid_t, nice: i32) {
    // SAFETY: setpriority only changes one thread's nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        tracing::warn!(tid, nice, error = %std::io::Error::last_os_error(), "setpriority failed");
    }
}

/// The threads of process `pid`: (tid, name).
fn qemu_threads(pid: u32) -> Vec<(libc::pid_t, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![] };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        Some((tid, name.trim().to_owned()))
    })
    .collect()
}

/// The calling thread runs under `SCHED_FIFO` while this lives.
struct RealtimeSection(bool);

impl RealtimeSection {
    fn enter(on: bool) -> RealtimeSection {
        if on {
            set_realtime(0, true);
        }
        RealtimeSection(on)
    }
}

impl Drop for RealtimeSection {
    fn drop(&mut self) {
        if self.0 {
            set_realtime(0, false);
        }
    }
}

/// The agent: start PTP (slave, injected error) and the VM, report the clock
/// on `ready`, then serve coordinator connections one at a time until
/// `shutdown` turns true (every wait checks the value, not just a change,
/// so a shutdown seen inside one connection is not missed by the next wait).
/// Each VM stop goes to `records`.
pub async fn agent_main(
    spec: AgentSpec,
    key: Key,
    ready: mpsc::Sender<(usize, SyncedClock)>,
    records: mpsc::Sender<StopRecord>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut cfg = ServiceConfig::new("eth0");
    cfg.offset_ns = spec.offset_ns;
    cfg.drift_ppm = spec.drift_ppm;
    let mut ptp = stasis_clock_sync::start(cfg).await?;
    let clock = ptp.clock.clone();
    let mut vm = IdleVm::launch(&spec.run_dir, &spec.name, spec.memory_mib).await?;
    // QEMU is initialised (it answers QMP). Its monitor I/O thread reads
    // the command, its main thread runs it and waits until every vCPU
    // thread has acknowledged the pause. FIFO goes to the first two only
    // (a vCPU thread is busy while its guest runs); a nice value to all.
    for (tid, name) in qemu_threads(vm.child.id()) {
        if spec.qemu_realtime && !name.starts_with("CPU ") {
            set_realtime(tid, true);
        } else if !spec.qemu_realtime && spec.qemu_nice != 0 {
            set_nice(tid, spec.qemu_nice);
        }
    }
    let mut listener = Listener::bind(spec.listen, key).await?;
    let _ = ready.send((spec.index, clock.clone()));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
            r = &mut ptp.task => return Err(ptp_ended(r)),
            c = listener.accept() => c,
        };
        match accepted {
            Ok(conn) => serve(&spec, conn, &clock, &mut vm, &records, &mut shutdown).await?,
            Err(refused) => tracing::warn!(agent = spec.index, ?refused, "connection refused"),
        }
    }
}

/// The stop of the current round, if the VM stopped.
struct Stopped {
    stop_synced: u64,
}

/// One coordinator connection: the protocol's agent core, carried out.
async fn serve(
    spec: &AgentSpec,
    mut conn: Connection,
    clock: &SyncedClock,
    vm: &mut IdleVm,
    records: &mpsc::Sender<StopRecord>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut core = AgentCore::new(AgentConfig::default());
    let mut stopped: Option<Stopped> = None;
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
            m = conn.recv() => m,
        };
        let now = clock.now() as u64;
        let mut pending = match msg {
            Ok(m) => match core.on_message(now, m) {
                Ok(acts) => acts,
                Err(refusal) => {
                    tracing::warn!(agent = spec.index, %refusal, "refused");
                    continue;
                }
            },
            // The coordinator closes after each round; mid-round this resumes.
            Err(_) => core.disconnected(now),
        };
        let closed = pending.is_empty() && matches!(core.state(), stasis_proto::AgentState::Idle);
        while !pending.is_empty() {
            let mut next = vec![];
            for act in pending {
                match act {
                    AgentAction::FreezeAndSave { ckpt, at, .. } => {
                        next.extend(match freeze(spec, ckpt, at, clock, vm, records).await {
                            Ok(s) => {
                                let stop_ns = s.stop_synced;
                                stopped = Some(s);
                                let comp = Component { name: spec.name.clone(), bytes: 0, blake3: [0; 32], stop_ns };
                                let mut acts = refused_is_empty(spec, core.frozen(clock.now() as u64));
                                acts.extend(refused_is_empty(spec, core.saved(clock.now() as u64, vec![comp])));
                                acts
                            }
                            Err(e) => {
                                tracing::warn!(agent = spec.index, error = %e, "freeze failed");
                                refused_is_empty(spec, core.save_failed(clock.now() as u64, e.to_string(), vec![]))
                            }
                        });
                    }
                    AgentAction::Send(m) => conn.send(&m).await?,
                    AgentAction::Resume { after_ns, .. } => {
                        let mut comps = vec![];
                        if let Some(s) = stopped.take() {
                            // resume at the agent's own stop + D, as the protocol says
                            let at = s.stop_synced + after_ns;
                            let _ = wait_until_synced_async(clock, at as i128, DEFAULT_SPIN_NS).await;
                            vm.qmp.execute("cont", None).await?;
                            tracing::debug!(agent = spec.index, "continued");
                            comps.push(ResumedComponent {
                                name: spec.name.clone(),
                                stop_ns: s.stop_synced,
                                resume_ns: at,
                            });
                        } else {
                            // the freeze failed part-way: make sure the VM runs
                            let _ = vm.qmp.execute("cont", None).await;
                        }
                        next.extend(refused_is_empty(spec, core.resumed(clock.now() as u64, comps)));
                    }
                    // Nothing is saved, so nothing to discard or store.
                    AgentAction::Discard { .. } => {}
                    AgentAction::StorePart { .. } => {
                        let now = clock.now() as u64;
                        next.extend(refused_is_empty(spec, core.stored(now, now, 0, None)));
                    }
                    // The orphan timer: this benchmark's coordinator always
                    // decides, and a lost connection resumes at once.
                    AgentAction::SetTimer { .. } => {}
                }
            }
            pending = next;
        }
        if closed {
            return Ok(());
        }
    }
}

/// The core's actions, or none (logged) if it refused the host's report.
fn refused_is_empty(spec: &AgentSpec, r: Result<Vec<AgentAction>, stasis_proto::Refusal>) -> Vec<AgentAction> {
    r.unwrap_or_else(|refusal| {
        tracing::warn!(agent = spec.index, %refusal, "host report refused");
        vec![]
    })
}

/// Stop the VM at `at` on the synced clock; record the stop.
async fn freeze(
    spec: &AgentSpec,
    ckpt: CkptId,
    at: u64,
    clock: &SyncedClock,
    vm: &mut IdleVm,
    records: &mpsc::Sender<StopRecord>,
) -> Result<Stopped, NodeError> {
    vm.qmp.drain_events();
    let local = at + spec.stagger_ns;
    // Under SCHED_OTHER a loaded host wakes us milliseconds late (measured
    // here up to 8 ms with load 20 on 2 cores): switch to SCHED_FIFO at once,
    // on Prepare (the thread mostly sleeps until T), let the runtime (PTP)
    // run until 2 ms before, and block only for the rest.
    let rt_section = RealtimeSection::enter(spec.realtime);
    let act = wait_until_synced_async(clock, local as i128, spec.spin_ns).await;
    let (_, stamp) = vm.qmp.execute_timed("stop", None).await?;
    drop(rt_section);
    let ev = vm.qmp.wait_event("STOP", Duration::from_secs(2)).await?;
    // QEMU's main-loop round trip for a command that does nothing, to tell
    // the monitor's own latency from the work of stopping.
    let (_, probe) = vm.qmp.execute_timed("query-status", None).await?;
    let stop_ns = ev.qemu_time_us.ok_or(NodeError::NoStamp)? * 1000;
    tracing::debug!(agent = spec.index, %ckpt, late_ns = act.wake_lateness_ns(), "stopped");
    let rt = |mono: u64| act.mono_to_realtime(mono) as u64;
    let rec = StopRecord {
        ckpt: ckpt.0.get(),
        agent: spec.index,
        freeze_at: at,
        stagger_ns: spec.stagger_ns,
        target_ns: act.target_realtime,
        clock_error_ns: act.clock_error_ns,
        woke_ns: rt(act.woke_mono),
        qmp_sent_ns: rt(stamp.sent),
        qmp_replied_ns: rt(stamp.replied),
        stop_ns,
        probe_rtt_ns: probe.round_trip_ns(),
    };
    let _ = records.send(rec);
    Ok(Stopped { stop_synced: clock.synced_at_host(stop_ns) as u64 })
}

/// One round's outcome, as the coordinator saw it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    pub ckpt: u64,
    pub committed: bool,
    pub abort: Option<String>,
    pub freeze_at: u64,
    pub decided_at: u64,
    pub resume_after_ns: u64,
    /// Stop instants the agents reported in Saved (synced clock), by agent.
    pub reported_stops: Vec<Vec<u64>>,
}

/// What the coordinator is.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    pub key: Key,
    pub agents: Vec<SocketAddr>,
    pub cfg: CoordConfig,
    pub gap: Duration,
}

/// The coordinator: the PTP grandmaster (no injected error: its clock is the
/// host's) that, once told the number of rounds on `go`, runs them against
/// `agents` with gaps of `gap` and a random extra up to `gap` between them.
pub async fn coordinator_main(
    spec: CoordinatorSpec,
    ready: mpsc::Sender<SyncedClock>,
    mut go: watch::Receiver<Option<u64>>,
    rounds_out: mpsc::Sender<RoundRecord>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let CoordinatorSpec { key, agents, cfg, gap } = spec;
    let mut gm = ServiceConfig::new("eth0");
    gm.grandmaster = true;
    let mut ptp = stasis_clock_sync::start(gm).await?;
    let clock = ptp.clock.clone();
    let _ = ready.send(clock.clone());
    let rounds = loop {
        tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
            r = &mut ptp.task => return Err(ptp_ended(r)),
            r = go.changed() => {
                if r.is_err() { return Ok(()); }
                if let Some(n) = *go.borrow() { break n; }
            }
        }
    };
    for k in 1..=rounds {
        let mut conns = Vec::with_capacity(agents.len());
        for (i, addr) in agents.iter().enumerate() {
            let c = Connection::connect(*addr, &key).await.map_err(|source| NodeError::Connect {
                agent: i,
                addr: *addr,
                source,
            })?;
            conns.push(c);
        }
        let mut reported = vec![vec![]; agents.len()];
        let now = || clock.now() as u64;
        let ckpt = CkptId::new(k).expect("rounds count from 1");
        let round = run_round(
            conns,
            ckpt,
            cfg,
            now,
            |_, comps| {
                for (i, cs) in comps {
                    reported[*i] = cs.iter().map(|c| c.stop_ns).collect();
                }
                Ok(())
            },
            |_| {},
        );
        tracing::debug!(ckpt = k, "round starts");
        let outcome: Outcome = tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
            r = &mut ptp.task => return Err(ptp_ended(r)),
            o = round => o,
        };
        let _ = rounds_out.send(RoundRecord {
            ckpt: k,
            committed: outcome.committed,
            abort: outcome.abort.map(|a| format!("{a:?}")),
            freeze_at: outcome.freeze_at,
            decided_at: outcome.decided_at,
            resume_after_ns: outcome.resume_after_ns,
            reported_stops: reported,
        });
        tracing::debug!(ckpt = k, committed = outcome.committed, "round ends");
        // A random phase, so T does not lock onto any periodic activity.
        let extra = rand_below(gap.as_nanos() as u64);
        tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
            r = &mut ptp.task => return Err(ptp_ended(r)),
            _ = tokio::time::sleep(gap + Duration::from_nanos(extra)) => {}
        }
    }
    // Stay up (the grandmaster) until told to stop.
    tokio::select! {
        _ = shutdown.wait_for(|&stop| stop) => {}
        r = &mut ptp.task => return Err(ptp_ended(r)),
    }
    Ok(())
}

fn ptp_ended(r: Result<Result<(), stasis_clock_sync::RunError>, tokio::task::JoinError>) -> NodeError {
    NodeError::PtpEnded(match r {
        Ok(Ok(())) => "without an error".into(),
        Ok(Err(e)) => format!("{e}: {}", e.source().map(|s| s.to_string()).unwrap_or_default()),
        Err(e) => format!("its task failed: {e}"),
    })
}

fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS (per thread, then incremented per instance).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(mono_ns());
    h.finish().checked_rem(n).unwrap_or(0)
}
