//! The PTP lab's synchronisation figures against the goal (< 10 µs true error
//! after convergence, in the steady state). Needs root; run on a quiet host:
//! `cargo bench -p stasis-clock-sync --bench ptp` (`PTP_RUNS=N` for N runs).

#[path = "../tests/common/mod.rs"]
mod common;

const GOAL_NS: f64 = 10_000.0;

fn main() {
    if !common::is_root() {
        eprintln!("needs root to create network namespaces");
        std::process::exit(2);
    }
    let runs: usize = std::env::var("PTP_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut worst: f64 = 0.0;
    for r in 0..runs {
        for s in common::run(GOAL_NS) {
            let max = s.steady_abs_ns[s.steady_abs_ns.len() - 1];
            println!(
                "run {r} {}: converged < 10 µs after {:.1} s; steady |err| p50 {:.0} ns p99 {:.0} ns max {max:.0} ns",
                s.name,
                s.converged_after_s,
                common::percentile(&s.steady_abs_ns, 0.5),
                common::percentile(&s.steady_abs_ns, 0.99),
            );
            worst = worst.max(max);
        }
    }
    println!(
        "worst steady-state true error over {runs} run(s): {worst:.0} ns (goal < {GOAL_NS:.0} ns: {})",
        if worst < GOAL_NS { "met" } else { "NOT met" }
    );
}
