//! The coordinator's side of one checkpoint round, without I/O: it takes the
//! agents' messages, lost connections, timer expiries and the manifest's
//! fate with the current instant, and returns what must be done.
//!
//! The commit point is the moment every agent has reported [`Saved`]: the
//! core then asks for the manifest to be committed, and the checkpoint exists
//! once that is durable. Before that point any [`SaveFailed`], any lost
//! connection or the save deadline passing with an agent missing aborts the
//! round; after it a lost agent no longer undoes anything (only a failed
//! manifest write does). Commit or abort, every agent that can still be
//! reached is told to resume every component `D` after its own stop, with
//! one `D` for all: `D = now − earliest stop + resume margin`, so the
//! earliest-stopped component resumes a margin after the decision.
//!
//! An agent's Saved means its part is sealed (durable, sizes and digests
//! known), not yet in its store: after a commit each agent resumes, then
//! commits its part into its store and reports [`Stored`]. The round ends
//! once every agent still connected has resumed and, after a commit, stored
//! (or the resume and store timeouts passed); the outcome names the parts
//! whose store commit failed or was never reported.
//!
//! [`Saved`]: crate::msg::Saved
//! [`SaveFailed`]: crate::msg::SaveFailed
//! [`Stored`]: crate::msg::Stored

use crate::msg::{Abort, CkptId, Commit, Component, Message, Prepare, ResumedComponent, Stored};

/// Tunables of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordConfig {
    /// Freeze instant = start + margin (> fan-out time + clock error).
    pub margin_ns: u64,
    /// Passed to agents: the delay node stops delivering this much earlier.
    pub hold_lead_ns: u64,
    /// Every Saved must arrive by freeze instant + this.
    pub save_budget_ns: u64,
    /// Slack before the first resume (> one-way latency + apply time).
    pub resume_margin_ns: u64,
    /// Keep everything frozen at least this long.
    pub min_frozen_ns: u64,
    /// How long after its decision the coordinator waits for Resumed.
    pub resume_timeout_ns: u64,
    /// How long after a commit decision it waits for every Stored.
    pub store_timeout_ns: u64,
}

impl Default for CoordConfig {
    fn default() -> Self {
        CoordConfig {
            margin_ns: 300_000_000,
            hold_lead_ns: 20_000_000,
            save_budget_ns: 10_000_000_000,
            resume_margin_ns: 100_000_000,
            min_frozen_ns: 0,
            resume_timeout_ns: 5_000_000_000,
            store_timeout_ns: 300_000_000_000,
        }
    }
}

/// A freeze margin from measured Ping/Pong round trips: the last Prepare
/// leaves after `agents × per_message_ns` of fan-out and arrives within the
/// largest RTT (a one-way trip, with slack); the agents' clocks may disagree
/// by `clock_err_ns` either way. Doubled for safety.
#[must_use]
pub fn margin_for(max_rtt_ns: u64, agents: u64, per_message_ns: u64, clock_err_ns: u64) -> u64 {
    2 * (agents * per_message_ns + max_rtt_ns + 2 * clock_err_ns)
}

/// Which agent (index given to [`CoordinatorCore::new`]'s agent count).
pub type AgentIdx = usize;

/// Why a round aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortReason {
    SaveFailed { agent: AgentIdx, reason: String },
    Deadline { missing: Vec<AgentIdx> },
    Lost { agent: AgentIdx },
    Manifest(String),
}

/// The end of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ckpt: CkptId,
    pub committed: bool,
    pub abort: Option<AbortReason>,
    pub started: u64,
    pub freeze_at: u64,
    /// When commit or abort was decided (the manifest durable, or the abort).
    pub decided_at: u64,
    pub resume_after_ns: u64,
    /// When the last Resumed (or, after a commit, Stored) arrived or the
    /// timeouts hit.
    pub finished: u64,
    pub lost: Vec<AgentIdx>,
    pub not_resumed: Vec<AgentIdx>,
    /// Per agent, the resume instants it reported.
    pub resumed: Vec<Option<Vec<ResumedComponent>>>,
    /// Per agent, after a commit: how its store commit went (`None`: not
    /// reported — lost, or past the store timeout).
    pub stored: Vec<Option<Stored>>,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordAction {
    Send {
        to: AgentIdx,
        msg: Message,
    },
    /// Call [`CoordinatorCore::on_timer`] at this instant.
    SetTimer {
        at: u64,
    },
    /// Write the manifest durably, then call
    /// [`CoordinatorCore::manifest_committed`] or `manifest_failed`.
    CommitManifest {
        ckpt: CkptId,
        components: Vec<(AgentIdx, Vec<Component>)>,
    },
    /// Make sure no partial checkpoint is listed (agents discard their own
    /// files on Abort; this is the coordinator's share).
    RemovePartial {
        ckpt: CkptId,
    },
    Done(Outcome),
}

