//! The experiment spec: a TOML file naming the nodes (memory, vCPUs, kernel,
//! workloads), the LANs and point-to-point links between them and their
//! parameters. Parsing resolves defaults, assigns addresses, MACs and
//! interface names, and refuses anything inconsistent with an error that
//! names the file, line, column and field. The format is documented in
//! `docs/spec.md`.

// Errors are rare and parsing is not hot; a large error keeps its fields plain.
#![allow(clippy::result_large_err)]

mod checkpoint;
mod describe;
mod images;
mod ns;
mod placement;
mod units;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use checkpoint::{format_interval_s, parse_interval_s, CheckpointPolicy};
pub use describe::{Description, InterfaceDescription, LanDescription, LinkDescription, NodeDescription};
pub use images::{probe_image, ImageCatalog, ImageDir, ImageError, ImageFormat, BUILTIN_OS};
pub use ns::ENV_TCLSH;
pub use placement::{Host, Placement, DEFAULT_DELAY_PORT_BASE};
pub use units::{
    format_bandwidth_bps, format_bytes, format_duration_ns, format_memory_mib, parse_bandwidth_bps, parse_bytes,
    parse_duration_ns, parse_memory_mib,
};

/// Smallest guest memory accepted (MiB).
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest memory accepted (MiB).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 64;
/// Memory of a node when neither the node nor `[defaults]` say (MiB).
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Memory of a node with an OS image when neither it nor `[defaults]` says.
pub const DEFAULT_IMAGE_MEMORY_MIB: u32 = 1024;
/// Queue limit in packets when a network does not say (Emulab's default).
pub const DEFAULT_QUEUE_PACKETS: u32 = 50;
/// Largest queue limit in packets; also the packet limit of a queue given
/// only in bytes (Emulab's queue-in-bytes).
pub const MAX_QUEUE_PACKETS: u32 = 1_000_000;
/// Largest queue limit in bytes.
pub const MAX_QUEUE_BYTES: u64 = 1 << 30;
/// Byte limit when a network does not say: the maximum, i.e. in effect
/// only the packet limit applies.
pub const DEFAULT_QUEUE_BYTES: u64 = MAX_QUEUE_BYTES;
/// Nodes are numbered into one MAC byte.
pub const MAX_NODES: usize = 256;
/// Networks are numbered into the third byte of `10.0.<k>.0/24`.
pub const MAX_NETWORKS: usize = 255;

/// A whole experiment, as parsed and resolved from a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub name: String,
    pub nodes: Vec<Node>,
    pub lans: Vec<Lan>,
    pub links: Vec<Link>,
    /// The spec file it came from, when it came from a file.
    pub source: Option<PathBuf>,
    /// Hosts and what runs where; `None`: everything on this host.
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Periodic checkpoints (`[checkpoint]`, carried out by `stasis supervise`);
    /// `None`: none.
    #[serde(default)]
    pub checkpoint: Option<CheckpointPolicy>,
    /// What parsing noticed but accepted (an OS name no image maps, …);
    /// not part of the experiment.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// `None`: the project's built guest kernel (the caller resolves it).
    /// Relative paths in the file are resolved against the spec's directory.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments (may be empty).
    pub kernel_args: String,
    /// Workloads started in the guest at boot, each in the background.
    pub run: Vec<String>,
    /// Network interfaces, `eth0`, `eth1` … in order of attachment.
    pub ifaces: Vec<Iface>,
    /// How the node's NICs attach to the delay node.
    #[serde(default)]
    pub nic: NicMode,
    /// Size in bytes of the node's qcow2 data disk (`disk = "1G"`), checkpointed
    /// together with memory; `None`: no disk (the VM has no block device).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The host the node runs on (multi-host experiments only; always set there).
    #[serde(default)]
    pub host: Option<String>,
    /// The OS asked for by name (`os = "…"`, Emulab's `tb-set-node-os`), as written.
    #[serde(default)]
    pub os: Option<String>,
    /// The root disk: the user's qcow2 or raw image, never written (each node
    /// runs on its own overlay of it; docs/images.md). `None`: the project's
    /// busybox guest, kernel and initramfs only.
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// How the node boots.
    #[serde(default)]
    pub boot: Boot,
}

/// How a node boots (`boot = "firmware" | "kernel"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boot {
    /// QEMU loads `kernel` and `initrd` itself (the busybox guest; an OS
    /// image with its kernel and `root=` given).
    #[default]
    Kernel,
    /// SeaBIOS runs the image's own bootloader, as a cloud image expects.
    Firmware,
}

impl Boot {
    /// The spelling in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Boot::Kernel => "kernel",
            Boot::Firmware => "firmware",
        }
    }
}

/// How a node's NICs attach to the delay node (`nic = "stream" | "vhost-user"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicMode {
    /// QEMU `-netdev stream`: frames cross a unix socket; QEMU reads ahead of
    /// the guest, so a checkpoint stops delivery a little early. The fallback.
    Stream,
    /// QEMU `-netdev vhost-user`: the delay node writes the guest's receive
    /// ring itself; exact at a checkpoint. Guest RAM becomes a shared memfd.
    /// The default: exact by construction, and faster through the node.
    #[default]
    VhostUser,
}

impl NicMode {
    /// The spelling in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            NicMode::Stream => "stream",
            NicMode::VhostUser => "vhost-user",
        }
    }
}

