//! One QEMU virtual machine: its command line, its daemonized process and the
//! operations a checkpoint needs (stop/cont with measured instants, save of a
//! stopped VM's device+RAM state, restore from such a file).
//!
//! QEMU daemonizes, so VMs outlive the process that launched them; a later
//! process takes control with [`Vm::attach`]. Everything QEMU says on stderr,
//! before and after daemonizing, goes to `<run_dir>/qemu.log`.
//!
//! Saving uses `migrate` to an `fd:` the client opened and passed over QMP,
//! not `exec:cat > file`: with `exec:` QEMU reports the migration completed
//! while `cat` may still be draining the pipe, so "completed" would not mean
//! "the file is whole" (see docs/qemu.md). Restoring uses `-S -incoming
//! exec:cat <file>`, where no such race exists.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::accel::Accel;
pub use crate::qmp::Stamp;
use crate::qmp::{Qmp, QmpError};
use stasis_core::clock::MonoNs;

/// Environment variable naming the QEMU binary (default `qemu-system-x86_64`).
pub const ENV_QEMU: &str = "STASIS_QEMU";
/// File names inside a VM's run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
pub const PID_FILE: &str = "qemu.pid";
pub const LOG_FILE: &str = "qemu.log";
/// The guest agent's socket in the run directory (`stasis exec`, `stasis cp`).
pub const AGENT_SOCKET: &str = "ga.sock";
/// The serial console's socket in the run directory (`stasis console`).
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The virtio-serial port name the guest agent (qemu-ga, stasis-ga) opens.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// How long QEMU may take to initialise and daemonize.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a NIC may take to connect to its stream socket after launch.
pub const NIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a save may take. 256 MiB guests take under a second here.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `quit` waits for the process to go before SIGKILL.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Migration bandwidth cap during a save: effectively none (QEMU's default,
/// 32 MiB/s, would make a 256 MiB save take seconds).
pub const SAVE_MAX_BANDWIDTH: u64 = 1 << 40;
/// Longest unix socket path (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The QEMU binary to run.
pub fn qemu_binary() -> String {
    std::env::var(ENV_QEMU).unwrap_or_else(|_| "qemu-system-x86_64".to_owned())
}

/// Where an unpacked QEMU keeps its own modules and firmware: for a binary
/// `DIR/usr/bin/qemu-system-x86_64` (a package unpacked with `dpkg-deb -x`
/// into DIR, as scripts/setup.sh does with the suite's second QEMU, and as
/// users run bookworm-backports' 10.0), `DIR/usr`. Such a QEMU would
/// otherwise load the installed QEMU's modules (7.2 then dies with "could not
/// load module for type 'tcg-accel-ops'") and firmware. `None` for the
/// installed QEMU and any other layout.
pub fn unpacked_prefix(binary: &str) -> Option<PathBuf> {
    let bin = Path::new(binary).parent()?;
    let usr = bin.parent()?;
    if bin.file_name()? != "bin" || usr.file_name()? != "usr" || usr == Path::new("/usr") {
        return None;
    }
    usr.join("share/qemu").is_dir().then(|| usr.to_owned())
}

/// A NIC attached to a unix socket that someone else (the delay node)
/// listens on, as a `-netdev stream` client or a vhost-user frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Netdev id, unique within the VM (e.g. `n0`).
    pub id: String,
    /// `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// The listening socket QEMU connects to.
    pub socket: PathBuf,
    /// How QEMU talks to the socket (`stream` when absent).
    #[serde(default)]
    pub backend: NicBackend,
}

/// The netdev kind of a [`NicSpec`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicBackend {
    /// `-netdev stream`: QEMU moves the frames (and reads ahead of the guest).
    #[default]
    Stream,
    /// `-netdev vhost-user`: the listener is the vhost-user backend and reads
    /// and writes the guest's rings itself; needs shared guest RAM.
    VhostUser,
    /// `-netdev stream` over TCP to a delay node on another host: `socket`
    /// is its `ip:port`.
    StreamTcp,
}

impl NicSpec {
    /// The `ip:port` of a [`NicBackend::StreamTcp`] NIC.
    pub fn tcp_addr(&self) -> Result<std::net::SocketAddr, LaunchError> {
        self.socket.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
            LaunchError::BadPath(format!("NIC {}: {} is not an ip:port address", self.id, self.socket.display()))
        })
    }
}

/// Everything needed to start (or restore) one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub nics: Vec<NicSpec>,
    pub accel: Accel,
    /// Holds the QMP socket, the pidfile and QEMU's log.
    pub run_dir: PathBuf,
    /// The qcow2 image the VM's data disk (virtio-blk, drive id [`DISK_ID`])
    /// writes to: the top of a backing chain (see docs/disks.md). `None`: no disk.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The versioned machine type (`pc-i440fx-10.0`; [`crate::machine`]).
    /// `None`: [`crate::machine::DEFAULT`], whatever this QEMU makes of it.
    #[serde(default)]
    pub machine: Option<String>,
    /// Firmware boot: SeaBIOS runs the bootloader of the disk (an OS
    /// image's root disk, the overlay in `disk`); `kernel`, `initrd` and
    /// `append` are not used. Off: QEMU loads `kernel` itself.
    #[serde(default)]
    pub firmware: bool,
    /// A cloud-init NoCloud seed (a FAT image labelled CIDATA), attached
    /// read-only after the disk (drive id [`SEED_ID`]). `None`: no seed.
    #[serde(default)]
    pub seed: Option<PathBuf>,
}

/// The `-drive` id of a VM's data disk; QMP's `blockdev-snapshot-sync` names it.
pub const DISK_ID: &str = "disk0";

/// The `-drive` id of a VM's cloud-init seed.
pub const SEED_ID: &str = "seed0";

impl VmSpec {
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(QMP_SOCKET)
    }
    pub fn pid_path(&self) -> PathBuf {
        self.run_dir.join(PID_FILE)
    }
    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join(LOG_FILE)
    }
    pub fn agent_path(&self) -> PathBuf {
        self.run_dir.join(AGENT_SOCKET)
    }
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join(CONSOLE_SOCKET)
    }
}

/// The ways into a running guest (docs/exec.md): the serial console on a
/// unix socket that `stasis console` attaches to, with QEMU writing
/// everything the guest prints to `serial_log` whether or not anyone is
/// attached (`logappend=on`: a restored VM continues the same log), and a
/// virtio-serial port named [`AGENT_PORT`] on the unix socket
/// `stasis exec`/`stasis cp` connect to. Both sockets are QEMU servers
/// (`wait=off`: the VM does not wait for a client; a client that goes away
/// leaves the guest running) in the owner-only run directory.
///
/// The virtio-serial controller is a PCI device: part of the device set a
/// checkpoint saves, so it is added on every launch, fresh or restoring.
pub fn guest_access_args(spec: &VmSpec, serial_log: &Path) -> Vec<String> {
    let p = |path: &Path| path.to_string_lossy().into_owned();
    let chardev = |id: &str, path: &Path| format!("socket,id={id},path={},server=on,wait=off", p(path));
    vec![
        "-chardev".into(),
        format!("{},logfile={},logappend=on", chardev("serial0", &spec.console_path()), p(serial_log)),
        "-serial".into(),
        "chardev:serial0".into(),
        "-chardev".into(),
        chardev("ga0", &spec.agent_path()),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-device".into(),
        format!("virtserialport,bus=vser0.0,chardev=ga0,name={AGENT_PORT}"),
    ]
}

/// QEMU's `-sandbox` argument (docs/threat-model.md).
/// `elevateprivileges` and `spawn` cannot be denied while QEMU is started
/// with `-daemonize` (which calls setsid and fork after the filter is in
/// place: QEMU then exits 1 with an empty log) and restores with
/// `-incoming exec:cat`; a launch without either would deny both.
pub const SANDBOX: &str = "on,obsolete=deny,resourcecontrol=deny";

