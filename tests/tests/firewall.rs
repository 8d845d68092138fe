//! The temporal firewall seen from inside the guests, at kernel precision:
//! the guest-kmod `stasis_fw` (loaded by /init in every guest) samples
//! CLOCK_MONOTONIC/REALTIME/BOOTTIME and the TSC from a 1 ms hrtimer, and
//! `stasis-probe --kmod /proc/stasis_fw` copies its counters to the console.
//!
//! - Across a 3 s checkpoint and a restore no clock of any guest steps, and
//!   no pair of clocks disagrees, by more than the bounds below.
//! - The instruments can fail: a deliberate realtime step inside a guest
//!   (`date -s`, a leak TCG lets us produce) breaks exactly those bounds.

use serde_json::Value;
use stasis_system_tests::{kmod_counters, kmod_violations, Experiment};
use std::time::Duration;

/// The pause of the checkpoint: what a leak would show.
const PAUSE_NS: u64 = 3_000_000_000;
/// Largest step of any clock (timer lateness of one 1 ms period). Under TCG
/// a guest's clocks run on while its vCPU thread is descheduled by the host
/// (2 cores, 2 guests, the CLI, the delay node and the migration streams),
/// so this is scheduling noise, not the checkpoint; see docs/guest-kmod.md
/// for the figures measured. A leaked pause would be PAUSE_NS.
const STEP_BOUND_NS: u64 = 200_000_000;
/// Largest change of (clock − monotonic) between two 1 ms samples. The
/// module brackets its reads between two TSC reads and retries stretched
/// samples, so descheduling does not enter; what remains is TSC/mono rate
/// error and the TCG timer emulation.
const DIS_BOUND_NS: u64 = 1_000_000;

/// The probe line, after boot noise settles: counters reset, then one report
/// per second with the kmod's counters.
fn probe(node: &str) -> String {
    format!("sleep 3; echo reset > /proc/stasis_fw; stasis-probe --node {node} --kmod /proc/stasis_fw")
}

fn spec(name: &str, extra_a: &str) -> String {
    format!(
        r#"
name = "{name}"
[defaults]
memory = "256M"

[[node]]
name = "a"
run = ["{pa}"{extra_a}]
[[node]]
name = "b"
run = ["{pb}"]

[[lan]]
name = "lan0"
members = ["a", "b"]
bandwidth = "100Mb"
delay = "5ms"
"#,
        pa = probe("a"),
        pb = probe("b"),
    )
}

/// The latest kmod counters of a node whose reports cover at least
/// `after_ns` of guest monotonic time since the reset.
fn wait_kmod(exp: &Experiment, node: &str, inc: u32, after_ns: u64, what: &str) -> Value {
    let r = exp.wait_for(node, inc, Duration::from_secs(120), what, |r| {
        kmod_counters(r).last().is_some_and(|k| k["since_reset_ns"].as_u64().unwrap_or(0) > after_ns)
    });
    kmod_counters(&r).pop().expect("kmod counters")
}

fn figures(k: &Value) -> String {
    format!(
        "samples {} noisy {} max_step_ns {} max_dis_ns {} steps_over {} dis_over {} kvm {}",
        k["samples"], k["noisy"], k["max_step_ns"], k["max_dis_ns"], k["steps_over"], k["dis_over"], k["kvm"]
    )
}