/// One network interface of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Iface {
    /// `eth0`, `eth1` … in order of attachment.
    pub name: String,
    /// The LAN or link this interface is attached to.
    pub network: String,
    /// `52:54:00:<node index>:<iface index>:01` (hex, 0-based indices).
    pub mac: String,
    /// Dotted quad, e.g. `10.0.1.2`.
    pub ip: String,
    pub prefix_len: u8,
}

/// Shaping of one direction of a link, or of every path across a LAN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    /// Bits per second.
    pub bandwidth_bps: u64,
    /// One-way propagation delay.
    pub delay_ns: u64,
    pub jitter_ns: u64,
    /// Drop probability, 0..=1.
    pub loss: f64,
    /// Drop-tail queue limit in packets, 1..=[`MAX_QUEUE_PACKETS`].
    pub queue_packets: u32,
    /// Drop-tail queue limit in bytes, 1..=[`MAX_QUEUE_BYTES`]; the default
    /// (the maximum) is in effect no byte limit. A frame is dropped when
    /// either limit would be exceeded.
    pub queue_bytes: u64,
}

impl Default for LinkParams {
    /// Emulab's defaults: 1000 Mb/s, no delay, no loss, 50-packet queue.
    fn default() -> Self {
        LinkParams {
            bandwidth_bps: 1_000_000_000,
            delay_ns: 0,
            jitter_ns: 0,
            loss: 0.0,
            queue_packets: DEFAULT_QUEUE_PACKETS,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

/// A shared segment: every member reaches every other one with `params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lan {
    pub name: String,
    pub members: Vec<String>,
    pub params: LinkParams,
}

/// A point-to-point link between nodes `a` and `b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub name: String,
    pub a: String,
    pub b: String,
    pub a_to_b: LinkParams,
    pub b_to_a: LinkParams,
}

/// What kind of mistake a [`SpecError`] reports (for callers and tests
/// that branch on it; the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecErrorKind {
    /// The file could not be read.
    Read,
    /// TOML syntax, or a value of the wrong type.
    Syntax,
    UnknownField,
    MissingField,
    /// A lan/link names a node that does not exist.
    UnknownNode,
    /// Two nodes/lans/links share a name (one namespace).
    DuplicateName,
    /// A name that does not follow the naming rule.
    BadName,
    /// A memory size or count outside what is possible.
    BadSize,
    /// A quantity with an unknown or missing unit.
    BadUnit,
    /// A number outside its range (loss, queue, bandwidth …).
    OutOfRange,
    /// A node listed twice in one LAN.
    DuplicateMember,
    /// A link from a node to itself.
    SelfLink,
    /// A bad or clashing IP address.
    BadAddress,
    /// No nodes at all.
    Empty,
    /// More nodes, networks or members than addresses/MACs allow.
    TooMany,
    /// An NS-script command outside the supported subset.
    Unsupported,
    /// The NS script stopped with a Tcl error (or hit the interpreter's limits).
    Script,
    /// The Tcl interpreter could not be run.
    Interpreter,
    /// A missing or unusable image, or an OS name no image maps.
    Image,
}

