//! `stasis supervise`: periodic checkpoints with retention on one host.
//!
//! Two halves. [`Schedule`] and [`doomed`] are the I/O-free core: given
//! the policy, the last round and the time (passed in), when the next
//! checkpoint is due; given the catalogue, which of the supervisor's own
//! checkpoints retention deletes. [`run`] is the loop that carries them
//! out: it takes each checkpoint through [`host::checkpoint`] (what
//! `stasis checkpoint` calls) under the experiment's job lock, deletes by
//! [`Store::delete_checkpoint`], and keeps its state in
//! `<experiment>/supervise.json` (owner-only), so that it can be stopped
//! and restarted at any time.
//!
//! The supervisor's checkpoints are named `auto-<unix ms>`
//! ([`AUTO_PREFIX`]); retention looks at those only, so a checkpoint a
//! person took, named or not, is never deleted by it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stasis_core::spec::CheckpointPolicy;
use stasis_store::{plan_retention, CheckpointInfo, Retention, Store, StoreError};
use tracing::{info, warn};

use crate::event::{EventLog, Quiet};
use crate::freeze::FreezeConfig;
use crate::host::{self, Runtime};
use crate::job::{JobError, JobLock};
use crate::layout::Layout;

/// The name prefix of the supervisor's checkpoints.
pub const AUTO_PREFIX: &str = "auto-";
/// The supervisor's own lock file (held while it runs; `stasis status` reads it).
pub const LOCK_FILE: &str = "supervise.lock";
/// Its state file.
pub const STATE_FILE: &str = "supervise.json";

// ---- the core: no clock, no files ----------------------------------------

/// One checkpoint round: when it started and ended (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
}

/// When checkpoints are due, `every_ms` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub every_ms: u64,
}

/// What the loop does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Take a checkpoint now.
    Checkpoint,
    /// Nothing is due before this instant (unix ms).
    WaitUntil(u64),
}

impl Schedule {
    /// When the round after `last` is due (unix ms): one period after its
    /// start, or, if it overran that slot, the first slot of the grid after
    /// its end (overruns never pile up). Never a round yet: now.
    ///
    /// The due instant may be in the past (the supervisor was stopped over
    /// a slot, or over many): then [`Schedule::action`] says checkpoint
    /// once, and the next instant is computed from that round, so missed
    /// slots are not made up one by one.
    #[must_use]
    pub fn next_due(&self, last: Option<Round>, now_unix_ms: u64) -> u64 {
        let every = self.every_ms.max(1);
        let Some(r) = last else { return now_unix_ms };
        let took = r.ended_unix_ms.saturating_sub(r.started_unix_ms);
        r.started_unix_ms.saturating_add(every.saturating_mul(took / every + 1))
    }

    /// What to do at `now` when the next round is due at `due`.
    #[must_use]
    pub fn action(&self, due_unix_ms: u64, now_unix_ms: u64) -> Action {
        if now_unix_ms >= due_unix_ms {
            Action::Checkpoint
        } else {
            Action::WaitUntil(due_unix_ms)
        }
    }
}

/// The retention of the supervisor's checkpoints.
#[must_use]
pub fn retention_of(p: &CheckpointPolicy) -> Retention {
    Retention { keep: (p.keep as usize).max(1), keep_daily: p.keep_daily as usize }
}

/// Whether checkpoint `info` is one the supervisor took.
#[must_use]
pub fn is_supervised(info: &CheckpointInfo) -> bool {
    info.name.as_deref().is_some_and(|n| n.starts_with(AUTO_PREFIX))
}

/// The ids of the supervisor's checkpoints that `policy` deletes from the
/// catalogue `infos` (in [`Store::list`] order): only `auto-` ones, never
/// the newest of them, never one in `protect` (by id or name, e.g. the
/// checkpoint the running experiment was restored from).
#[must_use]
pub fn doomed(infos: &[CheckpointInfo], policy: &Retention, protect: &[&str]) -> Vec<String> {
    let mine: Vec<CheckpointInfo> = infos
        .iter()
        .filter(|i| is_supervised(i))
        .filter(|i| !protect.iter().any(|p| *p == i.id || Some(*p) == i.name.as_deref()))
        .map(|i| CheckpointInfo { name: None, ..i.clone() })
        .collect();
    let policy = Retention { keep: policy.keep.max(1), ..*policy };
    plan_retention(&mine, &policy, &[]).unwrap_or_default()
}

