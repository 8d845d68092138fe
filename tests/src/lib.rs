//! Harness for whole-system tests: runs the real `stasis` binary against a
//! private state directory, reads the guests' serial consoles, and tears
//! everything down when dropped, even when a test fails.

pub mod garage;
pub mod hosts;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The workspace's target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

/// The `stasis` binary built by `make build` (`cargo build --bins`).
pub fn stasis_bin() -> PathBuf {
    let bin = target_dir().join("debug").join("stasis");
    assert!(
        bin.exists(),
        "{} is missing: run `make test` (it builds the binaries and the guest image first)",
        bin.display()
    );
    let image = target_dir().join("guest").join("initrd.img");
    assert!(image.exists(), "{} is missing: run `make guest` first", image.display());
    bin
}

/// One experiment under test, in its own state directory.
pub struct Experiment {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
    pub name: String,
    /// Run `stasis` through this command (e.g. `ip netns exec NS env K=V`);
    /// empty: directly. Multi-host tests run the coordinator in a namespace.
    pub wrapper: Vec<String>,
    /// Per node, the state dir holding its consoles when not `state()` (the
    /// node's host agent's state dir in multi-host tests).
    pub node_states: Vec<(String, PathBuf)>,
}

impl Experiment {
    /// Write `spec` (TOML) into a fresh directory.
    pub fn new(name: &str, spec: &str) -> Experiment {
        let dir = tempfile::Builder::new().prefix("stasis-t").tempdir_in("/tmp").expect("tempdir");
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, spec).expect("write spec");
        Experiment { dir, spec: path, name: name.to_string(), wrapper: Vec::new(), node_states: Vec::new() }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Run `stasis ARGS` and return its output.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(stasis_bin());
                c
            }
            None => Command::new(stasis_bin()),
        };
        cmd.arg("--state-dir").arg(self.state());
        if !args.contains(&"-e") {
            cmd.args(["-e", &self.name]);
        }
        let out = cmd.args(args).output().expect("run stasis");
        eprintln!(
            "$ stasis {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// Run `stasis ARGS --json`, require success, and parse the result.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert!(out.status.success(), "stasis {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("stasis --json prints JSON")
    }

    pub fn root(&self) -> PathBuf {
        self.state().join(&self.name)
    }

    /// The serial console of `node` in its `incarnation`-th life.
    pub fn console(&self, node: &str, incarnation: u32) -> PathBuf {
        if let Some((_, state)) = self.node_states.iter().find(|(n, _)| n == node) {
            return state.join(&self.name).join("run").join("vm").join(node).join(format!("serial-{incarnation}.log"));
        }
        self.root().join("run").join("vm").join(node).join(format!("serial-{incarnation}.log"))
    }

    /// The JSON lines a node's tools printed in one incarnation.
    pub fn reports(&self, node: &str, incarnation: u32) -> Vec<Value> {
        let text = std::fs::read(self.console(node, incarnation)).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| {
                let l = l.trim_matches(|c: char| c.is_control() || c.is_whitespace());
                let start = l.find('{')?;
                serde_json::from_str::<Value>(&l[start..]).ok()
            })
            .collect()
    }

    /// Wait until `pred` holds for a node's reports.
    pub fn wait_for(
        &self,
        node: &str,
        incarnation: u32,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.reports(node, incarnation);
            if pred(&r) {
                return r;
            }
            if Instant::now() > deadline {
                let console = std::fs::read_to_string(self.console(node, incarnation)).unwrap_or_default();
                let tail: String = console.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("timed out after {timeout:?} waiting for {what} on {node} (incarnation {incarnation}); console tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// pids of the experiment's processes, from `stasis status --json`.
    pub fn pids(&self) -> Vec<(String, u32, bool)> {
        let v = self.json(&["status"]);
        v["processes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or("").to_string(),
                            p["pid"].as_u64().unwrap_or(0) as u32,
                            p["alive"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Experiment {
    /// A failed test keeps what explains it: consoles, delay-node and QEMU
    /// logs, events and checkpoint reports (not the bulky state files), in
    /// `/tmp/stasis-failed-<name>-<pid>`, and prints a digest of them.
    fn keep_evidence(&self) {
        let dest = PathBuf::from(format!("/tmp/stasis-failed-{}-{}", self.name, std::process::id()));
        let _ = std::fs::create_dir_all(&dest);
        let mut stack = vec![self.root()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let wanted = [".log", ".json", ".jsonl", ".toml", ".1"].iter().any(|x| name.ends_with(x));
                if wanted && p.metadata().map(|m| m.len() < 8 << 20).unwrap_or(false) {
                    let rel = p.strip_prefix(self.root()).unwrap_or(&p).to_string_lossy().replace('/', "__");
                    let _ = std::fs::copy(&p, dest.join(rel));
                }
            }
        }
        eprintln!("evidence of the failed test kept in {}", dest.display());
        let events = std::fs::read_to_string(self.root().join("run/delay/events.jsonl")).unwrap_or_default();
        let interesting: Vec<&str> = events.lines().filter(|l| !l.contains("port_connected")).collect();
        eprintln!("delay-node events (last 40):\n{}", interesting[interesting.len().saturating_sub(40)..].join("\n"));
    }
}

impl Drop for Experiment {
    fn drop(&mut self) {
        // Tear down through the CLI, then make sure: kill anything still
        // holding a file under our state dir.
        // (Through the wrapper: a multi-host coordinator must reach its agents
        // only from inside the test's namespaces.)
        let mut down = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(target_dir().join("debug").join("stasis"));
                c
            }
            None => Command::new(target_dir().join("debug").join("stasis")),
        };
        let _ = down.arg("--state-dir").arg(self.state()).args(["-e", &self.name, "down"]).output();
        if std::thread::panicking() {
            self.keep_evidence();
        }
        let needle = self.dir.path().to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
                if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                    if String::from_utf8_lossy(&cmd).contains(&needle) {
                        // SAFETY: kill(2) of a process whose command line names our private temp dir.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

/// The latest report of each receive flow on a node.
pub fn last_recv(reports: &[Value]) -> Vec<Value> {
    let mut by_flow: Vec<(String, Value)> = Vec::new();
    for r in reports.iter().filter(|r| r["tool"] == "traffic" && r["role"] == "recv") {
        let flow = r["flow"].as_str().unwrap_or("").to_string();
        if let Some(slot) = by_flow.iter_mut().find(|(f, _)| *f == flow) {
            slot.1 = r.clone();
        } else {
            by_flow.push((flow, r.clone()));
        }
    }
    by_flow.into_iter().map(|(_, v)| v).collect()
}

/// Frames received so far by a node, over all its flows.
pub fn received(reports: &[Value]) -> u64 {
    last_recv(reports).iter().map(|f| f["received"].as_u64().unwrap_or(0)).sum()
}

/// In `incarnation`, every receiver gets all `per_flow` frames of its one
/// flow exactly once, and the sender finishes: the restored timeline lost
/// and duplicated nothing.
pub fn assert_every_frame_once(exp: &Experiment, sender: &str, receivers: &[&str], incarnation: u32, per_flow: u64) {
    for n in receivers {
        let r = exp.wait_for(n, incarnation, Duration::from_secs(150), "all frames", |r| {
            last_recv(r).iter().any(|f| f["received"].as_u64() == Some(per_flow))
        });
        let flows = last_recv(&r);
        assert_eq!(flows.len(), 1, "one flow per receiver: {flows:?}");
        let f = &flows[0];
        assert_eq!(f["received"].as_u64(), Some(per_flow), "{f}");
        assert_eq!(f["missing"].as_u64(), Some(0), "frames lost in the restored timeline: {f}");
        assert_eq!(f["dups"].as_u64(), Some(0), "frames duplicated in the restored timeline: {f}");
    }
    let sent = exp.reports(sender, incarnation);
    assert!(sent.iter().any(|s| s["role"] == "send" && s["done"] == true), "sender finished in the restored timeline");
}

/// Largest probe step per clock over the given reports, in ns.
pub fn max_steps(reports: &[Value]) -> [(String, u64); 3] {
    let mut m = [("mono".to_string(), 0u64), ("real".to_string(), 0), ("boot".to_string(), 0)];
    for r in reports.iter().filter(|r| r["tool"] == "probe") {
        for (k, v) in m.iter_mut() {
            if let Some(s) = r["max_step_ns"][k.as_str()].as_i64() {
                *v = (*v).max(s.max(0) as u64);
            }
        }
    }
    m
}

/// The guest-kmod counters (`/proc/stasis_fw`, see docs/guest-kmod.md) that
/// `stasis-probe --kmod` embedded in its reports, oldest first; reports whose
/// `kmod` is `null` (the file could not be read) are skipped.
pub fn kmod_counters(reports: &[Value]) -> Vec<Value> {
    reports.iter().filter(|r| r["tool"] == "probe" && r["kmod"].is_object()).map(|r| r["kmod"].clone()).collect()
}

/// What in one `/proc/stasis_fw` snapshot exceeds the bounds: every clock's
/// largest step above `step_bound_ns`, every clock pair's largest
/// disagreement change above `dis_bound_ns`, and any KVM pause detected.
/// Empty when the snapshot is within bounds.
pub fn kmod_violations(kmod: &Value, step_bound_ns: u64, dis_bound_ns: u64) -> Vec<String> {
    let mut out = Vec::new();
    for clock in ["mono", "real", "boot", "tsc"] {
        match kmod["max_step_ns"][clock].as_u64() {
            Some(s) if s <= step_bound_ns => {}
            s => out.push(format!("max_step_ns.{clock} = {s:?} > {step_bound_ns}")),
        }
    }
    for pair in ["real_mono", "boot_mono", "tsc_mono"] {
        match kmod["max_dis_ns"][pair].as_u64() {
            Some(d) if d <= dis_bound_ns => {}
            d => out.push(format!("max_dis_ns.{pair} = {d:?} > {dis_bound_ns}")),
        }
    }
    if kmod["kvm"]["pauses"].as_u64() != Some(0) {
        out.push(format!("kvm.pauses = {}", kmod["kvm"]["pauses"]));
    }
    out
}
