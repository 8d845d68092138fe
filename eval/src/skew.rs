//! The freeze-instant skew benchmark (`stasis-eval skew`): agents in network
//! namespaces, each with a PTP-synchronised clock carrying an injected error
//! and one idle QEMU VM, frozen by a coordinator over the real protocol at an
//! instant T of their synced clocks. All namespaces share one real clock, so
//! every instant below is exact host `CLOCK_REALTIME` (the grandmaster's
//! timescale: it runs without injected error):
//!
//! - `target` — where agent i's synced clock reads T (`target = T − e_i`,
//!   with `e_i` its true clock error at T);
//! - `stop` — QEMU's STOP event timestamp (µs resolution: QEMU stamps events
//!   with `g_get_real_time()` after pausing the vCPUs);
//! - actuation latency `L_i = stop_i − target_i` (wake-up lateness, writing
//!   QMP `stop`, QEMU's main loop, pausing the vCPUs).
//!
//! Per checkpoint, the freeze skew is `max stop − min stop`; it is at most the
//! spread of the targets (clock part) plus the spread of the latencies
//! (actuation part). [`analyse`] is I/O-free; [`bench`] runs the lab.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub mod bench;
pub mod netns;
pub mod node;

/// One VM stop on one agent, for one checkpoint. Instants are host
/// `CLOCK_REALTIME` ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRecord {
    pub ckpt: u64,
    pub agent: usize,
    /// T, on the synchronised clock.
    pub freeze_at: u64,
    /// The agent acted at T + this (see `node::AgentSpec::stagger_ns`);
    /// every instant below includes it, the analysis takes it out.
    #[serde(default)]
    pub stagger_ns: u64,
    /// Where the agent's synced clock read T + stagger.
    pub target_ns: u64,
    /// The agent's synced clock's true error at T (synced − real).
    pub clock_error_ns: i64,
    /// When the agent's thread woke for T (≥ target).
    pub woke_ns: u64,
    /// QMP `stop` written / its reply read.
    pub qmp_sent_ns: u64,
    pub qmp_replied_ns: u64,
    /// QEMU's STOP event timestamp (a multiple of 1 000: µs resolution).
    pub stop_ns: u64,
    /// Round trip of a `query-status` right after (QEMU's monitor latency alone).
    pub probe_rtt_ns: u64,
}

impl StopRecord {
    /// `stop − target`: everything between the agent's target and QEMU's stamp.
    pub fn latency_ns(&self) -> i64 {
        self.stop_ns as i64 - self.target_ns as i64
    }
}

/// The split of one checkpoint's freeze skew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSkew {
    pub ckpt: u64,
    /// max − min of the true stop instants.
    pub skew_ns: u64,
    /// max − min of the targets (what the clocks contribute).
    pub clock_spread_ns: u64,
    /// max − min of the latencies (what actuation contributes).
    pub latency_spread_ns: u64,
}

/// p50/p99/max of one quantity, in ns (from an hdrhistogram, 3 significant digits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub name: String,
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl Dist {
    /// The distribution of `values` (negative values are recorded as 0; the
    /// callers pass magnitudes or quantities that are ≥ 0 by construction).
    pub fn of(name: &str, values: impl IntoIterator<Item = i64>) -> Dist {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds");
        for v in values {
            h.saturating_record(v.max(0) as u64);
        }
        Dist {
            name: name.to_owned(),
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
        }
    }
}

/// Why records do not make a checkpoint's skew.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalyseError {
    #[error("checkpoint {ckpt}: {got} stop records, expected one from each of {agents} agents")]
    Missing { ckpt: u64, got: usize, agents: usize },
}

/// Group `records` by checkpoint (each must have one record per agent) and
/// split each checkpoint's skew.
pub fn per_checkpoint(records: &[StopRecord], agents: usize) -> Result<Vec<CheckpointSkew>, AnalyseError> {
    let mut ckpts: Vec<u64> = records.iter().map(|r| r.ckpt).collect();
    ckpts.sort_unstable();
    ckpts.dedup();
    ckpts
        .into_iter()
        .map(|ckpt| {
            let rs: Vec<&StopRecord> = records.iter().filter(|r| r.ckpt == ckpt).collect();
            let mut seen: Vec<usize> = rs.iter().map(|r| r.agent).collect();
            seen.sort_unstable();
            seen.dedup();
            if rs.len() != agents || seen.len() != agents {
                return Err(AnalyseError::Missing { ckpt, got: rs.len(), agents });
            }
            let spread = |f: &dyn Fn(&StopRecord) -> i64| {
                let max = rs.iter().map(|r| f(r)).max().unwrap_or(0);
                let min = rs.iter().map(|r| f(r)).min().unwrap_or(0);
                (max - min) as u64
            };
            Ok(CheckpointSkew {
                ckpt,
                skew_ns: spread(&|r| r.stop_ns as i64 - r.stagger_ns as i64),
                clock_spread_ns: spread(&|r| r.target_ns as i64 - r.stagger_ns as i64),
                latency_spread_ns: spread(&|r| r.latency_ns()),
            })
        })
        .collect()
}

/// The benchmark's figures: distributions over checkpoints (the skew and its
/// split) and over every stop (the per-agent parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub checkpoints: Vec<CheckpointSkew>,
    pub dists: Vec<Dist>,
}

