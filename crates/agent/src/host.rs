//! An experiment running on this host: bringing it up, checkpointing it,
//! restoring it and tearing it down.
//!
//! Processes outlive the CLI invocation that started them (QEMU daemonizes,
//! the delay node runs in its own session), so what runs is recorded in
//! `runtime.json` and every later command re-attaches from it.
//!
//! One checkpoint, on one host:
//! ```text
//!  agent                      delay node                 VM 1..n (QMP)
//!    | freeze_at(T, lead) ------->|  stop delivering at T-lead
//!    |            (at T) stop --------------------------------->|  stopped: stamps s_i
//!    | save(file) --------------->|  drain sockets, write state (frozen at F)
//!    | migrate fd:file ------------------------------------------>|  state written
//!    | thaw_at(F + D) ----------->|              cont at s_i + D ->|
//!    | commit manifest (fsync, rename): the checkpoint exists
//! ```
//! Every component is frozen for the same `D` (see [`crate::freeze`]). On one
//! host the resume comes before the commit: whether the commit succeeds or
//! not, what runs next is the same (an aborted checkpoint resumes too), and
//! resuming first keeps the manifest's hashing and fsyncs out of the frozen
//! duration. Any failure aborts: every component still resumes after the
//! same `D`, and the pending checkpoint directory is removed, so no earlier
//! checkpoint is touched and no partial one is ever listed.