#[test]
fn kmod_sees_no_step_across_checkpoint_and_restore() {
    let exp = Experiment::new("fw", &spec("fw", ""));
    let up = exp.json(&["up", exp.spec.to_str().unwrap()]);
    assert_eq!(up["vms"].as_array().map(Vec::len), Some(2));

    // The module is loaded in every guest, sampling, and (under TCG) says
    // why its KVM path is inactive.
    let mut before = Vec::new();
    for n in ["a", "b"] {
        let k = wait_kmod(&exp, n, 1, 2_000_000_000, "kmod counters");
        assert_eq!(k["version"], 1, "{k}");
        assert_eq!(k["period_ns"], 1_000_000, "{k}");
        assert!(k["samples"].as_u64().unwrap() > 1000, "the hrtimer samples: {k}");
        assert!(k["kvm"]["reason"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
        eprintln!("{n} before the checkpoint: {}", figures(&k));
        before.push(k["since_reset_ns"].as_u64().unwrap());
    }

    let c = exp.json(&["checkpoint", "--name", "one", "--pause-ms", "3000"]);
    assert!(c["frozen_duration_ns"].as_u64().unwrap() >= PAUSE_NS, "{c}");
    // Counters that cover the checkpoint (reports from at least 3 s later).
    let mut worst = Vec::new();
    for (i, n) in ["a", "b"].iter().enumerate() {
        let k = wait_kmod(&exp, n, 1, before[i] + 3_000_000_000, "kmod counters after the checkpoint");
        eprintln!("{n} across the checkpoint: {}", figures(&k));
        worst.push((n.to_string(), "checkpoint", kmod_violations(&k, STEP_BOUND_NS, DIS_BOUND_NS)));
    }

    // Kill, restore: the module's state comes back with guest memory and
    // keeps counting in the restored timeline.
    exp.json(&["down"]);
    let restored = exp.json(&["restore", "one"]);
    assert_eq!(restored["runtime"]["incarnation"], 2);
    for n in ["a", "b"] {
        let first = wait_kmod(&exp, n, 2, 0, "kmod counters after restore");
        let since = first["since_reset_ns"].as_u64().unwrap();
        let k = wait_kmod(&exp, n, 2, since + 3_000_000_000, "kmod counters 3 s after restore");
        eprintln!("{n} across the restore: {}", figures(&k));
        assert!(k["samples"].as_u64() > first["samples"].as_u64(), "still sampling after restore: {k}");
        worst.push((n.to_string(), "restore", kmod_violations(&k, STEP_BOUND_NS, DIS_BOUND_NS)));
    }
    for (n, when, v) in &worst {
        assert!(v.is_empty(), "node {n}, {when}: the kmod saw the checkpoint: {v:?}");
    }
}

#[test]
fn kmod_catches_a_deliberate_realtime_step() {
    // Node a steps its realtime clock by +5 s, 8 s after boot (after the
    // counters' reset): the leak a broken firewall would let through.
    let exp = Experiment::new("fwleak", &spec("fwleak", r#", "sleep 8; date -s @$(( $(date +%s) + 5 )) >/dev/null""#));
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    let a = exp.wait_for("a", 1, Duration::from_secs(120), "the step in a's counters", |r| {
        kmod_counters(r).last().is_some_and(|k| k["dis_over"]["real_mono"].as_u64().unwrap_or(0) > 0)
    });
    let ka = kmod_counters(&a).pop().unwrap();
    let kb = wait_kmod(&exp, "b", 1, ka["since_reset_ns"].as_u64().unwrap(), "b's counters");
    eprintln!("a (stepped): {}\nb (untouched): {}", figures(&ka), figures(&kb));

    let v = kmod_violations(&ka, STEP_BOUND_NS, DIS_BOUND_NS);
    assert!(v.iter().any(|s| s.starts_with("max_dis_ns.real_mono")), "the realtime step is caught: {v:?}");
    assert!(v.iter().any(|s| s.starts_with("max_step_ns.real")), "{v:?}");
    let dis = ka["max_dis_ns"]["real_mono"].as_u64().unwrap();
    // +5 s to a whole second, minus however long the guest's shell took
    // between reading the clock and setting it (over a second on a busy host).
    assert!((2_500_000_000..=5_100_000_000).contains(&dis), "a +5 s step of whole seconds shows as ~4–5 s: {dis}");
    // Only realtime moved: monotonic and boottime stay within their bounds.
    assert!(ka["max_step_ns"]["mono"].as_u64().unwrap() <= STEP_BOUND_NS, "{ka}");
    assert!(ka["max_dis_ns"]["boot_mono"].as_u64().unwrap() <= DIS_BOUND_NS, "{ka}");
    // The other guest saw nothing.
    assert!(kmod_violations(&kb, STEP_BOUND_NS, DIS_BOUND_NS).is_empty(), "{kb}");
}
