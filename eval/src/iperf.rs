//! The iperf3 transparency eval, I/O-free: parsing iperf3's JSON (client
//! `-J --get-server-output`), per-run metrics, and the comparison of each arm
//! with the baseline arm (`none`) by the tests of [`crate::stats`].
//!
//! The unit is a run: one iperf3 test of `duration` guest seconds. Events
//! (checkpoints, or the control arm's network freeze) happen at planned
//! guest instants; the `none` arm gets the same instants with no action, so
//! its windows are comparable.

use crate::stats::{
    anderson_darling_2, bootstrap_ci_mean_diff, cluster_permutation_p, ks_stat, ks_two_sample, max_curve_gap, mean,
    tost_relative, variance, verdict, welch_t, Tost, TwoSample, Verdict,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why an iperf3 result could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    /// iperf3 reported an error instead of a result.
    #[error("iperf3 failed: {0}")]
    Iperf(String),
    /// A field the analysis needs is missing or has the wrong type.
    #[error("iperf3 JSON: missing or malformed {0}")]
    Missing(&'static str),
}

/// One receiver-side interval (the server's report), guest seconds from the
/// start of the test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub start: f64,
    pub end: f64,
    /// Bits per second received in the interval.
    pub bps: f64,
}

impl Interval {
    /// The interval's midpoint.
    pub fn mid(&self) -> f64 {
        0.5 * (self.start + self.end)
    }
}

/// One sender-side interval (the client's report).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SendInterval {
    pub start: f64,
    pub end: f64,
    /// Bits per second written.
    pub bps: f64,
    /// TCP retransmits in the interval.
    pub retransmits: u64,
    /// Smoothed RTT at the end of the interval, µs (first stream).
    pub rtt_us: Option<f64>,
    /// Congestion window at the end of the interval, bytes (first stream).
    pub cwnd: Option<u64>,
}

/// What one iperf3 test measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IperfResult {
    /// Receiver intervals (intervals shorter than [`MIN_INTERVAL_S`] dropped).
    pub received: Vec<Interval>,
    /// Sender intervals (same filter).
    pub sent: Vec<SendInterval>,
    /// Whole-test receiver throughput (`end.sum_received`), bit/s.
    pub recv_bps: f64,
    /// Whole-test retransmits (`end.sum_sent.retransmits`).
    pub retransmits: u64,
    /// Mean RTT over the test (`end.streams[0].sender.mean_rtt`), µs.
    pub mean_rtt_us: Option<f64>,
    /// The sender's congestion control (`end.sender_tcp_congestion`).
    pub congestion: Option<String>,
}

/// A trailing fragment of an interval (iperf3 reports the last few ms as
/// one) says little about throughput; shorter intervals are dropped.
pub const MIN_INTERVAL_S: f64 = 0.2;

fn f(v: &Value, what: &'static str) -> Result<f64, ParseError> {
    v.as_f64().ok_or(ParseError::Missing(what))
}

/// Parses the client's `iperf3 -c … -J --get-server-output` document; the
/// receiver intervals come from `server_output_json` (the server must run
/// with `-J`).
pub fn parse_iperf(v: &Value) -> Result<IperfResult, ParseError> {
    if let Some(e) = v["error"].as_str() {
        return Err(ParseError::Iperf(e.to_string()));
    }
    let server = &v["server_output_json"];
    let mut received = Vec::new();
    for i in server["intervals"].as_array().ok_or(ParseError::Missing("server_output_json.intervals"))? {
        let s = &i["sum"];
        let iv = Interval {
            start: f(&s["start"], "server interval start")?,
            end: f(&s["end"], "server interval end")?,
            bps: f(&s["bits_per_second"], "server interval bits_per_second")?,
        };
        if iv.end - iv.start >= MIN_INTERVAL_S {
            received.push(iv);
        }
    }
    let mut sent = Vec::new();
    for i in v["intervals"].as_array().ok_or(ParseError::Missing("intervals"))? {
        let s = &i["sum"];
        let st = &i["streams"][0];
        let iv = SendInterval {
            start: f(&s["start"], "interval start")?,
            end: f(&s["end"], "interval end")?,
            bps: f(&s["bits_per_second"], "interval bits_per_second")?,
            retransmits: s["retransmits"].as_u64().unwrap_or(0),
            rtt_us: st["rtt"].as_f64(),
            cwnd: st["snd_cwnd"].as_u64(),
        };
        if iv.end - iv.start >= MIN_INTERVAL_S {
            sent.push(iv);
        }
    }
    let end = &v["end"];
    Ok(IperfResult {
        received,
        sent,
        recv_bps: f(&end["sum_received"]["bits_per_second"], "end.sum_received.bits_per_second")?,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        mean_rtt_us: end["streams"][0]["sender"]["mean_rtt"].as_f64(),
        congestion: end["sender_tcp_congestion"].as_str().map(str::to_string),
    })
}

