//! `stasis-eval cpu`: the CPU-allocation campaign driver (real VMs), plots
//! and report. The analysis is in the library ([`stasis_eval::cpu`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stasis_core::clock::mono_ns;
use stasis_eval::cpu::{aa_check, analyse, runs_csv, summarise, table, ArmSummary, RunEvent, RunRecord, Windows};
use stasis_eval::plot::{line_plot, Axes, Series};
use stasis_eval::run::{Experiment, Line};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What an arm does at its run's event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Nothing: the baseline.
    Nothing,
    /// `stasis checkpoint` with these extra arguments.
    Checkpoint(Vec<String>),
    /// The non-transparent control: every VM's QEMU stopped by the host
    /// (SIGSTOP … SIGCONT) for this long, its guest clock running on — a
    /// guest that lost that much CPU right after the event.
    Throttle { ms: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub treatment: Treatment,
}

/// The arms, baseline first.
pub fn arms(live_supported: bool, throttle_ms: u64) -> Vec<Arm> {
    let arm = |name: &str, treatment| Arm { name: name.into(), treatment };
    let mut v = vec![
        arm("none", Treatment::Nothing),
        arm("control", Treatment::Throttle { ms: throttle_ms }),
        arm("ckpt", Treatment::Checkpoint(vec![])),
    ];
    if live_supported {
        v.push(arm("live", Treatment::Checkpoint(vec!["--live".into()])));
    }
    v
}

/// Campaign settings (also recorded in the raw data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub runs_per_arm: usize,
    pub windows: Windows,
    /// Guest-free time between one run's post window and the next run's pre window, s.
    pub gap_s: f64,
    pub throttle_ms: u64,
    pub margin: f64,
    /// Each VM's QEMU pinned to its own host CPU (`taskset -a`).
    pub pinned: bool,
    pub quick: bool,
    pub arms: Vec<Arm>,
}

/// The command-line options of `stasis-eval cpu`.
pub struct Options {
    pub runs: usize,
    pub pre: f64,
    pub post: f64,
    pub gap: f64,
    pub throttle_ms: u64,
    pub margin: f64,
    pub arms: Option<Vec<String>>,
    pub no_pin: bool,
    pub quick: bool,
    pub out: PathBuf,
    pub stasis: Option<PathBuf>,
    pub replot: bool,
}

const NAME: &str = "cpueval";
const NODES: [&str; 2] = ["a", "b"];

fn spec() -> String {
    let node = |n: &str| {
        format!("[[node]]\nname = \"{n}\"\nvcpus = 1\nrun = [\"sleep 1; stasis-traffic work --node {n} --window-ms 100\"]\n\n")
    };
    format!(
        "name = \"{NAME}\"\n[defaults]\nmemory = \"128M\"\n\n{}{}[[link]]\nname = \"l0\"\na = \"a\"\nb = \"b\"\ndelay = \"1ms\"\n",
        node("a"),
        node("b")
    )
}

fn stasis_bin(opt: Option<PathBuf>) -> Result<PathBuf> {
    let bin = match opt {
        Some(b) => b,
        None => std::env::current_exe()?.parent().context("exe dir")?.join("stasis"),
    };
    if !bin.exists() {
        bail!("{} is missing: cargo build --bins", bin.display());
    }
    Ok(bin)
}

