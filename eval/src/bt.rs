//! The BitTorrent eval's data side (I/O-free): the experiment spec, the
//! per-leecher records read from `stasis-bt` console lines, progress curves,
//! and the per-arm comparison (TOST on mean completion time, KS and
//! Anderson–Darling on its distribution, bootstrap CI, largest gap between
//! mean progress curves) with its verdict. The runner is `stasis-eval bt`.

use crate::run::Line;
use crate::stats::{self, Tost, TwoSample, Verdict};
use serde::{Deserialize, Serialize};

/// The arms of the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// No checkpoint: the baseline.
    None,
    /// Stop-and-copy checkpoints (`stasis checkpoint`) at fixed instants.
    Ckpt,
    /// Not transparent on purpose: the delay node alone is frozen for a few
    /// seconds at the same instants while the guests keep running.
    Control,
}

impl Arm {
    /// All arms, baseline first.
    pub const ALL: [Arm; 3] = [Arm::None, Arm::Ckpt, Arm::Control];

    /// Its name in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Arm::None => "none",
            Arm::Ckpt => "ckpt",
            Arm::Control => "control",
        }
    }

    /// RGB colour in plots.
    pub fn color(self) -> (u8, u8, u8) {
        match self {
            Arm::None => (0, 0, 200),
            Arm::Ckpt => (0, 150, 0),
            Arm::Control => (200, 0, 0),
        }
    }
}

/// Which payload baked into the guest image (guest/build.sh) a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// 32 MiB.
    Full,
    /// 4 MiB.
    Quick,
}

impl Payload {
    /// The name of its files under /etc/stasis-bt/ in the guest.
    pub fn name(self) -> &'static str {
        match self {
            Payload::Full => "full",
            Payload::Quick => "quick",
        }
    }
}

/// The leecher node names for `n` leechers: l1, l2, …
pub fn leecher_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("l{i}")).collect()
}

/// The experiment: seeder `s` (also the tracker: opentracker in whitelist
/// mode, fresh at every boot) and `leechers` leechers on one LAN through the
/// delay node, `bandwidth` and `delay` per member.
pub fn spec(name: &str, leechers: usize, payload: Payload, bandwidth: &str, delay: &str) -> String {
    let p = payload.name();
    let env = format!(". /etc/stasis-bt/{p}.env; mkdir -p /tmp/bt; ");
    let mut s = format!("name = \"{name}\"\n[defaults]\nmemory = \"256M\"\n\n");
    s.push_str(&format!(
        "[[node]]\nname = \"s\"\nrun = [\"mkdir -p /tmp/bt && cp /etc/stasis-bt/whitelist /tmp/bt/wl && opentracker -i 10.0.1.1 -p 6969 -P 6969 -d /tmp/bt -w wl -u nobody\", \"{env}stasis-bt seed --seed $BT_SEED --size $BT_SIZE --out /tmp/bt/payload.bin --torrent /etc/stasis-bt/{p}.torrent --node s\"]\n\n"
    ));
    for l in leecher_names(leechers) {
        s.push_str(&format!(
            "[[node]]\nname = \"{l}\"\nrun = [\"{env}stasis-bt leech --torrent /etc/stasis-bt/{p}.torrent --out /tmp/bt/payload.bin --sha1 $BT_SHA1 --size $BT_SIZE --piece-kib $BT_PIECE_KIB --tracker 10.0.1.1:6969 --info-hash $BT_INFO_HASH --node {l}\"]\n\n"
        ));
    }
    let members: Vec<String> =
        std::iter::once("s".to_string()).chain(leecher_names(leechers)).map(|n| format!("\"{n}\"")).collect();
    s.push_str(&format!(
        "[[lan]]\nname = \"lan0\"\nmembers = [{}]\nbandwidth = \"{bandwidth}\"\ndelay = \"{delay}\"\n",
        members.join(", ")
    ));
    s
}