use crate::event::{Event, Observer};
use crate::freeze::{self, Fault, FreezeConfig, StopStamp};
use crate::layout::Layout;
use crate::serial::ReadyWatch;
use crate::topology::topology_for;
use delay_node::control::Client as DelayClient;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use stasis_core::clock::{mono_ns, wait_until, MonoNs};
use stasis_core::spec::{Experiment, Node};
use stasis_core::versioned::{self, FormatVersion, Persisted};
use stasis_qemu::accel::Accel;
use stasis_qemu::vm::{NicSpec, Vm, VmSpec};
use stasis_store::manifest::{ComponentDraft, ComponentKind, ExperimentRef, FreezeReport, ManifestDraft, Timings};
use stasis_store::{Checkpoint, CheckpointInfo, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What runs now; persisted as `runtime.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runtime {
    pub experiment: String,
    pub spec_toml: String,
    pub spec_digest: String,
    pub accel: String,
    /// Increments with every (re)start; names the serial console files.
    pub incarnation: u32,
    /// The checkpoint this timeline was restored from, if any.
    pub restored_from: Option<String>,
    pub delay_node: DelayProc,
    pub vms: Vec<VmProc>,
    /// Disks and history (docs/disks.md): the line of history this timeline
    /// extends (`main` when absent) ...
    #[serde(default)]
    pub branch: Option<String>,
    /// ... its latest checkpoint (the parent of the next one in `stasis log`),
    #[serde(default)]
    pub head: Option<String>,
    /// ... and where this record lives, so a checkpoint can record the new
    /// disk overlays it switched the VMs to.
    #[serde(default)]
    pub runtime_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelayProc {
    pub pid: u32,
    pub control: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmProc {
    pub name: String,
    pub pid: u32,
    pub qmp: PathBuf,
    pub serial_log: PathBuf,
    /// The qcow2 overlay the VM's data disk writes to now (None: no disk).
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The versioned machine type QEMU runs (`pc-i440fx-10.0`): what its
    /// saved state needs, recorded in every checkpoint (`machines.json`).
    #[serde(default)]
    pub machine: Option<String>,
    /// An OS-image node's base image (the bottom of its disk's chain, never
    /// written), recorded in every checkpoint (`bases.json`).
    #[serde(default)]
    pub base: Option<crate::rootdisk::BaseIdentity>,
}

/// Where the programs and the guest image are.
#[derive(Debug, Clone)]
pub struct Tools {
    pub delay_node_bin: PathBuf,
    /// Kernel and initrd used by nodes that name none.
    pub default_kernel: PathBuf,
    pub default_initrd: PathBuf,
    pub accel: Accel,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("checkpoint {checkpoint}: VM {node:?} was saved from a machine type this QEMU cannot run")]
    Machine {
        checkpoint: String,
        node: String,
        #[source]
        source: stasis_qemu::machine::MachineError,
    },
    #[error("checkpoint {checkpoint}: its record of the VMs' machine types does not read")]
    MachineRecord {
        checkpoint: String,
        #[source]
        source: stasis_core::versioned::VersionedError,
    },
    #[error("experiment {0:?} is already running (run `stasis down` first)")]
    AlreadyRunning(String),
    #[error("node {node:?}: {what} {path} does not exist")]
    MissingFile { node: String, what: &'static str, path: PathBuf },
    #[error("delay node {0} does not exist (build it with `cargo build`)")]
    MissingDelayNode(PathBuf),
    #[error("delay node did not start: {0}")]
    DelayNode(String),
    #[error("VM {node:?} did not start")]
    Vm {
        node: String,
        #[source]
        source: stasis_qemu::vm::LaunchError,
    },
    #[error("VM {node:?} did not load its checkpointed state")]
    Incoming {
        node: String,
        #[source]
        source: stasis_qemu::vm::VmError,
    },
    #[error("resuming VM {node:?}")]
    Resume {
        node: String,
        #[source]
        source: stasis_qemu::vm::VmError,
    },
    #[error("delay node control")]
    Control(#[from] delay_node::control::ControlError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {checkpoint:?} belongs to experiment {found:?} (spec digest {found_digest}), not to {expected:?} (digest {expected_digest})")]
    ForeignCheckpoint {
        checkpoint: String,
        found: String,
        found_digest: String,
        expected: String,
        expected_digest: String,
    },
    #[error("checkpoint {checkpoint:?} has no state for {component:?}")]
    IncompleteCheckpoint { checkpoint: String, component: String },
    #[error("checkpointed spec does not parse")]
    Spec(#[from] stasis_core::spec::SpecError),
    #[error("checkpoint store")]
    Store(#[from] stasis_store::StoreError),
    #[error("data disk of node {node:?}")]
    Disk {
        node: String,
        #[source]
        source: stasis_qemu::disk::DiskError,
    },
    #[error("checkpoint {checkpoint:?} has no disk image for node {node:?}: {reason}")]
    MissingDisk { checkpoint: String, node: String, reason: String },
    #[error("root disk")]
    RootDisk(#[from] crate::rootdisk::RootDiskError),
    #[error("checkpoint {checkpoint:?}: {BASES_FILE}", BASES_FILE = crate::rootdisk::BASES_FILE)]
    BaseRecord {
        checkpoint: String,
        #[source]
        source: stasis_core::versioned::VersionedError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("experiment is not running (no {0})")]
    NotRunning(PathBuf),
    #[error("{path} is damaged")]
    BadRuntime {
        path: PathBuf,
        #[source]
        source: stasis_core::versioned::VersionedError,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("VM {node:?} is not running (pid {pid})")]
    VmGone { node: String, pid: u32 },
    #[error("cannot reach VM {node:?}")]
    Attach {
        node: String,
        #[source]
        source: stasis_qemu::qmp::QmpError,
    },
    #[error("cannot reach the delay node")]
    DelayAttach(#[source] delay_node::control::ControlError),
    #[error("checkpoint aborted, experiment resumed: {reason}")]
    Aborted { reason: String },
    #[error("checkpoint aborted and the experiment could not be fully resumed: {reason}; resume failures: {resume}")]
    AbortedBroken { reason: String, resume: String },
    #[error("store")]
    Store(#[from] stasis_store::StoreError),
    #[error("fault {fault:?} names {node:?}, which is not a VM of this experiment")]
    FaultNode { fault: String, node: String },
}

/// The result of a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub info: CheckpointInfo,
    pub vms: usize,
    pub bytes: u64,
    pub stop_skew_ns: u64,
    pub frozen_duration_ns: u64,
    pub max_frozen_error_ns: u64,
    pub save_ns: u64,
    pub commit_ns: u64,
    pub frames_in_flight: u64,
    pub frames_held: u64,
    pub max_hold_lateness_ns: u64,
}

/// The result of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    pub checkpoint: String,
    pub vms: usize,
    pub restore_ns: u64,
    pub resume_skew_ns: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpError + '_ {
    move |source| UpError::Io { path: path.to_owned(), source }
}

impl Persisted for Runtime {
    const FORMAT: &'static str = "stasis-runtime";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

impl Runtime {
    /// Read `runtime.json`.
    pub fn load(layout: &Layout) -> Result<Runtime, AttachError> {
        let path = layout.runtime_file();
        match versioned::read_opt(&path) {
            Ok(Some(rt)) => Ok(rt),
            Ok(None) => Err(AttachError::NotRunning(path)),
            Err(source) => Err(AttachError::BadRuntime { path, source }),
        }
    }

    fn store(&self, layout: &Layout) -> Result<(), UpError> {
        self.store_at(&layout.runtime_file())
    }

    pub(crate) fn store_at(&self, path: &Path) -> Result<(), UpError> {
        versioned::write_atomic(path, self).map_err(io(path))
    }

    /// Liveness of every process.
    pub fn alive(&self) -> Vec<(String, u32, bool)> {
        let mut out = vec![("delay-node".to_string(), self.delay_node.pid, pid_alive(self.delay_node.pid))];
        out.extend(self.vms.iter().map(|v| (v.name.clone(), v.pid, pid_alive(v.pid))));
        out
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    exists && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

/// The kernel command line of a node.
pub fn kernel_append(node: &Node) -> String {
    let ips: Vec<String> = node.ifaces.iter().map(|i| format!("{}:{}/{}", i.name, i.ip, i.prefix_len)).collect();
    let mut script = String::new();
    for cmd in &node.run {
        script.push_str(cmd);
        script.push_str(" &\n");
    }
    // nokaslr: identically booted guests then hold the same pages at the
    // same addresses, and the store keeps them once (docs/store-bench.md:
    // 4 guests 1.27× one instead of 2.36×). Experiments do not need KASLR.
    let mut append = format!("console=ttyS0 quiet loglevel=1 panic=-1 nokaslr stasis.node={}", node.name);
    if !ips.is_empty() {
        append.push_str(&format!(" stasis.ip={}", ips.join(",")));
    }
    if !script.is_empty() {
        append.push_str(&format!(" stasis.run={}", base64(script.as_bytes())));
    }
    if !node.kernel_args.is_empty() {
        append.push(' ');
        append.push_str(&node.kernel_args);
    }
    append
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn vm_spec(exp: &Experiment, node: &Node, layout: &Layout, tools: &Tools) -> Result<VmSpec, UpError> {
    let kernel = node.kernel.clone().unwrap_or_else(|| tools.default_kernel.clone());
    let initrd = node.initrd.clone().unwrap_or_else(|| tools.default_initrd.clone());
    let firmware = node.image.is_some() && node.boot == stasis_core::spec::Boot::Firmware;
    for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        if !firmware && !path.exists() {
            return Err(UpError::MissingFile { node: node.name.clone(), what, path: path.clone() });
        }
    }
    let _ = exp;
    Ok(VmSpec {
        name: node.name.clone(),
        memory_mib: node.memory_mib,
        vcpus: node.vcpus,
        kernel,
        initrd,
        append: if node.image.is_some() {
            // An OS image's own command line (root=, console) and the node's
            // kernel_args (the spec joined them); its cloud-init seed does the rest.
            node.kernel_args.clone()
        } else {
            kernel_append(node)
        },
        nics: node
            .ifaces
            .iter()
            .map(|i| NicSpec {
                id: i.name.clone(),
                mac: i.mac.clone(),
                socket: layout.port_socket(&node.name, &i.name),
                backend: match node.nic {
                    stasis_core::spec::NicMode::Stream => stasis_qemu::NicBackend::Stream,
                    stasis_core::spec::NicMode::VhostUser => stasis_qemu::NicBackend::VhostUser,
                },
            })
            .collect(),
        accel: tools.accel,
        run_dir: layout.node_dir(&node.name),
        // Set by `up` (a fresh chain) or `restore` (an overlay on the checkpoint's image).
        disk: None,
        // Resolved at launch (`pc` → this QEMU's versioned type), or pinned
        // by `restore` to the one the checkpoint recorded.
        machine: None,
        firmware,
        // Set by `up` and `restore` (crate::rootdisk::write_seed).
        seed: None,
    })
}

fn start_delay_node(
    layout: &Layout,
    tools: &Tools,
    exp: &Experiment,
    incarnation: u32,
    restore: Option<&Path>,
) -> Result<DelayProc, UpError> {
    let topo = topology_for(exp, layout, seed_of(&exp.name));
    spawn_delay_node(layout, tools, &topo, incarnation, restore)
}

/// Start the delay node serving `topo` (the multi-host agent passes one
/// with TCP ports for VMs on other hosts).
pub(crate) fn spawn_delay_node(
    layout: &Layout,
    tools: &Tools,
    topo: &delay_node::config::Topology,
    incarnation: u32,
    restore: Option<&Path>,
) -> Result<DelayProc, UpError> {
    use std::os::unix::process::CommandExt;
    if !tools.delay_node_bin.exists() {
        return Err(UpError::MissingDelayNode(tools.delay_node_bin.clone()));
    }
    let dir = layout.delay_dir();
    stasis_core::private::create_dir_all(&dir).map_err(io(&dir))?;
    let sockets = layout.run_dir().join("p");
    stasis_core::private::create_dir_all(&sockets).map_err(io(&sockets))?;
    let topo_path = layout.delay_topology();
    stasis_core::private::write(&topo_path, &serde_json::to_vec_pretty(topo).expect("topology serialises"))
        .map_err(io(&topo_path))?;
    let control = layout.delay_control();
    let _ = std::fs::remove_file(&control);
    let log_path = layout.delay_log(incarnation);
    let log = stasis_core::private::create_file(&log_path).map_err(io(&log_path))?;
    let mut cmd = std::process::Command::new(&tools.delay_node_bin);
    cmd.arg("--topology").arg(&topo_path).arg("--control").arg(&control).arg("--events").arg(layout.delay_events());
    // Its control socket's save/pcap/restore paths stay in this experiment.
    cmd.arg("--confine").arg(layout.root());
    if let Some(state) = restore {
        cmd.arg("--restore").arg(state);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io(&log_path))?)
        .stderr(log)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env("NO_COLOR", "1");
    // SAFETY: setsid is async-signal-safe; it detaches the node from the CLI's
    // session so it outlives the command that started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io(&tools.delay_node_bin))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(UpError::DelayNode(format!("exited with {status}: {}", log.trim())));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(UpError::DelayNode("control socket did not appear within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Reap it from a detached thread if it ever exits while we still live.
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(DelayProc { pid, control })
}

/// The next life of the experiment's processes: 1, 2, 3 … for as long as
/// the state dir lives (`down` does not reset it), so every incarnation's
/// consoles and logs are kept apart.
pub(crate) fn next_incarnation(layout: &Layout) -> Result<u32, UpError> {
    let path = layout.root().join("incarnation");
    stasis_core::private::create_dir_all(layout.root()).map_err(io(layout.root()))?;
    let last = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u32>().ok()).unwrap_or(0);
    stasis_core::private::write(&path, format!("{}\n", last + 1).as_bytes()).map_err(io(&path))?;
    Ok(last + 1)
}

pub(crate) fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Bring `exp` up: the delay node, then every VM (which connect to it).
pub async fn up(exp: &Experiment, layout: &Layout, tools: &Tools, obs: &dyn Observer) -> Result<Runtime, UpError> {
    if let Ok(rt) = Runtime::load(layout) {
        if rt.alive().iter().any(|(_, _, alive)| *alive) {
            return Err(UpError::AlreadyRunning(exp.name.clone()));
        }
    }
    if let Some(n) = exp.nodes.iter().find(|n| n.image.is_some() && n.disk_bytes.is_some()) {
        return Err(crate::rootdisk::RootDiskError::ImageAndDisk { node: n.name.clone() }.into());
    }
    let specs = exp.nodes.iter().map(|n| vm_spec(exp, n, layout, tools)).collect::<Result<Vec<_>, _>>()?;
    stasis_core::private::create_dir_all(layout.root()).map_err(io(layout.root()))?;
    // Each base image's identity, hashed (once per file version) before anything starts.
    let cache = crate::rootdisk::cache_path(layout);
    let bases = exp
        .nodes
        .iter()
        .map(|n| n.image.as_ref().map(|i| crate::rootdisk::identity(&n.name, &abs_path(i), &cache)).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    let incarnation = next_incarnation(layout)?;
    let mut specs = specs;
    // Disks: a fresh empty base image per node (named by incarnation, so the
    // chains of earlier checkpoints are never touched) and an overlay on it.
    for (spec, node) in specs.iter_mut().zip(&exp.nodes) {
        if let Some(bytes) = node.disk_bytes {
            let dir = disk_dir(layout, &node.name);
            stasis_core::private::create_dir_all(&dir).map_err(io(&dir))?;
            let base = dir.join(format!("base-{incarnation}.qcow2"));
            let _ = std::fs::remove_file(&base);
            let disk_err = |source| UpError::Disk { node: node.name.clone(), source };
            stasis_qemu::disk::create_base(&base, bytes).map_err(disk_err)?;
            let top = next_overlay(&dir);
            stasis_qemu::disk::create_overlay(&top, &base).map_err(disk_err)?;
            spec.disk = Some(top);
        }
        // Root disks: an overlay on the user's image itself.
        if let Some(image) = &node.image {
            let dir = disk_dir(layout, &node.name);
            stasis_core::private::create_dir_all(&dir).map_err(io(&dir))?;
            spec.disk = Some(crate::rootdisk::create_root_overlay(node, image, &dir)?);
            spec.seed = Some(crate::rootdisk::write_seed(exp, node, layout)?);
        }
    }
    let (mut rt, _) = match launch_all(exp, layout, tools, &specs, incarnation, None, obs).await {
        Ok(started) => started,
        Err(e) => {
            // Nothing half-started stays behind: the experiment is not
            // recorded yet (no experiment.toml), so `stasis down` could not
            // find the delay node and VMs already started.
            if let Err(cleanup) = down(layout).await {
                tracing::warn!(error = %cleanup, "cannot stop what the failed start started");
            }
            return Err(e);
        }
    };
    if bases.iter().any(Option::is_some) {
        for (proc, base) in rt.vms.iter_mut().zip(bases) {
            proc.base = base;
        }
        rt.store(layout)?;
    }
    Ok(rt)
}

fn abs_path(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// How long the guests of `exp` may take to print their ready line: an OS
/// image boots firmware, kernel, systemd and cloud-init (~35 s under TCG on
/// an idle machine), the busybox guest a few seconds. Generous, for loaded
/// and slow machines.
pub fn ready_timeout(exp: &Experiment) -> Duration {
    let images = exp.nodes.iter().filter(|n| n.image.is_some()).count() as u64;
    if images == 0 {
        Duration::from_secs(180)
    } else {
        Duration::from_secs(600 + 120 * images)
    }
}

/// `<state>/<experiment>/disks/<node>`: the node's images (docs/disks.md).
pub fn disk_dir(layout: &Layout, node: &str) -> PathBuf {
    layout.root().join("disks").join(node)
}

/// The next unused overlay name in `dir`: `ov-<N>.qcow2`, N one more than
/// the largest there. Images are never removed, so names are never reused.
pub(crate) fn next_overlay(dir: &Path) -> PathBuf {
    let n = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name().to_str()?.strip_prefix("ov-")?.strip_suffix(".qcow2")?.parse::<u64>().ok()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    dir.join(format!("ov-{}.qcow2", n + 1))
}

pub use crate::history::{lineage_of, Lineage, DISKS_FILE, LINEAGE_FILE, MAIN_BRANCH};

async fn launch_all(
    exp: &Experiment,
    layout: &Layout,
    tools: &Tools,
    specs: &[VmSpec],
    incarnation: u32,
    from: Option<&Checkpoint>,
    obs: &dyn Observer,
) -> Result<(Runtime, Vec<(String, Vm)>), UpError> {
    // stasis-store: chunked components are reassembled (every chunk verified) into real files for QEMU and the delay node
    // (a no-op for a checkpoint `restore` materialized already).
    let from = from.map(|c| c.materialized(&layout.root().join("restore"))).transpose()?;
    let from = from.as_ref();
    let delay_state = from.map(|c| c.file("delay-node"));
    let delay = start_delay_node(layout, tools, exp, incarnation, delay_state.as_deref())?;
    obs.event(&Event::DelayNodeStarted { pid: delay.pid });
    let mut rt = Runtime {
        experiment: exp.name.clone(),
        spec_toml: exp.to_toml(),
        spec_digest: exp.digest(),
        accel: format!("{:?}", tools.accel),
        incarnation,
        restored_from: from.map(|c| c.info.id.clone()),
        delay_node: delay,
        vms: Vec::new(),
        branch: None,
        head: from.map(|c| c.info.id.clone()),
        runtime_file: Some(layout.runtime_file()),
    };
    // Record as we go, so `stasis down` can clean up after a partial start.
    rt.store(layout)?;
    let mut vms = Vec::new();
    for spec in specs {
        stasis_core::private::create_dir_all(&spec.run_dir).map_err(io(&spec.run_dir))?;
        let serial = layout.serial_log(&spec.name, incarnation);
        let incoming = from.map(|c| c.file(&format!("vm-{}", spec.name)));
        let vm = Vm::launch(spec, &serial, incoming.as_deref())
            .await
            .map_err(|source| UpError::Vm { node: spec.name.clone(), source })?;
        obs.event(&Event::VmLaunched { node: spec.name.clone(), pid: vm.pid, incarnation });
        rt.vms.push(VmProc {
            name: spec.name.clone(),
            pid: vm.pid,
            qmp: vm.qmp_path.clone(),
            serial_log: serial,
            disk: spec.disk.clone(),
            machine: vm.machine.clone(),
            base: None,
        });
        rt.store(layout)?;
        vms.push((spec.name.clone(), vm));
    }
    Ok((rt, vms))
}

/// Wait until every guest has printed its ready line on its console.
pub async fn wait_ready(rt: &Runtime, timeout: Duration, obs: &dyn Observer) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pending: Vec<(&VmProc, ReadyWatch)> =
        rt.vms.iter().map(|vm| (vm, ReadyWatch::new(&vm.serial_log))).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (vm, mut watch) in pending {
            // An unreadable log is not ready yet; the VM's exit or the deadline ends the wait.
            if watch.poll().unwrap_or(false) {
                obs.event(&Event::Ready { node: vm.name.clone() });
            } else if !pid_alive(vm.pid) {
                return Err(format!("VM {} exited during boot; console: {}", vm.name, vm.serial_log.display()));
            } else {
                still.push((vm, watch));
            }
        }
        pending = still;
        if !pending.is_empty() {
            if std::time::Instant::now() > deadline {
                let names: Vec<&str> = pending.iter().map(|(v, _)| v.name.as_str()).collect();
                return Err(format!("guests not ready after {timeout:?}: {}", names.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The instant QEMU itself stamped on the last `event` (STOP, RESUME) it
/// sent, on the monotonic clock: better than the QMP round trip's middle,
/// which includes however long QEMU's main loop took to pick the command up.
pub(crate) fn reported_instant(vm: &mut Vm, event: &str) -> Option<MonoNs> {
    let ev = vm.qmp().drain_events().into_iter().rfind(|e| e.name == event)?;
    ev.qemu_time_us.map(|us| stasis_core::clock::wall_to_mono(us * 1_000))
}

/// Resumes `vm` so that it runs again at `at`: its `cont` is written `lead`
/// early by a thread armed for it ([`Vm::cont_at`]); with `armed` off (the
/// before/after comparison path) after a sleep instead. The stamp carries
/// QEMU's own RESUME instant when it reported one.
pub(crate) async fn cont_vm_at(
    vm: &mut Vm,
    at: MonoNs,
    lead: u64,
    armed: bool,
) -> Result<StopStamp, stasis_qemu::VmError> {
    let c = if armed {
        vm.cont_at(at.saturating_sub(lead)).await
    } else {
        sleep_until(at.saturating_sub(lead)).await;
        vm.cont().await
    };
    c.map(|c| StopStamp { sent: c.sent, replied: c.replied, reported: reported_instant(vm, "RESUME") })
}

pub(crate) async fn sleep_until(deadline: MonoNs) -> MonoNs {
    const SPIN: u64 = 1_000_000;
    let now = mono_ns();
    if deadline > now + SPIN {
        tokio::time::sleep(Duration::from_nanos(deadline - now - SPIN)).await;
    }
    wait_until(deadline)
}

pub(crate) struct Attached {
    pub(crate) vms: Vec<(String, Vm)>,
    pub(crate) delay: DelayClient,
}

/// Inside a freeze: every stopped VM with a disk switches to a new overlay,
/// so the image it wrote until now is frozen exactly as the memory saved
/// next expects it. The frozen images go into `frozen_disks` (and the
/// pending checkpoint's disks.json), the new overlays into `rt_next` (and
/// the runtime file at once). Shared by stop-and-copy and live checkpoints.
pub(crate) async fn switch_disks(
    a: &mut Attached,
    rt: &Runtime,
    rt_next: &mut Runtime,
    pending: &stasis_store::Pending,
    frozen_disks: &mut std::collections::BTreeMap<String, PathBuf>,
    failure: &mut Option<String>,
) {
    // All VMs at once (each node has its own directory, so names cannot clash).
    let switches = a.vms.iter_mut().zip(rt_next.vms.iter_mut()).filter_map(|((node, vm), proc)| {
        let current = proc.disk.clone()?;
        let next = next_overlay(current.parent().unwrap_or(Path::new(".")));
        Some(async move {
            let r = vm.snapshot_disk(&next).await;
            (node.clone(), proc, current, next, r)
        })
    });
    for (node, proc, current, next, r) in join_all(switches).await {
        match r {
            Ok(()) => {
                frozen_disks.insert(node, current);
                proc.disk = Some(next);
            }
            Err(e) => {
                failure.get_or_insert(format!("switching the disk of VM {node} to a new overlay: {e}"));
            }
        }
    }
    if !frozen_disks.is_empty() {
        if let Some(path) = &rt.runtime_file {
            if let Err(e) = rt_next.store_at(path) {
                failure.get_or_insert(format!("recording the new disk overlays: {e}"));
            }
        }
        let path = pending.path(DISKS_FILE);
        if let Err(e) = versioned::write_atomic(&path, &crate::history::FrozenDisks(frozen_disks.clone())) {
            failure.get_or_insert(format!("writing {}: {e}", path.display()));
        }
    }
}

pub(crate) async fn attach(rt: &Runtime) -> Result<Attached, CheckpointError> {
    let mut vms = Vec::new();
    for v in &rt.vms {
        if !pid_alive(v.pid) {
            return Err(CheckpointError::VmGone { node: v.name.clone(), pid: v.pid });
        }
        let vm = Vm::attach(&v.name, &v.qmp, v.pid)
            .await
            .map_err(|source| CheckpointError::Attach { node: v.name.clone(), source })?;
        vms.push((v.name.clone(), vm));
    }
    let delay = DelayClient::connect(&rt.delay_node.control).await.map_err(CheckpointError::DelayAttach)?;
    Ok(Attached { vms, delay })
}

/// Take one checkpoint of the running experiment.
pub async fn checkpoint(
    rt: &Runtime,
    store: &Store,
    name: Option<&str>,
    cfg: &FreezeConfig,
    obs: &dyn Observer,
) -> Result<CheckpointSummary, CheckpointError> {
    checkpoint_with_faults(rt, store, name, cfg, &[], obs).await
}

/// [`checkpoint`], breaking transparency on purpose as `faults` say: only to
/// show that the instruments (the report, the guests' probes) catch it.
pub async fn checkpoint_with_faults(
    rt: &Runtime,
    store: &Store,
    name: Option<&str>,
    cfg: &FreezeConfig,
    faults: &[Fault],
    obs: &dyn Observer,
) -> Result<CheckpointSummary, CheckpointError> {
    if let Some(f) = faults.iter().find(|f| !rt.vms.iter().any(|v| v.name == f.node())) {
        return Err(CheckpointError::FaultNode { fault: format!("{f:?}"), node: f.node().to_string() });
    }
    let mut a = attach(rt).await?;
    let pending = store.begin(name)?;
    let id = pending.id().to_string();
    let started = mono_ns();
    let t = freeze::plan_freeze(started, cfg);
    obs.event(&Event::Planned { checkpoint: id.clone(), freeze_at: t });

    if let Err(e) = a.delay.freeze_at(t, cfg.hold_lead_ns).await {
        pending.abort();
        return Err(CheckpointError::Aborted { reason: format!("delay node refused the freeze: {e}") });
    }

    // Stop every VM at T: each request is written at T by a thread of its
    // own (Vm::stop_at), armed now, well before T. From 1 ms before until
    // every VM has stopped, each QEMU's control threads run boosted, so the
    // command's dispatch (when the guest's clocks stop) does not wait for a
    // host CPU. (vCPU threads are left alone: they only delay the STOP
    // event, which is not the freeze instant; see `freeze_instant`.)
    let want_boost = std::env::var("STASIS_STOP_BOOST").map(|v| v != "0").unwrap_or(true);
    // The stop path before the firewall work (one task writes every `stop`
    // at T, the STOP event is the freeze instant): for before/after
    // comparisons only (docs/eval-time.md).
    let legacy = std::env::var("STASIS_FREEZE_LEGACY").is_ok_and(|v| v == "1");
    let pids: Vec<(String, u32)> = a.vms.iter().map(|(n, vm)| (n.clone(), vm.pid)).collect();
    let boost = async {
        sleep_until(t.saturating_sub(1_000_000)).await;
        if want_boost {
            boost_all(&pids)
        } else {
            Vec::new()
        }
    };
    let (stop_boost, stops) =
        futures::join!(boost, join_all(a.vms.iter_mut().map(|(node, vm)| stop_vm(node, vm, t, faults, legacy))));
    drop(stop_boost);
    let mut stamps: Vec<Option<StopStamp>> = Vec::new();
    let mut stop_events: Vec<Option<MonoNs>> = Vec::new();
    let mut failure: Option<String> = None;
    for ((node, vm), r) in a.vms.iter_mut().zip(stops) {
        match r {
            Ok(s) => {
                obs.event(&Event::Stopped { component: node.clone(), sent: s.sent, replied: s.replied });
                let event = reported_instant(vm, "STOP");
                stop_events.push(event);
                let reported = if legacy { event } else { event.map(|e| freeze_instant(s.sent, e)) };
                stamps.push(Some(StopStamp { sent: s.sent, replied: s.replied, reported }));
            }
            Err(e) => {
                failure.get_or_insert(format!("stopping VM {node}: {e}"));
                stamps.push(None);
                stop_events.push(None);
            }
        }
    }

    // Disks: every stopped VM with a disk switches to a new overlay, so the
    // image it wrote until now is frozen exactly as the memory saved below
    // expects it; that image belongs to this checkpoint (disks.json). The
    // runtime records the new overlay at once, whatever happens next.
    let mut frozen_disks = std::collections::BTreeMap::new();
    let mut rt_next = rt.clone();
    let snap_start = mono_ns();
    if failure.is_none() {
        switch_disks(&mut a, rt, &mut rt_next, &pending, &mut frozen_disks, &mut failure).await;
    }

    let disk_snapshot_ns = mono_ns() - snap_start;

    // Save: the delay node first (it drains what the stopped VMs sent), then
    // every VM's memory and devices, concurrently.
    let mut components = Vec::new();
    let mut node_report = None;
    if failure.is_none() {
        obs.event(&Event::Saving { component: "delay-node".into() });
        let path = pending.path("delay-node");
        let t0 = mono_ns();
        match a.delay.save(&path).await {
            Ok(r) => {
                let save_ns = mono_ns() - t0;
                obs.event(&Event::Saved { component: "delay-node".into(), bytes: r.bytes, save_ns });
                node_report = Some((r, save_ns));
            }
            Err(e) => failure = Some(format!("saving the delay node: {e}")),
        }
    }
    if failure.is_none() {
        let saves = join_all(a.vms.iter_mut().map(|(node, vm)| {
            let path = pending.path(&format!("vm-{node}"));
            obs.event(&Event::Saving { component: node.clone() });
            async move {
                let t0 = mono_ns();
                let r = vm.save(&path).await;
                (r, mono_ns() - t0)
            }
        }))
        .await;
        for ((node, _), (r, save_ns)) in a.vms.iter().zip(saves) {
            match r {
                Ok(rep) => {
                    obs.event(&Event::Saved { component: node.clone(), bytes: rep.bytes, save_ns });
                    components.push((node.clone(), rep.bytes, save_ns));
                }
                Err(e) => {
                    failure.get_or_insert(format!("saving VM {node}: {e}"));
                }
            }
        }
    }

    // Where a VM has a clock anchor from its previous resume in this
    // incarnation, its saved state says exactly when its clocks froze
    // (`ClockAnchor`); that replaces the estimate from the stop's write.
    let mut saved_virtual: Vec<Option<i64>> = Vec::new();
    let mut freeze_source: Vec<&'static str> = Vec::new();
    for (((node, _), proc), (stamp, event)) in a.vms.iter().zip(&rt.vms).zip(stamps.iter_mut().zip(&stop_events)) {
        let v = stamp.and_then(|_| {
            stasis_qemu::vmstate::saved_virtual_clock_ns(&pending.path(&format!("vm-{node}")))
                .map_err(|e| tracing::debug!(vm = %node, error = %e, "no virtual clock in the saved state"))
                .ok()
        });
        let mut source = "estimate";
        let anchor = if legacy { None } else { ClockAnchor::load(proc, rt.incarnation) };
        if let (Some(s), Some(v), Some(anchor)) = (stamp.as_mut(), v, anchor) {
            let at = anchor.freeze_instant(v);
            // Believe it only inside the bracket QMP gives (with slack for
            // the µs event stamps and the wall→monotonic mapping).
            let hi = event.unwrap_or(s.replied).max(s.sent);
            match at {
                Some(at) if at + 1_000_000 >= s.sent && at <= hi + 1_000_000 => {
                    s.reported = Some(at.clamp(s.sent, hi));
                    source = "vmstate";
                }
                _ => {
                    tracing::warn!(vm = %node, ?at, sent = s.sent, stop_event = ?event, "freeze instant from the saved state is outside the stop's bracket; using the estimate")
                }
            }
        }
        saved_virtual.push(v);
        freeze_source.push(source);
    }
    let frozen_at = node_report.as_ref().map(|(r, _)| r.frozen_at).unwrap_or(t);
    let mut stop_instants: Vec<MonoNs> = stamps.iter().map(|s| s.map(|s| s.instant()).unwrap_or(t)).collect();
    stop_instants.push(frozen_at);

    // Resume everything, whether the save succeeded or not: the outcome of
    // the commit below cannot change what runs next (an aborted checkpoint
    // resumes too), and resuming first keeps the frozen duration at the save
    // time instead of adding the manifest's hashing and fsyncs to it.
    let saved_at = mono_ns();
    let d = freeze::frozen_duration(&stop_instants, saved_at, cfg);
    let (resumed, resume_errors, hold_lateness, resume_detail) =
        resume(&mut a, &stamps, frozen_at, d, faults, obs).await;
    let resumed_of = |stop: MonoNs| resumed.iter().find(|m| m.0 == stop).map(|m| m.1).unwrap_or(0);
    // Each resumed VM's new anchor: its RESUME instant and the virtual clock
    // it resumed with (the one it froze at).
    for (((_, _), proc), (stamp, v)) in a.vms.iter().zip(&rt.vms).zip(stamps.iter().zip(&saved_virtual)) {
        let resumed_at = stamp.map(|s| resumed_of(s.instant())).filter(|&r| r != 0);
        ClockAnchor::store(proc, rt.incarnation, resumed_at.zip(*v));
    }

    if let Some(reason) = failure {
        pending.abort();
        obs.event(&Event::Aborted { checkpoint: id, reason: reason.clone() });
        return Err(if resume_errors.is_empty() {
            CheckpointError::Aborted { reason }
        } else {
            CheckpointError::AbortedBroken { reason, resume: resume_errors.join("; ") }
        });
    }

    let (nr, node_save_ns) = node_report.expect("saved when nothing failed");
    let mut records: Vec<ComponentDraft> = a
        .vms
        .iter()
        .zip(&stamps)
        .map(|((node, _), s)| {
            let stop = s.expect("stopped when nothing failed").instant();
            let (_, _, save_ns) = components.iter().find(|c| &c.0 == node).cloned().expect("saved");
            let resume = resumed_of(stop);
            ComponentDraft {
                name: node.clone(),
                kind: ComponentKind::Vm,
                file: format!("vm-{node}"),
                stop_ns: stop,
                resume_ns: resume,
                frozen_ns: resume.saturating_sub(stop),
                save_ns,
            }
        })
        .collect();
    let node_resume = resumed_of(frozen_at);
    records.push(ComponentDraft {
        name: "delay-node".into(),
        kind: ComponentKind::DelayNode,
        file: "delay-node".into(),
        stop_ns: frozen_at,
        resume_ns: node_resume,
        frozen_ns: node_resume.saturating_sub(frozen_at),
        save_ns: node_save_ns,
    });
    let f = freeze::fidelity(t, d, &resumed);
    let commit_start = mono_ns();
    let mut files = match crate::history::write_records(&pending, rt) {
        Ok(f) => f,
        Err(reason) => {
            pending.abort();
            obs.event(&Event::Aborted { checkpoint: id, reason: reason.clone() });
            return Err(CheckpointError::Aborted { reason });
        }
    };
    let mut extra: std::collections::BTreeMap<String, u64> = [
        ("max_frozen_error_ns".to_string(), f.max_frozen_error_ns),
        ("max_hold_lateness_ns".to_string(), hold_lateness),
    ]
    .into_iter()
    .collect();
    if !frozen_disks.is_empty() {
        files.push(DISKS_FILE.to_string());
        // Time the disk switches added to the frozen window (all VMs, concurrently).
        extra.insert("disk_snapshot_ns".to_string(), disk_snapshot_ns);
    }
    let draft = ManifestDraft {
        parent: rt.restored_from.clone(),
        experiment: ExperimentRef {
            name: rt.experiment.clone(),
            digest: rt.spec_digest.clone(),
            spec_toml: rt.spec_toml.clone(),
        },
        components: records,
        files,
        freeze: FreezeReport {
            planned_ns: t,
            lead_ns: cfg.hold_lead_ns,
            stop_skew_ns: f.stop_skew_ns,
            frozen_duration_ns: d,
            frames_in_flight: nr.frames_in_flight,
            frames_held: nr.frames_held,
        },
        timings: Timings { total_save_ns: saved_at - t, commit_ns: 0, extra: extra.into_iter().collect() },
    };
    let summary = commit_checkpoint(
        pending,
        draft,
        rt,
        &mut rt_next,
        &resume_errors,
        Measured {
            vms: a.vms.len(),
            fidelity: f,
            frozen_duration_ns: d,
            save_ns: saved_at.saturating_sub(stop_instants.iter().copied().min().unwrap_or(saved_at)),
            commit_start,
            node: nr,
            max_hold_lateness_ns: hold_lateness,
        },
        obs,
    )?;
    let stop_detail: Vec<serde_json::Value> = a
        .vms
        .iter()
        .zip(stamps.iter().zip(&stop_events))
        .zip(freeze_source.iter().zip(&saved_virtual))
        .filter_map(|(((node, _), (s, ev)), (src, v))| {
            let s = (*s)?;
            Some(serde_json::json!({"component": node, "planned_ns": t, "sent_ns": s.sent, "freeze_ns": s.instant(), "freeze_source": src, "virtual_ns": v, "stop_event_ns": ev, "replied_ns": s.replied}))
        })
        .collect();
    write_report(store, &summary, &resumed, &[stop_detail, resume_detail], faults);
    Ok(summary)
}

/// Where a VM's guest clock stood when it last resumed in this incarnation:
/// `<vm run dir>/clock-anchor.json`. QEMU's virtual clock runs exactly while
/// the VM runs, so the next freeze instant is `resumed_ns + (virtual clock
/// saved then − virtual_ns)` (crate `stasis_qemu::vmstate`). Written after
/// every checkpoint's resume; a VM without one (just launched or restored)
/// falls back to the estimate from its stop's write (`freeze_instant`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ClockAnchor {
    incarnation: u32,
    resumed_ns: MonoNs,
    virtual_ns: i64,
}

impl Persisted for ClockAnchor {
    const FORMAT: &'static str = "stasis-clock-anchor";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

impl ClockAnchor {
    fn path(proc: &VmProc) -> PathBuf {
        proc.qmp.with_file_name("clock-anchor.json")
    }

    fn load(proc: &VmProc, incarnation: u32) -> Option<ClockAnchor> {
        let a: ClockAnchor = versioned::read(&Self::path(proc)).ok()?;
        (a.incarnation == incarnation).then_some(a)
    }

    /// Record (resume instant, virtual clock), or forget the anchor.
    fn store(proc: &VmProc, incarnation: u32, at: Option<(MonoNs, i64)>) {
        let path = Self::path(proc);
        let r = match at {
            Some((resumed_ns, virtual_ns)) => {
                let a = ClockAnchor { incarnation, resumed_ns, virtual_ns };
                versioned::write_atomic(&path, &a)
            }
            None => std::fs::remove_file(&path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        };
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "clock anchor not recorded; the next checkpoint estimates this VM's freeze instant");
        }
    }

    /// The host instant at which the virtual clock reached `virtual_ns`.
    fn freeze_instant(&self, virtual_ns: i64) -> Option<MonoNs> {
        let ran = virtual_ns.checked_sub(self.virtual_ns)?;
        u64::try_from(ran).ok().map(|ran| self.resumed_ns + ran)
    }
}

/// Stop one VM at T through QMP; with a `sigstop` fault, first freeze its
/// QEMU process with SIGSTOP for the fault's duration (its guest clocks run
/// on meanwhile: the leak the fault exists to produce).
async fn stop_vm(
    node: &str,
    vm: &mut Vm,
    t: MonoNs,
    faults: &[Fault],
    legacy: bool,
) -> Result<stasis_qemu::Stamp, stasis_qemu::VmError> {
    if legacy {
        sleep_until(t).await;
        return vm.stop().await;
    }
    if let Some(ns) = freeze::sigstop_ns(faults, node) {
        sleep_until(t).await;
        tracing::warn!(vm = %node, hold_ms = ns / 1_000_000, "fault injected: SIGSTOP instead of QMP stop");
        // SAFETY: kill(2) of the QEMU this experiment runs (pid from the
        // runtime record, QMP attached to it just now).
        unsafe { libc::kill(vm.pid as libc::pid_t, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_nanos(ns)).await;
        // SAFETY: as above.
        unsafe { libc::kill(vm.pid as libc::pid_t, libc::SIGCONT) };
        return vm.stop().await;
    }
    vm.stop_at(t).await
}

/// Boost the control threads of every VM's QEMU for a moment (see
/// [`stasis_qemu::sched::Boost`]) — only when `STASIS_QEMU_BOOST=1`. Off by
/// default: on the 2-core development host a boosted QEMU main thread was
/// seen spinning at 92 % CPU in `SCHED_FIFO` for minutes, starving the
/// ordinary threads it waited for and everything else on the machine (a
/// priority-inversion livelock), while the boost bought only ~0.1 ms of
/// resume latency (docs/eval-time.md). VMs that cannot be boosted (no
/// CAP_SYS_NICE) are logged and left alone.
fn boost_all(vms: &[(String, u32)]) -> Vec<stasis_qemu::sched::Boost> {
    if !std::env::var("STASIS_QEMU_BOOST").is_ok_and(|v| v == "1") {
        return Vec::new();
    }
    vms.iter()
        .filter_map(|(node, pid)| {
            stasis_qemu::sched::Boost::control_threads(*pid)
                .map_err(|e| tracing::debug!(vm = %node, error = %e, "QEMU threads not boosted"))
                .ok()
        })
        .collect()
}

/// How long QEMU typically takes from a QMP command's write to acting on it
/// (monitor I/O thread, then the main loop; boosted, on this host): `cont`
/// is written this much before its resume instant, and a `stop` is taken to
/// have frozen the guest's clocks this long after its write.
/// `STASIS_RESUME_LEAD_US` overrides it for `cont`.
const RESUME_LEAD_NS: u64 = 300_000;

/// When a VM's clocks froze, from the instant its `stop` was written and
/// its STOP event's stamp. QEMU 7.2 (`do_vm_stop`) stops the guest's clocks
/// (`cpu_disable_ticks`) first, then waits for every vCPU thread, runs the
/// device stop handlers (vhost-user round trips to the delay node), and only
/// then emits STOP: milliseconds later on a busy host, and by a different
/// amount per VM. The STOP stamp is therefore an upper bound; the write plus
/// the command's dispatch time is the estimate (measured: it predicts the
/// guests' own inter-VM skew better, docs/eval-time.md).
fn freeze_instant(sent: MonoNs, stop_event: MonoNs) -> MonoNs {
    stop_event.min(sent + RESUME_LEAD_NS)
}

pub(crate) fn resume_lead_ns() -> u64 {
    std::env::var("STASIS_RESUME_LEAD_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| us * 1_000)
        .unwrap_or(RESUME_LEAD_NS)
}

/// Resume every stopped VM at its own stop + `d` and thaw the delay node at
/// its freeze + `d`. Each VM's `cont` is written at its instant (less the
/// lead) by a thread of its own, armed well before ([`Vm::cont_at`]), while
/// QEMU's control threads run boosted ([`stasis_qemu::sched::Boost`]).
/// Returns (stop, resume) per component, the failures, the largest hold
/// lateness, and per VM the resume's instants for the report.
async fn resume(
    a: &mut Attached,
    stamps: &[Option<StopStamp>],
    frozen_at: MonoNs,
    d: u64,
    faults: &[Fault],
    obs: &dyn Observer,
) -> (Vec<(MonoNs, MonoNs)>, Vec<String>, u64, Vec<serde_json::Value>) {
    let mut errors = Vec::new();
    let mut measured = Vec::new();
    let mut detail = Vec::new();
    let lead = resume_lead_ns();
    let boost = std::env::var("STASIS_RESUME_BOOST").map(|v| v != "0").unwrap_or(true);
    let armed = std::env::var("STASIS_RESUME_ARMED").map(|v| v != "0").unwrap_or(true);
    let pids: Vec<(String, u32)> = a.vms.iter().map(|(n, vm)| (n.clone(), vm.pid)).collect();
    let boosts = if boost { boost_all(&pids) } else { Vec::new() };
    let vm_futs = a.vms.iter_mut().zip(stamps).filter_map(|((node, vm), s)| {
        let s = (*s)?;
        let at = s.instant() + d + freeze::late_resume_ns(faults, node);
        Some(async move {
            let r = cont_vm_at(vm, at, lead, armed).await;
            (node.clone(), s.instant(), at, r)
        })
    });
    let node_fut = async {
        let at = frozen_at + d;
        let r = a.delay.thaw_at(at).await;
        (at, r)
    };
    let (vm_results, (node_at, node_r)) = futures::join!(join_all(vm_futs), node_fut);
    drop(boosts);
    for (node, stop, planned, r) in vm_results {
        match r {
            Ok(stamp) => {
                let at = stamp.instant();
                obs.event(&Event::Resumed { component: node.clone(), at, planned });
                detail.push(serde_json::json!({
                    "component": node, "planned_ns": planned, "sent_ns": stamp.sent, "reported_ns": stamp.reported,
                    "replied_ns": stamp.replied, "lead_ns": lead, "error_ns": at as i64 - planned as i64,
                }));
                measured.push((stop, at));
            }
            Err(e) => errors.push(format!("VM {node}: {e}")),
        }
    }
    let mut lateness = 0;
    match node_r {
        Ok(r) => {
            obs.event(&Event::Resumed { component: "delay-node".into(), at: r.thawed_at, planned: node_at });
            detail.push(serde_json::json!({"component": "delay-node", "planned_ns": node_at, "reported_ns": r.thawed_at, "error_ns": r.thawed_at as i64 - node_at as i64}));
            measured.push((frozen_at, r.thawed_at));
            lateness = r.max_hold_lateness_ns;
        }
        Err(e) => errors.push(format!("delay node: {e}")),
    }
    (measured, errors, lateness, detail)
}

/// What a checkpoint measured before its commit, for its summary.
pub(crate) struct Measured {
    pub(crate) vms: usize,
    pub(crate) fidelity: freeze::Fidelity,
    pub(crate) frozen_duration_ns: u64,
    pub(crate) save_ns: u64,
    pub(crate) commit_start: MonoNs,
    pub(crate) node: delay_node::control::SaveReport,
    pub(crate) max_hold_lateness_ns: u64,
}

/// The end every one-host checkpoint shares (stop-and-copy and live):
/// commit the manifest (a failure aborts, named), make it the head of this
/// timeline in the runtime file, log components that did not resume, and
/// sum up.
pub(crate) fn commit_checkpoint(
    pending: stasis_store::Pending,
    draft: stasis_store::manifest::ManifestDraft,
    rt: &Runtime,
    rt_next: &mut Runtime,
    resume_errors: &[String],
    m: Measured,
    obs: &dyn Observer,
) -> Result<CheckpointSummary, CheckpointError> {
    let id = pending.id().to_string();
    // The guests run again: the commit takes only the CPU they leave.
    let info = match stasis_core::background::run(|| pending.commit(draft)) {
        Ok(i) => i,
        Err(e) => {
            let reason = format!("committing the manifest: {e}");
            obs.event(&Event::Aborted { checkpoint: id, reason: reason.clone() });
            return Err(CheckpointError::Aborted { reason });
        }
    };
    obs.event(&Event::Committed { checkpoint: info.id.clone(), name: info.name.clone().unwrap_or_default() });
    // The next checkpoint of this timeline follows this one.
    if let Some(path) = &rt.runtime_file {
        rt_next.head = Some(info.id.clone());
        if let Err(e) = rt_next.store_at(path) {
            tracing::warn!(error = %e, "cannot record the new head in the runtime file");
        }
    }
    if !resume_errors.is_empty() {
        tracing::error!(errors = %resume_errors.join("; "), "checkpoint committed but some components did not resume");
    }
    Ok(CheckpointSummary {
        vms: m.vms,
        bytes: info.bytes,
        stop_skew_ns: m.fidelity.stop_skew_ns,
        frozen_duration_ns: m.frozen_duration_ns,
        max_frozen_error_ns: m.fidelity.max_frozen_error_ns,
        save_ns: m.save_ns,
        commit_ns: mono_ns() - m.commit_start,
        frames_in_flight: m.node.frames_in_flight,
        frames_held: m.node.frames_held,
        max_hold_lateness_ns: m.max_hold_lateness_ns,
        info,
    })
}

/// `report.json`: the summary, each component's measured (stop, resume),
/// the instants around each VM's stop and resume command ([stops, resumes]),
/// and the faults injected.
fn write_report(
    store: &Store,
    summary: &CheckpointSummary,
    resumed: &[(MonoNs, MonoNs)],
    detail: &[Vec<serde_json::Value>; 2],
    faults: &[Fault],
) {
    let path = store.root().join(&summary.info.id).join("report.json");
    let body = serde_json::json!({ "summary": summary, "measured_stop_resume_ns": resumed, "stops": detail[0], "resumes": detail[1], "faults": faults });
    let tmp = path.with_extension("json.tmp");
    if stasis_core::private::write(&tmp, &serde_json::to_vec_pretty(&body).expect("report serialises")).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// Stop and remove every process of the experiment. Idempotent.
pub async fn down(layout: &Layout) -> Result<usize, AttachError> {
    let rt = match Runtime::load(layout) {
        Ok(rt) => rt,
        Err(AttachError::NotRunning(_)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut killed = Vec::new();
    let procs =
        rt.vms.iter().map(|v| (v.pid, v.qmp.as_path())).chain([(rt.delay_node.pid, rt.delay_node.control.as_path())]);
    for (pid, own) in procs {
        if pid_alive(pid) && is_ours(pid, own) {
            // SAFETY: plain kill(2) of a process we started (checked above).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    for &pid in &killed {
        for _ in 0..200 {
            if !pid_alive(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = std::fs::remove_file(layout.runtime_file());
    let _ = std::fs::remove_dir_all(layout.run_dir().join("p"));
    let _ = std::fs::remove_file(layout.delay_control());
    Ok(killed.len())
}

/// Whether `pid` is the process this experiment started, by its command
/// line naming `own` — the VM's QMP socket or the delay node's control
/// socket, paths no other process is started with. A recorded pid alone is
/// not enough: after a reboot (or a long time) it may belong to anything,
/// even another QEMU, which `down` must not kill.
pub(crate) fn is_ours(pid: u32, own: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let names = |own: &Path| {
        let own = own.as_os_str().as_encoded_bytes();
        !own.is_empty() && cmdline.split(|&b| b == 0).any(|arg| arg.windows(own.len()).any(|w| w == own))
    };
    // The record may spell the path otherwise than the command line did
    // (relative, through a symlink): try its canonical form too.
    names(own)
        || own.parent().and_then(|d| d.canonicalize().ok()).zip(own.file_name()).is_some_and(|(d, f)| names(&d.join(f)))
}

/// Replace whatever runs with the state of `ckpt`, and resume everything at
/// one instant.
// The one-engine work (issue 12) replaces these arguments with the engine's
// round parameters; until then they stay explicit.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    exp_name: &str,
    expected_digest: Option<&str>,
    ckpt: &Checkpoint,
    layout: &Layout,
    tools: &Tools,
    margin_ns: u64,
    branch: Option<&str>,
    obs: &dyn Observer,
) -> Result<(Runtime, RestoreSummary), UpError> {
    let m = &ckpt.manifest;
    if m.experiment.name != exp_name || expected_digest.is_some_and(|d| d != m.experiment.digest) {
        return Err(UpError::ForeignCheckpoint {
            checkpoint: ckpt.info.id.clone(),
            found: m.experiment.name.clone(),
            found_digest: m.experiment.digest.clone(),
            expected: exp_name.to_string(),
            expected_digest: expected_digest.unwrap_or("-").to_string(),
        });
    }
    let exp = Experiment::from_toml_str(&m.experiment.spec_toml, None)?;
    for c in std::iter::once("delay-node".to_string()).chain(exp.nodes.iter().map(|n| format!("vm-{}", n.name))) {
        if !m.components.iter().any(|r| r.file == c) {
            return Err(UpError::IncompleteCheckpoint { checkpoint: ckpt.info.id.clone(), component: c });
        }
    }
    let mut specs = exp.nodes.iter().map(|n| vm_spec(&exp, n, layout, tools)).collect::<Result<Vec<_>, _>>()?;
    // Each VM's state loads only into the machine type it was saved from:
    // pinned, and checked against this QEMU before anything is stopped.
    let machines = versioned::read_opt::<crate::history::Machines>(&ckpt.file(crate::history::MACHINES_FILE))
        .map_err(|source| UpError::MachineRecord { checkpoint: ckpt.info.id.clone(), source })?
        .unwrap_or_default();
    for spec in &mut specs {
        if let Some(m) = machines.0.get(&spec.name) {
            stasis_qemu::machine::check(&stasis_qemu::vm::qemu_binary(), m).map_err(|source| UpError::Machine {
                checkpoint: ckpt.info.id.clone(),
                node: spec.name.clone(),
                source,
            })?;
            spec.machine = Some(m.clone());
        }
    }
    // Disks: the checkpoint's frozen image of each node with a disk.
    let has_disk = |n: &Node| n.disk_bytes.is_some() || n.image.is_some();
    let frozen: std::collections::BTreeMap<String, PathBuf> = if exp.nodes.iter().any(has_disk) {
        let path = ckpt.file(DISKS_FILE);
        versioned::read::<crate::history::FrozenDisks>(&path)
            .map_err(|e| UpError::MissingDisk {
                checkpoint: ckpt.info.id.clone(),
                node: "*".into(),
                reason: e.to_string(),
            })?
            .0
    } else {
        Default::default()
    };
    // Root disks read every cluster the guest never wrote from the base
    // image: it must be the one checkpointed, checked before anything stops.
    let mut bases = Vec::new();
    if exp.nodes.iter().any(|n| n.image.is_some()) {
        let recorded = versioned::read::<crate::rootdisk::Bases>(&ckpt.file(crate::rootdisk::BASES_FILE))
            .map_err(|source| UpError::BaseRecord { checkpoint: ckpt.info.id.clone(), source })?;
        let cache = crate::rootdisk::cache_path(layout);
        for node in &exp.nodes {
            let Some(image) = &node.image else {
                bases.push(None);
                continue;
            };
            let now = crate::rootdisk::identity(&node.name, &abs_path(image), &cache)?;
            let was = recorded.0.get(&node.name).ok_or_else(|| UpError::MissingDisk {
                checkpoint: ckpt.info.id.clone(),
                node: node.name.clone(),
                reason: format!("no base image in {}", crate::rootdisk::BASES_FILE),
            })?;
            crate::rootdisk::check(&node.name, was, &now)?;
            bases.push(Some(now));
        }
    }
    // stasis-store: every chunk is read and verified once, here, into real
    // files for QEMU and the delay node, before anything running is stopped.
    let started = mono_ns();
    let restore_dir = layout.root().join("restore");
    let materialized = ckpt.materialized(&restore_dir)?;
    obs.event(&Event::Restoring { checkpoint: ckpt.info.id.clone() });
    let _ = down(layout).await;
    // Each disk restarts on a fresh overlay over the frozen image, which
    // stays read-only: any number of restores and branches share it.
    for (spec, node) in specs.iter_mut().zip(&exp.nodes) {
        if node.image.is_some() {
            spec.seed = Some(crate::rootdisk::write_seed(&exp, node, layout)?);
        }
        if !has_disk(node) {
            continue;
        }
        let missing =
            |reason: String| UpError::MissingDisk { checkpoint: ckpt.info.id.clone(), node: node.name.clone(), reason };
        let image = frozen.get(&node.name).ok_or_else(|| missing("not in disks.json".into()))?;
        if !image.exists() {
            return Err(missing(format!("{} is gone", image.display())));
        }
        let dir = disk_dir(layout, &node.name);
        stasis_core::private::create_dir_all(&dir).map_err(io(&dir))?;
        let top = next_overlay(&dir);
        stasis_qemu::disk::create_overlay(&top, image)
            .map_err(|source| UpError::Disk { node: node.name.clone(), source })?;
        spec.disk = Some(top);
    }
    let incarnation = next_incarnation(layout)?;
    let (mut rt, mut vms) = launch_all(&exp, layout, tools, &specs, incarnation, Some(&materialized), obs).await?;
    if !bases.is_empty() {
        for (proc, base) in rt.vms.iter_mut().zip(bases) {
            proc.base = base;
        }
    }
    // The timeline continues the named branch, or the checkpoint's own.
    rt.branch = Some(branch.map(str::to_owned).unwrap_or_else(|| lineage_of(ckpt).branch));
    rt.head = Some(ckpt.info.id.clone());
    rt.store(layout)?;
    for (node, vm) in &mut vms {
        vm.wait_incoming(Duration::from_secs(120))
            .await
            .map_err(|source| UpError::Incoming { node: node.clone(), source })?;
    }
    let mut delay = DelayClient::connect(&rt.delay_node.control).await?;
    let at = mono_ns() + margin_ns;
    // As at a checkpoint's resume: each `cont` written by its own armed
    // thread, the lead early, QEMU's control threads boosted. Every ns of
    // resume skew here is skew between the restored guests' clocks.
    let lead = resume_lead_ns();
    let armed = std::env::var("STASIS_RESUME_ARMED").map(|v| v != "0").unwrap_or(true);
    let boost = std::env::var("STASIS_RESUME_BOOST").map(|v| v != "0").unwrap_or(true);
    let pids: Vec<(String, u32)> = vms.iter().map(|(n, vm)| (n.clone(), vm.pid)).collect();
    let boosts = if boost { boost_all(&pids) } else { Vec::new() };
    let vm_futs = vms.iter_mut().map(|(node, vm)| async move { (node.clone(), cont_vm_at(vm, at, lead, armed).await) });
    let (results, thaw) = futures::join!(join_all(vm_futs), delay.thaw_at(at));
    drop(boosts);
    let thaw = thaw?;
    let mut resumed = vec![thaw.thawed_at];
    for (node, r) in results {
        let s = r.map_err(|source| UpError::Resume { node: node.clone(), source })?;
        resumed.push(s.instant());
    }
    let skew = resumed.iter().max().unwrap_or(&0) - resumed.iter().min().unwrap_or(&0);
    // Every component has read its state: the reassembled files are not needed.
    if let Err(e) = std::fs::remove_dir_all(&restore_dir) {
        tracing::warn!(dir = %restore_dir.display(), error = %e, "cannot remove the restored state files");
    }
    obs.event(&Event::Restored { checkpoint: ckpt.info.id.clone(), resumed_at: at });
    let summary = RestoreSummary {
        checkpoint: ckpt.info.id.clone(),
        vms: rt.vms.len(),
        restore_ns: mono_ns() - started,
        resume_skew_ns: skew,
    };
    Ok((rt, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that looks like a QEMU (or a delay node) by its command
    /// line; killed when dropped.
    struct Lookalike(std::process::Child);

    impl Lookalike {
        fn start(args: &[&str]) -> Lookalike {
            let child =
                std::process::Command::new("sh").arg("-c").arg("sleep 30; :").args(args).spawn().expect("spawn sh");
            Lookalike(child)
        }
        fn alive(&mut self) -> bool {
            self.0.try_wait().expect("try_wait").is_none()
        }
    }

    impl Drop for Lookalike {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn down_kills_only_processes_that_name_this_experiments_sockets() {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::new(t.path(), "e");
        stasis_core::private::create_dir_all(layout.root()).unwrap();
        let qmp = layout.node_dir("a").join("qmp.sock");
        let other_qmp = t.path().join("elsewhere").join("qmp.sock");
        let ctl = layout.delay_control();
        // Recorded pids now held by a QEMU and a delay node of something else
        // (a reboot, a reused pid), and by this experiment's own VM b.
        let mut foreign_vm =
            Lookalike::start(&["qemu-system-x86_64", "-qmp", &format!("unix:{},server=on", other_qmp.display())]);
        let mut foreign_node = Lookalike::start(&["delay-node", "--control", "/run/other/ctl"]);
        let mut own_vm = Lookalike::start(&[
            "qemu-system-x86_64",
            "-qmp",
            &format!("unix:{},server=on", layout.node_dir("b").join("qmp.sock").display()),
        ]);
        let vm = |name: &str, pid: u32, qmp: PathBuf| VmProc {
            name: name.into(),
            pid,
            qmp,
            serial_log: PathBuf::new(),
            disk: None,
            machine: None,
            base: None,
        };
        let rt = Runtime {
            experiment: "e".into(),
            spec_toml: String::new(),
            spec_digest: String::new(),
            accel: "tcg".into(),
            incarnation: 1,
            restored_from: None,
            delay_node: DelayProc { pid: foreign_node.0.id(), control: ctl },
            vms: vec![vm("a", foreign_vm.0.id(), qmp), vm("b", own_vm.0.id(), layout.node_dir("b").join("qmp.sock"))],
            branch: None,
            head: None,
            runtime_file: None,
        };
        rt.store_at(&layout.runtime_file()).unwrap();
        assert_eq!(down(&layout).await.unwrap(), 1, "only this experiment's VM b");
        for _ in 0..200 {
            if !own_vm.alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!own_vm.alive(), "the process naming b's QMP socket is killed");
        assert!(foreign_vm.alive(), "a QEMU of something else under a recorded pid lives on");
        assert!(foreign_node.alive(), "so does another delay node");
    }

    #[test]
    fn the_experiments_state_is_created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // This test runs under umask 022, which would leave them 0755/0644.
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::new(t.path(), "e");
        assert_eq!(next_incarnation(&layout).unwrap(), 1);
        assert_eq!(mode(layout.root()), 0o700);
        assert_eq!(mode(&layout.root().join("incarnation")), 0o600);
    }

    #[test]
    fn a_clock_anchor_places_the_next_freeze_and_belongs_to_one_incarnation() {
        let a = ClockAnchor { incarnation: 2, resumed_ns: 1_000, virtual_ns: 5_000 };
        assert_eq!(a.freeze_instant(5_500), Some(1_500));
        assert_eq!(a.freeze_instant(4_000), None, "a virtual clock that went back is not believed");
        let dir = tempfile::tempdir().unwrap();
        let proc = VmProc {
            name: "a".into(),
            pid: 1,
            qmp: dir.path().join("qmp.sock"),
            serial_log: dir.path().join("s.log"),
            disk: None,
            machine: None,
            base: None,
        };
        assert!(ClockAnchor::load(&proc, 2).is_none());
        ClockAnchor::store(&proc, 2, Some((7, 9)));
        let l = ClockAnchor::load(&proc, 2).unwrap();
        assert_eq!((l.resumed_ns, l.virtual_ns), (7, 9));
        assert!(ClockAnchor::load(&proc, 3).is_none(), "a restored VM (next incarnation) starts without");
        ClockAnchor::store(&proc, 2, None);
        assert!(ClockAnchor::load(&proc, 2).is_none());
        ClockAnchor::store(&proc, 2, None); // forgetting twice is fine
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
