//! An experiment a checkpoint left frozen, and how it runs again.
//!
//! A checkpoint freezes everything, then resumes it from the same process.
//! If that process dies in between (SIGKILL, OOM, a lost terminal), the
//! experiment stays frozen: VMs `paused` or `postmigrate`, the delay node
//! frozen or about to freeze, vhost-user ports held after a live
//! checkpoint. Nothing is lost (the guests' clocks stop with them), but
//! nothing runs either. [`frozen_parts`] finds such parts (`stasis status`
//! shows them) and [`resume_frozen`] (`stasis resume`) starts every one at
//! one instant: all of them stopped within the checkpoint's stop skew, so
//! their frozen durations stay equal within that skew, and the guests and
//! the network do not see the gap.

use crate::host::{attach, cont_vm_at, resume_lead_ns, Attached, CheckpointError, Runtime};
use delay_node::control::ControlError;
use serde::Serialize;
use stasis_core::clock::{mono_ns, MonoNs};
use stasis_qemu::vm::{RunState, VmError};
use std::time::Duration;

/// What is frozen in a running experiment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FrozenParts {
    /// VMs that are not running, with QEMU's run state.
    pub vms: Vec<(String, String)>,
    /// The delay node is frozen, or a freeze is scheduled.
    pub delay_node: bool,
    /// vhost-user ports held (no delivery into the guest).
    pub held_ports: Vec<String>,
}

impl FrozenParts {
    /// True when everything runs.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && !self.delay_node && self.held_ports.is_empty()
    }

    /// One line for people: "VMs a (paused), b (postmigrate); delay node frozen".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.vms.is_empty() {
            parts.push(format!(
                "VMs {}",
                self.vms.iter().map(|(n, s)| format!("{n} ({s})")).collect::<Vec<_>>().join(", ")
            ));
        }
        if self.delay_node {
            parts.push("delay node frozen".into());
        }
        if !self.held_ports.is_empty() {
            parts.push(format!("vhost-user ports held: {}", self.held_ports.join(", ")));
        }
        parts.join("; ")
    }
}

/// What [`resume_frozen`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeReport {
    /// What was frozen.
    pub frozen: FrozenParts,
    /// The common resume instant (host monotonic ns).
    pub at: MonoNs,
    /// Largest |instant a component resumed − `at`|, ns (a VM's: QEMU's
    /// RESUME stamp, else the middle of its `cont` round trip).
    pub max_error_ns: u64,
}