/// One leecher in one run, from its console lines.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Leecher {
    /// Node name.
    pub node: String,
    /// Guest CLOCK_MONOTONIC when its client started, ns.
    pub start_ns: Option<u64>,
    /// Host instant its start line arrived, ns.
    pub start_host_ns: Option<u64>,
    /// (guest s since start, bytes done), in order; ends with the payload
    /// size when it completed.
    pub progress: Vec<(f64, f64)>,
    /// Guest seconds from start to completion.
    pub completion_s: Option<f64>,
    /// The completed file's SHA-1 matched the expected one.
    pub verified: Option<bool>,
    /// The SHA-1 it computed.
    pub sha1: Option<String>,
    /// Payload size, bytes.
    pub size: Option<u64>,
    /// The client exited before completing.
    pub error: bool,
}

impl Leecher {
    /// Done, and the data verified.
    pub fn ok(&self) -> bool {
        self.completion_s.is_some() && self.verified == Some(true)
    }

    /// The longest guest time without a new verified piece once data flows
    /// (from the first progress line with bytes > 0 to completion), s.
    /// CTorrent reports about once a second, so a flowing download shows
    /// ~1–2 s; a network frozen while the guest runs shows its freeze. A
    /// transparent checkpoint shows nothing: the guest's clock stops too.
    pub fn max_stall_s(&self) -> Option<f64> {
        let from = self.progress.iter().position(|p| p.1 > 0.0)?;
        self.progress[from..].windows(2).map(|w| w[1].0 - w[0].0).reduce(f64::max)
    }
}

/// Reads `node`'s `stasis-bt` lines.
pub fn leecher(lines: &[Line], node: &str) -> Leecher {
    let mut l = Leecher { node: node.to_string(), ..Leecher::default() };
    for x in lines.iter().filter(|x| x.node == node && x.v["tool"] == "bt" && x.v["role"] == "leech") {
        let v = &x.v;
        match v["event"].as_str() {
            Some("start") => {
                l.start_ns = v["t_ns"].as_u64();
                l.start_host_ns = Some(x.host_ns);
                l.size = v["size"].as_u64();
            }
            Some("progress") => {
                if let (Some(e), Some(b)) = (v["elapsed_ns"].as_f64(), v["bytes"].as_f64()) {
                    l.progress.push((e / 1e9, b));
                }
            }
            Some("done") => {
                l.completion_s = v["elapsed_ns"].as_f64().map(|e| e / 1e9);
                l.verified = v["verified"].as_bool();
                l.sha1 = v["sha1"].as_str().map(str::to_string);
                if let (Some(c), Some(b)) = (l.completion_s, v["bytes"].as_f64()) {
                    l.progress.push((c, b));
                }
            }
            Some("error") => l.error = true,
            _ => {}
        }
    }
    l
}

/// A disturbance during a run: a checkpoint or a freeze of the delay node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Host instant the command started, ns.
    pub host_start_ns: u64,
    /// Host instant it returned, ns.
    pub host_end_ns: u64,
    /// Its instant on the first leecher's guest clock, s since its start
    /// (from the last line that leecher printed before, plus host time since).
    pub guest_s: Option<f64>,
    /// What `stasis checkpoint --json` or the delay node answered.
    pub detail: serde_json::Value,
}

/// Maps a host instant to `l`'s guest seconds since its start: the elapsed
/// time of its last progress line that arrived at or before `host_ns`, plus
/// the host time since (the tailer's arrival time ±10 ms).
pub fn guest_s_at(lines: &[Line], node: &str, host_ns: u64) -> Option<f64> {
    let mut best: Option<(u64, f64)> = None;
    for x in lines.iter().filter(|x| x.node == node && x.v["tool"] == "bt" && x.host_ns <= host_ns) {
        let e = match x.v["event"].as_str() {
            Some("start") => Some(0.0),
            Some("progress") | Some("done") => x.v["elapsed_ns"].as_f64().map(|e| e / 1e9),
            _ => None,
        };
        if let Some(e) = e {
            best = Some((x.host_ns, e));
        }
    }
    best.map(|(h, e)| e + (host_ns - h) as f64 / 1e9)
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Arm.
    pub arm: Arm,
    /// Run number within the arm, from 1.
    pub index: usize,
    /// Order in the whole campaign, from 1.
    pub seq: usize,
    /// Every leecher.
    pub leechers: Vec<Leecher>,
    /// Checkpoints or freezes, in order.
    pub events: Vec<Event>,
    /// Wall time of the whole run (boot to teardown), s.
    pub wall_s: f64,
}