/// A refused spec. Displays as `file:line:col: subject: message in field f`
/// (the file part only when known).
#[derive(Debug)]
pub struct SpecError {
    pub kind: SpecErrorKind,
    pub file: Option<PathBuf>,
    /// 1-based; 0 when there is no position (read errors).
    pub line: usize,
    /// 1-based, in characters; 0 when there is no position.
    pub column: usize,
    /// What the field belongs to, e.g. `link "l0"`.
    pub subject: Option<String>,
    pub field: Option<String>,
    pub message: String,
    source: Option<std::io::Error>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut place = Vec::new();
        if let Some(file) = &self.file {
            place.push(file.display().to_string());
        }
        if self.line > 0 {
            place.push(self.line.to_string());
            place.push(self.column.to_string());
        }
        if !place.is_empty() {
            write!(f, "{}: ", place.join(":"))?;
        }
        if let Some(subject) = &self.subject {
            write!(f, "{subject}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(field) = self.field.as_ref().filter(|f| !self.message.contains(&format!("`{f}`"))) {
            write!(f, " in field {field}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

// ---- the file as written -------------------------------------------------

type Quantity = Option<Spanned<toml::Value>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Option<Spanned<String>>,
    defaults: Option<RawDefaults>,
    nic: Option<Spanned<String>>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    lan: Vec<RawLan>,
    #[serde(default)]
    link: Vec<RawLink>,
    #[serde(default)]
    host: Vec<placement::RawHost>,
    delay: Option<placement::RawDelay>,
    checkpoint: Option<Spanned<checkpoint::RawCheckpoint>>,
    /// OS names (`os`, `tb-set-node-os`) → image paths.
    #[serde(default)]
    images: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    memory: Quantity,
    vcpus: Option<Spanned<i64>>,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    kernel_args: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    os: Option<Spanned<String>>,
    boot: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    memory: Quantity,
    vcpus: Option<Spanned<i64>>,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    kernel_args: Option<Spanned<String>>,
    nic: Option<Spanned<String>>,
    /// Size of the node's data disk; optional.
    #[serde(default)]
    disk: Option<Spanned<String>>,
    #[serde(default)]
    run: Vec<Spanned<String>>,
    /// Multi-host experiments: the host the node runs on.
    #[serde(default)]
    host: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    os: Option<Spanned<String>>,
    boot: Option<Spanned<String>>,
}

impl RawNode {
    /// A node with nothing but its name (NS scripts fill in the rest).
    fn named(name: Spanned<String>) -> RawNode {
        RawNode {
            name,
            memory: None,
            vcpus: None,
            kernel: None,
            initrd: None,
            kernel_args: None,
            nic: None,
            disk: None,
            run: Vec::new(),
            host: None,
            image: None,
            os: None,
            boot: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawParams {
    bandwidth: Quantity,
    delay: Quantity,
    jitter: Quantity,
    loss: Quantity,
    queue: Quantity,
    queue_bytes: Quantity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    name: Spanned<String>,
    members: Spanned<Vec<Spanned<String>>>,
    ips: Option<Spanned<Vec<Spanned<String>>>>,
    bandwidth: Quantity,
    delay: Quantity,
    jitter: Quantity,
    loss: Quantity,
    queue: Quantity,
    queue_bytes: Quantity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    name: Spanned<String>,
    a: Spanned<String>,
    b: Spanned<String>,
    ips: Option<Spanned<Vec<Spanned<String>>>>,
    bandwidth: Quantity,
    delay: Quantity,
    jitter: Quantity,
    loss: Quantity,
    queue: Quantity,
    queue_bytes: Quantity,
    a_to_b: Option<RawParams>,
    b_to_a: Option<RawParams>,
}

// ---- resolving -----------------------------------------------------------

/// The text being parsed and where it came from; turns spans into errors.
struct Source<'a> {
    text: &'a str,
    file: Option<PathBuf>,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let mut offset = offset;
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn error(
        &self,
        kind: SpecErrorKind,
        span: Range<usize>,
        subject: Option<String>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> SpecError {
        let (line, column) = self.line_col(span.start);
        SpecError {
            kind,
            file: self.file.clone(),
            line,
            column,
            subject,
            field: field.map(str::to_owned),
            message: message.into(),
            source: None,
        }
    }

    /// Maps a `toml` error (syntax, type, unknown or missing field).
    fn toml_error(&self, err: toml::de::Error) -> SpecError {
        let message = err.message().trim().replace('\n', "; ");
        let (kind, field) = if let Some(rest) = message.strip_prefix("unknown field `") {
            (SpecErrorKind::UnknownField, rest.split('`').next().map(str::to_owned))
        } else if let Some(rest) = message.strip_prefix("missing field `") {
            (SpecErrorKind::MissingField, rest.split('`').next().map(str::to_owned))
        } else {
            (SpecErrorKind::Syntax, None)
        };
        let span = err.span().unwrap_or(0..0);
        let field = field.or_else(|| self.key_before(span.start));
        let mut e = self.error(kind, span, None, None, message);
        e.field = field;
        e
    }

    /// The key of `key = value` when `offset` points at the value, so type
    /// errors can name their field.
    fn key_before(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        if !self.text.is_char_boundary(offset) {
            return None;
        }
        let before = &self.text[..offset];
        let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
        let key = line.trim_end().strip_suffix('=')?.trim();
        let bare =
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        bare.then(|| key.to_owned())
    }
}

fn is_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
        && name.len() <= max
}

/// An NS-imported experiment is named after the file's stem, or `ns-import`.
fn ns_experiment_name(source: Option<&Path>) -> String {
    let stem = source.and_then(Path::file_stem).map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(40).collect();
    if is_experiment_name(&name) {
        name
    } else {
        "ns-import".into()
    }
}

fn is_experiment_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 40 && name.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
}

const NAME_MAX: usize = 32;

struct Resolver<'a> {
    src: Source<'a>,
    base_dir: Option<PathBuf>,
    catalog: &'a ImageCatalog,
}

impl Resolver<'_> {
    fn memory(&self, value: &Spanned<toml::Value>, subject: &Option<String>) -> Result<u32, SpecError> {
        let span = value.span();
        let mib = match value.get_ref() {
            toml::Value::String(s) => parse_memory_mib(s).map_err(|m| {
                self.src.error(SpecErrorKind::BadUnit, span.clone(), subject.clone(), Some("memory"), m)
            })?,
            toml::Value::Integer(i) if *i >= 0 => *i as u64,
            toml::Value::Integer(i) => {
                return Err(self.src.error(
                    SpecErrorKind::BadSize,
                    span,
                    subject.clone(),
                    Some("memory"),
                    format!("memory {i} is negative"),
                ))
            }
            other => {
                return Err(self.src.error(
                    SpecErrorKind::Syntax,
                    span,
                    subject.clone(),
                    Some("memory"),
                    format!("expected a size such as \"256M\", found {}", other.type_str()),
                ))
            }
        };
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            return Err(self.src.error(
                SpecErrorKind::BadSize,
                span,
                subject.clone(),
                Some("memory"),
                format!(
                    "memory {} is outside {}..={}",
                    match value.get_ref() {
                        toml::Value::String(s) => format!("\"{s}\""),
                        _ => format_memory_mib(mib),
                    },
                    format_memory_mib(MIN_MEMORY_MIB),
                    format_memory_mib(MAX_MEMORY_MIB)
                ),
            ));
        }
        Ok(mib as u32)
    }

    fn nic(&self, value: &Spanned<String>, subject: &Option<String>) -> Result<NicMode, SpecError> {
        match value.get_ref().as_str() {
            "stream" => Ok(NicMode::Stream),
            "vhost-user" => Ok(NicMode::VhostUser),
            other => Err(self.src.error(
                SpecErrorKind::OutOfRange,
                value.span(),
                subject.clone(),
                Some("nic"),
                format!("unknown NIC mode \"{other}\" (expected \"stream\" or \"vhost-user\")"),
            )),
        }
    }

    fn vcpus(&self, value: &Spanned<i64>, subject: &Option<String>) -> Result<u32, SpecError> {
        let v = *value.get_ref();
        if !(1..=MAX_VCPUS as i64).contains(&v) {
            return Err(self.src.error(
                SpecErrorKind::BadSize,
                value.span(),
                subject.clone(),
                Some("vcpus"),
                format!("vcpus {v} is outside 1..={MAX_VCPUS}"),
            ));
        }
        Ok(v as u32)
    }

    fn text_field(&self, value: &Spanned<String>, subject: &Option<String>, field: &str) -> Result<String, SpecError> {
        let s = value.get_ref();
        if s.contains(['\n', '\r', '\0']) {
            return Err(self.src.error(
                SpecErrorKind::OutOfRange,
                value.span(),
                subject.clone(),
                Some(field),
                "line breaks and NUL are not allowed",
            ));
        }
        Ok(s.clone())
    }

    fn path(&self, value: &Spanned<String>, subject: &Option<String>, field: &str) -> Result<PathBuf, SpecError> {
        let s = self.text_field(value, subject, field)?;
        if s.is_empty() {
            return Err(self.src.error(
                SpecErrorKind::OutOfRange,
                value.span(),
                subject.clone(),
                Some(field),
                "empty path",
            ));
        }
        let p = PathBuf::from(s);
        Ok(match &self.base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        })
    }

