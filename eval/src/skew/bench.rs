//! Running the skew benchmark: namespaces, nodes, convergence, rounds, report.
//!
//! ```text
//!  skw<pid>-gm: PTP grandmaster + coordinator ──┐
//!  skw<pid>-a0: PTP slave +3 ms/+50 ppm, agent, QEMU ──┤ veth
//!  skw<pid>-a1: PTP slave −2 ms/−30 ppm, agent, QEMU ──┤──── br0 in skw<pid>-br
//!  skw<pid>-a2: PTP slave 0,              agent, QEMU ──┘
//! ```
//! Addresses 10.253.0.0/24 exist only inside these namespaces.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stasis_clock_sync::{Convergence, SyncState, SyncedClock};
use stasis_core::clock::mono_ns;
use stasis_proto::{CoordConfig, Key};
use tokio::sync::watch;

use super::netns::{Lab, NetnsError};
use super::node::{agent_main, coordinator_main, AgentSpec, CoordinatorSpec, NodeError, RoundRecord};
use super::{analyse, dist_table, AnalyseError, Analysis, Dist, StopRecord};

/// Injected clock errors of the agents: (offset ns, drift ppm).
pub const AGENT_SKEWS: [(i64, f64); 3] = [(3_000_000, 50.0), (-2_000_000, -30.0), (0, 0.0)];
/// "Converged": this many consecutive 100 ms samples under 10 µs true error.
pub const CONVERGED_NS: f64 = 10_000.0;
const CONVERGED_RUN: usize = 10;
const SAMPLE: Duration = Duration::from_millis(100);
const AGENT_PORT: u16 = 7400;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkewConfig {
    pub checkpoints: u64,
    /// Raw data (`skew.json`) goes here.
    pub out: PathBuf,
    pub memory_mib: u32,
    /// Longest wait for every clock to converge.
    pub converge_timeout: Duration,
    /// After convergence: settle, then measure the steady error this long.
    pub settle: Duration,
    pub steady: Duration,
    /// Between rounds: this plus a random extra up to this.
    pub gap: Duration,
    /// The actuation at SCHED_FIFO (see [`AgentSpec::realtime`]).
    pub realtime: bool,
    /// QEMU's main and monitor threads at SCHED_FIFO (see [`AgentSpec::qemu_realtime`]).
    #[serde(default)]
    pub qemu_realtime: bool,
    /// Otherwise their nice value (0: unchanged).
    #[serde(default)]
    pub qemu_nice: i32,
    /// Spun part of each wait, ns.
    pub spin_ns: u64,
    /// Agent i acts at T + i × this (0: all at T); taken out in the analysis.
    #[serde(default)]
    pub stagger_ns: u64,
}

impl SkewConfig {
    /// The full run: 50 checkpoints, 10 s of steady clock error.
    pub fn full(out: PathBuf) -> SkewConfig {
        SkewConfig {
            checkpoints: 50,
            out,
            memory_mib: 32,
            converge_timeout: Duration::from_secs(60),
            settle: Duration::from_secs(2),
            steady: Duration::from_secs(10),
            gap: Duration::from_millis(200),
            realtime: true,
            qemu_realtime: false,
            qemu_nice: -20,
            spin_ns: stasis_clock_sync::actuate::DEFAULT_SPIN_NS,
            stagger_ns: 0,
        }
    }

    /// The measurement pipeline in well under a minute: 10 checkpoints.
    pub fn quick(out: PathBuf) -> SkewConfig {
        SkewConfig {
            checkpoints: 10,
            steady: Duration::from_secs(3),
            settle: Duration::from_secs(1),
            ..SkewConfig::full(out)
        }
    }
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the skew benchmark needs root (it creates network namespaces)")]
    NotRoot,
    #[error("setting up the namespaces")]
    Netns(#[from] NetnsError),
    #[error("{node} failed")]
    Node {
        node: String,
        #[source]
        source: NodeError,
    },
    #[error("{node} panicked")]
    Panicked { node: String },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("clocks not converged to {bound_ns} ns within {secs} s: {detail}")]
    NotConverged { bound_ns: f64, secs: u64, detail: String },
    #[error("analysing the stops")]
    Analyse(#[from] AnalyseError),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the protocol key")]
    Key(#[from] stasis_proto::auth::KeyError),
}

/// One agent's clock before the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockReport {
    pub agent: usize,
    pub offset_ns: i64,
    pub drift_ppm: f64,
    /// True error of the first sample (before PTP steered anything).
    pub initial_error_ns: f64,
    /// From the agent's start to the first of `CONVERGED_RUN` samples under the bound.
    pub converged_after_s: f64,
    /// |true error| over the steady window.
    pub steady: Dist,
    pub steady_samples: Vec<f64>,
}

/// Everything one run measured (written as `skew.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkewReport {
    pub config: SkewConfig,
    pub clocks: Vec<ClockReport>,
    pub rounds: Vec<RoundRecord>,
    pub records: Vec<StopRecord>,
    pub analysis: Analysis,
    pub wall_s: f64,
}

