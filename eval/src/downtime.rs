//! Guest-visible downtime of live versus stop-and-copy checkpoints: one
//! 256 MiB guest (stream NIC, a probe and a light traffic generator), `n`
//! checkpoints of each kind taken alternately, and per checkpoint the VM's
//! downtime from QEMU's STOP to its RESUME event (host stamps), the whole
//! save time, and the largest clock step the guest's probe saw.

use crate::run::Experiment;
use crate::stats::{median, percentile};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// The experiment: one guest on a link to a second, small one (the delay
/// node needs a peer for the traffic).
pub fn spec(name: &str) -> String {
    format!(
        r#"
name = "{name}"
nic = "stream"
[[node]]
name = "a"
memory = "256M"
run = ["stasis-probe --node a", "sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --rate 20 --size 100"]
[[node]]
name = "b"
memory = "128M"
run = ["stasis-traffic recv --node b --port 5000"]
[[link]]
name = "l0"
a = "a"
b = "b"
delay = "5ms"
"#
    )
}

/// One checkpoint's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub live: bool,
    /// VM a's downtime (STOP → RESUME), ns.
    pub downtime_ns: u64,
    /// From the freeze instant to the state being durable, ns.
    pub save_ns: u64,
    pub bytes: u64,
}

/// The medians of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    pub n: usize,
    pub downtime_ms_p50: f64,
    pub downtime_ms_p90: f64,
    pub save_ms_p50: f64,
}

/// A kind's medians (None without samples).
pub fn summarise(samples: &[Sample], live: bool) -> Option<KindSummary> {
    let s: Vec<&Sample> = samples.iter().filter(|s| s.live == live).collect();
    let down: Vec<f64> = s.iter().map(|s| s.downtime_ns as f64 / 1e6).collect();
    let save: Vec<f64> = s.iter().map(|s| s.save_ns as f64 / 1e6).collect();
    Some(KindSummary {
        n: s.len(),
        downtime_ms_p50: median(&down)?,
        downtime_ms_p90: percentile(&down, 90.0)?,
        save_ms_p50: median(&save)?,
    })
}

fn sample(v: &serde_json::Value, live: bool) -> Option<Sample> {
    let downtime_ns = if live {
        v["downtime"].as_array()?.iter().find(|d| d["node"] == "a")?["downtime_ns"].as_u64()?
    } else {
        // Stop-and-copy: the VM is stopped for the common frozen duration D.
        v["frozen_duration_ns"].as_u64()?
    };
    Some(Sample { live, downtime_ns, save_ns: v["save_ns"].as_u64()?, bytes: v["bytes"].as_u64()? })
}

/// Run the benchmark: boot, `n` checkpoints of each kind, print and write figures.
pub fn run(bin: &Path, n: usize, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let name = "downtime";
    eprintln!("stasis-eval downtime: booting a 256 MiB guest (+ a 128 MiB peer)");
    let exp = Experiment::up(bin, name, &spec(name), &["a", "b"])?;
    if !exp.wait_for(Duration::from_secs(120), |l| l.iter().any(|l| l.node == "b" && l.v["role"] == "recv")) {
        anyhow::bail!("traffic did not start within 120 s");
    }
    let mut samples = Vec::new();
    for i in 0..n {
        for live in [false, true] {
            let mut args = vec!["checkpoint"];
            if live {
                args.push("--live");
            }
            let v = exp.json(&args)?;
            let s = sample(&v, live).ok_or_else(|| anyhow::anyhow!("unexpected checkpoint output: {v}"))?;
            eprintln!(
                "  {i}: {} downtime {:.1} ms, save {:.0} ms",
                if live { "live" } else { "stop-and-copy" },
                s.downtime_ns as f64 / 1e6,
                s.save_ns as f64 / 1e6
            );
            samples.push(s);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // What the guest saw: its probe's largest clock step over the whole run.
    let step_ms = exp
        .lines()
        .iter()
        .filter(|l| l.node == "a" && l.v["tool"] == "probe")
        .filter_map(|l| l.v["max_step_ns"]["mono"].as_i64())
        .max()
        .map(|s| s as f64 / 1e6);
    let stop = summarise(&samples, false).ok_or_else(|| anyhow::anyhow!("no samples"))?;
    let live = summarise(&samples, true).ok_or_else(|| anyhow::anyhow!("no samples"))?;
    let ratio = stop.downtime_ms_p50 / live.downtime_ms_p50.max(1e-3);
    println!("guest-visible downtime of VM a (256 MiB, TCG), {n} checkpoints of each kind:");
    println!(
        "  stop-and-copy  median {:>8.1} ms  p90 {:>8.1} ms  (save median {:.0} ms)",
        stop.downtime_ms_p50, stop.downtime_ms_p90, stop.save_ms_p50
    );
    println!(
        "  live           median {:>8.1} ms  p90 {:>8.1} ms  (save median {:.0} ms)",
        live.downtime_ms_p50, live.downtime_ms_p90, live.save_ms_p50
    );
    println!("  ratio          {ratio:.1}x shorter live");
    if let Some(s) = step_ms {
        println!("  largest monotonic-clock step the guest's probe saw over the run: {s:.1} ms");
    }
    let report = serde_json::json!({ "samples": samples, "stop_and_copy": stop, "live": live, "ratio": ratio, "probe_max_step_ms": step_ms });
    std::fs::write(out.join("downtime.json"), serde_json::to_vec_pretty(&report)?)?;
    eprintln!("raw figures in {}", out.join("downtime.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_kind() {
        let s = |live, ms: u64| Sample { live, downtime_ns: ms * 1_000_000, save_ns: 2 * ms * 1_000_000, bytes: 1 };
        let v = vec![s(false, 400), s(true, 10), s(false, 600), s(true, 30), s(false, 500), s(true, 20)];
        let stop = summarise(&v, false).unwrap();
        assert_eq!((stop.n, stop.downtime_ms_p50, stop.save_ms_p50), (3, 500.0, 1000.0));
        assert_eq!(summarise(&v, true).unwrap().downtime_ms_p50, 20.0);
        assert!(summarise(&[], true).is_none());
        let live_json = serde_json::json!({"downtime": [{"node": "a", "downtime_ns": 7}], "save_ns": 9, "bytes": 3});
        assert_eq!(sample(&live_json, true).unwrap().downtime_ns, 7);
        let stop_json = serde_json::json!({"frozen_duration_ns": 5, "save_ns": 9, "bytes": 3});
        assert_eq!(sample(&stop_json, false).unwrap().downtime_ns, 5);
    }
}
