//! `stasis-eval`: evaluations of stasis on real VMs.
//!
//! `stasis-eval time [--pauses 1,10,60] [--checkpoints-per-pause N] [--out DIR] [--quick]`
//! `stasis-eval iperf [--runs N] [--duration S] [--quick] [--out DIR] [--replot]`
//! `stasis-eval cpu [--runs N] [--pre S] [--post S] [--quick] [--out DIR] [--replot]`
//! `stasis-eval bt [--runs N] [--quick] [--out DIR] [--replot]`
//! `stasis-eval skew [--checkpoints 50] [--out DIR] [--quick] [--no-rt] [--rt-qemu] [--qemu-nice -20] [--spin-us 300] [--stagger-us 0]`
//! `stasis-eval store [--cache DIR] [--out DIR] [--capture-only]`
//! `stasis-eval downtime [--n 5] [--out DIR]`

mod bt_cmd;
mod cpu_cmd;
mod iperf_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use stasis_core::clock::mono_ns;
use stasis_eval::plot::{line_plot, Axes, Series};
use stasis_eval::run::{Experiment, Line};
use stasis_eval::time::{
    analyse, host_frozen, spec, steady, summarise, table, CheckpointRecord, Summary, Windows, CLOCKS, NODES,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "stasis-eval", about = "Evaluations of stasis on real VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Clock steps, inter-VM skew and CPU allocation across checkpoints with pauses
    Time {
        /// Pauses, seconds
        #[arg(long, value_delimiter = ',', default_value = "1,10,60")]
        pauses: Vec<u64>,
        #[arg(long, default_value_t = 3)]
        checkpoints_per_pause: usize,
        /// Output directory (raw data, report, plots)
        #[arg(long, default_value = "eval-out/time")]
        out: PathBuf,
        /// 1 s pauses only, 2 checkpoints, short windows (a system test)
        #[arg(long)]
        quick: bool,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
        /// Run nothing: redraw the PNGs of --out from its time-eval.json and console-lines.jsonl
        #[arg(long)]
        replot: bool,
    },
    /// iperf3 transparency: throughput with and without checkpoints, and a non-transparent control arm
    Iperf {
        /// Runs per arm
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Length of one iperf3 test, guest seconds
        #[arg(long, default_value_t = 40)]
        duration: u64,
        /// Events (checkpoints / network freezes) per run, evenly spaced
        #[arg(long, default_value_t = 2)]
        events: usize,
        /// Link bandwidth (spec syntax)
        #[arg(long, default_value = "10Mb")]
        bandwidth: String,
        /// Link one-way delay (spec syntax)
        #[arg(long, default_value = "10ms")]
        delay: String,
        /// The control arm's network freeze, ms
        #[arg(long, default_value_t = 2000)]
        freeze_ms: u64,
        /// Pause between tests, s (must cover a checkpoint's commit)
        #[arg(long, default_value_t = 5)]
        gap: u64,
        /// TOST margin on whole-run mean throughput (relative)
        #[arg(long, default_value_t = 0.02)]
        margin: f64,
        /// TOST margin on throughput in the windows after events (relative)
        #[arg(long, default_value_t = 0.05)]
        window_margin: f64,
        /// Arms besides the baseline `none` [default: all available: control, ckpt, live if `stasis checkpoint --live` exists]
        #[arg(long, value_delimiter = ',')]
        arms: Option<Vec<String>>,
        /// 1 run per arm of 14 s with one event (a system test)
        #[arg(long)]
        quick: bool,
        /// Output directory (raw data, report, plots)
        #[arg(long, default_value = "eval-out/iperf")]
        out: PathBuf,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
        /// Run nothing: recompute the summary, report and PNGs of --out from its iperf-eval.json
        #[arg(long)]
        replot: bool,
    },
    /// CPU allocation: each guest's work per guest second before and after checkpoints, and a non-transparent control
    Cpu {
        /// Runs per arm (one event each)
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Window before each event, guest seconds
        #[arg(long, default_value_t = 10.0)]
        pre: f64,
        /// Window after each event, guest seconds
        #[arg(long, default_value_t = 10.0)]
        post: f64,
        /// Time between one run's post window and the next run's pre window, s
        #[arg(long, default_value_t = 2.0)]
        gap: f64,
        /// The control arm: how long the host stops both QEMUs after its event, ms
        #[arg(long, default_value_t = 1000)]
        throttle_ms: u64,
        /// Equivalence margin, relative
        #[arg(long, default_value_t = 0.02)]
        margin: f64,
        /// Arms, comma-separated: control, ckpt, live [default: all the binary offers]
        #[arg(long, value_delimiter = ',')]
        arms: Option<Vec<String>>,
        /// Leave the QEMUs unpinned (default: each VM's threads on its own host CPU)
        #[arg(long)]
        no_pin: bool,
        /// 1 run per arm, 4 s windows (a system test)
        #[arg(long)]
        quick: bool,
        /// Output directory (raw data, report, plot)
        #[arg(long, default_value = "eval-out/cpu")]
        out: PathBuf,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
        /// Run nothing: redo the analysis, plot and report of --out from its cpu-eval.json and console-lines.jsonl
        #[arg(long)]
        replot: bool,
    },
    /// BitTorrent transparency: swarm completion with/without checkpoints, and a non-transparent control
    Bt {
        /// Runs per arm
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// 1 run per arm, 2 leechers, 4 MiB payload, one disturbance (a system test)
        #[arg(long)]
        quick: bool,
        /// Output directory (raw data, report, plots)
        #[arg(long, default_value = "eval-out/bt")]
        out: PathBuf,
        /// Per-LAN-member bandwidth [default: 4Mb]
        #[arg(long)]
        bandwidth: Option<String>,
        /// Arms, comma-separated: none, ckpt, control [default: all; --quick: none,control]
        #[arg(long, value_delimiter = ',')]
        arms: Vec<String>,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
        /// Run nothing: redo the analysis, plots and report of --out from its bt-eval.json
        #[arg(long)]
        replot: bool,
    },
    /// Freeze-instant skew across VMs on 3 PTP-synced agents (network namespaces; needs root)
    Skew {
        /// Checkpoints (rounds of the real protocol)
        #[arg(long, default_value_t = 50)]
        checkpoints: u64,
        /// Output directory (skew.json: clocks, rounds, every stop, the distributions)
        #[arg(long, default_value = "eval-out/skew")]
        out: PathBuf,
        /// 10 checkpoints and a 3 s steady-clock window (a test of the pipeline)
        #[arg(long)]
        quick: bool,
        /// Leave the actuation under SCHED_OTHER (default: SCHED_FIFO 1 from Prepare to the stop)
        #[arg(long)]
        no_rt: bool,
        /// Also run QEMU's main and monitor I/O threads at SCHED_FIFO 1
        #[arg(long)]
        rt_qemu: bool,
        /// Otherwise, the nice value of all its threads (0 leaves them alone)
        #[arg(long, default_value_t = -20, allow_hyphen_values = true)]
        qemu_nice: i32,
        /// Spun part of each wait, µs
        #[arg(long, default_value_t = 300)]
        spin_us: u64,
        /// Agent i acts at T + i × this many µs, taken out in the analysis: keeps the
        /// agents from competing for this host's cores at T (as separate hosts would not)
        #[arg(long, default_value_t = 0)]
        stagger_us: u64,
    },
    /// Checkpoint store: dedup of 10 idle checkpoints and of 4 identical
    /// guests, commit/restore throughput vs the raw disk (real VM state)
    Store {
        /// Where the captured VM state streams are kept for reuse
        #[arg(long, default_value = "target/store-bench")]
        cache: PathBuf,
        /// Output directory (store-eval.json, report.md)
        #[arg(long, default_value = "eval-out/store")]
        out: PathBuf,
        /// Seconds between the idle guest's checkpoints (capture only)
        #[arg(long, default_value_t = 5.0)]
        interval: f64,
        /// Capture the streams (if not cached) and stop
        #[arg(long)]
        capture_only: bool,
        /// Extra guest kernel arguments for the capture (e.g. "nokaslr")
        #[arg(long, default_value = "")]
        kernel_args: String,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
    },
    /// Guest-visible downtime of live vs stop-and-copy checkpoints (one 256 MiB guest)
    Downtime {
        /// Checkpoints of each kind
        #[arg(long, default_value_t = 5)]
        n: usize,
        #[arg(long, default_value = "eval-out/downtime")]
        out: PathBuf,
        /// The stasis binary [default: target/debug/stasis next to this one]
        #[arg(long)]
        stasis: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,statime=warn".into()),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Bt { replot: true, out, .. } => bt_cmd::replot(&out),
        Cmd::Bt { runs, quick, out, bandwidth, arms, stasis, .. } => {
            let mut cfg = bt_cmd::Config::new(runs, quick);
            if let Some(b) = bandwidth {
                cfg.bandwidth = b;
            }
            if !arms.is_empty() {
                cfg.arms = arms.iter().map(|a| bt_cmd::parse_arm(a)).collect::<Result<_>>()?;
            }
            bt_cmd::campaign(&bt_cmd::stasis_bin(stasis)?, &cfg, &out)
        }
        Cmd::Skew { checkpoints, out, quick, no_rt, rt_qemu, qemu_nice, spin_us, stagger_us } => {
            use stasis_eval::skew::bench::{run, SkewConfig};
            let mut cfg =
                if quick { SkewConfig::quick(out) } else { SkewConfig { checkpoints, ..SkewConfig::full(out) } };
            cfg.checkpoints = cfg.checkpoints.max(1);
            cfg.realtime = !no_rt;
            cfg.qemu_realtime = rt_qemu;
            cfg.qemu_nice = qemu_nice;
            cfg.spin_ns = spin_us * 1000;
            cfg.stagger_ns = stagger_us * 1000;
            let report = run(&cfg)?;
            println!("{}", report.table());
            println!("raw data: {}", cfg.out.join("skew.json").display());
            Ok(())
        }
        Cmd::Time { replot: true, out, .. } => replot(&out),
        Cmd::Time { mut pauses, mut checkpoints_per_pause, out, quick, stasis, .. } => {
            if quick {
                pauses = vec![1];
                checkpoints_per_pause = 2;
            }
            let bin = match stasis {
                Some(b) => b,
                None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
            };
            if !bin.exists() {
                bail!("{} is missing: cargo build --bins", bin.display());
            }
            time_eval(&bin, &pauses, checkpoints_per_pause.max(1), &out, quick)
        }
        Cmd::Cpu { runs, pre, post, gap, throttle_ms, margin, arms, no_pin, quick, out, stasis, replot } => {
            cpu_cmd::main(cpu_cmd::Options {
                runs,
                pre,
                post,
                gap,
                throttle_ms,
                margin,
                arms,
                no_pin,
                quick,
                out,
                stasis,
                replot,
            })
        }
        Cmd::Iperf {
            runs,
            duration,
            events,
            bandwidth,
            delay,
            freeze_ms,
            gap,
            margin,
            window_margin,
            arms,
            quick,
            out,
            stasis,
            replot,
        } => iperf_cmd::main(iperf_cmd::Options {
            runs,
            duration,
            events,
            bandwidth,
            delay,
            freeze_ms,
            gap,
            margin,
            window_margin,
            arms,
            quick,
            out,
            stasis,
            replot,
        }),
        Cmd::Downtime { n, out, stasis } => {
            let bin = match stasis {
                Some(b) => b,
                None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
            };
            if !bin.exists() {
                bail!("{} is missing: cargo build --bins", bin.display());
            }
            stasis_eval::downtime::run(&bin, n.max(1), &out)
        }
        Cmd::Store { cache, out, interval, capture_only, kernel_args, stasis } => {
            let bin = match stasis {
                Some(b) => b,
                None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
            };
            store_eval(&bin, &cache, &out, &kernel_args, secs(interval), capture_only)
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn time_eval(bin: &Path, pauses: &[u64], per_pause: usize, out: &Path, quick: bool) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let (steady_s, gap_s) = if quick { (5.0, 6.0) } else { (20.0, 8.0) };
    let w = Windows::default();
    let name = "timeeval";
    let t0 = mono_ns();
    eprintln!("stasis-eval time: pauses {pauses:?} s × {per_pause} checkpoints; booting 2 VMs");
    let exp = Experiment::up(bin, name, &spec(name), &NODES)?;
    let ready = exp.wait_for(secs(120.0), |l| {
        l.iter().filter(|x| x.v["tool"] == "clockx").count() >= 10
            && NODES.iter().all(|n| l.iter().any(|x| x.node == *n && x.v["tool"] == "kmodw"))
    });
    if !ready {
        bail!("the guests' workloads did not report within 120 s (clockx from b, kmodw from both)");
    }
    let steady_from = mono_ns();
    std::thread::sleep(secs(steady_s));
    let steady_to = mono_ns();
    let mut spans = Vec::new();
    for &p in pauses {
        for i in 1..=per_pause {
            eprintln!("checkpoint {i}/{per_pause} with a {p} s pause");
            let start = mono_ns();
            let ck = exp.json(&["checkpoint", "--pause-ms", &(p * 1000).to_string()])?;
            let end = mono_ns();
            let id = ck["info"]["id"].as_str().unwrap_or("latest").to_string();
            let show = exp.json(&["show", &id]).unwrap_or_default();
            spans.push((p, i, start, end, ck, show));
            std::thread::sleep(secs(gap_s));
        }
    }
    let lines = exp.lines();
    drop(exp); // tear down before the analysis
    let st = steady(&lines, steady_from, steady_to);
    let recs: Vec<CheckpointRecord> = spans
        .into_iter()
        .map(|(pause_s, index, s, e, checkpoint, show)| {
            let (nodes, theta) = analyse(&lines, s, e, &w);
            let (host_frozen_ns, predicted_dtheta_ns) = host_frozen(&show);
            CheckpointRecord {
                pause_s,
                index,
                host_start_ns: s,
                host_end_ns: e,
                checkpoint,
                nodes,
                theta,
                host_frozen_ns,
                predicted_dtheta_ns,
            }
        })
        .collect();
    let sums: Vec<Summary> =
        pauses.iter().map(|&p| summarise(p, &recs.iter().filter(|r| r.pause_s == p).collect::<Vec<_>>())).collect();

    let raw = serde_json::json!({
        "eval": "time", "quick": quick, "pauses_s": pauses, "checkpoints_per_pause": per_pause,
        "windows": w, "steady": st, "checkpoints": recs, "summary": sums,
        "spec": spec(name), "wall_s": (mono_ns() - t0) as f64 / 1e9,
    });
    std::fs::write(out.join("time-eval.json"), serde_json::to_string_pretty(&raw)?)?;
    write_csv(&out.join("time-eval.csv"), &recs)?;
    write_lines(&out.join("console-lines.jsonl"), &lines)?;
    let spans: Vec<Span> = recs
        .iter()
        .map(|r| Span {
            pause_s: r.pause_s,
            start: r.host_start_ns,
            end: r.host_end_ns,
            theta_base: r.theta.before_median_ns,
        })
        .collect();
    let plots = plots(out, &lines, &spans, pauses)?;
    let tbl = table(&sums);
    let report = report_md(&tbl, &st, &recs, &plots, pauses, per_pause, quick);
    std::fs::write(out.join("report.md"), &report)?;
    println!("{tbl}");
    println!(
        "steady state: θ IQR {:.1} µs (min-δ quarter {:.1} µs) over {} exchanges (median δ {:.1} µs); per-second kmod step p50/p99 (ms): {}",
        st.theta_iqr_ns.unwrap_or(f64::NAN) / 1e3,
        st.theta_fast_iqr_ns.unwrap_or(f64::NAN) / 1e3,
        st.theta_n,
        st.delay_median_ns.unwrap_or(f64::NAN) / 1e3,
        CLOCKS.iter().enumerate().map(|(i, c)| format!("{c} {}/{}", stasis_eval::time::ms(st.kmod_step_p50_ns[i].1), stasis_eval::time::ms(st.kmod_step_p99_ns[i].1))).collect::<Vec<_>>().join(", ")
    );
    println!("raw data and report in {}", out.display());
    Ok(())
}

fn write_csv(path: &Path, recs: &[CheckpointRecord]) -> Result<()> {
    let mut s = String::from("pause_s,index,node,frozen_ns,kmod_windows");
    for c in CLOCKS {
        s.push_str(&format!(",kmod_step_{c}_ns"));
    }
    for c in CLOCKS {
        s.push_str(&format!(",probe_step_{c}_ns"));
    }
    s.push_str(",dtheta_ns,dtheta_fast_ns,theta_iqr_before_ns,work_before,work_after,work_ratio\n");
    let o = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    for r in recs {
        for n in &r.nodes {
            s.push_str(&format!(
                "{},{},{},{},{}",
                r.pause_s, r.index, n.node, r.checkpoint["frozen_duration_ns"], n.kmod_windows
            ));
            for c in CLOCKS {
                s.push_str(&format!(",{}", o(n.kmod_step_ns.get(c).map(|v| v as f64))));
            }
            for c in CLOCKS {
                s.push_str(&format!(",{}", o(n.probe_step_ns.get(c).map(|v| v as f64))));
            }
            s.push_str(&format!(
                ",{},{},{},{},{},{}\n",
                o(r.theta.delta_ns),
                o(r.theta.delta_fast_ns),
                o(r.theta.iqr_before_ns),
                o(n.work_before),
                o(n.work_after),
                o(n.work_ratio)
            ));
        }
    }
    std::fs::write(path, s)?;
    Ok(())
}

fn write_lines(path: &Path, lines: &[Line]) -> Result<()> {
    let mut s = String::new();
    for l in lines {
        s.push_str(&serde_json::json!({"host_ns": l.host_ns, "node": l.node, "line": l.v}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s)?;
    Ok(())
}

/// What a plot needs of a checkpoint.
struct Span {
    pause_s: u64,
    start: u64,
    end: u64,
    theta_base: Option<f64>,
}

fn replot(out: &Path) -> Result<()> {
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("time-eval.json"))?)?;
    let spans: Vec<Span> = raw["checkpoints"]
        .as_array()
        .context("no checkpoints")?
        .iter()
        .map(|r| Span {
            pause_s: r["pause_s"].as_u64().unwrap_or(0),
            start: r["host_start_ns"].as_u64().unwrap_or(0),
            end: r["host_end_ns"].as_u64().unwrap_or(0),
            theta_base: r["theta"]["before_median_ns"].as_f64(),
        })
        .collect();
    let pauses: Vec<u64> = raw["pauses_s"].as_array().context("pauses")?.iter().filter_map(|p| p.as_u64()).collect();
    let lines: Vec<Line> = std::fs::read_to_string(out.join("console-lines.jsonl"))?
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(Line { host_ns: v["host_ns"].as_u64()?, node: v["node"].as_str()?.to_string(), v: v["line"].clone() })
        })
        .collect();
    for p in plots(out, &lines, &spans, &pauses)? {
        println!("{}: {}", p.file, p.caption);
    }
    Ok(())
}

