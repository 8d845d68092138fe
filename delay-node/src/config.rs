//! The topology the agent writes (JSON): ports, LANs, point-to-point links and
//! the shaping of every direction.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The whole network a delay node emulates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub lans: Vec<LanConfig>,
    #[serde(default)]
    pub links: Vec<LinkConfig>,
    /// Seed of the node's random number generator (loss, jitter).
    #[serde(default)]
    pub seed: u64,
}

/// One VM NIC: the node listens on `socket` and the VM's QEMU connects to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    pub socket: PathBuf,
    /// How the VM's QEMU attaches (`"stream"` when absent).
    #[serde(default)]
    pub kind: PortKind,
    /// A [`PortKind::Tcp`] port only (required there): the one address a
    /// connection is accepted from, the VM's host. Connections from any
    /// other address are closed at once and never touch the VM's.
    #[serde(default)]
    pub peer: Option<IpAddr>,
}

/// How a VM NIC is attached to its port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    /// `-netdev stream`: length-prefixed frames over the unix socket; QEMU
    /// reads ahead of the guest, so freezes need a hold lead.
    #[default]
    Stream,
    /// `-netdev vhost-user`: the node writes the guest's RX ring itself;
    /// exact at a freeze (no hold lead), stop marker in band.
    VhostUser,
    /// `-netdev stream` over TCP, for a VM on another host: `socket` is the
    /// `ip:port` the node listens on (exactly that address, never a
    /// wildcard). Frames and freezes as for [`PortKind::Stream`].
    Tcp,
}

/// How one direction of a link or access link treats frames.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shaping {
    /// Link rate in bit/s; every frame takes `len * 8 / bandwidth` to serialise.
    /// 0 means unlimited (no serialisation delay).
    pub bandwidth_bps: u64,
    /// Propagation delay added after serialisation.
    pub delay_ns: u64,
    /// Uniform extra delay in `[0, jitter_ns]`; never reorders frames of one direction.
    pub jitter_ns: u64,
    /// Probability in `[0, 1]` that a frame is lost.
    pub loss: f64,
    /// Drop-tail limit: frames waiting for or in serialisation.
    pub queue_packets: u32,
    /// Drop-tail limit in bytes (same frames as `queue_packets`).
    pub queue_bytes: u64,
}

impl Default for Shaping {
    /// Emulab's defaults: `1000Mb 0ms`, 50-packet queue.
    fn default() -> Self {
        Shaping {
            bandwidth_bps: 1_000_000_000,
            delay_ns: 0,
            jitter_ns: 0,
            loss: 0.0,
            queue_packets: 50,
            queue_bytes: 1 << 30,
        }
    }
}

/// A switch with MAC learning joining several ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanConfig {
    pub name: String,
    pub members: Vec<LanMember>,
}

/// A port's access link to a LAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanMember {
    pub port: String,
    /// VM → switch direction.
    #[serde(default)]
    pub to_lan: Shaping,
    /// Switch → VM direction.
    #[serde(default)]
    pub from_lan: Shaping,
}

/// A point-to-point link between two ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub name: String,
    pub a: String,
    pub b: String,
    #[serde(default)]
    pub a_to_b: Shaping,
    #[serde(default)]
    pub b_to_a: Shaping,
}

/// Why a topology is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read topology {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("topology is not valid JSON")]
    Parse(#[from] serde_json::Error),
    #[error("port name {0:?} is used twice")]
    DuplicatePort(String),
    #[error("socket path {0} is used by two ports")]
    DuplicateSocket(PathBuf),
    #[error("{owner} refers to unknown port {port:?}")]
    UnknownPort { owner: String, port: String },
    #[error("port {0:?} is attached to more than one LAN or link")]
    PortAttachedTwice(String),
    #[error("{0}: loss must be within [0, 1]")]
    BadLoss(String),
    #[error("{0}: queue limits must be at least one packet and one byte")]
    EmptyQueue(String),
    #[error("link {0:?} joins a port to itself")]
    SelfLink(String),
    #[error("TCP port {0:?} names no peer address: a TCP port accepts its VM's host only")]
    TcpPortWithoutPeer(String),
    #[error("port {0:?} has a peer address but is not a TCP port")]
    PeerOnLocalPort(String),
}

