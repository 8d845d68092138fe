//! The time eval: a 2-VM experiment on a 0 ms link, checkpointed with
//! pauses of P seconds. Per checkpoint it measures, from inside the guests:
//!
//! - each clock's largest step (guest-kmod counters, read and reset once a
//!   second by `stasis-traffic work --kmod`, and the userspace probe's),
//! - the inter-VM virtual-clock skew the checkpoint introduced: Δθ, the
//!   change of the NTP-style offset between the guests' CLOCK_MONOTONIC
//!   (`stasis-traffic clockx`, one exchange per 100 ms),
//! - the CPU allocation: busy-loop iterations per 100 ms of guest time
//!   before vs after the checkpoint.
//!
//! The analysis ([`analyse`]) is I/O-free over timestamped console lines.

use crate::run::Line;
use crate::stats::{iqr, mean, median, percentile};
use serde::Serialize;
use serde_json::Value;

/// The clocks whose steps are measured.
pub const CLOCKS: [&str; 4] = ["mono", "real", "boot", "tsc"];
/// The nodes of the experiment.
pub const NODES: [&str; 2] = ["a", "b"];

/// Windows of the analysis, in host ns around a checkpoint command.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Windows {
    /// Δθ: median θ over this long before the command / after it returned.
    pub theta_ns: u64,
    /// Work rate: mean over this long before / after.
    pub work_ns: u64,
    /// Steps: kmod/probe lines arriving up to this long after the command
    /// returned still cover the checkpoint.
    pub step_tail_ns: u64,
}

impl Default for Windows {
    fn default() -> Self {
        Windows { theta_ns: 3_000_000_000, work_ns: 2_000_000_000, step_tail_ns: 1_500_000_000 }
    }
}

/// The experiment spec (TOML): nodes `a`, `b` on one 0 ms link.
pub fn spec(name: &str) -> String {
    let node = |n: &str, clockx: &str| {
        format!(
            "[[node]]\nname = \"{n}\"\nrun = [\"stasis-probe --node {n} --report-ms 500 --kmod /proc/stasis_fw\", \"{clockx}\", \"sleep 1; stasis-traffic work --node {n} --nice 19 --kmod /proc/stasis_fw\"]\n"
        )
    };
    format!(
        "name = \"{name}\"\n[defaults]\nmemory = \"256M\"\n\n{}{}\n[[link]]\nname = \"l0\"\na = \"a\"\nb = \"b\"\ndelay = \"0ms\"\n",
        node("a", "stasis-traffic clockx --serve 7000 --node a"),
        node("b", "sleep 2; stasis-traffic clockx --peer 10.0.1.1:7000 --node b"),
    )
}

/// Largest step of each clock, ns (`None`: no report covered it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Steps {
    pub mono: Option<i64>,
    pub real: Option<i64>,
    pub boot: Option<i64>,
    pub tsc: Option<i64>,
}

impl Steps {
    /// The value for `clock` (one of [`CLOCKS`]).
    pub fn get(&self, clock: &str) -> Option<i64> {
        match clock {
            "mono" => self.mono,
            "real" => self.real,
            "boot" => self.boot,
            _ => self.tsc,
        }
    }
    fn fold(&mut self, obj: &Value) {
        for (slot, c) in
            [(&mut self.mono, "mono"), (&mut self.real, "real"), (&mut self.boot, "boot"), (&mut self.tsc, "tsc")]
        {
            if let Some(v) = obj[c].as_i64() {
                *slot = Some(slot.map_or(v, |s| s.max(v)));
            }
        }
    }
}

/// One node's figures around one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFigures {
    pub node: String,
    /// Guest-kmod (1 ms hrtimer) largest step per clock over the kmod
    /// windows covering the checkpoint.
    pub kmod_step_ns: Steps,
    /// Kmod windows that covered it.
    pub kmod_windows: usize,
    /// Userspace probe (10 ms samples) largest step per clock.
    pub probe_step_ns: Steps,
    /// Mean work rate (iterations per guest ms) before / after.
    pub work_before: Option<f64>,
    pub work_after: Option<f64>,
    /// after / before.
    pub work_ratio: Option<f64>,
}

/// The inter-VM offset across one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Theta {
    pub before_median_ns: Option<f64>,
    pub after_median_ns: Option<f64>,
    /// after − before: the skew the checkpoint introduced between the guests.
    pub delta_ns: Option<f64>,
    pub n_before: usize,
    pub n_after: usize,
    pub iqr_before_ns: Option<f64>,
    pub iqr_after_ns: Option<f64>,
    /// Δθ from the quarter of each window's exchanges with the shortest
    /// round trip δ (NTP's minimum-delay filter: queueing and descheduling
    /// lengthen δ and bias θ).
    pub delta_fast_ns: Option<f64>,
}