impl SkewReport {
    /// The printed figures: clocks, then the skew and its split.
    pub fn table(&self) -> String {
        let mut s = String::from("clocks before the run (true error vs the grandmaster = host CLOCK_REALTIME):\n\n");
        s += "| agent | injected | initial error µs | converged (<10 µs) after s | steady p50 µs | p99 µs | max µs |\n|---|---|---|---|---|---|---|\n";
        for c in &self.clocks {
            s += &format!(
                "| a{} | {:+.1} ms, {:+} ppm | {:+.1} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
                c.agent,
                c.offset_ns as f64 / 1e6,
                c.drift_ppm,
                c.initial_error_ns / 1e3,
                c.converged_after_s,
                c.steady.p50_ns as f64 / 1e3,
                c.steady.p99_ns as f64 / 1e3,
                c.steady.max_ns as f64 / 1e3
            );
        }
        let committed = self.rounds.iter().filter(|r| r.committed).count();
        let qemu =
            if self.config.qemu_realtime { "SCHED_FIFO".to_owned() } else { format!("nice {}", self.config.qemu_nice) };
        s += &format!(
            "\nfreeze-instant skew over {} checkpoints ({} committed), {} VMs on {} agents; actuation {}, QEMU {qemu}, spin {} µs, stagger {} µs:\n\n",
            self.analysis.checkpoints.len(),
            committed,
            self.clocks.len(),
            self.clocks.len(),
            if self.config.realtime { "SCHED_FIFO" } else { "SCHED_OTHER" },
            self.config.spin_ns / 1000,
            self.config.stagger_ns / 1000
        );
        s += &dist_table(&self.analysis.dists);
        let glitches = self.records.iter().filter(|r| r.clock_error_ns.unsigned_abs() as f64 >= CONVERGED_NS).count();
        s += &format!("\nstops whose clock was ≥ 10 µs off at T: {glitches} of {}\n", self.records.len());
        if let Some(skew) = self.analysis.dists.first() {
            let met = if skew.p99_ns <= 100_000 { "met" } else { "NOT met" };
            s += &format!("\ngoal p99 skew ≤ 100 µs: {met} (p99 {:.1} µs)\n", skew.p99_ns as f64 / 1e3);
        }
        s
    }
}

/// Threads of the nodes; dropping it tells them to stop and joins them.
struct Nodes {
    shutdown: watch::Sender<bool>,
    handles: Vec<(String, JoinHandle<Result<(), NodeError>>)>,
}

