//! The CPU-allocation eval, I/O-free: the work rate each guest sees (the
//! iterations of `stasis-traffic work` per second of its own
//! CLOCK_MONOTONIC) before and after each event, per-run ratios, arm
//! comparisons. The driver is `stasis-eval cpu` (src/cpu_cmd.rs).
//!
//! The unit is a run: one event, with a window of guest time before it and
//! one after it. A run's figure is the post/pre ratio of its work rate,
//! averaged over the VMs. On a shared host the absolute rate of a TCG guest
//! moves with every other process (whole runs differ by tens of per cent),
//! but it moves slowly: the ratio of two adjacent windows of the same run
//! cancels most of it, which is what lets a few dozen runs resolve ±2 %.
//! The absolute post-event rate is compared too, and reported, but it is
//! not what the verdict rests on.

use crate::run::Line;
use crate::stats::{bootstrap_ci_mean_diff, mean, tost_relative, variance, verdict, welch_t, Tost, TwoSample, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Significance level of every test.
pub const ALPHA: f64 = 0.05;
/// Bootstrap replicates (runs resampled within each arm).
pub const BOOT_REPS: usize = 10_000;
/// Fraction of a window that must be covered by work windows for its rate to count.
pub const MIN_COVERAGE: f64 = 0.8;
/// How far back from an event the host→guest clock mapping looks, ns.
pub const MAPPING_LOOKBACK_NS: u64 = 5_000_000_000;

/// One window of `stasis-traffic work`, with the host instant its line arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkWindow {
    /// Guest CLOCK_MONOTONIC at the window's end, ns.
    pub end_ns: u64,
    /// Its length in guest time, ns.
    pub len_ns: u64,
    pub iters: u64,
    /// Host CLOCK_MONOTONIC when the host read its line, ns.
    pub host_ns: u64,
}

impl WorkWindow {
    pub fn start_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.len_ns)
    }
}

/// The work windows `node` printed, in order. Lines that are not well-formed
/// `work` records are skipped.
pub fn work_windows(lines: &[Line], node: &str) -> Vec<WorkWindow> {
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let mut out: Vec<WorkWindow> = lines
        .iter()
        .filter(|l| l.node == node && l.v["tool"] == "work")
        .filter_map(|l| {
            Some(WorkWindow {
                end_ns: field(&l.v, "mono_ns")?,
                len_ns: field(&l.v, "len_ns").filter(|&n| n > 0)?,
                iters: field(&l.v, "iters")?,
                host_ns: l.host_ns,
            })
        })
        .collect();
    out.sort_by_key(|w| w.end_ns);
    out
}

/// The guest instant (CLOCK_MONOTONIC, ns) at host instant `host_ns`, from
/// the windows whose lines arrived in the [`MAPPING_LOOKBACK_NS`] before it.
/// A line arrives some latency after its window ends, so guest − arrival
/// underestimates guest − host by that latency; the largest value (the
/// least delayed line) is the estimate. Only lines from before the instant
/// count: a checkpoint that freezes the guest after it shifts the mapping.
pub fn guest_at(windows: &[WorkWindow], host_ns: u64) -> Option<u64> {
    let from = host_ns.saturating_sub(MAPPING_LOOKBACK_NS);
    let offset = windows
        .iter()
        .filter(|w| w.host_ns >= from && w.host_ns < host_ns)
        .map(|w| w.end_ns as i128 - w.host_ns as i128)
        .max()?;
    u64::try_from(host_ns as i128 + offset).ok()
}

