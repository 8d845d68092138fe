//! Live checkpoints and swap-out/in, end to end (a stream and a vhost-user NIC): a stop-and-copy
//! and a live checkpoint of the same VMs under sequence-numbered traffic, a
//! swap-out that releases every process, a swap-in that carries on, and a
//! restore of the live checkpoint — every frame exactly once in each
//! restored timeline, and the live checkpoint's guest downtime far below the
//! stop-and-copy one's.

use stasis_system_tests::{assert_every_frame_once, last_recv, max_steps, received, Experiment};
use std::time::Duration;

/// Frames per flow: 100/s for 20 s.
const PER_FLOW: u64 = 2000;

fn spec() -> String {
    format!(
        r#"
name = "live"
[defaults]
memory = "256M"

# a on a stream NIC, b on vhost-user: the live checkpoint must hold b's
# port in the delay node while b's RAM is written in the background.
[[node]]
name = "a"
nic = "stream"
run = ["stasis-probe --node a", "sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --rate 100 --size 200 --count {PER_FLOW}"]
[[node]]
name = "b"
nic = "vhost-user"
run = ["stasis-probe --node b", "stasis-traffic recv --node b --port 5000"]

[[lan]]
name = "lan0"
members = ["a", "b"]
bandwidth = "100Mb"
delay = "20ms"
"#
    )
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    exists && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

/// Receiver b got every frame exactly once in `incarnation`.
fn receiver_exact(exp: &Experiment, incarnation: u32) {
    let r = exp.wait_for("b", incarnation, Duration::from_secs(150), "all frames", |r| received(r) == PER_FLOW);
    let f = &last_recv(&r)[0];
    assert_eq!((f["missing"].as_u64(), f["dups"].as_u64()), (Some(0), Some(0)), "{f}");
}

#[test]
fn live_checkpoint_and_swap_out_in_lose_and_duplicate_nothing() {
    let exp = Experiment::new("live", &spec());
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    exp.wait_for("b", 1, Duration::from_secs(90), "traffic", |r| received(r) > 150);

    // The same VMs, stop-and-copy then live.
    let stop = exp.json(&["checkpoint", "--name", "stopcopy"]);
    let live = exp.json(&["checkpoint", "--live", "--name", "live1"]);
    assert_eq!(live["live"], true, "{live}");
    assert_eq!(live["vhost_ports_held"], 1, "b's vhost-user port was held during the background save: {live}");
    let downtimes = live["downtime"].as_array().expect("per-VM downtime");
    assert_eq!(downtimes.len(), 2, "{live}");
    let live_max = live["max_downtime_ns"].as_u64().unwrap();
    let stop_d = stop["frozen_duration_ns"].as_u64().unwrap();
    eprintln!(
        "guest downtime: stop-and-copy {:.1} ms, live {:.1} ms (per VM {downtimes:?})",
        stop_d as f64 / 1e6,
        live_max as f64 / 1e6
    );
    assert!(live_max > 0, "a live checkpoint still stops each guest for its device state: {live}");
    assert!(live_max * 2 < stop_d, "live downtime {live_max} ns is not far below stop-and-copy {stop_d} ns");
    // `stasis show` reports it.
    let show = exp.run(&["show", "live1"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success() && text.contains("live") && text.contains("downtime       a:"), "{text}");

    eprintln!(
        "largest probe steps over both checkpoints: a {:?}, b {:?}",
        max_steps(&exp.reports("a", 1)),
        max_steps(&exp.reports("b", 1))
    );

    // Swap out (the original timeline went on after the live checkpoint:
    // the swap-in below checks its frames too): a checkpoint, then nothing
    // of the experiment runs.
    let pids: Vec<u32> = exp.pids().iter().map(|p| p.1).collect();
    let out = exp.json(&["swap-out", "--name", "away"]);
    // On a slow host the sender may have finished before the swap-out; then
    // it prints nothing more after the swap-in, and only the receiver counts.
    let sender_done = exp.reports("a", 1).iter().any(|r| r["role"] == "send" && r["done"] == true);
    let swapped_ckpt = out["swapped_out"]["checkpoint"].as_str().unwrap().to_string();
    assert!(out["swapped_out"]["stopped"].as_u64().unwrap() >= 3, "{out}");
    for p in &pids {
        assert!(!pid_alive(*p), "pid {p} still runs after swap-out");
    }
    let status = exp.json(&["status"]);
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["swapped_out"]["checkpoint"].as_str(), Some(swapped_ckpt.as_str()), "{status}");
    let human = exp.run(&["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("swapped out (checkpoint"), "{human:?}");
    assert!(!exp.root().join("run/p").exists(), "the delay node's sockets are gone");
    assert!(!exp.root().join("runtime.json").exists());

    // Swap in: the experiment carries on from the swap-out point.
    let back = exp.json(&["swap-in"]);
    assert_eq!(back["summary"]["checkpoint"].as_str(), Some(swapped_ckpt.as_str()));
    assert_eq!(back["runtime"]["incarnation"], 2);
    assert_eq!(exp.json(&["status"])["running"], true);
    if sender_done {
        receiver_exact(&exp, 2);
    } else {
        assert_every_frame_once(&exp, "a", &["b"], 2, PER_FLOW);
    }

    // And the live checkpoint restores a consistent timeline too.
    let r = exp.json(&["restore", "live1"]);
    assert_eq!(r["runtime"]["incarnation"], 3);
    assert_every_frame_once(&exp, "a", &["b"], 3, PER_FLOW);
    for n in ["a", "b"] {
        for (clock, step) in max_steps(&exp.reports(n, 3)) {
            assert!(step < 1_500_000_000, "node {n}: clock {clock} stepped {step} ns in the restored timeline");
        }
    }
}
