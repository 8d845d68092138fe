//! `stasis-eval cpu --quick` end to end: two real VMs running a busy loop
//! that counts its work per guest second, one run per arm (the baseline,
//! the non-transparent control that stops both QEMUs for 2 s of a 4 s
//! window, a stop-and-copy checkpoint). The eval must write its raw data,
//! report and plot, and its instruments must see the control's lost CPU —
//! a 50 % loss nobody detects would mean the measurement is blind.

use serde_json::Value;
use stasis_system_tests::{stasis_bin, target_dir};
use std::process::Command;

/// Removes the eval's output when the test passes; keeps it when it fails.
struct KeepOnFailure(tempfile::TempDir);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.0, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("cpu eval output kept in {}", kept.display());
        }
    }
}

#[test]
fn quick_cpu_eval_reports_and_catches_the_control() {
    let _ = stasis_bin(); // asserts the binaries and the guest image exist
    let eval = target_dir().join("debug").join("stasis-eval");
    assert!(eval.exists(), "{} is missing: cargo build --bins", eval.display());
    let out = KeepOnFailure(tempfile::Builder::new().prefix("stasis-cpu-eval").tempdir_in("/tmp").expect("tempdir"));
    let out = &out.0;
    let res = Command::new(&eval)
        .args(["cpu", "--quick", "--arms", "control,ckpt", "--throttle-ms", "2000", "--out"])
        .arg(out.path())
        .output()
        .expect("run stasis-eval");
    let stdout = String::from_utf8_lossy(&res.stdout);
    eprintln!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success(), "stasis-eval cpu --quick failed");
    assert!(stdout.contains("| control | 1 |") && stdout.contains("| ckpt | 1 |"), "summary table printed");
    for f in ["cpu-eval.json", "runs.csv", "report.md", "cpu-around-events.png", "console-lines.jsonl"] {
        let p = out.path().join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{} missing or empty", p.display());
    }
    let raw: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("cpu-eval.json")).expect("json")).expect("parse");
    let runs = raw["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3, "failures: {}", raw["failures"]);
    let ratio = |r: &Value| -> f64 {
        let nodes = r["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 2);
        let v: Vec<f64> = nodes.iter().map(|n| n["ratio"].as_f64().expect("every node has a ratio")).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    for r in runs {
        let q = ratio(r);
        assert!(q.is_finite() && q > 0.1 && q < 10.0, "{} run: post/pre ratio {q}", r["arm"]);
        assert!(r["curve"].as_array().map_or(0, Vec::len) >= 10, "{} run has its curve", r["arm"]);
    }
    let arm = |name: &str| runs.iter().find(|r| r["arm"] == name).expect(name);
    // 2 s of 4 s without CPU: the ratio must fall to about one half.
    let control = ratio(arm("control"));
    assert!(control < 0.85, "control: 2 s of lost CPU in a 4 s window, yet the post/pre ratio is {control}");
    assert!(arm("control")["frozen_ns"].as_u64().unwrap_or(0) >= 2_000_000_000);
    assert!(arm("ckpt")["frozen_ns"].as_u64().unwrap_or(0) > 0, "the checkpoint froze the VMs");
    let report = std::fs::read_to_string(out.path().join("report.md")).expect("report");
    assert!(report.contains("## Summary") && report.contains("![cpu-around-events.png]"), "report has table and plot");
    // The analysis is reproducible from the raw data alone.
    let re = Command::new(&eval).args(["cpu", "--replot", "--out"]).arg(out.path()).output().expect("replot");
    assert!(re.status.success(), "replot: {}", String::from_utf8_lossy(&re.stderr));
    let again: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("cpu-eval.json")).expect("json")).expect("parse");
    assert_eq!(again["runs"], raw["runs"], "--replot recomputes the same rates");
}