/// Quote `s` for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The full QEMU argument list (without the binary). The device set, MACs and
/// their order do not depend on `incoming`, which only appends
/// `-S -incoming exec:cat -- <file>`, so a state saved by one launch restores
/// into another.
///
/// Paths are passed as they are: [`Vm::launch`] refuses paths QEMU's option
/// parser would misread (commas, non-UTF-8).
pub fn qemu_args(spec: &VmSpec, serial_log: &Path, incoming: Option<&Path>) -> Vec<String> {
    let p = |path: &Path| path.to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::with_capacity(48);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    // debug-threads: QEMU names its threads (`IO mon_iothread`, `CPU 0/TCG`),
    // so a checkpoint can boost the ones a stop/cont waits for (crate::sched).
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    // A vhost-user backend maps guest RAM: it must be a shared memfd.
    let vhost = spec.nics.iter().any(|n| n.backend == NicBackend::VhostUser);
    let machine = spec.machine.as_deref().unwrap_or(crate::machine::DEFAULT);
    if vhost {
        push(&["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib)]);
        push(&["-machine", &format!("{machine},memory-backend=mem")]);
    } else {
        push(&["-machine", machine]);
    }
    match spec.accel {
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
    }
    push(&["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // Seccomp, as libvirt runs QEMU: a guest that exploits a device model
    // gets no obsolete system calls and cannot change scheduling or resource
    // limits (see SANDBOX for what cannot be denied yet).
    push(&["-sandbox", SANDBOX]);
    // The guest's RTC follows the VM's virtual clock, which stops with the
    // VM, not host time: with clock=host a checkpoint's pause (or the time
    // until a restore) shows up in /sys/class/rtc/rtc0 and hwclock
    // (docs/guest-kmod.md, "RTC").
    push(&["-rtc", "base=utc,clock=vm"]);
    a.extend(boot_args(spec));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    for (i, nic) in spec.nics.iter().enumerate() {
        match nic.backend {
            NicBackend::Stream => {
                push(&[
                    "-netdev",
                    &format!("stream,id={},server=off,addr.type=unix,addr.path={}", nic.id, p(&nic.socket)),
                ]);
                // romfile= : no iPXE option ROM; the guest boots a kernel directly,
                // and skipping the ROM roughly halves boot time under TCG.
                push(&["-device", &format!("virtio-net-pci,netdev={},mac={},romfile=", nic.id, nic.mac)]);
            }
            NicBackend::StreamTcp => {
                let (host, port) = match nic.tcp_addr() {
                    Ok(a) => (a.ip().to_string(), a.port()),
                    // Validated at launch; an unparsable address connects nowhere.
                    Err(_) => (String::new(), 0),
                };
                push(&[
                    "-netdev",
                    &format!("stream,id={},server=off,addr.type=inet,addr.host={host},addr.port={port}", nic.id),
                ]);
                push(&["-device", &format!("virtio-net-pci,netdev={},mac={},romfile=", nic.id, nic.mac)]);
            }
            NicBackend::VhostUser => {
                push(&["-chardev", &format!("socket,id=c{i},path={}", p(&nic.socket))]);
                push(&["-netdev", &format!("vhost-user,id={},chardev=c{i}", nic.id)]);
                // vectors=0 (no MSI-X): QEMU 7.2 segfaults starting vhost under TCG otherwise.
                push(&["-device", &format!("virtio-net-pci,netdev={},mac={},vectors=0,romfile=", nic.id, nic.mac)]);
            }
        }
    }
    // The data disk comes after the NICs, so VMs without one keep the exact
    // device set (and PCI addresses) they had before disks existed. A restore
    // passes a fresh overlay here: the device (id vd0) is what the migration
    // stream names, the image file may differ.
    a.extend(disk_args(spec));
    a.extend(seed_args(spec));
    a.extend(guest_access_args(spec, serial_log));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    // After an incoming migration QEMU announces each NIC (RARP frames, or a
    // guest gratuitous ARP) when the VM starts: a visible trace of a restore.
    push(&["-global", "migration.announce-rounds=0"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&spec.qmp_path()))]);
    push(&["-pidfile", &p(&spec.pid_path())]);
    // With -D, QEMU keeps stderr on this file after daemonizing instead of /dev/null.
    push(&["-D", &p(&spec.log_path())]);
    push(&["-daemonize"]);
    if let Some(state) = incoming {
        push(&["-S", "-incoming", &format!("exec:cat -- {}", shell_quote(&p(state)))]);
    }
    a
}

/// How the VM boots: `-kernel`/`-initrd`/`-append`, or nothing (firmware
/// boot: SeaBIOS finds the disk, which [`disk_args`] marks bootable).
pub fn boot_args(spec: &VmSpec) -> Vec<String> {
    if spec.firmware {
        return Vec::new();
    }
    let p = |path: &Path| path.to_string_lossy().into_owned();
    vec!["-kernel".into(), p(&spec.kernel), "-initrd".into(), p(&spec.initrd), "-append".into(), spec.append.clone()]
}

/// The VM's disk (a data disk, or an OS image's root disk): the qcow2 at the
/// top of its backing chain, which ends at the user's image for a root disk
/// (QEMU opens every backing image read-only). A firmware-booted VM boots
/// from it (`bootindex=0`).
pub fn disk_args(spec: &VmSpec) -> Vec<String> {
    let Some(disk) = &spec.disk else { return Vec::new() };
    let boot = if spec.firmware { ",bootindex=0" } else { "" };
    vec![
        "-drive".into(),
        format!("file={},format=qcow2,if=none,id={DISK_ID},cache=writeback", disk.to_string_lossy()),
        "-device".into(),
        format!("virtio-blk-pci,drive={DISK_ID},id=vd0,romfile={boot}"),
    ]
}

/// The cloud-init seed: a raw FAT image, read-only to the guest, after the
/// disk (so VMs without a seed keep their device set).
pub fn seed_args(spec: &VmSpec) -> Vec<String> {
    let Some(seed) = &spec.seed else { return Vec::new() };
    vec![
        "-drive".into(),
        format!("file={},format=raw,if=none,id={SEED_ID},readonly=on", seed.to_string_lossy()),
        "-device".into(),
        format!("virtio-blk-pci,drive={SEED_ID},id=vd1,romfile="),
    ]
}

/// QEMU's run state (`query-status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
    /// Waiting for or loading an incoming migration.
    InMigrate,
    /// A migration (save) completed; `cont` resumes it.
    PostMigrate,
    FinishMigrate,
    Prelaunch,
    Shutdown,
    GuestPanicked,
    InternalError,
    IoError,
    Other(String),
}

impl RunState {
    pub fn from_qmp(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "inmigrate" => RunState::InMigrate,
            "postmigrate" => RunState::PostMigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "prelaunch" => RunState::Prelaunch,
            "shutdown" => RunState::Shutdown,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            other => RunState::Other(other.to_owned()),
        }
    }
    /// The one state a save may start from. Not `PostMigrate`: QEMU 7.2
    /// refuses to migrate "the vm that was paused due to previous migration"
    /// until it has been `cont`inued (and stopped again).
    pub fn is_saveable(&self) -> bool {
        matches!(self, RunState::Paused)
    }
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// From the `migrate` command to QEMU reporting completion.
    pub migrate: Duration,
    /// fsync of the file and its directory.
    pub sync: Duration,
    /// Whole operation.
    pub total: Duration,
    /// How long QEMU says the guest was paused by the save (ms resolution):
    /// meaningful for [`Vm::save_live`]; a stopped save reports its final phase.
    pub downtime: Option<Duration>,
}