/// Iterations per guest second in guest [from, to). A window that straddles
/// a bound counts with the part of it inside, its iterations in proportion
/// (a window is 100 ms; one that spans a host stall of the guest is longer,
/// and its few iterations mostly land where the stall was). `None` if the
/// windows cover less than [`MIN_COVERAGE`] of the span.
pub fn rate(windows: &[WorkWindow], from_ns: u64, to_ns: u64) -> Option<f64> {
    if to_ns <= from_ns {
        return None;
    }
    let (mut iters, mut len) = (0f64, 0u64);
    for w in windows.iter().filter(|w| w.end_ns > from_ns && w.start_ns() < to_ns) {
        let inside = w.end_ns.min(to_ns) - w.start_ns().max(from_ns);
        iters += w.iters as f64 * inside as f64 / w.len_ns as f64;
        len += inside;
    }
    if len == 0 || (len as f64) < MIN_COVERAGE * (to_ns - from_ns) as f64 {
        return None;
    }
    Some(iters * 1e9 / len as f64)
}

/// One node's rates around one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRates {
    pub node: String,
    /// The event's instant in this guest's time, ns.
    pub event_guest_ns: Option<u64>,
    /// Iterations per guest second in [event − pre, event) and [event, event + post).
    pub pre: Option<f64>,
    pub post: Option<f64>,
    /// post / pre.
    pub ratio: Option<f64>,
}

/// The windows around an event, guest seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Windows {
    pub pre_s: f64,
    pub post_s: f64,
}

/// The rates of `node` around the event at host instant `event_host_ns`.
pub fn node_rates(lines: &[Line], node: &str, event_host_ns: u64, w: &Windows) -> NodeRates {
    let ws = work_windows(lines, node);
    let g = guest_at(&ws, event_host_ns);
    let (pre, post) = match g {
        Some(g) => {
            let pre_ns = (w.pre_s * 1e9) as u64;
            let post_ns = (w.post_s * 1e9) as u64;
            (rate(&ws, g.saturating_sub(pre_ns), g), rate(&ws, g, g + post_ns))
        }
        None => (None, None),
    };
    let ratio = match (pre, post) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    NodeRates { node: node.to_string(), event_guest_ns: g, pre, post, ratio }
}

/// The work rate of `node` relative to its pre-event rate in `bin_s` bins of
/// guest time from `from_s` to `to_s` around the event: the curve of the
/// "around events" plot.
pub fn relative_curve(lines: &[Line], r: &NodeRates, from_s: f64, to_s: f64, bin_s: f64) -> Vec<(f64, f64)> {
    let (Some(g), Some(pre)) = (r.event_guest_ns, r.pre) else { return Vec::new() };
    let ws = work_windows(lines, &r.node);
    let mut out = Vec::new();
    let mut x = from_s;
    while x + bin_s <= to_s + 1e-9 {
        let a = g as i128 + (x * 1e9) as i128;
        let b = g as i128 + ((x + bin_s) * 1e9) as i128;
        if let (Ok(a), Ok(b)) = (u64::try_from(a), u64::try_from(b)) {
            if let Some(v) = rate(&ws, a, b) {
                out.push((x + bin_s / 2.0, v / pre));
            }
        }
        x += bin_s;
    }
    out
}

/// One run: its arm, its event and every node's rates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: u64,
    pub arm: String,
    /// Host CLOCK_MONOTONIC of the event (a checkpoint's freeze instant T).
    pub event_host_ns: u64,
    /// How long the event stopped the VMs (checkpoint, host-measured) or
    /// throttled them (control), ns.
    pub frozen_ns: u64,
    pub nodes: Vec<NodeRates>,
    /// The mean over nodes of [`relative_curve`] (for the plot).
    #[serde(default)]
    pub curve: Vec<(f64, f64)>,
    /// `stasis checkpoint --json`, the control's record, or null.
    pub detail: Value,
}

/// What the driver records of a run; [`analyse`] adds the rates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEvent {
    pub run: u64,
    pub arm: String,
    pub event_host_ns: u64,
    pub frozen_ns: u64,
    pub detail: Value,
}

/// The plot's bins, guest s.
pub const CURVE_BIN_S: f64 = 0.5;