/// Everything measured about one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRecord {
    pub pause_s: u64,
    /// 1-based within its pause.
    pub index: usize,
    /// Host CLOCK_MONOTONIC when `stasis checkpoint` started / returned.
    pub host_start_ns: u64,
    pub host_end_ns: u64,
    /// What `stasis checkpoint --json` printed.
    pub checkpoint: Value,
    pub nodes: Vec<NodeFigures>,
    pub theta: Theta,
    /// Each VM's frozen time as the host measured it (manifest `frozen_ns`).
    pub host_frozen_ns: Vec<(String, u64)>,
    /// The Δθ those predict: θ = a − b, so frozen_b − frozen_a.
    pub predicted_dtheta_ns: Option<f64>,
}

/// Each VM's `frozen_ns` from `stasis show --json`, and the Δθ they predict.
pub fn host_frozen(show: &Value) -> (Vec<(String, u64)>, Option<f64>) {
    let v: Vec<(String, u64)> = show["manifest"]["components"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["kind"] == "Vm" || c["kind"] == "vm")
                .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["frozen_ns"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let get = |n: &str| v.iter().find(|x| x.0 == n).map(|x| x.1 as f64);
    let pred = get("a").zip(get("b")).map(|(a, b)| b - a);
    (v, pred)
}

/// Steady-state noise, measured before the first checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub host_from_ns: u64,
    pub host_to_ns: u64,
    /// IQR of θ: the exchange's own noise.
    pub theta_iqr_ns: Option<f64>,
    /// IQR of θ over the quarter of exchanges with the shortest δ.
    pub theta_fast_iqr_ns: Option<f64>,
    pub theta_n: usize,
    /// Median round-trip delay δ.
    pub delay_median_ns: Option<f64>,
    /// Per-window kmod step p50/p99 per clock, all nodes (ns).
    pub kmod_step_p50_ns: Vec<(String, Option<f64>)>,
    pub kmod_step_p99_ns: Vec<(String, Option<f64>)>,
    /// Per node: work-rate p5/p50/p95 over 100 ms windows (iterations/ms).
    pub work_rate: Vec<(String, [Option<f64>; 3])>,
}

fn tool<'a>(lines: &'a [Line], node: &'a str, tool: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
    lines.iter().filter(move |l| l.node == node && l.v["tool"] == tool)
}

fn work_rate(l: &Line) -> Option<f64> {
    let iters = l.v["iters"].as_f64()?;
    let len = l.v["len_ns"].as_f64()?;
    (len > 0.0).then(|| iters / (len / 1e6))
}

/// (t1, θ, δ) of node b's exchanges arriving in `[from, to)` host ns.
fn exchanges(lines: &[Line], from: u64, to: u64) -> Vec<(u64, f64, f64)> {
    tool(lines, "b", "clockx")
        .filter(|l| l.host_ns >= from && l.host_ns < to)
        .filter_map(|l| Some((l.v["t1"].as_u64()?, l.v["theta_ns"].as_f64()?, l.v["delta_ns"].as_f64()?)))
        .collect()
}

/// Median θ of the exchanges whose δ is at most the window's 25th percentile.
pub fn fast_median(xs: &[(u64, f64, f64)]) -> Option<f64> {
    let d: Vec<f64> = xs.iter().map(|x| x.2).collect();
    let cut = percentile(&d, 25.0)?;
    median(&xs.iter().filter(|x| x.2 <= cut).map(|x| x.1).collect::<Vec<_>>())
}

