//! `stasis-eval bt`: the BitTorrent transparency campaign. Runs alternate
//! arms (none / ckpt / control); each run boots a fresh swarm, disturbs it at
//! fixed instants after the leechers start, waits for every leecher to
//! complete with verified data, and tears it down. Writes raw data per run,
//! `bt-eval.json`, `bt-runs.csv`, `report.md` with PNG plots, and prints the
//! summary table.

use anyhow::{bail, Context, Result};
use stasis_core::clock::mono_ns;
use stasis_eval::bt::{self, Arm, Comparison, Event, Payload, Run};
use stasis_eval::plot::{line_plot, Axes, Series};
use stasis_eval::run::{Experiment, Line};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a campaign does.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub runs: usize,
    pub arms: Vec<Arm>,
    pub leechers: usize,
    pub payload: Payload,
    pub bandwidth: String,
    pub delay: String,
    /// Disturbance instants, s after the first leecher started (host time).
    pub at_s: Vec<f64>,
    /// How long the control arm freezes the delay node, s.
    pub control_pause_s: f64,
    /// Give up on a run after this long, s.
    pub run_timeout_s: f64,
    pub quick: bool,
}

impl Config {
    pub fn new(runs: usize, quick: bool) -> Config {
        if quick {
            Config {
                runs: 1,
                // A checkpoint's commit alone can take 15 s on a busy 2-core
                // host: the quick arms fit ~90 s without it (--arms adds it).
                arms: vec![Arm::None, Arm::Control],
                leechers: 2,
                payload: Payload::Quick,
                bandwidth: "4Mb".into(),
                delay: "5ms".into(),
                at_s: vec![6.0],
                control_pause_s: 3.0,
                run_timeout_s: 90.0,
                quick,
            }
        } else {
            Config {
                runs: runs.max(1),
                arms: Arm::ALL.to_vec(),
                leechers: 3,
                payload: Payload::Full,
                bandwidth: "4Mb".into(),
                delay: "5ms".into(),
                at_s: vec![15.0, 30.0, 45.0],
                control_pause_s: 3.0,
                run_timeout_s: 400.0,
                quick,
            }
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// One request to the delay node's control socket; its `ok` value.
fn control(sock: &Path, req: serde_json::Value) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("delay node reply {line:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("delay node refused {req}: {e}");
    }
    Ok(v["ok"].clone())
}

fn done(lines: &[Line], leechers: &[String]) -> bool {
    leechers.iter().all(|l| {
        lines.iter().any(|x| {
            x.node == *l && x.v["tool"] == "bt" && matches!(x.v["event"].as_str(), Some("done") | Some("error"))
        })
    })
}

fn one_run(bin: &Path, cfg: &Config, arm: Arm, index: usize, seq: usize) -> Result<(Run, Vec<Line>)> {
    let t0 = mono_ns();
    let name = "bt";
    let leechers = bt::leecher_names(cfg.leechers);
    let mut nodes: Vec<&str> = vec!["s"];
    nodes.extend(leechers.iter().map(String::as_str));
    let spec = bt::spec(name, cfg.leechers, cfg.payload, &cfg.bandwidth, &cfg.delay);
    let exp = Experiment::up(bin, name, &spec, &nodes)?;
    let t_up = mono_ns();
    let started = exp.wait_for(secs(120.0), |l| {
        leechers.iter().all(|n| l.iter().any(|x| x.node == *n && x.v["tool"] == "bt" && x.v["event"] == "start"))
    });
    if !started {
        bail!("run {seq} ({}): the leechers did not start within 120 s of boot (no tracker/seeder?)", arm.name());
    }
    let first = exp.lines().iter().filter(|x| x.v["event"] == "start").map(|x| x.host_ns).min().unwrap_or_else(mono_ns);
    let ctl = exp.state().join(name).join("run/delay/ctl");
    let mut events = Vec::new();
    if arm != Arm::None {
        for &at in &cfg.at_s {
            let target = first + (at * 1e9) as u64;
            let now = mono_ns();
            if target > now {
                std::thread::sleep(Duration::from_nanos(target - now));
            }
            if done(&exp.lines(), &leechers) {
                tracing::warn!("run {seq}: every leecher finished before the disturbance at {at} s");
                break;
            }
            let start = mono_ns();
            let detail = match arm {
                Arm::Ckpt => exp.json(&["checkpoint"])?,
                Arm::Control => {
                    let freeze_at = mono_ns() + 5_000_000;
                    control(&ctl, serde_json::json!({"cmd": "freeze_at", "at": freeze_at, "hold_lead_ns": 0}))?;
                    std::thread::sleep(
                        Duration::from_nanos(freeze_at - mono_ns().min(freeze_at)) + secs(cfg.control_pause_s),
                    );
                    control(&ctl, serde_json::json!({"cmd": "thaw_at", "at": mono_ns()}))?
                }
                Arm::None => unreachable!(),
            };
            let end = mono_ns();
            eprintln!("  {} at {at} s: {:.2} s", arm.name(), (end - start) as f64 / 1e9);
            events.push(Event { host_start_ns: start, host_end_ns: end, guest_s: None, detail });
        }
    }
    let finished = exp.wait_for(secs(cfg.run_timeout_s), |l| done(l, &leechers));
    let t_done = mono_ns();
    let lines = exp.lines();
    drop(exp);
    let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    eprintln!(
        "  phases (host s): up {:.1}, leechers started {:.1} later, all done {:.1} later, teardown {:.1}",
        s(t0, t_up),
        s(t_up, first),
        s(first, t_done),
        s(t_done, mono_ns())
    );
    if !finished {
        tracing::warn!("run {seq} ({}): not every leecher finished within {} s", arm.name(), cfg.run_timeout_s);
    }
    for e in &mut events {
        e.guest_s = bt::guest_s_at(&lines, &leechers[0], e.host_start_ns);
    }
    let leechers = leechers.iter().map(|l| bt::leecher(&lines, l)).collect();
    let run = Run { arm, index, seq, leechers, events, wall_s: (mono_ns() - t0) as f64 / 1e9 };
    Ok((run, lines))
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

/// Runs the campaign and writes everything into `out`.
pub fn campaign(bin: &Path, cfg: &Config, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out.join("runs"))?;
    let t0 = mono_ns();
    let mut runs = Vec::new();
    let mut seq = 0;
    eprintln!(
        "stasis-eval bt: {} run(s) × arms {:?}, {} leechers, payload {}, {} / {} per LAN member",
        cfg.runs,
        cfg.arms.iter().map(|a| a.name()).collect::<Vec<_>>(),
        cfg.leechers,
        cfg.payload.name(),
        cfg.bandwidth,
        cfg.delay
    );
    for r in 0..cfg.runs {
        // Alternate, and rotate the order every round so no arm always runs
        // first (after a quiet host, say).
        let n = cfg.arms.len();
        for k in 0..n {
            let arm = cfg.arms[(k + r) % n];
            seq += 1;
            eprintln!("run {seq}: {} #{}", arm.name(), r + 1);
            let (run, lines) = one_run(bin, cfg, arm, r + 1, seq)?;
            let stem = format!("run-{seq:02}-{}", arm.name());
            write_lines(&out.join("runs").join(format!("{stem}.jsonl")), &lines)?;
            std::fs::write(out.join("runs").join(format!("{stem}.json")), serde_json::to_string_pretty(&run)?)?;
            eprintln!(
                "  completion s: {} ({}; wall {:.0} s)",
                run.leechers
                    .iter()
                    .map(|l| l.completion_s.map(|c| format!("{c:.2}")).unwrap_or("-".into()))
                    .collect::<Vec<_>>()
                    .join(", "),
                if run.all_verified() { "all verified" } else { "NOT all verified" },
                run.wall_s
            );
            runs.push(run);
        }
    }
    let wall_s = (mono_ns() - t0) as f64 / 1e9;
    write_all(out, cfg, &runs, wall_s)
}

/// Analysis, raw summary, plots and report from `runs`.
fn write_all(out: &Path, cfg: &Config, runs: &[Run], wall_s: f64) -> Result<()> {
    let mut comps: Vec<Comparison> =
        cfg.arms.iter().filter(|a| **a != Arm::None).map(|a| bt::compare(runs, *a)).collect();
    comps.extend(bt::compare_aa(runs));
    let raw = serde_json::json!({"eval": "bt", "config": cfg, "runs": runs, "comparisons": comps, "wall_s": wall_s});
    std::fs::write(out.join("bt-eval.json"), serde_json::to_string_pretty(&raw)?)?;
    let mut csv = String::from("seq,arm,index,node,completion_s,verified,sha1,events\n");
    for r in runs {
        for l in &r.leechers {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                r.seq,
                r.arm.name(),
                r.index,
                l.node,
                l.completion_s.map(|c| c.to_string()).unwrap_or_default(),
                l.verified.map(|v| v.to_string()).unwrap_or_default(),
                l.sha1.clone().unwrap_or_default(),
                r.events.len()
            ));
        }
    }
    std::fs::write(out.join("bt-runs.csv"), csv)?;
    let plots = plots(out, cfg, runs)?;
    let tbl = bt::table(&comps);
    std::fs::write(out.join("report.md"), report(cfg, runs, &comps, &tbl, &plots, wall_s))?;
    println!("{tbl}");
    for a in &cfg.arms {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.arm == *a).collect();
        let ok = rs.iter().filter(|r| r.all_verified()).count();
        let m: Vec<String> =
            rs.iter().map(|r| r.mean_completion_s().map(|c| format!("{c:.2}")).unwrap_or("-".into())).collect();
        let st: Vec<String> =
            rs.iter().map(|r| r.max_stall_s().map(|c| format!("{c:.2}")).unwrap_or("-".into())).collect();
        println!(
            "{}: {ok}/{} runs complete and verified; per-run mean completion s: {}; max stall s: {}",
            a.name(),
            rs.len(),
            m.join(", "),
            st.join(", ")
        );
    }
    println!("raw data and report in {} (wall {:.0} s)", out.display(), wall_s);
    Ok(())
}

