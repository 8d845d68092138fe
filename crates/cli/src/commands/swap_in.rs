//! `stasis swap-in [CHECKPOINT]`: restore the swap-out point and carry on.

use crate::context::{tools, Ctx};
use crate::ui::{ms, print_json};
use anyhow::{bail, Result};
use stasis_agent::event::EventLog;
use stasis_agent::host::{self, Runtime};
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub checkpoint: Option<String>,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let layout = ctx.layout(&exp);
    let rec = stasis_agent::swap::swapped_out(&layout);
    let which = match (&a.checkpoint, &rec) {
        (Some(c), _) => c.clone(),
        (None, Some(r)) => r.checkpoint.clone(),
        (None, None) => bail!(
            "experiment {exp} is not swapped out (no {}); name a checkpoint, or use `stasis restore`",
            layout.root().join(stasis_agent::swap::SWAP_FILE).display()
        ),
    };
    if let Ok(rt) = Runtime::load(&layout) {
        if rt.alive().iter().any(|(_, _, a)| *a) {
            bail!("experiment {exp} is running; swap it out first (or use `stasis restore`)");
        }
    }
    // A checkpoint restores only into the QEMU version (and machine type) that saved it.
    if let Some(r) = &rec {
        let here = stasis_agent::swap::qemu_version();
        let (a, b) =
            (stasis_agent::swap::qemu_major_minor(&r.qemu_version), stasis_agent::swap::qemu_major_minor(&here));
        if a.is_some() && b.is_some() && a != b {
            bail!("checkpoint {} was saved by {:?}, but this host runs {:?}: a restore needs the same QEMU version and machine type", r.checkpoint, r.qemu_version, here);
        }
    }
    let (_, ckpt) = ctx.open_checkpoint(&which)?;
    let store = Store::open(&layout.checkpoints())?;
    let recorded = ctx.recorded_digest(&layout);
    let tools = tools()?;
    let log = EventLog::open(&layout.events_file(), &ctx.ui);
    let images = store.gc_lock(false)?;
    let r = host::restore(&exp, recorded.as_deref(), &ckpt, &layout, &tools, 200_000_000, None, &log).await;
    drop(images);
    ctx.ui.done();
    let (rt, s) = r?;
    stasis_agent::swap::clear(&layout);
    if ctx.json() {
        print_json(&serde_json::json!({"summary": s, "runtime": rt}));
    } else {
        println!(
            "swapped in {} ({} VMs) in {}, resume skew {}",
            s.checkpoint,
            s.vms,
            ms(s.restore_ns),
            ms(s.resume_skew_ns)
        );
    }
    Ok(())
}