impl Run {
    /// Mean completion time over leechers (the run's unit value); `None`
    /// unless every leecher completed.
    pub fn mean_completion_s(&self) -> Option<f64> {
        let c: Option<Vec<f64>> = self.leechers.iter().map(|l| l.completion_s).collect();
        stats::mean(&c?)
    }

    /// The largest [`Leecher::max_stall_s`] of the run.
    pub fn max_stall_s(&self) -> Option<f64> {
        self.leechers.iter().filter_map(Leecher::max_stall_s).reduce(f64::max)
    }

    /// Every leecher completed with verified data.
    pub fn all_verified(&self) -> bool {
        !self.leechers.is_empty() && self.leechers.iter().all(Leecher::ok)
    }
}

/// The fraction done at guest time `t` of a step progress curve.
fn fraction_at(l: &Leecher, t: f64) -> Option<f64> {
    let size = l.size? as f64;
    if size <= 0.0 {
        return None;
    }
    let i = l.progress.partition_point(|p| p.0 <= t);
    Some(if i == 0 { 0.0 } else { l.progress[i - 1].1 / size })
}

/// The mean over `leechers` of the fraction done, every `step` guest seconds
/// from 0 until all are done (or their last line).
pub fn mean_curve(leechers: &[&Leecher], step: f64) -> Vec<(f64, f64)> {
    let end = leechers.iter().filter_map(|l| l.progress.last().map(|p| p.0)).fold(0.0, f64::max);
    let mut out = Vec::new();
    let mut t = 0.0;
    while t <= end + step {
        let v: Vec<f64> = leechers.iter().filter_map(|l| fraction_at(l, t)).collect();
        if let Some(m) = stats::mean(&v) {
            out.push((t, m));
        }
        t += step;
    }
    out
}

/// A step curve resampled every `step` s for drawing (x: guest s, y: MiB).
pub fn step_points(l: &Leecher, step: f64) -> Vec<(f64, f64)> {
    let end = l.progress.last().map_or(0.0, |p| p.0);
    let mut out = Vec::new();
    let mut t = 0.0;
    while t <= end {
        let i = l.progress.partition_point(|p| p.0 <= t);
        out.push((t, if i == 0 { 0.0 } else { l.progress[i - 1].1 / 1048576.0 }));
        t += step;
    }
    if let Some(&(x, y)) = l.progress.last() {
        out.push((x, y / 1048576.0));
    }
    out
}

/// The empirical CDF of `xs` as step points (x, F).
pub fn cdf_points(xs: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mut out = Vec::new();
    for (i, x) in v.iter().enumerate() {
        out.push((*x, i as f64 / n));
        out.push((*x, (i + 1) as f64 / n));
    }
    out
}

/// An arm compared with the baseline; the unit is a run (its mean
/// completion time over leechers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The arm compared with `none`.
    pub arm: Arm,
    /// Its row label: the arm's name, or the A/A check's.
    #[serde(default)]
    pub label: String,
    /// Runs of the baseline / of the arm (with every leecher complete).
    pub n_base: usize,
    /// See `n_base`.
    pub n_arm: usize,
    /// Mean over runs of the run's mean completion time, s.
    pub mean_base_s: Option<f64>,
    /// See `mean_base_s`.
    pub mean_arm_s: Option<f64>,
    /// (mean(arm) − mean(none)) / mean(none).
    pub rel_diff: Option<f64>,
    /// TOST with margin ± `margin` at α.
    pub tost: Option<Tost>,
    /// Welch's t test of equal means.
    pub welch: Option<TwoSample>,
    /// Kolmogorov–Smirnov on the runs' completion times.
    pub ks: Option<TwoSample>,
    /// Anderson–Darling (2-sample) on the same.
    pub ad: Option<TwoSample>,
    /// 95 % bootstrap CI of mean(arm) − mean(none), s (runs resampled).
    pub boot_ci_s: Option<(f64, f64)>,
    /// Largest gap between the arms' mean progress curves (fraction of the
    /// payload, over all leechers of all runs).
    pub curve_gap: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
}

