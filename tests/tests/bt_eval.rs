//! `stasis-eval bt --quick` end to end: a real swarm (opentracker +
//! CTorrent in three TCG guests), one run without disturbance and one with
//! the delay node frozen for 3 s while the guests run (the non-transparent
//! control). Every leecher must complete with data whose SHA-1 matches, and
//! the instrument must see the control's freeze: a leecher stalls for about
//! the freeze (guest time without a new piece), which a flowing download
//! never does for that long.

use serde_json::Value;
use stasis_system_tests::{stasis_bin, target_dir};
use std::process::Command;

/// The control freezes the network 3 s; CTorrent reports about once a
/// second, so a flowing download's longest gap is ~1–2 s.
const CONTROL_STALL_MIN_S: f64 = 2.5;

/// Removes the eval's output when the test passes; keeps it when it fails.
struct KeepOnFailure(tempfile::TempDir);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.0, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("bt eval output kept in {}", kept.display());
        }
    }
}

#[test]
fn quick_bt_eval_completes_verified_and_detects_the_control() {
    let _ = stasis_bin(); // asserts the binaries and the guest image exist
    let eval = target_dir().join("debug").join("stasis-eval");
    assert!(eval.exists(), "{} is missing: cargo build --bins", eval.display());
    let out = KeepOnFailure(tempfile::Builder::new().prefix("stasis-bt-eval").tempdir_in("/tmp").expect("tempdir"));
    let out = &out.0;
    let res = Command::new(&eval).args(["bt", "--quick", "--out"]).arg(out.path()).output().expect("run stasis-eval");
    let stdout = String::from_utf8_lossy(&res.stdout);
    eprintln!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success(), "stasis-eval bt --quick failed");
    assert!(stdout.contains("| control | 1/1 |"), "summary table printed");
    for f in
        ["bt-eval.json", "bt-runs.csv", "report.md", "bt-progress-none.png", "bt-progress-control.png", "bt-cdf.png"]
    {
        let p = out.path().join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{} missing or empty", p.display());
    }
    let raw: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bt-eval.json")).expect("json")).expect("parse");
    let runs = raw["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "one run per arm");
    let mut stall = std::collections::HashMap::new();
    for r in runs {
        let arm = r["arm"].as_str().expect("arm").to_string();
        let leechers = r["leechers"].as_array().expect("leechers");
        assert_eq!(leechers.len(), 2);
        let mut sha = None;
        for l in leechers {
            assert!(l["completion_s"].as_f64().is_some_and(|c| c > 0.0), "{arm}: {} did not complete", l["node"]);
            assert_eq!(l["verified"], true, "{arm}: {} data not verified", l["node"]);
            // Both leechers hold the same bytes (the payload baked at build time).
            let s = l["sha1"].as_str().expect("sha1").to_string();
            assert_eq!(s.len(), 40);
            assert!(sha.get_or_insert(s.clone()) == &s, "leechers disagree on the payload");
            let progress = l["progress"].as_array().expect("progress");
            assert!(progress.len() >= 4, "{arm}: {} has {} progress points", l["node"], progress.len());
        }
        let max_stall = leechers
            .iter()
            .filter_map(|l| {
                let p: Vec<(f64, f64)> =
                    l["progress"].as_array()?.iter().filter_map(|x| Some((x[0].as_f64()?, x[1].as_f64()?))).collect();
                let from = p.iter().position(|x| x.1 > 0.0)?;
                p[from..].windows(2).map(|w| w[1].0 - w[0].0).reduce(f64::max)
            })
            .fold(0.0, f64::max);
        if arm == "control" {
            let events = r["events"].as_array().expect("events");
            assert_eq!(events.len(), 1, "the control froze the delay node once");
            assert!(
                events[0]["detail"]["frozen_for_ns"].as_f64().is_some_and(|f| f >= 3e9),
                "freeze: {}",
                events[0]["detail"]
            );
        }
        stall.insert(arm, max_stall);
    }
    assert!(
        stall["control"] >= CONTROL_STALL_MIN_S,
        "the control arm's 3 s network freeze was not seen: longest stall {:.2} s (none: {:.2} s)",
        stall["control"],
        stall["none"]
    );
}