/// `--replot`: redraws and rewrites the report from `bt-eval.json`.
pub fn replot(out: &Path) -> Result<()> {
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bt-eval.json"))?)?;
    let cfg: Config = serde_json::from_value(raw["config"].clone())?;
    let runs: Vec<Run> = serde_json::from_value(raw["runs"].clone())?;
    write_all(out, &cfg, &runs, raw["wall_s"].as_f64().unwrap_or(0.0))
}

struct Plot {
    file: String,
    caption: String,
}

const LEECH_COLORS: [(u8, u8, u8); 6] =
    [(200, 0, 0), (0, 0, 200), (0, 140, 0), (160, 0, 160), (200, 120, 0), (0, 140, 140)];

fn axes_text(a: &Axes, x: &str, y: &str) -> String {
    format!(
        "x: {x} ({:.1} … {:.1}, grid every {}); y: {y} ({:.2} … {:.2}, grid every {})",
        a.x.0, a.x.1, a.x_step, a.y.0, a.y.1, a.y_step
    )
}

fn plots(out: &Path, cfg: &Config, runs: &[Run]) -> Result<Vec<Plot>> {
    let mut v = Vec::new();
    for a in &cfg.arms {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.arm == *a).collect();
        let mut series = Vec::new();
        for r in &rs {
            for (i, l) in r.leechers.iter().enumerate() {
                series.push(Series { points: bt::step_points(l, 0.25), color: LEECH_COLORS[i % LEECH_COLORS.len()] });
            }
        }
        let marks: Vec<f64> =
            rs.first().map(|r| r.events.iter().filter_map(|e| e.guest_s).collect()).unwrap_or_default();
        let file = format!("bt-progress-{}.png", a.name());
        if let Ok(ax) = line_plot(&out.join(&file), &series, &marks) {
            v.push(Plot {
                file,
                caption: format!(
                    "Arm {}: every leecher's progress in every run ({} runs; colour = leecher l1 red, l2 blue, l3 green); black lines: the disturbances of the first run on l1's guest clock. {}.",
                    a.name(),
                    rs.len(),
                    axes_text(&ax, "guest seconds since the leecher's client started", "MiB verified")
                ),
            });
        }
    }
    let mut series = Vec::new();
    for a in &cfg.arms {
        let c: Vec<f64> = runs
            .iter()
            .filter(|r| r.arm == *a)
            .flat_map(|r| r.leechers.iter().filter_map(|l| l.completion_s))
            .collect();
        series.push(Series { points: bt::cdf_points(&c), color: a.color() });
    }
    if let Ok(ax) = line_plot(&out.join("bt-cdf.png"), &series, &[]) {
        v.push(Plot {
            file: "bt-cdf.png".into(),
            caption: format!(
                "Empirical CDF of per-leecher completion times: none (blue), ckpt (green), control (red). {}.",
                axes_text(&ax, "completion time, guest s", "fraction of leechers")
            ),
        });
    }
    let mut series = Vec::new();
    for a in &cfg.arms {
        let ls: Vec<&bt::Leecher> = runs.iter().filter(|r| r.arm == *a).flat_map(|r| r.leechers.iter()).collect();
        series.push(Series { points: bt::mean_curve(&ls, 0.25), color: a.color() });
    }
    if let Ok(ax) = line_plot(&out.join("bt-mean-progress.png"), &series, &cfg.at_s) {
        v.push(Plot {
            file: "bt-mean-progress.png".into(),
            caption: format!(
                "Mean progress over all leechers of all runs per arm: none (blue), ckpt (green), control (red); black lines: the nominal disturbance instants (host s after the first leecher started). {}.",
                axes_text(&ax, "guest s since the leecher's start", "fraction of the payload")
            ),
        });
    }
    Ok(v)
}

