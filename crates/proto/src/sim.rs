//! A discrete-event simulation of checkpoint rounds: the real
//! [`CoordinatorCore`] and one real [`AgentCore`] per simulated host, joined
//! by a priority queue of timed events instead of sockets. Time is simulated;
//! latencies, freeze/save durations and failures are drawn from a seeded RNG,
//! so a run is reproducible.
//!
//! Models (per round, independent between rounds):
//! - message latency: lognormal (median, p99), per message;
//! - the coordinator serialises its work: each message it sends or handles
//!   costs it `coord_msg_ns` of CPU (seal + syscall), the manifest `manifest_ns`;
//! - agent clocks: offset ~ N(0, `clock_err_ns`) from true time; the stop
//!   itself takes a lognormal `stop` latency (QMP `stop`);
//! - save time: lognormal per host;
//! - failures: a host crashes silently (power loss: no RST, noticed only by
//!   the deadline) with probability `crash_p` at a uniform instant of the
//!   round; its save fails (SaveFailed) with `save_fail_p`; every message
//!   breaks its TCP connection with `loss_p` (the message is lost and both
//!   ends notice `detect_ns` later).

use crate::agent::{AgentAction, AgentConfig, AgentCore};
use crate::coordinator::{AbortReason, CoordAction, CoordConfig, CoordinatorCore, Outcome};
use crate::msg::{CkptId, Component, Message, ResumedComponent};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A lognormal distribution given by its median and 99th percentile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogNormal {
    pub median_ns: f64,
    pub p99_ns: f64,
}

impl LogNormal {
    pub fn new(median_ns: f64, p99_ns: f64) -> LogNormal {
        LogNormal { median_ns, p99_ns }
    }

    /// One sample (Box–Muller).
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let sigma = (self.p99_ns / self.median_ns).ln() / 2.326_348;
        (self.median_ns * (sigma * normal(rng)).exp()) as u64
    }
}

fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Everything a simulation run needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub agents: usize,
    pub rounds: usize,
    pub seed: u64,
    pub latency: LogNormal,
    pub stop: LogNormal,
    pub save: LogNormal,
    pub clock_err_ns: f64,
    pub coord_msg_ns: u64,
    pub manifest_ns: u64,
    pub crash_p: f64,
    pub save_fail_p: f64,
    pub loss_p: f64,
    pub detect_ns: u64,
    pub coord: CoordConfig,
    pub agent: AgentConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            agents: 1_000,
            rounds: 100,
            seed: 1,
            latency: LogNormal::new(200e3, 2e6),
            stop: LogNormal::new(0.9e6, 2e6),
            save: LogNormal::new(700e6, 1_500e6),
            clock_err_ns: 10e3,
            coord_msg_ns: 5_000,
            manifest_ns: 5_000_000,
            crash_p: 0.0,
            save_fail_p: 0.0,
            loss_p: 0.0,
            detect_ns: 1_000_000_000,
            coord: CoordConfig { save_budget_ns: 5_000_000_000, ..CoordConfig::default() },
            agent: AgentConfig::default(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub agents: usize,
    pub rounds: usize,
    pub committed: usize,
    pub aborted_deadline: usize,
    pub aborted_save_failed: usize,
    pub aborted_lost: usize,
    /// Start → manifest durable, committed rounds, sorted (ns).
    pub commit_ns: Vec<u64>,
    /// Start → every Resumed (and, committed, every Stored) in, all rounds, sorted (ns).
    pub round_ns: Vec<u64>,
    /// D of committed rounds, sorted (ns).
    pub d_ns: Vec<u64>,
    /// Messages sent (both directions), all rounds.
    pub messages: u64,
    /// Prepares that arrived after their freeze instant.
    pub late_prepares: u64,
    /// Components that could not resume at stop + D (the decision came too late).
    pub late_resumes: u64,
    /// Agents that resumed on their own (lost coordinator).
    pub orphan_resumes: u64,
    /// Largest |actual frozen duration − D| over resumes told by the coordinator.
    pub max_frozen_err_ns: u64,
    /// Latest arrival of a Saved after its freeze instant, over all rounds.
    pub max_saved_after_freeze_ns: u64,
}

/// The `q` quantile of sorted values.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

impl SimReport {
    pub fn abort_rate(&self) -> f64 {
        1.0 - self.committed as f64 / self.rounds.max(1) as f64
    }
}

