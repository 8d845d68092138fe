//! `stasis branch CHECKPOINT NAME`: a new line of history (no disk copied).

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::Result;
use stasis_agent::history::History;
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub checkpoint: String,
    pub name: String,
}

pub fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let (exp, ckpt) = ctx.open_checkpoint(&a.checkpoint)?;
    let layout = ctx.layout(&exp);
    let history = History::new(&layout);
    let current = history.branches_of(&Store::open(&layout.checkpoints())?)?;
    let rec = history.create(&a.name, &ckpt.info.id, &current)?;
    if ctx.json() {
        print_json(&serde_json::json!({"branch": a.name, "from": rec.from}));
    } else {
        println!("branch {} starts at {} (run it with `stasis restore {}`)", a.name, rec.from, a.name);
    }
    Ok(())
}