/// Every run's rates and curve from the console lines.
pub fn analyse(lines: &[Line], events: &[RunEvent], nodes: &[&str], w: &Windows) -> Vec<RunRecord> {
    events
        .iter()
        .map(|e| {
            let rates: Vec<NodeRates> = nodes.iter().map(|n| node_rates(lines, n, e.event_host_ns, w)).collect();
            let curves: Vec<Vec<(f64, f64)>> =
                rates.iter().map(|r| relative_curve(lines, r, -w.pre_s, w.post_s, CURVE_BIN_S)).collect();
            RunRecord {
                run: e.run,
                arm: e.arm.clone(),
                event_host_ns: e.event_host_ns,
                frozen_ns: e.frozen_ns,
                nodes: rates,
                curve: mean_curve(&curves),
                detail: e.detail.clone(),
            }
        })
        .collect()
}

/// Pointwise mean of curves over the x values they share (bins are aligned).
pub fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut acc: Vec<(f64, f64, usize)> = Vec::new();
    for c in curves {
        for &(x, y) in c {
            match acc.iter_mut().find(|(ax, _, _)| (ax - x).abs() < 1e-6) {
                Some(a) => {
                    a.1 += y;
                    a.2 += 1;
                }
                None => acc.push((x, y, 1)),
            }
        }
    }
    acc.sort_by(|a, b| a.0.total_cmp(&b.0));
    acc.into_iter().map(|(x, y, n)| (x, y / n as f64)).collect()
}

impl RunRecord {
    /// The mean of the nodes' post/pre ratios (`None` unless every node has one).
    pub fn ratio(&self) -> Option<f64> {
        let v: Option<Vec<f64>> = self.nodes.iter().map(|n| n.ratio).collect();
        v.and_then(|v| mean(&v))
    }

    /// The summed post-event rate of every node, iterations per guest second.
    pub fn post_rate(&self) -> Option<f64> {
        self.nodes.iter().map(|n| n.post).sum()
    }
}

/// One arm against the baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// TOST on the per-run post/pre ratio, relative to the baseline's mean ratio.
    pub tost: Option<Tost>,
    pub welch: Option<TwoSample>,
    /// Bootstrap 95 % CI of the mean ratio difference, relative to the baseline's mean ratio.
    pub boot_ci_rel: Option<(f64, f64)>,
    pub verdict: Verdict,
    /// The same TOST on the absolute post-event rate (reported; host load dominates it).
    pub abs_tost: Option<Tost>,
    pub abs_verdict: Verdict,
}

/// One arm's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub runs: usize,
    pub mean_ratio: Option<f64>,
    pub sd_ratio: Option<f64>,
    /// Mean post-event rate, million iterations per guest second (all nodes).
    pub post_mips: Option<f64>,
    pub frozen_ms: Option<f64>,
    pub vs_baseline: Option<Comparison>,
}

fn compare(base: &[&RunRecord], arm: &[&RunRecord], margin: f64) -> Comparison {
    let ratios = |rs: &[&RunRecord]| rs.iter().filter_map(|r| r.ratio()).collect::<Vec<_>>();
    let posts = |rs: &[&RunRecord]| rs.iter().filter_map(|r| r.post_rate()).collect::<Vec<_>>();
    let (b, a) = (ratios(base), ratios(arm));
    let tost = tost_relative(&b, &a, margin, ALPHA);
    let welch = welch_t(&b, &a);
    let mb = mean(&b);
    let boot_ci_rel = bootstrap_ci_mean_diff(&b, &a, BOOT_REPS, 0.95, 0x5eed_c0de)
        .zip(mb)
        .filter(|(_, m)| *m > 0.0)
        .map(|((lo, hi), m)| (lo / m, hi / m));
    let v = verdict(tost.as_ref(), &[welch.map(|w| w.p)], ALPHA);
    let (pb, pa) = (posts(base), posts(arm));
    let abs_tost = tost_relative(&pb, &pa, margin, ALPHA);
    let abs_verdict = verdict(abs_tost.as_ref(), &[welch_t(&pb, &pa).map(|w| w.p)], ALPHA);
    Comparison { tost, welch, boot_ci_rel, verdict: v, abs_tost, abs_verdict }
}

