//! The benchmark's "hosts": network namespaces joined by veths to a bridge
//! in a namespace of its own. [`Lab`] removes every namespace it made when
//! dropped (a namespace's veth ends go with it); [`Lab::new`] first removes
//! those of runs that were SIGKILLed (their pid, in the name, is gone).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Every namespace of the benchmark is named `skw<pid>-<suffix>`.
pub const PREFIX: &str = "skw";

/// Errors of namespace set-up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running ip {args}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ip {args} failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("opening network namespace {name}")]
    Open {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {name}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Run `ip` with `args`; its stderr in the error.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let joined = args.join(" ");
    let out =
        Command::new("ip").args(args).output().map_err(|source| NetnsError::Spawn { args: joined.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Ip { args: joined, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(())
}

/// Namespaces made by one run; dropping it deletes them.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    bridge_ns: Option<String>,
    ports: usize,
}

impl Lab {
    /// An empty lab for this process (stale labs of dead processes are removed first).
    pub fn new() -> Lab {
        remove_stale();
        Lab { prefix: format!("{PREFIX}{}", std::process::id()), namespaces: vec![], bridge_ns: None, ports: 0 }
    }

    fn add_ns(&mut self, suffix: &str) -> Result<String, NetnsError> {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A namespace `suffix` whose `eth0` (address `addr`, with prefix length)
    /// is a port of the lab's bridge (made on first use).
    pub fn add_host(&mut self, suffix: &str, addr: &str) -> Result<String, NetnsError> {
        let br = match &self.bridge_ns {
            Some(b) => b.clone(),
            None => {
                let b = self.add_ns("br")?;
                // multicast snooping would keep PTP's multicast from ports that never joined
                ip(&["-n", &b, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
                ip(&["-n", &b, "link", "set", "br0", "up"])?;
                self.bridge_ns = Some(b.clone());
                b
            }
        };
        let ns = self.add_ns(suffix)?;
        let port = format!("p{}", self.ports);
        self.ports += 1;
        ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                tracing::warn!(%ns, error = %e, "could not remove namespace");
            }
        }
    }
}

/// Move the calling thread into network namespace `name`. Threads and
/// processes it starts afterwards inherit the namespace; other threads keep
/// theirs. Use it only on a thread made for the purpose.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).map_err(|source| NetnsError::Open { name: name.to_owned(), source })?;
    // SAFETY: `f` is an open namespace file for the duration of the call;
    // setns only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter { name: name.to_owned(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Remove `skw<pid>-*` namespaces whose pid is gone, killing what runs in them.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_err() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        tracing::info!(%name, "removing a namespace left by a killed run");
        let _ = ip(&["netns", "del", name]);
    }
}