struct Plot {
    file: String,
    caption: String,
}

/// Per pause, around its first checkpoint: node a's clocks minus host time,
/// θ minus its median before, and the work rate of both nodes.
fn plots(out: &Path, lines: &[Line], recs: &[Span], pauses: &[u64]) -> Result<Vec<Plot>> {
    let mut v = Vec::new();
    for &p in pauses {
        let Some(r) = recs.iter().find(|r| r.pause_s == p) else { continue };
        let (from, to) = (r.start.saturating_sub(5_000_000_000), r.end + 5_000_000_000);
        let hs = |ns: u64| (ns as f64 - r.start as f64) / 1e9;
        let near: Vec<&Line> = lines.iter().filter(|l| l.host_ns >= from && l.host_ns <= to).collect();
        let marks = [0.0, hs(r.end)];
        let caption = |a: &Axes, what: &str, unit: &str| {
            format!(
                "{what}. x: host time from the start of the checkpoint command, s ({:.1} … {:.1}, grid every {} s; black lines: command start and return); y: {unit} ({:.3} … {:.3}, grid every {}).",
                a.x.0, a.x.1, a.x_step, a.y.0, a.y.1, a.y_step
            )
        };
        // Guest clocks (probe lines of node a) minus host time, relative to the first line.
        let probe: Vec<&&Line> = near.iter().filter(|l| l.node == "a" && l.v["tool"] == "probe").collect();
        if let Some(first) = probe.first() {
            let mut series = Vec::new();
            for (key, color) in [("mono_ns", (200, 0, 0)), ("real_ns", (0, 120, 0)), ("boot_ns", (0, 0, 200))] {
                let g0 = first.v[key].as_f64().unwrap_or(0.0);
                let pts = probe
                    .iter()
                    .filter_map(|l| {
                        let g = l.v[key].as_f64()? - g0;
                        let h = (l.host_ns - first.host_ns) as f64;
                        Some((hs(l.host_ns), (g - h) / 1e9))
                    })
                    .collect();
                series.push(Series { points: pts, color });
            }
            let file = format!("clocks-{p}s.png");
            if let Ok(a) = line_plot(&out.join(&file), &series, &marks) {
                v.push(Plot { file, caption: caption(&a, &format!("Pause {p} s: node a's CLOCK_MONOTONIC (red), REALTIME (green), BOOTTIME (blue) minus host time, from the probe's 500 ms reports, timed by their arrival on the host (±10 ms poll); the step of −{p} s is the pause the guest does not see, and the lines lie on each other: no guest clock disagrees with another"), "guest clock − host time, s") });
            }
        }
        let base = r.theta_base.unwrap_or(0.0);
        let th: Vec<(f64, f64)> = near
            .iter()
            .filter(|l| l.node == "b" && l.v["tool"] == "clockx")
            .filter_map(|l| Some((hs(l.host_ns), (l.v["theta_ns"].as_f64()? - base) / 1e3)))
            .collect();
        let file = format!("theta-{p}s.png");
        if let Ok(a) = line_plot(&out.join(&file), &[Series { points: th, color: (120, 0, 160) }], &marks) {
            v.push(Plot { file, caption: caption(&a, &format!("Pause {p} s: inter-VM offset θ (b's exchanges with a, every 100 ms) minus its median in the 3 s before"), "θ − θ_before, µs") });
        }
        let mut series = Vec::new();
        for (n, color) in [("a", (200, 0, 0)), ("b", (0, 0, 200))] {
            let pts = near
                .iter()
                .filter(|l| l.node == n && l.v["tool"] == "work")
                .filter_map(|l| Some((hs(l.host_ns), l.v["iters"].as_f64()? / (l.v["len_ns"].as_f64()? / 1e6))))
                .collect();
            series.push(Series { points: pts, color });
        }
        let file = format!("work-{p}s.png");
        if let Ok(a) = line_plot(&out.join(&file), &series, &marks) {
            v.push(Plot {
                file,
                caption: caption(
                    &a,
                    &format!("Pause {p} s: busy-loop iterations per guest ms, node a (red), b (blue), 100 ms windows"),
                    "iterations / guest ms",
                ),
            });
        }
    }
    Ok(v)
}

