//! `vhost-bridge --a A.sock --b B.sock`: two vhost-user-net backends joined
//! back to back. Point two QEMUs at the sockets
//! (`-chardev socket,id=c0,path=A.sock -netdev vhost-user,id=n0,chardev=c0`).
//! Prints one JSON line per device event (started, stopped, disconnected) and
//! a stats line every `--stats-ms`; runs until killed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use stasis_core::clock::mono_ns;
use stasis_vhost_user::{Bridge, PortEvent};

#[derive(Parser)]
#[command(about = "Join two VM NICs through two vhost-user-net backends")]
struct Args {
    /// Socket of side A (created; an existing file is replaced).
    #[arg(long)]
    a: PathBuf,
    /// Socket of side B.
    #[arg(long)]
    b: PathBuf,
    /// Interval of the stats lines (0: none).
    #[arg(long, default_value_t = 0)]
    stats_ms: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let bridge = match Bridge::new(&args.a, &args.b, |side, ev| {
        let now = mono_ns();
        let line = match ev {
            PortEvent::Started => format!(r#"{{"event":"started","port":"{}","mono_ns":{now}}}"#, side.name()),
            PortEvent::Stopped { at } => {
                format!(r#"{{"event":"stopped","port":"{}","at":{at},"mono_ns":{now}}}"#, side.name())
            }
            PortEvent::Disconnected => {
                format!(r#"{{"event":"disconnected","port":"{}","mono_ns":{now}}}"#, side.name())
            }
            PortEvent::RxReady | PortEvent::Frame(_) => return,
        };
        println!("{line}");
    }) {
        Ok(b) => b,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            eprintln!("vhost-bridge: {msg}");
            return ExitCode::FAILURE;
        }
    };
    println!(r#"{{"event":"listening","a":{:?},"b":{:?}}}"#, args.a, args.b);
    loop {
        std::thread::sleep(Duration::from_millis(if args.stats_ms == 0 { 3_600_000 } else { args.stats_ms }));
        if args.stats_ms > 0 {
            let s = bridge.stats();
            let (pa, pb) =
                (bridge.port(stasis_vhost_user::Side::A).stats(), bridge.port(stasis_vhost_user::Side::B).stats());
            println!(
                r#"{{"event":"stats","mono_ns":{},"a_tx":{},"b_tx":{},"to_a":{},"to_b":{},"dropped_a":{},"dropped_b":{},"deferred_a":{},"deferred_b":{}}}"#,
                mono_ns(),
                pa.tx_frames,
                pb.tx_frames,
                s.delivered[0].load(Ordering::Relaxed),
                s.delivered[1].load(Ordering::Relaxed),
                s.dropped[0].load(Ordering::Relaxed),
                s.dropped[1].load(Ordering::Relaxed),
                s.deferred[0].load(Ordering::Relaxed),
                s.deferred[1].load(Ordering::Relaxed),
            );
        }
    }
}
