//! Live checkpoints: one consistency instant for every component, but guest
//! RAM written while the guests run (QEMU's background snapshot).
//!
//! ```text
//!  agent                      delay node                 VM 1..n (QMP)
//!    | freeze_at(T, lead) ------->|  stop delivering at T-lead
//!    |            (at T) stop --------------------------------->|  stopped: s_i
//!    | (disks: switch to new overlays, as in a stop-and-copy checkpoint)
//!    | save(file) --------------->|  drain sockets, write state (frozen at F)
//!    | migrate (background-snapshot) ---------------------------->|  device state saved,
//!    |                                                            |  RAM write-protected,
//!    |                                     QEMU resumes it: r_i <-|  RAM written while it runs
//!    | thaw_at(F + D), D = max_i(r_i - s_i) ->|
//!    | wait for every snapshot, fsync, rename; commit the manifest
//! ```
//! The checkpoint is the state at T exactly as a stop-and-copy one (the
//! delay node is saved while every VM is stopped; each VM's device state and
//! RAM are those of its stop instant). What differs is the downtime: QEMU
//! resumes each guest as soon as its device state is saved and its RAM
//! write-protected, so the guest-visible downtime is `r_i - s_i` (reported
//! per VM in the summary and the manifest), not the whole save. QEMU 7.2
//! resumes the guest itself, so the frozen durations are not planned: the
//! delay node is thawed after the longest one and the spread is reported
//! as the D error.
//!
//! vhost-user NICs: the delay node writes a vhost-user guest's rings through
//! its own mapping of guest RAM, which the snapshot's userfaultfd write
//! protection does not see (DESIGN.md). So before any VM is resumed, the
//! node is told to hold every vhost-user port (`hold_port`: no RX delivery,
//! TX ring left alone; frames wait in the node with their timing) and it
//! releases them once every snapshot is on disk. The guest runs meanwhile,
//! but its network is paused for the background save.

use crate::event::{Event, Observer};
use crate::freeze::{self, FreezeConfig, StopStamp};
use crate::host::{
    attach, commit_checkpoint, reported_instant, sleep_until, switch_disks, CheckpointError, CheckpointSummary,
    Measured, Runtime, DISKS_FILE,
};
use futures::future::join_all;
use serde::Serialize;
use stasis_core::clock::{mono_ns, MonoNs};
use stasis_core::spec::{Experiment, NicMode};
use stasis_store::manifest::{ComponentDraft, ComponentKind, ExperimentRef, FreezeReport, ManifestDraft, Timings};
use stasis_store::Store;
use std::time::Duration;

/// How long QEMU may take from the snapshot's start to resuming the guest.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// Key prefix of the per-VM downtimes in a manifest's `timings.extra`.
pub const DOWNTIME_KEY: &str = "live_downtime_ns.";
/// `timings.extra` key marking a live checkpoint (value 1).
pub const LIVE_KEY: &str = "live";

/// Errors of [`checkpoint_live`].
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the running experiment's spec does not parse")]
    Spec(#[from] stasis_core::spec::SpecError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// One VM's guest-visible downtime in a live checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct VmDowntime {
    pub node: String,
    /// From QEMU's STOP event to its RESUME event (host monotonic stamps).
    pub downtime_ns: u64,
    /// QEMU's own figure (`query-migrate` downtime, ms resolution): from its
    /// migration thread's start to the resume, i.e. without our stop.
    pub qemu_downtime_ms: Option<u64>,
    /// From the resume until the snapshot's RAM was written and durable.
    pub background_ns: u64,
}

/// The result of a live checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSummary {
    #[serde(flatten)]
    pub summary: CheckpointSummary,
    pub live: bool,
    pub downtime: Vec<VmDowntime>,
    /// The longest per-VM downtime.
    pub max_downtime_ns: u64,
    /// vhost-user ports the delay node held during the background save ...
    pub vhost_ports_held: usize,
    /// ... and for how long after the node thawed (their guests' network
    /// stood still that long; frames waited in the node).
    pub vhost_hold_ns: u64,
}