impl Nodes {
    /// Run `f` on a new thread inside namespace `ns`, on a current-thread runtime.
    fn spawn<F, Fut>(&mut self, name: &str, ns: String, f: F) -> std::io::Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), NodeError>>,
    {
        let h = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            super::netns::enter(&ns).map_err(NodeError::Netns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NodeError::Runtime)?;
            rt.block_on(f())
        })?;
        self.handles.push((name.to_owned(), h));
        Ok(())
    }

    /// The first node that has ended, with its error (or "ended early").
    fn check(&mut self) -> Result<(), BenchError> {
        if let Some(i) = self.handles.iter().position(|(_, h)| h.is_finished()) {
            let (node, h) = self.handles.remove(i);
            return match h.join() {
                Ok(Err(source)) => Err(BenchError::Node { node, source }),
                Ok(Ok(())) => Err(BenchError::Node { node, source: NodeError::EndedEarly }),
                Err(_) => Err(BenchError::Panicked { node }),
            };
        }
        Ok(())
    }

    /// Stop every node; the first error any of them ended with.
    fn finish(mut self) -> Result<(), BenchError> {
        let _ = self.shutdown.send(true);
        let mut first = Ok(());
        for (node, h) in self.handles.drain(..) {
            let r = match h.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(BenchError::Node { node, source }),
                Err(_) => Err(BenchError::Panicked { node }),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for (_, h) in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Receive from `rx` within `timeout`, failing early if a node ended.
fn recv<T>(rx: &mpsc::Receiver<T>, nodes: &mut Nodes, timeout: Duration, what: &str) -> Result<T, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => return Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                nodes.check()?;
                if Instant::now() > deadline {
                    return Err(BenchError::Timeout(what.to_owned()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                nodes.check()?;
                return Err(BenchError::Timeout(format!("{what} (channel closed)")));
            }
        }
    }
}

/// Run the benchmark; writes `skew.json` into `cfg.out` and returns the report.
pub fn run(cfg: &SkewConfig) -> Result<SkewReport, BenchError> {
    if !is_root() {
        return Err(BenchError::NotRoot);
    }
    let wall = Instant::now();
    std::fs::create_dir_all(&cfg.out).map_err(|source| BenchError::Write { path: cfg.out.clone(), source })?;
    let run_dir = tempfile::Builder::new()
        .prefix("skw-")
        .tempdir()
        .map_err(|source| BenchError::Write { path: std::env::temp_dir(), source })?;
    let key = Key::new(b"stasis skew benchmark key, 32 bytes")?;

    // Dropped in reverse order: the nodes (and their QEMUs) go before the namespaces.
    let mut lab = Lab::new();
    let gm_ns = lab.add_host("gm", "10.253.0.1/24")?;
    let mut agent_ns = vec![];
    for i in 0..AGENT_SKEWS.len() {
        agent_ns.push(lab.add_host(&format!("a{i}"), &format!("10.253.0.{}/24", i + 2))?);
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut nodes = Nodes { shutdown, handles: vec![] };
    let spawn_err = |source| BenchError::Node { node: "thread".into(), source: NodeError::Runtime(source) };

    let start_mono = mono_ns();
    let (clock_tx, clock_rx) = mpsc::channel::<(usize, SyncedClock)>();
    let (rec_tx, rec_rx) = mpsc::channel::<StopRecord>();
    let mut addrs = vec![];
    for (i, ns) in agent_ns.iter().enumerate() {
        let listen: SocketAddr = format!("10.253.0.{}:{AGENT_PORT}", i + 2).parse().expect("valid address");
        addrs.push(listen);
        let spec = AgentSpec {
            index: i,
            name: format!("a{i}"),
            listen,
            offset_ns: AGENT_SKEWS[i].0,
            drift_ppm: AGENT_SKEWS[i].1,
            memory_mib: cfg.memory_mib,
            run_dir: run_dir.path().to_owned(),
            realtime: cfg.realtime,
            qemu_realtime: cfg.qemu_realtime,
            qemu_nice: cfg.qemu_nice,
            spin_ns: cfg.spin_ns,
            stagger_ns: i as u64 * cfg.stagger_ns,
        };
        let (key, tx, rec, sd) = (key.clone(), clock_tx.clone(), rec_tx.clone(), shutdown_rx.clone());
        nodes.spawn(&format!("skw-a{i}"), ns.clone(), move || agent_main(spec, key, tx, rec, sd)).map_err(spawn_err)?;
    }
    drop(rec_tx);
    let (gm_tx, gm_rx) = mpsc::channel::<SyncedClock>();
    let (go_tx, go_rx) = watch::channel::<Option<u64>>(None);
    let (round_tx, round_rx) = mpsc::channel::<RoundRecord>();
    let coord_cfg =
        CoordConfig { save_budget_ns: 2_000_000_000, resume_timeout_ns: 2_000_000_000, ..CoordConfig::default() };
    {
        let spec = CoordinatorSpec { key: key.clone(), agents: addrs, cfg: coord_cfg, gap: cfg.gap };
        let sd = shutdown_rx.clone();
        nodes
            .spawn("skw-coord", gm_ns, move || coordinator_main(spec, gm_tx, go_rx, round_tx, sd))
            .map_err(spawn_err)?;
    }
    let _gm_clock = recv(&gm_rx, &mut nodes, Duration::from_secs(30), "the grandmaster to start")?;
    let mut clocks: Vec<Option<SyncedClock>> = vec![None; AGENT_SKEWS.len()];
    for _ in 0..AGENT_SKEWS.len() {
        let (i, c) = recv(&clock_rx, &mut nodes, Duration::from_secs(60), "the agents to start (PTP, QEMU, listener)")?;
        clocks[i] = Some(c);
    }
    let clocks: Vec<SyncedClock> = clocks.into_iter().map(|c| c.expect("every agent reported")).collect();
    eprintln!(
        "skew: {} agents up after {:.1} s; waiting for their clocks to converge",
        clocks.len(),
        wall.elapsed().as_secs_f64()
    );

    let reports = converge(cfg, &clocks, &mut nodes, start_mono)?;
    for r in &reports {
        eprintln!(
            "skew: a{} converged after {:.1} s, steady |error| p99 {:.2} µs",
            r.agent,
            r.converged_after_s,
            r.steady.p99_ns as f64 / 1e3
        );
    }

    let _ = go_tx.send(Some(cfg.checkpoints));
    let mut rounds = vec![];
    for k in 0..cfg.checkpoints {
        let r = recv(&round_rx, &mut nodes, Duration::from_secs(15), &format!("round {}", k + 1))?;
        if !r.committed {
            tracing::warn!(ckpt = r.ckpt, abort = ?r.abort, "round aborted");
        }
        rounds.push(r);
    }
    nodes.finish()?;
    let mut records: Vec<StopRecord> = rec_rx.try_iter().collect();
    records.sort_by_key(|r| (r.ckpt, r.agent));
    let committed: Vec<u64> = rounds.iter().filter(|r| r.committed).map(|r| r.ckpt).collect();
    let analysed: Vec<StopRecord> = records.iter().copied().filter(|r| committed.contains(&r.ckpt)).collect();
    let analysis = analyse(&analysed, clocks.len())?;
    let report = SkewReport {
        config: cfg.clone(),
        clocks: reports,
        rounds,
        records,
        analysis,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    let path = cfg.out.join("skew.json");
    let json = serde_json::to_vec_pretty(&report).expect("the report serialises");
    std::fs::write(&path, json).map_err(|source| BenchError::Write { path: path.clone(), source })?;
    drop(lab);
    Ok(report)
}

/// Sample every clock's true error each 100 ms until each has converged,
/// then settle and measure the steady window.
fn converge(
    cfg: &SkewConfig,
    clocks: &[SyncedClock],
    nodes: &mut Nodes,
    start_mono: u64,
) -> Result<Vec<ClockReport>, BenchError> {
    let n = clocks.len();
    let mut conv: Vec<Convergence> = (0..n).map(|_| Convergence::new(CONVERGED_NS, CONVERGED_RUN)).collect();
    let mut initial: Vec<Option<f64>> = vec![None; n];
    let deadline = Instant::now() + cfg.converge_timeout;
    while conv.iter().any(|c| c.converged_at().is_none()) {
        nodes.check()?;
        if Instant::now() > deadline {
            let detail = (0..n)
                .map(|i| {
                    let m = clocks[i].metrics();
                    format!("a{i}: {:?}, error {:.0} ns", m.state, m.true_error_ns.unwrap_or(f64::NAN))
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(BenchError::NotConverged {
                bound_ns: CONVERGED_NS,
                secs: cfg.converge_timeout.as_secs(),
                detail,
            });
        }
        for (i, c) in clocks.iter().enumerate() {
            let m = c.metrics();
            let err = m.true_error_ns.unwrap_or(f64::NAN);
            initial[i].get_or_insert(err);
            if m.state == SyncState::Slave {
                conv[i].observe(m.mono_ns, err);
            }
        }
        std::thread::sleep(SAMPLE);
    }
    std::thread::sleep(cfg.settle);
    let mut steady: Vec<Vec<f64>> = vec![vec![]; n];
    let until = Instant::now() + cfg.steady;
    while Instant::now() < until {
        nodes.check()?;
        for (i, c) in clocks.iter().enumerate() {
            steady[i].push(c.metrics().true_error_ns.unwrap_or(f64::NAN));
        }
        std::thread::sleep(SAMPLE);
    }
    Ok((0..n)
        .map(|i| ClockReport {
            agent: i,
            offset_ns: AGENT_SKEWS[i].0,
            drift_ppm: AGENT_SKEWS[i].1,
            initial_error_ns: initial[i].unwrap_or(f64::NAN),
            converged_after_s: (conv[i].converged_at().unwrap_or(start_mono).saturating_sub(start_mono)) as f64 / 1e9,
            steady: Dist::of("steady |true error|", steady[i].iter().map(|e| e.abs().round() as i64)),
            steady_samples: std::mem::take(&mut steady[i]),
        })
        .collect())
}