/// The name of a supervised checkpoint taken at `unix_ms`.
#[must_use]
pub fn auto_name(unix_ms: u64) -> String {
    format!("{AUTO_PREFIX}{unix_ms}")
}

// ---- the state -------------------------------------------------------------

/// What the supervisor remembers across restarts (`supervise.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The last round, whatever its outcome.
    pub last_round: Option<Round>,
    /// The last checkpoint it took.
    pub last_checkpoint: Option<Taken>,
    /// When the next round is due (unix ms).
    pub next_due_unix_ms: Option<u64>,
    /// Rounds that failed since the last one that did not.
    pub consecutive_failures: u32,
    /// Why the last failed or skipped round did.
    pub last_error: Option<String>,
    pub checkpoints_taken: u64,
    pub checkpoints_deleted: u64,
    pub slots_skipped: u64,
    pub every_ms: u64,
    /// Automatic recoveries (`--recover`): how many, and the last one.
    #[serde(default)]
    pub recoveries: u64,
    #[serde(default)]
    pub last_recovery: Option<Recovery>,
}

/// A dead VM brought back from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The VMs found dead.
    pub dead: Vec<String>,
    /// The checkpoint restored (its label), or None if the restore failed.
    pub checkpoint: Option<String>,
    pub unix_ms: u64,
    pub error: Option<String>,
}

/// A checkpoint the supervisor took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub id: String,
    pub name: String,
    pub index: u64,
    pub unix_ms: u64,
}

impl State {
    /// The state of the experiment at `layout` (default if none or unreadable;
    /// at most 64 KiB is read).
    pub fn load(layout: &Layout) -> State {
        use std::io::Read;
        let mut buf = Vec::new();
        let ok = std::fs::File::open(state_path(layout)).and_then(|f| f.take(64 << 10).read_to_end(&mut buf)).is_ok();
        if !ok {
            return State::default();
        }
        serde_json::from_slice(&buf).unwrap_or_else(|e| {
            warn!(error = %e, "the supervisor's state file does not parse; starting afresh");
            State::default()
        })
    }

    /// Writes it atomically (a temporary file renamed over), owner-only.
    pub fn save(&self, layout: &Layout) -> std::io::Result<()> {
        let path = state_path(layout);
        let tmp = path.with_extension("json.tmp");
        stasis_core::private::write(&tmp, &serde_json::to_vec_pretty(self).expect("state serialises"))?;
        std::fs::rename(&tmp, &path)
    }
}

fn state_path(layout: &Layout) -> PathBuf {
    layout.root().join(STATE_FILE)
}

/// The supervisor as `stasis status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Its pid when one runs.
    pub pid: Option<u32>,
    #[serde(flatten)]
    pub state: State,
}

/// The supervisor of the experiment at `layout`: whether one runs, and its state.
pub fn status(layout: &Layout) -> Option<Status> {
    let pid = JobLock::holder_of(layout, LOCK_FILE).map(|h| h.pid);
    let exists = layout.root().join(STATE_FILE).exists();
    (pid.is_some() || exists).then(|| Status { pid, state: State::load(layout) })
}

