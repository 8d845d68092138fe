//! `stasis down`: stop every process of the experiment (checkpoints stay).

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::Result;
use stasis_agent::host;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let n = host::down(&ctx.layout(&exp)).await?;
    if ctx.json() {
        print_json(&serde_json::json!({"experiment": exp, "stopped": n}));
    } else {
        println!("experiment {exp} down ({n} processes stopped)");
    }
    Ok(())
}
