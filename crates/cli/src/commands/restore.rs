//! `stasis restore CHECKPOINT [--branch NAME]`: replace what runs by a
//! checkpoint; a branch name stands for that branch's latest checkpoint.

use crate::context::{tools, Ctx};
use crate::ui::{ms, print_json};
use anyhow::Result;
use stasis_agent::event::EventLog;
use stasis_agent::history::History;
use stasis_agent::host;
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub checkpoint: String,
    /// Continue on this branch (created from CHECKPOINT if new); later
    /// checkpoints belong to it
    #[arg(long)]
    pub branch: Option<String>,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let exp0 = ctx.experiment_name()?;
    let layout0 = ctx.layout(&exp0);
    let store0 = Store::open(&layout0.checkpoints())?;
    let branches = History::new(&layout0).branches_of(&store0)?;
    let (which, branch) = match branches.0.get(a.checkpoint.as_str()) {
        Some(b) if a.branch.is_none() && store0.open_checkpoint(&a.checkpoint).is_err() => {
            (b.head.clone(), Some(a.checkpoint.clone()))
        }
        _ => (a.checkpoint.clone(), a.branch.clone()),
    };
    let (exp, ckpt) = ctx.open_checkpoint(&which)?;
    let layout = ctx.layout(&exp);
    let history = History::new(&layout);
    if let Some(name) = &branch {
        let current = history.branches_of(&Store::open(&layout.checkpoints())?)?;
        history.ensure(name, &ckpt.info.id, &current)?;
    }
    let recorded = ctx.recorded_digest(&layout);
    let tools = tools()?;
    let log = EventLog::open(&layout.events_file(), &ctx.ui);
    let images = Store::open(&layout.checkpoints())?.gc_lock(false)?;
    let r =
        host::restore(&exp, recorded.as_deref(), &ckpt, &layout, &tools, 200_000_000, branch.as_deref(), &log).await;
    drop(images);
    ctx.ui.done();
    let (rt, s) = r?;
    stasis_agent::swap::clear(&layout);
    if ctx.json() {
        print_json(&serde_json::json!({"summary": s, "runtime": rt}));
    } else {
        println!(
            "restored {} ({} VMs) in {}, resume skew {}",
            s.checkpoint,
            s.vms,
            ms(s.restore_ns),
            ms(s.resume_skew_ns)
        );
    }
    Ok(())
}
