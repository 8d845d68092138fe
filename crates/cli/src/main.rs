//! `stasis`: bring experiments up, checkpoint them, restore them.
//!
//! A thin binary: argument parsing, logging and the exit code here; one
//! file per subcommand under [`commands`], each calling a library
//! operation of `stasis-agent`.

use clap::Parser;
use std::io::IsTerminal;

mod commands;
mod context;
mod install;
mod multihost;
mod ui;

#[derive(Parser)]
#[command(name = "stasis", version, about = "Transparent, synchronised checkpoints of whole experiments")]
struct Cli {
    #[command(flatten)]
    global: context::Global,
    #[command(subcommand)]
    cmd: commands::Cmd,
}

fn main() -> std::process::ExitCode {
    stasis_core::private::restrict_umask();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,stasis_agent::supervise=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        let ctx = context::Ctx::new(cli.global)?;
        commands::exec(&ctx, &cli.cmd).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