fn live_supported(bin: &Path) -> bool {
    std::process::Command::new(bin)
        .args(["checkpoint", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--live"))
        .unwrap_or(false)
}

/// Runs `stasis-eval cpu`.
pub fn main(o: Options) -> Result<()> {
    if o.replot {
        return replot(&o.out);
    }
    let bin = stasis_bin(o.stasis.clone())?;
    let (runs, windows, gap) = if o.quick {
        (1, Windows { pre_s: 4.0, post_s: 4.0 }, 1.0)
    } else {
        (o.runs.max(1), Windows { pre_s: o.pre, post_s: o.post }, o.gap)
    };
    if windows.pre_s < 1.0 || windows.post_s < 1.0 {
        bail!("--pre {} --post {}: each window needs at least 1 s", windows.pre_s, windows.post_s);
    }
    if o.throttle_ms as f64 >= windows.post_s * 1000.0 {
        bail!("--throttle-ms {}: must be shorter than the post window ({} s)", o.throttle_ms, windows.post_s);
    }
    let mut all = arms(live_supported(&bin), o.throttle_ms);
    if let Some(want) = &o.arms {
        for w in want {
            if !all.iter().any(|a| &a.name == w) {
                bail!(
                    "--arms: unknown or unavailable arm {w:?} (have: {})",
                    all.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        all.retain(|a| a.name == "none" || want.contains(&a.name));
    }
    let s = Settings {
        runs_per_arm: runs,
        windows,
        gap_s: gap,
        throttle_ms: o.throttle_ms,
        margin: o.margin,
        pinned: !o.no_pin,
        quick: o.quick,
        arms: all,
    };
    std::fs::create_dir_all(&o.out)?;
    campaign(&bin, s, &o.out)
}

/// Round r runs every arm once, rotated by r.
fn schedule(arms: &[Arm], rounds: usize) -> Vec<usize> {
    (0..rounds).flat_map(|r| (0..arms.len()).map(move |i| (i + r) % arms.len())).collect()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The VMs' QEMU pids, from `stasis status --json`.
fn vm_pids(exp: &Experiment) -> Result<Vec<(String, i32)>> {
    let st = exp.json(&["status"])?;
    let procs = st["processes"].as_array().context("stasis status: no processes")?;
    NODES
        .iter()
        .map(|n| {
            let p = procs.iter().find(|p| p["name"] == *n).with_context(|| format!("stasis status: no VM {n}"))?;
            let pid = p["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).context("stasis status: bad pid")?;
            Ok((n.to_string(), pid))
        })
        .collect()
}

/// Pins every thread of each VM's QEMU to its own host CPU.
fn pin(pids: &[(String, i32)]) -> Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for (i, (node, pid)) in pids.iter().enumerate() {
        let cpu = i % cpus;
        let st = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running taskset (util-linux)")?;
        if !st.success() {
            bail!("taskset could not pin VM {node} (pid {pid}) to CPU {cpu}");
        }
    }
    Ok(())
}

/// Sends SIGCONT to every process it stopped when dropped, so that a failed
/// control run never leaves a VM stopped.
struct Stopped(Vec<i32>);

impl Stopped {
    fn stop(pids: &[(String, i32)]) -> Stopped {
        let mut v = Vec::new();
        for (_, pid) in pids {
            // SAFETY: kill(2) of a QEMU this campaign started (its pid from stasis status).
            if unsafe { libc::kill(*pid, libc::SIGSTOP) } == 0 {
                v.push(*pid);
            }
        }
        Stopped(v)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: as above; resumes a process we stopped.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}

fn campaign(bin: &Path, mut s: Settings, out: &Path) -> Result<()> {
    let t0 = mono_ns();
    let order = schedule(&s.arms, s.runs_per_arm);
    eprintln!(
        "stasis-eval cpu: {} runs ({} per arm: {}), windows {} s before / {} s after each event; booting 2 VMs",
        order.len(),
        s.runs_per_arm,
        s.arms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", "),
        s.windows.pre_s,
        s.windows.post_s
    );
    let exp = Experiment::up(bin, NAME, &spec(), &NODES)?;
    let ready = exp.wait_for(secs(180.0), |l| {
        NODES.iter().all(|n| l.iter().filter(|x| x.node == *n && x.v["tool"] == "work").count() >= 20)
    });
    if !ready {
        bail!("the guests' work loops did not report within 180 s");
    }
    let pids = vm_pids(&exp)?;
    if s.pinned {
        if let Err(e) = pin(&pids) {
            eprintln!("not pinned: {e:#}");
            s.pinned = false;
        }
    }
    let mut events = Vec::new();
    let mut failures = Vec::new();
    for (k, &ai) in order.iter().enumerate() {
        let n = k as u64 + 1;
        let arm = &s.arms[ai];
        // A clean pre window: the gap after the previous run's post window, then the window itself.
        std::thread::sleep(secs(s.gap_s + s.windows.pre_s));
        match run_event(&exp, &pids, arm, n) {
            Ok(e) => {
                eprintln!("run {n}/{}: {} (frozen {:.0} ms)", order.len(), arm.name, e.frozen_ns as f64 / 1e6);
                events.push(e);
            }
            Err(e) => {
                eprintln!("run {n}: {} unusable: {e:#}", arm.name);
                failures.push(json!({"run": n, "arm": arm.name, "error": format!("{e:#}")}));
            }
        }
        // The post window, and the lines of its last windows reaching the host.
        std::thread::sleep(secs(s.windows.post_s + 0.5));
    }
    let lines = exp.lines();
    drop(exp); // tear down before the analysis
    save_lines(&out.join("console-lines.jsonl"), &lines)?;
    let wall_s = (mono_ns() - t0) as f64 / 1e9;
    let runs = analyse(&lines, &events, &NODES, &s.windows);
    write_outputs(out, &s, &events, &runs, &failures, wall_s)
}

/// Carries out one run's event now and says when it happened.
fn run_event(exp: &Experiment, pids: &[(String, i32)], arm: &Arm, n: u64) -> Result<RunEvent> {
    let ev = |at: u64, frozen: u64, detail: Value| RunEvent {
        run: n,
        arm: arm.name.clone(),
        event_host_ns: at,
        frozen_ns: frozen,
        detail,
    };
    match &arm.treatment {
        Treatment::Nothing => Ok(ev(mono_ns(), 0, Value::Null)),
        Treatment::Checkpoint(extra) => {
            let mut args = vec!["checkpoint"];
            args.extend(extra.iter().map(String::as_str));
            let ck = exp.json(&args).with_context(|| format!("stasis {}", args.join(" ")))?;
            let frozen = ck["frozen_duration_ns"].as_u64().unwrap_or(0);
            let id = ck["info"]["id"].as_str().context("checkpoint --json: no id")?.to_string();
            let show = exp.json(&["show", &id])?;
            let at = show["manifest"]["freeze"]["planned_ns"].as_u64().context("show: no freeze.planned_ns")?;
            Ok(ev(at, frozen, json!({"checkpoint": ck, "freeze": show["manifest"]["freeze"]})))
        }
        Treatment::Throttle { ms } => {
            let at = mono_ns();
            let stopped = Stopped::stop(pids);
            std::thread::sleep(Duration::from_millis(*ms));
            let resumed = mono_ns();
            let n_stopped = stopped.0.len();
            drop(stopped);
            if n_stopped != pids.len() {
                bail!("control: only {n_stopped} of {} VMs could be stopped", pids.len());
            }
            Ok(ev(at, resumed - at, json!({"stopped_ns": resumed - at})))
        }
    }
}

fn save_lines(path: &Path, lines: &[Line]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for l in lines.iter().filter(|l| l.v["tool"] == "work") {
        writeln!(f, "{}", json!({"host_ns": l.host_ns, "node": l.node, "v": l.v}))?;
    }
    f.flush()?;
    Ok(())
}

fn load_lines(path: &Path) -> Result<Vec<Line>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            Ok(Line {
                host_ns: v["host_ns"].as_u64().with_context(|| format!("{}:{}: no host_ns", path.display(), i + 1))?,
                node: v["node"].as_str().unwrap_or_default().to_string(),
                v: v["v"].clone(),
            })
        })
        .collect()
}

/// Everything the report needs, as written to `cpu-eval.json`.
#[derive(Serialize, Deserialize)]
struct Raw {
    eval: String,
    settings: Settings,
    events: Vec<RunEvent>,
    runs: Vec<RunRecord>,
    failures: Vec<Value>,
    summary: Vec<ArmSummary>,
    wall_s: f64,
}

fn write_outputs(
    out: &Path,
    s: &Settings,
    events: &[RunEvent],
    runs: &[RunRecord],
    failures: &[Value],
    wall_s: f64,
) -> Result<()> {
    let names: Vec<String> = s.arms.iter().map(|a| a.name.clone()).collect();
    let mut summary = summarise(runs, &names, "none", s.margin);
    summary.extend(aa_check(runs, "none", s.margin));
    let raw = Raw {
        eval: "cpu".into(),
        settings: s.clone(),
        events: events.to_vec(),
        runs: runs.to_vec(),
        failures: failures.to_vec(),
        summary,
        wall_s,
    };
    std::fs::write(out.join("cpu-eval.json"), serde_json::to_string_pretty(&raw)?)?;
    std::fs::write(out.join("runs.csv"), runs_csv(runs))?;
    report(out, &raw)
}

/// Recomputes the rates, summary, plot and report from `cpu-eval.json` and
/// `console-lines.jsonl`.
fn replot(out: &Path) -> Result<()> {
    let raw: Raw = serde_json::from_slice(&std::fs::read(out.join("cpu-eval.json")).context("cpu-eval.json")?)?;
    let lines = load_lines(&out.join("console-lines.jsonl"))?;
    let runs = analyse(&lines, &raw.events, &NODES, &raw.settings.windows);
    write_outputs(out, &raw.settings, &raw.events, &runs, &raw.failures, raw.wall_s)
}

fn color(arm: &str) -> (u8, u8, u8) {
    match arm {
        "none" => (0, 0, 200),
        "ckpt" => (0, 150, 0),
        "control" => (210, 0, 0),
        "live" => (230, 130, 0),
        _ => (120, 0, 160),
    }
}

fn color_name(arm: &str) -> &'static str {
    match arm {
        "none" => "blue",
        "ckpt" => "green",
        "control" => "red",
        "live" => "orange",
        _ => "purple",
    }
}

fn axes_text(a: &Axes, x: &str, y: &str) -> String {
    format!(
        "x: {x} ({:.1} … {:.1}, grid every {}); y: {y} ({:.3} … {:.3}, grid every {})",
        a.x.0, a.x.1, a.x_step, a.y.0, a.y.1, a.y_step
    )
}

fn report(out: &Path, raw: &Raw) -> Result<()> {
    let s = &raw.settings;
    let tbl = table(&raw.summary);
    let legend = s.arms.iter().map(|a| format!("{} = {}", a.name, color_name(&a.name))).collect::<Vec<_>>().join(", ");
    let series: Vec<Series> = s
        .arms
        .iter()
        .map(|a| {
            let curves: Vec<Vec<(f64, f64)>> =
                raw.runs.iter().filter(|r| r.arm == a.name).map(|r| r.curve.clone()).collect();
            Series { points: stasis_eval::cpu::mean_curve(&curves), color: color(&a.name) }
        })
        .collect();
    let plot = line_plot(&out.join("cpu-around-events.png"), &series, &[0.0]).ok().map(|a| {
        format!(
            "![cpu-around-events.png](cpu-around-events.png)\n\nWork rate around the events relative to each run's pre-event rate, aligned on the event (black line), mean over runs and VMs in {} s bins of guest time, per arm ({legend}). {}.\n\n",
            stasis_eval::cpu::CURVE_BIN_S,
            axes_text(&a, "guest s from the event", "rate / pre-event rate")
        )
    });
    let mut r = format!(
        "# CPU-allocation eval\n\n`stasis-eval cpu {}` — {} runs ({} per arm), {:.0} s wall.\n\n",
        if s.quick {
            "--quick".to_string()
        } else {
            format!("--runs {} --pre {} --post {}", s.runs_per_arm, s.windows.pre_s, s.windows.post_s)
        },
        raw.runs.len(),
        s.runs_per_arm,
        raw.wall_s
    );
    r.push_str(&format!(
        "Two TCG VMs (`a`, `b`: 1 vCPU, 128 MiB, each running `stasis-traffic work --window-ms 100`, a busy loop that counts iterations per 100 ms of its guest's CLOCK_MONOTONIC){}. A run is one event with a {} s window of guest time before it and a {} s window after it ({} s apart from the previous run's). Arms, alternating (round r runs every arm once, rotated by r):\n\n",
        if s.pinned { ", each VM's QEMU pinned to its own host CPU with `taskset -a`" } else { ", not pinned" },
        s.windows.pre_s,
        s.windows.post_s,
        s.gap_s
    ));
    for a in &s.arms {
        r.push_str(&match &a.treatment {
            Treatment::Nothing => format!("- `{}`: nothing (the baseline; its windows sit around an instant taken the same way).\n", a.name),
            Treatment::Checkpoint(x) if x.is_empty() => format!("- `{}`: `stasis checkpoint` (stop-and-copy); the event is its freeze instant T.\n", a.name),
            Treatment::Checkpoint(x) => format!("- `{}`: `stasis checkpoint {}`.\n", a.name, x.join(" ")),
            Treatment::Throttle { ms } => format!("- `{}` (**not transparent**, the instruments' control): both QEMUs stopped by the host (SIGSTOP, SIGCONT {ms} ms later) while the guests' clocks run on: {ms} ms of lost CPU right after the event.\n", a.name),
        });
    }
    r.push_str(&format!(
        "\n## Summary\n\nBaseline `none`. α = {}. The figure of a run is its **post/pre ratio**: iterations per guest second in the window after the event over the window before, averaged over the two VMs. Verdicts: **equivalent** needs the TOST (margin ±{:.0} % of the baseline's mean ratio, Welch t on run ratios) to pass and Welch's test not to reject; **different**: Welch rejects at α; otherwise **not shown equivalent**. The absolute post-event rate (all VMs, million iterations per guest second) gets the same TOST, reported only: on a shared host it moves with other load. The last row (≥ 4 baseline runs) is the A/A check: the baseline's odd-round runs against its even-round runs.\n\n",
        stasis_eval::cpu::ALPHA,
        s.margin * 100.0
    ));
    r.push_str(&tbl);
    if !raw.failures.is_empty() {
        r.push_str(&format!(
            "\nUnusable runs (left out): {}\n",
            raw.failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ")
        ));
    }
    r.push_str("\n## Plot\n\n");
    r.push_str(plot.as_deref().unwrap_or("(no plot: no run had a curve)\n\n"));
    r.push_str("## Per run\n\n| run | arm | frozen ms | a pre → post (ratio) | b pre → post (ratio) |\n|---|---|---|---|---|\n");
    for x in &raw.runs {
        let node = |i: usize| {
            x.nodes.get(i).map_or("–".into(), |n| match (n.pre, n.post, n.ratio) {
                (Some(a), Some(b), Some(q)) => format!("{:.3} → {:.3} ({q:.4})", a / 1e6, b / 1e6),
                _ => "–".into(),
            })
        };
        r.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} |\n",
            x.run,
            x.arm,
            x.frozen_ns as f64 / 1e6,
            node(0),
            node(1)
        ));
    }
    r.push_str(&format!(
        "\n## Method\n\n- Guest time of an event: the host instant (a checkpoint's freeze instant T from its manifest; the baseline's and control's instant when the host acted) mapped into each guest's CLOCK_MONOTONIC through the work lines that reached the host in the {} s before it (guest end − host arrival, the largest value: the least delayed line).\n- Rates: iterations over guest time in each window; a 100 ms work window straddling a bound counts with the part inside, its iterations in proportion; a window needs ≥ {:.0} % coverage.\n- Bootstrap: {} resamplings of runs within each arm, percentile 95 % CI of the mean ratio difference relative to the baseline's mean ratio.\n- Raw data: `cpu-eval.json` (settings, events, per-run rates, summary), `console-lines.jsonl` (every work line with its host arrival), `runs.csv`; `stasis-eval cpu --replot --out DIR` recomputes everything from them.\n",
        stasis_eval::cpu::MAPPING_LOOKBACK_NS / 1_000_000_000,
        stasis_eval::cpu::MIN_COVERAGE * 100.0,
        stasis_eval::cpu::BOOT_REPS,
    ));
    std::fs::write(out.join("report.md"), r)?;
    println!("{tbl}");
    println!("raw data and report in {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_alternate_and_the_spec_parses() {
        let a = arms(false, 1000);
        assert_eq!(a.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["none", "control", "ckpt"]);
        assert_eq!(schedule(&a, 2), [0, 1, 2, 1, 2, 0]);
        let e = stasis_core::spec::Experiment::from_toml_str(&spec(), None).expect("spec parses");
        assert_eq!(e.nodes.len(), 2);
        assert!(e.nodes.iter().all(|n| n.vcpus == 1));
    }

    #[test]
    fn saved_lines_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.jsonl");
        let l = vec![
            Line { host_ns: 5, node: "a".into(), v: json!({"tool": "work", "mono_ns": 9, "len_ns": 1, "iters": 3}) },
            Line { host_ns: 6, node: "a".into(), v: json!({"tool": "other"}) },
        ];
        save_lines(&p, &l).unwrap();
        let back = load_lines(&p).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].host_ns, back[0].v["iters"].as_u64()), (5, Some(3)));
        std::fs::write(&p, "{\"node\":\"a\"}\n").unwrap();
        let err = load_lines(&p).unwrap_err().to_string();
        assert!(err.contains("l.jsonl:1: no host_ns"), "{err}");
    }
}
