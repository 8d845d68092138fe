//! Three slaves with injected clock errors (+3 ms/+50 ppm, −2 ms/−30 ppm, 0)
//! and one grandmaster, each in its own network namespace: every slave
//! converges and stays synchronised.
//!
//! The bounds are functional: a servo that does not correct, or corrects only
//! the offset, stays milliseconds off or drifts 30–50 µs every second, far
//! outside them. The figure the lab reaches (goal: < 10 µs true error in the
//! steady state) is printed by `cargo bench -p stasis-clock-sync --bench ptp`:
//! on a shared 2-core machine a descheduled slave once crossed 10 µs in CI.

mod common;

/// Convergence: 10 consecutive samples within this.
const CONVERGE_NS: f64 = 100_000.0;
/// Steady state: the median within this, never beyond `STEADY_MAX_NS`.
const STEADY_P50_NS: f64 = 100_000.0;
const STEADY_MAX_NS: f64 = 1_000_000.0;

#[test]
fn three_skewed_slaves_converge_and_stay_synchronised() {
    if !common::is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    for s in common::run(CONVERGE_NS) {
        let p50 = common::percentile(&s.steady_abs_ns, 0.5);
        let max = s.steady_abs_ns[s.steady_abs_ns.len() - 1];
        assert!(p50 < STEADY_P50_NS, "{}: steady-state median true error {p50:.0} ns", s.name);
        assert!(max < STEADY_MAX_NS, "{}: steady-state true error reached {max:.0} ns", s.name);
    }
}
