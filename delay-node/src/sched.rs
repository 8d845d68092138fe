//! The scheduler core: ports, pipes (one per shaped direction), LAN switches
//! and the virtual clock. No I/O: every method takes the host instant `now`
//! and returns what the I/O layer must do.
//!
//! Model of one pipe (one direction of a link or access link): a frame that
//! arrives at virtual time `t` is lost with probability `loss`, else dropped if
//! the frames still waiting for or in serialisation would exceed the queue
//! limits, else it starts serialising at `max(t, busy_until)`, takes
//! `ceil(len * 8e9 / bandwidth)` ns, then propagates for `delay + U[0, jitter]`
//! (never overtaking the previous frame). Virtual time is host time minus the
//! total time the node has spent frozen.

use crate::config::{Shaping, Topology};
use crate::state::{FrameState, HeldState, NodeState, PipeCounters, PipeState, PortCounters, PortState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use stasis_core::clock::MonoNs;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

/// Index of a port in topology order.
pub type PortId = usize;

/// Something the I/O layer must do.
#[derive(Debug, PartialEq)]
#[must_use]
pub enum Action {
    /// Write `frame` to the port's VM now. `due` is the host instant it was due.
    Deliver { port: PortId, frame: Vec<u8>, due: MonoNs, due_vt: u64 },
    /// The whole node froze (virtual clock stopped) at host instant `at`.
    Frozen { at: MonoNs },
    /// Delivery to `port` is held from now on (its scheduled freeze instant passed).
    PortFrozen { port: PortId, at: MonoNs },
}

/// Refusals of the scheduler.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("the node is not frozen")]
    NotFrozen,
    #[error("the node is already frozen")]
    AlreadyFrozen,
    #[error("a freeze is already scheduled")]
    FreezeScheduled,
    #[error("port {0:?} is not frozen")]
    PortNotFrozen(String),
}

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the state belongs to a different topology")]
    ForeignTopology,
    #[error("the topology is invalid")]
    Topology(#[from] crate::config::ConfigError),
    #[error("the state is inconsistent with its topology: {0}")]
    Inconsistent(&'static str),
    /// A saved time or count too large to continue from: the file is
    /// damaged or hostile (a real node reaches none of these limits).
    #[error("saved {field} = {value} is beyond {max}")]
    OutOfRange { field: &'static str, value: u64, max: u64 },
}

/// `value` of the saved `field` if it is at most `max`.
fn within(field: &'static str, value: u64, max: u64) -> Result<u64, RestoreError> {
    if value > max {
        return Err(RestoreError::OutOfRange { field, value, max });
    }
    Ok(value)
}

/// Every saved count of `c`, named, at most `MAX_COUNT`.
fn check_pipe_counters(c: &PipeCounters) -> Result<(), RestoreError> {
    check_counts(&[
        ("pipe frames_in", c.frames_in),
        ("pipe bytes_in", c.bytes_in),
        ("pipe frames_out", c.frames_out),
        ("pipe bytes_out", c.bytes_out),
        ("pipe dropped_queue", c.dropped_queue),
        ("pipe dropped_loss", c.dropped_loss),
    ])
}

/// Every saved count of `c`, named, at most `MAX_COUNT`.
fn check_port_counters(c: &PortCounters) -> Result<(), RestoreError> {
    check_counts(&[
        ("port frames_in", c.frames_in),
        ("port bytes_in", c.bytes_in),
        ("port frames_out", c.frames_out),
        ("port bytes_out", c.bytes_out),
        ("port dropped_unconnected", c.dropped_unconnected),
        ("port dropped_unattached", c.dropped_unattached),
        ("port errors", c.errors),
    ])
}

fn check_counts(counts: &[(&'static str, u64)]) -> Result<(), RestoreError> {
    counts.iter().try_for_each(|&(field, value)| within(field, value, MAX_COUNT).map(drop))
}

/// What thawing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawReport {
    pub thawed_at: MonoNs,
    /// Host time spent frozen; 0 for a node restored from a file (its freeze was in another process).
    pub frozen_for_ns: u64,
    /// Largest virtual lateness of a frame that was held for the freeze.
    pub max_hold_lateness_ns: u64,
    /// Frames released late because delivery was held.
    pub held_frames: u64,
}

/// Counters and queue depths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub frozen: bool,
    /// A freeze is scheduled but not reached yet.
    #[serde(default)]
    pub freeze_planned: bool,
    pub virtual_ns: u64,
    /// Host lateness of releases (actual minus scheduled), filled in by the I/O layer.
    #[serde(default)]
    pub release_error: Option<ReleaseError>,
    pub ports: Vec<PortStats>,
    pub pipes: Vec<PipeStats>,
}

/// Distribution of release lateness since the node started, in ns (1 µs resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseError {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortStats {
    pub name: String,
    pub connected: bool,
    pub held_frames: u64,
    /// A vhost-user port held by `hold_port` (no RX delivery until
    /// `release_port`); filled in by the I/O layer.
    #[serde(default)]
    pub vhost_held: bool,
    #[serde(flatten)]
    pub counters: PortCounters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipeStats {
    /// `link:<name>:a_to_b`, `link:<name>:b_to_a`, `lan:<name>:<port>:to_lan`, `lan:<name>:<port>:from_lan`.
    pub name: String,
    /// Frames in the pipe (queued, serialising or propagating).
    pub depth_frames: u64,
    pub depth_bytes: u64,
    /// Frames counted against the queue limit (waiting or serialising).
    pub backlog_frames: u64,
    #[serde(flatten)]
    pub counters: PipeCounters,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sink {
    Port(PortId),
    Switch { lan: usize, member: usize },
}

#[derive(Debug)]
struct InFlight {
    frame: Vec<u8>,
    tx_end: u64,
    exit: u64,
    seq: u64,
}

#[derive(Debug)]
struct Pipe {
    name: String,
    shaping: Shaping,
    sink: Sink,
    frames: VecDeque<InFlight>,
    depth_bytes: u64,
    backlog: VecDeque<(u64, u32)>,
    backlog_bytes: u64,
    busy_until: u64,
    last_exit: u64,
    counters: PipeCounters,
}

impl Pipe {
    fn new(name: String, shaping: Shaping, sink: Sink) -> Pipe {
        Pipe {
            name,
            shaping,
            sink,
            frames: VecDeque::new(),
            depth_bytes: 0,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            busy_until: 0,
            last_exit: 0,
            counters: PipeCounters::default(),
        }
    }

    fn prune_backlog(&mut self, t: u64) {
        while let Some(&(end, len)) = self.backlog.front() {
            if end > t {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= len as u64;
        }
    }
}

/// Serialisation time of `len` bytes at `bps`, rounded up to the nanosecond.
pub fn tx_time_ns(len: usize, bps: u64) -> u64 {
    if bps == 0 {
        return 0;
    }
    let bits = len as u128 * 8 * 1_000_000_000;
    bits.div_ceil(bps as u128) as u64
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Attach {
    None,
    Pipe(usize),
}

#[derive(Debug, Clone, Copy)]
struct PortFreeze {
    hold_from: MonoNs,
    at: MonoNs,
    reached: bool,
}

#[derive(Debug)]
struct Held {
    frame: Vec<u8>,
    due_vt: u64,
}

#[derive(Debug)]
struct Port {
    name: String,
    attach: Attach,
    connected: bool,
    /// The I/O layer knows exactly which frames reached the guest (vhost-user):
    /// freezes ignore the hold lead for this port.
    exact: bool,
    /// The port cannot take frames now (vhost-user device stopped, or no
    /// free receive buffer): due frames wait in `held` until unblocked.
    blocked: bool,
    freeze: Option<PortFreeze>,
    held: VecDeque<Held>,
    counters: PortCounters,
}

#[derive(Debug)]
struct Lan {
    /// (port, to_lan pipe, from_lan pipe) per member.
    members: Vec<(PortId, usize, usize)>,
    macs: BTreeMap<[u8; 6], usize>,
}

#[derive(Debug, Clone, Copy)]
struct FreezePlan {
    hold_from: MonoNs,
    at: MonoNs,
}

#[derive(Debug, Clone, Copy)]
struct Frozen {
    vt: u64,
    /// Host instant of the freeze; `None` after a restore.
    host: Option<MonoNs>,
}

/// The whole node's scheduling state.
#[derive(Debug)]
pub struct Scheduler {
    topology: Topology,
    ports: Vec<Port>,
    pipes: Vec<Pipe>,
    lans: Vec<Lan>,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    next_seq: u64,
    rng: ChaCha8Rng,
    /// vt = host - offset while running (negative after a restore on a young host).
    offset: i64,
    frozen: Option<Frozen>,
    plan: Option<FreezePlan>,
}

impl Scheduler {
    /// A running node whose virtual clock reads 0 at host instant `now`.
    /// The topology must have been validated.
    pub fn new(topology: &Topology, now: MonoNs) -> Scheduler {
        let mut ports: Vec<Port> = topology
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                attach: Attach::None,
                connected: false,
                exact: p.kind == crate::config::PortKind::VhostUser,
                blocked: false,
                freeze: None,
                held: VecDeque::new(),
                counters: PortCounters::default(),
            })
            .collect();
        let index = |name: &str| ports_index(topology, name);
        let mut pipes = Vec::new();
        let mut lans = Vec::new();
        for l in &topology.links {
            let (a, b) = (index(&l.a), index(&l.b));
            ports[a].attach = Attach::Pipe(pipes.len());
            pipes.push(Pipe::new(format!("link:{}:a_to_b", l.name), l.a_to_b, Sink::Port(b)));
            ports[b].attach = Attach::Pipe(pipes.len());
            pipes.push(Pipe::new(format!("link:{}:b_to_a", l.name), l.b_to_a, Sink::Port(a)));
        }
        for (li, lan) in topology.lans.iter().enumerate() {
            let mut members = Vec::new();
            for (mi, m) in lan.members.iter().enumerate() {
                let p = index(&m.port);
                let to = pipes.len();
                pipes.push(Pipe::new(
                    format!("lan:{}:{}:to_lan", lan.name, m.port),
                    m.to_lan,
                    Sink::Switch { lan: li, member: mi },
                ));
                let from = pipes.len();
                pipes.push(Pipe::new(format!("lan:{}:{}:from_lan", lan.name, m.port), m.from_lan, Sink::Port(p)));
                ports[p].attach = Attach::Pipe(to);
                members.push((p, to, from));
            }
            lans.push(Lan { members, macs: BTreeMap::new() });
        }
        Scheduler {
            topology: topology.clone(),
            ports,
            pipes,
            lans,
            events: BinaryHeap::new(),
            next_seq: 0,
            rng: ChaCha8Rng::seed_from_u64(topology.seed),
            offset: now as i64,
            frozen: None,
            plan: None,
        }
    }

    /// Index of the port called `name`.
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ports.iter().position(|p| p.name == name)
    }

    pub fn port_name(&self, port: PortId) -> &str {
        &self.ports[port].name
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Virtual time at host instant `now` (frozen: the freeze instant's).
    pub fn virtual_time(&self, now: MonoNs) -> u64 {
        match self.frozen {
            Some(f) => f.vt,
            None => {
                let now = match self.plan {
                    Some(p) => now.min(p.at),
                    None => now,
                };
                self.vt_of(now)
            }
        }
    }

    /// Virtual time of host instant `host`, ignoring freezes.
    fn vt_of(&self, host: MonoNs) -> u64 {
        (host as i64 - self.offset).max(0) as u64
    }

    /// Host instant of virtual time `vt` under the current offset.
    fn host_of(&self, vt: u64) -> MonoNs {
        (vt as i64 + self.offset).max(0) as u64
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// A whole-node freeze is scheduled or done.
    pub fn freeze_pending_or_done(&self) -> bool {
        self.frozen.is_some() || self.plan.is_some()
    }

    /// Host instant of the freeze, if frozen in this process.
    pub fn frozen_at(&self) -> Option<MonoNs> {
        self.frozen.and_then(|f| f.host)
    }

    /// Tell the core whether a VM is connected to `port`.
    pub fn set_connected(&mut self, port: PortId, connected: bool) {
        self.ports[port].connected = connected;
    }

    /// Block or unblock delivery to `port` (vhost-user: the device stopped or
    /// has no free buffer; it started or posted buffers). While blocked, due
    /// frames wait at the port, in order, and are handed over once unblocked.
    pub fn set_blocked(&mut self, port: PortId, blocked: bool) {
        self.ports[port].blocked = blocked;
    }

    pub fn is_blocked(&self, port: PortId) -> bool {
        self.ports[port].blocked
    }

    /// The I/O layer dropped `port`'s connection for bad framing.
    pub fn note_port_error(&mut self, port: PortId) {
        self.ports[port].counters.errors += 1;
    }

    /// A frame arrived from `port`'s VM at host instant `now`.
    pub fn ingress(&mut self, now: MonoNs, port: PortId, frame: Vec<u8>) {
        let t = self.virtual_time(now);
        let p = &mut self.ports[port];
        p.counters.frames_in += 1;
        p.counters.bytes_in += frame.len() as u64;
        match p.attach {
            Attach::None => p.counters.dropped_unattached += 1,
            Attach::Pipe(pipe) => self.enqueue(pipe, t, frame),
        }
    }

    fn enqueue(&mut self, pipe: usize, t: u64, frame: Vec<u8>) {
        let pp = &mut self.pipes[pipe];
        let len = frame.len();
        pp.counters.frames_in += 1;
        pp.counters.bytes_in += len as u64;
        let s = pp.shaping;
        if s.loss > 0.0 && self.rng.gen::<f64>() < s.loss {
            pp.counters.dropped_loss += 1;
            return;
        }
        pp.prune_backlog(t);
        if pp.backlog.len() as u64 + 1 > s.queue_packets as u64 || pp.backlog_bytes + len as u64 > s.queue_bytes {
            pp.counters.dropped_queue += 1;
            return;
        }
        let tx_end = t.max(pp.busy_until) + tx_time_ns(len, s.bandwidth_bps);
        pp.busy_until = tx_end;
        let jitter = if s.jitter_ns > 0 { self.rng.gen_range(0..=s.jitter_ns) } else { 0 };
        let exit = (tx_end + s.delay_ns + jitter).max(pp.last_exit);
        pp.last_exit = exit;
        if tx_end > t {
            pp.backlog.push_back((tx_end, len as u32));
            pp.backlog_bytes += len as u64;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        pp.depth_bytes += len as u64;
        pp.frames.push_back(InFlight { frame, tx_end, exit, seq });
        self.events.push(Reverse((exit, seq, pipe)));
    }

    /// Schedule the whole-node freeze: deliveries due at or after host instant
    /// `at - hold_lead_ns` are held; the virtual clock stops at `at` (or at
    /// `now` if `at` has passed).
    pub fn schedule_freeze(&mut self, now: MonoNs, at: MonoNs, hold_lead_ns: u64) -> Result<(), SchedError> {
        if self.frozen.is_some() {
            return Err(SchedError::AlreadyFrozen);
        }
        if self.plan.is_some() {
            return Err(SchedError::FreezeScheduled);
        }
        let at = at.max(now);
        self.plan = Some(FreezePlan { hold_from: at.saturating_sub(hold_lead_ns).max(now), at });
        Ok(())
    }

    /// Schedule holding delivery to one port from `at - hold_lead_ns`; the
    /// rest of the network keeps running. Replaces an earlier per-port plan.
    pub fn schedule_port_freeze(&mut self, now: MonoNs, port: PortId, at: MonoNs, hold_lead_ns: u64) {
        let at = at.max(now);
        self.ports[port].freeze =
            Some(PortFreeze { hold_from: at.saturating_sub(hold_lead_ns).max(now), at, reached: false });
    }

    /// Stop holding one port at host instant `at` (≥ its freeze); its held frames are released by the next `poll`.
    /// Returns (held frames, max lateness).
    pub fn thaw_port(&mut self, at: MonoNs, port: PortId) -> Result<(u64, u64), SchedError> {
        if self.ports[port].freeze.is_none() {
            return Err(SchedError::PortNotFrozen(self.ports[port].name.clone()));
        }
        let vt = self.virtual_time(at);
        let p = &mut self.ports[port];
        p.freeze = None;
        let late = p.held.iter().map(|h| vt.saturating_sub(h.due_vt)).max().unwrap_or(0);
        Ok((p.held.len() as u64, late))
    }

    /// Thaw the whole node at host instant `at`: the virtual clock continues
    /// from where it stopped; every hold (node and per-port) ends.
    pub fn thaw(&mut self, at: MonoNs) -> Result<ThawReport, SchedError> {
        let f = self.frozen.ok_or(SchedError::NotFrozen)?;
        let mut held = 0;
        let mut late = 0;
        for p in &mut self.ports {
            p.freeze = None;
            held += p.held.len() as u64;
            for h in &p.held {
                late = late.max(f.vt.saturating_sub(h.due_vt));
            }
        }
        let at = at.max(f.host.unwrap_or(0));
        self.offset = at as i64 - f.vt as i64;
        self.frozen = None;
        self.plan = None;
        Ok(ThawReport {
            thawed_at: at,
            frozen_for_ns: f.host.map(|h| at - h).unwrap_or(0),
            max_hold_lateness_ns: late,
            held_frames: held,
        })
    }

    /// The next host instant at which `poll` has work; `None` if none is scheduled.
    pub fn next_deadline(&self) -> Option<MonoNs> {
        let mut d: Option<MonoNs> = None;
        let mut take = |t: MonoNs| d = Some(d.map_or(t, |x: MonoNs| x.min(t)));
        if let Some(p) = self.plan {
            take(p.at);
        }
        for p in &self.ports {
            if let Some(f) = p.freeze {
                if !f.reached {
                    take(f.at);
                }
            }
            if !p.held.is_empty() && !self.port_held_now(p) {
                take(0);
            }
        }
        if self.frozen.is_none() {
            if let Some(Reverse((vt, _, _))) = self.events.peek() {
                take(self.host_of(*vt));
            }
        }
        d
    }

    fn port_held_now(&self, p: &Port) -> bool {
        // Held frames exist because of a freeze (scheduled or done; they stay
        // until that freeze is thawed) or because the port is blocked.
        p.blocked || self.frozen.is_some() || self.plan.is_some() || p.freeze.is_some()
    }

    /// Do everything due by host instant `now`.
    pub fn poll(&mut self, now: MonoNs, out: &mut Vec<Action>) {
        // Ports whose hold is over get their held frames first, in order.
        for i in 0..self.ports.len() {
            if !self.ports[i].held.is_empty() && !self.port_held_now(&self.ports[i]) {
                let offset = self.offset;
                let port = &mut self.ports[i];
                while let Some(h) = port.held.pop_front() {
                    let due = (h.due_vt as i64 + offset).max(0) as u64;
                    Self::hand_over(port, i, h.frame, due, h.due_vt, out);
                }
            }
        }
        for i in 0..self.ports.len() {
            if let Some(f) = &mut self.ports[i].freeze {
                if !f.reached && now >= f.at {
                    f.reached = true;
                    out.push(Action::PortFrozen { port: i, at: f.at });
                }
            }
        }
        if self.frozen.is_some() {
            let vt = self.virtual_time(now);
            self.run_until(vt, out);
            return;
        }
        match self.plan {
            Some(plan) if now >= plan.at => {
                let vt = self.vt_of(plan.at);
                self.run_until(vt, out);
                self.frozen = Some(Frozen { vt, host: Some(plan.at) });
                self.plan = None;
                out.push(Action::Frozen { at: plan.at });
            }
            _ => {
                let vt = self.virtual_time(now);
                self.run_until(vt, out);
            }
        }
    }

    fn run_until(&mut self, vt: u64, out: &mut Vec<Action>) {
        while let Some(&Reverse((exit, _, pipe))) = self.events.peek() {
            if exit > vt {
                break;
            }
            self.events.pop();
            let pp = &mut self.pipes[pipe];
            let f = pp.frames.pop_front().expect("event without frame");
            debug_assert_eq!(f.exit, exit);
            pp.depth_bytes -= f.frame.len() as u64;
            pp.counters.frames_out += 1;
            pp.counters.bytes_out += f.frame.len() as u64;
            match pp.sink {
                Sink::Port(port) => self.deliver(port, f.frame, exit, out),
                Sink::Switch { lan, member } => self.switch(lan, member, f.frame, exit),
            }
        }
    }

    fn switch(&mut self, lan: usize, member: usize, frame: Vec<u8>, t: u64) {
        let dst: [u8; 6] = frame[0..6].try_into().expect("frames are at least 14 bytes");
        let src: [u8; 6] = frame[6..12].try_into().expect("frames are at least 14 bytes");
        let l = &mut self.lans[lan];
        if src[0] & 1 == 0 {
            l.macs.insert(src, member);
        }
        let known = if dst[0] & 1 == 0 { l.macs.get(&dst).copied() } else { None };
        match known {
            Some(k) if k == member => {} // the destination is on the sender's own segment
            Some(k) => {
                let to = l.members[k].2;
                self.enqueue(to, t, frame);
            }
            None => {
                let targets: Vec<usize> =
                    l.members.iter().enumerate().filter(|(k, _)| *k != member).map(|(_, m)| m.2).collect();
                if let Some((&last, rest)) = targets.split_last() {
                    for &to in rest {
                        self.enqueue(to, t, frame.clone());
                    }
                    self.enqueue(last, t, frame);
                }
            }
        }
    }

    fn deliver(&mut self, port: PortId, frame: Vec<u8>, due_vt: u64, out: &mut Vec<Action>) {
        // An exact port delivers right up to the freeze instant: a frame it
        // cannot put into the guest any more comes back through `unsend`.
        let exact = self.ports[port].exact;
        let held = match (self.frozen, self.plan) {
            (Some(_), _) => true,
            (None, Some(plan)) => due_vt >= self.vt_of(if exact { plan.at } else { plan.hold_from }),
            (None, None) => false,
        };
        let port_held = match self.ports[port].freeze {
            Some(f) => f.reached || due_vt >= self.vt_of(if exact { f.at } else { f.hold_from }),
            None => false,
        };
        let due = self.host_of(due_vt);
        let frozen_or_planned = self.frozen.is_some() || self.plan.is_some() || self.ports[port].freeze.is_some();
        let p = &mut self.ports[port];
        if held || port_held || p.blocked || !p.held.is_empty() {
            // A port blocked outside any freeze (a VM that stays stopped or
            // never starts) keeps a bounded backlog, like a drop-tail queue.
            if p.blocked && !frozen_or_planned && p.held.len() >= BLOCKED_BACKLOG {
                p.counters.dropped_unconnected += 1;
                return;
            }
            p.held.push_back(Held { frame, due_vt });
            return;
        }
        Self::hand_over(p, port, frame, due, due_vt, out);
    }

    fn hand_over(p: &mut Port, port: PortId, frame: Vec<u8>, due: MonoNs, due_vt: u64, out: &mut Vec<Action>) {
        if !p.connected {
            p.counters.dropped_unconnected += 1;
            return;
        }
        p.counters.frames_out += 1;
        p.counters.bytes_out += frame.len() as u64;
        out.push(Action::Deliver { port, frame, due, due_vt });
    }

    /// Put back a frame the I/O layer could not write (socket full at save
    /// time); it goes to the front of the port's held frames.
    pub fn unsend(&mut self, port: PortId, frame: Vec<u8>, due_vt: u64) {
        let p = &mut self.ports[port];
        p.counters.frames_out -= 1;
        p.counters.bytes_out -= frame.len() as u64;
        p.held.push_front(Held { frame, due_vt });
    }

    /// Frames inside pipes and frames held at ports.
    pub fn frame_counts(&self) -> (u64, u64) {
        let inflight = self.pipes.iter().map(|p| p.frames.len() as u64).sum();
        let held = self.ports.iter().map(|p| p.held.len() as u64).sum();
        (inflight, held)
    }

    /// Names of the pipes, in state order.
    pub fn pipe_names(&self) -> Vec<String> {
        self.pipes.iter().map(|p| p.name.clone()).collect()
    }

    pub fn stats(&self, now: MonoNs) -> Stats {
        Stats {
            frozen: self.frozen.is_some(),
            freeze_planned: self.frozen.is_none() && self.plan.is_some(),
            virtual_ns: self.virtual_time(now),
            release_error: None,
            ports: self
                .ports
                .iter()
                .map(|p| PortStats {
                    name: p.name.clone(),
                    connected: p.connected,
                    held_frames: p.held.len() as u64,
                    vhost_held: false,
                    counters: p.counters,
                })
                .collect(),
            pipes: self
                .pipes
                .iter()
                .map(|p| PipeStats {
                    name: p.name.clone(),
                    depth_frames: p.frames.len() as u64,
                    depth_bytes: p.depth_bytes,
                    backlog_frames: p.backlog.len() as u64,
                    counters: p.counters,
                })
                .collect(),
        }
    }

    /// The state of a frozen node. Refused unless frozen.
    pub fn save(&self) -> Result<NodeState, SchedError> {
        let f = self.frozen.ok_or(SchedError::NotFrozen)?;
        let rel = |t: u64| t.saturating_sub(f.vt);
        Ok(NodeState {
            topology: self.topology.clone(),
            rng_seed: self.rng.get_seed(),
            rng_stream: self.rng.get_stream(),
            rng_word_pos: self.rng.get_word_pos(),
            next_seq: self.next_seq,
            pipes: self
                .pipes
                .iter()
                .map(|p| PipeState {
                    busy_remaining_ns: rel(p.busy_until),
                    last_exit_remaining_ns: rel(p.last_exit),
                    frames: p
                        .frames
                        .iter()
                        .map(|fr| FrameState {
                            data: fr.frame.clone(),
                            tx_remaining_ns: rel(fr.tx_end),
                            remaining_ns: rel(fr.exit),
                            seq: fr.seq,
                        })
                        .collect(),
                    counters: p.counters,
                })
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|p| PortState {
                    held: p
                        .held
                        .iter()
                        .map(|h| HeldState { data: h.frame.clone(), late_ns: f.vt.saturating_sub(h.due_vt) })
                        .collect(),
                    counters: p.counters,
                })
                .collect(),
            macs: self.lans.iter().map(|l| l.macs.iter().map(|(m, &k)| (*m, k as u32)).collect()).collect(),
        })
    }

    /// A frozen node continuing `state`. `topology` must equal the saved one.
    /// Virtual time restarts at a base of `VT_BASE` so held frames' lateness stays representable.
    ///
    /// The state is untrusted input: every saved time is at most
    /// `MAX_REMAINING` after the freeze (or `VT_BASE` before it), every
    /// counter and sequence number at most `MAX_COUNT`, so nothing the node
    /// adds to them later can overflow; anything else is refused naming the
    /// field. Collections are as long as the decoded file, never a saved count.
    pub fn restore(topology: &Topology, state: &NodeState) -> Result<Scheduler, RestoreError> {
        if *topology != state.topology {
            return Err(RestoreError::ForeignTopology);
        }
        topology.validate()?;
        let mut s = Scheduler::new(topology, 0);
        if state.pipes.len() != s.pipes.len() {
            return Err(RestoreError::Inconsistent("pipe count"));
        }
        if state.ports.len() != s.ports.len() {
            return Err(RestoreError::Inconsistent("port count"));
        }
        if state.macs.len() != s.lans.len() {
            return Err(RestoreError::Inconsistent("LAN count"));
        }
        let base = VT_BASE;
        let mut rng = ChaCha8Rng::from_seed(state.rng_seed);
        rng.set_stream(state.rng_stream);
        rng.set_word_pos(state.rng_word_pos);
        s.rng = rng;
        s.next_seq = within("next_seq", state.next_seq, MAX_COUNT)?;
        for (i, ps) in state.pipes.iter().enumerate() {
            let p = &mut s.pipes[i];
            p.busy_until = base + within("pipe busy_remaining_ns", ps.busy_remaining_ns, MAX_REMAINING)?;
            p.last_exit = base + within("pipe last_exit_remaining_ns", ps.last_exit_remaining_ns, MAX_REMAINING)?;
            check_pipe_counters(&ps.counters)?;
            p.counters = ps.counters;
            let mut last = 0;
            for fr in &ps.frames {
                if fr.data.len() < crate::frame::MIN_FRAME || fr.data.len() > crate::frame::MAX_FRAME {
                    return Err(RestoreError::Inconsistent("frame size"));
                }
                within("frame remaining_ns", fr.remaining_ns, MAX_REMAINING)?;
                if fr.remaining_ns < last || fr.tx_remaining_ns > fr.remaining_ns {
                    return Err(RestoreError::Inconsistent("frame times"));
                }
                // Sequence numbers break ties in the event heap: one the node
                // would hand out again could reorder frames.
                if fr.seq >= state.next_seq {
                    return Err(RestoreError::Inconsistent("frame seq not below next_seq"));
                }
                last = fr.remaining_ns;
                let (tx_end, exit) = (base + fr.tx_remaining_ns, base + fr.remaining_ns);
                if fr.tx_remaining_ns > 0 {
                    p.backlog.push_back((tx_end, fr.data.len() as u32));
                    p.backlog_bytes += fr.data.len() as u64;
                }
                p.depth_bytes += fr.data.len() as u64;
                p.frames.push_back(InFlight { frame: fr.data.clone(), tx_end, exit, seq: fr.seq });
                s.events.push(Reverse((exit, fr.seq, i)));
            }
        }
        for (i, ps) in state.ports.iter().enumerate() {
            let p = &mut s.ports[i];
            check_port_counters(&ps.counters)?;
            p.counters = ps.counters;
            for h in &ps.held {
                if h.data.len() < crate::frame::MIN_FRAME || h.data.len() > crate::frame::MAX_FRAME {
                    return Err(RestoreError::Inconsistent("held frame size"));
                }
                let late = within("held late_ns", h.late_ns, base)?;
                p.held.push_back(Held { frame: h.data.clone(), due_vt: base - late });
            }
        }
        for (li, macs) in state.macs.iter().enumerate() {
            for (m, k) in macs {
                if *k as usize >= s.lans[li].members.len() {
                    return Err(RestoreError::Inconsistent("MAC table member"));
                }
                s.lans[li].macs.insert(*m, *k as usize);
            }
        }
        s.frozen = Some(Frozen { vt: base, host: None });
        Ok(s)
    }
}

/// Frames a blocked port keeps outside a freeze before dropping new ones.
pub const BLOCKED_BACKLOG: usize = 4096;

/// Virtual time of a restored node at its freeze (room for held frames' lateness below it).
const VT_BASE: u64 = 1 << 50;
/// Cap on a restored frame's remaining time (about 13 days), so arithmetic cannot overflow.
const MAX_REMAINING: u64 = 1 << 50;
/// Cap on a restored counter or sequence number: 2^62 leaves 2^62 more
/// increments (a century at 10^9 frames/s) before a `+= 1` could overflow.
const MAX_COUNT: u64 = 1 << 62;

fn ports_index(t: &Topology, name: &str) -> usize {
    t.ports.iter().position(|p| p.name == name).expect("validated topology")
}

#[cfg(test)]
mod tests;
