//! "Hosts" for multi-host tests: network namespaces on this machine, each
//! with its own `stasis-agent`, joined by veths to a bridge in one more
//! namespace where the coordinator (`stasis`) runs. Dropping the [`Lab`]
//! kills every process in its namespaces (agents, QEMUs, delay nodes) and
//! deletes the namespaces, even when the test failed. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Subnet of a lab (private to its own namespaces; nothing leaves them).
pub const SUBNET: &str = "10.77.0";
/// The coordinator's address on the bridge.
pub const COORD_IP: &str = "10.77.0.254";
/// The port every agent serves.
pub const AGENT_PORT: u16 = 7700;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// One agent of the lab.
pub struct Agent {
    pub host: String,
    pub ns: String,
    pub addr: String,
    pub state: PathBuf,
    pub log: PathBuf,
    pub fault_file: PathBuf,
    /// Further `stasis-agent` arguments (e.g. `--ptp eth0 …`).
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

/// Namespaces, agents and the shared key of one test.
pub struct Lab {
    pub prefix: String,
    pub bridge_ns: String,
    pub dir: PathBuf,
    pub key_file: PathBuf,
    pub agents: Vec<Agent>,
    namespaces: Vec<String>,
    others: Vec<Child>,
}

fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn kill_all_in(ns: &str) {
    for _ in 0..50 {
        let pids = pids_in(ns);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            // SAFETY: kill(2) of a process inside a namespace this lab created.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Namespaces of earlier runs killed before their guard ran: `smh<pid>-<n>-*`
/// whose pid is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("smh").and_then(|r| r.split('-').next()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Lab {
    /// A bridge namespace and one namespace per host (`h1`, `h2` … at
    /// `10.77.0.1`, `10.77.0.2` …), with a fresh key; no agents yet.
    pub fn new(dir: &Path, hosts: usize) -> Lab {
        remove_stale();
        // Tests of one process may run in parallel: one prefix per lab.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("smh{}-{n}", std::process::id());
        let key_file = dir.join("agents.key");
        // 0600: the agents and the CLI refuse a key file others can read.
        stasis_core::private::write(&key_file, format!("test-key-{prefix}-0123456789abcdef0123456789\n").as_bytes())
            .expect("write key");
        let mut lab = Lab {
            bridge_ns: format!("{prefix}-br"),
            prefix,
            dir: dir.to_owned(),
            key_file,
            agents: vec![],
            namespaces: vec![],
            others: vec![],
        };
        let br = lab.bridge_ns.clone();
        ip(&["netns", "add", &br]);
        lab.namespaces.push(br.clone());
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "addr", "add", &format!("{COORD_IP}/24"), "dev", "br0"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 1..=hosts {
            let host = format!("h{i}");
            let ns = format!("{}-{host}", lab.prefix);
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("v{i}");
            ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{SUBNET}.{i}");
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let state = dir.join(format!("agent-{host}"));
            lab.agents.push(Agent {
                log: dir.join(format!("agent-{host}.log")),
                fault_file: dir.join(format!("fault-{host}")),
                host,
                ns,
                addr: format!("{addr}:{AGENT_PORT}"),
                state,
                extra_args: vec![],
                child: None,
            });
        }
        lab
    }

    /// `[[host]]` entries for a spec.
    pub fn hosts_toml(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("[[host]]\nname = \"{}\"\nagent = \"{}\"\n", a.host, a.addr))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn agent(&self, host: &str) -> &Agent {
        self.agents.iter().find(|a| a.host == host).expect("known host")
    }

    /// The key file of `host`'s agent: its own key, derived from the
    /// coordinator's master key (`stasis key host NAME`).
    pub fn host_key_file(&self, host: &str) -> PathBuf {
        let path = self.dir.join(format!("{host}.key"));
        if !path.exists() {
            let cli = crate::target_dir().join("debug").join("stasis");
            let out = Command::new(&cli)
                .arg("--key-file")
                .arg(&self.key_file)
                .args(["key", "host", host])
                .output()
                .expect("run stasis key host");
            assert!(out.status.success(), "stasis key host {host}: {}", String::from_utf8_lossy(&out.stderr));
            stasis_core::private::write(&path, &out.stdout).expect("write the host key");
        }
        path
    }

    /// Start (or restart) the agent of `host` in its namespace and wait
    /// until it listens.
    pub fn start_agent(&mut self, host: &str) {
        let bin = crate::target_dir().join("debug").join("stasis-agent");
        assert!(bin.exists(), "{} is missing: cargo build --bins", bin.display());
        let key = self.host_key_file(host);
        let a = self.agents.iter_mut().find(|a| a.host == host).expect("known host");
        let before = std::fs::read_to_string(&a.log).unwrap_or_default().matches("agent listening").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&a.log).expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &a.ns])
            .arg(&bin)
            .args(["--listen", &a.addr])
            .arg("--key-file")
            .arg(&key)
            .arg("--state-dir")
            .arg(&a.state)
            .arg("--fault-file")
            .arg(&a.fault_file)
            .args(&a.extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start stasis-agent");
        a.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&a.log).unwrap_or_default();
            if text.matches("agent listening").count() > before {
                break;
            }
            assert!(Instant::now() < deadline, "agent {host} did not start listening; log:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start every agent.
    pub fn start_agents(&mut self) {
        let hosts: Vec<String> = self.agents.iter().map(|a| a.host.clone()).collect();
        for h in hosts {
            self.start_agent(&h);
        }
    }

    /// Run `program ARGS` in namespace `ns` (output to `log`) until the lab is dropped.
    pub fn spawn_in(&mut self, ns: &str, program: &Path, args: &[&str], log: &Path) {
        let log = std::fs::File::create(log).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn in namespace");
        self.others.push(child);
    }

    /// SIGKILL the agent of `host` (its VMs and delay node keep running).
    pub fn kill_agent(&mut self, host: &str) {
        let a = self.agents.iter_mut().find(|a| a.host == host).expect("known host");
        if let Some(mut c) = a.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The pid of the agent of `host` (the `ip netns exec` execs it).
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        self.agent(host).child.as_ref().map(|c| c.id())
    }

    /// Wrapper running a command as the coordinator (in the bridge
    /// namespace, with the key).
    pub fn coordinator_wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.bridge_ns, "env"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("STASIS_KEY_FILE={}", self.key_file.display())])
            .collect()
    }

    /// Make `host` unreachable (its link down) or reachable again.
    pub fn set_link(&self, host: &str, up: bool) {
        ip(&["-n", &self.agent(host).ns, "link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// Lines of the agent's log so far.
    pub fn log(&self, host: &str) -> String {
        std::fs::read_to_string(&self.agent(host).log).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.others {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for ns in self.namespaces.iter().rev() {
            kill_all_in(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
