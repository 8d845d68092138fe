//! `stasis exec NODE -- CMD…`: run a command in a node through its guest
//! agent; its stdout and stderr come out here, and `stasis` exits with its
//! status (docs/exec.md).

use crate::context::Ctx;
use crate::ui::print_json;
use anyhow::Result;
use stasis_agent::guest::{self, ExecLimits};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node to run in
    pub node: String,
    /// The command and its arguments (after `--`)
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Give up on the command after this many seconds (default: wait for it)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// How long to wait for the node's guest agent to answer
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub agent_timeout: u64,
}

pub async fn exec(ctx: &Ctx, a: &Args) -> Result<()> {
    let exp = ctx.experiment_name()?;
    let access = guest::node_access(&ctx.layout(&exp), &exp, &a.node)?;
    let limits = ExecLimits {
        agent_wait: Duration::from_secs(a.agent_timeout.max(1)),
        command: a.timeout.map(Duration::from_secs),
        ..ExecLimits::default()
    };
    let argv = a.command.clone();
    let out = tokio::task::spawn_blocking(move || guest::exec(&access, &argv, limits)).await??;
    let status = guest::exit_status(&out);
    if ctx.json() {
        print_json(&serde_json::json!({
            "node": a.node, "command": a.command, "pid": out.pid,
            "exit_code": out.exit_code, "signal": out.signal,
            "stdout": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr),
            "stdout_truncated": out.stdout_truncated, "stderr_truncated": out.stderr_truncated,
            "reconnects": out.reconnects,
        }));
    } else {
        std::io::stdout().write_all(&out.stdout)?;
        std::io::stderr().write_all(&out.stderr)?;
        if out.stdout_truncated || out.stderr_truncated {
            eprintln!("stasis: warning: the guest agent truncated the command's output");
        }
    }
    std::io::stdout().flush()?;
    if status != 0 {
        std::process::exit(status);
    }
    Ok(())
}
