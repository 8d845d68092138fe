//! The temporal firewall seen from inside the guests, at kernel precision:
//! the guest-kmod `stasis_fw` (loaded by /init in every guest) samples
//! CLOCK_MONOTONIC/REALTIME/BOOTTIME and the TSC from a 1 ms hrtimer; a
//! shell loop in each guest prints its counters once a guest second and
//! resets them, so each printed line holds the largest step and
//! disagreement of that second alone.
//!
//! - Across a 3 s checkpoint and a restore no clock of any guest steps by
//!   more than the same guest's steady-state noise plus half the pause, and
//!   no pair of clocks disagrees by more than 1 ms.
//! - The instruments can fail: a deliberate realtime step inside a guest
//!   (`date -s`) breaks exactly those bounds. (tests/tests/firewall_faults.rs
//!   breaks the checkpoint itself: a late resume, a SIGSTOP bypass.)

use serde_json::Value;
use stasis_system_tests::{kmod_violations, Experiment};
use std::time::Duration;

/// The pause of the checkpoint: what a leak would show.
const PAUSE_NS: u64 = 3_000_000_000;
/// How much the largest step of the seconds around a checkpoint (or a
/// restore) may exceed the largest step of the same guest's seconds before
/// it, without checkpoint. Under TCG a guest's clocks run on while its vCPU
/// thread waits for a host CPU, so every second has a step of host
/// scheduling noise (7–286 ms measured on 2 busy cores, docs/guest-kmod.md),
/// the same in all four clocks; the checkpoint window also has the save's
/// CPU load. A leaked pause adds the whole pause to the step it lands in
/// (≥ 3 s): half of it separates the two with room on both sides. The
/// 1 ms goal is below this host's noise floor and is not what this asserts.
const EXCESS_BOUND_NS: u64 = PAUSE_NS / 2;
/// Largest change of (clock − monotonic) between two 1 ms samples. The
/// module brackets its reads between two TSC reads and retries stretched
/// samples, so descheduling does not enter; what remains is TSC/mono rate
/// error and the TCG timer emulation.
const DIS_BOUND_NS: u64 = 1_000_000;
/// Seconds of steady state measured before the checkpoint.
const STEADY_WINDOWS: usize = 6;

/// Every guest second: print the counters, reset them (after boot noise
/// settles).
const KMOD_LOOP: &str =
    "sleep 3; echo reset > /proc/stasis_fw; while sleep 1; do cat /proc/stasis_fw; echo reset > /proc/stasis_fw; done";

/// Every guest second: the RTC (whole seconds, from the emulated CMOS
/// clock) next to CLOCK_REALTIME. QEMU runs the RTC on the VM's virtual
/// clock (`-rtc clock=vm`); on host time it would jump by every pause.
/// (Escaped for a TOML string, in which the spec embeds it.)
const RTC_LOOP: &str = r#"while sleep 1; do echo \"{\\\"tool\\\":\\\"rtc\\\",\\\"rtc\\\":$(cat /sys/class/rtc/rtc0/since_epoch),\\\"real\\\":$(date +%s)}\"; done"#;

/// RTC − CLOCK_REALTIME of every `rtc` line, s.
fn rtc_offsets(reports: &[Value]) -> Vec<i64> {
    reports
        .iter()
        .filter(|r| r["tool"] == "rtc")
        .filter_map(|r| Some(r["rtc"].as_i64()? - r["real"].as_i64()?))
        .collect()
}

fn spec(name: &str, extra_a: &str) -> String {
    format!(
        r#"
name = "{name}"
[defaults]
memory = "256M"

[[node]]
name = "a"
run = ["{KMOD_LOOP}", "stasis-probe --node a"{extra_a}]
[[node]]
name = "b"
run = ["{KMOD_LOOP}", "stasis-probe --node b", "{RTC_LOOP}"]

[[lan]]
name = "lan0"
members = ["a", "b"]
bandwidth = "100Mb"
delay = "5ms"
"#
    )
}