/// The figures of one checkpoint whose command ran over `[start, end]` host ns.
pub fn analyse(lines: &[Line], start: u64, end: u64, w: &Windows) -> (Vec<NodeFigures>, Theta) {
    let mut nodes = Vec::new();
    for node in NODES {
        let cover = |l: &&Line| l.host_ns >= start && l.host_ns <= end + w.step_tail_ns;
        let mut kmod = Steps::default();
        let mut n = 0;
        for l in tool(lines, node, "kmodw").filter(cover) {
            kmod.fold(&l.v["kmod"]["max_step_ns"]);
            n += 1;
        }
        let mut probe = Steps::default();
        for l in tool(lines, node, "probe").filter(cover) {
            probe.fold(&l.v["max_step_ns"]);
        }
        let rates = |from: u64, to: u64| -> Vec<f64> {
            tool(lines, node, "work").filter(|l| l.host_ns >= from && l.host_ns < to).filter_map(work_rate).collect()
        };
        let before = mean(&rates(start.saturating_sub(w.work_ns), start));
        let after = mean(&rates(end + 1, end + 1 + w.work_ns));
        let ratio = match (before, after) {
            (Some(b), Some(a)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        nodes.push(NodeFigures {
            node: node.to_string(),
            kmod_step_ns: kmod,
            kmod_windows: n,
            probe_step_ns: probe,
            work_before: before,
            work_after: after,
            work_ratio: ratio,
        });
    }
    // θ: the last theta_ns (guest time) of exchanges seen before the command,
    // the first theta_ns of those seen after it returned.
    let before_all = exchanges(lines, 0, start);
    let after_all = exchanges(lines, end + 1, u64::MAX);
    let last_t1 = before_all.iter().map(|x| x.0).max().unwrap_or(0);
    let first_t1 = after_all.iter().map(|x| x.0).min().unwrap_or(0);
    let before_x: Vec<(u64, f64, f64)> = before_all.into_iter().filter(|x| x.0 + w.theta_ns >= last_t1).collect();
    let after_x: Vec<(u64, f64, f64)> = after_all.into_iter().filter(|x| x.0 <= first_t1 + w.theta_ns).collect();
    let before: Vec<f64> = before_x.iter().map(|x| x.1).collect();
    let after: Vec<f64> = after_x.iter().map(|x| x.1).collect();
    let (bm, am) = (median(&before), median(&after));
    let theta = Theta {
        before_median_ns: bm,
        after_median_ns: am,
        delta_ns: bm.zip(am).map(|(b, a)| a - b),
        n_before: before.len(),
        n_after: after.len(),
        iqr_before_ns: iqr(&before),
        iqr_after_ns: iqr(&after),
        delta_fast_ns: fast_median(&before_x).zip(fast_median(&after_x)).map(|(b, a)| a - b),
    };
    (nodes, theta)
}

/// Steady-state noise over lines arriving in `[from, to)` host ns.
pub fn steady(lines: &[Line], from: u64, to: u64) -> Steady {
    let inside = |l: &&Line| l.host_ns >= from && l.host_ns < to;
    let xs = exchanges(lines, from, to);
    let th: Vec<f64> = xs.iter().map(|x| x.1).collect();
    let cut = percentile(&xs.iter().map(|x| x.2).collect::<Vec<_>>(), 25.0).unwrap_or(f64::MAX);
    let fast: Vec<f64> = xs.iter().filter(|x| x.2 <= cut).map(|x| x.1).collect();
    let delays: Vec<f64> = tool(lines, "b", "clockx").filter(inside).filter_map(|l| l.v["delta_ns"].as_f64()).collect();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for c in CLOCKS {
        let xs: Vec<f64> = lines
            .iter()
            .filter(|l| l.v["tool"] == "kmodw")
            .filter(inside)
            .filter_map(|l| l.v["kmod"]["max_step_ns"][c].as_f64())
            .collect();
        p50.push((c.to_string(), percentile(&xs, 50.0)));
        p99.push((c.to_string(), percentile(&xs, 99.0)));
    }
    let work_rate = NODES
        .iter()
        .map(|n| {
            let r: Vec<f64> = tool(lines, n, "work").filter(inside).filter_map(work_rate).collect();
            (n.to_string(), [percentile(&r, 5.0), percentile(&r, 50.0), percentile(&r, 95.0)])
        })
        .collect();
    Steady {
        host_from_ns: from,
        host_to_ns: to,
        theta_iqr_ns: iqr(&th),
        theta_fast_iqr_ns: iqr(&fast),
        theta_n: th.len(),
        delay_median_ns: median(&delays),
        kmod_step_p50_ns: p50,
        kmod_step_p99_ns: p99,
        work_rate,
    }
}

/// One row of the summary table: the figures of all checkpoints of a pause.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub pause_s: u64,
    pub checkpoints: usize,
    /// Per clock: p50, p99 of the kmod step over checkpoints × nodes, ns.
    pub kmod_step_ns: Vec<(String, Option<f64>, Option<f64>)>,
    /// Per clock: p50, p99 of the probe step, ns.
    pub probe_step_ns: Vec<(String, Option<f64>, Option<f64>)>,
    /// Δθ p50 and p99 of |Δθ|, ns.
    pub dtheta_p50_ns: Option<f64>,
    pub abs_dtheta_p99_ns: Option<f64>,
    /// The same from the minimum-delay quarter of the exchanges.
    pub dtheta_fast_p50_ns: Option<f64>,
    pub abs_dtheta_fast_p99_ns: Option<f64>,
    /// p50 of |Δθ − predicted Δθ| (host-measured frozen times), ns.
    pub abs_dtheta_vs_host_p50_ns: Option<f64>,
    /// Work ratio after/before over checkpoints × nodes: p50, min, max.
    pub work_ratio: [Option<f64>; 3],
    /// Median time frozen as the CLI reports it, ms.
    pub frozen_ms_p50: Option<f64>,
}

/// Summarises the records of one pause.
pub fn summarise(pause_s: u64, recs: &[&CheckpointRecord]) -> Summary {
    let col = |f: &dyn Fn(&NodeFigures) -> Option<f64>| -> Vec<f64> {
        recs.iter().flat_map(|r| r.nodes.iter()).filter_map(f).collect()
    };
    let per_clock = |probe: bool| {
        CLOCKS
            .iter()
            .map(|c| {
                let xs = col(&|n| if probe { &n.probe_step_ns } else { &n.kmod_step_ns }.get(c).map(|v| v as f64));
                (c.to_string(), percentile(&xs, 50.0), percentile(&xs, 99.0))
            })
            .collect()
    };
    let dth: Vec<f64> = recs.iter().filter_map(|r| r.theta.delta_ns).collect();
    let abs: Vec<f64> = dth.iter().map(|x| x.abs()).collect();
    let fast: Vec<f64> = recs.iter().filter_map(|r| r.theta.delta_fast_ns).collect();
    let fast_abs: Vec<f64> = fast.iter().map(|x| x.abs()).collect();
    let vs_host: Vec<f64> =
        recs.iter().filter_map(|r| Some((r.theta.delta_ns? - r.predicted_dtheta_ns?).abs())).collect();
    let ratios = col(&|n| n.work_ratio);
    let frozen: Vec<f64> =
        recs.iter().filter_map(|r| r.checkpoint["frozen_duration_ns"].as_f64()).map(|x| x / 1e6).collect();
    Summary {
        pause_s,
        checkpoints: recs.len(),
        kmod_step_ns: per_clock(false),
        probe_step_ns: per_clock(true),
        dtheta_p50_ns: median(&dth),
        abs_dtheta_p99_ns: percentile(&abs, 99.0),
        abs_dtheta_vs_host_p50_ns: median(&vs_host),
        dtheta_fast_p50_ns: median(&fast),
        abs_dtheta_fast_p99_ns: percentile(&fast_abs, 99.0),
        work_ratio: [median(&ratios), percentile(&ratios, 0.0), percentile(&ratios, 100.0)],
        frozen_ms_p50: median(&frozen),
    }
}

/// Formats ns as ms with 3 decimals (or `-`).
pub fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{:.3}", x / 1e6)).unwrap_or_else(|| "-".into())
}

