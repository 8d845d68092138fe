//! `stasis checkpoint [--live]`: freeze every component at one instant,
//! save, resume.

use crate::context::{no_space_hint, Ctx, ForCheckpoint, FreezeArgs};
use crate::ui::{mib, ms, print_json};
use anyhow::{bail, Result};
use stasis_agent::host;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub freeze: FreezeArgs,
    /// Keep the experiment frozen at least this long, ms
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// Break transparency on purpose, to test the instruments:
    /// late-resume=NODE:DURATION or sigstop=NODE:DURATION (docs/guest-kmod.md)
    #[arg(long = "fault", hide = true)]
    pub faults: Vec<stasis_agent::freeze::Fault>,
    /// Live checkpoint: the same consistency instant, but QEMU writes
    /// guest RAM in the background while the guests run (stream NICs only)
    #[arg(long, conflicts_with = "pause_ms")]
    pub live: bool,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    if let Some(n) = a.name.as_deref().filter(|n| n.starts_with(stasis_agent::supervise::AUTO_PREFIX)) {
        bail!(
            "checkpoint name {n:?}: names starting with {:?} are the supervisor's, which retention deletes",
            stasis_agent::supervise::AUTO_PREFIX
        );
    }
    if a.live {
        return live(ctx, a).await;
    }
    let o = ForCheckpoint::open(ctx, a.freeze, a.pause_ms)?;
    let s = host::checkpoint_with_faults(&o.rt, &o.store, a.name.as_deref(), &o.cfg, &a.faults, &o.log).await;
    ctx.ui.done();
    let s = s.map_err(|e| no_space_hint(e.into(), &o.store))?;
    let verdict = o.store.open_checkpoint(&s.info.id).ok().map(|c| super::show::verdict_of(&c.manifest));
    if ctx.json() {
        let mut v = serde_json::to_value(&s)?;
        v["verdict"] = serde_json::to_value(&verdict)?;
        print_json(&v);
    } else {
        println!(
            "checkpoint {} {}: {} VMs, {} saved, stop skew {}, frozen {} (max error {}), save {}, {} frames in flight ({} held)",
            s.info.index,
            s.info.name.as_deref().map(|n| format!("{n:?}")).unwrap_or_else(|| s.info.id.clone()),
            s.vms,
            mib(s.bytes),
            ms(s.stop_skew_ns),
            ms(s.frozen_duration_ns),
            ms(s.max_frozen_error_ns),
            ms(s.save_ns),
            s.frames_in_flight,
            s.frames_held
        );
        if let Some(v) = &verdict {
            super::show::print_verdict(v);
        }
    }
    Ok(())
}

async fn live(ctx: &Ctx, a: &Args) -> Result<()> {
    if !a.faults.is_empty() {
        bail!("--fault applies to stop-and-copy checkpoints, not --live");
    }
    let o = ForCheckpoint::open(ctx, a.freeze, a.pause_ms)?;
    let s = stasis_agent::live::checkpoint_live(&o.rt, &o.store, a.name.as_deref(), &o.cfg, &o.log).await;
    ctx.ui.done();
    let s = s.map_err(|e| no_space_hint(e.into(), &o.store))?;
    if ctx.json() {
        print_json(&s);
    } else {
        let c = &s.summary;
        println!(
            "live checkpoint {} {}: {} VMs, {} saved, stop skew {}, guest downtime max {} ({}), save {}, {} frames in flight",
            c.info.index,
            c.info.name.as_deref().map(|n| format!("{n:?}")).unwrap_or_else(|| c.info.id.clone()),
            c.vms,
            mib(c.bytes),
            ms(c.stop_skew_ns),
            ms(s.max_downtime_ns),
            s.downtime.iter().map(|d| format!("{} {}", d.node, ms(d.downtime_ns))).collect::<Vec<_>>().join(", "),
            ms(c.save_ns),
            c.frames_in_flight
        );
    }
    Ok(())
}
