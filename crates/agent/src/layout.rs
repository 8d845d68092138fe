//! Where an experiment's files live under the state directory.
//!
//! ```text
//! <state>/<experiment>/
//!   runtime.json          what runs now (pids, sockets); absent when down
//!   events.jsonl          every freeze/save/resume event, monotonic stamps
//!   checkpoints/          the store (see stasis-store)
//!   run/                  sockets, logs, per-incarnation serial consoles
//! ```

use std::path::{Path, PathBuf};

/// Paths of one experiment's state.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout of experiment `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Layout {
        Layout { root: state_dir.join(name) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn runtime_file(&self) -> PathBuf {
        self.root.join("runtime.json")
    }

    pub fn events_file(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Per-VM directory: QMP socket, pidfile, QEMU log, serial consoles.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir().join("vm").join(node)
    }

    /// The serial console of `node` in its `incarnation`-th life (each
    /// restore starts a new one, so a test can tell timelines apart).
    pub fn serial_log(&self, node: &str, incarnation: u32) -> PathBuf {
        self.node_dir(node).join(format!("serial-{incarnation}.log"))
    }

    /// The delay-node socket a VM NIC connects to. Kept short: unix socket
    /// paths are limited to 107 bytes.
    pub fn port_socket(&self, node: &str, iface: &str) -> PathBuf {
        self.run_dir().join("p").join(format!("{node}.{iface}"))
    }

    pub fn delay_dir(&self) -> PathBuf {
        self.run_dir().join("delay")
    }

    pub fn delay_control(&self) -> PathBuf {
        self.delay_dir().join("ctl")
    }

    pub fn delay_topology(&self) -> PathBuf {
        self.delay_dir().join("topology.json")
    }

    pub fn delay_log(&self, incarnation: u32) -> PathBuf {
        self.delay_dir().join(format!("delay-node-{incarnation}.log"))
    }

    pub fn delay_events(&self) -> PathBuf {
        self.delay_dir().join("events.jsonl")
    }
}