/// One event of a run: when it was planned and when it happened, in guest
/// seconds from the test start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Planned instant, guest s.
    pub planned_s: f64,
    /// Estimated actual instant, guest s (= planned for the baseline).
    pub at_s: f64,
    /// How long the event froze the VMs (checkpoint) or the network (control), ns.
    pub frozen_ns: u64,
    /// Whether the event was carried out (false: skipped, e.g. too late).
    pub done: bool,
    /// The raw record: `stasis checkpoint --json`, the delay node's thaw reply, or null.
    pub detail: Value,
}

/// Where to look around each event: receiver intervals whose midpoint lies
/// in [at − before, at + after).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub before_s: f64,
    pub after_s: f64,
}

impl Default for Window {
    fn default() -> Self {
        Window { before_s: 0.0, after_s: 5.0 }
    }
}

/// Per-run figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Whole-test receiver throughput, Mbit/s.
    pub mean_mbps: f64,
    /// Mean receiver throughput over the intervals in the events' windows, Mbit/s.
    pub window_mbps: Option<f64>,
    /// Per event, the mean over its window, Mbit/s.
    pub window_mbps_per_event: Vec<Option<f64>>,
    pub retransmits: u64,
    /// Mean RTT, ms.
    pub mean_rtt_ms: Option<f64>,
    /// The longest stall in the events' windows: consecutive receiver
    /// intervals below [`STALL_FRACTION`] of the run's median throughput, s.
    #[serde(default)]
    pub stall_s: f64,
}

/// An interval counts as stalled below this fraction of the run's median throughput.
pub const STALL_FRACTION: f64 = 0.1;

/// The longest stretch (s) of consecutive intervals in `ivs` (in time order)
/// with throughput below `STALL_FRACTION` × `median_bps`.
pub fn longest_stall(ivs: &[&Interval], median_bps: f64) -> f64 {
    let (mut best, mut cur, mut last_end) = (0.0f64, 0.0f64, f64::NAN);
    for iv in ivs {
        let contiguous = (iv.start - last_end).abs() < 1e-6;
        if iv.bps < STALL_FRACTION * median_bps {
            cur = if contiguous { cur + (iv.end - iv.start) } else { iv.end - iv.start };
            best = best.max(cur);
        } else {
            cur = 0.0;
        }
        last_end = iv.end;
    }
    best
}

/// The intervals of `r` inside the windows of `events`.
pub fn window_intervals<'a>(r: &'a IperfResult, events: &[Event], w: &Window) -> Vec<&'a Interval> {
    r.received
        .iter()
        .filter(|iv| events.iter().any(|e| iv.mid() >= e.at_s - w.before_s && iv.mid() < e.at_s + w.after_s))
        .collect()
}

/// Computes a run's figures.
pub fn metrics(r: &IperfResult, events: &[Event], w: &Window) -> RunMetrics {
    let mbps = |ivs: &[&Interval]| mean(&ivs.iter().map(|iv| iv.bps / 1e6).collect::<Vec<_>>());
    let per_event = events.iter().map(|e| mbps(&window_intervals(r, std::slice::from_ref(e), w))).collect();
    RunMetrics {
        mean_mbps: r.recv_bps / 1e6,
        window_mbps: mbps(&window_intervals(r, events, w)),
        window_mbps_per_event: per_event,
        retransmits: r.retransmits,
        mean_rtt_ms: r.mean_rtt_us.map(|x| x / 1e3),
        stall_s: longest_stall(
            &window_intervals(r, events, w),
            crate::stats::median(&r.received.iter().map(|iv| iv.bps).collect::<Vec<_>>()).unwrap_or(0.0),
        ),
    }
}

