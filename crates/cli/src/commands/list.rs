//! `stasis list`: the checkpoints of the experiment.

use crate::context::Ctx;
use crate::ui::{mib, print_json};
use anyhow::Result;
use stasis_store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(ctx: &Ctx, _: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let store = Store::open(&ctx.layout(&exp).checkpoints())?;
    let list = store.list()?;
    if ctx.json() {
        print_json(&list);
    } else if list.is_empty() {
        println!("no checkpoints of {exp}");
    } else {
        println!("{:>3}  {:<24} {:<16} {:>12}", "#", "id", "name", "size");
        for c in &list {
            println!("{:>3}  {:<24} {:<16} {:>12}", c.index, c.id, c.name.as_deref().unwrap_or("-"), mib(c.bytes));
        }
    }
    Ok(())
}