/// Whether a background snapshot has begun writing guest RAM, from
/// `query-migrate`: pages are counted (zero pages as `duplicate`, others as
/// `normal`) only from the first iteration on, which QEMU starts after it
/// has saved the device state and write-protected RAM. Its set-up phase
/// writes only the RAM block list.
pub fn bg_ram_started(query_migrate: &Value) -> bool {
    let status = query_migrate.get("status").and_then(Value::as_str);
    let ram = query_migrate.get("ram");
    let pages = |k: &str| ram.and_then(|r| r.get(k)).and_then(Value::as_u64).unwrap_or(0);
    matches!(status, Some("active" | "completed")) && pages("duplicate") + pages("normal") > 0
}

/// A background snapshot under way ([`Vm::begin_background_save`]).
#[derive(Debug)]
pub struct BackgroundSave {
    path: PathBuf,
    partial: PathBuf,
    file: File,
    t0: Instant,
    t_migrate: Instant,
}

/// Errors of [`Vm::launch`].
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("path not usable on a QEMU command line: {0}")]
    BadPath(String),
    #[error("NIC {id}: stream socket {} {reason}; start the delay node first", path.display())]
    NicSocket { id: String, path: PathBuf, reason: String },
    #[error("a QEMU (pid {pid}) is still running in {}", run_dir.display())]
    AlreadyRunning { pid: u32, run_dir: PathBuf },
    #[error("cannot prepare run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    #[error("QEMU failed to start ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("QEMU did not daemonize within {timeout:?}: {log}")]
    Timeout { timeout: Duration, log: String },
    #[error("bad pidfile {}: {reason}", path.display())]
    Pidfile { path: PathBuf, reason: String },
    #[error("QEMU started but QMP is not usable; log: {log}")]
    Qmp {
        log: String,
        #[source]
        source: QmpError,
    },
    #[error("QEMU exited right after starting: {log}")]
    DiedAfterStart { pid: Option<u32>, log: String },
    #[error("NIC {id} did not connect to {} ({state}); QEMU stopped", path.display())]
    NicNotConnected { id: String, path: PathBuf, state: String },
}

/// Errors of operations on a running [`Vm`].
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("VM must be paused (stopped since it last ran) to save, but it is {0:?}")]
    NotStopped(RunState),
    #[error("VM must be running for a live save, but it is {0:?}")]
    NotRunning(RunState),
    #[error("incoming migration not finished yet; call wait_incoming first")]
    IncomingPending,
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU (pid {pid}) is gone; log: {log}")]
    Dead { pid: u32, log: String },
}

/// A running (daemonized) QEMU and a QMP session to it.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub pid: u32,
    pub qmp_path: PathBuf,
    /// QEMU's log (stderr before and after daemonizing).
    pub log_path: PathBuf,
    /// The versioned machine type it was launched with (None: attached to,
    /// not launched by, this process).
    pub machine: Option<String>,
    qmp: Qmp,
    /// Launched with `incoming` and [`Vm::wait_incoming`] has not yet seen it finish.
    incoming_pending: bool,
    /// [`Vm::prepare_background_save`] ran and no background save used it yet.
    background_prepared: bool,
}

/// The spec and paths with every relative path made absolute (against the
/// current directory; symlinks are left alone).
pub fn absolutize(
    spec: &VmSpec,
    serial_log: &Path,
    incoming: Option<&Path>,
) -> Result<(VmSpec, PathBuf, Option<PathBuf>), LaunchError> {
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|e| LaunchError::BadPath(format!("cannot make {} absolute: {e}", p.display())))
    };
    let mut s = spec.clone();
    s.kernel = abs(&spec.kernel)?;
    s.initrd = abs(&spec.initrd)?;
    s.run_dir = abs(&spec.run_dir)?;
    for nic in s.nics.iter_mut().filter(|n| n.backend != NicBackend::StreamTcp) {
        nic.socket = abs(&nic.socket)?;
    }
    if let Some(d) = &spec.disk {
        s.disk = Some(abs(d)?);
    }
    if let Some(d) = &spec.seed {
        s.seed = Some(abs(d)?);
    }
    Ok((s, abs(serial_log)?, incoming.map(abs).transpose()?))
}

fn validate_path(what: &str, path: &Path) -> Result<(), LaunchError> {
    let Some(s) = path.to_str() else {
        return Err(LaunchError::BadPath(format!("{what} {} is not UTF-8", path.display())));
    };
    if s.contains(',') {
        return Err(LaunchError::BadPath(format!("{what} {s} contains a comma")));
    }
    Ok(())
}

fn validate_socket_path(what: &str, path: &Path) -> Result<(), LaunchError> {
    validate_path(what, path)?;
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(LaunchError::BadPath(format!(
            "{what} {} is longer than {MAX_SOCKET_PATH} bytes (unix socket limit)",
            path.display()
        )));
    }
    Ok(())
}

/// The last 4 KiB of QEMU's log (which QEMU truncates at each launch).
fn log_tail(path: &Path) -> String {
    const TAIL: u64 = 4096;
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(TAIL);
        f.seek(SeekFrom::Start(start))?;
        let mut s = String::new();
        f.take(TAIL).read_to_string(&mut s)?;
        Ok(s.trim().to_owned())
    };
    match read() {
        Ok(s) if s.is_empty() => "(QEMU log empty)".to_owned(),
        Ok(s) => s,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `pid` is a live (non-zombie) process whose command line mentions `needle`.
fn process_matches(pid: u32, needle: &str) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    // A zombie's cmdline is empty, so it does not match.
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => {
            let cmdline = String::from_utf8_lossy(&raw);
            cmdline.contains("qemu") && cmdline.contains(needle)
        }
        Err(_) => false,
    }
}

impl Vm {
    /// Start QEMU daemonized and connect to its QMP socket. Returns once QEMU
    /// has initialised, written its pidfile, answers QMP and every NIC is
    /// connected to its socket (a vhost-user netdev connects and negotiates
    /// during QEMU's start-up, before it daemonizes). QEMU's own error text is
    /// in the error.
    ///
    /// Relative paths are made absolute first: the daemon changes its working
    /// directory to `/`.
    pub async fn launch(spec: &VmSpec, serial_log: &Path, incoming: Option<&Path>) -> Result<Vm, LaunchError> {
        let (mut spec, serial_log, incoming) = absolutize(spec, serial_log, incoming)?;
        // The machine type a state saved from this VM will need: the versioned
        // one `pc` stands for on this QEMU, or the one the caller pinned (a
        // restore), refused here if this QEMU does not offer it.
        let binary = qemu_binary();
        let machine = match &spec.machine {
            None => crate::machine::resolve(&binary, crate::machine::DEFAULT)?,
            Some(m) => {
                crate::machine::check(&binary, m)?;
                m.clone()
            }
        };
        spec.machine = Some(machine.clone());
        let (spec, serial_log, incoming) = (&spec, serial_log.as_path(), incoming.as_deref());
        let qmp_path = spec.qmp_path();
        validate_socket_path("QMP socket", &qmp_path)?;
        validate_socket_path("guest agent socket", &spec.agent_path())?;
        validate_socket_path("console socket", &spec.console_path())?;
        if !spec.firmware {
            for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
                validate_path(what, path)?;
            }
        }
        validate_path("serial log", serial_log)?;
        validate_path("run directory", &spec.run_dir)?;
        if let Some(disk) = &spec.disk {
            validate_path("disk", disk)?;
        }
        if let Some(seed) = &spec.seed {
            validate_path("seed", seed)?;
        }
        if let Some(state) = incoming {
            validate_path("state file", state)?;
        }
        for nic in &spec.nics {
            if nic.backend == NicBackend::StreamTcp {
                // Connected (or refused) by QEMU at start; check_nics reports it.
                nic.tcp_addr()?;
                continue;
            }
            validate_socket_path(&format!("NIC {} socket", nic.id), &nic.socket)?;
            // QEMU 7.2 connects once at start-up and never retries, so a
            // missing listener would leave the NIC dead without any error.
            let reason = match std::fs::metadata(&nic.socket) {
                Ok(m) if m.file_type().is_socket() => None,
                Ok(_) => Some("is not a socket".to_owned()),
                Err(e) => Some(format!("is not there ({e})")),
            };
            if let Some(reason) = reason {
                return Err(LaunchError::NicSocket { id: nic.id.clone(), path: nic.socket.clone(), reason });
            }
        }