/// Take one live checkpoint of the running experiment.
pub async fn checkpoint_live(
    rt: &Runtime,
    store: &Store,
    name: Option<&str>,
    cfg: &FreezeConfig,
    obs: &dyn Observer,
) -> Result<LiveSummary, LiveError> {
    let exp = Experiment::from_toml_str(&rt.spec_toml, None)?;
    let vhost_ports: Vec<String> = exp
        .nodes
        .iter()
        .filter(|n| n.nic == NicMode::VhostUser)
        .flat_map(|n| n.ifaces.iter().map(|i| crate::topology::port_name(&n.name, &i.name)))
        .collect();
    let mut a = attach(rt).await?;
    // Everything QEMU needs for the snapshot is set before the freeze, so a
    // stopped guest waits for one `migrate` only.
    for (node, vm) in &mut a.vms {
        vm.prepare_background_save().await.map_err(|e| CheckpointError::Aborted {
            reason: format!("preparing the background snapshot of VM {node}: {e}"),
        })?;
    }
    let pending = store.begin(name).map_err(CheckpointError::from)?;
    let id = pending.id().to_string();
    let t = freeze::plan_freeze(mono_ns(), cfg);
    obs.event(&Event::Planned { checkpoint: id.clone(), freeze_at: t });
    let aborted = |pending: stasis_store::Pending, reason: String| {
        pending.abort();
        obs.event(&Event::Aborted { checkpoint: id.clone(), reason: reason.clone() });
        CheckpointError::Aborted { reason }
    };
    if let Err(e) = a.delay.freeze_at(t, cfg.hold_lead_ns).await {
        return Err(aborted(pending, format!("delay node refused the freeze: {e}")).into());
    }

    // Stop every VM at T (the consistency instant).
    sleep_until(t).await;
    let stops: Vec<_> = join_all(a.vms.iter_mut().map(|(_, vm)| vm.stop())).await;
    let mut stamps: Vec<Option<StopStamp>> = Vec::new();
    let mut failure: Option<String> = None;
    for ((node, vm), r) in a.vms.iter_mut().zip(stops) {
        match r {
            Ok(s) => {
                obs.event(&Event::Stopped { component: node.clone(), sent: s.sent, replied: s.replied });
                let reported = reported_instant(vm, "STOP");
                stamps.push(Some(StopStamp { sent: s.sent, replied: s.replied, reported }));
            }
            Err(e) => {
                failure.get_or_insert(format!("stopping VM {node}: {e}"));
                stamps.push(None);
            }
        }
    }

    // Disks: switched to new overlays while stopped, exactly as in a
    // stop-and-copy checkpoint (see host.rs).
    let mut frozen_disks = std::collections::BTreeMap::new();
    let mut rt_next = rt.clone();
    if failure.is_none() {
        switch_disks(&mut a, rt, &mut rt_next, &pending, &mut frozen_disks, &mut failure).await;
    }

    // The delay node while every VM is stopped: what they sent before their
    // stop is in its state, nothing after.
    let mut node_report = None;
    if failure.is_none() {
        obs.event(&Event::Saving { component: "delay-node".into() });
        let t0 = mono_ns();
        match a.delay.save(&pending.path("delay-node")).await {
            Ok(r) => {
                let save_ns = mono_ns() - t0;
                obs.event(&Event::Saved { component: "delay-node".into(), bytes: r.bytes, save_ns });
                node_report = Some((r, save_ns));
            }
            Err(e) => failure = Some(format!("saving the delay node: {e}")),
        }
    }
    let frozen_at = node_report.as_ref().map(|(r, _)| r.frozen_at).unwrap_or(t);

    // vhost-user ports: the node stays out of those guests' memory from
    // before QEMU resumes them until their snapshots are written.
    let mut held = Vec::new();
    if failure.is_none() {
        for port in &vhost_ports {
            match a.delay.hold_port(port).await {
                Ok(_) => held.push(port.clone()),
                Err(e) => {
                    failure.get_or_insert(format!("holding vhost-user port {port} in the delay node: {e}"));
                    break;
                }
            }
        }
    }

    // Every VM: start its background snapshot; QEMU saves the device state
    // and resumes the guest; its RAM is written afterwards.
    let mut bgs: Vec<Option<stasis_qemu::vm::BackgroundSave>> = (0..a.vms.len()).map(|_| None).collect();
    let mut resumed_at: Vec<Option<MonoNs>> = vec![None; a.vms.len()];
    if failure.is_none() {
        let starts = join_all(a.vms.iter_mut().map(|(node, vm)| {
            let path = pending.path(&format!("vm-{node}"));
            obs.event(&Event::Saving { component: node.clone() });
            async move {
                let bg = vm.begin_background_save(&path).await?;
                let r = vm.wait_resumed(RESUME_TIMEOUT).await;
                let at = mono_ns();
                let reported = reported_instant(vm, "RESUME");
                Ok::<_, stasis_qemu::vm::VmError>((bg, r.map(|()| reported.unwrap_or(at))))
            }
        }))
        .await;
        for (i, ((node, _), r)) in a.vms.iter().zip(starts).enumerate() {
            match r {
                Ok((bg, resumed)) => {
                    bgs[i] = Some(bg);
                    match resumed {
                        Ok(at) => {
                            obs.event(&Event::Resumed { component: node.clone(), at, planned: at });
                            resumed_at[i] = Some(at);
                        }
                        Err(e) => {
                            failure.get_or_insert(format!("background snapshot of VM {node}: {e}"));
                        }
                    }
                }
                Err(e) => {
                    failure.get_or_insert(format!("starting the background snapshot of VM {node}: {e}"));
                }
            }
        }
    }

    // Whatever happened, every VM runs again: QEMU resumed those whose
    // snapshot started; resume the others ourselves.
    let mut resume_errors = Vec::new();
    for (i, (node, vm)) in a.vms.iter_mut().enumerate() {
        if resumed_at[i].is_some() || stamps[i].is_none() {
            continue;
        }
        match vm.status().await {
            Ok(stasis_qemu::vm::RunState::Running) => resumed_at[i] = Some(mono_ns()),
            _ => match vm.cont().await {
                Ok(c) => {
                    resumed_at[i] = Some(
                        StopStamp { sent: c.sent, replied: c.replied, reported: reported_instant(vm, "RESUME") }
                            .instant(),
                    )
                }
                Err(e) => resume_errors.push(format!("VM {node}: {e}")),
            },
        }
    }
    // The delay node stays frozen as long as the longest-stopped VM.
    let vm_frozen: Vec<u64> = stamps
        .iter()
        .zip(&resumed_at)
        .filter_map(|(s, r)| Some(r.as_ref()?.saturating_sub(s.as_ref()?.instant())))
        .collect();
    let d = vm_frozen.iter().copied().max().unwrap_or(0).max(mono_ns().saturating_sub(frozen_at) + 1_000_000);
    let mut node_resume = 0;
    let mut hold_lateness = 0;
    match a.delay.thaw_at(frozen_at + d).await {
        Ok(r) => {
            obs.event(&Event::Resumed { component: "delay-node".into(), at: r.thawed_at, planned: frozen_at + d });
            node_resume = r.thawed_at;
            hold_lateness = r.max_hold_lateness_ns;
        }
        Err(e) => resume_errors.push(format!("delay node: {e}")),
    }

    // RAM: wait for every snapshot to be written and durable.
    let finishes = join_all(a.vms.iter_mut().zip(bgs).map(|((node, vm), bg)| async move {
        let bg = bg?;
        let t0 = mono_ns();
        Some((node.clone(), vm.finish_background_save(bg).await, mono_ns() - t0))
    }))
    .await;
    let mut saved = Vec::new();
    for f in finishes.into_iter().flatten() {
        match f {
            (node, Ok(rep), ns) => {
                obs.event(&Event::Saved { component: node.clone(), bytes: rep.bytes, save_ns: ns });
                saved.push((node, rep, ns));
            }
            (node, Err(e), _) => {
                failure.get_or_insert(format!("saving VM {node} in the background: {e}"));
            }
        }
    }
    let saved_at = mono_ns();
    let held_ns = saved_at.saturating_sub(node_resume.max(frozen_at));
    for port in &held {
        if let Err(e) = a.delay.release_port(port).await {
            resume_errors.push(format!("releasing vhost-user port {port}: {e}"));
        }
    }

    if let Some(reason) = failure {
        pending.abort();
        obs.event(&Event::Aborted { checkpoint: id, reason: reason.clone() });
        return Err(if resume_errors.is_empty() {
            CheckpointError::Aborted { reason }
        } else {
            CheckpointError::AbortedBroken { reason, resume: resume_errors.join("; ") }
        }
        .into());
    }

    let mut records = Vec::new();
    let mut downtime = Vec::new();
    let mut measured = Vec::new();
    for (i, (node, _)) in a.vms.iter().enumerate() {
        let stop = stamps[i].expect("stopped when nothing failed").instant();
        let resume = resumed_at[i].expect("resumed when nothing failed");
        let (_, rep, background_ns) = saved.iter().find(|s| &s.0 == node).expect("saved when nothing failed");
        records.push(ComponentDraft {
            name: node.clone(),
            kind: ComponentKind::Vm,
            file: format!("vm-{node}"),
            stop_ns: stop,
            resume_ns: resume,
            frozen_ns: resume.saturating_sub(stop),
            save_ns: saved_at.saturating_sub(stop),
        });
        measured.push((stop, resume));
        downtime.push(VmDowntime {
            node: node.clone(),
            downtime_ns: resume.saturating_sub(stop),
            qemu_downtime_ms: rep.downtime.map(|d| d.as_millis() as u64),
            background_ns: *background_ns,
        });
    }
    let (nr, node_save_ns) = node_report.expect("saved when nothing failed");
    records.push(ComponentDraft {
        name: "delay-node".into(),
        kind: ComponentKind::DelayNode,
        file: "delay-node".into(),
        stop_ns: frozen_at,
        resume_ns: node_resume,
        frozen_ns: node_resume.saturating_sub(frozen_at),
        save_ns: node_save_ns,
    });
    measured.push((frozen_at, node_resume));
    let f = freeze::fidelity(t, d, &measured);
    let commit_start = mono_ns();
    let mut files = match crate::history::write_records(&pending, rt) {
        Ok(f) => f,
        Err(reason) => return Err(aborted(pending, reason).into()),
    };
    if !frozen_disks.is_empty() {
        files.push(DISKS_FILE.to_string());
    }
    let max_downtime_ns = downtime.iter().map(|v| v.downtime_ns).max().unwrap_or(0);
    let mut extra: Vec<(String, u64)> = vec![
        (LIVE_KEY.to_string(), 1),
        ("max_frozen_error_ns".to_string(), f.max_frozen_error_ns),
        ("max_hold_lateness_ns".to_string(), hold_lateness),
        ("live_max_downtime_ns".to_string(), max_downtime_ns),
        ("live_vhost_ports_held".to_string(), held.len() as u64),
    ];
    if !held.is_empty() {
        extra.push(("live_vhost_hold_ns".to_string(), held_ns));
    }
    extra.extend(downtime.iter().map(|v| (format!("{DOWNTIME_KEY}{}", v.node), v.downtime_ns)));
    let draft = ManifestDraft {
        parent: rt.restored_from.clone(),
        experiment: ExperimentRef {
            name: rt.experiment.clone(),
            digest: rt.spec_digest.clone(),
            spec_toml: rt.spec_toml.clone(),
        },
        components: records,
        files,
        freeze: FreezeReport {
            planned_ns: t,
            lead_ns: cfg.hold_lead_ns,
            stop_skew_ns: f.stop_skew_ns,
            frozen_duration_ns: d,
            frames_in_flight: nr.frames_in_flight,
            frames_held: nr.frames_held,
        },
        timings: Timings { total_save_ns: saved_at - t, commit_ns: 0, extra: extra.into_iter().collect() },
    };
    let summary = commit_checkpoint(
        pending,
        draft,
        rt,
        &mut rt_next,
        &resume_errors,
        Measured {
            vms: a.vms.len(),
            fidelity: f,
            frozen_duration_ns: d,
            save_ns: saved_at.saturating_sub(t),
            commit_start,
            node: nr,
            max_hold_lateness_ns: hold_lateness,
        },
        obs,
    )?;
    let live = LiveSummary {
        summary,
        live: true,
        downtime,
        max_downtime_ns,
        vhost_ports_held: held.len(),
        vhost_hold_ns: if held.is_empty() { 0 } else { held_ns },
    };
    let path = store.root().join(&live.summary.info.id).join("report.json");
    let body = serde_json::json!({ "summary": live, "measured_stop_resume_ns": measured });
    let tmp = path.with_extension("json.tmp");
    if stasis_core::private::write(&tmp, &serde_json::to_vec_pretty(&body).expect("report serialises")).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
    Ok(live)
}
