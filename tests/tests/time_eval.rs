//! `stasis-eval time --quick` end to end: two real VMs, two checkpoints with
//! 1 s pauses; the eval must write its raw data, report and plots, and every
//! measured figure must be present, finite and plausible (a run that
//! measured nothing fails here).

use serde_json::Value;
use stasis_system_tests::{stasis_bin, target_dir};
use std::process::Command;

/// A leaked 1 s pause would show as a step ≈ 1 s; TCG scheduling noise is
/// up to ~200 ms (docs/guest-kmod.md).
const STEP_BOUND_NS: f64 = 500e6;
/// Inter-VM skew introduced per checkpoint: a plausibility bound, not the
/// goal (≤ 100 µs). The exchange's own noise under TCG is ~1 ms IQR and one
/// quick run measured −59 ms at one checkpoint (docs/eval-time.md); a pause
/// leaked into one guest would be the whole 1 s.
const DTHETA_BOUND_NS: f64 = 250e6;

/// Removes the eval's output when the test passes; keeps it (raw console
/// lines, JSON, report) when it fails, for diagnosis.
struct KeepOnFailure(tempfile::TempDir);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.0, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("time eval output kept in {}", kept.display());
        }
    }
}

#[test]
fn quick_time_eval_writes_plausible_figures() {
    let _ = stasis_bin(); // asserts the binaries and the guest image exist
    let eval = target_dir().join("debug").join("stasis-eval");
    assert!(eval.exists(), "{} is missing: cargo build --bins", eval.display());
    let out = KeepOnFailure(tempfile::Builder::new().prefix("stasis-time-eval").tempdir_in("/tmp").expect("tempdir"));
    let out = &out.0;
    let res = Command::new(&eval).args(["time", "--quick", "--out"]).arg(out.path()).output().expect("run stasis-eval");
    let stdout = String::from_utf8_lossy(&res.stdout);
    eprintln!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success(), "stasis-eval time --quick failed");
    assert!(stdout.contains("| 1 s | 2 |"), "summary table printed");
    for f in ["time-eval.json", "time-eval.csv", "report.md", "clocks-1s.png", "theta-1s.png", "work-1s.png"] {
        let p = out.path().join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{} missing or empty", p.display());
    }
    let csv = std::fs::read_to_string(out.path().join("time-eval.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 2 * 2, "header + 2 checkpoints × 2 nodes:\n{csv}");
    let raw: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("time-eval.json")).expect("json")).expect("parse");
    let recs = raw["checkpoints"].as_array().expect("checkpoints");
    assert_eq!(recs.len(), 2);
    for r in recs {
        assert_eq!(r["pause_s"], 1);
        let frozen = r["checkpoint"]["frozen_duration_ns"].as_f64().expect("frozen");
        assert!(frozen >= 1e9, "frozen {frozen} < the 1 s pause");
        let dth = r["theta"]["delta_ns"].as_f64().expect("Δθ measured");
        assert!(dth.abs() < DTHETA_BOUND_NS, "Δθ {dth} ns");
        assert!(
            r["theta"]["n_before"].as_u64().unwrap_or(0) >= 10 && r["theta"]["n_after"].as_u64().unwrap_or(0) >= 10,
            "θ samples: {}",
            r["theta"]
        );
        let nodes = r["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 2);
        for n in nodes {
            assert!(n["kmod_windows"].as_u64().unwrap_or(0) >= 1, "no kmod window covered the checkpoint: {n}");
            for c in ["mono", "real", "boot", "tsc"] {
                let k = n["kmod_step_ns"][c].as_f64().unwrap_or(f64::NAN);
                assert!(k.is_finite() && k < STEP_BOUND_NS, "{} kmod step {c} = {k}", n["node"]);
                let p = n["probe_step_ns"][c].as_f64().unwrap_or(f64::NAN);
                assert!(p.is_finite() && p < STEP_BOUND_NS, "{} probe step {c} = {p}", n["node"]);
            }
            let ratio = n["work_ratio"].as_f64().unwrap_or(f64::NAN);
            assert!(ratio.is_finite() && ratio > 0.1 && ratio < 10.0, "{} work ratio {ratio}", n["node"]);
        }
    }
    assert!(raw["steady"]["theta_iqr_ns"].as_f64().is_some_and(f64::is_finite), "steady θ noise measured");
}