/// One run as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// 1-based run number in the campaign (the guest's counter).
    pub run: u64,
    pub arm: String,
    /// Host CLOCK_MONOTONIC when the test's data started to flow (events are
    /// timed from here), or the marker's arrival if that was not measured.
    pub host_start_ns: u64,
    /// Host CLOCK_MONOTONIC when the run's start marker arrived.
    #[serde(default)]
    pub marker_ns: u64,
    pub events: Vec<Event>,
    pub result: IperfResult,
    pub metrics: RunMetrics,
}

/// One arm compared with the baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub runs: usize,
    /// Mean and sd over runs of the whole-test throughput, Mbit/s.
    pub mean_mbps: Option<f64>,
    pub sd_mbps: Option<f64>,
    /// Mean over runs of the window throughput, Mbit/s.
    pub window_mbps: Option<f64>,
    pub retransmits: Option<f64>,
    pub rtt_ms: Option<f64>,
    /// Mean frozen time per event, ms.
    pub frozen_ms: Option<f64>,
    /// Mean and largest per-run longest stall in the windows, s.
    #[serde(default)]
    pub stall_mean_s: Option<f64>,
    #[serde(default)]
    pub stall_max_s: Option<f64>,
    /// Comparisons with the baseline (absent for the baseline itself).
    pub vs_baseline: Option<Comparison>,
}

/// The statistics of one arm against the baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// TOST on whole-run mean throughput, margin `margin`.
    pub tost: Option<Tost>,
    pub margin: f64,
    /// Welch's t on whole-run mean throughput.
    pub welch: Option<TwoSample>,
    /// Bootstrap (resampling runs) 95 % CI of the mean throughput difference, relative to the baseline mean.
    pub boot_ci_rel: Option<(f64, f64)>,
    /// KS and Anderson–Darling on all per-interval throughputs, pooled over
    /// runs, with their textbook p-values (which assume independent intervals).
    pub ks: Option<TwoSample>,
    pub ad: Option<TwoSample>,
    /// The same statistics' p-values by permuting whole runs between the
    /// arms ([`PERM_REPS`] relabellings): valid with correlated intervals.
    #[serde(default)]
    pub ks_perm_p: Option<f64>,
    #[serde(default)]
    pub ad_perm_p: Option<f64>,
    pub verdict: Verdict,
    /// The same around the events.
    pub window_tost: Option<Tost>,
    pub window_margin: f64,
    pub window_welch: Option<TwoSample>,
    pub window_ks: Option<TwoSample>,
    pub window_ad: Option<TwoSample>,
    #[serde(default)]
    pub window_ks_perm_p: Option<f64>,
    #[serde(default)]
    pub window_ad_perm_p: Option<f64>,
    /// Largest gap between the arm's and the baseline's mean throughput
    /// curve around the events (aligned on the event, 0.5 s bins), relative
    /// to the baseline's mean throughput.
    pub window_curve_gap_rel: Option<f64>,
    /// Mean window throughput relative to the baseline's (1 = no dip).
    pub window_ratio: Option<f64>,
    pub window_verdict: Verdict,
}

/// Significance level of every test.
pub const ALPHA: f64 = 0.05;
/// Bootstrap replicates.
pub const BOOT_REPS: usize = 10_000;
/// Relabellings of the run-permutation tests.
pub const PERM_REPS: usize = 2_000;

/// Mean receiver throughput around the events, aligned on each event
/// (x = interval midpoint − event instant, binned to `bin_s`), averaged over
/// runs and events: the curve of the "around events" plot.
pub fn aligned_curve(runs: &[&RunRecord], from_s: f64, to_s: f64, bin_s: f64) -> Vec<(f64, f64)> {
    let nb = ((to_s - from_s) / bin_s).ceil().max(0.0) as usize;
    let mut sum = vec![0.0; nb];
    let mut n = vec![0usize; nb];
    for r in runs {
        for e in &r.events {
            for iv in &r.result.received {
                let x = iv.mid() - e.at_s;
                if x >= from_s && x < to_s {
                    let b = ((x - from_s) / bin_s) as usize;
                    if b < nb {
                        sum[b] += iv.bps / 1e6;
                        n[b] += 1;
                    }
                }
            }
        }
    }
    (0..nb).filter(|&b| n[b] > 0).map(|b| (from_s + (b as f64 + 0.5) * bin_s, sum[b] / n[b] as f64)).collect()
}

