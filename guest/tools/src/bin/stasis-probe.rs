//! `stasis-probe [--interval-ms 10] [--report-ms 1000] [--node NAME]`:
//! samples the guest clocks and prints one JSON line per report window.

use stasis_guest_tools::args::Flags;
use stasis_guest_tools::clocks::{boot_ns, default_node, mono_ns, real_ns, sleep_until, tsc};
use stasis_guest_tools::json::JsonLine;
use stasis_guest_tools::probe::{ProbeCore, Sample, WindowReport};

const USAGE: &str = "usage: stasis-probe [--interval-ms 10] [--report-ms 1000] [--node NAME]";

fn sample() -> Sample {
    let mono_ns = mono_ns();
    let real_ns = real_ns();
    let boot_ns = boot_ns();
    let tsc = tsc();
    Sample { mono_ns, real_ns, boot_ns, tsc }
}

fn report_line(node: &str, interval_ns: u64, r: &WindowReport) -> JsonLine {
    let step = r.max_step;
    let dis = r.max_disagree;
    JsonLine::new()
        .str("tool", "probe")
        .str("node", node)
        .u64("window", r.window)
        .u64("mono_ns", r.last.mono_ns)
        .u64("real_ns", r.last.real_ns)
        .u64("boot_ns", r.last.boot_ns)
        .u64("tsc", r.last.tsc)
        .u64("samples", r.samples)
        .u64("interval_ns", interval_ns)
        .object(
            "max_step_ns",
            JsonLine::new()
                .opt_i64("mono", step.map(|s| s.mono))
                .opt_i64("real", step.map(|s| s.real))
                .opt_i64("boot", step.map(|s| s.boot))
                .opt_i64("tsc", step.map(|s| s.tsc)),
        )
        .object(
            "max_disagree_ns",
            JsonLine::new()
                .opt_u64("real_mono", dis.map(|d| d.real_mono))
                .opt_u64("boot_mono", dis.map(|d| d.boot_mono))
                .opt_u64("tsc_mono", dis.map(|d| d.tsc_mono)),
        )
}

fn main() {
    let parsed = Flags::parse(std::env::args().skip(1), &["--interval-ms", "--report-ms", "--node"]).and_then(|f| {
        Ok((f.get::<u64>("--interval-ms", 10)?, f.get::<u64>("--report-ms", 1000)?, f.opt::<String>("--node")?))
    });
    let (interval_ms, report_ms, node) = match parsed {
        Ok(v) if v.0 > 0 && v.1 > 0 => v,
        Ok(_) => {
            eprintln!("stasis-probe: intervals must be > 0\n{USAGE}");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("stasis-probe: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let node = node.unwrap_or_else(default_node);
    let interval_ns = interval_ms * 1_000_000;
    let report_ns = report_ms * 1_000_000;

    let mut core = ProbeCore::new(interval_ns);
    let first = sample();
    core.push(first);
    let mut next_sample = first.mono_ns + interval_ns;
    let mut next_report = first.mono_ns + report_ns;
    loop {
        sleep_until(next_sample);
        let s = sample();
        core.push(s);
        // Absolute schedule; after a long stall restart it rather than
        // firing the missed samples back to back (which would hide the stall).
        next_sample += interval_ns;
        if s.mono_ns >= next_sample {
            next_sample = s.mono_ns + interval_ns;
        }
        if s.mono_ns >= next_report {
            if let Some(r) = core.close_window() {
                report_line(&node, interval_ns, &r).emit();
            }
            next_report += report_ns;
            if s.mono_ns >= next_report {
                next_report = s.mono_ns + report_ns;
            }
        }
    }
}
