//! Multi-host checkpoints: three "hosts" (network namespaces, each with its
//! own `stasis-agent`), the coordinator (`stasis`) in a fourth, VMs and the
//! delay node split among them. A checkpoint under sequence-numbered
//! traffic, everything killed, the checkpoint restored: every frame exactly
//! once. Then the failures: a failed save, a host that goes silent, an agent
//! killed between PREPARE and SAVED — each aborts, every VM keeps running,
//! nothing partial is listed — and a coordinator with the wrong key is
//! refused. Needs root (namespaces).

use stasis_system_tests::hosts::Lab;
use stasis_system_tests::{assert_every_frame_once, received, Experiment};
use std::time::{Duration, Instant};

/// Frames per flow: 100/s for 10 s.
const PER_FLOW: u64 = 1000;

fn spread_spec(lab: &Lab) -> String {
    format!(
        r#"
name = "mh"
nic = "stream"
[defaults]
memory = "256M"

{hosts}
[delay]
host = "h2"

# a and c reach the delay node on h2 over TCP; b sits next to it (vhost-user).
[[node]]
name = "a"
host = "h1"
run = ["stasis-probe --node a", "sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --to 10.0.1.3:5000 --rate 100 --size 200 --count {PER_FLOW}"]
[[node]]
name = "b"
host = "h2"
nic = "vhost-user"
run = ["stasis-probe --node b", "stasis-traffic recv --node b --port 5000"]
[[node]]
name = "c"
host = "h3"
run = ["stasis-probe --node c", "stasis-traffic recv --node c --port 5000"]

[[lan]]
name = "lan0"
members = ["a", "b", "c"]
bandwidth = "100Mb"
delay = "20ms"
"#,
        hosts = lab.hosts_toml()
    )
}

fn setup(name: &str, spec: impl Fn(&Lab) -> String, nodes: &[(&str, &str)]) -> (Experiment, Lab) {
    let mut exp = Experiment::new(name, "");
    let mut lab = Lab::new(exp.dir.path(), 3);
    std::fs::write(&exp.spec, spec(&lab)).unwrap();
    exp.wrapper = lab.coordinator_wrapper();
    exp.node_states = nodes.iter().map(|(n, h)| (n.to_string(), lab.agent(h).state.clone())).collect();
    lab.start_agents();
    (exp, lab)
}