/// Mean receiver throughput per interval position over runs (x = interval
/// midpoint rounded to `bin_s`): the whole-run time series of an arm.
pub fn mean_series(runs: &[&RunRecord], bin_s: f64) -> Vec<(f64, f64)> {
    let mut acc: std::collections::BTreeMap<i64, (f64, usize)> = Default::default();
    for r in runs {
        for iv in &r.result.received {
            let k = (iv.mid() / bin_s).floor() as i64;
            let e = acc.entry(k).or_default();
            e.0 += iv.bps / 1e6;
            e.1 += 1;
        }
    }
    acc.into_iter().map(|(k, (s, n))| ((k as f64 + 0.5) * bin_s, s / n as f64)).collect()
}

/// Compares every arm with the arm named `baseline`.
pub fn summarise(
    runs: &[RunRecord],
    arms: &[String],
    baseline: &str,
    margin: f64,
    window_margin: f64,
    w: &Window,
) -> Vec<ArmSummary> {
    let of = |arm: &str| runs.iter().filter(|r| r.arm == arm).collect::<Vec<_>>();
    let base = of(baseline);
    let means = |rs: &[&RunRecord]| rs.iter().map(|r| r.metrics.mean_mbps).collect::<Vec<_>>();
    let windows = |rs: &[&RunRecord]| rs.iter().filter_map(|r| r.metrics.window_mbps).collect::<Vec<_>>();
    let per_run = |rs: &[&RunRecord]| {
        rs.iter().map(|r| r.result.received.iter().map(|iv| iv.bps / 1e6).collect()).collect::<Vec<Vec<f64>>>()
    };
    let per_run_win = |rs: &[&RunRecord]| {
        rs.iter()
            .map(|r| window_intervals(&r.result, &r.events, w).into_iter().map(|iv| iv.bps / 1e6).collect())
            .collect::<Vec<Vec<f64>>>()
    };
    let intervals = |rs: &[&RunRecord]| per_run(rs).concat();
    let win_intervals = |rs: &[&RunRecord]| per_run_win(rs).concat();
    let ad_stat = |x: &[f64], y: &[f64]| anderson_darling_2(x, y).map(|t| t.stat);
    let perm = |a: &[Vec<f64>], b: &[Vec<f64>], ad: bool| {
        if ad {
            cluster_permutation_p(a, b, ad_stat, PERM_REPS, 11)
        } else {
            cluster_permutation_p(a, b, ks_stat, PERM_REPS, 11)
        }
    };
    let (bm, bw) = (means(&base), windows(&base));
    let (bi, bwi) = (intervals(&base), win_intervals(&base));
    let base_curve = aligned_curve(&base, -w.before_s.max(2.0), w.after_s + 3.0, 0.5);
    arms.iter()
        .map(|arm| {
            let rs = of(arm);
            let (m, wm) = (means(&rs), windows(&rs));
            let frozen: Vec<f64> =
                rs.iter().flat_map(|r| r.events.iter().filter(|e| e.done).map(|e| e.frozen_ns as f64 / 1e6)).collect();
            let vs_baseline = (arm != baseline).then(|| {
                let tost = tost_relative(&bm, &m, margin, ALPHA);
                let welch = welch_t(&bm, &m);
                let ks = ks_two_sample(&bi, &intervals(&rs));
                let ad = anderson_darling_2(&bi, &intervals(&rs));
                let bmean = mean(&bm);
                let boot_ci_rel = bootstrap_ci_mean_diff(&bm, &m, BOOT_REPS, 0.95, 7)
                    .and_then(|(lo, hi)| bmean.filter(|b| *b > 0.0).map(|b| (lo / b, hi / b)));
                let window_tost = tost_relative(&bw, &wm, window_margin, ALPHA);
                let window_welch = welch_t(&bw, &wm);
                let wi = win_intervals(&rs);
                let window_ks = ks_two_sample(&bwi, &wi);
                let window_ad = anderson_darling_2(&bwi, &wi);
                let (pb, pa, pbw, paw) = (per_run(&base), per_run(&rs), per_run_win(&base), per_run_win(&rs));
                let (ks_perm_p, ad_perm_p) = (perm(&pb, &pa, false), perm(&pb, &pa, true));
                let (window_ks_perm_p, window_ad_perm_p) = (perm(&pbw, &paw, false), perm(&pbw, &paw, true));
                let curve = aligned_curve(&rs, -w.before_s.max(2.0), w.after_s + 3.0, 0.5);
                let bw_mean = mean(&bw);
                let window_curve_gap_rel =
                    max_curve_gap(&base_curve, &curve).and_then(|g| bmean.filter(|b| *b > 0.0).map(|b| g / b));
                let window_ratio = mean(&wm).and_then(|a| bw_mean.filter(|b| *b > 0.0).map(|b| a / b));
                Comparison {
                    verdict: verdict(tost.as_ref(), &[welch.map(|t| t.p), ks_perm_p, ad_perm_p], ALPHA),
                    window_verdict: verdict(
                        window_tost.as_ref(),
                        &[window_welch.map(|t| t.p), window_ks_perm_p, window_ad_perm_p],
                        ALPHA,
                    ),
                    ks_perm_p,
                    ad_perm_p,
                    window_ks_perm_p,
                    window_ad_perm_p,
                    tost,
                    margin,
                    welch,
                    boot_ci_rel,
                    ks,
                    ad,
                    window_tost,
                    window_margin,
                    window_welch,
                    window_ks,
                    window_ad,
                    window_curve_gap_rel,
                    window_ratio,
                }
            });
            ArmSummary {
                arm: arm.clone(),
                runs: rs.len(),
                mean_mbps: mean(&m),
                sd_mbps: variance(&m).map(f64::sqrt),
                window_mbps: mean(&wm),
                retransmits: mean(&rs.iter().map(|r| r.metrics.retransmits as f64).collect::<Vec<_>>()),
                rtt_ms: mean(&rs.iter().filter_map(|r| r.metrics.mean_rtt_ms).collect::<Vec<_>>()),
                frozen_ms: mean(&frozen),
                stall_mean_s: mean(&rs.iter().map(|r| r.metrics.stall_s).collect::<Vec<_>>()),
                stall_max_s: rs.iter().map(|r| r.metrics.stall_s).reduce(f64::max),
                vs_baseline,
            }
        })
        .collect()
}