        // Never pull the sockets from under a QEMU still using this run directory.
        if let Ok(pid) = read_pidfile(&spec.pid_path()) {
            if process_matches(pid, &qmp_path.to_string_lossy()) {
                return Err(LaunchError::AlreadyRunning { pid, run_dir: spec.run_dir.clone() });
            }
        }
        let run_dir_err = |source| LaunchError::RunDir { path: spec.run_dir.clone(), source };
        stasis_core::private::create_dir_all(&spec.run_dir).map_err(run_dir_err)?;
        remove_if_exists(&qmp_path).map_err(run_dir_err)?;
        remove_if_exists(&spec.pid_path()).map_err(run_dir_err)?;
        remove_if_exists(&spec.agent_path()).map_err(run_dir_err)?;
        remove_if_exists(&spec.console_path()).map_err(run_dir_err)?;
        // QEMU truncates its -D file when it opens it: keep the previous
        // launch's log (e.g. of the VM a restore replaces) one generation back.
        let log_path = spec.log_path();
        if log_path.exists() {
            std::fs::rename(&log_path, log_path.with_extension("log.1")).map_err(run_dir_err)?;
        }
        let log = stasis_core::private::open_append(&log_path).map_err(run_dir_err)?;

        let mut args = qemu_args(spec, serial_log, incoming);
        let mut command = tokio::process::Command::new(&binary);
        if let Some(usr) = unpacked_prefix(&binary) {
            command.env("QEMU_MODULE_DIR", usr.join("lib/x86_64-linux-gnu/qemu"));
            args.splice(0..0, ["-L".to_owned(), usr.join("share/qemu").to_string_lossy().into_owned()]);
        }
        tracing::info!(vm = %spec.name, %binary, ?args, "launching QEMU");
        let stderr = log.try_clone().map_err(run_dir_err)?;
        let mut parent = command
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|source| LaunchError::Spawn { binary: binary.clone(), source })?;
        // The first QEMU process exits once the daemon has initialised (0) or failed (non-zero).
        let status = match tokio::time::timeout(LAUNCH_TIMEOUT, parent.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => return Err(LaunchError::Spawn { binary, source }),
            Err(_) => {
                let _ = parent.start_kill();
                if let Ok(pid) = read_pidfile(&spec.pid_path()) {
                    kill_pid(pid);
                }
                return Err(LaunchError::Timeout { timeout: LAUNCH_TIMEOUT, log: log_tail(&log_path) });
            }
        };
        if !status.success() {
            return Err(LaunchError::Exited { status: status.to_string(), log: log_tail(&log_path) });
        }
        let pid = match read_pidfile(&spec.pid_path()) {
            Ok(pid) => pid,
            // QEMU removes its pidfile when it exits: it died right after
            // daemonizing (e.g. a state file it cannot load).
            Err(_) if !spec.pid_path().exists() => {
                return Err(LaunchError::DiedAfterStart { pid: None, log: log_tail(&log_path) });
            }
            Err(e) => return Err(e),
        };
        // QEMU made its sockets with our umask; the run directory (0700)
        // already keeps them private, owner-only modes say so twice.
        for path in [spec.agent_path(), spec.console_path()] {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(stasis_core::private::FILE_MODE));
        }
        let qmp = match Qmp::connect(&qmp_path).await {
            Ok(q) => q,
            Err(source) => {
                let needle = qmp_path.to_string_lossy();
                // Give a dying QEMU a moment, so the error says "exited" rather than "reset".
                for _ in 0..50 {
                    if !process_matches(pid, &needle) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !process_matches(pid, &needle) {
                    return Err(LaunchError::DiedAfterStart { pid: Some(pid), log: log_tail(&log_path) });
                }
                kill_pid(pid);
                return Err(LaunchError::Qmp { log: log_tail(&log_path), source });
            }
        };
        let mut vm = Vm {
            name: spec.name.clone(),
            pid,
            qmp_path,
            log_path,
            machine: Some(machine),
            qmp,
            incoming_pending: incoming.is_some(),
            background_prepared: false,
        };
        if let Err(e) = vm.check_nics(spec).await {
            vm.kill();
            return Err(e);
        }
        tracing::info!(vm = %vm.name, pid, "QEMU running");
        Ok(vm)
    }

    /// Wait until every NIC left the "connecting" state; fail on a connection error.
    async fn check_nics(&mut self, spec: &VmSpec) -> Result<(), LaunchError> {
        if spec.nics.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + NIC_CONNECT_TIMEOUT;
        loop {
            let info = match self.nic_states().await {
                Ok(i) => i,
                Err(e) => return Err(LaunchError::Qmp { log: log_tail(&self.log_path), source: e }),
            };
            let mut pending = None;
            for nic in &spec.nics {
                let state = info
                    .iter()
                    .find(|(id, _)| id == &nic.id)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_else(|| "absent".to_owned());
                let connected = match nic.backend {
                    NicBackend::Stream => state.contains(&format!("unix:{}", nic.socket.display())),
                    // `type=stream,tcp:<ip>:<port>` once connected.
                    NicBackend::StreamTcp => state.contains(&format!("tcp:{}", nic.socket.display())),
                    // `type=vhost-user,…`: QEMU only gets this
                    // far once the backend answered.
                    NicBackend::VhostUser => state.starts_with("type=vhost-user") && !state.contains("error"),
                };
                if connected {
                    continue;
                }
                if state.contains("error") || state == "absent" || Instant::now() > deadline {
                    return Err(LaunchError::NicNotConnected { id: nic.id.clone(), path: nic.socket.clone(), state });
                }
                pending = Some(nic.id.clone());
            }
            if pending.is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Each netdev's id and QEMU's description of it (`info network`), e.g.
    /// `("n0", "type=stream,unix:/run/x.sock")` or `("n0", "type=stream,connection error")`.
    pub async fn nic_states(&mut self) -> Result<Vec<(String, String)>, QmpError> {
        let out = self.qmp.execute("human-monitor-command", Some(json!({"command-line": "info network"}))).await?;
        let text = out.as_str().unwrap_or("");
        Ok(text
            .lines()
            .filter_map(|l| {
                let l = l.trim().trim_start_matches('\\').trim();
                let (id, rest) = l.split_once(": ")?;
                let rest = rest.split_once(',').map_or(rest, |(_, r)| r);
                rest.starts_with("type=").then(|| (id.to_owned(), rest.to_owned()))
            })
            .collect())
    }

    /// Take control of a VM another process launched. Only one QMP client at
    /// a time: the launching process must have dropped its [`Vm`].
    pub async fn attach(name: &str, qmp_path: &Path, pid: u32) -> Result<Vm, QmpError> {
        let qmp_path = &std::path::absolute(qmp_path).unwrap_or_else(|_| qmp_path.to_owned());
        let qmp = Qmp::connect(qmp_path).await?;
        let log_path = qmp_path.parent().unwrap_or(Path::new(".")).join(LOG_FILE);
        Ok(Vm {
            name: name.to_owned(),
            pid,
            qmp_path: qmp_path.to_owned(),
            log_path,
            machine: None,
            qmp,
            incoming_pending: false,
            background_prepared: false,
        })
    }

    /// The QMP session, for commands this type does not wrap.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Stop the vCPUs. QEMU has stopped them when it replies, so the stop
    /// instant lies within the returned stamp.
    pub async fn stop(&mut self) -> Result<Stamp, VmError> {
        let (_, stamp) = self.qmp.execute_timed("stop", None).await?;
        tracing::debug!(vm = %self.name, rtt_us = stamp.round_trip_ns() / 1000, "stopped");
        Ok(stamp)
    }

    /// Resume the vCPUs (from paused, after a save, or after a restore).
    pub async fn cont(&mut self) -> Result<Stamp, VmError> {
        // In "inmigrate" QEMU accepts cont but only starts after loading, so
        // the stamp would lie.
        if self.incoming_pending {
            return Err(VmError::IncomingPending);
        }
        let (_, stamp) = self.qmp.execute_timed("cont", None).await?;
        tracing::debug!(vm = %self.name, rtt_us = stamp.round_trip_ns() / 1000, "continued");
        Ok(stamp)
    }

    /// [`stop`](Self::stop), with the command written at the host monotonic
    /// instant `send_at` by a thread of its own ([`Qmp::execute_at`]).
    pub async fn stop_at(&mut self, send_at: MonoNs) -> Result<Stamp, VmError> {
        let (_, stamp) = self.qmp.execute_at("stop", None, send_at).await?;
        tracing::debug!(vm = %self.name, rtt_us = stamp.round_trip_ns() / 1000, "stopped");
        Ok(stamp)
    }

    /// [`cont`](Self::cont), with the command written at the host monotonic
    /// instant `send_at` by a thread of its own ([`Qmp::execute_at`]), so
    /// that several VMs each resume at their own instant.
    pub async fn cont_at(&mut self, send_at: MonoNs) -> Result<Stamp, VmError> {
        if self.incoming_pending {
            return Err(VmError::IncomingPending);
        }
        let (_, stamp) = self.qmp.execute_at("cont", None, send_at).await?;
        tracing::debug!(vm = %self.name, rtt_us = stamp.round_trip_ns() / 1000, "continued");
        Ok(stamp)
    }

    /// Switch the data disk of a STOPPED VM to a new qcow2 overlay `overlay`
    /// (created by QEMU, backing = the current image): from now on the guest
    /// writes there and the previous image is never written again, so it is
    /// the disk as of this instant. QEMU flushes the old image first; a
    /// stopped VM has no request in flight (`stop` drains them).
    pub async fn snapshot_disk(&mut self, overlay: &Path) -> Result<(), VmError> {
        let state = self.status().await?;
        if !state.is_saveable() {
            return Err(VmError::NotStopped(state));
        }
        let overlay = std::path::absolute(overlay)
            .map_err(|source| VmError::Io { what: format!("{}", overlay.display()), source })?;
        self.qmp
            .execute(
                "blockdev-snapshot-sync",
                Some(json!({"device": DISK_ID, "snapshot-file": overlay.to_string_lossy(), "format": "qcow2", "mode": "absolute-paths"})),
            )
            .await?;
        tracing::info!(vm = %self.name, overlay = %overlay.display(), "disk switched to a new overlay");
        Ok(())
    }

    /// `query-status`.
    pub async fn status(&mut self) -> Result<RunState, VmError> {
        let v = self.qmp.execute("query-status", None).await?;
        let s = v
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {v}")))?;
        Ok(RunState::from_qmp(s))
    }

    /// Save the device and RAM state of a stopped VM to `path`, durably:
    /// written to `<path>.partial`, fsynced, renamed, directory fsynced. A VM
    /// that is not `Paused` (running, or `PostMigrate` right after a previous
    /// save) is refused with [`VmError::NotStopped`]. The VM is left
    /// stopped either way (`postmigrate` after success); the caller resumes it.
    pub async fn save(&mut self, path: &Path) -> Result<SaveReport, VmError> {
        let t0 = Instant::now();
        let state = self.status().await?;
        if !state.is_saveable() {
            return Err(VmError::NotStopped(state));
        }
        self.save_checked(path, false, t0).await
    }

    /// Save the state of a RUNNING VM without stopping it for the whole save:
    /// QEMU's background snapshot (capability `background-snapshot`) pauses
    /// the VM only to save device state, then write-protects guest RAM and
    /// writes it out while the guest runs; the file holds the guest as it was
    /// at the start. The VM keeps running. Refused unless `Running`
    /// ([`VmError::NotRunning`]). Not safe with a vhost-user backend writing
    /// guest memory (see DESIGN.md).
    pub async fn save_live(&mut self, path: &Path) -> Result<SaveReport, VmError> {
        let t0 = Instant::now();
        let state = self.status().await?;
        if state != RunState::Running {
            return Err(VmError::NotRunning(state));
        }
        self.save_checked(path, true, t0).await
    }

    async fn save_checked(&mut self, path: &Path, live: bool, t0: Instant) -> Result<SaveReport, VmError> {
        let partial = partial_path(path);
        let result = self.save_into(path, &partial, live, t0).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    async fn save_into(&mut self, path: &Path, partial: &Path, live: bool, t0: Instant) -> Result<SaveReport, VmError> {
        let io_err = |what: String| move |source| VmError::Io { what, source };
        self.qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": SAVE_MAX_BANDWIDTH}))).await?;
        // Set either way: the capability persists across migrations.
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "background-snapshot", "state": live}]})),
            )
            .await?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Guest memory: the owner's only, never through a planted link.
            .mode(stasis_core::private::FILE_MODE)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(partial)
            .map_err(io_err(format!("cannot create {}", partial.display())))?;
        const FDNAME: &str = "stasis-save";
        self.qmp.execute_with_fd("getfd", Some(json!({"fdname": FDNAME})), file.as_raw_fd()).await?;
        let t_migrate = Instant::now();
        if let Err(e) = self.qmp.execute("migrate", Some(json!({"uri": format!("fd:{FDNAME}")}))).await {
            let _ = self.qmp.execute("closefd", Some(json!({"fdname": FDNAME}))).await;
            return Err(e.into());
        }
        let info = self.wait_migration(SAVE_TIMEOUT).await?;
        let migrate = t_migrate.elapsed();
        let downtime = info.get("downtime").and_then(Value::as_u64).map(Duration::from_millis);

        let t_sync = Instant::now();
        file.sync_all().map_err(io_err(format!("fsync {}", partial.display())))?;
        let bytes = file.metadata().map_err(io_err(format!("stat {}", partial.display())))?.len();
        drop(file);
        std::fs::rename(partial, path).map_err(io_err(format!("rename to {}", path.display())))?;
        sync_parent_dir(path).map_err(io_err(format!("fsync directory of {}", path.display())))?;
        let report =
            SaveReport { path: path.to_owned(), bytes, migrate, sync: t_sync.elapsed(), total: t0.elapsed(), downtime };
        tracing::info!(vm = %self.name, bytes, ms = report.total.as_millis() as u64, "state saved");
        Ok(report)
    }

    /// Start a background snapshot of a STOPPED (or running) VM into `path`
    /// and return at once: QEMU's migration thread saves the device state
    /// (the guest as it is now), write-protects guest RAM and then RESUMES
    /// THE VM ITSELF (QEMU 7.2 starts it whatever its state was), writing
    /// RAM while the guest runs. Watch the resume with
    /// [`wait_resumed`](Self::wait_resumed), then make the file whole with
    /// [`finish_background_save`](Self::finish_background_save). Not safe
    /// with a vhost-user backend writing guest memory (see DESIGN.md).
    pub async fn begin_background_save(&mut self, path: &Path) -> Result<BackgroundSave, VmError> {
        let t0 = Instant::now();
        let partial = partial_path(path);
        let r = self.begin_background_into(&partial).await;
        match r {
            Ok(file) => Ok(BackgroundSave { path: path.to_owned(), partial, file, t0, t_migrate: Instant::now() }),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Set the migration parameters and the `background-snapshot`
    /// capability ahead of [`begin_background_save`](Self::begin_background_save),
    /// so that the guest, once stopped, waits for as few QMP round trips as
    /// possible. Harmless if no save follows: a stop-and-copy save sets the
    /// capability again.
    pub async fn prepare_background_save(&mut self) -> Result<(), VmError> {
        self.qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": SAVE_MAX_BANDWIDTH}))).await?;
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "background-snapshot", "state": true}]})),
            )
            .await?;
        self.background_prepared = true;
        Ok(())
    }

    async fn begin_background_into(&mut self, partial: &Path) -> Result<File, VmError> {
        if !std::mem::take(&mut self.background_prepared) {
            self.prepare_background_save().await?;
            self.background_prepared = false;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Guest memory: the owner's only, never through a planted link.
            .mode(stasis_core::private::FILE_MODE)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(partial)
            .map_err(|source| VmError::Io { what: format!("cannot create {}", partial.display()), source })?;
        const FDNAME: &str = "stasis-bg-save";
        self.qmp.execute_with_fd("getfd", Some(json!({"fdname": FDNAME})), file.as_raw_fd()).await?;
        if let Err(e) = self.qmp.execute("migrate", Some(json!({"uri": format!("fd:{FDNAME}")}))).await {
            let _ = self.qmp.execute("closefd", Some(json!({"fdname": FDNAME}))).await;
            return Err(e.into());
        }
        Ok(file)
    }

    /// After [`begin_background_save`](Self::begin_background_save): wait
    /// until the guest runs again with its device state saved and its RAM
    /// write-protected. Fails if the snapshot failed first (the VM is then
    /// left as it was: the caller resumes it).
    ///
    /// QEMU 7.2 resumes the guest itself once it has saved the device state
    /// (`vm_start()` in its snapshot thread, whatever the state before).
    /// Newer QEMUs (8.2 on: `vm_resume(vm_old_state)`) return it to the
    /// state it had, so a guest that stasis stopped stays stopped; then
    /// stasis resumes it, but only once RAM pages are being written
    /// ([`bg_ram_started`]): QEMU saves the device state and starts the
    /// write protection before its first page, all under its big lock, so a
    /// `cont` before that could let the guest run before the device state
    /// is taken and tear the snapshot.
    pub async fn wait_resumed(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().await? == RunState::Running {
                return Ok(());
            }
            let info = self.qmp.execute("query-migrate", None).await?;
            if let Some("failed" | "cancelled") = info.get("status").and_then(Value::as_str) {
                let desc = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                return Err(VmError::Migration(desc.to_owned()));
            }
            if bg_ram_started(&info) {
                self.cont().await?;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    what: "QEMU to resume the guest during its background snapshot".into(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    /// Wait for a background snapshot to complete and make its file durable
    /// (fsync, rename, directory fsync). On failure the partial file is removed.
    pub async fn finish_background_save(&mut self, bg: BackgroundSave) -> Result<SaveReport, VmError> {
        let BackgroundSave { path, partial, file, t0, t_migrate } = bg;
        let r = async {
            let info = self.wait_migration(SAVE_TIMEOUT).await?;
            let migrate = t_migrate.elapsed();
            let downtime = info.get("downtime").and_then(Value::as_u64).map(Duration::from_millis);
            let t_sync = Instant::now();
            let io_err = |what: String| move |source| VmError::Io { what, source };
            file.sync_all().map_err(io_err(format!("fsync {}", partial.display())))?;
            let bytes = file.metadata().map_err(io_err(format!("stat {}", partial.display())))?.len();
            std::fs::rename(&partial, &path).map_err(io_err(format!("rename to {}", path.display())))?;
            sync_parent_dir(&path).map_err(io_err(format!("fsync directory of {}", path.display())))?;
            Ok(SaveReport { path: path.clone(), bytes, migrate, sync: t_sync.elapsed(), total: t0.elapsed(), downtime })
        }
        .await;
        // Leave the capability off for later stop-and-copy saves.
        let _ = self
            .qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "background-snapshot", "state": false}]})),
            )
            .await;
        if r.is_err() {
            let _ = std::fs::remove_file(&partial);
        } else {
            tracing::info!(vm = %self.name, ms = t0.elapsed().as_millis() as u64, "background snapshot saved");
        }
        r
    }

    /// Poll `query-migrate` until the outgoing migration ends; returns QEMU's
    /// final report (`total-time`, `downtime`, `ram` …).
    async fn wait_migration(&mut self, timeout: Duration) -> Result<Value, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str).unwrap_or("none") {
                "completed" => return Ok(info),
                "failed" | "cancelled" => {
                    let desc = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(VmError::Migration(desc.to_owned()));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = self.qmp.execute("migrate_cancel", None).await;
                return Err(VmError::Timeout { what: "the save to complete".into(), timeout });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// After a launch with `incoming`, wait until the state is loaded and the
    /// VM is paused, ready for [`cont`](Self::cont).
    pub async fn wait_incoming(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return Err(self.dead());
            }
            let state = match self.status().await {
                Ok(s) => s,
                // QEMU exits when loading fails; the socket closes under us.
                Err(VmError::Qmp(QmpError::Closed | QmpError::Io(_))) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Err(self.dead());
                }
                Err(e) => return Err(e),
            };
            match state {
                RunState::InMigrate => {}
                RunState::Paused | RunState::Running => {
                    self.incoming_pending = false;
                    return Ok(());
                }
                other => return Err(VmError::Migration(format!("incoming migration ended in state {other:?}"))),
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout { what: "the incoming migration".into(), timeout });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn dead(&self) -> VmError {
        VmError::Dead { pid: self.pid, log: log_tail(&self.log_path) }
    }

    /// The process exists, is not a zombie, and is the QEMU serving our QMP socket.
    pub fn is_alive(&self) -> bool {
        if process_matches(self.pid, &self.qmp_path.to_string_lossy()) {
            return true;
        }
        // attach() may have been given another spelling of the same path.
        let canonical = self
            .qmp_path
            .parent()
            .and_then(|d| d.canonicalize().ok())
            .zip(self.qmp_path.file_name())
            .map(|(d, f)| d.join(f));
        canonical.is_some_and(|c| c != self.qmp_path && process_matches(self.pid, &c.to_string_lossy()))
    }

    /// Ask QEMU to quit; SIGKILL it if still there after [`QUIT_TIMEOUT`].
    pub async fn quit(&mut self) -> Result<(), VmError> {
        match self.qmp.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(QmpError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => {
                self.kill();
                return Err(e.into());
            }
        }
        let deadline = Instant::now() + QUIT_TIMEOUT;
        while self.is_alive() {
            if Instant::now() > deadline {
                tracing::warn!(vm = %self.name, pid = self.pid, "QEMU ignored quit; killing");
                self.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// SIGKILL, if the process is still our QEMU.
    pub fn kill(&self) {
        if self.is_alive() {
            kill_pid(self.pid);
        }
    }
}

fn kill_pid(pid: u32) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a positive pid signals one process; no memory involved.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

fn read_pidfile(path: &Path) -> Result<u32, LaunchError> {
    let bad = |reason: String| LaunchError::Pidfile { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    text.trim().parse::<u32>().map_err(|e| bad(format!("{e}: {:?}", text.trim())))
}

fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unpacked_qemu_is_told_its_own_modules_and_firmware() {
        let t = tempfile::tempdir().unwrap();
        let usr = t.path().join("qemu-10/usr");
        std::fs::create_dir_all(usr.join("share/qemu")).unwrap();
        std::fs::create_dir_all(usr.join("bin")).unwrap();
        let bin = usr.join("bin/qemu-system-x86_64");
        assert_eq!(super::unpacked_prefix(&bin.to_string_lossy()), Some(usr.clone()));
        // The installed QEMU, a bare name, another layout: left alone.
        assert_eq!(super::unpacked_prefix("/usr/bin/qemu-system-x86_64"), None);
        assert_eq!(super::unpacked_prefix("qemu-system-x86_64"), None);
        assert_eq!(super::unpacked_prefix(&t.path().join("qemu-system-x86_64").to_string_lossy()), None);
        std::fs::remove_dir(usr.join("share/qemu")).unwrap();
        assert_eq!(super::unpacked_prefix(&bin.to_string_lossy()), None, "no data directory: not an unpacked package");
    }

    use super::*;

    #[test]
    fn a_background_snapshot_has_begun_its_ram_only_once_pages_are_counted() {
        // Set-up (device state not yet taken): RAM block list written, no pages.
        let setup = json!({"status": "setup", "ram": {"transferred": 1200, "duplicate": 0, "normal": 0}});
        let active_no_pages = json!({"status": "active", "ram": {"transferred": 1200, "duplicate": 0, "normal": 0}});
        let active = json!({"status": "active", "ram": {"transferred": 9000, "duplicate": 17, "normal": 0}});
        let done = json!({"status": "completed", "ram": {"duplicate": 60000, "normal": 5000}});
        let failed = json!({"status": "failed", "ram": {"duplicate": 3, "normal": 1}});
        assert!(!bg_ram_started(&setup));
        assert!(!bg_ram_started(&active_no_pages));
        assert!(!bg_ram_started(&json!({"status": "active"})), "no RAM stats yet");
        assert!(bg_ram_started(&active));
        assert!(bg_ram_started(&done));
        assert!(!bg_ram_started(&failed));
    }

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            name: "node1".into(),
            memory_mib: 256,
            vcpus: 2,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            append: "console=ttyS0 quiet".into(),
            nics: vec![
                NicSpec {
                    id: "n0".into(),
                    mac: "52:54:00:00:00:01".into(),
                    socket: "/run/dn/a.sock".into(),
                    backend: NicBackend::Stream,
                },
                NicSpec {
                    id: "n1".into(),
                    mac: "52:54:00:00:00:02".into(),
                    socket: "/run/dn/b.sock".into(),
                    backend: NicBackend::Stream,
                },
            ],
            accel,
            run_dir: "/run/vm1".into(),
            disk: None,
            machine: None,
            firmware: false,
            seed: None,
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn tcg_and_kvm_cpu_flags() {
        let tcg = qemu_args(&spec(Accel::Tcg), Path::new("/l"), None);
        assert_eq!(value_after(&tcg, "-accel"), ["tcg"]);
        assert_eq!(value_after(&tcg, "-cpu"), ["max"]);
        let kvm = qemu_args(&spec(Accel::Kvm), Path::new("/l"), None);
        assert_eq!(value_after(&kvm, "-accel"), ["kvm"]);
        assert_eq!(value_after(&kvm, "-cpu"), ["host,-arch-capabilities"]);
    }

    #[test]
    fn tcp_nics_connect_to_the_remote_delay_node() {
        let mut s = spec(Accel::Tcg);
        s.nics[1].backend = NicBackend::StreamTcp;
        s.nics[1].socket = "10.77.0.1:7801".into();
        let a = qemu_args(&s, Path::new("/l"), None);
        assert_eq!(
            value_after(&a, "-netdev")[1],
            "stream,id=n1,server=off,addr.type=inet,addr.host=10.77.0.1,addr.port=7801"
        );
        assert!(!a.iter().any(|x| x.contains("memory-backend")), "no shared RAM needed");
        s.nics[1].socket = "/run/dn/b.sock".into();
        assert!(s.nics[1].tcp_addr().unwrap_err().to_string().contains("not an ip:port"));
    }

    #[test]
    fn nics_in_order_with_macs() {
        let a = qemu_args(&spec(Accel::Tcg), Path::new("/l"), None);
        assert_eq!(
            value_after(&a, "-netdev"),
            [
                "stream,id=n0,server=off,addr.type=unix,addr.path=/run/dn/a.sock",
                "stream,id=n1,server=off,addr.type=unix,addr.path=/run/dn/b.sock"
            ]
        );
        assert_eq!(
            value_after(&a, "-device")[..2],
            [
                "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=",
                "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02,romfile="
            ]
        );
    }

    #[test]
    fn vhost_user_nics_share_guest_ram() {
        let mut s = spec(Accel::Tcg);
        s.nics[1].backend = NicBackend::VhostUser;
        let a = qemu_args(&s, Path::new("/l"), None);
        assert_eq!(value_after(&a, "-object"), ["memory-backend-memfd,id=mem,size=256M,share=on"]);
        assert_eq!(value_after(&a, "-machine"), ["pc,memory-backend=mem"]);
        assert_eq!(value_after(&a, "-m"), ["256M"]);
        assert_eq!(
            value_after(&a, "-netdev"),
            ["stream,id=n0,server=off,addr.type=unix,addr.path=/run/dn/a.sock", "vhost-user,id=n1,chardev=c1"]
        );
        assert_eq!(value_after(&a, "-chardev")[0], "socket,id=c1,path=/run/dn/b.sock");
        assert_eq!(value_after(&a, "-device")[1], "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02,vectors=0,romfile=");
        // A restore launches the same devices.
        let restore = qemu_args(&s, Path::new("/l"), Some(Path::new("/ck/x")));
        assert_eq!(&restore[..a.len()], &a[..]);
        // Stream-only VMs keep private RAM.
        let plain = qemu_args(&spec(Accel::Tcg), Path::new("/l"), None);
        assert!(value_after(&plain, "-object").is_empty());
        assert_eq!(value_after(&plain, "-machine"), ["pc"]);
        // A pinned machine type is launched as it is, with or without shared RAM.
        let mut pinned = spec(Accel::Tcg);
        pinned.machine = Some("pc-i440fx-7.2".into());
        assert_eq!(value_after(&qemu_args(&pinned, Path::new("/l"), None), "-machine"), ["pc-i440fx-7.2"]);
        s.machine = Some("pc-i440fx-7.2".into());
        assert_eq!(
            value_after(&qemu_args(&s, Path::new("/l"), None), "-machine"),
            ["pc-i440fx-7.2,memory-backend=mem"]
        );
        let json = serde_json::to_string(&s.nics[1]).unwrap();
        assert!(json.contains(r#""backend":"vhost-user""#), "{json}");
        let old: NicSpec = serde_json::from_str(r#"{"id":"n0","mac":"52:54:00:00:00:01","socket":"/a"}"#).unwrap();
        assert_eq!(old.backend, NicBackend::Stream);
    }

    #[test]
    fn fixed_parts_present() {
        let a = qemu_args(&spec(Accel::Tcg), Path::new("/logs/serial.log"), None);
        for flag in ["-nodefaults", "-no-user-config", "-daemonize"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing");
        }
        assert_eq!(value_after(&a, "-display"), ["none"]);
        assert_eq!(value_after(&a, "-m"), ["256M"]);
        assert_eq!(value_after(&a, "-smp"), ["2"]);
        assert_eq!(value_after(&a, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(value_after(&a, "-initrd"), ["/img/initrd.img"]);
        assert_eq!(value_after(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(value_after(&a, "-qmp"), ["unix:/run/vm1/qmp.sock,server=on,wait=off"]);
        assert_eq!(value_after(&a, "-pidfile"), ["/run/vm1/qemu.pid"]);
        assert_eq!(value_after(&a, "-D"), ["/run/vm1/qemu.log"]);
        assert_eq!(
            value_after(&a, "-chardev"),
            [
                "socket,id=serial0,path=/run/vm1/console.sock,server=on,wait=off,logfile=/logs/serial.log,logappend=on",
                "socket,id=ga0,path=/run/vm1/ga.sock,server=on,wait=off",
            ]
        );
        assert_eq!(value_after(&a, "-serial"), ["chardev:serial0"]);
        assert_eq!(value_after(&a, "-sandbox"), ["on,obsolete=deny,resourcecontrol=deny"]);
        assert_eq!(value_after(&a, "-global"), ["migration.announce-rounds=0"]);
        assert!(!a.iter().any(|x| x == "-S" || x == "-incoming"));
    }

    #[test]
    fn every_launch_has_the_guest_agent_port_and_the_console_socket() {
        let s = spec(Accel::Tcg);
        let up = qemu_args(&s, Path::new("/logs/serial-0.log"), None);
        let devs = value_after(&up, "-device");
        assert_eq!(
            devs[devs.len() - 2..],
            ["virtio-serial-pci,id=vser0", "virtserialport,bus=vser0.0,chardev=ga0,name=org.qemu.guest_agent.0"]
        );
        // A restore (a new incarnation's log) launches the same devices: the
        // checkpoint's device set.
        let restore = qemu_args(&s, Path::new("/logs/serial-1.log"), Some(Path::new("/ck/vm-a")));
        assert_eq!(value_after(&restore, "-device"), devs);
        assert_eq!(s.agent_path(), Path::new("/run/vm1/ga.sock"));
        assert_eq!(s.console_path(), Path::new("/run/vm1/console.sock"));
    }

    #[test]
    fn incoming_only_appends() {
        let s = spec(Accel::Tcg);
        let plain = qemu_args(&s, Path::new("/l"), None);
        let restore = qemu_args(&s, Path::new("/l"), Some(Path::new("/ck/it's here.vmstate")));
        assert_eq!(&restore[..plain.len()], &plain[..]);
        assert_eq!(&restore[plain.len()..], ["-S", "-incoming", r"exec:cat -- '/ck/it'\''s here.vmstate'"]);
    }

    #[test]
    fn disk_is_a_qcow2_virtio_blk_after_the_nics() {
        let plain = qemu_args(&spec(Accel::Tcg), Path::new("/l"), None);
        assert!(!plain.iter().any(|a| a == "-drive"), "no disk, no drive");
        let mut s = spec(Accel::Tcg);
        s.disk = Some("/st/disks/node1/ov-1.qcow2".into());
        let a = qemu_args(&s, Path::new("/l"), None);
        assert_eq!(
            value_after(&a, "-drive"),
            ["file=/st/disks/node1/ov-1.qcow2,format=qcow2,if=none,id=disk0,cache=writeback"]
        );
        let devs = value_after(&a, "-device");
        assert_eq!(devs.len(), 5);
        assert_eq!(devs[2], "virtio-blk-pci,drive=disk0,id=vd0,romfile=");
        // The NICs keep their place (and PCI slots): the disk comes after
        // them, the guest agent's port after it.
        let plain_devs = value_after(&plain, "-device");
        assert_eq!(&devs[..2], &plain_devs[..2]);
        assert_eq!(&devs[3..], &plain_devs[2..]);
        // A restore onto another overlay launches the same devices.
        s.disk = Some("/st/disks/node1/ov-2.qcow2".into());
        let r = qemu_args(&s, Path::new("/l"), Some(Path::new("/ck/x")));
        assert_eq!(value_after(&r, "-device"), devs);
        let old: VmSpec = serde_json::from_value(serde_json::json!({"name":"a","memory_mib":64,"vcpus":1,"kernel":"/k","initrd":"/i","append":"","nics":[],"accel":"tcg","run_dir":"/r"})).unwrap();
        assert_eq!(old.disk, None);
    }

    #[test]
    fn kernel_boot_loads_the_kernel_and_firmware_boot_the_disk() {
        let mut s = spec(Accel::Tcg);
        s.disk = Some("/st/disks/node1/ov-1.qcow2".into());
        s.kernel = "/images/debian-12/vmlinuz".into();
        s.initrd = "/images/debian-12/initrd.img".into();
        s.append = "root=UUID=x ro console=ttyS0,115200".into();
        let k = qemu_args(&s, Path::new("/l"), None);
        assert_eq!(value_after(&k, "-kernel"), ["/images/debian-12/vmlinuz"]);
        assert_eq!(value_after(&k, "-initrd"), ["/images/debian-12/initrd.img"]);
        assert_eq!(value_after(&k, "-append"), ["root=UUID=x ro console=ttyS0,115200"]);
        assert_eq!(value_after(&k, "-device")[2], "virtio-blk-pci,drive=disk0,id=vd0,romfile=");
        s.firmware = true;
        let f = qemu_args(&s, Path::new("/l"), None);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!f.iter().any(|a| a == flag), "firmware boot passes no {flag}");
        }
        assert_eq!(value_after(&f, "-device")[2], "virtio-blk-pci,drive=disk0,id=vd0,romfile=,bootindex=0");
        assert_eq!(
            value_after(&f, "-drive"),
            ["file=/st/disks/node1/ov-1.qcow2,format=qcow2,if=none,id=disk0,cache=writeback"]
        );
        // Firmware boot needs no kernel file to exist or be a valid path.
        s.kernel = "/no,such".into();
        assert_eq!(qemu_args(&s, Path::new("/l"), None), f);
    }

    #[test]
    fn the_seed_is_a_read_only_raw_disk_after_the_root_disk() {
        let mut s = spec(Accel::Tcg);
        s.disk = Some("/st/disks/node1/ov-1.qcow2".into());
        let without = qemu_args(&s, Path::new("/l"), None);
        s.seed = Some("/st/seeds/node1.img".into());
        let a = qemu_args(&s, Path::new("/l"), None);
        assert_eq!(value_after(&a, "-drive")[1], "file=/st/seeds/node1.img,format=raw,if=none,id=seed0,readonly=on");
        let devs = value_after(&a, "-device");
        // Two NICs, the root disk, the seed, then the guest-access devices.
        assert_eq!(devs.len(), 6, "{devs:?}");
        assert_eq!(devs[3], "virtio-blk-pci,drive=seed0,id=vd1,romfile=");
        // Everything but the seed is as without one, in the same order.
        let others = value_after(&without, "-device");
        assert_eq!(&devs[..3], &others[..3]);
        assert_eq!(&devs[4..], &others[3..]);
        // Restored, the same devices.
        let r = qemu_args(&s, Path::new("/l"), Some(Path::new("/ck/x")));
        assert_eq!(value_after(&r, "-device"), devs);
        let old: VmSpec = serde_json::from_value(serde_json::json!({"name":"a","memory_mib":64,"vcpus":1,"kernel":"/k","initrd":"/i","append":"","nics":[],"accel":"tcg","run_dir":"/r"})).unwrap();
        assert!(!old.firmware);
        assert_eq!(old.seed, None);
    }

    #[test]
    fn shell_quote_survives_sh() {
        let nasty = "a b'c\"d$(echo no)`x`;\\e";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), nasty);
    }

    #[test]
    fn run_states_parse() {
        assert_eq!(RunState::from_qmp("postmigrate"), RunState::PostMigrate);
        assert_eq!(RunState::from_qmp("colo"), RunState::Other("colo".into()));
        assert!(RunState::Paused.is_saveable());
        for s in [RunState::Running, RunState::InMigrate, RunState::PostMigrate] {
            assert!(!s.is_saveable(), "{s:?}");
        }
    }

    #[test]
    fn bad_paths_refused() {
        assert!(validate_path("x", Path::new("/a,b")).is_err());
        assert!(validate_socket_path("x", &PathBuf::from(format!("/{}", "s".repeat(120)))).is_err());
        assert!(validate_socket_path("x", Path::new("/run/ok.sock")).is_ok());
    }

    #[test]
    fn absolutize_prefixes_relative_paths_only() {
        let mut s = spec(Accel::Tcg);
        s.run_dir = "run/vm1".into();
        s.nics[0].socket = "dn/a.sock".into();
        let (a, serial, incoming) = absolutize(&s, Path::new("serial.log"), Some(Path::new("ck/x.state"))).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(a.run_dir, cwd.join("run/vm1"));
        assert_eq!(a.nics[0].socket, cwd.join("dn/a.sock"));
        assert_eq!(a.nics[1].socket, PathBuf::from("/run/dn/b.sock"));
        assert_eq!(a.kernel, PathBuf::from("/img/vmlinuz"));
        assert_eq!(serial, cwd.join("serial.log"));
        assert_eq!(incoming.unwrap(), cwd.join("ck/x.state"));
    }

    #[test]
    fn partial_path_appends() {
        assert_eq!(partial_path(Path::new("/a/b.vmstate")), PathBuf::from("/a/b.vmstate.partial"));
    }
}