#[derive(Debug)]
enum Ev {
    ToAgent { i: usize, msg: Message },
    ToCoord { i: usize, msg: Message },
    CoordHandle { i: usize, msg: Message },
    AgentTimer { i: usize },
    CoordTimer,
    Frozen { i: usize, epoch: u32 },
    SaveDone { i: usize, epoch: u32 },
    HostResumed { i: usize },
    HostStored { i: usize },
    CoordDisconnect { i: usize },
    AgentDisconnect { i: usize },
    Crash { i: usize },
    ManifestDone,
}

struct Item {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Host {
    core: AgentCore,
    offset_ns: i64,
    alive: bool,
    connected: bool,
    /// Bumped when a pending freeze/save is cancelled.
    epoch: u32,
    stop_ns: Option<u64>,
    told_d: Option<u64>,
    fails_save: bool,
}

struct World<'a> {
    cfg: &'a SimConfig,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<Item>>,
    seq: u64,
    coord_busy: u64,
    hosts: Vec<Host>,
    report: &'a mut SimReport,
}

impl World<'_> {
    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Item { at, seq: self.seq, ev }));
    }

    /// Send over host i's connection; returns false if it is broken by this message.
    fn transmit(&mut self, now: u64, i: usize, msg: Message, to_agent: bool) {
        let h = &self.hosts[i];
        if !h.connected || !h.alive {
            return;
        }
        self.report.messages += 1;
        if self.cfg.loss_p > 0.0 && self.rng.gen_bool(self.cfg.loss_p) {
            self.hosts[i].connected = false;
            let when = now + self.cfg.detect_ns;
            self.at(when, Ev::CoordDisconnect { i });
            self.at(when, Ev::AgentDisconnect { i });
            return;
        }
        let at = now + self.cfg.latency.sample(&mut self.rng);
        self.at(at, if to_agent { Ev::ToAgent { i, msg } } else { Ev::ToCoord { i, msg } });
    }

    fn coord_actions(&mut self, now: u64, acts: Vec<CoordAction>) -> Option<Outcome> {
        let mut out = None;
        for a in acts {
            match a {
                CoordAction::Send { to, msg } => {
                    self.coord_busy = self.coord_busy.max(now) + self.cfg.coord_msg_ns;
                    let t = self.coord_busy;
                    self.transmit(t, to, msg, true);
                }
                CoordAction::SetTimer { at } => self.at(at, Ev::CoordTimer),
                CoordAction::CommitManifest { .. } => {
                    self.coord_busy = self.coord_busy.max(now) + self.cfg.manifest_ns;
                    let t = self.coord_busy;
                    self.at(t, Ev::ManifestDone);
                }
                CoordAction::RemovePartial { .. } => {}
                CoordAction::Done(o) => out = Some(o),
            }
        }
        out
    }

    fn agent_actions(&mut self, now: u64, i: usize, acts: Vec<AgentAction>) {
        for a in acts {
            match a {
                AgentAction::FreezeAndSave { at, .. } => {
                    if at < now {
                        self.report.late_prepares += 1;
                    }
                    let local = (at as i64 + self.hosts[i].offset_ns).max(now as i64) as u64;
                    let stop = local + self.cfg.stop.sample(&mut self.rng);
                    let epoch = self.hosts[i].epoch;
                    self.at(stop, Ev::Frozen { i, epoch });
                    let saved = stop + self.cfg.save.sample(&mut self.rng);
                    self.at(saved, Ev::SaveDone { i, epoch });
                }
                AgentAction::Send(msg) => self.transmit(now, i, msg, false),
                AgentAction::Resume { after_ns, .. } => {
                    let h = &mut self.hosts[i];
                    h.epoch += 1; // cancel a pending freeze or save
                    let resume = match h.stop_ns {
                        Some(stop) => {
                            let wanted = stop + after_ns;
                            if wanted < now {
                                self.report.late_resumes += 1;
                            }
                            if h.told_d.is_some() {
                                self.report.max_frozen_err_ns =
                                    self.report.max_frozen_err_ns.max(now.saturating_sub(wanted));
                            }
                            wanted.max(now)
                        }
                        None => now,
                    };
                    self.at(resume, Ev::HostResumed { i });
                }
                AgentAction::Discard { .. } => {}
                // The store commit runs after the resume, outside the frozen
                // window this simulation measures: taken as instant.
                AgentAction::StorePart { .. } => self.at(now, Ev::HostStored { i }),
                AgentAction::SetTimer { at } => self.at(at, Ev::AgentTimer { i }),
            }
        }
    }
}

