//! `stasis-agent`: the agent daemon of one host of a multi-host experiment
//! (see `stasis_agent::daemon` and docs/multihost.md).

use anyhow::{bail, Context, Result};
use clap::Parser;
use stasis_agent::daemon::{self, DaemonConfig, Faults, RealtimeClock};
use stasis_agent::host::Tools;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "stasis-agent", version, about = "The agent daemon of one stasis host")]
struct Args {
    /// The one address to serve (the spec's `[[host]] agent`); wildcards are refused
    #[arg(long)]
    listen: SocketAddr,
    /// File holding this host's key (`stasis --key-file MASTER key host NAME`;
    /// at least 32 bytes, readable by its owner only)
    #[arg(long)]
    key_file: PathBuf,
    /// Where this host keeps its VMs' run state and its parts of checkpoints
    #[arg(long)]
    state_dir: PathBuf,
    /// Fault drill: report every save as failed (after freezing)
    #[arg(long, hide = true)]
    fail_save: bool,
    /// Fault drill: wait this long between freezing and saving, ms
    #[arg(long, hide = true, default_value_t = 0)]
    save_delay_ms: u64,
    /// Synchronise this agent's clock with PTP on this interface (clock-sync,
    /// slave-only); without it the agent uses CLOCK_REALTIME
    #[arg(long)]
    ptp: Option<String>,
    /// With --ptp: injected offset of the clock's base, ns (tests)
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_ns: i64,
    /// With --ptp: injected drift of the clock's base, ppm (tests)
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    clock_drift_ppm: f64,
    /// Fault drill: read at each checkpoint; `fail` or `delay <ms>`
    #[arg(long, hide = true)]
    fault_file: Option<PathBuf>,
    /// A directory a spec's kernel and initrd may come from, besides the
    /// default guest's (repeatable); any other path is refused
    #[arg(long = "allow-files", value_name = "DIR")]
    allow_files: Vec<PathBuf>,
}

fn tools() -> Result<Tools> {
    let exe = std::env::current_exe().context("locating the stasis-agent binary")?;
    let bin_dir = exe.parent().context("binary has no directory")?.to_path_buf();
    let delay_node_bin =
        std::env::var_os("STASIS_DELAY_NODE").map(PathBuf::from).unwrap_or_else(|| bin_dir.join("delay-node"));
    let image =
        std::env::var_os("STASIS_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| bin_dir.join("..").join("guest"));
    let choice = stasis_qemu::accel::detect();
    if matches!(choice.accel, stasis_qemu::accel::Accel::Tcg) {
        tracing::warn!(reason = %choice.reason, "KVM not usable: running guests under TCG (software emulation, slower)");
    }
    Ok(Tools {
        delay_node_bin,
        default_kernel: image.join("vmlinuz"),
        default_initrd: image.join("initrd.img"),
        accel: choice.accel,
    })
}

async fn run(args: Args) -> Result<()> {
    let bytes = stasis_core::private::read_secret(&args.key_file).context("the key file")?;
    let key = match stasis_proto::Key::new(trim_newline(&bytes)) {
        Ok(k) => k,
        Err(e) => bail!("key file {}: {e}", args.key_file.display()),
    };
    let clock: Arc<dyn daemon::SyncClock> = match &args.ptp {
        Some(iface) => {
            let mut config = stasis_clock_sync::ServiceConfig::new(iface.clone());
            config.offset_ns = args.clock_offset_ns;
            config.drift_ppm = args.clock_drift_ppm;
            let service = stasis_clock_sync::start(config).await.with_context(|| format!("starting PTP on {iface}"))?;
            let task = service.task;
            tokio::spawn(async move {
                match task.await {
                    Ok(Ok(())) => tracing::error!("PTP service ended"),
                    Ok(Err(e)) => tracing::error!(error = %e, "PTP service failed: the clock runs free"),
                    Err(e) => tracing::error!(error = %e, "PTP service panicked: the clock runs free"),
                }
            });
            tracing::info!(%iface, offset_ns = args.clock_offset_ns, drift_ppm = args.clock_drift_ppm, "clock: PTP");
            Arc::new(daemon::PtpClock(service.clock))
        }
        None => Arc::new(RealtimeClock),
    };
    stasis_core::private::ensure_private_dir(&args.state_dir).context("the agent's state directory")?;
    let cfg = DaemonConfig {
        listen: args.listen,
        key,
        state_dir: args.state_dir,
        tools: tools()?,
        clock,
        agent: Default::default(),
        faults: Faults {
            fail_save: args.fail_save,
            save_delay: Duration::from_millis(args.save_delay_ms),
            file: args.fault_file,
        },
        sessions: Default::default(),
        file_roots: args.allow_files,
    };
    daemon::serve(cfg).await?;
    Ok(())
}

/// A key file written with `echo` ends in a newline that is not part of the key.
fn trim_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

fn main() -> std::process::ExitCode {
    stasis_core::private::restrict_umask();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
