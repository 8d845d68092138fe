//! `stasis cp NODE:PATH LOCAL` and `stasis cp LOCAL NODE:PATH`: copy a file
//! out of or into a node through its guest agent (docs/exec.md).

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::Result;
use stasis_agent::guest::{self, Copy};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// NODE:/path in the guest, or a local file
    pub from: String,
    /// A local file or directory, or NODE:/path (ending in `/`: a directory)
    pub to: String,
    /// How long to wait for the node's guest agent to answer
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub agent_timeout: u64,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let copy = Copy::resolve(&a.from, &a.to)?;
    let exp = ctx.experiment_name()?;
    let access = guest::node_access(&ctx.layout(&exp), &exp, copy.node())?;
    let wait = Duration::from_secs(a.agent_timeout.max(1));
    let r = tokio::task::spawn_blocking(move || guest::copy(&access, &copy, wait)).await??;
    if ctx.json() {
        print_json(&r);
    } else {
        println!("{} -> {} ({} bytes)", r.from, r.to, r.bytes);
    }
    Ok(())
}