/// The instruments' A/A check: the baseline's runs of even rounds against
/// those of odd rounds (round = the baseline's k-th run), under the same
/// tests. Both halves had no treatment, so anything but "equivalent" or
/// "not shown equivalent" is a false alarm of the instruments. `None` below
/// 4 baseline runs.
pub fn aa_check(runs: &[RunRecord], baseline: &str, margin: f64, window_margin: f64, w: &Window) -> Option<ArmSummary> {
    let base: Vec<&RunRecord> = runs.iter().filter(|r| r.arm == baseline).collect();
    if base.len() < 4 {
        return None;
    }
    let (even, odd) = (format!("{baseline} (even rounds)"), format!("{baseline} (odd rounds) vs even"));
    let split: Vec<RunRecord> = base
        .iter()
        .enumerate()
        .map(|(i, r)| RunRecord { arm: if i % 2 == 0 { even.clone() } else { odd.clone() }, ..(*r).clone() })
        .collect();
    summarise(&split, &[odd], &even, margin, window_margin, w).pop()
}

fn num(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "–".into())
}

fn pct(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{:+.1} %", x * 100.0)).unwrap_or_else(|| "–".into())
}

fn p(t: Option<TwoSample>) -> String {
    t.map(|t| pval(t.p)).unwrap_or_else(|| "–".into())
}

fn pval(x: f64) -> String {
    if x < 0.001 {
        "<0.001".into()
    } else {
        format!("{x:.3}")
    }
}

