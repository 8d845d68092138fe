//! `stasis resume`: start again what a killed checkpoint left frozen.

use crate::context::Ctx;
use crate::ui::{ms, print_json};
use anyhow::Result;
use stasis_agent::host::Runtime;
use stasis_store::Store;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let layout = ctx.layout(&exp);
    let rt = Runtime::load(&layout)?;
    let store = Store::open(&layout.checkpoints())?;
    let r = stasis_agent::recover::resume_frozen(&rt, &store, 200_000_000, Duration::from_secs(120)).await;
    ctx.ui.done();
    let r = r?;
    if ctx.json() {
        print_json(&r);
    } else if r.frozen.is_empty() {
        println!("experiment {exp}: nothing is frozen");
    } else {
        println!("resumed {exp}: {} (at one instant, within {})", r.frozen.describe(), ms(r.max_error_ns));
    }
    Ok(())
}