/// The summary table in Markdown.
pub fn table(sums: &[Summary]) -> String {
    let mut s = String::from(
        "| pause | ckpts | frozen ms p50 | kmod step ms p50/p99: mono | real | boot | tsc | probe step ms p50/p99: mono | Δθ µs p50 | \\|Δθ\\| µs p99 | min-δ Δθ µs p50 / \\|·\\| p99 | \\|Δθ − host-predicted\\| µs p50 | work after/before p50 [min, max] |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let us = |v: Option<f64>| v.map(|x| format!("{:.1}", x / 1e3)).unwrap_or_else(|| "-".into());
    let r = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    for m in sums {
        let k = |i: usize| format!("{} / {}", ms(m.kmod_step_ns[i].1), ms(m.kmod_step_ns[i].2));
        s.push_str(&format!(
            "| {} s | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} / {} | {} | {} [{}, {}] |\n",
            m.pause_s,
            m.checkpoints,
            m.frozen_ms_p50.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into()),
            k(0),
            k(1),
            k(2),
            k(3),
            ms(m.probe_step_ns[0].1),
            ms(m.probe_step_ns[0].2),
            us(m.dtheta_p50_ns),
            us(m.abs_dtheta_p99_ns),
            us(m.dtheta_fast_p50_ns),
            us(m.abs_dtheta_fast_p99_ns),
            us(m.abs_dtheta_vs_host_p50_ns),
            r(m.work_ratio[0]),
            r(m.work_ratio[1]),
            r(m.work_ratio[2]),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(host_s: f64, node: &str, v: Value) -> Line {
        Line { host_ns: (host_s * 1e9) as u64, node: node.into(), v }
    }

    /// A synthetic run: the checkpoint command runs over host [10 s, 12 s];
    /// node b's clock gains 200 µs on a's at it; the kmod window covering it
    /// sees a 5 ms step; work runs 10 % slower after.
    fn synthetic() -> Vec<Line> {
        let mut v = Vec::new();
        for i in 0..200u64 {
            let host = i as f64 * 0.1;
            if (10.0..12.0).contains(&host) {
                continue; // frozen
            }
            let guest_t1 = if host < 10.0 { host } else { host - 2.0 } * 1e9;
            let theta = if host < 10.0 { 1e6 } else { 1e6 + 200e3 } + if i % 2 == 0 { 10e3 } else { -10e3 };
            v.push(line(host, "b", json!({"tool":"clockx","t1":guest_t1 as u64,"theta_ns":theta,"delta_ns":50000})));
            for n in NODES {
                let iters = if host < 10.0 { 1000 } else { 900 };
                v.push(line(host, n, json!({"tool":"work","iters":iters,"len_ns":100_000_000})));
                if i % 10 == 0 {
                    let step = if (12.0..13.0).contains(&host) { 5_000_000 } else { 1_000 };
                    v.push(line(
                        host,
                        n,
                        json!({"tool":"kmodw","kmod":{"max_step_ns":{"mono":step,"real":step,"boot":step,"tsc":step}}}),
                    ));
                    v.push(line(
                        host,
                        n,
                        json!({"tool":"probe","max_step_ns":{"mono":step * 2,"real":0,"boot":0,"tsc":0}}),
                    ));
                }
            }
        }
        v
    }

    #[test]
    fn analyse_finds_the_introduced_skew_steps_and_work_ratio() {
        let lines = synthetic();
        let (nodes, theta) = analyse(&lines, 10_000_000_000, 12_000_000_000, &Windows::default());
        let d = theta.delta_ns.expect("delta");
        assert!((d - 200e3).abs() < 1.0, "Δθ {d}");
        assert_eq!(theta.n_before, 31); // t1 within the last 3 s of guest time: 7.0..=9.9
        assert!(theta.iqr_before_ns.expect("iqr") <= 20e3);
        assert!((theta.delta_fast_ns.expect("fast") - 200e3).abs() < 20e3 + 1.0);
        for n in &nodes {
            assert_eq!(n.kmod_step_ns.mono, Some(5_000_000), "{}", n.node);
            assert_eq!(n.probe_step_ns.mono, Some(10_000_000));
            let r = n.work_ratio.expect("ratio");
            assert!((r - 0.9).abs() < 1e-9, "ratio {r}");
        }
        let s = steady(&lines, 0, 10_000_000_000);
        assert_eq!(s.kmod_step_p50_ns[0].1, Some(1_000.0));
        assert_eq!(s.theta_iqr_ns, Some(20e3));
        assert_eq!(s.work_rate[0].1[1], Some(10.0));
    }

    #[test]
    fn nothing_measured_is_none_not_zero() {
        let (nodes, theta) = analyse(&[], 10, 20, &Windows::default());
        assert_eq!(theta.delta_ns, None);
        assert!(nodes.iter().all(|n| n.kmod_step_ns.mono.is_none() && n.work_ratio.is_none() && n.kmod_windows == 0));
    }

    #[test]
    fn summary_takes_percentiles_over_checkpoints_and_nodes() {
        let lines = synthetic();
        let (nodes, theta) = analyse(&lines, 10_000_000_000, 12_000_000_000, &Windows::default());
        let rec = CheckpointRecord {
            pause_s: 1,
            index: 1,
            host_start_ns: 0,
            host_end_ns: 0,
            checkpoint: json!({"frozen_duration_ns": 1_500_000_000u64}),
            nodes,
            theta,
            host_frozen_ns: vec![],
            predicted_dtheta_ns: Some(200e3),
        };
        let s = summarise(1, &[&rec, &rec]);
        assert_eq!(s.kmod_step_ns[0].1, Some(5e6));
        assert_eq!(s.frozen_ms_p50, Some(1500.0));
        assert!(s.abs_dtheta_vs_host_p50_ns.expect("vs host") < 1.0);
        assert!(table(&[s]).contains("| 1 s | 2 | 1500 | 5.000 / 5.000"));
        let show = json!({"manifest":{"components":[{"name":"a","kind":"Vm","frozen_ns":1_000_000_000u64},{"name":"b","kind":"Vm","frozen_ns":1_000_300_000u64},{"name":"delay-node","kind":"DelayNode","frozen_ns":1u64}]}});
        let (v, pred) = host_frozen(&show);
        assert_eq!(v.len(), 2);
        assert_eq!(pred, Some(300_000.0));
    }
}