/// Failures of [`frozen_parts`] and [`resume_frozen`].
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Attach(#[from] CheckpointError),
    #[error("asking VM {node:?} for its state")]
    Status {
        node: String,
        #[source]
        source: VmError,
    },
    #[error("asking the delay node for its state")]
    Delay(#[source] ControlError),
    #[error("VM {node:?} is in state {state}, which `cont` cannot leave; `stasis restore` a checkpoint instead")]
    Unresumable { node: String, state: String },
    #[error("VM {node:?} is still writing a snapshot (state {state}) after {waited_s} s")]
    StillSaving { node: String, state: String, waited_s: u64 },
    #[error("a checkpoint is in progress (pid {pids:?}): let it finish, it resumes the experiment itself")]
    InProgress { pids: Vec<u32> },
    #[error("store")]
    Store(#[from] stasis_store::StoreError),
    #[error("the experiment is frozen but could not be fully resumed: {0}")]
    Partial(String),
}

/// QEMU's name of a run state (as `query-status` says it).
fn state_name(s: &RunState) -> String {
    match s {
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::InMigrate => "inmigrate",
        RunState::PostMigrate => "postmigrate",
        RunState::FinishMigrate => "finish-migrate",
        RunState::Prelaunch => "prelaunch",
        RunState::Shutdown => "shutdown",
        RunState::GuestPanicked => "guest-panicked",
        RunState::InternalError => "internal-error",
        RunState::IoError => "io-error",
        RunState::Other(x) => x,
    }
    .to_owned()
}

async fn inspect(a: &mut Attached) -> Result<(FrozenParts, Vec<RunState>), ResumeError> {
    let mut parts = FrozenParts::default();
    let mut states = Vec::new();
    for (node, vm) in &mut a.vms {
        let s = vm.status().await.map_err(|source| ResumeError::Status { node: node.clone(), source })?;
        if s != RunState::Running {
            parts.vms.push((node.clone(), state_name(&s)));
        }
        states.push(s);
    }
    let st = a.delay.stats().await.map_err(ResumeError::Delay)?;
    parts.delay_node = st.frozen || st.freeze_planned;
    parts.held_ports = st.ports.iter().filter(|p| p.vhost_held).map(|p| p.name.clone()).collect();
    Ok((parts, states))
}

/// What of the running experiment `rt` is frozen (nothing: all runs).
/// Asks the delay node first (its control socket takes any number of
/// clients) and the VMs only if the node is frozen or holds ports: every
/// checkpoint freezes the node, and a VM's QMP socket serves one client at
/// a time, so a plain `stasis status` never queues behind a checkpoint.
pub async fn frozen_parts(rt: &Runtime) -> Result<FrozenParts, ResumeError> {
    let mut delay = delay_node::control::Client::connect(&rt.delay_node.control).await.map_err(ResumeError::Delay)?;
    let st = delay.stats().await.map_err(ResumeError::Delay)?;
    drop(delay);
    if !(st.frozen || st.freeze_planned || st.ports.iter().any(|p| p.vhost_held)) {
        return Ok(FrozenParts::default());
    }
    let mut a = attach(rt).await?;
    Ok(inspect(&mut a).await?.0)
}

/// Resumes every frozen part of `rt` at one instant, `lead_ns` from now.
/// Refused while a checkpoint of `store` is at work (it resumes the
/// experiment itself). A VM still writing a snapshot (its checkpoint died
/// mid-save) is waited for, up to `save_wait`. `Ok` with an empty
/// [`ResumeReport::frozen`] when nothing was frozen.
pub async fn resume_frozen(
    rt: &Runtime,
    store: &stasis_store::Store,
    lead_ns: u64,
    save_wait: Duration,
) -> Result<ResumeReport, ResumeError> {
    let pids = store.checkpoints_in_progress()?;
    if !pids.is_empty() {
        return Err(ResumeError::InProgress { pids });
    }
    let mut a = attach(rt).await?;
    let waited = std::time::Instant::now();
    let (frozen, states) = loop {
        let (frozen, states) = inspect(&mut a).await?;
        let saving =
            a.vms.iter().zip(&states).find(|(_, s)| matches!(s, RunState::FinishMigrate | RunState::InMigrate));
        match saving {
            None => break (frozen, states),
            Some(((node, _), s)) if waited.elapsed() >= save_wait => {
                return Err(ResumeError::StillSaving {
                    node: node.clone(),
                    state: state_name(s),
                    waited_s: save_wait.as_secs(),
                })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    if frozen.is_empty() {
        return Ok(ResumeReport { frozen, at: mono_ns(), max_error_ns: 0 });
    }
    for ((node, _), s) in a.vms.iter().zip(&states) {
        if !matches!(s, RunState::Running | RunState::Paused | RunState::PostMigrate) {
            return Err(ResumeError::Unresumable { node: node.clone(), state: state_name(s) });
        }
    }
    let at = mono_ns() + lead_ns;
    let lead = resume_lead_ns();
    let vm_futs = a
        .vms
        .iter_mut()
        .zip(&states)
        .filter(|(_, s)| **s != RunState::Running)
        .map(|((node, vm), _)| async move { (node.clone(), cont_vm_at(vm, at, lead, true).await) });
    let delay = &mut a.delay;
    let node_fut = async {
        let mut errs = Vec::new();
        let mut thawed = None;
        if frozen.delay_node {
            match delay.thaw_at(at).await {
                Ok(r) => thawed = Some(r.thawed_at),
                Err(e) => errs.push(format!("delay node: {e}")),
            }
        }
        for p in &frozen.held_ports {
            if let Err(e) = delay.release_port(p).await {
                errs.push(format!("delay node port {p}: {e}"));
            }
        }
        (thawed, errs)
    };
    let (vm_results, (thawed, mut errors)) = futures::join!(futures::future::join_all(vm_futs), node_fut);
    let mut max_error_ns = thawed.map(|t| t.abs_diff(at)).unwrap_or(0);
    for (node, r) in vm_results {
        match r {
            Ok(stamp) => max_error_ns = max_error_ns.max(stamp.instant().abs_diff(at)),
            Err(e) => errors.push(format!("VM {node}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(ResumeError::Partial(errors.join("; ")));
    }
    Ok(ResumeReport { frozen, at, max_error_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_every_frozen_part() {
        let p = FrozenParts {
            vms: vec![("a".into(), "paused".into()), ("b".into(), "postmigrate".into())],
            delay_node: true,
            held_ports: vec!["vm-a".into()],
        };
        assert!(!p.is_empty());
        assert_eq!(p.describe(), "VMs a (paused), b (postmigrate); delay node frozen; vhost-user ports held: vm-a");
        assert!(FrozenParts::default().is_empty());
        assert_eq!(FrozenParts::default().describe(), "");
    }

    #[test]
    fn state_names_are_qemus() {
        assert_eq!(state_name(&RunState::Paused), "paused");
        assert_eq!(state_name(&RunState::PostMigrate), "postmigrate");
        for s in [
            "running",
            "paused",
            "inmigrate",
            "postmigrate",
            "finish-migrate",
            "prelaunch",
            "shutdown",
            "guest-panicked",
            "internal-error",
            "io-error",
            "colo",
        ] {
            assert_eq!(state_name(&RunState::from_qmp(s)), s);
        }
        assert_eq!(state_name(&RunState::Other("colo".into())), "colo");
    }
}