    fn str_quantity<'v>(
        &self,
        value: &'v Spanned<toml::Value>,
        subject: &Option<String>,
        field: &str,
        example: &str,
    ) -> Result<&'v str, SpecError> {
        match value.get_ref() {
            toml::Value::String(s) => Ok(s),
            other => Err(self.src.error(
                SpecErrorKind::BadUnit,
                value.span(),
                subject.clone(),
                Some(field),
                format!("expected a string with a unit such as \"{example}\", found {}", other.type_str()),
            )),
        }
    }

    fn params(
        &self,
        raw: &RawParams,
        base: LinkParams,
        subject: &Option<String>,
        prefix: &str,
    ) -> Result<LinkParams, SpecError> {
        let mut p = base;
        let field = |name: &str| format!("{prefix}{name}");
        let unit_err = |v: &Spanned<toml::Value>, f: &str, m: String| {
            self.src.error(SpecErrorKind::BadUnit, v.span(), subject.clone(), Some(f), m)
        };
        let range_err = |v: &Spanned<toml::Value>, f: &str, m: String| {
            self.src.error(SpecErrorKind::OutOfRange, v.span(), subject.clone(), Some(f), m)
        };
        if let Some(v) = &raw.bandwidth {
            let f = field("bandwidth");
            let s = self.str_quantity(v, subject, &f, "100Mb")?;
            p.bandwidth_bps = parse_bandwidth_bps(s).map_err(|m| unit_err(v, &f, m))?;
            if p.bandwidth_bps == 0 {
                return Err(range_err(v, &f, "bandwidth must be above 0".into()));
            }
        }
        if let Some(v) = &raw.delay {
            let f = field("delay");
            let s = self.str_quantity(v, subject, &f, "10ms")?;
            p.delay_ns = parse_duration_ns(s).map_err(|m| unit_err(v, &f, m))?;
        }
        if let Some(v) = &raw.jitter {
            let f = field("jitter");
            let s = self.str_quantity(v, subject, &f, "1ms")?;
            p.jitter_ns = parse_duration_ns(s).map_err(|m| unit_err(v, &f, m))?;
        }
        if let Some(v) = &raw.loss {
            let f = field("loss");
            let loss = match v.get_ref() {
                toml::Value::Float(x) => *x,
                toml::Value::Integer(i) => *i as f64,
                other => {
                    return Err(range_err(
                        v,
                        &f,
                        format!("expected a probability such as 0.01, found {}", other.type_str()),
                    ))
                }
            };
            if !(0.0..=1.0).contains(&loss) {
                return Err(range_err(v, &f, format!("loss {loss} is outside 0..=1")));
            }
            p.loss = loss;
        }
        let queue_set = raw.queue.is_some();
        if let Some(v) = &raw.queue {
            let f = field("queue");
            match v.get_ref() {
                toml::Value::Integer(i) if (1..=MAX_QUEUE_PACKETS as i64).contains(i) => p.queue_packets = *i as u32,
                toml::Value::Integer(i) => {
                    return Err(range_err(v, &f, format!("queue {i} is outside 1..={MAX_QUEUE_PACKETS} packets")))
                }
                other => {
                    return Err(range_err(v, &f, format!("expected a number of packets, found {}", other.type_str())))
                }
            }
        }
        if let Some(v) = &raw.queue_bytes {
            let f = field("queue_bytes");
            p.queue_bytes = match v.get_ref() {
                toml::Value::String(s) => parse_bytes(s).map_err(|m| unit_err(v, &f, m))?,
                toml::Value::Integer(i) if *i >= 0 => *i as u64,
                other => {
                    return Err(range_err(
                        v,
                        &f,
                        format!("expected a size such as \"64KB\", found {}", other.type_str()),
                    ))
                }
            };
            if !(1..=MAX_QUEUE_BYTES).contains(&p.queue_bytes) {
                return Err(range_err(v, &f, format!("queue_bytes {} is outside 1B..=1G", p.queue_bytes)));
            }
            // Emulab's queue-in-bytes: a byte limit given alone replaces the
            // packet limit; given together, both apply.
            if !queue_set {
                p.queue_packets = MAX_QUEUE_PACKETS;
            }
        }
        Ok(p)
    }

    fn ips(
        &self,
        raw: &Option<Spanned<Vec<Spanned<String>>>>,
        count: usize,
        k: usize,
        subject: &Option<String>,
    ) -> Result<Vec<(Ipv4Addr, u8, Range<usize>)>, SpecError> {
        let Some(list) = raw else {
            return Ok((1..=count).map(|i| (Ipv4Addr::new(10, 0, k as u8, i as u8), 24, 0..0)).collect());
        };
        if list.get_ref().len() != count {
            return Err(self.src.error(
                SpecErrorKind::BadAddress,
                list.span(),
                subject.clone(),
                Some("ips"),
                format!("{} addresses for {count} members", list.get_ref().len()),
            ));
        }
        let mut out = Vec::new();
        for ip in list.get_ref() {
            let text = ip.get_ref();
            let (addr, prefix) = match text.split_once('/') {
                Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| (8..=30).contains(p))),
                None => (text.as_str(), Some(24)),
            };
            let (Ok(addr), Some(prefix)) = (addr.parse::<Ipv4Addr>(), prefix) else {
                return Err(self.src.error(
                    SpecErrorKind::BadAddress,
                    ip.span(),
                    subject.clone(),
                    Some("ips"),
                    format!("\"{text}\" is not an IPv4 address (optionally /8../30)"),
                ));
            };
            out.push((addr, prefix, ip.span()));
        }
        Ok(out)
    }
}