impl Topology {
    /// Read and check a topology file.
    pub fn load(path: &Path) -> Result<Topology, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let topo: Topology = serde_json::from_str(&text)?;
        topo.validate()?;
        Ok(topo)
    }

    /// Check names, references and shaping values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        for p in &self.ports {
            if !names.insert(p.name.as_str()) {
                return Err(ConfigError::DuplicatePort(p.name.clone()));
            }
            if !sockets.insert(p.socket.as_path()) {
                return Err(ConfigError::DuplicateSocket(p.socket.clone()));
            }
            match (p.kind, p.peer) {
                (PortKind::Tcp, None) => return Err(ConfigError::TcpPortWithoutPeer(p.name.clone())),
                (PortKind::Stream | PortKind::VhostUser, Some(_)) => {
                    return Err(ConfigError::PeerOnLocalPort(p.name.clone()))
                }
                _ => {}
            }
        }
        let mut attached = HashSet::new();
        let mut attach = |owner: &str, port: &str| -> Result<(), ConfigError> {
            if !names.contains(port) {
                return Err(ConfigError::UnknownPort { owner: owner.to_owned(), port: port.to_owned() });
            }
            if !attached.insert(port.to_owned()) {
                return Err(ConfigError::PortAttachedTwice(port.to_owned()));
            }
            Ok(())
        };
        for lan in &self.lans {
            for m in &lan.members {
                attach(&format!("LAN {:?}", lan.name), &m.port)?;
                check_shaping(&format!("LAN {:?} member {:?} to_lan", lan.name, m.port), &m.to_lan)?;
                check_shaping(&format!("LAN {:?} member {:?} from_lan", lan.name, m.port), &m.from_lan)?;
            }
        }
        for l in &self.links {
            if l.a == l.b {
                return Err(ConfigError::SelfLink(l.name.clone()));
            }
            attach(&format!("link {:?}", l.name), &l.a)?;
            attach(&format!("link {:?}", l.name), &l.b)?;
            check_shaping(&format!("link {:?} a_to_b", l.name), &l.a_to_b)?;
            check_shaping(&format!("link {:?} b_to_a", l.name), &l.b_to_a)?;
        }
        Ok(())
    }
}

fn check_shaping(what: &str, s: &Shaping) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&s.loss) {
        return Err(ConfigError::BadLoss(what.to_owned()));
    }
    if s.queue_packets == 0 || s.queue_bytes == 0 {
        return Err(ConfigError::EmptyQueue(what.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_emulab_like_and_json_is_terse() {
        let t: Topology = serde_json::from_str(
            r#"{"ports":[{"name":"a","socket":"/tmp/a"},{"name":"b","socket":"/tmp/b"}],
                "links":[{"name":"l","a":"a","b":"b","a_to_b":{"delay_ns":5}}]}"#,
        )
        .unwrap();
        t.validate().unwrap();
        assert_eq!(t.links[0].a_to_b.bandwidth_bps, 1_000_000_000);
        assert_eq!(t.links[0].a_to_b.delay_ns, 5);
        assert_eq!(t.links[0].b_to_a, Shaping::default());
        assert_eq!(Shaping::default().queue_packets, 50);
        assert_eq!(t.ports[0].kind, PortKind::Stream);
    }

    #[test]
    fn port_kind_is_kebab_case_and_checked() {
        let t: Topology = serde_json::from_str(
            r#"{"ports":[{"name":"a","socket":"/tmp/a","kind":"vhost-user"},{"name":"b","socket":"/tmp/b","kind":"stream"}]}"#,
        )
        .unwrap();
        assert_eq!(t.ports[0].kind, PortKind::VhostUser);
        assert_eq!(t.ports[1].kind, PortKind::Stream);
        assert!(serde_json::to_string(&t).unwrap().contains(r#""kind":"vhost-user""#));
        assert!(serde_json::from_str::<Topology>(r#"{"ports":[{"name":"a","socket":"/a","kind":"tap"}]}"#).is_err());
    }

    #[test]
    fn refuses_bad_references() {
        let mut t: Topology = serde_json::from_str(
            r#"{"ports":[{"name":"a","socket":"/tmp/a"},{"name":"b","socket":"/tmp/b"}],
                "links":[{"name":"l","a":"a","b":"c"}]}"#,
        )
        .unwrap();
        assert!(matches!(t.validate(), Err(ConfigError::UnknownPort { .. })));
        t.links[0].b = "b".into();
        t.lans.push(LanConfig {
            name: "x".into(),
            members: vec![LanMember { port: "a".into(), to_lan: Shaping::default(), from_lan: Shaping::default() }],
        });
        assert!(matches!(t.validate(), Err(ConfigError::PortAttachedTwice(_))));
        t.lans.clear();
        t.links[0].a_to_b.loss = 1.5;
        assert!(matches!(t.validate(), Err(ConfigError::BadLoss(_))));
    }
}