#[test]
fn checkpoint_across_three_hosts_then_restore_loses_and_duplicates_nothing() {
    let (exp, lab) = setup("mh", spread_spec, &[("a", "h1"), ("b", "h2"), ("c", "h3")]);
    let up = exp.json(&["up", exp.spec.to_str().unwrap()]);
    assert_eq!(up.as_array().map(Vec::len), Some(3), "{up}");
    for n in ["b", "c"] {
        exp.wait_for(n, 1, Duration::from_secs(60), "traffic", |r| received(r) > 200);
    }
    let c1 = exp.json(&["checkpoint", "--name", "first", "--pause-ms", "1000"]);
    let parts = c1["checkpoint"]["parts"].as_array().unwrap();
    let held: Vec<(String, Vec<String>)> = parts
        .iter()
        .map(|p| {
            (
                p["host"].as_str().unwrap().to_string(),
                p["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            ("h1".into(), vec!["a".into()]),
            ("h2".into(), vec!["b".into(), "delay-node".into()]),
            ("h3".into(), vec!["c".into()])
        ],
        "each host holds its own part: {c1}"
    );
    assert!(c1["frozen_duration_ns"].as_u64().unwrap() >= 1_000_000_000, "{c1}");
    eprintln!(
        "multi-host checkpoint: stop skew {:.2} ms across hosts, D {:.0} ms (request to decision {:.0} ms), max D error {:.2} ms, {:.0} MiB",
        c1["checkpoint"]["stop_skew_ns"].as_f64().unwrap() / 1e6,
        c1["frozen_duration_ns"].as_f64().unwrap() / 1e6,
        c1["round_ns"].as_f64().unwrap() / 1e6,
        c1["max_frozen_error_ns"].as_f64().unwrap() / 1e6,
        c1["checkpoint"]["bytes"].as_f64().unwrap() / 1048576.0
    );
    // SAVED meant "sealed" (durable, not chunked): every host committed its
    // part into its store only after all of its components resumed, so the
    // chunking is not frozen time, and the catalogue says it is stored.
    let stores = c1["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 3, "{c1}");
    for st in stores {
        assert_eq!(st["state"]["state"], "stored", "{st}");
        let (started, resumed) = (st["started_ns"].as_u64().unwrap(), st["resumed_ns"].as_u64().unwrap());
        assert!(started >= resumed, "{}: store commit began before its components resumed: {st}", st["host"]);
        eprintln!(
            "  {}: store commit {:.0} ms, begun {:.1} ms after its last resume",
            st["host"].as_str().unwrap(),
            st["commit_ns"].as_f64().unwrap() / 1e6,
            (started - resumed) as f64 / 1e6
        );
    }
    for p in c1["checkpoint"]["parts"].as_array().unwrap() {
        assert_eq!(p["state"]["state"], "stored", "the catalogue records it: {p}");
    }
    // Each agent recorded its half as machine-readable events (as on one host).
    for (h, vm) in [("h1", "a"), ("h2", "b"), ("h3", "c")] {
        let events = std::fs::read_to_string(lab.agent(h).state.join("mh").join("events.jsonl")).unwrap_or_default();
        for kind in ["\"planned\"", "\"stopped\"", "\"saved\"", "\"resumed\""] {
            assert!(
                events.contains(kind) && events.contains(&format!("\"{vm}\"")),
                "{h}: no {kind} event of {vm}: {events}"
            );
        }
    }
    // Traffic goes on in the original timeline (or has finished).
    let before = received(&exp.reports("c", 1));
    exp.wait_for("c", 1, Duration::from_secs(30), "traffic after the checkpoint", |r| {
        received(r) > before + 100 || received(r) == PER_FLOW
    });

    // Kill everything on every host, then restore.
    let down = exp.json(&["down"]);
    assert!(down["stopped"].as_u64().unwrap() >= 4, "{down}");
    let list = exp.json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let restored = exp.json(&["restore", "first"]);
    assert_eq!(restored["hosts"], 3, "{restored}");
    assert_every_frame_once(&exp, "a", &["b", "c"], 2, PER_FLOW);
    for h in ["h1", "h2", "h3"] {
        for l in lab.log(h).lines().filter(|l| l.contains("part saved") || l.contains("part stored")) {
            eprintln!("{h}: {l}");
        }
    }
    drop(lab);
}

/// One VM (with the delay node) on h1; h2 and h3 run nothing but take part
/// in every round.
fn small_spec(lab: &Lab) -> String {
    format!(
        r#"
name = "mhf"
nic = "stream"
{hosts}
[delay]
host = "h1"
[[node]]
name = "a"
host = "h1"
memory = "128M"
run = ["stasis-probe --node a --interval-ms 100"]
"#,
        hosts = lab.hosts_toml()
    )
}

fn probes(exp: &Experiment) -> usize {
    exp.reports("a", 1).iter().filter(|r| r["tool"] == "probe").count()
}

/// After an aborted round: the CLI failed naming `why`, nothing is listed,
/// no host kept a part, and the VM still runs (its probe keeps reporting).
fn assert_aborted_cleanly(exp: &Experiment, out: &std::process::Output, why: &str, listed: usize) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the checkpoint must fail");
    assert!(err.contains("aborted") && err.contains(why), "error names the cause {why:?}: {err}");
    let list = exp.json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(listed), "no partial checkpoint listed: {list}");
    let before = probes(exp);
    exp.wait_for("a", 1, Duration::from_secs(30), "the VM running on after the abort", |r| {
        r.iter().filter(|x| x["tool"] == "probe").count() > before + 5
    });
}

#[test]
fn failed_save_silent_host_and_killed_agent_abort_and_wrong_key_is_refused() {
    let (mut exp, mut lab) = setup("mhf", small_spec, &[("a", "h1")]);
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    exp.wait_for("a", 1, Duration::from_secs(60), "probe", |r| r.iter().any(|x| x["tool"] == "probe"));

    // A coordinator with the wrong key is refused; the agents serve on.
    let good = exp.wrapper.clone();
    let wrong_key = exp.dir.path().join("wrong.key");
    // 0600 and 32 bytes, or the CLI refuses the file before it tries the key.
    stasis_core::private::write(&wrong_key, b"not-the-agents-key-at-all, 32 b.").unwrap();
    exp.wrapper = lab.coordinator_wrapper();
    *exp.wrapper.last_mut().unwrap() = format!("STASIS_KEY_FILE={}", wrong_key.display());
    let out = exp.run(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("cannot reach the agent of host \"h1\""), "{err}");
    assert!(err.contains("AuthFailed") || err.contains("authentication"), "the refusal says why: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log("h1").contains("refused connection") {
        assert!(Instant::now() < deadline, "the agent logged the refusal: {}", lab.log("h1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    exp.wrapper = good;
    let st = exp.json(&["status"]);
    assert_eq!(st.as_array().map(Vec::len), Some(3), "agents still serve the right key: {st}");

    // 1. A failed save on h2 aborts the round.
    std::fs::write(&lab.agent("h2").fault_file, "fail\n").unwrap();
    let out = exp.run(&["checkpoint"]);
    assert_aborted_cleanly(&exp, &out, "host \"h2\" could not save", 0);
    std::fs::remove_file(&lab.agent("h2").fault_file).unwrap();
    let st = exp.json(&["status"]);
    for s in st.as_array().unwrap() {
        assert_eq!(s["parts"].as_array().map(Vec::len), Some(0), "no host kept a part: {s}");
    }

    // 2. A host that goes silent (its link down) between PREPARE and SAVED:
    // the coordinator gives up at the save deadline.
    std::fs::write(&lab.agent("h3").fault_file, "delay 3000\n").unwrap();
    let child = checkpoint_in_background(&exp, &[("STASIS_SAVE_BUDGET_MS", "2000")]);
    wait_frozen(&lab, "h3");
    lab.set_link("h3", false);
    let out = child.wait_with_output().unwrap();
    lab.set_link("h3", true);
    assert_aborted_cleanly(&exp, &out, "no SAVED by the deadline from h3", 0);
    // h3 resumes on its own (or on the late Abort) and serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let out = exp.run(&["status", "--json"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "h3 did not come back");
        std::thread::sleep(Duration::from_millis(500));
    };
    for s in &st.as_array().unwrap()[..2] {
        assert_eq!(s["parts"].as_array().map(Vec::len), Some(0), "no reachable host kept a part: {s}");
    }
    // The next checkpoint succeeds, and first removes what the silent host
    // may have kept of the aborted one: every host holds exactly one part.
    std::fs::remove_file(&lab.agent("h3").fault_file).unwrap();
    let ok = exp.json(&["checkpoint", "--name", "after-faults"]);
    assert_eq!(ok["checkpoint"]["parts"].as_array().map(Vec::len), Some(3), "{ok}");
    let st = exp.json(&["status"]);
    for s in st.as_array().unwrap() {
        assert_eq!(s["parts"].as_array().map(Vec::len), Some(1), "only the committed part: {s}");
    }

    // An agent restarted while its VM and delay node run takes them back:
    // the next checkpoint includes them.
    let vm_pid = st.as_array().unwrap()[0]["vms"][0]["pid"].as_u64().unwrap();
    // (h2 runs nothing but takes part in every round: it comes back too.)
    for h in ["h1", "h2"] {
        lab.kill_agent(h);
        lab.start_agent(h);
    }
    let st = exp.json(&["status"]);
    assert_eq!(st[0]["vms"][0]["pid"].as_u64(), Some(vm_pid), "the restarted agent knows its VM: {st}");
    assert_eq!(st[0]["vms"][0]["alive"], true, "{st}");
    let again = exp.json(&["checkpoint", "--name", "after-restart"]);
    let h1 = &again["checkpoint"]["parts"][0];
    assert_eq!(h1["components"].as_array().map(Vec::len), Some(2), "VM and delay node saved by the new agent: {again}");

    // 3. An agent killed between PREPARE and SAVED.
    std::fs::write(&lab.agent("h3").fault_file, "delay 5000\n").unwrap();
    let child = checkpoint_in_background(&exp, &[]);
    wait_frozen(&lab, "h3");
    lab.kill_agent("h3");
    let out = child.wait_with_output().unwrap();
    assert_aborted_cleanly(&exp, &out, "lost the agent of host \"h3\"", 2);
    std::fs::remove_file(&lab.agent("h3").fault_file).unwrap();
    drop(lab);
}

fn checkpoint_in_background(exp: &Experiment, env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(&exp.wrapper[0]);
    cmd.args(&exp.wrapper[1..]);
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(stasis_system_tests::target_dir().join("debug").join("stasis"));
    cmd.arg("--state-dir").arg(exp.state()).args(["-e", &exp.name, "checkpoint"]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// Wait for the next "frozen" of `host`'s agent (the round's PREPARE arrived and its VMs stopped).
fn wait_frozen(lab: &Lab, host: &str) {
    let before = lab.log(host).matches(" frozen").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.log(host).matches(" frozen").count() == before {
        assert!(Instant::now() < deadline, "{host} never froze: {}", lab.log(host));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agents' clocks are PTP-synchronised (a grandmaster in the
/// coordinator's namespace, injected errors +3 ms/+50 ppm, −2 ms/−30 ppm, 0):
/// every agent's freeze instant comes from its synced clock. The agents
/// share the machine's real clock, so the spread of the real instants they
/// planned to freeze at is the clock error across agents (unsynchronised it
/// would be 5 ms), and the spread of their wake-ups adds actuation.
#[test]
fn ptp_synchronised_agents_freeze_at_one_instant() {
    let (exp, lab) = {
        let mut exp = Experiment::new("mhp", "");
        let mut lab = Lab::new(exp.dir.path(), 3);
        std::fs::write(&exp.spec, small_spec(&lab).replace("name = \"mhf\"", "name = \"mhp\"")).unwrap();
        exp.wrapper = lab.coordinator_wrapper();
        exp.node_states = vec![("a".into(), lab.agent("h1").state.clone())];
        let gm = stasis_system_tests::target_dir().join("debug").join("clock-sync");
        assert!(gm.exists(), "{} is missing: cargo build --bins", gm.display());
        let br = lab.bridge_ns.clone();
        let log = exp.dir.path().join("gm.log");
        lab.spawn_in(&br, &gm, &["--iface", "br0", "--gm"], &log);
        for (h, off, drift) in [("h1", "3000000", "50"), ("h2", "-2000000", "-30"), ("h3", "0", "0")] {
            let a = lab.agents.iter_mut().find(|a| a.host == h).unwrap();
            a.extra_args = ["--ptp", "eth0", "--clock-offset-ns", off, "--clock-drift-ppm", drift]
                .iter()
                .map(|s| s.to_string())
                .collect();
        }
        lab.start_agents();
        (exp, lab)
    };
    // The guest boots while PTP converges.
    let t0 = Instant::now();
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    // Converged: every agent's true error under 10 µs.
    loop {
        let st = exp.json(&["status"]);
        let errs: Vec<f64> = st
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["clock"]["true_error_ns"].as_f64().unwrap_or(f64::MAX).abs())
            .collect();
        if errs.iter().all(|e| *e < 10_000.0) {
            eprintln!("PTP converged after {:.1} s: true errors {errs:?} ns", t0.elapsed().as_secs_f64());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "PTP did not converge: {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut planned = Vec::new();
    let mut fired = Vec::new();
    for i in 0..5 {
        let c = exp.json(&["checkpoint", "--name", &format!("p{i}")]);
        let ckpt = c["checkpoint"]["ckpt"].as_u64().unwrap().to_string();
        let mut p = Vec::new();
        let mut f = Vec::new();
        for h in ["h1", "h2", "h3"] {
            let log = lab.log(h);
            let line = log
                .lines()
                .find(|l| l.contains("freeze fired") && l.contains(&ckpt))
                .unwrap_or_else(|| panic!("{h} fired checkpoint {ckpt}"));
            let field = |k: &str| {
                line.split(&format!("{k}="))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap()
            };
            p.push(field("planned_realtime_ns"));
            f.push(field("fired_realtime_ns"));
        }
        let spread = |v: &[u64]| v.iter().max().unwrap() - v.iter().min().unwrap();
        planned.push(spread(&p));
        fired.push(spread(&f));
    }
    planned.sort_unstable();
    fired.sort_unstable();
    eprintln!(
        "freeze skew across 3 PTP agents over {} checkpoints: clock error p50 {:.1} µs max {:.1} µs; with actuation p50 {:.1} µs max {:.1} µs",
        planned.len(),
        planned[planned.len() / 2] as f64 / 1e3,
        planned[planned.len() - 1] as f64 / 1e3,
        fired[fired.len() / 2] as f64 / 1e3,
        fired[fired.len() - 1] as f64 / 1e3
    );
    // Unsynchronised, the injected offsets alone would spread the plans by
    // 5 ms; synchronised they agree far better (a functional check that the
    // synced clocks drive the freeze, with a wide margin for drift between
    // status samples).
    assert!(planned[planned.len() - 1] < 1_000_000, "planned instants spread {planned:?} ns");
    drop(lab);
}
