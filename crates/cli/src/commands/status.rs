//! `stasis status`: what runs, what a killed checkpoint left frozen, or
//! that the experiment is swapped out.

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::Result;
use stasis_agent::host::{AttachError, Runtime};
use stasis_agent::job::JobLock;
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let name = ctx.experiment_name()?;
    let layout = ctx.layout(&name);
    // The command changing the experiment now, if any (its job lock).
    let job = JobLock::holder(&layout);
    let sup = stasis_agent::supervise::status(&layout);
    if let Some(h) = job.as_ref().filter(|_| !ctx.json()) {
        println!("experiment {name}: busy: `stasis {}` (pid {}) is running", h.command, h.pid);
    }
    match Runtime::load(&layout) {
        Ok(rt) => {
            let alive = rt.alive();
            // Parts a killed checkpoint left frozen (only asked when every process lives).
            // (Not while a checkpoint runs: it holds each VM's QMP connection.)
            let in_progress = Store::open(&layout.checkpoints())
                .ok()
                .and_then(|s| s.checkpoints_in_progress().ok())
                .unwrap_or_default();
            let frozen = if job.is_none() && in_progress.is_empty() && alive.iter().all(|(_, _, a)| *a) {
                stasis_agent::recover::frozen_parts(&rt).await.ok()
            } else {
                None
            };
            if ctx.json() {
                print_json(&serde_json::json!({"experiment": name, "running": true, "incarnation": rt.incarnation,
                    "restored_from": rt.restored_from, "frozen": frozen, "checkpoint_in_progress": in_progress, "job": job, "supervisor": sup,
                    "processes": alive.iter().map(|(n, p, a)| serde_json::json!({"name": n, "pid": p, "alive": a})).collect::<Vec<_>>()}));
            } else {
                println!(
                    "experiment {name}: incarnation {}{}",
                    rt.incarnation,
                    rt.restored_from.as_ref().map(|c| format!(", restored from {c}")).unwrap_or_default()
                );
                for (n, p, a) in &alive {
                    println!("  {:<12} pid {:<8} {}", n, p, if *a { "running" } else { "DEAD" });
                }
                if !in_progress.is_empty() {
                    println!("a checkpoint is in progress (pid {in_progress:?})");
                } else if let Some(f) = frozen.as_ref().filter(|f| !f.is_empty()) {
                    println!(
                        "FROZEN by a checkpoint that did not finish: {}; `stasis resume` starts it again",
                        f.describe()
                    );
                }
            }
        }
        Err(AttachError::NotRunning(_)) => {
            let swapped = stasis_agent::swap::swapped_out(&layout);
            if ctx.json() {
                print_json(
                    &serde_json::json!({"experiment": name, "running": false, "swapped_out": swapped, "job": job, "supervisor": sup}),
                );
            } else if let Some(s) = swapped {
                let label =
                    s.name.as_deref().map(|n| format!("{} {n:?}", s.checkpoint)).unwrap_or(s.checkpoint.clone());
                println!(
                    "experiment {name}: swapped out (checkpoint {label}, branch {}); `stasis swap-in` brings it back",
                    s.branch
                );
            } else {
                println!("experiment {name}: not running");
            }
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(s) = sup.as_ref().filter(|_| !ctx.json()) {
        println!("{}", describe_supervisor(s, stasis_core::clock::realtime_ns() / 1_000_000));
    }
    Ok(())
}

/// `supervisor: pid 123, every 10s; last checkpoint auto-… (#4) 3 s ago; next due in 7 s`.
fn describe_supervisor(s: &stasis_agent::supervise::Status, now_ms: u64) -> String {
    let st = &s.state;
    let mut out = match s.pid {
        Some(p) => format!("supervisor: pid {p}, every {}", stasis_core::spec::format_interval_s(st.every_ms / 1000)),
        None => "supervisor: not running".to_owned(),
    };
    match &st.last_checkpoint {
        Some(c) => {
            out += &format!(
                "; last checkpoint {} (#{}) {} s ago",
                c.name,
                c.index,
                now_ms.saturating_sub(c.unix_ms) / 1000
            )
        }
        None => out += "; no checkpoint taken yet",
    }
    if let (Some(_), Some(d)) = (s.pid, st.next_due_unix_ms) {
        out += &format!("; next due in {} s", d.saturating_sub(now_ms).div_ceil(1000));
    }
    if st.consecutive_failures > 0 {
        out += &format!("; {} failed in a row", st.consecutive_failures);
    }
    if let Some(e) = &st.last_error {
        out += &format!("; last error: {e}");
    }
    out
}
