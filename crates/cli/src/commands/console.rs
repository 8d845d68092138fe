//! `stasis console NODE`: the node's serial console, interactive; Ctrl-]
//! detaches and leaves the guest running. The serial log
//! (`run/vm/NODE/serial-N.log`) keeps being written either way.

use crate::context::Ctx;
use anyhow::Result;
use stasis_agent::guest;
use stasis_osguest::console::Ended;
use std::io::IsTerminal;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node whose console to attach
    pub node: String,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let access = guest::node_access(&ctx.layout(&exp), &exp, &a.node)?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("stasis: attached to {}'s console; Ctrl-] detaches\r", a.node);
    }
    let ended = tokio::task::spawn_blocking(move || guest::console(&access, std::io::stdin())).await??;
    match ended {
        Ended::Detached if tty => eprintln!("\r\nstasis: detached from {}'s console", a.node),
        Ended::ConsoleClosed => eprintln!("\r\nstasis: {}'s console closed (its VM stopped or was replaced)", a.node),
        _ => {}
    }
    Ok(())
}