/// Run `cfg.rounds` independent checkpoint rounds.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut report = SimReport { agents: cfg.agents, rounds: cfg.rounds, ..SimReport::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for round in 0..cfg.rounds {
        let seed = rng.gen();
        let o = run_round(cfg, CkptId::new(round as u64 + 1).expect("nonzero"), seed, &mut report);
        if o.committed {
            report.committed += 1;
            report.commit_ns.push(o.decided_at - o.started);
            report.d_ns.push(o.resume_after_ns);
        } else {
            match o.abort {
                Some(AbortReason::Deadline { .. }) => report.aborted_deadline += 1,
                Some(AbortReason::SaveFailed { .. }) => report.aborted_save_failed += 1,
                Some(AbortReason::Lost { .. }) => report.aborted_lost += 1,
                _ => {}
            }
        }
        report.round_ns.push(o.finished - o.started);
    }
    report.commit_ns.sort_unstable();
    report.round_ns.sort_unstable();
    report.d_ns.sort_unstable();
    report
}

fn run_round(cfg: &SimConfig, ckpt: CkptId, seed: u64, report: &mut SimReport) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start: u64 = 1_000_000_000;
    let horizon = cfg.coord.margin_ns + cfg.save.p99_ns as u64;
    let mut hosts = Vec::with_capacity(cfg.agents);
    let mut crashes = Vec::new();
    for i in 0..cfg.agents {
        if cfg.crash_p > 0.0 && rng.gen_bool(cfg.crash_p) {
            crashes.push((start + rng.gen_range(0..horizon), i));
        }
        hosts.push(Host {
            core: AgentCore::new(cfg.agent),
            offset_ns: (normal(&mut rng) * cfg.clock_err_ns) as i64,
            alive: true,
            connected: true,
            epoch: 0,
            stop_ns: None,
            told_d: None,
            fails_save: cfg.save_fail_p > 0.0 && rng.gen_bool(cfg.save_fail_p),
        });
    }
    let mut w = World { cfg, rng, queue: BinaryHeap::new(), seq: 0, coord_busy: 0, hosts, report };
    for (at, i) in crashes {
        w.at(at, Ev::Crash { i });
    }
    let mut coord = CoordinatorCore::new(ckpt, cfg.agents, cfg.coord);
    let acts = coord.start(start);
    if let Some(o) = w.coord_actions(start, acts) {
        return o;
    }
    while let Some(Reverse(Item { at: now, ev, .. })) = w.queue.pop() {
        match ev {
            Ev::ToCoord { i, msg } => {
                if matches!(msg, Message::Saved(_)) {
                    let late = now.saturating_sub(coord.freeze_at());
                    w.report.max_saved_after_freeze_ns = w.report.max_saved_after_freeze_ns.max(late);
                }
                // The coordinator works through its inbox in arrival order:
                // reserve its CPU now and handle the message when it gets there.
                let t = w.coord_busy.max(now);
                w.coord_busy = t + cfg.coord_msg_ns;
                if t > now {
                    w.at(t, Ev::CoordHandle { i, msg });
                    continue;
                }
                if let Ok(acts) = coord.on_message(now, i, msg) {
                    if let Some(o) = w.coord_actions(now, acts) {
                        return o;
                    }
                }
            }
            Ev::CoordHandle { i, msg } => {
                if let Ok(acts) = coord.on_message(now, i, msg) {
                    if let Some(o) = w.coord_actions(now, acts) {
                        return o;
                    }
                }
            }
            Ev::CoordTimer => {
                let acts = coord.on_timer(now);
                if let Some(o) = w.coord_actions(now, acts) {
                    return o;
                }
            }
            Ev::CoordDisconnect { i } => {
                let acts = coord.on_disconnect(now, i);
                if let Some(o) = w.coord_actions(now, acts) {
                    return o;
                }
            }
            Ev::ManifestDone => {
                let acts = coord.manifest_committed(now);
                if let Some(o) = w.coord_actions(now, acts) {
                    return o;
                }
            }
            ev => {
                let i = match ev {
                    Ev::ToAgent { i, .. }
                    | Ev::AgentTimer { i }
                    | Ev::Frozen { i, .. }
                    | Ev::SaveDone { i, .. }
                    | Ev::HostResumed { i }
                    | Ev::HostStored { i }
                    | Ev::AgentDisconnect { i }
                    | Ev::Crash { i } => i,
                    _ => unreachable!(),
                };
                if !w.hosts[i].alive {
                    continue;
                }
                let h = &mut w.hosts[i];
                let acts = match ev {
                    Ev::Crash { .. } => {
                        h.alive = false;
                        vec![]
                    }
                    Ev::ToAgent { msg, .. } => {
                        if let Message::Commit(c) = &msg {
                            h.told_d = Some(c.resume_after_ns);
                        }
                        if let Message::Abort(a) = &msg {
                            h.told_d = Some(a.resume_after_ns);
                        }
                        h.core.on_message(now, msg).unwrap_or_default()
                    }
                    Ev::AgentTimer { .. } => h.core.tick(now),
                    Ev::AgentDisconnect { .. } => {
                        let acts = h.core.disconnected(now);
                        if !acts.is_empty() {
                            w.report.orphan_resumes += 1;
                        }
                        acts
                    }
                    Ev::Frozen { epoch, .. } if epoch == h.epoch => {
                        h.stop_ns = Some(now);
                        h.core.frozen(now).unwrap_or_default()
                    }
                    Ev::SaveDone { epoch, .. } if epoch == h.epoch => {
                        let stop = h.stop_ns.unwrap_or(now);
                        if h.fails_save {
                            h.core.save_failed(now, "simulated".into(), vec![stop]).unwrap_or_default()
                        } else {
                            let c = |name: &str| Component {
                                name: name.into(),
                                bytes: 93 << 20,
                                blake3: [0; 32],
                                stop_ns: stop,
                            };
                            h.core.saved(now, vec![c("vm"), c("disk")]).unwrap_or_default()
                        }
                    }
                    Ev::HostResumed { .. } => {
                        let stop = h.stop_ns.unwrap_or(now);
                        h.core
                            .resumed(now, vec![ResumedComponent { name: "vm".into(), stop_ns: stop, resume_ns: now }])
                            .unwrap_or_default()
                    }
                    Ev::HostStored { .. } => h.core.stored(now, now, 0, None).unwrap_or_default(),
                    _ => vec![],
                };
                w.agent_actions(now, i, acts);
            }
        }
    }
    unreachable!("the coordinator's timers always end the round")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(agents: usize) -> SimConfig {
        SimConfig { agents, rounds: 5, ..SimConfig::default() }
    }

    #[test]
    fn lognormal_matches_its_median_and_p99() {
        let d = LogNormal::new(200e3, 2e6);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut v: Vec<u64> = (0..20_000).map(|_| d.sample(&mut rng)).collect();
        v.sort_unstable();
        let (m, p) = (quantile(&v, 0.5).unwrap() as f64, quantile(&v, 0.99).unwrap() as f64);
        assert!((m / 200e3 - 1.0).abs() < 0.05, "median {m}");
        assert!((p / 2e6 - 1.0).abs() < 0.15, "p99 {p}");
    }

    #[test]
    fn without_failures_every_round_commits_with_d_met() {
        let r = run(&small(50));
        assert_eq!(r.committed, 5);
        assert_eq!((r.late_prepares, r.late_resumes, r.orphan_resumes), (0, 0, 0));
        assert_eq!(r.max_frozen_err_ns, 0);
        // 50 × (Prepare, Saved, Commit, Resumed, Stored) per round.
        assert_eq!(r.messages, 5 * 50 * 5);
        assert!(quantile(&r.commit_ns, 0.5).unwrap() > SimConfig::default().coord.margin_ns);
    }

    #[test]
    fn certain_save_failure_aborts_every_round() {
        let r = run(&SimConfig { save_fail_p: 1.0, ..small(20) });
        assert_eq!((r.committed, r.aborted_save_failed), (0, 5));
    }

    #[test]
    fn certain_crash_aborts_at_the_deadline() {
        let r = run(&SimConfig { crash_p: 1.0, ..small(20) });
        assert_eq!((r.committed, r.aborted_deadline), (0, 5));
    }

    #[test]
    fn lost_connections_abort_and_agents_resume_alone() {
        let r = run(&SimConfig { loss_p: 0.05, ..small(50) });
        assert!(r.aborted_lost > 0);
        assert!(r.orphan_resumes > 0);
    }

    #[test]
    fn same_seed_same_figures() {
        let cfg = SimConfig { crash_p: 0.01, ..small(100) };
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!((a.committed, a.messages, a.round_ns.clone()), (b.committed, b.messages, b.round_ns));
    }
}
