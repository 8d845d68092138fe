//! `stasis supervise`: a foreground process taking the experiment's
//! periodic checkpoints (`[checkpoint]` in the spec) and deleting old ones
//! by retention, until SIGINT/SIGTERM (docs/supervise.md).

use crate::context::{Ctx, FreezeArgs};
use anyhow::{anyhow, Context, Result};
use stasis_agent::freeze::FreezeConfig;
use stasis_agent::supervise::{self, Options};
use stasis_core::spec::{parse_interval_s, CheckpointPolicy, Experiment};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint this often (e.g. 10s, 5m, 1h), instead of the spec's `[checkpoint] every`
    #[arg(long, value_parser = parse_interval_s)]
    pub every: Option<u64>,
    /// Keep the newest this many periodic checkpoints, instead of the spec's `keep`
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub keep: Option<u32>,
    /// Also keep the newest periodic checkpoint of each of the last N days, instead of the spec's `keep_daily`
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// When a VM of the experiment dies (its QEMU is gone), restore the
    /// latest checkpoint automatically and go on with the schedule
    #[arg(long)]
    pub recover: bool,
    #[command(flatten)]
    pub freeze: FreezeArgs,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let experiment = ctx.experiment_name()?;
    let layout = ctx.layout(&experiment);
    let recorded = layout.root().join("experiment.toml");
    let text = std::fs::read_to_string(&recorded)
        .with_context(|| format!("{}: the experiment's recorded spec", recorded.display()))?;
    let spec = Experiment::from_toml_str(&text, Some(&recorded))?;
    let policy = policy(spec.checkpoint, a).ok_or_else(|| {
        anyhow!(
            "experiment {experiment:?} has no [checkpoint] policy in its spec; add one (docs/spec.md) or pass --every"
        )
    })?;
    let freeze = FreezeConfig {
        margin_ns: a.freeze.margin_ms * 1_000_000,
        hold_lead_ns: a.freeze.hold_lead_ms * 1_000_000,
        ..FreezeConfig::default()
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    stop_on_signals(tx);
    let recover = if a.recover { Some(crate::context::tools()?) } else { None };
    let opts = Options { experiment, policy, freeze, recover };
    let state = supervise::run(&layout, &opts, rx).await?;
    if ctx.json() {
        crate::ui::print_json(&state);
    } else {
        println!(
            "supervisor stopped: {} checkpoints taken, {} deleted by retention, {} slots skipped",
            state.checkpoints_taken, state.checkpoints_deleted, state.slots_skipped
        );
    }
    Ok(())
}

/// The spec's policy with the command line's overrides.
fn policy(spec: Option<CheckpointPolicy>, a: &Args) -> Option<CheckpointPolicy> {
    let base = spec.or_else(|| a.every.map(|every_s| CheckpointPolicy { every_s, keep: 10, keep_daily: 0 }))?;
    Some(CheckpointPolicy {
        every_s: a.every.unwrap_or(base.every_s).max(1),
        keep: a.keep.unwrap_or(base.keep),
        keep_daily: a.keep_daily.unwrap_or(base.keep_daily),
    })
}

/// SIGINT, SIGTERM and SIGHUP ask the loop to stop; it finishes a round in
/// progress first, so nothing stays frozen.
fn stop_on_signals(tx: tokio::sync::watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let tx = std::sync::Arc::new(tx);
    for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
        if let Ok(mut sig) = signal(kind) {
            let tx = tx.clone();
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    tracing::info!("stop asked; finishing the round in progress, if any");
                    let _ = tx.send(true);
                }
            });
        }
    }
}