/// "perm (pooled)" p-values.
fn pp(perm: Option<f64>, pooled: Option<TwoSample>) -> String {
    match (perm, pooled) {
        (None, None) => "–".into(),
        (a, b) => format!("{} ({})", a.map(pval).unwrap_or("–".into()), b.map(|t| pval(t.p)).unwrap_or("–".into())),
    }
}

/// The summary table (Markdown), one row per arm.
pub fn table(sums: &[ArmSummary]) -> String {
    let mut s = String::from(
        "| arm | runs | Mbit/s mean ± sd | Δ vs none [TOST 90 % CI] | TOST p | boot 95 % CI Δ | Welch p | KS p perm (pooled) | AD p perm (pooled) | **verdict (whole run)** | window Mbit/s (ratio) | window Δ [90 % CI] | window KS / AD p perm (pooled) | curve gap | stall s mean/max | **verdict (around events)** | retrans/run | RTT ms | frozen ms/event |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for a in sums {
        let c = a.vs_baseline.as_ref();
        let tost_cell = |t: Option<&Tost>| {
            t.map(|t| format!("{} [{}, {}]", pct(Some(t.rel_diff)), pct(Some(t.ci.0)), pct(Some(t.ci.1))))
                .unwrap_or_else(|| "–".into())
        };
        s.push_str(&format!(
            "| {} | {} | {} ± {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} / {} | {} | {} / {} | {} | {} | {} | {} |\n",
            a.arm,
            a.runs,
            num(a.mean_mbps, 2),
            num(a.sd_mbps, 2),
            c.map(|c| tost_cell(c.tost.as_ref())).unwrap_or_else(|| "(baseline)".into()),
            c.and_then(|c| c.tost.map(|t| format!("{:.3}", t.p))).unwrap_or_else(|| "–".into()),
            c.and_then(|c| c.boot_ci_rel).map(|(l, h)| format!("[{}, {}]", pct(Some(l)), pct(Some(h)))).unwrap_or_else(|| "–".into()),
            p(c.and_then(|c| c.welch)),
            pp(c.and_then(|c| c.ks_perm_p), c.and_then(|c| c.ks)),
            pp(c.and_then(|c| c.ad_perm_p), c.and_then(|c| c.ad)),
            c.map(|c| format!("**{}** (±{:.0} %)", c.verdict, c.margin * 100.0)).unwrap_or_else(|| "–".into()),
            num(a.window_mbps, 2),
            c.and_then(|c| c.window_ratio).map(|r| format!("{r:.2}")).unwrap_or_else(|| "1".into()),
            c.map(|c| tost_cell(c.window_tost.as_ref())).unwrap_or_else(|| "–".into()),
            pp(c.and_then(|c| c.window_ks_perm_p), c.and_then(|c| c.window_ks)),
            pp(c.and_then(|c| c.window_ad_perm_p), c.and_then(|c| c.window_ad)),
            c.and_then(|c| c.window_curve_gap_rel).map(|g| format!("{:.0} %", g * 100.0)).unwrap_or_else(|| "–".into()),
            num(a.stall_mean_s, 1),
            num(a.stall_max_s, 1),
            c.map(|c| format!("**{}** (±{:.0} %)", c.window_verdict, c.window_margin * 100.0)).unwrap_or_else(|| "–".into()),
            num(a.retransmits, 1),
            num(a.rtt_ms, 1),
            num(a.frozen_ms, 0),
        ));
    }
    s
}