/// Distributions of [`per_checkpoint`] and of the per-stop parts.
pub fn analyse(records: &[StopRecord], agents: usize) -> Result<Analysis, AnalyseError> {
    let checkpoints = per_checkpoint(records, agents)?;
    let c = &checkpoints;
    let dists = vec![
        Dist::of("freeze skew (max-min true stop)", c.iter().map(|k| k.skew_ns as i64)),
        Dist::of("  clock part (max-min target)", c.iter().map(|k| k.clock_spread_ns as i64)),
        Dist::of("  actuation part (max-min latency)", c.iter().map(|k| k.latency_spread_ns as i64)),
        Dist::of("|clock error| at T, per stop", records.iter().map(|r| r.clock_error_ns.abs())),
        Dist::of("actuation latency (stop - target)", records.iter().map(StopRecord::latency_ns)),
        Dist::of("  wake lateness (woke - target)", records.iter().map(|r| r.woke_ns as i64 - r.target_ns as i64)),
        Dist::of("  woke -> QMP stop written", records.iter().map(|r| r.qmp_sent_ns as i64 - r.woke_ns as i64)),
        Dist::of("  QMP written -> STOP stamp", records.iter().map(|r| r.stop_ns as i64 - r.qmp_sent_ns as i64)),
        Dist::of("  QMP stop round trip", records.iter().map(|r| r.qmp_replied_ns as i64 - r.qmp_sent_ns as i64)),
        Dist::of("  QMP query-status round trip (idle monitor)", records.iter().map(|r| r.probe_rtt_ns as i64)),
    ];
    Ok(Analysis { checkpoints, dists })
}

/// A Markdown table of distributions, in µs.
pub fn dist_table(dists: &[Dist]) -> String {
    let us = |ns: u64| format!("{:.1}", ns as f64 / 1000.0);
    let mut s = String::from("| quantity | n | p50 µs | p99 µs | max µs |\n|---|---|---|---|---|\n");
    for d in dists {
        s += &format!("| {} | {} | {} | {} | {} |\n", d.name, d.count, us(d.p50_ns), us(d.p99_ns), us(d.max_ns));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ckpt: u64, agent: usize, err: i64, lat: i64) -> StopRecord {
        let t = 1_000_000_000_000u64;
        let target = (t as i64 - err) as u64;
        StopRecord {
            ckpt,
            agent,
            freeze_at: t,
            stagger_ns: 0,
            target_ns: target,
            clock_error_ns: err,
            woke_ns: target + 2_000,
            qmp_sent_ns: target + 5_000,
            qmp_replied_ns: target + 900_000,
            stop_ns: (target as i64 + lat) as u64,
            probe_rtt_ns: 300_000,
        }
    }

    #[test]
    fn skew_splits_into_clock_and_actuation_spreads() {
        // clocks: +3 µs, −2 µs, 0 → targets spread 5 µs; latencies 100, 140, 120 µs
        let rs = [rec(1, 0, 3_000, 100_000), rec(1, 1, -2_000, 140_000), rec(1, 2, 0, 120_000)];
        let k = per_checkpoint(&rs, 3).unwrap();
        assert_eq!(k.len(), 1);
        // stops: T−3+100, T+2+140, T+120 (µs) → 97 … 142 → 45 µs
        assert_eq!(k[0].skew_ns, 45_000);
        assert_eq!(k[0].clock_spread_ns, 5_000);
        assert_eq!(k[0].latency_spread_ns, 40_000);
        assert!(k[0].skew_ns <= k[0].clock_spread_ns + k[0].latency_spread_ns);
    }

    #[test]
    fn staggered_agents_are_compared_at_their_own_offsets() {
        // agent 1 acted 2 ms after T on purpose: the same stops as above, shifted
        let mut rs = [rec(1, 0, 3_000, 100_000), rec(1, 1, -2_000, 140_000), rec(1, 2, 0, 120_000)];
        for f in [
            &mut rs[1].target_ns,
            &mut rs[1].woke_ns,
            &mut rs[1].qmp_sent_ns,
            &mut rs[1].qmp_replied_ns,
            &mut rs[1].stop_ns,
        ] {
            *f += 2_000_000;
        }
        rs[1].stagger_ns = 2_000_000;
        let k = per_checkpoint(&rs, 3).unwrap();
        assert_eq!((k[0].skew_ns, k[0].clock_spread_ns, k[0].latency_spread_ns), (45_000, 5_000, 40_000));
    }

    #[test]
    fn a_checkpoint_missing_an_agent_is_refused() {
        let rs = [rec(1, 0, 0, 1), rec(1, 1, 0, 1), rec(2, 0, 0, 1), rec(2, 0, 0, 1), rec(2, 1, 0, 1)];
        assert_eq!(per_checkpoint(&rs[..2], 3), Err(AnalyseError::Missing { ckpt: 1, got: 2, agents: 3 }));
        // three records but one agent twice
        assert_eq!(per_checkpoint(&rs[2..], 3), Err(AnalyseError::Missing { ckpt: 2, got: 3, agents: 3 }));
    }

    #[test]
    fn distributions_over_checkpoints_and_stops() {
        let mut rs = vec![];
        for k in 1..=100u64 {
            rs.push(rec(k, 0, 1_000, 100_000));
            rs.push(rec(k, 1, -1_000, 100_000 + k as i64 * 1_000));
        }
        let a = analyse(&rs, 2).unwrap();
        assert_eq!(a.checkpoints.len(), 100);
        let skew = &a.dists[0];
        assert_eq!(skew.count, 100);
        // skew_k = 2 µs (clocks) + k µs (latency) → p50 ≈ 52 µs, max 102 µs
        assert!((51_000..=53_100).contains(&skew.p50_ns), "{}", skew.p50_ns);
        assert!((101_900..=102_100).contains(&skew.max_ns), "{}", skew.max_ns);
        let err = &a.dists[3];
        assert_eq!((err.count, err.p50_ns, err.max_ns), (200, 1_000, 1_000));
        let table = dist_table(&a.dists);
        assert!(table.contains("| freeze skew (max-min true stop) | 100 |"), "{table}");
    }
}