/// An input that the current phase does not allow.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CoordRefusal {
    #[error("{got} from agent {agent} refused in phase {phase}")]
    OutOfOrder { agent: AgentIdx, phase: &'static str, got: &'static str },
    #[error("message from agent {agent} for checkpoint {got}, round is {current}")]
    WrongCheckpoint { agent: AgentIdx, current: CkptId, got: CkptId },
    #[error("no agent {0}")]
    NoSuchAgent(AgentIdx),
    #[error("agent {0} was already given up as lost")]
    Lost(AgentIdx),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Pending,
    Saved(Vec<Component>),
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Preparing,
    Committing,
    Resuming { committed: bool },
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Preparing => "Preparing",
            Phase::Committing => "Committing",
            Phase::Resuming { .. } => "Resuming",
            Phase::Done => "Done",
        }
    }
}

/// One checkpoint round.
#[derive(Debug, Clone)]
pub struct CoordinatorCore {
    ckpt: CkptId,
    cfg: CoordConfig,
    phase: Phase,
    slots: Vec<Slot>,
    lost: Vec<bool>,
    resumed: Vec<Option<Vec<ResumedComponent>>>,
    stored: Vec<Option<Stored>>,
    /// No longer waited for (past the resume or store timeout).
    given_up: Vec<bool>,
    saved: usize,
    earliest_stop: u64,
    started: u64,
    freeze_at: u64,
    deadline: u64,
    decided_at: u64,
    resume_after_ns: u64,
    resume_deadline: u64,
    store_deadline: u64,
    abort: Option<AbortReason>,
}

impl CoordinatorCore {
    pub fn new(ckpt: CkptId, agents: usize, cfg: CoordConfig) -> CoordinatorCore {
        CoordinatorCore {
            ckpt,
            cfg,
            phase: Phase::Idle,
            slots: vec![Slot::Pending; agents],
            lost: vec![false; agents],
            resumed: vec![None; agents],
            stored: vec![None; agents],
            given_up: vec![false; agents],
            saved: 0,
            earliest_stop: u64::MAX,
            started: 0,
            freeze_at: 0,
            deadline: 0,
            decided_at: 0,
            resume_after_ns: 0,
            resume_deadline: 0,
            store_deadline: 0,
            abort: None,
        }
    }

    pub fn freeze_at(&self) -> u64 {
        self.freeze_at
    }

    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Send PREPARE to every agent.
    #[must_use = "the actions must be carried out"]
    pub fn start(&mut self, now: u64) -> Vec<CoordAction> {
        assert_eq!(self.phase, Phase::Idle, "a round starts once");
        self.started = now;
        self.freeze_at = now + self.cfg.margin_ns;
        self.deadline = self.freeze_at + self.cfg.save_budget_ns;
        self.phase = Phase::Preparing;
        let p = Prepare {
            ckpt: self.ckpt,
            freeze_at: self.freeze_at,
            hold_lead_ns: self.cfg.hold_lead_ns,
            deadline: self.deadline,
        };
        let mut acts: Vec<CoordAction> =
            (0..self.slots.len()).map(|to| CoordAction::Send { to, msg: Message::Prepare(p.clone()) }).collect();
        acts.push(CoordAction::SetTimer { at: self.deadline });
        if self.slots.is_empty() {
            self.phase = Phase::Committing;
            acts.push(CoordAction::CommitManifest { ckpt: self.ckpt, components: vec![] });
        }
        acts
    }

    fn refuse(&self, agent: AgentIdx, got: &'static str) -> CoordRefusal {
        CoordRefusal::OutOfOrder { agent, phase: self.phase.name(), got }
    }