/// The per-second counter lines (`/proc/stasis_fw` as printed by the loop).
fn windows(reports: &[Value]) -> Vec<Value> {
    reports.iter().filter(|r| r["period_ns"].is_u64() && r["max_step_ns"].is_object()).cloned().collect()
}

fn wait_windows(exp: &Experiment, node: &str, inc: u32, n: usize, what: &str) -> Vec<Value> {
    windows(&exp.wait_for(node, inc, Duration::from_secs(120), what, |r| windows(r).len() >= n))
}

/// Largest step of any clock in any of `w`.
fn max_step(w: &[Value]) -> u64 {
    w.iter()
        .flat_map(|k| ["mono", "real", "boot", "tsc"].map(|c| k["max_step_ns"][c].as_u64().unwrap_or(u64::MAX)))
        .max()
        .unwrap_or(0)
}

fn steps(w: &[Value]) -> Vec<u64> {
    w.iter().map(|k| max_step(std::slice::from_ref(k))).collect()
}

#[test]
fn kmod_sees_no_step_across_checkpoint_and_restore() {
    let exp = Experiment::new("fw", &spec("fw", ""));
    let up = exp.json(&["up", exp.spec.to_str().unwrap()]);
    assert_eq!(up["vms"].as_array().map(Vec::len), Some(2));

    // The module is loaded in every guest, sampling, and (under TCG) says
    // why its KVM path is inactive. Steady state: the seconds before.
    let mut steady = Vec::new();
    let mut n0 = Vec::new();
    for n in ["a", "b"] {
        let w = wait_windows(&exp, n, 1, STEADY_WINDOWS + 1, "steady-state kmod windows");
        let k = &w[1];
        assert_eq!(k["version"], 1, "{k}");
        assert_eq!(k["period_ns"], 1_000_000, "{k}");
        assert!(k["samples"].as_u64().unwrap() > 100, "the hrtimer samples: {k}");
        assert!(k["kvm"]["reason"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
        // The first window may hold the boot's tail; the rest are steady.
        let s = max_step(&w[1..]);
        eprintln!(
            "{n} steady state: largest step per second (ms) {:?}",
            steps(&w[1..]).iter().map(|s| s / 1_000_000).collect::<Vec<_>>()
        );
        assert!(s < EXCESS_BOUND_NS, "{n}: steady noise {s} ns already hides a leak; the test cannot discriminate");
        for k in &w[1..] {
            assert!(kmod_violations(k, u64::MAX, DIS_BOUND_NS).is_empty(), "{n} steady: {k}");
        }
        steady.push(s);
        n0.push(w.len());
    }

    let c = exp.json(&["checkpoint", "--name", "one", "--pause-ms", "3000"]);
    assert!(c["frozen_duration_ns"].as_u64().unwrap() >= PAUSE_NS, "{c}");
    // The windows from just before the command to 2 s after it returned:
    // the one that holds the resume, wherever it fell.
    let mut worst = Vec::new();
    for (i, n) in ["a", "b"].iter().enumerate() {
        let n1 = windows(&exp.reports(n, 1)).len();
        let w = wait_windows(&exp, n, 1, n1 + 2, "kmod windows after the checkpoint");
        let around = &w[n0[i]..n1 + 2];
        let s = max_step(around);
        eprintln!(
            "{n} across the checkpoint: largest step per second (ms) {:?}",
            steps(around).iter().map(|s| s / 1_000_000).collect::<Vec<_>>()
        );
        worst.push((
            n.to_string(),
            "checkpoint",
            s,
            steady[i],
            around.iter().flat_map(|k| kmod_violations(k, u64::MAX, DIS_BOUND_NS)).collect::<Vec<_>>(),
        ));
    }

    // Kill, restore: the module's state comes back with guest memory and
    // keeps counting in the restored timeline.
    exp.json(&["down"]);
    let restored = exp.json(&["restore", "one"]);
    assert_eq!(restored["runtime"]["incarnation"], 2);
    for (i, n) in ["a", "b"].iter().enumerate() {
        let w = wait_windows(&exp, n, 2, 3, "kmod windows after restore");
        let s = max_step(&w);
        eprintln!(
            "{n} after the restore: largest step per second (ms) {:?}",
            steps(&w).iter().map(|s| s / 1_000_000).collect::<Vec<_>>()
        );
        assert!(w.last().unwrap()["samples"].as_u64().unwrap() > 100, "still sampling after restore: {w:?}");
        worst.push((
            n.to_string(),
            "restore",
            s,
            steady[i],
            w.iter().flat_map(|k| kmod_violations(k, u64::MAX, DIS_BOUND_NS)).collect(),
        ));
    }
    // The guest's RTC did not see the pause or the time until the restore:
    // RTC − REALTIME stays where it was (±1 s: two whole-second reads).
    let mut rtc = rtc_offsets(&exp.reports("b", 1));
    let before = rtc[0];
    rtc.extend(rtc_offsets(
        &exp.wait_for("b", 2, Duration::from_secs(30), "rtc lines after restore", |r| rtc_offsets(r).len() >= 2),
    ));
    eprintln!("b: RTC − REALTIME (s) over both timelines: {rtc:?}");
    assert!(rtc.iter().all(|o| (o - before).abs() <= 1), "the RTC moved against REALTIME: {rtc:?}");
    for (n, when, s, st, v) in &worst {
        assert!(v.is_empty(), "node {n}, {when}: clocks disagree: {v:?}");
        assert!(
            s.saturating_sub(*st) < EXCESS_BOUND_NS,
            "node {n}, {when}: largest step {s} ns exceeds the steady state's {st} ns by more than {EXCESS_BOUND_NS}: the pause leaked"
        );
    }
}

#[test]
fn kmod_catches_a_deliberate_realtime_step() {
    // Node a steps its realtime clock by +5 s, 8 s after boot (after the
    // counters' first reset): the leak a broken firewall would let through.
    let exp = Experiment::new("fwleak", &spec("fwleak", r#", "sleep 8; date -s @$(( $(date +%s) + 5 )) >/dev/null""#));
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    let a = windows(&exp.wait_for("a", 1, Duration::from_secs(120), "the step in a's counters", |r| {
        windows(r).iter().any(|k| k["dis_over"]["real_mono"].as_u64().unwrap_or(0) > 0)
    }));
    let ka = a.iter().find(|k| k["dis_over"]["real_mono"].as_u64().unwrap_or(0) > 0).unwrap().clone();
    let b = wait_windows(&exp, "b", 1, a.len(), "b's counters");
    eprintln!("a (stepped): {ka}");

    let v = kmod_violations(&ka, EXCESS_BOUND_NS, DIS_BOUND_NS);
    assert!(v.iter().any(|s| s.starts_with("max_dis_ns.real_mono")), "the realtime step is caught: {v:?}");
    assert!(v.iter().any(|s| s.starts_with("max_step_ns.real")), "{v:?}");
    let dis = ka["max_dis_ns"]["real_mono"].as_u64().unwrap();
    // +5 s to a whole second, minus however long the guest's shell took
    // between reading the clock and setting it (over a second on a busy host).
    assert!((2_500_000_000..=5_100_000_000).contains(&dis), "a +5 s step of whole seconds shows as ~4–5 s: {dis}");
    // Only realtime moved: monotonic and boottime stay within their bounds.
    assert!(ka["max_step_ns"]["mono"].as_u64().unwrap() < EXCESS_BOUND_NS, "{ka}");
    assert!(ka["max_dis_ns"]["boot_mono"].as_u64().unwrap() <= DIS_BOUND_NS, "{ka}");
    // The other guest saw nothing, in any second.
    for k in &b[1..] {
        assert!(kmod_violations(k, EXCESS_BOUND_NS, DIS_BOUND_NS).is_empty(), "{k}");
    }
}
