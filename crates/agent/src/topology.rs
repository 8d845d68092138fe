//! From an experiment spec to the delay node's topology.
//!
//! A LAN's `delay` is the one-way delay between any two members, like
//! Emulab's: each member's access link carries half of it towards the switch
//! and the other half away from it; bandwidth and queue apply on both halves,
//! loss only on the way in (so a frame is lost with the configured
//! probability, not twice it).

use crate::layout::Layout;
use delay_node::config::{LanConfig, LanMember, LinkConfig, PortConfig, PortKind, Shaping, Topology};
use stasis_core::spec::{Experiment, LinkParams, NicMode};

fn shaping(p: &LinkParams, delay_ns: u64, loss: f64) -> Shaping {
    Shaping {
        bandwidth_bps: p.bandwidth_bps,
        delay_ns,
        jitter_ns: p.jitter_ns / 2,
        loss,
        queue_packets: p.queue_packets,
        queue_bytes: p.queue_bytes,
    }
}

/// The delay node's topology for `exp`, with port sockets placed by `layout`.
pub fn topology_for(exp: &Experiment, layout: &Layout, seed: u64) -> Topology {
    let mut ports = Vec::new();
    for node in &exp.nodes {
        for iface in &node.ifaces {
            ports.push(PortConfig {
                name: port_name(&node.name, &iface.name),
                socket: layout.port_socket(&node.name, &iface.name),
                kind: port_kind(node.nic),
                peer: None,
            });
        }
    }
    let port_on = |node: &str, network: &str| -> String {
        let n = exp.node(node).expect("spec validated: member is a node");
        let iface =
            n.ifaces.iter().find(|i| i.network == network).expect("spec validated: member has an iface on its network");
        port_name(node, &iface.name)
    };
    let lans = exp
        .lans
        .iter()
        .map(|lan| {
            let half = lan.params.delay_ns / 2;
            LanConfig {
                name: lan.name.clone(),
                members: lan
                    .members
                    .iter()
                    .map(|m| LanMember {
                        port: port_on(m, &lan.name),
                        to_lan: shaping(&lan.params, half, lan.params.loss),
                        from_lan: shaping(&lan.params, lan.params.delay_ns - half, 0.0),
                    })
                    .collect(),
            }
        })
        .collect();
    let links = exp
        .links
        .iter()
        .map(|l| LinkConfig {
            name: l.name.clone(),
            a: port_on(&l.a, &l.name),
            b: port_on(&l.b, &l.name),
            a_to_b: Shaping { jitter_ns: l.a_to_b.jitter_ns, ..shaping(&l.a_to_b, l.a_to_b.delay_ns, l.a_to_b.loss) },
            b_to_a: Shaping { jitter_ns: l.b_to_a.jitter_ns, ..shaping(&l.b_to_a, l.b_to_a.delay_ns, l.b_to_a.loss) },
        })
        .collect();
    Topology { ports, lans, links, seed }
}

/// The delay-node port kind serving a node's NICs. The agent's freeze still
/// sends one hold lead for the whole node; the delay node ignores it for
/// vhost-user ports, which it delivers to right up to the freeze instant.
pub fn port_kind(nic: NicMode) -> PortKind {
    match nic {
        NicMode::Stream => PortKind::Stream,
        NicMode::VhostUser => PortKind::VhostUser,
    }
}

/// The delay-node port name of a VM NIC.
pub fn port_name(node: &str, iface: &str) -> String {
    format!("{node}.{iface}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_delay_is_split_across_the_two_hops() {
        let exp = Experiment::from_toml_str(
            r#"
name = "t"
[[node]]
name = "a"
[[node]]
name = "b"
[[lan]]
name = "lan0"
members = ["a", "b"]
delay = "11ms"
bandwidth = "100Mb"
loss = 0.01
"#,
            None,
        )
        .unwrap();
        let dir = std::path::Path::new("/state");
        let topo = topology_for(&exp, &Layout::new(dir, "t"), 7);
        assert_eq!(topo.ports.len(), 2);
        let m = &topo.lans[0].members[0];
        assert_eq!(m.to_lan.delay_ns + m.from_lan.delay_ns, 11_000_000);
        assert_eq!(m.to_lan.bandwidth_bps, 100_000_000);
        assert_eq!(m.to_lan.loss, 0.01);
        assert_eq!(m.from_lan.loss, 0.0);
        assert_eq!(topo.lans[0].members[1].port, "b.eth0");
        assert!(topo.ports.iter().all(|p| p.kind == PortKind::VhostUser), "vhost-user is the default");
    }

    #[test]
    fn vhost_user_nodes_get_vhost_user_ports() {
        let exp = Experiment::from_toml_str(
            "name = \"t\"\nnic = \"vhost-user\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nnic = \"stream\"\n[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\n",
            None,
        )
        .unwrap();
        let topo = topology_for(&exp, &Layout::new(std::path::Path::new("/state"), "t"), 7);
        let kinds: Vec<_> = topo.ports.iter().map(|p| (p.name.as_str(), p.kind)).collect();
        assert_eq!(kinds, [("a.eth0", PortKind::VhostUser), ("b.eth0", PortKind::Stream)]);
    }
}
