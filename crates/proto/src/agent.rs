//! The agent's side of one checkpoint round, without I/O: it takes the
//! coordinator's messages and the host's reports (frozen, saved, resumed)
//! with the current instant, and returns what the host must do.
//!
//! ```text
//!  Idle --Prepare--> Prepared --frozen()--> Frozen --saved()--> Saved --Commit/Abort--> Resuming
//!                       |  \                   |  \--save_failed()--> Failed --Abort--> Resuming
//!                       |   \--Abort (cancel freeze, resume what stopped)
//!                       \--coordinator lost / silent past deadline + grace: resume, keep files
//!  Resuming --resumed()--> Idle                         (aborted: the part was discarded)
//!  Resuming --resumed()--> Storing --stored()--> Idle   (committed, or resumed on its own)
//! ```
//! `saved()` means the host's part is *sealed*: its files durable, sizes and
//! digests known, but not yet chunked into the store. That commit is frozen
//! time no more: it runs in `Storing`, after every component resumed
//! ([`AgentAction::StorePart`]), and its outcome goes to the coordinator as
//! [`Stored`]. An agent that resumed on its own stores its part too (the
//! coordinator may have committed the checkpoint) but has nobody to tell.
//! Anything else is refused with [`Refusal`]; the state does not change.

use crate::msg::{CkptId, Component, Message, Pong, Prepare, Resumed, ResumedComponent, SaveFailed, Saved, Stored};

/// Tunables of the agent side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// How long past the save deadline an agent that heard nothing from its
    /// coordinator waits before resuming on its own.
    pub orphan_grace_ns: u64,
    /// Slack before the first resume when the agent picks `D` itself.
    pub resume_margin_ns: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { orphan_grace_ns: 5_000_000_000, resume_margin_ns: 100_000_000 }
    }
}

/// Where the agent is in the round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    Idle,
    /// The freeze is scheduled.
    Prepared {
        prepare: Prepare,
    },
    /// Every component stopped; saving.
    Frozen {
        prepare: Prepare,
    },
    /// Saved and reported; waiting for Commit or Abort.
    Saved {
        prepare: Prepare,
    },
    /// The save failed and was reported; waiting for Abort.
    Failed {
        prepare: Prepare,
    },
    /// Told to resume (or resuming on its own).
    Resuming {
        ckpt: CkptId,
        committed: bool,
        orphaned: bool,
    },
    /// Resumed; committing the sealed part into the store. `report`: the
    /// coordinator is still there to be told.
    Storing {
        ckpt: CkptId,
        report: bool,
    },
}

impl AgentState {
    fn name(&self) -> &'static str {
        match self {
            AgentState::Idle => "Idle",
            AgentState::Prepared { .. } => "Prepared",
            AgentState::Frozen { .. } => "Frozen",
            AgentState::Saved { .. } => "Saved",
            AgentState::Failed { .. } => "Failed",
            AgentState::Resuming { .. } => "Resuming",
            AgentState::Storing { .. } => "Storing",
        }
    }
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Freeze every component at `at` (the delay node `hold_lead_ns`
    /// earlier), then save; report with [`AgentCore::frozen`] and
    /// [`AgentCore::saved`] or [`AgentCore::save_failed`].
    FreezeAndSave { ckpt: CkptId, at: u64, hold_lead_ns: u64 },
    /// Send this to the coordinator.
    Send(Message),
    /// Cancel any pending freeze or save; resume every stopped component
    /// `after_ns` after its own stop; report with [`AgentCore::resumed`].
    Resume { ckpt: CkptId, after_ns: u64 },
    /// Remove the checkpoint's partial state on this host.
    Discard { ckpt: CkptId },
    /// Every component runs again: commit this host's sealed part of
    /// `ckpt` into the store; report with [`AgentCore::stored`].
    StorePart { ckpt: CkptId },
    /// Call [`AgentCore::tick`] at this instant.
    SetTimer { at: u64 },
}

