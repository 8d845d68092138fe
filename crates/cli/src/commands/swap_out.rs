//! `stasis swap-out`: checkpoint, then release every process and socket.

use crate::context::{no_space_hint, Ctx, ForCheckpoint, FreezeArgs};
use crate::ui::{mib, print_json};
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub freeze: FreezeArgs,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let o = ForCheckpoint::open(ctx, a.freeze, 0)?;
    let r = stasis_agent::swap::swap_out(&o.rt, &o.layout, &o.store, a.name.as_deref(), &o.cfg, &o.log).await;
    ctx.ui.done();
    let (s, rec) = r.map_err(|e| no_space_hint(e.into(), &o.store))?;
    if ctx.json() {
        print_json(&serde_json::json!({"checkpoint": s, "swapped_out": rec}));
    } else {
        println!(
            "swapped out {}: checkpoint {} ({} saved), {} processes stopped; `stasis swap-in` brings it back",
            o.exp,
            s.info.id,
            mib(s.bytes),
            rec.stopped
        );
    }
    Ok(())
}