fn arm_summary(name: &str, rs: &[&RunRecord], base: Option<&[&RunRecord]>, margin: f64) -> ArmSummary {
    let ratios: Vec<f64> = rs.iter().filter_map(|r| r.ratio()).collect();
    let posts: Vec<f64> = rs.iter().filter_map(|r| r.post_rate()).map(|v| v / 1e6).collect();
    let frozen: Vec<f64> = rs.iter().map(|r| r.frozen_ns as f64 / 1e6).collect();
    ArmSummary {
        arm: name.to_string(),
        runs: rs.len(),
        mean_ratio: mean(&ratios),
        sd_ratio: variance(&ratios).map(f64::sqrt),
        post_mips: mean(&posts),
        frozen_ms: mean(&frozen),
        vs_baseline: base.map(|b| compare(b, rs, margin)),
    }
}

/// Every arm against `baseline` (which comes first, without a comparison).
pub fn summarise(runs: &[RunRecord], arms: &[String], baseline: &str, margin: f64) -> Vec<ArmSummary> {
    let by = |a: &str| runs.iter().filter(|r| r.arm == a).collect::<Vec<_>>();
    let base = by(baseline);
    let mut out = vec![arm_summary(baseline, &base, None, margin)];
    for a in arms.iter().filter(|a| a.as_str() != baseline) {
        out.push(arm_summary(a, &by(a), Some(&base), margin));
    }
    out
}

/// The instruments' A/A check: the baseline's runs in odd rounds against its
/// runs in even rounds (no treatment on either side). Needs ≥ 4 baseline runs.
pub fn aa_check(runs: &[RunRecord], baseline: &str, margin: f64) -> Option<ArmSummary> {
    let base: Vec<&RunRecord> = runs.iter().filter(|r| r.arm == baseline).collect();
    if base.len() < 4 {
        return None;
    }
    let even: Vec<&RunRecord> = base.iter().copied().step_by(2).collect();
    let odd: Vec<&RunRecord> = base.iter().copied().skip(1).step_by(2).collect();
    Some(arm_summary(&format!("A/A ({baseline} odd vs even)"), &odd, Some(&even), margin))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:+.1} %", v * 100.0))
}

fn ci(x: Option<(f64, f64)>) -> String {
    x.map_or("–".into(), |(a, b)| format!("[{:+.1}, {:+.1}]", a * 100.0, b * 100.0))
}

/// The summary as a Markdown table.
pub fn table(sums: &[ArmSummary]) -> String {
    let mut t = String::from(
        "| arm | runs | post/pre ratio (sd) | Δ ratio [90 % CI] | bootstrap 95 % CI | Welch p | verdict | post Mit/s | Δ abs [90 % CI] | abs verdict | frozen ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in sums {
        let c = s.vs_baseline.as_ref();
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.arm,
            s.runs,
            match (s.mean_ratio, s.sd_ratio) {
                (Some(m), Some(sd)) => format!("{m:.4} ({sd:.4})"),
                (Some(m), None) => format!("{m:.4}"),
                _ => "–".into(),
            },
            c.and_then(|c| c.tost).map_or("–".into(), |t| format!("{} {}", pct(Some(t.rel_diff)), ci(Some(t.ci)))),
            ci(c.and_then(|c| c.boot_ci_rel)),
            c.and_then(|c| c.welch).map_or("–".into(), |w| format!("{:.3}", w.p)),
            c.map_or("–".into(), |c| format!("**{}**", c.verdict)),
            s.post_mips.map_or("–".into(), |v| format!("{v:.2}")),
            c.and_then(|c| c.abs_tost).map_or("–".into(), |t| format!(
                "{} {}",
                pct(Some(t.rel_diff)),
                ci(Some(t.ci))
            )),
            c.map_or("–".into(), |c| c.abs_verdict.to_string()),
            s.frozen_ms.map_or("–".into(), |v| format!("{v:.0}")),
        ));
    }
    t
}

