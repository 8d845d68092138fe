//! Placing an experiment on several hosts: `[[host]]` entries naming each
//! host's agent address, `host = "h1"` on a node, and `[delay] host = "h1"`
//! for the delay node. Without any `[[host]]` the experiment runs on one
//! host as before and none of these fields may appear.
//!
//! A node on another host than the delay node reaches it over TCP
//! (`-netdev stream` with an inet address); vhost-user shares guest memory
//! with the delay node and so only works on the delay node's own host.

use super::{NicMode, Node, RawNode, Source, SpecError, SpecErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use toml::Spanned;

/// First TCP port of the delay node's listeners for nodes on other hosts
/// when `[delay] port_base` does not say.
pub const DEFAULT_DELAY_PORT_BASE: u16 = 7800;

/// One host of a multi-host experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Where the host's agent daemon listens (never a wildcard address).
    pub agent: SocketAddr,
}

/// Where everything runs (present only when the spec has `[[host]]`s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub hosts: Vec<Host>,
    /// The host running the delay node.
    pub delay_host: String,
    /// Port `k` of the delay node (in spec order of nodes and interfaces)
    /// listens on TCP `delay host's agent IP : port_base + k` when its node
    /// is on another host.
    pub delay_port_base: u16,
}

impl Placement {
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    name: Spanned<String>,
    agent: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelay {
    host: Option<Spanned<String>>,
    port_base: Option<Spanned<i64>>,
}

/// Resolve the hosts and set every node's `host` (a node without one goes
/// to the first host). Errors name the line and field.
pub(super) fn resolve(
    src: &Source<'_>,
    hosts: &[RawHost],
    delay: Option<&RawDelay>,
    raw_nodes: &[RawNode],
    nodes: &mut [Node],
) -> Result<Option<Placement>, SpecError> {
    use SpecErrorKind::*;
    if hosts.is_empty() {
        if let Some(n) = raw_nodes.iter().find_map(|n| n.host.as_ref()) {
            return Err(src.error(
                UnknownField,
                n.span(),
                None,
                Some("host"),
                "a node names a host but the spec has no [[host]]",
            ));
        }
        if let Some(d) = delay {
            let span = d.host.as_ref().map(|h| h.span()).or(d.port_base.as_ref().map(|p| p.span())).unwrap_or(0..0);
            return Err(src.error(UnknownField, span, Some("[delay]".into()), None, "[delay] needs [[host]] entries"));
        }
        return Ok(None);
    }
    let mut out: Vec<Host> = Vec::new();
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    for h in hosts {
        let subject = Some(format!("host \"{}\"", h.name.get_ref()));
        if !super::is_name(h.name.get_ref(), super::NAME_MAX) {
            return Err(src.error(
                BadName,
                h.name.span(),
                subject,
                Some("name"),
                "a host name must match [a-z][a-z0-9-]*",
            ));
        }
        if out.iter().any(|o| &o.name == h.name.get_ref()) {
            return Err(src.error(DuplicateName, h.name.span(), subject, Some("name"), "two hosts have this name"));
        }
        let agent: SocketAddr = h.agent.get_ref().parse().map_err(|_| {
            src.error(
                BadAddress,
                h.agent.span(),
                subject.clone(),
                Some("agent"),
                format!("\"{}\" is not an IP:port address", h.agent.get_ref()),
            )
        })?;
        if agent.ip().is_unspecified() || agent.port() == 0 {
            return Err(src.error(
                BadAddress,
                h.agent.span(),
                subject,
                Some("agent"),
                "the agent address must be a concrete IP and a non-zero port",
            ));
        }
        if let Some(other) = addrs.insert(agent, h.name.get_ref().clone()) {
            return Err(src.error(
                BadAddress,
                h.agent.span(),
                subject,
                Some("agent"),
                format!("host \"{other}\" has the same agent address"),
            ));
        }
        out.push(Host { name: h.name.get_ref().clone(), agent });
    }
    let known = |name: &Spanned<String>, subject: Option<String>| -> Result<String, SpecError> {
        if out.iter().any(|h| &h.name == name.get_ref()) {
            Ok(name.get_ref().clone())
        } else {
            let names: Vec<&str> = out.iter().map(|h| h.name.as_str()).collect();
            Err(src.error(
                UnknownNode,
                name.span(),
                subject,
                Some("host"),
                format!("unknown host \"{}\" (hosts: {})", name.get_ref(), names.join(", ")),
            ))
        }
    };
    let delay_host = match delay.and_then(|d| d.host.as_ref()) {
        Some(h) => known(h, Some("[delay]".into()))?,
        None => out[0].name.clone(),
    };
    let delay_port_base = match delay.and_then(|d| d.port_base.as_ref()) {
        Some(p) => {
            let ports = nodes.iter().map(|n| n.ifaces.len()).sum::<usize>() as i64;
            let v = *p.get_ref();
            if !(1..=i64::from(u16::MAX) - ports).contains(&v) {
                return Err(src.error(
                    OutOfRange,
                    p.span(),
                    Some("[delay]".into()),
                    Some("port_base"),
                    format!("port_base {v} leaves no room for {ports} ports below 65536"),
                ));
            }
            v as u16
        }
        None => DEFAULT_DELAY_PORT_BASE,
    };
    for (raw, node) in raw_nodes.iter().zip(nodes.iter_mut()) {
        let subject = Some(format!("node \"{}\"", node.name));
        node.host = Some(match &raw.host {
            Some(h) => known(h, subject.clone())?,
            None => out[0].name.clone(),
        });
        if node.host.as_deref() != Some(delay_host.as_str()) && node.nic == NicMode::VhostUser {
            let span =
                raw.nic.as_ref().map(|n| n.span()).or(raw.host.as_ref().map(|h| h.span())).unwrap_or(raw.name.span());
            return Err(src.error(
                OutOfRange,
                span,
                subject,
                Some("nic"),
                format!(
                    "vhost-user needs the delay node on the node's own host (node on \"{}\", delay node on \"{delay_host}\"); use nic = \"stream\" (TCP across hosts)",
                    node.host.as_deref().unwrap_or("")
                ),
            ));
        }
        if let Some(d) = &raw.disk {
            return Err(src.error(
                Unsupported,
                d.span(),
                subject,
                Some("disk"),
                "data disks are not supported in multi-host experiments yet",
            ));
        }
    }
    Ok(Some(Placement { hosts: out, delay_host, delay_port_base }))
}

/// The canonical TOML of a placement (after the nodes' own fields).
pub(super) fn to_toml(p: &Placement, q: &dyn Fn(&str) -> String) -> String {
    let mut out = String::new();
    for h in &p.hosts {
        out += &format!("\n[[host]]\nname = {}\nagent = {}\n", q(&h.name), q(&h.agent.to_string()));
    }
    out += &format!("\n[delay]\nhost = {}\nport_base = {}\n", q(&p.delay_host), p.delay_port_base);
    out
}
