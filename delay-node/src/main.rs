//! `delay-node`: parse arguments, set up logging, run the node, map errors to exit codes.

use clap::Parser;
use delay_node::config::Topology;
use delay_node::node::{error_chain, Node};
use delay_node::state::NodeState;
use std::path::PathBuf;
use std::process::ExitCode;

/// Userspace link emulator in virtual time (see docs/delay-node.md).
#[derive(Parser, Debug)]
#[command(name = "delay-node", version)]
struct Args {
    /// Topology file (JSON) written by the agent.
    #[arg(long)]
    topology: PathBuf,
    /// Control socket; bound last, so its existence means the node is ready.
    #[arg(long)]
    control: PathBuf,
    /// Start frozen from this state file; `thaw_at` resumes it.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Append JSON-line events (freeze, thaw, saved, port connected/disconnected/error).
    #[arg(long)]
    events: Option<PathBuf>,
    /// Log as JSON lines on stderr.
    #[arg(long)]
    log_json: bool,
    /// Spin this many µs before each release instead of sleeping (default 200).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Let the control socket's save, pcap and restore name files only in
    /// this directory or below (repeatable; the agent passes the
    /// experiment's directory). Without it, any path.
    #[arg(long = "confine", value_name = "DIR")]
    confine: Vec<PathBuf>,
}

fn main() -> ExitCode {
    // The control socket, state files and pcaps are the owner's only.
    stasis_core::private::restrict_umask();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delay-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let topo = Topology::load(&args.topology).map_err(|e| error_chain(&e))?;
    let state = match &args.restore {
        Some(p) => Some(NodeState::read_file(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    let mut node =
        Node::bind(&topo, &args.control, state.as_ref(), args.events.as_deref()).map_err(|e| error_chain(&e))?;
    if let Some(us) = args.spin_us {
        node.set_spin_ns(us * 1000);
    }
    if !args.confine.is_empty() {
        node.confine_paths(&args.confine).map_err(|e| error_chain(&e))?;
    }
    tracing::info!(control = %args.control.display(), ports = topo.ports.len(), restored = state.is_some(), "ready");
    node.run().map_err(|e| error_chain(&e))
}
