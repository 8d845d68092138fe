//! `stasis-probe [--interval-ms 10] [--report-ms 1000] [--node NAME] [--kmod PATH]`:
//! samples the guest clocks and prints one JSON line per report window.
//! With `--kmod PATH` (normally `/proc/stasis_fw`, see guest-kmod/) each line
//! also carries the kernel module's counters as field `"kmod"` (`null` when
//! the file cannot be read).

use stasis_guest_tools::args::Flags;
use stasis_guest_tools::clocks::{boot_ns, default_node, mono_ns, real_ns, sleep_until, tsc};
use stasis_guest_tools::lines::probe_line;
use stasis_guest_tools::probe::{ProbeCore, Sample};

const USAGE: &str = "usage: stasis-probe [--interval-ms 10] [--report-ms 1000] [--node NAME] [--kmod /proc/stasis_fw]";

fn sample() -> Sample {
    let mono_ns = mono_ns();
    let real_ns = real_ns();
    let boot_ns = boot_ns();
    let tsc = tsc();
    Sample { mono_ns, real_ns, boot_ns, tsc }
}

fn main() {
    let parsed = Flags::parse(std::env::args().skip(1), &["--interval-ms", "--report-ms", "--node", "--kmod"])
        .and_then(|f| {
            Ok((
                f.get::<u64>("--interval-ms", 10)?,
                f.get::<u64>("--report-ms", 1000)?,
                f.opt::<String>("--node")?,
                f.opt::<String>("--kmod")?,
            ))
        });
    let (interval_ms, report_ms, node, kmod) = match parsed {
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
                let line = probe_line(&node, interval_ns, &r);
                match &kmod {
                    Some(path) => {
                        let counters = std::fs::read_to_string(path).ok();
                        line.raw_object("kmod", counters.as_deref()).emit();
                    }
                    None => line.emit(),
                }
            }
            next_report += report_ns;
            if s.mono_ns >= next_report {
                next_report = s.mono_ns + report_ns;
            }
        }
    }
}
