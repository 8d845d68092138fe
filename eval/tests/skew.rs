//! The skew benchmark's measurement pipeline, quick: 3 agents in network
//! namespaces with injected clock errors, PTP, one idle QEMU each, 10
//! checkpoints over the real protocol. Asserts that every figure is there
//! and sane and that the clocks converged — not any latency bound (the
//! figures depend on the host's load; `stasis-eval skew` prints them).
//!
//! Needs root (namespaces) and qemu-system-x86_64. Everything it starts is
//! removed by guards, also on failure.

use stasis_eval::skew::bench::{run, SkewConfig, AGENT_SKEWS, CONVERGED_NS};

#[test]
fn quick_skew_run_measures_every_stop() {
    let out = tempfile::tempdir().unwrap();
    let cfg = SkewConfig::quick(out.path().to_owned());
    let report = run(&cfg).unwrap_or_else(|e| panic!("skew benchmark: {:?}", anyhow_chain(&e)));
    println!("{}", report.table());

    // every clock converged from its injected error and stayed within the bound
    assert_eq!(report.clocks.len(), AGENT_SKEWS.len());
    for c in &report.clocks {
        if c.offset_ns != 0 {
            assert!(
                c.initial_error_ns.abs() >= c.offset_ns.unsigned_abs() as f64 * 0.9,
                "a{}: initial {}",
                c.agent,
                c.initial_error_ns
            );
        }
        assert!(c.converged_after_s > 0.0 && c.converged_after_s < cfg.converge_timeout.as_secs_f64());
        assert!(c.steady.count >= 20, "a{}: {} steady samples", c.agent, c.steady.count);
        assert!((c.steady.max_ns as f64) < CONVERGED_NS, "a{}: steady max {} ns", c.agent, c.steady.max_ns);
    }

    // every round committed; one stop per agent per round
    assert_eq!(report.rounds.len() as u64, cfg.checkpoints);
    assert!(
        report.rounds.iter().all(|r| r.committed),
        "{:?}",
        report.rounds.iter().filter(|r| !r.committed).collect::<Vec<_>>()
    );
    assert_eq!(report.records.len(), cfg.checkpoints as usize * AGENT_SKEWS.len());
    assert_eq!(report.analysis.checkpoints.len() as u64, cfg.checkpoints);
    for r in &report.records {
        // QEMU's stamp has µs resolution; stops come after the target and
        // after the command was written, within a second
        assert_eq!(r.stop_ns % 1000, 0);
        assert!(r.woke_ns >= r.target_ns, "{r:?}");
        assert!(
            r.stop_ns + 1_000 >= r.qmp_sent_ns && r.stop_ns <= r.qmp_replied_ns + 1_000,
            "stop outside its command window: {r:?}"
        );
        assert!(r.latency_ns() > 0 && r.latency_ns() < 1_000_000_000, "{r:?}");
        // the clock's error at T is the converged error, not the injected one
        assert!((r.clock_error_ns.abs() as f64) < CONVERGED_NS, "{r:?}");
        // the stop reported over the protocol is this stop on the agent's synced clock
        let round = &report.rounds[(r.ckpt - 1) as usize];
        let reported = round.reported_stops[r.agent][0] as i64;
        let expected = r.stop_ns as i64 + r.clock_error_ns;
        assert!((reported - expected).abs() < 50_000, "reported {reported} vs {expected}");
    }
    for k in &report.analysis.checkpoints {
        assert!(k.skew_ns <= k.clock_spread_ns + k.latency_spread_ns, "{k:?}");
        assert!(k.skew_ns < 1_000_000_000, "{k:?}");
    }
    let skew = &report.analysis.dists[0];
    assert_eq!(skew.count, cfg.checkpoints);
    assert!(skew.p50_ns <= skew.p99_ns && skew.p99_ns <= skew.max_ns);

    // the raw data is on disk and reads back
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("skew.json")).unwrap()).unwrap();
    assert_eq!(raw["records"].as_array().unwrap().len(), report.records.len());

    // nothing left behind
    let ns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let mine = format!("skw{}-", std::process::id());
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&mine),
        "namespaces left: {}",
        String::from_utf8_lossy(&ns.stdout)
    );
}

fn anyhow_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut v = vec![e.to_string()];
    let mut s = e.source();
    while let Some(c) = s {
        v.push(c.to_string());
        s = c.source();
    }
    v
}