// ---- the loop ----------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("a supervisor already runs for this experiment")]
    AlreadyRunning(#[source] JobError),
    #[error("experiment {experiment:?} is not running (start it with `stasis up`)")]
    NotRunning { experiment: String },
    #[error("{}: cannot write the supervisor's state", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`run`] is given.
pub struct Options {
    pub experiment: String,
    pub policy: CheckpointPolicy,
    pub freeze: FreezeConfig,
    /// Restore the latest checkpoint when a VM of the experiment dies
    /// (its QEMU is gone): the tools to start VMs with. None: only log it.
    pub recover: Option<host::Tools>,
}

/// Runs the schedule of the experiment at `layout` until `stop` turns true
/// (SIGINT/SIGTERM in the CLI). A round in progress is always finished
/// first, so a stop never leaves anything frozen. A failed or skipped
/// round is logged and the next slot tried; the experiment keeps running.
pub async fn run(
    layout: &Layout,
    opts: &Options,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<State, SuperviseError> {
    let _me = JobLock::acquire_file(layout, LOCK_FILE, &opts.experiment, "supervise")
        .map_err(SuperviseError::AlreadyRunning)?;
    if Runtime::load(layout).is_err() {
        return Err(SuperviseError::NotRunning { experiment: opts.experiment.clone() });
    }
    let store = Store::open(&layout.checkpoints())?;
    let schedule = Schedule { every_ms: opts.policy.every_s * 1000 };
    let mut state = State::load(layout);
    if state.last_round.is_none() {
        // No state (first start, or the file was lost): the newest
        // supervised checkpoint in the store stands for the last round.
        if let Some(i) = store.list()?.iter().rev().find(|i| is_supervised(i)) {
            state.last_round = Some(Round { started_unix_ms: i.created_unix_ms, ended_unix_ms: i.created_unix_ms });
        }
    }
    state.every_ms = schedule.every_ms;
    let mut due = schedule.next_due(state.last_round, unix_ms());
    state.next_due_unix_ms = Some(due);
    save(layout, &state)?;
    info!(experiment = %opts.experiment, policy = %opts.policy, next_due_in_s = due.saturating_sub(unix_ms()) / 1000, "supervising");
    loop {
        if *stop.borrow() {
            break;
        }
        match schedule.action(due, unix_ms()) {
            Action::WaitUntil(t) => {
                if let Some(tools) = &opts.recover {
                    if recover(layout, opts, &store, tools, &mut state).await {
                        save(layout, &state)?;
                    }
                }
                // In steps of at most 5 s, so a clock change is noticed.
                let wait = Duration::from_millis(t.saturating_sub(unix_ms()).min(5000));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            Action::Checkpoint => {}
        }
        let started = unix_ms();
        round(layout, opts, &store, &mut state, started).await;
        let r = Round { started_unix_ms: started, ended_unix_ms: unix_ms() };
        state.last_round = Some(r);
        due = schedule.next_due(Some(r), r.ended_unix_ms);
        state.next_due_unix_ms = Some(due);
        save(layout, &state)?;
        info!(next_due_in_s = due.saturating_sub(unix_ms()) / 1000, "next checkpoint scheduled");
    }
    info!("supervisor stopped");
    Ok(state)
}

/// One round: a checkpoint, then retention. Errors are recorded in
/// `state`, not returned: the schedule goes on.
async fn round(layout: &Layout, opts: &Options, store: &Store, state: &mut State, now: u64) {
    let job = match JobLock::acquire(layout, &opts.experiment, "supervise") {
        Ok(j) => j,
        Err(e) => {
            warn!(error = %e, "slot skipped: another command changes the experiment");
            state.slots_skipped += 1;
            state.last_error = Some(e.to_string());
            return;
        }
    };
    let rt = match Runtime::load(layout) {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "slot skipped: the experiment is not running");
            state.slots_skipped += 1;
            state.last_error = Some(e.to_string());
            return;
        }
    };
    let name = auto_name(now);
    let log = EventLog::open(&layout.events_file(), &Quiet);
    let result = async {
        let _images = store.gc_lock(false).map_err(anyhow_like)?;
        host::checkpoint(&rt, store, Some(&name), &opts.freeze, &log).await.map_err(anyhow_like)
    }
    .await;
    match result {
        Ok(s) => {
            info!(checkpoint = %s.info.label(), index = s.info.index, bytes = s.bytes, frozen_ms = s.frozen_duration_ns / 1_000_000, "periodic checkpoint taken");
            state.checkpoints_taken += 1;
            state.consecutive_failures = 0;
            state.last_error = None;
            state.last_checkpoint =
                Some(Taken { id: s.info.id.clone(), name, index: s.info.index, unix_ms: s.info.created_unix_ms });
        }
        Err(e) => {
            warn!(error = %e, "periodic checkpoint failed; the next slot tries again");
            state.consecutive_failures += 1;
            state.last_error = Some(e);
            return;
        }
    }
    // Retention, still under the job lock (no restore runs meanwhile).
    let protect: Vec<&str> = rt.restored_from.iter().map(String::as_str).collect();
    match store.list() {
        Ok(infos) => {
            for id in doomed(&infos, &retention_of(&opts.policy), &protect) {
                match store.delete_checkpoint(&id) {
                    Ok(i) => {
                        info!(checkpoint = %i.label(), "deleted by retention");
                        state.checkpoints_deleted += 1;
                    }
                    Err(e) => warn!(checkpoint = %id, error = %e, "cannot delete by retention; tried again next round"),
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot list the checkpoints for retention"),
    }
    drop(job);
}

/// If a VM of the experiment is dead, restores the latest checkpoint
/// (what `stasis restore latest` does) under the job lock. Returns whether
/// it did anything (a recovery, or a failed one, is in `state`).
async fn recover(layout: &Layout, opts: &Options, store: &Store, tools: &host::Tools, state: &mut State) -> bool {
    let dead = |rt: &Runtime| -> Vec<String> {
        let vms: Vec<&str> = rt.vms.iter().map(|v| v.name.as_str()).collect();
        rt.alive().into_iter().filter(|(n, _, a)| !a && vms.contains(&n.as_str())).map(|(n, _, _)| n).collect()
    };
    let Ok(rt) = Runtime::load(layout) else { return false };
    if dead(&rt).is_empty() {
        return false;
    }
    // Under the job lock, and looked at again: a `stasis down` or
    // `restore` in progress also makes VMs disappear.
    let Ok(_job) = JobLock::acquire(layout, &opts.experiment, "supervise --recover") else { return false };
    let Ok(rt) = Runtime::load(layout) else { return false };
    let gone = dead(&rt);
    if gone.is_empty() {
        return false;
    }
    warn!(dead = ?gone, "VM dead; restoring the latest checkpoint");
    let mut rec = Recovery { dead: gone, checkpoint: None, unix_ms: unix_ms(), error: None };
    let result = async {
        let ckpt = store.open_checkpoint("latest").map_err(anyhow_like)?;
        let digest = std::fs::read_to_string(layout.root().join("experiment.toml"))
            .ok()
            .and_then(|t| stasis_core::spec::Experiment::from_toml_str(&t, None).ok())
            .map(|e| e.digest());
        let _images = store.gc_lock(false).map_err(anyhow_like)?;
        let log = EventLog::open(&layout.events_file(), &Quiet);
        host::restore(&opts.experiment, digest.as_deref(), &ckpt, layout, tools, 200_000_000, None, &log)
            .await
            .map_err(anyhow_like)
    }
    .await;
    match result {
        Ok((_, s)) => {
            info!(checkpoint = %s.checkpoint, vms = s.vms, restore_ms = s.restore_ns / 1_000_000, "recovered: the experiment runs again from the latest checkpoint");
            crate::swap::clear(layout);
            rec.checkpoint = Some(s.checkpoint);
            state.recoveries += 1;
        }
        Err(e) => {
            warn!(error = %e, "recovery failed; tried again in a few seconds");
            rec.error = Some(e);
        }
    }
    state.last_recovery = Some(rec);
    true
}

fn anyhow_like(e: impl std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

fn save(layout: &Layout, state: &State) -> Result<(), SuperviseError> {
    state.save(layout).map_err(|source| SuperviseError::State { path: state_path(layout), source })
}

fn unix_ms() -> u64 {
    stasis_core::clock::realtime_ns() / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule { every_ms: 10_000 };

    fn round(start: u64, took: u64) -> Option<Round> {
        Some(Round { started_unix_ms: start, ended_unix_ms: start + took })
    }

    #[test]
    fn the_first_round_is_now_and_then_every_period_from_its_start() {
        assert_eq!(S.next_due(None, 123), 123);
        assert_eq!(S.action(123, 123), Action::Checkpoint);
        assert_eq!(S.next_due(round(1000, 2500), 3500), 11_000);
        assert_eq!(S.action(11_000, 3500), Action::WaitUntil(11_000));
        assert_eq!(S.action(11_000, 11_001), Action::Checkpoint);
    }

    #[test]
    fn an_overrun_skips_to_the_next_slot_after_it_ends_instead_of_piling_up() {
        // 25 s for a 10 s period: slots at 10 s and 20 s are gone, next at 30 s.
        assert_eq!(S.next_due(round(0, 25_000), 25_000), 30_000);
        // Exactly one period: the next slot after it, not now.
        assert_eq!(S.next_due(round(0, 10_000), 10_000), 20_000);
    }

    #[test]
    fn slots_missed_while_stopped_are_taken_once() {
        // Stopped for an hour after a round at 0: due (in the past) → one
        // checkpoint now; the round after that is a period later.
        let now = 3_600_000;
        let due = S.next_due(round(0, 1000), now);
        assert_eq!(S.action(due, now), Action::Checkpoint);
        let after = S.next_due(round(now, 1000), now + 1000);
        assert_eq!(after, now + 10_000);
        assert_eq!(S.action(after, now + 1000), Action::WaitUntil(now + 10_000));
    }

    #[test]
    fn a_restart_before_the_slot_waits_for_it() {
        let due = S.next_due(round(50_000, 2000), 53_000);
        assert_eq!(S.action(due, 53_000), Action::WaitUntil(60_000));
    }

    fn info(index: u64, ms: u64, name: Option<&str>) -> CheckpointInfo {
        CheckpointInfo {
            id: format!("{index:04}-0000000{index}"),
            name: name.map(str::to_owned),
            index,
            created_unix_ms: ms,
            parent: None,
            experiment_name: "e".into(),
            experiment_digest: "d".into(),
            bytes: 0,
            dir: Default::default(),
        }
    }

    #[test]
    fn retention_deletes_only_old_supervised_checkpoints() {
        let infos = vec![
            info(1, 1, Some("auto-1")),
            info(2, 2, Some("mine")),
            info(3, 3, None),
            info(4, 4, Some("auto-4")),
            info(5, 5, Some("auto-5")),
            info(6, 6, Some("auto-6")),
        ];
        let keep2 = Retention { keep: 2, keep_daily: 0 };
        assert_eq!(doomed(&infos, &keep2, &[]), vec!["0001-00000001", "0004-00000004"]);
        // Protected (the running experiment's origin) stays, by name or id.
        assert_eq!(doomed(&infos, &keep2, &["auto-1"]), vec!["0004-00000004"]);
        assert_eq!(doomed(&infos, &keep2, &["0004-00000004"]), vec!["0001-00000001"]);
        // keep 0 is read as 1: the newest supervised one always stays.
        assert_eq!(doomed(&infos, &Retention { keep: 0, keep_daily: 0 }, &[]).len(), 3);
        assert!(doomed(&infos[1..3], &keep2, &[]).is_empty());
    }

    #[test]
    fn keep_daily_keeps_the_last_supervised_checkpoint_of_each_day() {
        const DAY: u64 = 24 * 3600 * 1000;
        let infos: Vec<_> = [10, 20, DAY + 5, DAY + 6, 2 * DAY]
            .iter()
            .enumerate()
            .map(|(i, &ms)| info(i as u64 + 1, ms, Some(&auto_name(ms))))
            .collect();
        let gone = doomed(&infos, &Retention { keep: 1, keep_daily: 3 }, &[]);
        assert_eq!(gone, vec!["0001-00000001", "0003-00000003"]);
    }

    #[test]
    fn state_round_trips_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::new(t.path(), "exp");
        std::fs::create_dir(layout.root()).unwrap();
        assert_eq!(State::load(&layout), State::default());
        assert!(status(&layout).is_none());
        let s = State { next_due_unix_ms: Some(7), consecutive_failures: 2, ..State::default() };
        s.save(&layout).unwrap();
        assert_eq!(State::load(&layout), s);
        let mode = std::fs::metadata(layout.root().join(STATE_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let st = status(&layout).unwrap();
        assert_eq!((st.pid, st.state.next_due_unix_ms), (None, Some(7)));
        let _lock = JobLock::acquire_file(&layout, LOCK_FILE, "exp", "supervise").unwrap();
        assert_eq!(status(&layout).unwrap().pid, Some(std::process::id()));
    }
}