/// A network while resolving: members in order with their addresses.
struct NetPlan {
    name: String,
    members: Vec<String>,
    addrs: Vec<(Ipv4Addr, u8, Range<usize>)>,
}

impl Experiment {
    /// Parses and resolves a spec. `source` is the file it came from (used
    /// in errors and to resolve relative kernel/initrd paths).
    pub fn from_toml_str(text: &str, source: Option<&Path>) -> Result<Experiment, SpecError> {
        Experiment::from_toml_str_with(text, source, &ImageCatalog::default())
    }

    /// [`Experiment::from_toml_str`], OS names and images resolved through `catalog`.
    pub fn from_toml_str_with(
        text: &str,
        source: Option<&Path>,
        catalog: &ImageCatalog,
    ) -> Result<Experiment, SpecError> {
        let src = Source { text, file: source.map(Path::to_path_buf) };
        let raw: RawSpec = toml::from_str(text).map_err(|e| src.toml_error(e))?;
        let base_dir = source.map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf());
        let r = Resolver { src, base_dir, catalog };
        r.resolve(raw, source)
    }

    /// Imports an Emulab NS script (the topology subset, see `docs/spec.md`).
    /// The experiment is named after the file (`source`'s stem), or
    /// `ns-import`. Errors point into the script.
    pub fn from_ns_script(text: &str, source: Option<&Path>) -> Result<Experiment, SpecError> {
        Experiment::from_ns_script_with(text, source, &ImageCatalog::default())
    }

    /// [`Experiment::from_ns_script`], `tb-set-node-os` names resolved through `catalog`.
    pub fn from_ns_script_with(
        text: &str,
        source: Option<&Path>,
        catalog: &ImageCatalog,
    ) -> Result<Experiment, SpecError> {
        let src = Source { text, file: source.map(Path::to_path_buf) };
        let raw = ns::parse(text, &src, ns_experiment_name(source))?;
        let base_dir = source.map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf());
        Resolver { src, base_dir, catalog }.resolve(raw, source)
    }

    /// The second half of an NS import: the experiment from what the Tcl
    /// interpreter printed about `text` (for the fuzz target, which feeds
    /// hostile records without running a process per input).
    #[doc(hidden)]
    pub fn from_ns_records(printed: &[u8], text: &str, source: Option<&Path>) -> Result<Experiment, SpecError> {
        let src = Source { text, file: source.map(Path::to_path_buf) };
        let raw = ns::records(printed, text, &src, ns_experiment_name(source))?;
        let base_dir = source.map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf());
        Resolver { src, base_dir, catalog: &ImageCatalog::default() }.resolve(raw, source)
    }

    /// Reads and parses a spec file: TOML, or an Emulab NS script when the
    /// file name ends in `.ns` or `.tcl`.
    pub fn from_file(path: &Path) -> Result<Experiment, SpecError> {
        Experiment::from_file_with(path, &ImageCatalog::default())
    }

    /// [`Experiment::from_file`], OS names and images resolved through `catalog`.
    pub fn from_file_with(path: &Path, catalog: &ImageCatalog) -> Result<Experiment, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            kind: SpecErrorKind::Read,
            file: Some(path.to_path_buf()),
            line: 0,
            column: 0,
            subject: None,
            field: None,
            message: "cannot read the spec".into(),
            source: Some(e),
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("ns" | "tcl") => Experiment::from_ns_script_with(&text, Some(path), catalog),
            _ => Experiment::from_toml_str_with(&text, Some(path), catalog),
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Stable hex hash (BLAKE3) of [`Experiment::to_toml`]: equal for the
    /// same experiment however it was written.
    pub fn digest(&self) -> String {
        blake3::hash(self.to_toml().as_bytes()).to_hex().to_string()
    }

    /// The canonical spec: every value explicit, one spelling per value;
    /// parsing it gives back an equal experiment (`source` aside).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut out = format!("name = {}\n", q(&self.name));
        for n in &self.nodes {
            out += &format!("\n[[node]]\nname = {}\n", q(&n.name));
            out += &format!("memory = {}\n", q(&format_memory_mib(n.memory_mib.into())));
            out += &format!("vcpus = {}\n", n.vcpus);
            if let Some(k) = &n.kernel {
                out += &format!("kernel = {}\n", q(&k.to_string_lossy()));
            }
            if let Some(i) = &n.initrd {
                out += &format!("initrd = {}\n", q(&i.to_string_lossy()));
            }
            if !n.kernel_args.is_empty() {
                out += &format!("kernel_args = {}\n", q(&n.kernel_args));
            }
            // Written only when not the default, so the canonical form stays short.
            if n.nic != NicMode::default() {
                out += &format!("nic = {}\n", q(n.nic.as_str()));
            }
            if let Some(d) = n.disk_bytes {
                out += &format!("disk = {}\n", q(&format_bytes(d)));
            }
            if !n.run.is_empty() {
                out += &format!("run = {}\n", list(&n.run));
            }
            if let Some(h) = &n.host {
                out += &format!("host = {}\n", q(h));
            }
            if let Some(os) = &n.os {
                out += &format!("os = {}\n", q(os));
            }
            // Only OS-image nodes say how they boot: the busybox guest's
            // canonical form (and digest) stays what it was.
            if let Some(image) = &n.image {
                out += &format!("image = {}\n", q(&image.to_string_lossy()));
                out += &format!("boot = {}\n", q(n.boot.as_str()));
            }
        }
        let params = |p: &LinkParams| {
            let mut s = format!(
                "bandwidth = {}\ndelay = {}\njitter = {}\nloss = {:?}\nqueue = {}\n",
                q(&format_bandwidth_bps(p.bandwidth_bps)),
                q(&format_duration_ns(p.delay_ns)),
                q(&format_duration_ns(p.jitter_ns)),
                p.loss,
                p.queue_packets
            );
            if p.queue_bytes != DEFAULT_QUEUE_BYTES {
                s += &format!("queue_bytes = {}\n", q(&format_bytes(p.queue_bytes)));
            }
            s
        };
        let mut k = 0;
        let ips_line = |network: &str, members: &[&str], k: usize| {
            let mut default = true;
            let mut ips = Vec::new();
            for (i, m) in members.iter().enumerate() {
                let iface = self.node(m).and_then(|n| n.ifaces.iter().find(|f| f.network == network));
                let Some(iface) = iface else {
                    return String::new();
                };
                default &= iface.prefix_len == 24
                    && k <= MAX_NETWORKS
                    && i < 254
                    && iface.ip == Ipv4Addr::new(10, 0, k as u8, (i + 1) as u8).to_string();
                ips.push(if iface.prefix_len == 24 {
                    iface.ip.clone()
                } else {
                    format!("{}/{}", iface.ip, iface.prefix_len)
                });
            }
            if default {
                String::new()
            } else {
                format!("ips = {}\n", list(&ips))
            }
        };
        for lan in &self.lans {
            k += 1;
            out += &format!("\n[[lan]]\nname = {}\nmembers = {}\n", q(&lan.name), list(&lan.members));
            let members: Vec<&str> = lan.members.iter().map(String::as_str).collect();
            out += &ips_line(&lan.name, &members, k);
            out += &params(&lan.params);
        }
        for link in &self.links {
            k += 1;
            out += &format!("\n[[link]]\nname = {}\na = {}\nb = {}\n", q(&link.name), q(&link.a), q(&link.b));
            out += &ips_line(&link.name, &[&link.a, &link.b], k);
            out += &params(&link.a_to_b);
            if link.b_to_a != link.a_to_b {
                out += "\n[link.b_to_a]\n";
                out += &params(&link.b_to_a);
            }
        }
        if let Some(p) = &self.placement {
            out += &placement::to_toml(p, &q);
        }
        if let Some(c) = &self.checkpoint {
            out += &checkpoint::to_toml(c);
        }
        out
    }
}