/// One line per run and node, for spreadsheets.
pub fn runs_csv(runs: &[RunRecord]) -> String {
    let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
    let mut s = String::from("run,arm,node,frozen_ms,pre_its,post_its,ratio\n");
    for r in runs {
        for n in &r.nodes {
            s.push_str(&format!(
                "{},{},{},{:.3},{},{},{}\n",
                r.run,
                r.arm,
                n.node,
                r.frozen_ns as f64 / 1e6,
                f(n.pre),
                f(n.post),
                f(n.ratio)
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: u64 = 1_000_000_000;

    /// Work lines of one node: 100 ms windows of guest time, `rate(g)`
    /// iterations per second, guest = host + `offset` (host arrival 3 ms
    /// after each window's end), from guest `from` to `to`.
    fn lines(node: &str, from: u64, to: u64, offset: i64, rate: impl Fn(u64) -> f64) -> Vec<Line> {
        let mut out = Vec::new();
        let mut g = from;
        while g + S / 10 <= to {
            let end = g + S / 10;
            let iters = (rate(g) * 0.1) as u64;
            out.push(Line {
                host_ns: (end as i64 - offset) as u64 + 3_000_000,
                node: node.into(),
                v: json!({"tool": "work", "node": node, "mono_ns": end, "len_ns": S / 10, "iters": iters}),
            });
            g = end;
        }
        out
    }

    #[test]
    fn the_host_instant_maps_to_guest_time_from_earlier_lines() {
        let l = lines("a", 10 * S, 30 * S, 7 * S as i64, |_| 1e6);
        let ws = work_windows(&l, "a");
        // host 20 s ↔ guest 27 s, less the 3 ms arrival latency at most.
        let g = guest_at(&ws, 20 * S).unwrap();
        assert!((27 * S - 3_000_000..=27 * S).contains(&g), "{g}");
        assert_eq!(guest_at(&ws, 1), None, "no line before the instant");
    }

    #[test]
    fn rates_before_and_after_see_a_loss_and_no_loss() {
        let w = Windows { pre_s: 5.0, post_s: 5.0 };
        let flat = lines("a", 0, 40 * S, 0, |_| 2e6);
        let r = node_rates(&flat, "a", 20 * S, &w);
        assert!((r.ratio.unwrap() - 1.0).abs() < 0.002, "{r:?}");
        assert!((r.pre.unwrap() - 2e6).abs() < 1.0);
        // A guest that gets no CPU for 1 s of its own time after the event.
        let lossy = lines("a", 0, 40 * S, 0, |g| if (20 * S..21 * S).contains(&g) { 0.0 } else { 2e6 });
        let r = node_rates(&lossy, "a", 20 * S, &w);
        assert!((r.ratio.unwrap() - 0.8).abs() < 0.01, "{r:?}");
        let curve = relative_curve(&lossy, &r, -2.0, 4.0, 0.5);
        assert!(curve.iter().any(|&(x, y)| x > 0.0 && x < 1.0 && y < 0.01), "{curve:?}");
        assert!(curve.iter().all(|&(x, y)| x >= 0.0 || (y - 1.0).abs() < 0.01), "{curve:?}");
    }

    #[test]
    fn a_host_stall_of_the_guest_lands_after_the_event() {
        // Windows of 100 ms, then one window of 2.1 s (the guest's clock ran
        // on while the host did not run it) holding only 100 ms of work.
        let mut l = lines("a", 0, 20 * S, 0, |_| 1e6);
        let stalled_end = 20 * S + 2_100_000_000;
        l.push(Line {
            host_ns: stalled_end + 3_000_000,
            node: "a".into(),
            v: json!({"tool": "work", "node": "a", "mono_ns": stalled_end, "len_ns": 2_100_000_000u64, "iters": 100_000}),
        });
        let mut after = lines("a", stalled_end, 40 * S, 0, |_| 1e6);
        l.append(&mut after);
        let r = node_rates(&l, "a", 20 * S + 50_000_000, &Windows { pre_s: 5.0, post_s: 5.0 });
        let ratio = r.ratio.unwrap();
        assert!(ratio > 0.55 && ratio < 0.65, "≈ 3 s of work in 5 s: {r:?}");
        let runs = analyse(
            &l,
            &[RunEvent { run: 1, arm: "control".into(), event_host_ns: 20 * S, frozen_ns: 2 * S, detail: Value::Null }],
            &["a"],
            &Windows { pre_s: 5.0, post_s: 5.0 },
        );
        assert!(runs[0].ratio().unwrap() < 0.7 && !runs[0].curve.is_empty(), "{:?}", runs[0]);
    }

    #[test]
    fn a_window_with_missing_lines_has_no_rate() {
        let l = lines("a", 0, 10 * S, 0, |_| 1e6);
        let ws = work_windows(&l, "a");
        assert!(rate(&ws, 0, 10 * S).is_some());
        assert_eq!(rate(&ws, 5 * S, 15 * S), None, "half the window has no lines");
        assert_eq!(rate(&ws, 5 * S, 5 * S), None);
        assert!(work_windows(&l, "b").is_empty());
    }

    fn run(n: u64, arm: &str, ratio: f64) -> RunRecord {
        RunRecord {
            run: n,
            arm: arm.into(),
            event_host_ns: 0,
            frozen_ns: 0,
            nodes: ["a", "b"]
                .iter()
                .map(|node| NodeRates {
                    node: (*node).into(),
                    event_guest_ns: Some(0),
                    pre: Some(1e6 * (1.0 + n as f64 * 0.1)),
                    post: Some(1e6 * (1.0 + n as f64 * 0.1) * ratio),
                    ratio: Some(ratio),
                })
                .collect(),
            curve: Vec::new(),
            detail: Value::Null,
        }
    }

    #[test]
    fn the_comparison_finds_equivalence_and_a_control() {
        // Absolute rates differ by up to 90 % between runs; ratios by ±0.3 %.
        let jitter = |i: u64| 1.0 + [0.003, -0.002, 0.001, -0.003, 0.002, 0.0, -0.001, 0.002][i as usize % 8];
        let mut runs = Vec::new();
        for i in 0..8 {
            runs.push(run(i, "none", jitter(i)));
            runs.push(run(i, "ckpt", jitter(i + 3)));
            runs.push(run(i, "control", 0.9 * jitter(i + 5)));
        }
        let arms = vec!["none".to_string(), "control".into(), "ckpt".into()];
        let s = summarise(&runs, &arms, "none", 0.02);
        assert_eq!(s[0].arm, "none");
        assert!(s[0].vs_baseline.is_none());
        let get = |a: &str| s.iter().find(|x| x.arm == a).unwrap().vs_baseline.clone().unwrap();
        assert_eq!(get("ckpt").verdict, Verdict::Equivalent, "{:?}", get("ckpt"));
        assert_eq!(get("control").verdict, Verdict::Different, "{:?}", get("control"));
        assert!(get("control").tost.unwrap().rel_diff < -0.09);
        // The absolute rates vary too much between runs to show anything.
        assert_ne!(get("ckpt").abs_verdict, Verdict::Equivalent);
        let aa = aa_check(&runs, "none", 0.02).unwrap();
        assert_eq!(aa.vs_baseline.unwrap().verdict, Verdict::Equivalent);
        let t = table(&s);
        assert!(t.contains("| ckpt | 8 |") && t.contains("**equivalent**") && t.contains("**different**"), "{t}");
        assert_eq!(runs_csv(&runs).lines().count(), 1 + 24 * 2);
    }

    #[test]
    fn too_few_runs_are_not_shown_equivalent() {
        let runs = vec![run(0, "none", 1.0), run(0, "ckpt", 1.0)];
        let s = summarise(&runs, &["none".into(), "ckpt".into()], "none", 0.02);
        assert_eq!(s[1].vs_baseline.as_ref().unwrap().verdict, Verdict::NotShownEquivalent);
        assert!(aa_check(&runs, "none", 0.02).is_none());
    }
}
