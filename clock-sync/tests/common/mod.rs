//! The PTP lab shared by `tests/netns.rs` (functional bounds) and
//! `benches/ptp.rs` (the figures against the 10 µs goal): three slaves with
//! injected clock errors and one grandmaster, each in its own network
//! namespace, joined by veths to a bridge in a fifth namespace.
//!
//! Needs root (creates namespaces); the guard removes every namespace and kills
//! every process it started, even when an assertion panics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stasis_clock_sync::{Convergence, Metrics, SyncState};

const CONVERGE_DEADLINE: Duration = Duration::from_secs(40);
const STEADY_WINDOW: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(3);
const METRICS_MS: u64 = 100;

/// Namespaces and processes of one test run; dropping it removes them all.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Self {
        remove_stale_namespaces();
        Lab { prefix: format!("stasis-cs-{}", std::process::id()), namespaces: vec![], children: vec![] }
    }

    fn add_ns(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // deleting a namespace also deletes the veth ends inside it
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Namespaces left by an earlier run that was killed before its guard ran
/// (SIGKILL): `stasis-cs-<pid>-*` whose pid no longer exists.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("stasis-cs-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // its clock-sync processes outlived it: end them first
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    if let Ok(p) = p.parse::<i32>() {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub struct Node {
    pub name: &'static str,
    pub gm: bool,
    pub offset_ns: i64,
    pub drift_ppm: f64,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One slave's outcome: its steady-state |true error| samples, sorted.
pub struct Slave {
    pub name: &'static str,
    pub converged_after_s: f64,
    pub steady_abs_ns: Vec<f64>,
}

/// Whether this process may create network namespaces.
pub fn is_root() -> bool {
    unsafe_geteuid() == 0
}

/// Run the lab: wait until every slave's true error stayed under
/// `converge_bound_ns` for 10 samples (panics past the deadline), let the
/// filters settle, then collect a steady window. Panics on a structural fault
/// (a grandmaster that follows, a slave that leaves the slave state).
pub fn run(converge_bound_ns: f64) -> Vec<Slave> {
    let nodes = [
        Node { name: "gm", gm: true, offset_ns: 0, drift_ppm: 0.0 },
        Node { name: "s1", gm: false, offset_ns: 3_000_000, drift_ppm: 50.0 },
        Node { name: "s2", gm: false, offset_ns: -2_000_000, drift_ppm: -30.0 },
        Node { name: "s3", gm: false, offset_ns: 0, drift_ppm: 0.0 },
    ];
    let mut lab = Lab::new();
    let br = lab.add_ns("br");
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
    ip(&["-n", &br, "link", "set", "br0", "up"]);
    let (tx, rx) = mpsc::channel::<(usize, Metrics)>();
    for (i, node) in nodes.iter().enumerate() {
        let ns = lab.add_ns(node.name);
        let port = format!("p{i}");
        ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
        // a private address inside our own namespaces only; nothing leaves them
        ip(&["-n", &ns, "addr", "add", &format!("10.251.0.{}/24", i + 1), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_clock-sync"), "--iface", "eth0", "--json"])
            .arg(format!("--metrics-ms={METRICS_MS}"))
            .arg(format!("--offset-ns={}", node.offset_ns))
            .arg(format!("--drift-ppm={}", node.drift_ppm))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if node.gm {
            cmd.arg("--gm");
        }
        let mut child = cmd.spawn().expect("spawn clock-sync");
        let stdout = child.stdout.take().unwrap();
        lab.children.push(child);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(m) = serde_json::from_str::<Metrics>(&line) {
                    if tx.send((i, m)).is_err() {
                        break;
                    }
                }
            }
        });
    }
    drop(tx);

    let start = Instant::now();
    let start_mono = stasis_core::clock::mono_ns();
    let mut conv: Vec<Convergence> = nodes.iter().map(|_| Convergence::new(converge_bound_ns, 10)).collect();
    let mut initial: Vec<Option<f64>> = vec![None; nodes.len()];
    // converge
    while nodes.iter().enumerate().any(|(i, n)| !n.gm && conv[i].converged_at().is_none()) {
        let left = CONVERGE_DEADLINE.checked_sub(start.elapsed()).unwrap_or_else(|| {
            panic!(
                "not converged within {CONVERGE_DEADLINE:?}: {:?}",
                conv.iter().map(|c| c.converged_at()).collect::<Vec<_>>()
            )
        });
        let (i, m) = rx.recv_timeout(left).expect("metrics stream ended");
        if nodes[i].gm {
            assert_ne!(m.state, SyncState::Slave, "the grandmaster must not follow anyone");
            continue;
        }
        let err = m.true_error_ns.expect("true error is known for skewed clocks");
        initial[i].get_or_insert(err);
        if m.state == SyncState::Slave {
            conv[i].observe(m.mono_ns, err);
        }
    }
    // let the filter settle, then measure the steady state
    let settle_start = Instant::now();
    while settle_start.elapsed() < SETTLE {
        rx.recv_timeout(Duration::from_secs(5)).expect("metrics stream ended");
    }
    let steady_start = Instant::now();
    let mut steady: Vec<Vec<f64>> = vec![vec![]; nodes.len()];
    while steady_start.elapsed() < STEADY_WINDOW {
        let (i, m) = rx.recv_timeout(Duration::from_secs(5)).expect("metrics stream ended");
        if !nodes[i].gm {
            assert_eq!(m.state, SyncState::Slave, "{} left the slave state", nodes[i].name);
            steady[i].push(m.true_error_ns.unwrap().abs());
        }
    }
    for (i, node) in nodes.iter().enumerate().filter(|(_, n)| !n.gm) {
        let conv_s = (conv[i].converged_at().unwrap() - start_mono) as f64 / 1e9;
        let mut s = steady[i].clone();
        s.sort_by(f64::total_cmp);
        assert!(s.len() > 50, "too few samples for {}: {}", node.name, s.len());
        println!(
            "{}: injected {:+} ns {:+} ppm, initial error {:.0} ns, converged (<{:.0} ns) after {:.1} s from start; steady {} s (after {} s settling): |err| p50 {:.0} ns, p99 {:.0} ns, max {:.0} ns ({} samples)",
            node.name,
            node.offset_ns,
            node.drift_ppm,
            initial[i].unwrap_or(f64::NAN),
            converge_bound_ns,
            conv_s,
            STEADY_WINDOW.as_secs(),
            SETTLE.as_secs(),
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            s[s.len() - 1],
            s.len()
        );
    }
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.gm)
        .map(|(i, n)| {
            let mut s = std::mem::take(&mut steady[i]);
            s.sort_by(f64::total_cmp);
            Slave {
                name: n.name,
                converged_after_s: (conv[i].converged_at().unwrap() - start_mono) as f64 / 1e9,
                steady_abs_ns: s,
            }
        })
        .collect()
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
