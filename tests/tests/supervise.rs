//! `stasis supervise` on the busybox guest: periodic checkpoints every 10 s
//! with `keep = 2`; retention deletes only the supervisor's own checkpoints
//! (a person's named and unnamed ones stay); `stasis status` shows the
//! supervisor; SIGTERM stops it with exit 0 and nothing frozen; a restart
//! goes on with the schedule without a burst of checkpoints; with
//! `--recover`, a killed QEMU is brought back from the latest checkpoint.
//!
//! Every wait is on a condition with a generous deadline; the only time
//! compared is the supervisor's own schedule (a restarted supervisor never
//! checkpoints before the slot after the last round).

use serde_json::Value;
use stasis_system_tests::{stasis_bin, Experiment};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = r#"
name = "sup"
[[node]]
name = "a"
memory = "256M"
run = ["stasis-probe --node a --interval-ms 100"]

[checkpoint]
every = "1h"
keep = 5
"#;

/// The supervisor child, killed if the test fails before it stops it.
struct Supervisor(Option<Child>);

impl Supervisor {
    fn start(exp: &Experiment, log: &std::path::Path, extra: &[&str]) -> Supervisor {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(stasis_bin())
            .arg("--state-dir")
            .arg(exp.state())
            .args(["-e", &exp.name, "supervise", "--every", "10s", "--keep", "2"])
            .args(extra)
            .env("STASIS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Supervisor(Some(child))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// SIGTERM, then its exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        child.wait().unwrap()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn probes(exp: &Experiment) -> usize {
    exp.reports("a", 1).iter().filter(|r| r["tool"] == "probe").count()
}

/// The VM runs: its probe keeps reporting.
fn probe_advances(exp: &Experiment) {
    let before = probes(exp);
    exp.wait_for("a", 1, Duration::from_secs(60), "the probe advancing", |r| {
        r.iter().filter(|x| x["tool"] == "probe").count() > before + 5
    });
}

fn supervisor(exp: &Experiment) -> Value {
    exp.json(&["status"])["supervisor"].clone()
}

/// Waits until the supervisor's state says it took at least `n` checkpoints
/// (read from its state file, not through `stasis status`, which would
/// poll the experiment while the supervisor checkpoints it), then returns
/// `status`' view of the supervisor.
fn wait_taken(exp: &Experiment, n: u64, log: &std::path::Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read(exp.root().join("supervise.json")).unwrap_or_default();
        let s: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        if s["checkpoints_taken"].as_u64().unwrap_or(0) >= n {
            return supervisor(exp);
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor took fewer than {n} checkpoints: {s}\nits log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// (name, unnamed?) of every listed checkpoint.
fn names(exp: &Experiment) -> Vec<String> {
    exp.json(&["list"]).as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap_or("-").to_owned()).collect()
}

#[test]
fn supervise_checkpoints_periodically_keeps_two_and_restarts_without_a_burst() {
    let t0 = Instant::now();
    let exp = Experiment::new("sup", SPEC);
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    exp.wait_for("a", 1, Duration::from_secs(120), "probe", |r| r.iter().any(|x| x["tool"] == "probe"));
    let v = exp.run(&["validate", exp.spec.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&v.stdout)
        .contains("periodic checkpoints (stasis supervise): every 1h, keep the newest 5"));
    // A person's checkpoints: named and unnamed; retention must keep both.
    exp.json(&["checkpoint", "--name", "mine"]);
    exp.json(&["checkpoint"]);
    let refused = exp.run(&["checkpoint", "--name", "auto-1"]);
    assert!(!refused.status.success(), "auto- names are the supervisor's");

    let log = exp.dir.path().join("supervise-1.log");
    let sup = Supervisor::start(&exp, &log, &[]);
    let s = wait_taken(&exp, 3, &log);
    assert_eq!(s["pid"].as_u64(), Some(u64::from(sup.pid())), "{s}");
    // A second supervisor is refused while this one runs.
    let second = exp.run(&["supervise", "--every", "10s"]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("a supervisor already runs"));

    // Retention ran in the round that took the third: two supervised left.
    let listed = names(&exp);
    let autos: Vec<&String> = listed.iter().filter(|n| n.starts_with("auto-")).collect();
    assert_eq!(autos.len(), 2, "keep = 2: {listed:?}");
    assert!(listed.contains(&"mine".to_owned()) && listed.contains(&"-".to_owned()), "a person's stay: {listed:?}");
    assert!(s["checkpoints_deleted"].as_u64().unwrap() >= 1, "{s}");
    let last = &s["last_checkpoint"];
    assert_eq!(Some(last["name"].as_str().unwrap()), autos.last().map(|n| n.as_str()), "{s}");
    assert!(s["next_due_unix_ms"].as_u64().unwrap() > last["unix_ms"].as_u64().unwrap(), "{s}");
    let text = String::from_utf8_lossy(&exp.run(&["status"]).stdout).into_owned();
    assert!(text.contains(&format!("supervisor: pid {}", sup.pid())) && text.contains("next due in"), "{text}");

    // SIGTERM: exit 0 (a round in progress is finished first), nothing frozen.
    let status = sup.terminate();
    assert!(status.success(), "SIGTERM stops the supervisor cleanly: {status:?}");
    let st = exp.json(&["status"]);
    assert_eq!(st["supervisor"]["pid"], Value::Null, "{st}");
    assert!(st["frozen"]["vms"].as_array().unwrap().is_empty() && st["frozen"]["delay_node"] == false, "{st}");
    probe_advances(&exp);
    let stopped = supervisor(&exp);
    let before = stopped["checkpoints_taken"].as_u64().unwrap();
    let last_start = stopped["last_round"]["started_unix_ms"].as_u64().unwrap();

    // Restarted: it goes on with the schedule (the first round no earlier
    // than one period after the last one), one checkpoint per slot.
    let log2 = exp.dir.path().join("supervise-2.log");
    let sup = Supervisor::start(&exp, &log2, &["--recover"]);
    let s = wait_taken(&exp, before + 1, &log2);
    let first = s["last_round"]["started_unix_ms"].as_u64().unwrap();
    assert!(
        first >= last_start + 10_000,
        "no checkpoint before the slot after a restart: {first} < {last_start} + 10 s"
    );
    assert_eq!(s["checkpoints_taken"].as_u64(), Some(before + 1), "one checkpoint, not a burst: {s}");
    assert!(s["next_due_unix_ms"].as_u64().unwrap() >= first + 10_000, "{s}");
    let listed = names(&exp);
    assert_eq!(listed.iter().filter(|n| n.starts_with("auto-")).count(), 2, "{listed:?}");

    // --recover: QEMU killed → the latest checkpoint is restored, the VM
    // runs again (incarnation 2), the schedule goes on.
    let latest = exp.json(&["list"]).as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_owned();
    let (_, qemu, _) = exp.pids().into_iter().find(|(n, _, _)| n == "a").unwrap();
    // SAFETY: kill(2) on the test's own VM.
    assert_eq!(unsafe { libc::kill(qemu as i32, libc::SIGKILL) }, 0);
    exp.wait_for("a", 2, Duration::from_secs(300), "the VM restored by the supervisor", |r| {
        r.iter().filter(|x| x["tool"] == "probe").count() > 5
    });
    let text = std::fs::read(exp.root().join("supervise.json")).unwrap();
    let s: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(s["recoveries"].as_u64(), Some(1), "{s}");
    assert_eq!(s["last_recovery"]["dead"], serde_json::json!(["a"]), "{s}");
    assert!(s["last_recovery"]["checkpoint"].as_str().unwrap().contains(&latest), "the latest was restored: {s}");
    let taken = s["checkpoints_taken"].as_u64().unwrap();
    let s = wait_taken(&exp, taken + 1, &log2);
    assert_eq!(s["recoveries"].as_u64(), Some(1), "{s}");
    assert!(sup.terminate().success());
    let st = exp.json(&["status"]);
    assert_eq!(st["incarnation"].as_u64(), Some(2), "{st}");
    assert!(st["processes"].as_array().unwrap().iter().all(|p| p["alive"] == true), "{st}");
    let fsck = exp.run(&["fsck"]);
    assert!(fsck.status.success(), "the store is consistent");
    eprintln!("supervise test took {:?}", t0.elapsed());
}