fn report_md(
    tbl: &str,
    st: &stasis_eval::time::Steady,
    recs: &[CheckpointRecord],
    plots: &[Plot],
    pauses: &[u64],
    per_pause: usize,
    quick: bool,
) -> String {
    use stasis_eval::time::ms;
    let mut s = format!(
        "# Time eval\n\n`stasis-eval time --pauses {} --checkpoints-per-pause {per_pause}{}`: 2 TCG VMs (a, b) on one 0 ms link; per pause, {per_pause} checkpoints with `stasis checkpoint --pause-ms`.\n\n",
        pauses.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
        if quick { " --quick" } else { "" }
    );
    s.push_str("## Summary (per pause, over checkpoints × nodes)\n\n");
    s.push_str(tbl);
    s.push_str(&format!(
        "\nSteady state before the first checkpoint: θ IQR {:.1} µs (min-δ quarter: {:.1} µs) over {} exchanges, median round trip δ {:.1} µs; per-second guest-kmod step p50/p99: {}; work rate p5/p50/p95 (iterations/ms): {}.\n\n",
        st.theta_iqr_ns.unwrap_or(f64::NAN) / 1e3,
        st.theta_fast_iqr_ns.unwrap_or(f64::NAN) / 1e3,
        st.theta_n,
        st.delay_median_ns.unwrap_or(f64::NAN) / 1e3,
        CLOCKS.iter().enumerate().map(|(i, c)| format!("{c} {}/{} ms", ms(st.kmod_step_p50_ns[i].1), ms(st.kmod_step_p99_ns[i].1))).collect::<Vec<_>>().join(", "),
        st.work_rate.iter().map(|(n, r)| format!("{n} {}", r.iter().map(|x| x.map(|v| format!("{v:.0}")).unwrap_or("-".into())).collect::<Vec<_>>().join("/"))).collect::<Vec<_>>().join(", ")
    ));
    s.push_str("## Per checkpoint\n\n| pause | # | frozen ms | node | kmod step ms mono/real/boot/tsc | probe step ms mono | Δθ µs | min-δ Δθ µs | host-predicted Δθ µs | θ IQR before µs | work before → after (ratio) |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in recs {
        for n in &r.nodes {
            s.push_str(&format!(
                "| {} s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} → {} ({}) |\n",
                r.pause_s,
                r.index,
                ms(r.checkpoint["frozen_duration_ns"].as_f64()),
                n.node,
                CLOCKS.iter().map(|c| ms(n.kmod_step_ns.get(c).map(|v| v as f64))).collect::<Vec<_>>().join(" / "),
                ms(n.probe_step_ns.mono.map(|v| v as f64)),
                r.theta.delta_ns.map(|x| format!("{:.1}", x / 1e3)).unwrap_or("-".into()),
                r.theta.delta_fast_ns.map(|x| format!("{:.1}", x / 1e3)).unwrap_or("-".into()),
                r.predicted_dtheta_ns.map(|x| format!("{:.1}", x / 1e3)).unwrap_or("-".into()),
                r.theta.iqr_before_ns.map(|x| format!("{:.1}", x / 1e3)).unwrap_or("-".into()),
                n.work_before.map(|x| format!("{x:.0}")).unwrap_or("-".into()),
                n.work_after.map(|x| format!("{x:.0}")).unwrap_or("-".into()),
                n.work_ratio.map(|x| format!("{x:.3}")).unwrap_or("-".into()),
            ));
        }
    }
    s.push_str("\n## Plots\n\n");
    for p in plots {
        s.push_str(&format!("![{}]({})\n\n{}\n\n", p.file, p.file, p.caption));
    }
    s.push_str("## Method\n\n- Steps: `stasis-traffic work --kmod /proc/stasis_fw` reads the guest-kmod's counters (1 ms hrtimer samples of mono/real/boot/TSC) and writes `reset` once a guest second; a checkpoint's step is the largest over the windows whose lines reached the host between the command's start and 1.5 s after it returned. The probe's column is the userspace probe (10 ms samples) over the same span. Step = sample-to-sample delta minus the period; a leaked pause of P s would show as ≈ P.\n- Δθ: node b runs `stasis-traffic clockx --peer a` (4-timestamp UDP exchange every 100 ms, θ = ((t2−t1)+(t3−t4))/2 of the two guests' CLOCK_MONOTONIC); Δθ = median θ over the last 3 s (guest time) of exchanges seen before the command − median θ over the first 3 s of those seen after it returned. The min-δ Δθ takes, in each window, only the quarter of exchanges with the shortest round trip δ (NTP's filter: a long δ means queueing or a descheduled vCPU, which biases θ). Host-predicted Δθ = frozen_b − frozen_a, each VM's frozen time as the host measured it (the checkpoint manifest's `frozen_ns`, `stasis show --json`): what the guests should see if the exchange were exact.\n- Work: busy-loop iterations per 100 ms of guest CLOCK_MONOTONIC (nice 19); mean rate over the 2 s of host time before the command vs the 2 s after it returned.\n- Host time of a console line = when the host's tailer read it (10 ms poll).\n");
    s
}

fn store_eval(
    bin: &Path,
    cache: &Path,
    out: &Path,
    kernel_args: &str,
    interval: Duration,
    capture_only: bool,
) -> Result<()> {
    use stasis_eval::store;
    let streams = store::Streams::at(cache);
    if !bin.exists() && !streams.idle.iter().chain(&streams.guests).all(|p| p.is_file()) {
        bail!("{} is missing: cargo build --bins", bin.display());
    }
    let streams = store::capture(bin, cache, kernel_args, secs(5.0), interval)?;
    if capture_only {
        return Ok(());
    }
    eprintln!("stasis-eval store: measuring in {}", cache.join("work").display());
    let figures = store::measure(&streams, &cache.join("work"))?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("store-eval.json"), serde_json::to_string_pretty(&figures)?)?;
    let tbl = store::table(&figures);
    std::fs::write(out.join("report.md"), format!("# Store eval\n\n{tbl}"))?;
    println!("{tbl}");
    Ok(())
}
