//! What a synchronised clock reports about itself, as JSON-line events.
//!
//! `true_error_ns` is exact, not estimated: the synced clock is an overlay over
//! a [`crate::skew::SkewedClock`] whose error relative to the host clock is a
//! known formula, and every agent on the machine shares that host clock. So
//! from a single host reading `h`, `true_error = synced_at(h) - h`, where the
//! grandmaster's time is the host clock itself (it runs without injected error).

use serde::{Deserialize, Serialize};

/// The PTP port state, as reported in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Not yet decided by the best-master algorithm.
    Listening,
    /// This node is the time source.
    Master,
    /// Following a master (the clock is being steered).
    Slave,
    /// Passive or faulty: not synchronising.
    Other,
}

impl From<statime::observability::port::PortState> for SyncState {
    fn from(s: statime::observability::port::PortState) -> Self {
        use statime::observability::port::PortState as P;
        match s {
            P::Listening | P::Initializing => SyncState::Listening,
            P::Master | P::PreMaster => SyncState::Master,
            P::Slave | P::Uncalibrated => SyncState::Slave,
            P::Faulty | P::Disabled | P::Passive => SyncState::Other,
        }
    }
}

/// One metrics event: a JSON line `{"event":"clock_metrics", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `CLOCK_MONOTONIC` ns of the sample (comparable across processes on a host).
    pub mono_ns: u64,
    /// PTP port state.
    pub state: SyncState,
    /// The filter's estimate of this clock's offset from its master (slaves only).
    pub offset_estimate_ns: Option<f64>,
    /// Exact error of the synced clock against the host clock, when the base is
    /// a skewed host clock (always, in this crate).
    pub true_error_ns: Option<f64>,
    /// The filter's estimate of the one-way path delay to the master (slaves only).
    pub path_delay_ns: Option<f64>,
    /// The synced clock's reading at the sample, ns since the epoch.
    pub synced_ns: i128,
}

impl Metrics {
    /// The event as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        let mut v = serde_json::to_value(self).expect("metrics serialise");
        v.as_object_mut().expect("metrics is an object").insert("event".into(), "clock_metrics".into());
        v.to_string()
    }
}

/// Exact error of a synced reading against the host reading taken for it.
pub fn true_error_ns(synced_ns: i128, host_ns: u64) -> f64 {
    (synced_ns - host_ns as i128) as f64
}

/// Decides when a clock has converged: the first sample that starts a run of
/// `needed` consecutive samples within `bound_ns`. Feed samples in time order.
#[derive(Debug, Clone)]
pub struct Convergence {
    bound_ns: f64,
    needed: usize,
    run_start: Option<u64>,
    run_len: usize,
    converged_at: Option<u64>,
}

impl Convergence {
    /// Converged after `needed` consecutive samples with |error| < `bound_ns`.
    pub fn new(bound_ns: f64, needed: usize) -> Self {
        Convergence { bound_ns, needed: needed.max(1), run_start: None, run_len: 0, converged_at: None }
    }

    /// Feed one sample taken at `at_ns` with error `error_ns`; returns the
    /// convergence instant once known (it never changes afterwards).
    pub fn observe(&mut self, at_ns: u64, error_ns: f64) -> Option<u64> {
        if self.converged_at.is_some() {
            return self.converged_at;
        }
        if error_ns.abs() < self.bound_ns {
            if self.run_len == 0 {
                self.run_start = Some(at_ns);
            }
            self.run_len += 1;
            if self.run_len >= self.needed {
                self.converged_at = self.run_start;
            }
        } else {
            self.run_len = 0;
            self.run_start = None;
        }
        self.converged_at
    }

    /// The convergence instant, if reached.
    pub fn converged_at(&self) -> Option<u64> {
        self.converged_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_error_is_synced_minus_host() {
        assert_eq!(true_error_ns(1_000_000_500, 1_000_000_000), 500.0);
        assert_eq!(true_error_ns(999_999_000, 1_000_000_000), -1000.0);
    }

    #[test]
    fn metrics_json_line_round_trips_with_event_tag() {
        let m = Metrics {
            mono_ns: 7,
            state: SyncState::Slave,
            offset_estimate_ns: Some(-12.5),
            true_error_ns: Some(3.0),
            path_delay_ns: None,
            synced_ns: 1_700_000_000_000_000_000,
        };
        let line = m.to_json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "clock_metrics");
        assert_eq!(v["state"], "slave");
        assert_eq!(v["path_delay_ns"], serde_json::Value::Null);
        let back: Metrics = serde_json::from_str(&line).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn convergence_needs_an_unbroken_run() {
        let mut c = Convergence::new(10_000.0, 3);
        assert_eq!(c.observe(1, 5_000.0), None);
        assert_eq!(c.observe(2, -5_000.0), None);
        assert_eq!(c.observe(3, 20_000.0), None); // run broken
        assert_eq!(c.observe(4, 1.0), None);
        assert_eq!(c.observe(5, -1.0), None);
        assert_eq!(c.observe(6, 2.0), Some(4));
        // later outliers do not move the convergence instant
        assert_eq!(c.observe(7, 1e9), Some(4));
        assert_eq!(c.converged_at(), Some(4));
    }

    #[test]
    fn port_states_map() {
        use statime::observability::port::PortState as P;
        assert_eq!(SyncState::from(P::Slave), SyncState::Slave);
        assert_eq!(SyncState::from(P::Master), SyncState::Master);
        assert_eq!(SyncState::from(P::Listening), SyncState::Listening);
        assert_eq!(SyncState::from(P::Passive), SyncState::Other);
    }
}
