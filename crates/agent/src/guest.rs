//! Getting into a running node (docs/exec.md): `stasis exec`, `stasis cp`
//! and `stasis console`. Each VM has a guest agent port and a serial
//! console on unix sockets in its run directory (`stasis_qemu::vm::
//! guest_access_args`); every launch of the node — `up`, a restore, a
//! swap-in — serves them on the same paths, so a client that reconnects
//! after a checkpoint's freeze or a restore finds the new QEMU there.
//!
//! Blocking (the agent client is): the CLI runs these on a blocking thread.

use crate::host::{AttachError, Runtime};
use crate::layout::Layout;
use stasis_osguest::agent::{AgentClient, AgentError, ExecOutput};
use stasis_osguest::console::{ConsoleError, Ended};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why `stasis exec`, `cp` or `console` could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("experiment {experiment} is not running (`stasis up` or `stasis restore` starts it)")]
    NotRunning { experiment: String },
    #[error("experiment {experiment}")]
    Attach {
        experiment: String,
        #[source]
        source: AttachError,
    },
    #[error("experiment {experiment} has no node {node:?} (its nodes: {})", nodes.join(", "))]
    UnknownNode { experiment: String, node: String, nodes: Vec<String> },
    #[error("node {node}: its VM is not running (pid {pid}); `stasis status` shows what runs")]
    VmGone { node: String, pid: u32 },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("{arg:?} is not NODE:PATH (a guest path must be absolute: {detail})")]
    BadGuestPath { arg: String, detail: &'static str },
    #[error("stasis cp copies between this host and a node: exactly one of {from:?} and {to:?} must be NODE:PATH")]
    BadCopy { from: String, to: String },
    #[error("cannot read {path}")]
    ReadLocal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    WriteLocal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The sockets of one running node.
#[derive(Debug, Clone)]
pub struct NodeAccess {
    pub node: String,
    pub agent: PathBuf,
    pub console: PathBuf,
}

/// Finds `node` in the running experiment `experiment`.
pub fn node_access(layout: &Layout, experiment: &str, node: &str) -> Result<NodeAccess, GuestError> {
    let rt = match Runtime::load(layout) {
        Ok(rt) => rt,
        Err(AttachError::NotRunning(_)) => return Err(GuestError::NotRunning { experiment: experiment.to_owned() }),
        Err(source) => return Err(GuestError::Attach { experiment: experiment.to_owned(), source }),
    };
    let Some(vm) = rt.vms.iter().find(|v| v.name == node) else {
        return Err(GuestError::UnknownNode {
            experiment: experiment.to_owned(),
            node: node.to_owned(),
            nodes: rt.vms.iter().map(|v| v.name.clone()).collect(),
        });
    };
    if !crate::host::pid_alive(vm.pid) {
        return Err(GuestError::VmGone { node: node.to_owned(), pid: vm.pid });
    }
    let dir = layout.node_dir(node);
    Ok(NodeAccess {
        node: node.to_owned(),
        agent: dir.join(stasis_qemu::vm::AGENT_SOCKET),
        console: dir.join(stasis_qemu::vm::CONSOLE_SOCKET),
    })
}

/// How long to wait for the agent and for the command.
#[derive(Debug, Clone, Copy)]
pub struct ExecLimits {
    /// Until the guest agent first answers: a guest still booting, frozen
    /// by a checkpoint, or being restored is waited for this long; a guest
    /// without an agent fails after it, naming the node.
    pub agent_wait: Duration,
    /// Until the command has exited (`None`: no limit).
    pub command: Option<Duration>,
    /// Between two status polls.
    pub poll: Duration,
}

impl Default for ExecLimits {
    fn default() -> ExecLimits {
        ExecLimits { agent_wait: Duration::from_secs(30), command: None, poll: Duration::from_millis(200) }
    }
}

/// A client of `access`'s agent, once it answers within `wait`. Retrying
/// the ping is safe (it does nothing); a command is only sent to an agent
/// that has just answered.
fn ready_client(access: &NodeAccess, wait: Duration) -> Result<AgentClient, GuestError> {
    let mut c = AgentClient::new(&access.node, &access.agent);
    let deadline = Instant::now() + wait;
    loop {
        c.call_timeout = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_secs(1), wait);
        match c.ping() {
            Ok(()) => break,
            Err(AgentError::Timeout { .. } | AgentError::Connect { .. } | AgentError::Protocol { .. })
                if Instant::now() + Duration::from_millis(200) < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(AgentError::Connect { .. } | AgentError::Protocol { .. } | AgentError::Timeout { .. }) => {
                return Err(AgentError::Timeout { node: access.node.clone(), after: wait }.into())
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Once answering, one call should not wait long; a freeze in between is
    // ridden out by AgentClient::run's polling.
    c.call_timeout = wait.max(Duration::from_secs(10));
    Ok(c)
}

/// Runs `argv` in the node and waits for it.
pub fn exec(access: &NodeAccess, argv: &[String], limits: ExecLimits) -> Result<ExecOutput, GuestError> {
    let mut c = ready_client(access, limits.agent_wait)?;
    // A year is no limit.
    let timeout = limits.command.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    Ok(c.run(argv, None, timeout, limits.poll)?)
}

/// The exit status `stasis exec` ends with: the command's own, or 128 +
/// the signal that ended it (as a shell reports it).
pub fn exit_status(out: &ExecOutput) -> i32 {
    match (out.exit_code, out.signal) {
        (Some(c), _) => c.clamp(0, 255) as i32,
        (None, Some(s)) => (128 + s).clamp(0, 255) as i32,
        (None, None) => 255,
    }
}

/// One side of `stasis cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEnd {
    Local(PathBuf),
    Guest { node: String, path: String },
}

impl CopyEnd {
    /// `NODE:/abs/path` is a guest path; anything else (`./a:b`, `/x`,
    /// `file`) is local. A node name has no `/`.
    pub fn parse(arg: &str) -> Result<CopyEnd, GuestError> {
        match arg.split_once(':') {
            Some((node, path)) if !node.is_empty() && !node.contains('/') => {
                if path.is_empty() {
                    return Err(GuestError::BadGuestPath { arg: arg.to_owned(), detail: "no path after the colon" });
                }
                if !path.starts_with('/') {
                    return Err(GuestError::BadGuestPath { arg: arg.to_owned(), detail: "it is relative" });
                }
                Ok(CopyEnd::Guest { node: node.to_owned(), path: path.to_owned() })
            }
            _ => Ok(CopyEnd::Local(PathBuf::from(arg))),
        }
    }
}

/// A copy, resolved: which way and where exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    FromGuest { node: String, guest: String, local: PathBuf },
    ToGuest { local: PathBuf, node: String, guest: String },
}

/// The file name a copy into a directory (`…/`) takes: the source's last
/// component.
fn base_name(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

impl Copy {
    /// `stasis cp FROM TO`. A guest destination ending in `/` and a local
    /// destination that is a directory get the source's file name.
    pub fn resolve(from: &str, to: &str) -> Result<Copy, GuestError> {
        let bad = || GuestError::BadCopy { from: from.to_owned(), to: to.to_owned() };
        match (CopyEnd::parse(from)?, CopyEnd::parse(to)?) {
            (CopyEnd::Guest { node, path }, CopyEnd::Local(mut local)) => {
                if local.is_dir() {
                    local.push(base_name(&path));
                }
                Ok(Copy::FromGuest { node, guest: path, local })
            }
            (CopyEnd::Local(local), CopyEnd::Guest { node, mut path }) => {
                if path.ends_with('/') {
                    let name = local.file_name().ok_or_else(bad)?.to_string_lossy().into_owned();
                    path.push_str(&name);
                }
                Ok(Copy::ToGuest { local, node, guest: path })
            }
            _ => Err(bad()),
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Copy::FromGuest { node, .. } | Copy::ToGuest { node, .. } => node,
        }
    }
}

/// What a copy moved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub node: String,
    pub from: String,
    pub to: String,
    pub bytes: u64,
}

/// Runs `copy` against `access` (the node `copy` names). A copy out of the
/// guest writes a temporary file next to the destination and renames it
/// into place, so a failed copy leaves no partial file behind.
pub fn copy(access: &NodeAccess, copy: &Copy, agent_wait: Duration) -> Result<CopyReport, GuestError> {
    let mut c = ready_client(access, agent_wait)?;
    match copy {
        Copy::FromGuest { node, guest, local } => {
            let tmp = partial(local);
            let mut f = stasis_core::private::create_file(&tmp)
                .map_err(|source| GuestError::WriteLocal { path: local.clone(), source })?;
            let done = c.read_file(guest, &mut f).map_err(GuestError::from).and_then(|n| {
                f.sync_all().map_err(|source| GuestError::WriteLocal { path: local.clone(), source })?;
                std::fs::rename(&tmp, local)
                    .map_err(|source| GuestError::WriteLocal { path: local.clone(), source })?;
                Ok(n)
            });
            if done.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            Ok(CopyReport {
                node: node.clone(),
                from: format!("{node}:{guest}"),
                to: local.display().to_string(),
                bytes: done?,
            })
        }
        Copy::ToGuest { local, node, guest } => {
            let mut f = File::open(local).map_err(|source| GuestError::ReadLocal { path: local.clone(), source })?;
            let bytes = c.write_file(guest, &mut f)?;
            Ok(CopyReport {
                node: node.clone(),
                from: local.display().to_string(),
                to: format!("{node}:{guest}"),
                bytes,
            })
        }
    }
}

fn partial(local: &Path) -> PathBuf {
    let mut name = local.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".stasis-cp-{}", std::process::id()));
    local.with_file_name(name)
}