    /// A message from agent `from`.
    #[must_use = "the actions must be carried out"]
    pub fn on_message(&mut self, now: u64, from: AgentIdx, msg: Message) -> Result<Vec<CoordAction>, CoordRefusal> {
        if from >= self.slots.len() {
            return Err(CoordRefusal::NoSuchAgent(from));
        }
        if self.lost[from] {
            return Err(CoordRefusal::Lost(from));
        }
        let ckpt = match &msg {
            Message::Saved(m) => Some(m.ckpt),
            Message::SaveFailed(m) => Some(m.ckpt),
            Message::Resumed(m) => Some(m.ckpt),
            Message::Stored(m) => Some(m.ckpt),
            _ => None,
        };
        if let Some(got) = ckpt {
            if got != self.ckpt {
                return Err(CoordRefusal::WrongCheckpoint { agent: from, current: self.ckpt, got });
            }
        }
        match msg {
            Message::Saved(s) => {
                if self.phase != Phase::Preparing || self.slots[from] != Slot::Pending {
                    return Err(self.refuse(from, "Saved"));
                }
                for c in &s.components {
                    self.earliest_stop = self.earliest_stop.min(c.stop_ns);
                }
                self.slots[from] = Slot::Saved(s.components);
                self.saved += 1;
                if self.saved < self.slots.len() {
                    return Ok(vec![]);
                }
                self.phase = Phase::Committing;
                let components = self
                    .slots
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| {
                        (
                            i,
                            match std::mem::replace(s, Slot::Pending) {
                                Slot::Saved(c) => c,
                                _ => unreachable!("all saved"),
                            },
                        )
                    })
                    .collect();
                Ok(vec![CoordAction::CommitManifest { ckpt: self.ckpt, components }])
            }
            Message::SaveFailed(f) => {
                if self.phase != Phase::Preparing || self.slots[from] != Slot::Pending {
                    return Err(self.refuse(from, "SaveFailed"));
                }
                self.slots[from] = Slot::Failed;
                for &s in &f.stops_ns {
                    self.earliest_stop = self.earliest_stop.min(s);
                }
                Ok(self.abort(now, AbortReason::SaveFailed { agent: from, reason: f.reason }))
            }
            Message::Resumed(r) => {
                if !matches!(self.phase, Phase::Resuming { .. }) || self.resumed[from].is_some() {
                    return Err(self.refuse(from, "Resumed"));
                }
                self.resumed[from] = Some(r.components);
                Ok(self.finish_if_all_in(now))
            }
            Message::Stored(st) => {
                // An agent stores after it resumed (in order on its connection).
                if self.phase != (Phase::Resuming { committed: true })
                    || self.resumed[from].is_none()
                    || self.stored[from].is_some()
                {
                    return Err(self.refuse(from, "Stored"));
                }
                self.stored[from] = Some(st);
                Ok(self.finish_if_all_in(now))
            }
            Message::Pong(_) => Ok(vec![]),
            other => Err(self.refuse(from, other.name())),
        }
    }

    /// The connection to agent `who` is gone.
    #[must_use = "the actions must be carried out"]
    pub fn on_disconnect(&mut self, now: u64, who: AgentIdx) -> Vec<CoordAction> {
        if who >= self.lost.len() || self.lost[who] {
            return vec![];
        }
        self.lost[who] = true;
        match self.phase {
            Phase::Preparing => self.abort(now, AbortReason::Lost { agent: who }),
            Phase::Resuming { .. } => self.finish_if_all_in(now),
            _ => vec![],
        }
    }

    /// A timer set by a [`CoordAction::SetTimer`] fired (early calls are harmless).
    #[must_use = "the actions must be carried out"]
    pub fn on_timer(&mut self, now: u64) -> Vec<CoordAction> {
        match self.phase {
            Phase::Preparing if now >= self.deadline => {
                let missing =
                    self.slots.iter().enumerate().filter(|(_, s)| **s == Slot::Pending).map(|(i, _)| i).collect();
                self.abort(now, AbortReason::Deadline { missing })
            }
            Phase::Resuming { committed } if now >= self.resume_deadline => {
                for i in 0..self.slots.len() {
                    let past_store = committed && now >= self.store_deadline;
                    if self.resumed[i].is_none() || past_store || !committed {
                        self.given_up[i] = true;
                    }
                }
                self.finish_if_all_in(now)
            }
            _ => vec![],
        }
    }

    /// The manifest is durable: the checkpoint exists; tell everyone.
    #[must_use = "the actions must be carried out"]
    pub fn manifest_committed(&mut self, now: u64) -> Vec<CoordAction> {
        assert_eq!(self.phase, Phase::Committing, "manifest_committed outside Committing");
        self.decide(now, true)
    }

    /// The manifest could not be written: abort.
    #[must_use = "the actions must be carried out"]
    pub fn manifest_failed(&mut self, now: u64, reason: String) -> Vec<CoordAction> {
        assert_eq!(self.phase, Phase::Committing, "manifest_failed outside Committing");
        self.abort(now, AbortReason::Manifest(reason))
    }

    fn abort(&mut self, now: u64, reason: AbortReason) -> Vec<CoordAction> {
        tracing::warn!(ckpt = %self.ckpt, ?reason, "checkpoint aborts");
        self.abort = Some(reason);
        // Agents that never reported may have stopped from freeze_at - hold_lead on.
        self.earliest_stop = self.earliest_stop.min(self.freeze_at.saturating_sub(self.cfg.hold_lead_ns));
        let mut acts = self.decide(now, false);
        acts.push(CoordAction::RemovePartial { ckpt: self.ckpt });
        acts
    }

    fn decide(&mut self, now: u64, committed: bool) -> Vec<CoordAction> {
        let earliest = self.earliest_stop.min(now);
        self.resume_after_ns = (now - earliest + self.cfg.resume_margin_ns).max(self.cfg.min_frozen_ns);
        self.decided_at = now;
        self.phase = Phase::Resuming { committed };
        self.resume_deadline = now + self.cfg.resume_timeout_ns;
        self.store_deadline = now + self.cfg.store_timeout_ns.max(self.cfg.resume_timeout_ns);
        let (ckpt, d) = (self.ckpt, self.resume_after_ns);
        let mut acts = Vec::with_capacity(self.slots.len() + 3);
        for to in 0..self.slots.len() {
            if self.lost[to] {
                continue;
            }
            let msg = if committed {
                Message::Commit(Commit { ckpt, resume_after_ns: d })
            } else {
                Message::Abort(Abort { ckpt, resume_after_ns: d })
            };
            acts.push(CoordAction::Send { to, msg });
        }
        acts.push(CoordAction::SetTimer { at: self.resume_deadline });
        if committed {
            acts.push(CoordAction::SetTimer { at: self.store_deadline });
        }
        acts.extend(self.finish_if_all_in(now));
        acts
    }

    /// Whether agent `i` still owes a report: Resumed, then (after a commit) Stored.
    fn owes(&self, i: AgentIdx, committed: bool) -> bool {
        !self.lost[i] && !self.given_up[i] && (self.resumed[i].is_none() || (committed && self.stored[i].is_none()))
    }

    fn finish_if_all_in(&mut self, now: u64) -> Vec<CoordAction> {
        let Phase::Resuming { committed } = self.phase else { return vec![] };
        if (0..self.slots.len()).any(|i| self.owes(i, committed)) {
            vec![]
        } else {
            self.finish(now)
        }
    }

    fn finish(&mut self, now: u64) -> Vec<CoordAction> {
        let Phase::Resuming { committed } = self.phase else { return vec![] };
        self.phase = Phase::Done;
        let lost: Vec<_> = (0..self.lost.len()).filter(|&i| self.lost[i]).collect();
        let not_resumed = (0..self.resumed.len()).filter(|&i| self.resumed[i].is_none()).collect();
        vec![CoordAction::Done(Outcome {
            ckpt: self.ckpt,
            committed,
            abort: self.abort.clone(),
            started: self.started,
            freeze_at: self.freeze_at,
            decided_at: self.decided_at,
            resume_after_ns: self.resume_after_ns,
            finished: now,
            lost,
            not_resumed,
            resumed: std::mem::take(&mut self.resumed),
            stored: std::mem::take(&mut self.stored),
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Resumed, SaveFailed, Saved};

    fn id() -> CkptId {
        CkptId::new(7).unwrap()
    }
    fn cfg() -> CoordConfig {
        CoordConfig {
            margin_ns: 100,
            hold_lead_ns: 10,
            save_budget_ns: 1_000,
            resume_margin_ns: 50,
            min_frozen_ns: 0,
            resume_timeout_ns: 500,
            store_timeout_ns: 2_000,
        }
    }
    fn saved(stop: u64) -> Message {
        Message::Saved(Saved {
            ckpt: id(),
            components: vec![Component { name: "vm".into(), bytes: 1, blake3: [0; 32], stop_ns: stop }],
        })
    }
    fn resumed() -> Message {
        Message::Resumed(Resumed { ckpt: id(), components: vec![] })
    }
    fn stored(error: Option<&str>) -> Message {
        Message::Stored(Stored { ckpt: id(), started_ns: 1, commit_ns: 2, error: error.map(str::to_owned) })
    }
    fn sends(acts: &[CoordAction]) -> Vec<(AgentIdx, Message)> {
        acts.iter()
            .filter_map(|a| if let CoordAction::Send { to, msg } = a { Some((*to, msg.clone())) } else { None })
            .collect()
    }
    fn done(acts: &[CoordAction]) -> Option<Outcome> {
        acts.iter().find_map(|a| if let CoordAction::Done(o) = a { Some(o.clone()) } else { None })
    }

    #[test]
    fn commit_path_with_equal_d() {
        let mut c = CoordinatorCore::new(id(), 2, cfg());
        let acts = c.start(1_000);
        assert_eq!(sends(&acts).len(), 2);
        assert!(acts.contains(&CoordAction::SetTimer { at: 1_000 + 100 + 1_000 }));
        assert!(
            matches!(&sends(&acts)[0].1, Message::Prepare(p) if p.freeze_at == 1_100 && p.deadline == 2_100 && p.hold_lead_ns == 10)
        );
        assert!(c.on_message(1_300, 0, saved(1_102)).unwrap().is_empty());
        let acts = c.on_message(1_400, 1, saved(1_105)).unwrap();
        assert!(matches!(&acts[..], [CoordAction::CommitManifest { components, .. }] if components.len() == 2));
        let acts = c.manifest_committed(1_500);
        let s = sends(&acts);
        assert_eq!(s.len(), 2);
        // D = now - earliest stop + margin = 1500 - 1102 + 50.
        assert!(s.iter().all(|(_, m)| *m == Message::Commit(Commit { ckpt: id(), resume_after_ns: 448 })));
        assert!(c.on_message(1_600, 0, resumed()).unwrap().is_empty());
        assert!(c.on_message(1_620, 0, stored(None)).unwrap().is_empty(), "agent 1 has not resumed yet");
        assert!(c.on_message(1_650, 1, resumed()).unwrap().is_empty(), "agent 1 has not stored yet");
        let o = done(&c.on_message(1_700, 1, stored(None)).unwrap()).unwrap();
        assert!(o.committed && o.abort.is_none() && o.not_resumed.is_empty() && o.lost.is_empty());
        assert_eq!((o.decided_at, o.finished, o.resume_after_ns), (1_500, 1_700, 448));
        assert!(o.stored.iter().all(|s| s.as_ref().is_some_and(|s| s.error.is_none())));
    }

    fn committed_core(agents: usize) -> CoordinatorCore {
        let mut c = CoordinatorCore::new(id(), agents, cfg());
        let _ = c.start(0);
        for i in 0..agents {
            let _ = c.on_message(150, i, saved(100)).unwrap();
        }
        let _ = c.manifest_committed(200);
        c
    }

    #[test]
    fn a_failed_store_commit_ends_up_in_the_outcome() {
        let mut c = committed_core(2);
        for i in 0..2 {
            let _ = c.on_message(300, i, resumed()).unwrap();
        }
        assert!(c.on_message(400, 0, stored(Some("disk full"))).unwrap().is_empty());
        let o = done(&c.on_message(500, 1, stored(None)).unwrap()).unwrap();
        assert!(o.committed, "the checkpoint was committed; one part of it failed to store");
        assert_eq!(o.stored[0].as_ref().and_then(|s| s.error.as_deref()), Some("disk full"));
        assert_eq!(o.stored[1].as_ref().map(|s| s.error.is_none()), Some(true));
    }

    #[test]
    fn stored_is_refused_before_resumed_twice_and_after_an_abort() {
        let mut c = committed_core(2);
        assert_eq!(
            c.on_message(250, 0, stored(None)),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Resuming", got: "Stored" }),
            "before its Resumed"
        );
        let _ = c.on_message(300, 0, resumed()).unwrap();
        let _ = c.on_message(310, 0, stored(None)).unwrap();
        assert_eq!(
            c.on_message(320, 0, stored(None)),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Resuming", got: "Stored" }),
            "twice"
        );
        let mut a = CoordinatorCore::new(id(), 1, cfg());
        let _ = a.start(0);
        let _ = a.on_timer(1_100);
        let _ = a.on_message(1_200, 0, resumed()).unwrap();
        assert_eq!(
            a.on_message(1_300, 0, stored(None)),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Done", got: "Stored" }),
            "an aborted round stores nothing"
        );
    }

    #[test]
    fn a_store_that_never_reports_ends_at_the_store_timeout() {
        let mut c = committed_core(2);
        let _ = c.on_message(300, 0, resumed()).unwrap();
        let _ = c.on_message(300, 1, resumed()).unwrap();
        let _ = c.on_message(400, 0, stored(None)).unwrap();
        // The resume timeout (200 + 500) does not end a round whose stores are under way.
        assert!(done(&c.on_timer(700)).is_none());
        assert!(done(&c.on_timer(2_199)).is_none());
        let o = done(&c.on_timer(2_200)).unwrap();
        assert!(o.committed && o.not_resumed.is_empty());
        assert!(o.stored[0].is_some() && o.stored[1].is_none());
    }

    #[test]
    fn an_agent_that_never_resumed_is_not_waited_for_at_the_store_timeout() {
        let mut c = committed_core(2);
        let _ = c.on_message(300, 0, resumed()).unwrap();
        assert!(done(&c.on_timer(700)).is_none(), "agent 0 still stores");
        let o = done(&c.on_message(800, 0, stored(None)).unwrap()).unwrap();
        assert_eq!(o.not_resumed, vec![1]);
        assert!(o.stored[1].is_none());
    }

    #[test]
    fn save_failure_aborts_everyone_with_d_from_the_earliest_possible_stop() {
        let mut c = CoordinatorCore::new(id(), 3, cfg());
        let _ = c.start(0);
        let _ = c.on_message(150, 0, saved(101)).unwrap();
        let acts = c
            .on_message(
                200,
                1,
                Message::SaveFailed(SaveFailed { ckpt: id(), reason: "disk".into(), stops_ns: vec![100] }),
            )
            .unwrap();
        let s = sends(&acts);
        assert_eq!(s.len(), 3, "every agent, the saved one too");
        // Earliest possible stop: freeze_at - hold_lead = 90.
        assert!(s.iter().all(|(_, m)| *m == Message::Abort(Abort { ckpt: id(), resume_after_ns: 200 - 90 + 50 })));
        assert!(acts.contains(&CoordAction::RemovePartial { ckpt: id() }));
        // A late Saved after the abort is refused.
        assert_eq!(
            c.on_message(210, 2, saved(100)),
            Err(CoordRefusal::OutOfOrder { agent: 2, phase: "Resuming", got: "Saved" })
        );
        for i in 0..3 {
            let acts = c.on_message(300, i, resumed()).unwrap();
            if i == 2 {
                let o = done(&acts).unwrap();
                assert!(!o.committed);
                assert_eq!(o.abort, Some(AbortReason::SaveFailed { agent: 1, reason: "disk".into() }));
            }
        }
    }

    #[test]
    fn missing_saved_at_deadline_aborts() {
        let mut c = CoordinatorCore::new(id(), 3, cfg());
        let _ = c.start(0);
        let _ = c.on_message(500, 0, saved(100)).unwrap();
        assert!(c.on_timer(1_099).is_empty(), "not before the deadline");
        let acts = c.on_timer(1_100);
        assert_eq!(sends(&acts).len(), 3);
        assert!(acts.contains(&CoordAction::RemovePartial { ckpt: id() }));
        // Nobody answers: the resume timeout ends the round, naming them.
        let o = done(&c.on_timer(1_600)).unwrap();
        assert_eq!(o.abort, Some(AbortReason::Deadline { missing: vec![1, 2] }));
        assert_eq!(o.not_resumed, vec![0, 1, 2]);
    }

    #[test]
    fn lost_connection_before_commit_aborts_and_skips_the_lost_agent() {
        let mut c = CoordinatorCore::new(id(), 3, cfg());
        let _ = c.start(0);
        let acts = c.on_disconnect(120, 1);
        let to: Vec<_> = sends(&acts).into_iter().map(|(t, _)| t).collect();
        assert_eq!(to, vec![0, 2]);
        let _ = c.on_message(200, 0, resumed()).unwrap();
        let o = done(&c.on_message(200, 2, resumed()).unwrap()).unwrap();
        assert_eq!(o.abort, Some(AbortReason::Lost { agent: 1 }));
        assert_eq!(o.lost, vec![1]);
        assert_eq!(c.on_message(300, 1, resumed()), Err(CoordRefusal::Lost(1)), "a lost agent stays lost");
    }

    #[test]
    fn lost_agent_after_commit_does_not_undo_it() {
        let mut c = CoordinatorCore::new(id(), 2, cfg());
        let _ = c.start(0);
        let _ = c.on_message(150, 0, saved(100)).unwrap();
        let _ = c.on_message(150, 1, saved(100)).unwrap();
        assert!(c.on_disconnect(160, 1).is_empty(), "committing: the decision is the manifest's");
        let acts = c.manifest_committed(170);
        assert_eq!(sends(&acts).len(), 1);
        assert!(c.on_message(200, 0, resumed()).unwrap().is_empty());
        let o = done(&c.on_message(210, 0, stored(None)).unwrap()).unwrap();
        assert!(o.committed);
        assert_eq!(o.lost, vec![1]);
        assert_eq!(o.not_resumed, vec![1]);
    }

    #[test]
    fn manifest_failure_aborts() {
        let mut c = CoordinatorCore::new(id(), 1, cfg());
        let _ = c.start(0);
        let _ = c.on_message(150, 0, saved(100)).unwrap();
        let acts = c.manifest_failed(160, "ENOSPC".into());
        assert!(matches!(&sends(&acts)[0].1, Message::Abort(_)));
        assert!(acts.contains(&CoordAction::RemovePartial { ckpt: id() }));
    }

    #[test]
    fn margin_grows_with_fan_out_rtt_and_clock_error() {
        assert_eq!(margin_for(2_000_000, 10_000, 5_000, 10_000), 2 * (50_000_000 + 2_000_000 + 20_000));
        assert!(margin_for(0, 1, 0, 0) < margin_for(0, 2, 1, 0));
        // The default covers 10 000 agents at 5 us per message with a 2 ms RTT.
        assert!(margin_for(2_000_000, 10_000, 5_000, 10_000) < CoordConfig::default().margin_ns);
    }

    #[test]
    fn refusals() {
        let mut c = CoordinatorCore::new(id(), 2, cfg());
        assert_eq!(
            c.on_message(0, 0, saved(1)),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Idle", got: "Saved" })
        );
        let _ = c.start(0);
        assert_eq!(c.on_message(0, 5, saved(1)), Err(CoordRefusal::NoSuchAgent(5)));
        let other = Message::Saved(Saved { ckpt: CkptId::new(8).unwrap(), components: vec![] });
        assert_eq!(
            c.on_message(0, 0, other),
            Err(CoordRefusal::WrongCheckpoint { agent: 0, current: id(), got: CkptId::new(8).unwrap() })
        );
        assert_eq!(
            c.on_message(0, 0, resumed()),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Preparing", got: "Resumed" })
        );
        let _ = c.on_message(150, 0, saved(100)).unwrap();
        assert_eq!(
            c.on_message(150, 0, saved(100)),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Preparing", got: "Saved" }),
            "twice"
        );
        let commit = Message::Commit(Commit { ckpt: id(), resume_after_ns: 1 });
        assert_eq!(
            c.on_message(150, 0, commit),
            Err(CoordRefusal::OutOfOrder { agent: 0, phase: "Preparing", got: "Commit" })
        );
    }
}