/// TOST margin on mean completion time.
pub const MARGIN: f64 = 0.05;
/// Significance level.
pub const ALPHA: f64 = 0.05;

/// Compares `arm` with `none` over `runs`.
pub fn compare(runs: &[Run], arm: Arm) -> Comparison {
    let of = |a: Arm| -> Vec<&Run> { runs.iter().filter(|r| r.arm == a).collect() };
    compare_sets(arm, arm.name().to_owned(), &of(Arm::None), &of(arm))
}

/// The instruments' A/A check: the baseline's odd-round runs against its
/// even-round runs, no treatment on either side (`None` with fewer than 4
/// baseline runs). It must come out equivalent.
pub fn compare_aa(runs: &[Run]) -> Option<Comparison> {
    let base: Vec<&Run> = runs.iter().filter(|r| r.arm == Arm::None).collect();
    if base.len() < 4 {
        return None;
    }
    let (odd, even): (Vec<&Run>, Vec<&Run>) = base.into_iter().partition(|r| r.index % 2 == 1);
    Some(compare_sets(Arm::None, "none (odd rounds) vs even".into(), &odd, &even))
}

fn compare_sets(arm: Arm, label: String, base: &[&Run], treated: &[&Run]) -> Comparison {
    let vals = |rs: &[&Run]| -> Vec<f64> { rs.iter().filter_map(|r| r.mean_completion_s()).collect() };
    let (b, t) = (vals(base), vals(treated));
    fn leech<'a>(rs: &[&'a Run]) -> Vec<&'a Leecher> {
        rs.iter().flat_map(|r| r.leechers.iter()).collect()
    }
    let (cb, ct) = (mean_curve(&leech(base), 0.25), mean_curve(&leech(treated), 0.25));
    let tost = stats::tost_relative(&b, &t, MARGIN, ALPHA);
    let welch = stats::welch_t(&b, &t);
    let ks = stats::ks_two_sample(&b, &t);
    let ad = stats::anderson_darling_2(&b, &t);
    let verdict = stats::verdict(tost.as_ref(), &[welch.map(|x| x.p), ks.map(|x| x.p), ad.map(|x| x.p)], ALPHA);
    let (mb, mt) = (stats::mean(&b), stats::mean(&t));
    Comparison {
        arm,
        label,
        n_base: b.len(),
        n_arm: t.len(),
        mean_base_s: mb,
        mean_arm_s: mt,
        rel_diff: mb.zip(mt).map(|(x, y)| (y - x) / x),
        tost,
        welch,
        ks,
        ad,
        boot_ci_s: stats::bootstrap_ci_mean_diff(&b, &t, 10_000, 0.95, 7),
        curve_gap: if cb.is_empty() || ct.is_empty() { None } else { stats::max_curve_gap(&cb, &ct) },
        verdict,
    }
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The summary table (Markdown) of the comparisons.
pub fn table(cs: &[Comparison]) -> String {
    let mut s = String::from(
        "| arm vs none | runs (none/arm) | mean completion s (none → arm) | Δ | TOST ±5 % (90 % CI of Δ, p) | Welch p | KS D (p) | AD (p) | bootstrap 95 % CI of Δ, s | max gap of mean progress | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cs {
        s.push_str(&format!(
            "| {} | {}/{} | {} → {} | {} | {} | {} | {} | {} | {} | {} | **{}** |\n",
            if c.label.is_empty() { c.arm.name() } else { &c.label },
            c.n_base,
            c.n_arm,
            f(c.mean_base_s, 2),
            f(c.mean_arm_s, 2),
            c.rel_diff.map(|x| format!("{:+.1} %", 100.0 * x)).unwrap_or("-".into()),
            c.tost
                .map(|t| format!("[{:+.1} %, {:+.1} %], p {:.3}", 100.0 * t.ci.0, 100.0 * t.ci.1, t.p))
                .unwrap_or("-".into()),
            f(c.welch.map(|x| x.p), 3),
            c.ks.map(|x| format!("{:.2} ({:.3})", x.stat, x.p)).unwrap_or("-".into()),
            c.ad.map(|x| format!("{:.2} ({:.3})", x.stat, x.p)).unwrap_or("-".into()),
            c.boot_ci_s.map(|(a, b)| format!("[{a:+.2}, {b:+.2}]")).unwrap_or("-".into()),
            c.curve_gap.map(|g| format!("{:.1} %", 100.0 * g)).unwrap_or("-".into()),
            c.verdict,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(node: &str, host_ns: u64, v: serde_json::Value) -> Line {
        Line { host_ns, node: node.into(), v }
    }

    fn leech_lines(node: &str, start_host: u64, total_s: f64) -> Vec<Line> {
        let mut v = vec![line(
            node,
            start_host,
            json!({"tool":"bt","role":"leech","event":"start","t_ns":5_000_000_000u64,"size":400}),
        )];
        for i in 1..4u64 {
            let e = total_s * i as f64 / 4.0;
            v.push(line(
                node,
                start_host + (e * 1e9) as u64,
                json!({"tool":"bt","role":"leech","event":"progress","elapsed_ns":(e*1e9) as u64,"bytes":100*i}),
            ));
        }
        v.push(line(node, start_host + (total_s * 1e9) as u64, json!({"tool":"bt","role":"leech","event":"done","elapsed_ns":(total_s*1e9) as u64,"bytes":400,"verified":true,"sha1":"ab"})));
        v
    }

    fn run(arm: Arm, index: usize, secs: &[f64]) -> Run {
        let leechers = secs
            .iter()
            .enumerate()
            .map(|(i, s)| leecher(&leech_lines(&format!("l{}", i + 1), 1_000, *s), &format!("l{}", i + 1)))
            .collect();
        Run { arm, index, seq: index, leechers, events: vec![], wall_s: 0.0 }
    }

    #[test]
    fn spec_parses_and_names_every_node() {
        let s = spec("bt", 3, Payload::Quick, "10Mb", "5ms");
        let e = stasis_core::spec::Experiment::from_toml_str(&s, None).expect("the project's spec parser accepts it");
        assert_eq!(e.nodes.len(), 4);
        assert!(e.node("s").is_some() && e.node("l3").is_some());
        assert!(s.contains("/etc/stasis-bt/quick.torrent") && s.contains("--node l3") && s.contains("opentracker"));
    }

    #[test]
    fn leecher_lines_become_a_record() {
        let lines = leech_lines("l1", 10_000_000_000, 8.0);
        let l = leecher(&lines, "l1");
        assert_eq!(l.completion_s, Some(8.0));
        assert!(l.ok());
        assert_eq!(l.progress.len(), 4);
        assert_eq!(fraction_at(&l, 4.1), Some(0.5));
        assert_eq!(fraction_at(&l, 100.0), Some(1.0));
        assert_eq!(guest_s_at(&lines, "l1", 10_000_000_000 + 4_500_000_000), Some(4.5));
        assert_eq!(guest_s_at(&lines, "l1", 5), None);
        // Progress at 2, 4, 6 s and done at 8 s: 2 s between pieces.
        assert_eq!(l.max_stall_s(), Some(2.0));
        let mut stalled = l.clone();
        stalled.progress.insert(0, (0.5, 0.0));
        stalled.progress[2].0 = 5.5;
        assert_eq!(stalled.max_stall_s(), Some(3.5));
        let missing = leecher(&lines, "l2");
        assert!(!missing.ok());
    }

    #[test]
    fn mean_completion_needs_every_leecher() {
        let mut r = run(Arm::None, 1, &[8.0, 10.0]);
        assert_eq!(r.mean_completion_s(), Some(9.0));
        assert!(r.all_verified());
        r.leechers[1].completion_s = None;
        assert_eq!(r.mean_completion_s(), None);
        assert!(!r.all_verified());
    }

    #[test]
    fn shifted_arm_is_different_and_same_arm_is_equivalent() {
        let mut runs = Vec::new();
        for i in 0..8 {
            // Run-to-run noise of ±1.5 s; the checkpoint arm draws the same
            // values in another order, the control arm is 9 s slower.
            let d = (i % 4) as f64;
            let e = ((i + 2) % 4) as f64;
            runs.push(run(Arm::None, i + 1, &[60.0 + d, 61.0 + d]));
            runs.push(run(Arm::Ckpt, i + 1, &[60.0 + e, 61.0 + e]));
            runs.push(run(Arm::Control, i + 1, &[69.0 + d, 70.0 + d]));
        }
        let c = compare(&runs, Arm::Ckpt);
        assert_eq!(c.verdict, Verdict::Equivalent, "{c:?}");
        assert!(c.curve_gap.expect("gap") < 0.3);
        let k = compare(&runs, Arm::Control);
        assert_eq!(k.verdict, Verdict::Different, "{k:?}");
        assert!(k.rel_diff.expect("rel") > 0.1);
        let (lo, hi) = k.boot_ci_s.expect("ci");
        assert!(lo > 7.0 && lo < 9.0 && hi > 9.0 && hi < 11.0, "{lo} {hi}");
        let t = table(&[c, k]);
        assert!(t.contains("**equivalent**") && t.contains("**different**"), "{t}");
    }

    #[test]
    fn the_aa_check_passes_on_one_arm_and_catches_a_drift() {
        let base = |f: &dyn Fn(usize) -> f64| -> Vec<Run> {
            (1..=8).map(|k| run(Arm::None, k, &[60.0 + f(k), 61.0 + f(k)])).collect()
        };
        // Odd and even rounds draw the same values: equivalent.
        let same = base(&|k| ((k - 1) / 2 % 2) as f64);
        let c = compare_aa(&same).expect("8 baseline runs");
        assert_eq!(c.verdict, Verdict::Equivalent, "{c:?}");
        assert_eq!((c.n_base, c.n_arm), (4, 4));
        assert!(table(&[c]).contains("| none (odd rounds) vs even |"));
        // The host got 9 s slower on even rounds: the check must fail.
        let drift = base(&|k| if k % 2 == 0 { 9.0 + (k % 3) as f64 } else { (k % 3) as f64 });
        assert_eq!(compare_aa(&drift).expect("8 runs").verdict, Verdict::Different);
        assert!(compare_aa(&same[..3]).is_none(), "too few runs for an A/A row");
    }

    #[test]
    fn one_run_per_arm_is_not_shown_equivalent() {
        let runs = vec![run(Arm::None, 1, &[10.0]), run(Arm::Ckpt, 1, &[10.0])];
        assert_eq!(compare(&runs, Arm::Ckpt).verdict, Verdict::NotShownEquivalent);
    }

    #[test]
    fn curves_and_cdf() {
        let l = leecher(&leech_lines("l1", 0, 8.0), "l1");
        let m = mean_curve(&[&l, &l], 1.0);
        assert_eq!(m.first(), Some(&(0.0, 0.0)));
        assert_eq!(m.last().map(|p| p.1), Some(1.0));
        let p = step_points(&l, 1.0);
        assert_eq!(p.last(), Some(&(8.0, 400.0 / 1048576.0)));
        assert_eq!(cdf_points(&[2.0, 1.0]), vec![(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]);
    }
}