/// An input that the current state does not allow.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{got} refused in state {state}")]
    OutOfOrder { state: &'static str, got: &'static str },
    #[error("message for checkpoint {got} while in checkpoint {current}")]
    WrongCheckpoint { current: CkptId, got: CkptId },
    #[error("Prepare with deadline {deadline} before its freeze instant {freeze_at}")]
    BadPrepare { freeze_at: u64, deadline: u64 },
}

/// The agent's state machine.
#[derive(Debug, Clone)]
pub struct AgentCore {
    cfg: AgentConfig,
    state: AgentState,
}

impl AgentCore {
    pub fn new(cfg: AgentConfig) -> AgentCore {
        AgentCore { cfg, state: AgentState::Idle }
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    fn refuse(&self, got: &'static str) -> Refusal {
        Refusal::OutOfOrder { state: self.state.name(), got }
    }

    fn prepare(&self) -> Option<&Prepare> {
        match &self.state {
            AgentState::Prepared { prepare }
            | AgentState::Frozen { prepare }
            | AgentState::Saved { prepare }
            | AgentState::Failed { prepare } => Some(prepare),
            _ => None,
        }
    }

    fn check_ckpt(&self, got: CkptId) -> Result<(), Refusal> {
        match self.prepare() {
            Some(p) if p.ckpt != got => Err(Refusal::WrongCheckpoint { current: p.ckpt, got }),
            _ => Ok(()),
        }
    }

    /// A message from the coordinator.
    #[must_use = "the actions must be carried out"]
    pub fn on_message(&mut self, now: u64, msg: Message) -> Result<Vec<AgentAction>, Refusal> {
        match msg {
            Message::Prepare(p) => {
                if self.state != AgentState::Idle {
                    return Err(self.refuse("Prepare"));
                }
                if p.deadline <= p.freeze_at {
                    return Err(Refusal::BadPrepare { freeze_at: p.freeze_at, deadline: p.deadline });
                }
                let acts = vec![
                    AgentAction::FreezeAndSave { ckpt: p.ckpt, at: p.freeze_at, hold_lead_ns: p.hold_lead_ns },
                    AgentAction::SetTimer { at: p.deadline + self.cfg.orphan_grace_ns },
                ];
                self.state = AgentState::Prepared { prepare: p };
                Ok(acts)
            }
            Message::Commit(c) => {
                self.check_ckpt(c.ckpt)?;
                if !matches!(self.state, AgentState::Saved { .. }) {
                    return Err(self.refuse("Commit"));
                }
                self.state = AgentState::Resuming { ckpt: c.ckpt, committed: true, orphaned: false };
                Ok(vec![AgentAction::Resume { ckpt: c.ckpt, after_ns: c.resume_after_ns }])
            }
            Message::Abort(a) => {
                self.check_ckpt(a.ckpt)?;
                if self.prepare().is_none() {
                    return Err(self.refuse("Abort"));
                }
                self.state = AgentState::Resuming { ckpt: a.ckpt, committed: false, orphaned: false };
                Ok(vec![
                    AgentAction::Resume { ckpt: a.ckpt, after_ns: a.resume_after_ns },
                    AgentAction::Discard { ckpt: a.ckpt },
                ])
            }
            Message::Ping(p) => {
                Ok(vec![AgentAction::Send(Message::Pong(Pong { seq: p.seq, sent_ns: p.sent_ns, agent_ns: now }))])
            }
            other => Err(self.refuse(other.name())),
        }
    }

    /// The host stopped every component.
    #[must_use = "the actions must be carried out"]
    pub fn frozen(&mut self, _now: u64) -> Result<Vec<AgentAction>, Refusal> {
        match &self.state {
            AgentState::Prepared { prepare } => {
                self.state = AgentState::Frozen { prepare: prepare.clone() };
                Ok(vec![])
            }
            _ => Err(self.refuse("frozen")),
        }
    }

    /// The host saved everything.
    #[must_use = "the actions must be carried out"]
    pub fn saved(&mut self, _now: u64, components: Vec<Component>) -> Result<Vec<AgentAction>, Refusal> {
        match &self.state {
            AgentState::Frozen { prepare } => {
                let ckpt = prepare.ckpt;
                self.state = AgentState::Saved { prepare: prepare.clone() };
                Ok(vec![AgentAction::Send(Message::Saved(Saved { ckpt, components }))])
            }
            _ => Err(self.refuse("saved")),
        }
    }

    /// The host could not freeze or save.
    #[must_use = "the actions must be carried out"]
    pub fn save_failed(&mut self, _now: u64, reason: String, stops_ns: Vec<u64>) -> Result<Vec<AgentAction>, Refusal> {
        match &self.state {
            AgentState::Prepared { prepare } | AgentState::Frozen { prepare } => {
                let ckpt = prepare.ckpt;
                self.state = AgentState::Failed { prepare: prepare.clone() };
                Ok(vec![AgentAction::Send(Message::SaveFailed(SaveFailed { ckpt, reason, stops_ns }))])
            }
            _ => Err(self.refuse("save_failed")),
        }
    }

    /// Every component runs again. After a Commit, or on its own (the
    /// coordinator may have committed), the sealed part goes into the
    /// store next; after an Abort the round is over.
    #[must_use = "the actions must be carried out"]
    pub fn resumed(&mut self, _now: u64, components: Vec<ResumedComponent>) -> Result<Vec<AgentAction>, Refusal> {
        let AgentState::Resuming { ckpt, committed, orphaned } = self.state else {
            return Err(self.refuse("resumed"));
        };
        let mut acts = Vec::new();
        if !orphaned {
            acts.push(AgentAction::Send(Message::Resumed(Resumed { ckpt, components })));
        }
        if committed || orphaned {
            self.state = AgentState::Storing { ckpt, report: !orphaned };
            acts.push(AgentAction::StorePart { ckpt });
        } else {
            self.state = AgentState::Idle;
        }
        Ok(acts)
    }

    /// The store commit of the sealed part ended: `error` is `None` when
    /// it is stored. `started_ns` and `commit_ns`: when it began and how
    /// long it took. A failure told to the coordinator is final (the part
    /// is discarded); one nobody hears of keeps the part sealed.
    #[must_use = "the actions must be carried out"]
    pub fn stored(
        &mut self,
        _now: u64,
        started_ns: u64,
        commit_ns: u64,
        error: Option<String>,
    ) -> Result<Vec<AgentAction>, Refusal> {
        let AgentState::Storing { ckpt, report } = self.state else {
            return Err(self.refuse("stored"));
        };
        self.state = AgentState::Idle;
        if !report {
            // A failed part stays sealed: the next start or restore tries again.
            return Ok(vec![]);
        }
        let failed = error.is_some();
        let mut acts = vec![AgentAction::Send(Message::Stored(Stored { ckpt, started_ns, commit_ns, error }))];
        if failed {
            // The coordinator records the checkpoint as not restorable.
            acts.push(AgentAction::Discard { ckpt });
        }
        Ok(acts)
    }

    /// The connection to the coordinator is gone: nothing will tell this
    /// host to resume, so it resumes now (see [`AgentCore::tick`]).
    #[must_use = "the actions must be carried out"]
    pub fn disconnected(&mut self, now: u64) -> Vec<AgentAction> {
        if let AgentState::Storing { report, .. } = &mut self.state {
            // The commit goes on; its outcome has nobody to go to.
            *report = false;
        }
        self.orphan(now)
    }

    /// A timer fired: past the deadline plus grace without a decision, the
    /// agent resumes on its own. It keeps the saved files: the coordinator
    /// may have committed a manifest that names them just before it was lost;
    /// a later cleanup by the coordinator removes them if not.
    #[must_use = "the actions must be carried out"]
    pub fn tick(&mut self, now: u64) -> Vec<AgentAction> {
        match self.prepare() {
            Some(p) if now >= p.deadline + self.cfg.orphan_grace_ns => self.orphan(now),
            _ => vec![],
        }
    }

    fn orphan(&mut self, now: u64) -> Vec<AgentAction> {
        let Some(p) = self.prepare() else { return vec![] };
        let ckpt = p.ckpt;
        // Every component stopped at or after freeze_at - hold_lead.
        let earliest = p.freeze_at.saturating_sub(p.hold_lead_ns);
        let after_ns = now.saturating_sub(earliest) + self.cfg.resume_margin_ns;
        tracing::warn!(%ckpt, after_ns, "no decision from the coordinator: resuming on our own");
        self.state = AgentState::Resuming { ckpt, committed: false, orphaned: true };
        vec![AgentAction::Resume { ckpt, after_ns }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Abort, Commit, Ping};

    fn id(n: u64) -> CkptId {
        CkptId::new(n).unwrap()
    }
    fn prepare(n: u64) -> Message {
        Message::Prepare(Prepare { ckpt: id(n), freeze_at: 1_000, hold_lead_ns: 10, deadline: 5_000 })
    }
    fn commit(n: u64) -> Message {
        Message::Commit(Commit { ckpt: id(n), resume_after_ns: 700 })
    }
    fn abort(n: u64) -> Message {
        Message::Abort(Abort { ckpt: id(n), resume_after_ns: 900 })
    }
    fn core() -> AgentCore {
        AgentCore::new(AgentConfig { orphan_grace_ns: 1_000, resume_margin_ns: 50 })
    }
    fn saved_core() -> AgentCore {
        let mut a = core();
        let _ = a.on_message(0, prepare(1)).unwrap();
        let _ = a.frozen(1_000).unwrap();
        let _ = a.saved(2_000, vec![]).unwrap();
        a
    }

    #[test]
    fn happy_path() {
        let mut a = core();
        let acts = a.on_message(0, prepare(1)).unwrap();
        assert_eq!(
            acts,
            vec![
                AgentAction::FreezeAndSave { ckpt: id(1), at: 1_000, hold_lead_ns: 10 },
                AgentAction::SetTimer { at: 6_000 }
            ]
        );
        assert!(a.frozen(1_000).unwrap().is_empty());
        let acts = a.saved(2_000, vec![]).unwrap();
        assert_eq!(acts, vec![AgentAction::Send(Message::Saved(Saved { ckpt: id(1), components: vec![] }))]);
        assert_eq!(a.on_message(2_100, commit(1)).unwrap(), vec![AgentAction::Resume { ckpt: id(1), after_ns: 700 }]);
        let acts = a.resumed(2_500, vec![]).unwrap();
        assert_eq!(
            acts,
            vec![
                AgentAction::Send(Message::Resumed(Resumed { ckpt: id(1), components: vec![] })),
                AgentAction::StorePart { ckpt: id(1) }
            ],
            "the part goes into the store only once everything runs again"
        );
        assert_eq!(a.state(), &AgentState::Storing { ckpt: id(1), report: true });
        assert_eq!(
            a.on_message(2_600, prepare(2)),
            Err(Refusal::OutOfOrder { state: "Storing", got: "Prepare" }),
            "no next round before this one's part is stored"
        );
        let acts = a.stored(2_900, 2_510, 390, None).unwrap();
        assert_eq!(
            acts,
            vec![AgentAction::Send(Message::Stored(Stored {
                ckpt: id(1),
                started_ns: 2_510,
                commit_ns: 390,
                error: None
            }))]
        );
        assert_eq!(a.state(), &AgentState::Idle);
        // The next round may start.
        assert!(a.on_message(3_000, prepare(2)).is_ok());
    }

    #[test]
    fn a_failed_store_commit_is_reported() {
        let mut a = saved_core();
        let _ = a.on_message(2_100, commit(1)).unwrap();
        let _ = a.resumed(2_500, vec![]).unwrap();
        let acts = a.stored(2_900, 2_510, 390, Some("disk full".into())).unwrap();
        assert!(matches!(&acts[..], [AgentAction::Send(Message::Stored(s)), AgentAction::Discard { ckpt }]
            if s.error.as_deref() == Some("disk full") && *ckpt == id(1)));
        assert_eq!(a.state(), &AgentState::Idle);
    }

    #[test]
    fn an_aborted_round_stores_nothing() {
        let mut a = saved_core();
        let acts = a.on_message(2_100, abort(1)).unwrap();
        assert!(acts.contains(&AgentAction::Discard { ckpt: id(1) }));
        let acts = a.resumed(2_500, vec![]).unwrap();
        assert_eq!(acts, vec![AgentAction::Send(Message::Resumed(Resumed { ckpt: id(1), components: vec![] }))]);
        assert_eq!(a.state(), &AgentState::Idle);
        assert_eq!(a.stored(2_600, 0, 0, None), Err(Refusal::OutOfOrder { state: "Idle", got: "stored" }));
    }

    #[test]
    fn refuses_stored_before_the_resume() {
        let mut a = saved_core();
        assert_eq!(a.stored(2_050, 0, 0, None), Err(Refusal::OutOfOrder { state: "Saved", got: "stored" }));
        let _ = a.on_message(2_100, commit(1)).unwrap();
        assert_eq!(a.stored(2_200, 0, 0, None), Err(Refusal::OutOfOrder { state: "Resuming", got: "stored" }));
        assert!(matches!(a.state(), AgentState::Resuming { committed: true, .. }));
    }

    #[test]
    fn coordinator_lost_while_storing_finishes_the_store_silently() {
        let mut a = saved_core();
        let _ = a.on_message(2_100, commit(1)).unwrap();
        let _ = a.resumed(2_500, vec![]).unwrap();
        assert!(a.disconnected(2_600).is_empty(), "nothing to resume");
        assert_eq!(a.state(), &AgentState::Storing { ckpt: id(1), report: false });
        assert!(a.stored(2_900, 2_510, 390, None).unwrap().is_empty(), "nobody to tell");
        assert_eq!(a.state(), &AgentState::Idle);
    }

    #[test]
    fn a_failed_store_nobody_hears_of_keeps_the_part() {
        let mut a = saved_core();
        let _ = a.disconnected(3_000);
        let _ = a.resumed(3_100, vec![]).unwrap();
        assert!(a.stored(3_200, 3_100, 100, Some("disk full".into())).unwrap().is_empty(), "no Discard");
    }

    #[test]
    fn refuses_commit_before_saved() {
        let mut a = core();
        assert_eq!(a.on_message(0, commit(1)), Err(Refusal::OutOfOrder { state: "Idle", got: "Commit" }));
        let _ = a.on_message(0, prepare(1)).unwrap();
        assert_eq!(a.on_message(0, commit(1)), Err(Refusal::OutOfOrder { state: "Prepared", got: "Commit" }));
        let _ = a.frozen(1_000).unwrap();
        assert_eq!(a.on_message(0, commit(1)), Err(Refusal::OutOfOrder { state: "Frozen", got: "Commit" }));
        assert!(matches!(a.state(), AgentState::Frozen { .. }), "a refusal leaves the state alone");
    }

    #[test]
    fn refuses_commit_after_failed_save() {
        let mut a = core();
        let _ = a.on_message(0, prepare(1)).unwrap();
        let acts = a.save_failed(500, "disk full".into(), vec![]).unwrap();
        assert!(matches!(&acts[0], AgentAction::Send(Message::SaveFailed(f)) if f.reason == "disk full"));
        assert_eq!(a.on_message(0, commit(1)), Err(Refusal::OutOfOrder { state: "Failed", got: "Commit" }));
        assert_eq!(
            a.on_message(0, abort(1)).unwrap(),
            vec![AgentAction::Resume { ckpt: id(1), after_ns: 900 }, AgentAction::Discard { ckpt: id(1) }]
        );
    }

    #[test]
    fn refuses_second_prepare() {
        let mut a = core();
        let _ = a.on_message(0, prepare(1)).unwrap();
        assert_eq!(a.on_message(0, prepare(2)), Err(Refusal::OutOfOrder { state: "Prepared", got: "Prepare" }));
    }

    #[test]
    fn refuses_prepare_with_deadline_before_freeze() {
        let mut a = core();
        let bad = Message::Prepare(Prepare { ckpt: id(1), freeze_at: 1_000, hold_lead_ns: 0, deadline: 1_000 });
        assert_eq!(a.on_message(0, bad), Err(Refusal::BadPrepare { freeze_at: 1_000, deadline: 1_000 }));
    }

    #[test]
    fn refuses_other_checkpoints_decision() {
        let mut a = saved_core();
        assert_eq!(a.on_message(0, commit(2)), Err(Refusal::WrongCheckpoint { current: id(1), got: id(2) }));
        assert_eq!(a.on_message(0, abort(2)), Err(Refusal::WrongCheckpoint { current: id(1), got: id(2) }));
    }

    #[test]
    fn refuses_abort_when_idle_and_agent_only_messages() {
        let mut a = core();
        assert_eq!(a.on_message(0, abort(1)), Err(Refusal::OutOfOrder { state: "Idle", got: "Abort" }));
        let saved = Message::Saved(Saved { ckpt: id(1), components: vec![] });
        assert_eq!(a.on_message(0, saved), Err(Refusal::OutOfOrder { state: "Idle", got: "Saved" }));
    }

    #[test]
    fn refuses_host_reports_out_of_order() {
        let mut a = core();
        assert_eq!(a.frozen(0), Err(Refusal::OutOfOrder { state: "Idle", got: "frozen" }));
        assert_eq!(a.saved(0, vec![]), Err(Refusal::OutOfOrder { state: "Idle", got: "saved" }));
        assert_eq!(a.resumed(0, vec![]), Err(Refusal::OutOfOrder { state: "Idle", got: "resumed" }));
        let _ = a.on_message(0, prepare(1)).unwrap();
        assert_eq!(a.saved(0, vec![]), Err(Refusal::OutOfOrder { state: "Prepared", got: "saved" }));
        let mut s = saved_core();
        assert_eq!(
            s.save_failed(0, "x".into(), vec![]),
            Err(Refusal::OutOfOrder { state: "Saved", got: "save_failed" })
        );
    }

    #[test]
    fn abort_before_freeze_cancels_it() {
        let mut a = core();
        let _ = a.on_message(0, prepare(1)).unwrap();
        let acts = a.on_message(10, abort(1)).unwrap();
        assert!(acts.contains(&AgentAction::Resume { ckpt: id(1), after_ns: 900 }));
        assert!(acts.contains(&AgentAction::Discard { ckpt: id(1) }));
        assert_eq!(a.on_message(10, commit(1)), Err(Refusal::OutOfOrder { state: "Resuming", got: "Commit" }));
    }

    #[test]
    fn silent_coordinator_makes_the_agent_resume_but_keep_files() {
        let mut a = saved_core();
        assert!(a.tick(5_999).is_empty(), "not before deadline + grace");
        let acts = a.tick(6_000);
        // D measured from the earliest possible stop (freeze_at - hold_lead = 990) plus the margin.
        assert_eq!(acts, vec![AgentAction::Resume { ckpt: id(1), after_ns: 6_000 - 990 + 50 }]);
        assert!(!acts.iter().any(|x| matches!(x, AgentAction::Discard { .. })));
        // Nobody to tell it resumed; its part is stored all the same (the
        // coordinator may have committed the checkpoint before it went).
        assert_eq!(a.resumed(7_000, vec![]).unwrap(), vec![AgentAction::StorePart { ckpt: id(1) }]);
        assert!(a.stored(7_500, 7_000, 500, None).unwrap().is_empty(), "nobody to tell");
        assert_eq!(a.state(), &AgentState::Idle);
    }

    #[test]
    fn lost_connection_resumes() {
        let mut a = saved_core();
        assert!(matches!(a.disconnected(3_000)[0], AgentAction::Resume { .. }));
        let mut idle = core();
        assert!(idle.disconnected(3_000).is_empty());
    }

    #[test]
    fn ping_is_answered_in_any_state() {
        let mut a = saved_core();
        let acts = a.on_message(42, Message::Ping(Ping { seq: 3, sent_ns: 40 })).unwrap();
        assert_eq!(acts, vec![AgentAction::Send(Message::Pong(Pong { seq: 3, sent_ns: 40, agent_ns: 42 }))]);
    }
}