fn report(cfg: &Config, runs: &[Run], comps: &[Comparison], tbl: &str, plots: &[Plot], wall_s: f64) -> String {
    let mut s = format!(
        "# BitTorrent transparency\n\n`stasis-eval bt --runs {}{}`: a closed swarm in TCG guests — seeder `s` (also the tracker: opentracker in whitelist mode, started fresh at every boot) and {} leechers (Enhanced CTorrent, tracker only: the torrent is private, so no DHT/PEX/LPD), {} payload, one LAN through the delay node, {} and {} per member. Arms alternate (rotated each round): **none** (no checkpoint), **ckpt** (`stasis checkpoint`, stop-and-copy, at {:?} s after the first leecher started), **control** (not transparent: the delay node alone frozen {} s at the same instants while the guests run). Unit = run (mean completion time over its leechers). Campaign wall time {:.0} s.\n\n## Summary\n\n",
        cfg.runs,
        if cfg.quick { " --quick" } else { "" },
        cfg.leechers,
        cfg.payload.name(),
        cfg.bandwidth,
        cfg.delay,
        cfg.at_s,
        cfg.control_pause_s,
        wall_s
    );
    s.push_str(tbl);
    s.push_str("\nVerdict: **different** if Welch's t, KS or AD rejects at α = 0.05; else **equivalent** if the TOST (margin ±5 % of the baseline's mean completion time, α = 0.05) passes; else **not shown equivalent**. \"Not significant\" alone never counts as the same. The last row (with ≥ 4 baseline runs) is the instruments' A/A check: the baseline's odd-round runs against its even-round runs, no treatment on either side; it must come out equivalent.\n\n## Runs\n\n| # | arm | completion s per leecher | mean | all verified | max stall s | disturbances (host s each) | wall s |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            r.seq,
            r.arm.name(),
            r.leechers
                .iter()
                .map(|l| l.completion_s.map(|c| format!("{c:.2}")).unwrap_or("-".into()))
                .collect::<Vec<_>>()
                .join(", "),
            r.mean_completion_s().map(|c| format!("{c:.2}")).unwrap_or("-".into()),
            if r.all_verified() { "yes" } else { "**no**" },
            r.max_stall_s().map(|c| format!("{c:.2}")).unwrap_or("-".into()),
            r.events
                .iter()
                .map(|e| format!("{:.2}", (e.host_end_ns - e.host_start_ns) as f64 / 1e9))
                .collect::<Vec<_>>()
                .join(", "),
            r.wall_s
        ));
    }
    let _ = comps;
    s.push_str("\n## Plots\n\n");
    for p in plots {
        s.push_str(&format!("![{}]({})\n\n{}\n\n", p.file, p.file, p.caption));
    }
    s.push_str("## Method\n\n- Progress: `stasis-bt leech` runs CTorrent on a pty and prints a JSON line whenever its count of verified pieces (64 KiB) changes — CTorrent refreshes its status line once a second, so progress points are ~1 s apart — with the guest's CLOCK_MONOTONIC. Completion: CTorrent's completion hook (`-X`), read at once. Then the file's SHA-1 is compared with the one computed at image build time.\n- Max stall: the longest guest time between two progress lines once data flows (CTorrent reports about once a second). The control arm's freeze shows as a stall of about its length (the guests keep running); a transparent checkpoint shows none (the guests' clocks stop with them).
- Each leecher starts its client once the tracker's scrape lists the seeder; completion time is guest time from that start.\n- Disturbance instants are host times after the first leecher's start line reached the host; a checkpoint or freeze that would come after every leecher finished is skipped.\n");
    s
}

/// The `stasis` binary next to this one unless given.
pub fn stasis_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
    };
    if !bin.exists() {
        bail!("{} is missing: cargo build --bins", bin.display());
    }
    Ok(bin)
}

/// An arm by name.
pub fn parse_arm(s: &str) -> Result<Arm> {
    Arm::ALL
        .into_iter()
        .find(|a| a.name() == s)
        .with_context(|| format!("--arms: unknown arm {s:?} (none, ckpt, control)"))
}
