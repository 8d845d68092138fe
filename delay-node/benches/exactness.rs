//! The virtual-delay exactness figures of the checkpoint-under-load scenario
//! (the one `tests/exactness.rs` checks functionally), against the goal of
//! medians within 50 µs at the node boundary. Run on a quiet host:
//! `cargo bench -p delay-node --bench exactness` (needs root for real-time
//! priority; without it the figures show the host's scheduling).

#[path = "../tests/common/mod.rs"]
mod common;
use common::scenario::{run, summary};

const GOAL_NS: i64 = 50_000;

fn main() {
    let runs: usize = std::env::var("EXACTNESS_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut worst = i64::MIN;
    for i in 0..runs {
        let mut f = run();
        let (cmin, c50, c99, cmax) = summary(&mut f.client);
        let (nmin, n50, n99, nmax) = summary(&mut f.node);
        let (xmin, x50, x99, xmax) = summary(&mut f.crossed);
        println!(
            "run {i}: real-time {}; virtual-delay error ns (min/p50/p99/max): clients {cmin}/{c50}/{c99}/{cmax}; node {nmin}/{n50}/{n99}/{nmax}; crossed {xmin}/{x50}/{x99}/{xmax}",
            f.rt_ok
        );
        worst = worst.max(n50.abs()).max(x50.abs());
    }
    println!(
        "worst node-boundary median over {runs} runs: {worst} ns (goal ≤ {GOAL_NS} ns: {})",
        if worst <= GOAL_NS { "met" } else { "NOT met" }
    );
}