impl Resolver<'_> {
    fn resolve(&self, raw: RawSpec, source: Option<&Path>) -> Result<Experiment, SpecError> {
        use SpecErrorKind::*;
        let src = &self.src;
        let name =
            raw.name.ok_or_else(|| src.error(MissingField, 0..0, None, Some("name"), "the experiment needs a name"))?;
        if !is_experiment_name(name.get_ref()) {
            return Err(src.error(
                BadName,
                name.span(),
                None,
                Some("name"),
                format!("experiment name \"{}\" must be 1..=40 of [a-z0-9-]", name.get_ref()),
            ));
        }
        if raw.node.is_empty() {
            return Err(src.error(Empty, 0..0, None, Some("node"), "the experiment has no [[node]]"));
        }
        if raw.node.len() > MAX_NODES {
            let span = raw.node[MAX_NODES].name.span();
            return Err(src.error(TooMany, span, None, None, format!("more than {MAX_NODES} nodes")));
        }
        if raw.lan.len() + raw.link.len() > MAX_NETWORKS {
            return Err(src.error(TooMany, 0..0, None, None, format!("more than {MAX_NETWORKS} lans and links")));
        }

        // One namespace for nodes, lans and links.
        let mut names: BTreeMap<String, &'static str> = BTreeMap::new();
        let mut claim = |what: &'static str, n: &Spanned<String>| -> Result<(), SpecError> {
            if !is_name(n.get_ref(), NAME_MAX) {
                return Err(src.error(
                    BadName,
                    n.span(),
                    Some(format!("{what} \"{}\"", n.get_ref())),
                    Some("name"),
                    format!("a name must match [a-z][a-z0-9-]* and be at most {NAME_MAX} characters"),
                ));
            }
            if let Some(earlier) = names.insert(n.get_ref().clone(), what) {
                return Err(src.error(
                    DuplicateName,
                    n.span(),
                    Some(format!("{what} \"{}\"", n.get_ref())),
                    Some("name"),
                    format!("the name is already used by a {earlier}"),
                ));
            }
            Ok(())
        };
        for n in &raw.node {
            claim("node", &n.name)?;
        }
        for l in &raw.lan {
            claim("lan", &l.name)?;
        }
        for l in &raw.link {
            claim("link", &l.name)?;
        }

        let (mut def_mem, mut def_vcpus) = (DEFAULT_MEMORY_MIB, 1);
        let (mut def_kernel, mut def_initrd, mut def_args) = (None, None, String::new());
        let mut def_image = images::NodeImageRaw::default();
        if let Some(d) = &raw.defaults {
            let subject = Some("[defaults]".to_owned());
            if let Some(m) = &d.memory {
                def_mem = self.memory(m, &subject)?;
            }
            if let Some(v) = &d.vcpus {
                def_vcpus = self.vcpus(v, &subject)?;
            }
            if let Some(k) = &d.kernel {
                def_kernel = Some(self.path(k, &subject, "kernel")?);
            }
            if let Some(i) = &d.initrd {
                def_initrd = Some(self.path(i, &subject, "initrd")?);
            }
            if let Some(a) = &d.kernel_args {
                def_args = self.text_field(a, &subject, "kernel_args")?;
            }
            def_image = images::NodeImageRaw { image: d.image.clone(), os: d.os.clone(), boot: d.boot.clone() };
        }
        let mut warnings = Vec::new();

        let def_nic = match &raw.nic {
            Some(v) => self.nic(v, &None)?,
            None => NicMode::default(),
        };
        let mut nodes = Vec::new();
        for n in &raw.node {
            let subject = Some(format!("node \"{}\"", n.name.get_ref()));
            let mut run = Vec::new();
            for cmd in &n.run {
                let c = self.text_field(cmd, &subject, "run")?;
                if c.trim().is_empty() {
                    return Err(src.error(OutOfRange, cmd.span(), subject, Some("run"), "empty command"));
                }
                run.push(c);
            }
            nodes.push(Node {
                name: n.name.get_ref().clone(),
                memory_mib: match &n.memory {
                    Some(m) => self.memory(m, &subject)?,
                    None => def_mem,
                },
                vcpus: match &n.vcpus {
                    Some(v) => self.vcpus(v, &subject)?,
                    None => def_vcpus,
                },
                kernel: match &n.kernel {
                    Some(k) => Some(self.path(k, &subject, "kernel")?),
                    None => def_kernel.clone(),
                },
                initrd: match &n.initrd {
                    Some(i) => Some(self.path(i, &subject, "initrd")?),
                    None => def_initrd.clone(),
                },
                kernel_args: match &n.kernel_args {
                    Some(a) => self.text_field(a, &subject, "kernel_args")?,
                    None => def_args.clone(),
                },
                run,
                ifaces: Vec::new(),
                nic: match &n.nic {
                    Some(v) => self.nic(v, &subject)?,
                    None => def_nic,
                },
                disk_bytes: match &n.disk {
                    Some(d) => Some(parse_bytes(d.get_ref()).ok().filter(|b| *b >= 1 << 20).ok_or_else(|| {
                        src.error(
                            SpecErrorKind::BadUnit,
                            d.span(),
                            subject.clone(),
                            Some("disk"),
                            format!("expected a disk size of at least 1M such as \"1G\", found \"{}\"", d.get_ref()),
                        )
                    })?),
                    None => None,
                },
                host: None,
                os: None,
                image: None,
                boot: Boot::Kernel,
            });
            let node = nodes.last_mut().expect("just pushed");
            let own = images::NodeImageRaw { image: n.image.clone(), os: n.os.clone(), boot: n.boot.clone() };
            let explicit_kernel = n.kernel.is_some() || def_kernel.is_some();
            let explicit_args = n.kernel_args.as_ref().or(raw.defaults.as_ref().and_then(|d| d.kernel_args.as_ref()));
            self.node_image(node, &own, &def_image, &raw.images, explicit_kernel, explicit_args, &mut warnings)?;
            // An OS with systemd needs more than the busybox guest's default.
            let explicit_memory = n.memory.is_some() || raw.defaults.as_ref().is_some_and(|d| d.memory.is_some());
            if node.image.is_some() && !explicit_memory {
                node.memory_mib = DEFAULT_IMAGE_MEMORY_MIB;
            }
        }
        let known: HashSet<&str> = raw.node.iter().map(|n| n.name.get_ref().as_str()).collect();
        let unknown_node = |subject: &Option<String>, field: &str, m: &Spanned<String>| {
            src.error(UnknownNode, m.span(), subject.clone(), Some(field), format!("unknown node \"{}\"", m.get_ref()))
        };

        let mut plans = Vec::new();
        let mut lans = Vec::new();
        let mut k = 0;
        for l in &raw.lan {
            k += 1;
            let subject = Some(format!("lan \"{}\"", l.name.get_ref()));
            let members = l.members.get_ref();
            if members.is_empty() {
                return Err(src.error(
                    OutOfRange,
                    l.members.span(),
                    subject,
                    Some("members"),
                    "a lan needs at least one member",
                ));
            }
            if members.len() > 254 {
                return Err(src.error(TooMany, l.members.span(), subject, Some("members"), "more than 254 members"));
            }
            let mut seen = HashSet::new();
            for m in members {
                if !known.contains(m.get_ref().as_str()) {
                    return Err(unknown_node(&subject, "members", m));
                }
                if !seen.insert(m.get_ref().as_str()) {
                    return Err(src.error(
                        DuplicateMember,
                        m.span(),
                        subject,
                        Some("members"),
                        format!("node \"{}\" is in the lan twice", m.get_ref()),
                    ));
                }
            }
            let raw_params = RawParams {
                bandwidth: l.bandwidth.clone(),
                delay: l.delay.clone(),
                jitter: l.jitter.clone(),
                loss: l.loss.clone(),
                queue: l.queue.clone(),
                queue_bytes: l.queue_bytes.clone(),
            };
            let params = self.params(&raw_params, LinkParams::default(), &subject, "")?;
            let member_names: Vec<String> = members.iter().map(|m| m.get_ref().clone()).collect();
            plans.push(NetPlan {
                name: l.name.get_ref().clone(),
                members: member_names.clone(),
                addrs: self.ips(&l.ips, members.len(), k, &subject)?,
            });
            lans.push(Lan { name: l.name.get_ref().clone(), members: member_names, params });
        }
        let mut links = Vec::new();
        for l in &raw.link {
            k += 1;
            let subject = Some(format!("link \"{}\"", l.name.get_ref()));
            for (field, end) in [("a", &l.a), ("b", &l.b)] {
                if !known.contains(end.get_ref().as_str()) {
                    return Err(unknown_node(&subject, field, end));
                }
            }
            if l.a.get_ref() == l.b.get_ref() {
                return Err(src.error(
                    SelfLink,
                    l.b.span(),
                    subject,
                    Some("b"),
                    format!("a link from node \"{}\" to itself", l.a.get_ref()),
                ));
            }
            let raw_params = RawParams {
                bandwidth: l.bandwidth.clone(),
                delay: l.delay.clone(),
                jitter: l.jitter.clone(),
                loss: l.loss.clone(),
                queue: l.queue.clone(),
                queue_bytes: l.queue_bytes.clone(),
            };
            let both = self.params(&raw_params, LinkParams::default(), &subject, "")?;
            let a_to_b = match &l.a_to_b {
                Some(o) => self.params(o, both, &subject, "a_to_b.")?,
                None => both,
            };
            let b_to_a = match &l.b_to_a {
                Some(o) => self.params(o, both, &subject, "b_to_a.")?,
                None => both,
            };
            plans.push(NetPlan {
                name: l.name.get_ref().clone(),
                members: vec![l.a.get_ref().clone(), l.b.get_ref().clone()],
                addrs: self.ips(&l.ips, 2, k, &subject)?,
            });
            links.push(Link {
                name: l.name.get_ref().clone(),
                a: l.a.get_ref().clone(),
                b: l.b.get_ref().clone(),
                a_to_b,
                b_to_a,
            });
        }

        // Interfaces in network order; every address used once.
        let mut used: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for plan in &plans {
            let subject = Some(format!("network \"{}\"", plan.name));
            for (member, (addr, prefix, span)) in plan.members.iter().zip(&plan.addrs) {
                if let Some(other) = used.insert(*addr, plan.name.clone()) {
                    return Err(src.error(
                        BadAddress,
                        span.clone(),
                        subject,
                        Some("ips"),
                        format!("address {addr} is already used in \"{other}\""),
                    ));
                }
                let node_index = nodes.iter().position(|n| &n.name == member).expect("member checked");
                let node = &mut nodes[node_index];
                let iface_index = node.ifaces.len();
                if iface_index > 255 {
                    return Err(src.error(
                        TooMany,
                        span.clone(),
                        subject,
                        None,
                        format!("node \"{member}\" has more than 256 interfaces"),
                    ));
                }
                node.ifaces.push(Iface {
                    name: format!("eth{iface_index}"),
                    network: plan.name.clone(),
                    mac: format!("52:54:00:{node_index:02x}:{iface_index:02x}:01"),
                    ip: addr.to_string(),
                    prefix_len: *prefix,
                });
            }
        }

        let placement = placement::resolve(src, &raw.host, raw.delay.as_ref(), &raw.node, &mut nodes)?;
        let checkpoint = checkpoint::resolve(src, raw.checkpoint.as_ref())?;
        Ok(Experiment {
            name: name.into_inner(),
            nodes,
            lans,
            links,
            source: source.map(Path::to_path_buf),
            placement,
            checkpoint,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests;
