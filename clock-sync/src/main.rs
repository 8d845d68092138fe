//! `clock-sync`: one PTP node with a synchronised overlay clock; prints metrics.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use stasis_clock_sync::{start, ServiceConfig};

/// Run a PTP node (statime, software timestamps) whose synchronised clock is an
/// overlay over the host clock with an injected offset and drift. The system
/// clock is never changed.
#[derive(Parser, Debug)]
#[command(name = "clock-sync", version)]
struct Args {
    /// Network interface for PTP (UDP/IPv4 multicast, ports 319/320).
    #[arg(long)]
    iface: String,
    /// Act as grandmaster (otherwise slave-only).
    #[arg(long)]
    gm: bool,
    /// Injected base-clock offset in nanoseconds.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    offset_ns: i64,
    /// Injected base-clock drift in ppm.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    drift_ppm: f64,
    /// Metrics period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    metrics_ms: u64,
    /// Print metrics as JSON lines (otherwise a short human line).
    #[arg(long)]
    json: bool,
    /// PTP domain.
    #[arg(long, default_value_t = 0)]
    domain: u8,
    /// log2 of the sync and delay-request intervals in seconds (-4 = 16 per second).
    #[arg(long, default_value_t = -4, allow_hyphen_values = true)]
    log_sync_interval: i8,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("clock-sync: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let mut config = ServiceConfig::new(args.iface.clone());
        config.grandmaster = args.gm;
        config.offset_ns = args.offset_ns;
        config.drift_ppm = args.drift_ppm;
        config.domain = args.domain;
        config.log_sync_interval = args.log_sync_interval;
        let service = start(config).await?;
        let mut task = service.task;
        let mut tick = tokio::time::interval(Duration::from_millis(args.metrics_ms.max(1)));
        let mut last_state = None;
        loop {
            tokio::select! {
                r = &mut task => {
                    r.context("PTP task panicked")??;
                    anyhow::bail!("PTP task ended");
                }
                _ = tick.tick() => {
                    let m = service.clock.metrics();
                    if last_state != Some(m.state) {
                        last_state = Some(m.state);
                        let event = serde_json::json!({
                            "event": "clock_state", "mono_ns": m.mono_ns, "state": m.state,
                            "true_error_ns": m.true_error_ns,
                        });
                        if args.json {
                            println!("{event}");
                        } else {
                            eprintln!("state -> {:?}", m.state);
                        }
                    }
                    if args.json {
                        println!("{}", m.to_json_line());
                    } else {
                        println!(
                            "state={:?} true_error_ns={:.0} offset_estimate_ns={} path_delay_ns={}",
                            m.state,
                            m.true_error_ns.unwrap_or(f64::NAN),
                            m.offset_estimate_ns.map_or("-".into(), |v| format!("{v:.0}")),
                            m.path_delay_ns.map_or("-".into(), |v| format!("{v:.0}")),
                        );
                    }
                }
            }
        }
    })
}