/// One CSV row per run.
pub fn runs_csv(runs: &[RunRecord]) -> String {
    let mut s = String::from(
        "run,arm,mean_mbps,window_mbps,retransmits,mean_rtt_ms,events_done,frozen_ms_total,intervals,congestion\n",
    );
    for r in runs {
        s.push_str(&format!(
            "{},{},{:.4},{},{},{},{},{:.1},{},{}\n",
            r.run,
            r.arm,
            r.metrics.mean_mbps,
            r.metrics.window_mbps.map(|x| format!("{x:.4}")).unwrap_or_default(),
            r.metrics.retransmits,
            r.metrics.mean_rtt_ms.map(|x| format!("{x:.3}")).unwrap_or_default(),
            r.events.iter().filter(|e| e.done).count(),
            r.events.iter().map(|e| e.frozen_ns as f64 / 1e6).sum::<f64>(),
            r.result.received.len(),
            r.result.congestion.as_deref().unwrap_or(""),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A client document shaped like iperf3 3.12's, with receiver intervals
    /// of 0.5 s at the given Mbit/s and a trailing 40 ms fragment.
    fn doc(mbps: &[f64]) -> Value {
        let mut srv = Vec::new();
        let mut cli = Vec::new();
        for (i, m) in mbps.iter().enumerate() {
            let (s, e) = (i as f64 * 0.5, (i + 1) as f64 * 0.5);
            srv.push(json!({"streams": [], "sum": {"start": s, "end": e, "bits_per_second": m * 1e6}}));
            cli.push(json!({"streams": [{"rtt": 30000 + i, "snd_cwnd": 60000}], "sum": {"start": s, "end": e, "bits_per_second": m * 1e6, "retransmits": i % 2}}));
        }
        let t = mbps.len() as f64 * 0.5;
        srv.push(json!({"sum": {"start": t, "end": t + 0.04, "bits_per_second": 1.0}}));
        let avg = mbps.iter().sum::<f64>() / mbps.len() as f64;
        json!({
            "start": {}, "intervals": cli,
            "end": {"sum_sent": {"retransmits": 7}, "sum_received": {"bits_per_second": avg * 1e6},
                    "streams": [{"sender": {"mean_rtt": 31000}}], "sender_tcp_congestion": "cubic"},
            "server_output_json": {"intervals": srv}
        })
    }

    fn run(arm: &str, n: u64, mbps: &[f64], at: f64) -> RunRecord {
        let result = parse_iperf(&doc(mbps)).expect("parse");
        let events = vec![Event { planned_s: at, at_s: at, frozen_ns: 0, done: true, detail: Value::Null }];
        let metrics = metrics(&result, &events, &Window::default());
        RunRecord { run: n, arm: arm.into(), host_start_ns: 0, marker_ns: 0, events, result, metrics }
    }

    #[test]
    fn parses_receiver_and_sender_intervals_and_drops_fragments() {
        let r = parse_iperf(&doc(&[10.0, 8.0, 9.0])).expect("parse");
        assert_eq!(r.received.len(), 3, "the 40 ms fragment is dropped");
        assert_eq!(r.received[1], Interval { start: 0.5, end: 1.0, bps: 8e6 });
        assert_eq!(r.sent.len(), 3);
        assert_eq!(r.sent[1].retransmits, 1);
        assert_eq!(r.sent[1].rtt_us, Some(30001.0));
        assert_eq!((r.retransmits, r.mean_rtt_us, r.congestion.as_deref()), (7, Some(31000.0), Some("cubic")));
        assert_eq!(r.recv_bps, 9e6);
    }

    #[test]
    fn refuses_iperf_errors_and_missing_fields() {
        assert_eq!(
            parse_iperf(&json!({"start": {}, "error": "unable to connect to server"})),
            Err(ParseError::Iperf("unable to connect to server".into()))
        );
        let mut d = doc(&[1.0]);
        d["server_output_json"] = Value::Null;
        assert_eq!(parse_iperf(&d), Err(ParseError::Missing("server_output_json.intervals")));
        let mut d = doc(&[1.0]);
        d["end"]["sum_received"] = json!({});
        assert_eq!(parse_iperf(&d), Err(ParseError::Missing("end.sum_received.bits_per_second")));
    }

    #[test]
    fn window_takes_the_intervals_after_each_event() {
        // 20 intervals of 0.5 s; the event at 4 s covers midpoints in [4, 9).
        let mut m = vec![10.0; 20];
        for x in m.iter_mut().skip(8).take(4) {
            *x = 0.0;
        }
        let r = run("control", 1, &m, 4.0);
        assert_eq!(window_intervals(&r.result, &r.events, &Window::default()).len(), 10);
        assert_eq!(r.metrics.window_mbps, Some(6.0));
        assert_eq!(r.metrics.window_mbps_per_event, vec![Some(6.0)]);
        assert_eq!(r.metrics.mean_mbps, 8.0);
        assert_eq!(r.metrics.stall_s, 2.0);
    }

    #[test]
    fn stalls_must_be_contiguous() {
        let iv = |s: f64, bps: f64| Interval { start: s, end: s + 0.5, bps };
        let a = [iv(0.0, 0.0), iv(0.5, 0.0), iv(1.0, 9.0), iv(1.5, 0.5), iv(3.0, 0.0)];
        let refs: Vec<&Interval> = a.iter().collect();
        // 0.5 < 0.1 × 10: stalled; the gap before 3.0 breaks the stretch.
        assert_eq!(longest_stall(&refs, 10.0), 1.0);
        assert_eq!(longest_stall(&refs[2..], 10.0), 0.5);
        assert_eq!(longest_stall(&[], 10.0), 0.0);
    }

    /// Throughput with a little deterministic jitter around `level`.
    fn flat(level: f64, seed: u64) -> Vec<f64> {
        (0..40).map(|i| level + (((i * 7 + seed * 13) % 11) as f64 - 5.0) * 0.05).collect()
    }

    #[test]
    fn a_freeze_dip_is_flagged_and_an_unchanged_arm_is_not() {
        let mut runs = Vec::new();
        for k in 0..6 {
            runs.push(run("none", 3 * k + 1, &flat(9.0, k), 8.0));
            runs.push(run("ckpt", 3 * k + 2, &flat(9.0, k + 100), 8.0));
            let mut c = flat(9.0, k + 200);
            for x in c.iter_mut().skip(16).take(6) {
                *x = 0.0;
            }
            runs.push(run("control", 3 * k + 3, &c, 8.0));
        }
        let arms: Vec<String> = ["none", "ckpt", "control"].iter().map(|s| s.to_string()).collect();
        let sums = summarise(&runs, &arms, "none", 0.02, 0.05, &Window::default());
        assert!(sums[0].vs_baseline.is_none());
        let ck = sums[1].vs_baseline.as_ref().expect("ckpt compared");
        assert_eq!(ck.verdict, Verdict::Equivalent, "{ck:?}");
        assert_eq!(ck.window_verdict, Verdict::Equivalent, "{ck:?}");
        let ct = sums[2].vs_baseline.as_ref().expect("control compared");
        assert_eq!(ct.verdict, Verdict::Different, "{ct:?}");
        assert_eq!(ct.window_verdict, Verdict::Different, "{ct:?}");
        assert!(!ct.tost.expect("tost").equivalent);
        assert!(ct.window_ratio.expect("ratio") < 0.5);
        assert!(ct.window_curve_gap_rel.expect("gap") > 0.9, "{ct:?}");
        assert_eq!((sums[0].stall_max_s, sums[1].stall_max_s, sums[2].stall_mean_s), (Some(0.0), Some(0.0), Some(3.0)));
        let t = table(&sums);
        assert_eq!(t.lines().count(), 2 + 3);
        assert!(t.contains("**different**") && t.contains("**equivalent**"), "{t}");
        assert_eq!(runs_csv(&runs).lines().count(), 1 + 18);
        let aa = aa_check(&runs, "none", 0.02, 0.05, &Window::default()).expect("6 baseline runs");
        assert_eq!(aa.runs, 3);
        assert_ne!(aa.vs_baseline.expect("compared").verdict, Verdict::Different);
        assert!(aa_check(&runs[..9], "none", 0.02, 0.05, &Window::default()).is_none(), "3 baseline runs are too few");
    }

    #[test]
    fn aligned_curve_averages_over_runs_and_events() {
        let a = run("none", 1, &[10.0; 20], 4.0);
        let b = run("none", 2, &[20.0; 20], 4.0);
        let c = aligned_curve(&[&a, &b], -1.0, 1.0, 0.5);
        assert_eq!(c.len(), 4);
        assert!(c.iter().all(|(_, y)| (*y - 15.0).abs() < 1e-9), "{c:?}");
        let s = mean_series(&[&a, &b], 0.5);
        assert_eq!(s.len(), 20);
        assert_eq!(s[0], (0.25, 15.0));
    }
}