/// Attaches the terminal (`input`, stdout) to the node's serial console
/// until the detach key (Ctrl-]), the end of `input`, or the VM going away.
pub fn console<I: Read + AsRawFd>(access: &NodeAccess, input: I) -> Result<Ended, GuestError> {
    let out = std::io::stdout();
    Ok(stasis_osguest::console::attach(&access.node, &access.console, input, StdoutSink(out))?)
}

/// Stdout, flushed after every write (the console is interactive).
struct StdoutSink(std::io::Stdout);

impl Write for StdoutSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut l = self.0.lock();
        let n = l.write(b)?;
        l.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_ends_parse() {
        assert_eq!(CopyEnd::parse("a:/tmp/x").unwrap(), CopyEnd::Guest { node: "a".into(), path: "/tmp/x".into() });
        assert_eq!(CopyEnd::parse("./a:b").unwrap(), CopyEnd::Local("./a:b".into()));
        assert_eq!(CopyEnd::parse("file").unwrap(), CopyEnd::Local("file".into()));
        assert_eq!(CopyEnd::parse(":x").unwrap(), CopyEnd::Local(":x".into()));
        let e = CopyEnd::parse("a:tmp/x").unwrap_err().to_string();
        assert!(e.contains("\"a:tmp/x\"") && e.contains("relative"), "{e}");
        assert!(CopyEnd::parse("a:").unwrap_err().to_string().contains("no path"));
    }

    #[test]
    fn copies_resolve_one_way_or_the_other() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_str().unwrap();
        assert_eq!(
            Copy::resolve("a:/etc/hostname", dir).unwrap(),
            Copy::FromGuest { node: "a".into(), guest: "/etc/hostname".into(), local: d.path().join("hostname") }
        );
        assert_eq!(
            Copy::resolve("/x/blob.bin", "b:/tmp/").unwrap(),
            Copy::ToGuest { local: "/x/blob.bin".into(), node: "b".into(), guest: "/tmp/blob.bin".into() }
        );
        assert_eq!(
            Copy::resolve("blob", "b:/tmp/y").unwrap(),
            Copy::ToGuest { local: "blob".into(), node: "b".into(), guest: "/tmp/y".into() }
        );
        assert!(matches!(Copy::resolve("a:/x", "b:/y"), Err(GuestError::BadCopy { .. })));
        assert!(matches!(Copy::resolve("x", "y"), Err(GuestError::BadCopy { .. })));
    }

    #[test]
    fn exit_status_is_the_commands_or_128_plus_the_signal() {
        let out = |exit_code, signal| ExecOutput {
            pid: 1,
            exit_code,
            signal,
            stdout: vec![],
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            reconnects: 0,
        };
        assert_eq!(exit_status(&out(Some(0), None)), 0);
        assert_eq!(exit_status(&out(Some(3), None)), 3);
        assert_eq!(exit_status(&out(None, Some(9))), 137);
        assert_eq!(exit_status(&out(Some(1000), None)), 255);
    }

    #[test]
    fn unknown_nodes_and_stopped_experiments_are_named() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path(), "exp");
        let e = node_access(&layout, "exp", "a").unwrap_err().to_string();
        assert!(e.starts_with("experiment exp is not running"), "{e}");
    }
}
