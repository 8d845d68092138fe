//! `stasis-eval iperf`: the campaign driver (real VMs), plots and report.
//! The analysis is in the library ([`stasis_eval::iperf`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stasis_core::clock::mono_ns;
use stasis_eval::iperf::{
    aa_check, aligned_curve, mean_series, metrics, parse_iperf, runs_csv, summarise, table, ArmSummary, Event,
    RunRecord, Window,
};
use stasis_eval::plot::{curve_plot, line_plot, Axes, Series};
use stasis_eval::run::{Experiment, Line};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What an arm does at each event instant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Nothing: the baseline.
    Nothing,
    /// `stasis checkpoint` with these extra arguments.
    Checkpoint(Vec<String>),
    /// The non-transparent control: freeze the delay node (every port) for
    /// this long while the VMs run on.
    FreezeNetwork { ms: u64 },
}

/// One arm of the campaign.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub treatment: Treatment,
}

/// The arms, baseline first. `live` is added when `stasis checkpoint` has a
/// `--live` option (adding another arm is one line here).
pub fn arms(live_supported: bool, freeze_ms: u64) -> Vec<Arm> {
    let arm = |name: &str, treatment| Arm { name: name.into(), treatment };
    let mut v = vec![
        arm("none", Treatment::Nothing),
        arm("control", Treatment::FreezeNetwork { ms: freeze_ms }),
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
    pub duration_s: u64,
    /// Planned event instants, guest s from the test start.
    pub events_s: Vec<f64>,
    pub bandwidth: String,
    pub delay: String,
    pub interval_s: f64,
    pub gap_s: u64,
    pub freeze_ms: u64,
    pub margin: f64,
    pub window_margin: f64,
    pub window: Window,
    pub quick: bool,
    pub arms: Vec<Arm>,
    /// The checkpoint command's margin (freeze instant after its start), ms.
    pub checkpoint_margin_ms: u64,
}

/// The command-line options of `stasis-eval iperf`.
pub struct Options {
    pub runs: usize,
    pub duration: u64,
    pub events: usize,
    pub bandwidth: String,
    pub delay: String,
    pub freeze_ms: u64,
    pub gap: u64,
    pub margin: f64,
    pub window_margin: f64,
    pub arms: Option<Vec<String>>,
    pub quick: bool,
    pub out: PathBuf,
    pub stasis: Option<PathBuf>,
    pub replot: bool,
}

const NAME: &str = "iperfeval";
const SERVER_IP: &str = "10.0.1.1";

fn spec(s: &Settings) -> String {
    let cubic = "sysctl -w net.ipv4.tcp_congestion_control=cubic >/dev/null";
    let server = format!("{cubic}; iperf3 -s -i {} -J >/dev/null 2>&1", s.interval_s);
    // One iperf3 test after another; the host reads the start marker and
    // times its events from it. `tr` puts the -J document on one line.
    let client = format!(
        "{cubic}; sleep 3; i=0; while :; do i=$((i+1)); echo \"{{\\\"tool\\\":\\\"iperf-run\\\",\\\"run\\\":$i}}\"; iperf3 -c {SERVER_IP} -t {} -i {} -J -C cubic --get-server-output | tr -d \"\\n\"; echo; sleep {}; done",
        s.duration_s, s.interval_s, s.gap_s
    );
    format!(
        "name = \"{NAME}\"\n[defaults]\nmemory = \"256M\"\n\n[[node]]\nname = \"s\"\nrun = ['{server}']\n\n[[node]]\nname = \"c\"\nrun = ['{client}']\n\n[[link]]\nname = \"l0\"\na = \"s\"\nb = \"c\"\nbandwidth = \"{}\"\ndelay = \"{}\"\n",
        s.bandwidth, s.delay
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

/// Runs `stasis-eval iperf`.
pub fn main(o: Options) -> Result<()> {
    if o.replot {
        return replot(&o.out);
    }
    let bin = stasis_bin(o.stasis.clone())?;
    let (runs, duration, events, gap) =
        if o.quick { (1, 14, 1, 2) } else { (o.runs.max(1), o.duration, o.events, o.gap) };
    if duration < 8 {
        bail!("--duration {duration}: at least 8 s (the window after an event is 5 s)");
    }
    let mut all = arms(live_supported(&bin), o.freeze_ms);
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
    let events_s: Vec<f64> = (1..=events).map(|k| duration as f64 * k as f64 / (events + 1) as f64).collect();
    let s = Settings {
        runs_per_arm: runs,
        duration_s: duration,
        events_s,
        bandwidth: o.bandwidth,
        delay: o.delay,
        interval_s: 0.5,
        gap_s: gap,
        freeze_ms: o.freeze_ms,
        margin: o.margin,
        window_margin: o.window_margin,
        window: Window::default(),
        quick: o.quick,
        arms: all,
        checkpoint_margin_ms: 300,
    };
    std::fs::create_dir_all(o.out.join("runs"))?;
    campaign(&bin, &s, &o.out)
}

/// The order of runs: round r runs every arm once, rotated by r (A/B
/// alternation that also balances which arm follows which).
fn schedule(arms: &[Arm], rounds: usize) -> Vec<usize> {
    (0..rounds).flat_map(|r| (0..arms.len()).map(move |i| (i + r) % arms.len())).collect()
}

fn campaign(bin: &Path, s: &Settings, out: &Path) -> Result<()> {
    let t0 = mono_ns();
    let order = schedule(&s.arms, s.runs_per_arm);
    eprintln!(
        "stasis-eval iperf: {} runs ({} per arm: {}), {} s each, events at {:?} s; booting 2 VMs",
        order.len(),
        s.runs_per_arm,
        s.arms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", "),
        s.duration_s,
        s.events_s
    );
    let exp = Experiment::up(bin, NAME, &spec(s), &["s", "c"])?;
    let ctl = exp.state().join(NAME).join("run/delay/ctl");
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (k, &ai) in order.iter().enumerate() {
        let n = k as u64 + 1;
        let arm = &s.arms[ai];
        let timeout = if k == 0 { 240.0 } else { 3.0 * s.duration_s as f64 + 120.0 };
        let Some(marker) =
            wait_line(&exp, timeout, |l| l.node == "c" && l.v["tool"] == "iperf-run" && l.v["run"].as_u64() == Some(n))
        else {
            bail!("run {n}: the client did not start within {timeout:.0} s");
        };
        let (h0, source) = data_start(&ctl, marker);
        eprintln!(
            "run {n}/{}: {} (data flowing {:.0} ms after the marker; from {source})",
            order.len(),
            arm.name,
            (h0 - marker) as f64 / 1e6
        );
        let events = run_events(&exp, &ctl, s, arm, h0)?;
        let frozen: u64 = events
            .iter()
            .map(|e| if matches!(arm.treatment, Treatment::Checkpoint(_)) { e.frozen_ns } else { 0 })
            .sum();
        let timeout = s.duration_s as f64 + frozen as f64 / 1e9 + 90.0;
        let is_result = |l: &Line| l.node == "c" && l.host_ns > marker && l.v.get("start").is_some();
        if wait_line(&exp, timeout, is_result).is_none() {
            bail!("run {n}: no iperf3 result within {timeout:.0} s");
        }
        let doc = exp.find_line(is_result).map(|l| l.v).unwrap_or_default();
        std::fs::write(out.join("runs").join(format!("run-{n:03}-{}.json", arm.name)), serde_json::to_vec(&doc)?)?;
        match parse_iperf(&doc) {
            Ok(result) => {
                let m = metrics(&result, &events, &s.window);
                eprintln!(
                    "  {:.2} Mbit/s, window {:.2} Mbit/s, {} retransmits, {} events done",
                    m.mean_mbps,
                    m.window_mbps.unwrap_or(f64::NAN),
                    m.retransmits,
                    events.iter().filter(|e| e.done).count()
                );
                runs.push(RunRecord {
                    run: n,
                    arm: arm.name.clone(),
                    host_start_ns: h0,
                    marker_ns: marker,
                    events,
                    result,
                    metrics: m,
                });
            }
            Err(e) => {
                eprintln!("  run {n} unusable: {e}");
                failures.push(json!({"run": n, "arm": arm.name, "error": e.to_string()}));
            }
        }
    }
    drop(exp); // tear down before the analysis
    let wall_s = (mono_ns() - t0) as f64 / 1e9;
    write_outputs(out, s, &runs, &failures, wall_s)
}

fn wait_line(exp: &Experiment, timeout_s: f64, pred: impl Fn(&Line) -> bool) -> Option<u64> {
    let deadline = mono_ns() + (timeout_s * 1e9) as u64;
    loop {
        if let Some(t) = exp.first_line(&pred) {
            return Some(t);
        }
        if mono_ns() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes the delay node has received on all its ports so far.
fn bytes_in(ctl: &Path) -> Result<u64> {
    let v = ask_delay_node(ctl, &[json!({"cmd": "stats"})], Duration::from_secs(5))?;
    let ports = v[0]["ports"].as_array().context("delay node stats: no ports")?;
    Ok(ports.iter().filter_map(|p| p["bytes_in"].as_u64()).sum())
}

/// Bytes of payload that mark the start of a test's data flow (the control
/// connection's exchange is a few hundred bytes; at 10 Mbit/s 30 kB pass in
/// 24 ms).
const DATA_START_BYTES: u64 = 30_000;

/// The host instant the test's data started to flow, after its start marker
/// at `marker_ns`: the first poll (every 10 ms, up to 5 s) at which the
/// delay node has seen [`DATA_START_BYTES`] more than at the marker. iperf3
/// needs ~0.5 s under TCG to set up the test after the marker, so timing
/// events from the marker would misplace them by that much. Falls back to
/// the marker (and says so) if the node cannot be asked.
fn data_start(ctl: &Path, marker_ns: u64) -> (u64, &'static str) {
    let Ok(b0) = bytes_in(ctl) else { return (marker_ns, "marker") };
    let deadline = mono_ns() + 5_000_000_000;
    while mono_ns() < deadline {
        let now = mono_ns();
        match bytes_in(ctl) {
            Ok(b) if b >= b0 + DATA_START_BYTES => return (now, "data"),
            Ok(_) => {}
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (marker_ns, "marker")
}

fn sleep_until(host_ns: u64) -> bool {
    let now = mono_ns();
    if host_ns > now {
        std::thread::sleep(Duration::from_nanos(host_ns - now));
        true
    } else {
        false
    }
}

/// Carries out an arm's events of one run, timed from the run's start
/// marker (host `h0`). Guest time stops while a checkpoint freezes the VMs,
/// so later checkpoints are shifted by the frozen time so far; the control
/// arm's freeze leaves guest time running.
fn run_events(exp: &Experiment, ctl: &Path, s: &Settings, arm: &Arm, h0: u64) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    let mut frozen_so_far = 0u64;
    let margin_ns = s.checkpoint_margin_ms * 1_000_000;
    for &t in &s.events_s {
        let t_ns = (t * 1e9) as u64;
        let run_end = h0 + s.duration_s * 1_000_000_000 + frozen_so_far;
        match &arm.treatment {
            Treatment::Nothing => {
                out.push(Event { planned_s: t, at_s: t, frozen_ns: 0, done: true, detail: Value::Null })
            }
            Treatment::Checkpoint(extra) => {
                let start = h0 + t_ns + frozen_so_far - margin_ns;
                sleep_until(start);
                let cmd_start = mono_ns();
                let at_s = (cmd_start + margin_ns - h0 - frozen_so_far) as f64 / 1e9;
                if cmd_start + margin_ns + 6_000_000_000 > run_end {
                    eprintln!("  event at {t} s skipped: the previous one ran late");
                    out.push(Event { planned_s: t, at_s, frozen_ns: 0, done: false, detail: Value::Null });
                    continue;
                }
                let mut args = vec!["checkpoint"];
                args.extend(extra.iter().map(String::as_str));
                let ck = exp.json(&args).with_context(|| format!("stasis {}", args.join(" ")))?;
                let frozen = ck["frozen_duration_ns"].as_u64().unwrap_or(0);
                // The freeze instant T the coordinator chose (the manifest's
                // `freeze.planned_ns`) replaces the estimate from the command's start.
                let id = ck["info"]["id"].as_str().unwrap_or("latest").to_string();
                let freeze = exp.json(&["show", &id]).map(|v| v["manifest"]["freeze"].clone()).unwrap_or_default();
                let at_s =
                    freeze["planned_ns"].as_u64().map_or(at_s, |t| (t as f64 - h0 as f64 - frozen_so_far as f64) / 1e9);
                let ck = json!({"checkpoint": ck, "freeze": freeze});
                eprintln!(
                    "  checkpoint at {at_s:.2} s: frozen {:.0} ms, command {:.1} s",
                    frozen as f64 / 1e6,
                    (mono_ns() - cmd_start) as f64 / 1e9
                );
                frozen_so_far += frozen;
                out.push(Event { planned_s: t, at_s, frozen_ns: frozen, done: true, detail: ck });
            }
            Treatment::FreezeNetwork { ms } => {
                let at = h0 + t_ns;
                sleep_until(at.saturating_sub(100_000_000));
                let at = at.max(mono_ns() + 20_000_000);
                let at_s = (at - h0) as f64 / 1e9;
                let reply = freeze_network(ctl, at, ms * 1_000_000).context("control arm: freezing the delay node")?;
                eprintln!("  network frozen at {at_s:.2} s for {} ms", ms);
                let frozen = reply["frozen_for_ns"].as_u64().unwrap_or(0);
                out.push(Event { planned_s: t, at_s, frozen_ns: frozen, done: true, detail: reply });
            }
        }
    }
    Ok(out)
}

/// Sends `reqs` to the delay node's control socket, one JSON line each, and
/// returns their `ok` values (an `error` reply fails).
fn ask_delay_node(ctl: &Path, reqs: &[Value], timeout: Duration) -> Result<Vec<Value>> {
    let stream = std::os::unix::net::UnixStream::connect(ctl).with_context(|| format!("connect {}", ctl.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut out = Vec::new();
    for req in reqs {
        writeln!(w, "{req}")?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("delay node reply {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("delay node refused {req}: {e}");
        }
        out.push(v["ok"].clone());
    }
    Ok(out)
}

/// Freezes every port of the delay node at `at` (host CLOCK_MONOTONIC) and
/// thaws it `for_ns` later, over its control socket; returns the thaw reply.
fn freeze_network(ctl: &Path, at: u64, for_ns: u64) -> Result<Value> {
    let reqs = [json!({"cmd": "freeze_at", "at": at, "hold_lead_ns": 0}), json!({"cmd": "thaw_at", "at": at + for_ns})];
    let mut v = ask_delay_node(ctl, &reqs, Duration::from_nanos(for_ns) + Duration::from_secs(10))?;
    Ok(v.pop().unwrap_or_default())
}

/// Everything the report needs, as written to `iperf-eval.json`.
#[derive(Serialize, Deserialize)]
struct Raw {
    eval: String,
    settings: Settings,
    runs: Vec<RunRecord>,
    failures: Vec<Value>,
    summary: Vec<ArmSummary>,
    wall_s: f64,
}

fn write_outputs(out: &Path, s: &Settings, runs: &[RunRecord], failures: &[Value], wall_s: f64) -> Result<()> {
    let names: Vec<String> = s.arms.iter().map(|a| a.name.clone()).collect();
    let mut summary = summarise(runs, &names, "none", s.margin, s.window_margin, &s.window);
    summary.extend(aa_check(runs, "none", s.margin, s.window_margin, &s.window));
    let raw = Raw {
        eval: "iperf".into(),
        settings: s.clone(),
        runs: runs.to_vec(),
        failures: failures.to_vec(),
        summary,
        wall_s,
    };
    std::fs::write(out.join("iperf-eval.json"), serde_json::to_string_pretty(&raw)?)?;
    std::fs::write(out.join("runs.csv"), runs_csv(runs))?;
    report(out, &raw)
}

/// Recomputes the summary, the plots and the report from `iperf-eval.json`.
fn replot(out: &Path) -> Result<()> {
    let raw: Raw = serde_json::from_slice(&std::fs::read(out.join("iperf-eval.json")).context("iperf-eval.json")?)?;
    let mut runs = raw.runs;
    for r in &mut runs {
        r.metrics = metrics(&r.result, &r.events, &raw.settings.window);
    }
    write_outputs(out, &raw.settings, &runs, &raw.failures, raw.wall_s)
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

struct Plot {
    file: String,
    caption: String,
}

fn axes_text(a: &Axes, x: &str, y: &str) -> String {
    format!(
        "x: {x} ({:.1} … {:.1}, grid every {}); y: {y} ({:.2} … {:.2}, grid every {})",
        a.x.0, a.x.1, a.x_step, a.y.0, a.y.1, a.y_step
    )
}

fn plots(out: &Path, raw: &Raw) -> Vec<Plot> {
    let s = &raw.settings;
    let by = |arm: &str| raw.runs.iter().filter(|r| r.arm == arm).collect::<Vec<_>>();
    let legend = s.arms.iter().map(|a| format!("{} = {}", a.name, color_name(&a.name))).collect::<Vec<_>>().join(", ");
    let mut v = Vec::new();
    // Around the events, aligned on each event.
    let series: Vec<Series> = s
        .arms
        .iter()
        .map(|a| Series { points: aligned_curve(&by(&a.name), -4.0, 10.0, 0.5), color: color(&a.name) })
        .collect();
    if let Ok(a) = line_plot(&out.join("iperf-around-events.png"), &series, &[0.0]) {
        v.push(Plot {
            file: "iperf-around-events.png".into(),
            caption: format!(
                "Receiver throughput around the events, aligned on each event (black line: the event's instant; the control arm's network freeze lasts {} ms from there), mean over runs and events in 0.5 s bins, per arm ({legend}). {}.",
                s.freeze_ms,
                axes_text(&a, "guest s from the event", "Mbit/s")
            ),
        });
    }
    let series: Vec<Series> =
        s.arms.iter().map(|a| Series { points: mean_series(&by(&a.name), 0.5), color: color(&a.name) }).collect();
    if let Ok(a) = line_plot(&out.join("iperf-timeseries.png"), &series, &s.events_s) {
        v.push(Plot {
            file: "iperf-timeseries.png".into(),
            caption: format!(
                "Receiver throughput over the whole test (iperf3 server's 0.5 s intervals, guest time), mean over the runs of each arm ({legend}); black lines: the planned event instants. {}.",
                axes_text(&a, "guest s from the test start", "Mbit/s")
            ),
        });
    }
    let cdf = |pick: &dyn Fn(&RunRecord) -> Vec<f64>| -> Vec<Series> {
        s.arms
            .iter()
            .map(|a| {
                let mut xs: Vec<f64> = by(&a.name).into_iter().flat_map(pick).collect();
                xs.sort_by(|x, y| x.total_cmp(y));
                let n = xs.len() as f64;
                let mut pts = Vec::new();
                for (i, x) in xs.iter().enumerate() {
                    pts.push((*x, i as f64 / n));
                    pts.push((*x, (i + 1) as f64 / n));
                }
                Series { points: pts, color: color(&a.name) }
            })
            .collect()
    };
    let all = cdf(&|r: &RunRecord| r.result.received.iter().map(|iv| iv.bps / 1e6).collect());
    if let Ok(a) = curve_plot(&out.join("iperf-cdf.png"), &all, &[]) {
        v.push(Plot {
            file: "iperf-cdf.png".into(),
            caption: format!("Empirical CDF of per-interval (0.5 s) receiver throughput, all intervals of all runs per arm ({legend}). {}.", axes_text(&a, "Mbit/s", "fraction of intervals")),
        });
    }
    let w = s.window;
    let win = cdf(&|r: &RunRecord| {
        stasis_eval::iperf::window_intervals(&r.result, &r.events, &w).into_iter().map(|iv| iv.bps / 1e6).collect()
    });
    if let Ok(a) = curve_plot(&out.join("iperf-cdf-window.png"), &win, &[]) {
        v.push(Plot {
            file: "iperf-cdf-window.png".into(),
            caption: format!(
                "Empirical CDF of per-interval receiver throughput in the windows [event, event + {} s) only ({legend}). {}.",
                w.after_s,
                axes_text(&a, "Mbit/s", "fraction of intervals")
            ),
        });
    }
    v
}

fn report(out: &Path, raw: &Raw) -> Result<()> {
    let s = &raw.settings;
    let tbl = table(&raw.summary);
    let plots = plots(out, raw);
    let mut r = format!(
        "# iperf3 transparency eval\n\n`stasis-eval iperf {}` — {} runs ({} per arm), {:.0} s wall.\n\n",
        if s.quick { "--quick".to_string() } else { format!("--runs {} --duration {}", s.runs_per_arm, s.duration_s) },
        raw.runs.len(),
        s.runs_per_arm,
        raw.wall_s
    );
    r.push_str(&format!(
        "Two TCG VMs (`s`: `iperf3 -s -i {i} -J`; `c`: `iperf3 -c -t {d} -i {i} -J -C cubic --get-server-output`, one test after another, {g} s apart), 256 MiB each, joined by one delay-node link of {bw}, {dl} one way (default 50-packet drop-tail queue); TCP cubic pinned in both guests. Events at guest {ev} s of each test. Arms, alternating (round r runs every arm once, rotated by r):\n\n",
        i = s.interval_s,
        d = s.duration_s,
        g = s.gap_s,
        bw = s.bandwidth,
        dl = s.delay,
        ev = s.events_s.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ")
    ));
    for a in &s.arms {
        r.push_str(&match &a.treatment {
            Treatment::Nothing => format!("- `{}`: no checkpoint (the baseline; its windows sit at the same planned instants).\n", a.name),
            Treatment::Checkpoint(x) if x.is_empty() => format!("- `{}`: `stasis checkpoint` (stop-and-copy) at each event.\n", a.name),
            Treatment::Checkpoint(x) => format!("- `{}`: `stasis checkpoint {}` at each event.\n", a.name, x.join(" ")),
            Treatment::FreezeNetwork { ms } => format!("- `{}` (**not transparent**, the instruments' control): the delay node freezes every port for {ms} ms at each event while the VMs keep running (`freeze_at`/`thaw_at` on its control socket).\n", a.name),
        });
    }
    r.push_str(&format!("\n## Summary\n\nBaseline `none`. α = {}. Verdicts: **equivalent** needs the TOST to pass (and no difference test to reject); **different**: Welch, KS or AD rejects at α; otherwise **not shown equivalent**. Margins: ±{:.0} % of the baseline's mean throughput for the whole run, ±{:.0} % for the windows. The last row (with ≥ 4 baseline runs) is the instruments' A/A check: the baseline's even-round runs against its odd-round runs, no treatment on either side.\n\n", stasis_eval::iperf::ALPHA, s.margin * 100.0, s.window_margin * 100.0));
    r.push_str(&tbl);
    if !raw.failures.is_empty() {
        r.push_str(&format!(
            "\nUnusable runs (left out): {}\n",
            raw.failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ")
        ));
    }
    r.push_str("\n## Plots\n\n");
    for p in &plots {
        r.push_str(&format!("![{}]({})\n\n{}\n\n", p.file, p.file, p.caption));
    }
    r.push_str("## Per run\n\n| run | arm | Mbit/s | window Mbit/s | retrans | RTT ms | events (guest s, frozen ms) |\n|---|---|---|---|---|---|---|\n");
    for x in &raw.runs {
        r.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} |\n",
            x.run,
            x.arm,
            x.metrics.mean_mbps,
            x.metrics.window_mbps.map(|v| format!("{v:.2}")).unwrap_or("–".into()),
            x.metrics.retransmits,
            x.metrics.mean_rtt_ms.map(|v| format!("{v:.1}")).unwrap_or("–".into()),
            x.events
                .iter()
                .map(|e| format!(
                    "{}{:.2} ({:.0})",
                    if e.done { "" } else { "skipped " },
                    e.at_s,
                    e.frozen_ns as f64 / 1e6
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    r.push_str(&format!(
        "\n## Method\n\n- Unit: a run (one iperf3 test). Whole-run throughput: the test's `end.sum_received` (bytes the server received / test duration, guest time).\n- Per-interval throughput: the server's (receiver's) 0.5 s intervals (`server_output_json`); fragments under {} s are dropped. Retransmits and RTT: the client's `end` (`sum_sent.retransmits`, `streams[0].sender.mean_rtt`).\n- Window: receiver intervals whose midpoint lies in [event, event + {} s) of guest time; per run the mean over all its events' windows.\n- Event instants: the host waits for the client's start marker (`{{\"tool\":\"iperf-run\"}}`, printed just before `iperf3 -c`), then times events from the moment the delay node has seen 30 kB more than at the marker (polled every 10 ms; iperf3 needs 0.5–3 s under TCG to set up its test); a checkpoint command starts {} ms (its freeze margin) before the planned instant, and the instant recorded is its manifest's freeze instant `freeze.planned_ns`; the control's is the delay node's `freeze_at`. Later events of a run are shifted by the VMs' frozen time so far (guest time stops while they are frozen).\n- TOST: Welch's t (Welch–Satterthwaite df) on run means, H0: |Δ| ≥ margin × mean(none); the CI shown is the (1 − 2α) one. Welch p: two-sided. Bootstrap: 10 000 resamplings of runs within each arm, percentile 95 % CI of Δ / mean(none).\n- KS and two-sample Anderson–Darling (Scholz–Stephens k-sample, midrank) compare the per-interval throughputs of all runs of the two arms. Intervals within a run are autocorrelated and whole runs differ (host load), so their textbook p-values (in parentheses; KS exact when n·m ≤ 10⁶, AD interpolated from Scholz–Stephens' table and capped to [0.001, 0.25]) are anti-conservative. The p-values that count (and enter the verdicts) permute whole runs between the two arms ({perm} relabellings): valid for any dependence within a run, but they cannot go below 1/C(n₁+n₂, n₁) — with 1 run per arm never below ½.\n- Curve gap: the largest vertical distance between the arm's and the baseline's mean curves of the around-events plot (−2 … +{} s, 0.5 s bins), relative to the baseline's mean throughput.\n- Frozen ms/event: `frozen_duration_ns` of `stasis checkpoint --json` (VMs stopped) or the delay node's `frozen_for_ns` (control).\n",
        stasis_eval::iperf::MIN_INTERVAL_S,
        s.window.after_s,
        s.checkpoint_margin_ms,
        s.window.after_s + 3.0,
        perm = stasis_eval::iperf::PERM_REPS,
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
    fn schedule_alternates_and_rotates() {
        let a = arms(false, 2000);
        assert_eq!(a.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["none", "control", "ckpt"]);
        assert_eq!(schedule(&a, 3), [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(
            arms(true, 2000).last().map(|a| a.treatment.clone()),
            Some(Treatment::Checkpoint(vec!["--live".into()]))
        );
    }

    #[test]
    fn spec_parses_and_pins_cubic() {
        let s = Settings {
            runs_per_arm: 1,
            duration_s: 14,
            events_s: vec![7.0],
            bandwidth: "10Mb".into(),
            delay: "10ms".into(),
            interval_s: 0.5,
            gap_s: 2,
            freeze_ms: 2000,
            margin: 0.02,
            window_margin: 0.05,
            window: Window::default(),
            quick: true,
            arms: arms(false, 2000),
            checkpoint_margin_ms: 300,
        };
        let text = spec(&s);
        let e = stasis_core::spec::Experiment::from_toml_str(&text, None).expect("spec parses");
        assert_eq!(e.nodes.len(), 2);
        assert!(text.contains("tcp_congestion_control=cubic") && text.contains("-C cubic"), "{text}");
    }
}
