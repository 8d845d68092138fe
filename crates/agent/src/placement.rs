//! What of a multi-host experiment runs on one host, and how its VMs reach
//! the delay node: VMs on the delay node's host attach to it as on one host
//! (unix stream socket or vhost-user); VMs on other hosts attach with
//! `-netdev stream` over TCP to a listener the delay node opens for them on
//! its host's agent address, port `delay_port_base + k` for its `k`-th port
//! (spec order of nodes and interfaces).

use crate::host::{self, Tools, UpError};
use crate::layout::Layout;
use crate::topology::{port_name, topology_for};
use delay_node::config::{PortKind, Topology};
use stasis_core::spec::{Experiment, Node};
use stasis_qemu::vm::VmSpec;
use stasis_qemu::NicBackend;
use std::net::SocketAddr;

/// The TCP address of the delay-node port serving `node`'s `iface`, when
/// the node runs on another host than the delay node; `None` otherwise (or
/// for a single-host experiment).
pub fn remote_port_addr(exp: &Experiment, node: &str, iface: &str) -> Option<SocketAddr> {
    let p = exp.placement.as_ref()?;
    let n = exp.node(node)?;
    if n.host.as_deref() == Some(p.delay_host.as_str()) {
        return None;
    }
    let k = exp
        .nodes
        .iter()
        .flat_map(|n| n.ifaces.iter().map(move |i| (n.name.as_str(), i.name.as_str())))
        .position(|x| x == (node, iface))?;
    let ip = p.host(&p.delay_host)?.agent.ip();
    Some(SocketAddr::new(ip, p.delay_port_base + k as u16))
}

/// The address of the host `node` runs on (its agent's).
fn vm_host_ip(exp: &Experiment, node: &str) -> Option<std::net::IpAddr> {
    let p = exp.placement.as_ref()?;
    Some(p.host(exp.node(node)?.host.as_deref()?)?.agent.ip())
}

/// The nodes placed on `host`.
pub fn nodes_on<'a>(exp: &'a Experiment, host: &str) -> Vec<&'a Node> {
    exp.nodes.iter().filter(|n| n.host.as_deref() == Some(host)).collect()
}

/// Whether `host` runs the delay node.
pub fn runs_delay_node(exp: &Experiment, host: &str) -> bool {
    exp.placement.as_ref().is_some_and(|p| p.delay_host == host)
}

/// The delay node's topology: as on one host, with TCP ports for the VMs
/// on other hosts, each accepting only its VM's host (that host's agent
/// address: the VM's QEMU reaches the delay node from it).
pub fn topology_on_delay_host(exp: &Experiment, layout: &Layout) -> Topology {
    let mut topo = topology_for(exp, layout, host::seed_of(&exp.name));
    for n in &exp.nodes {
        for i in &n.ifaces {
            if let Some(addr) = remote_port_addr(exp, &n.name, &i.name) {
                let name = port_name(&n.name, &i.name);
                if let Some(p) = topo.ports.iter_mut().find(|p| p.name == name) {
                    p.kind = PortKind::Tcp;
                    p.socket = addr.to_string().into();
                    p.peer = vm_host_ip(exp, &n.name);
                }
            }
        }
    }
    topo
}

/// How `node` is launched on its host: as on one host, with TCP NICs when
/// the delay node is elsewhere.
#[allow(clippy::result_large_err)] // UpError is host.rs's, large like its other results
pub fn vm_spec_on_host(exp: &Experiment, node: &Node, layout: &Layout, tools: &Tools) -> Result<VmSpec, UpError> {
    if node.image.is_some() {
        return Err(crate::rootdisk::RootDiskError::MultiHost { node: node.name.clone() }.into());
    }
    let mut spec = host::vm_spec(exp, node, layout, tools)?;
    for nic in &mut spec.nics {
        if let Some(addr) = remote_port_addr(exp, &node.name, &nic.id) {
            nic.backend = NicBackend::StreamTcp;
            nic.socket = addr.to_string().into();
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"name = "t"
nic = "stream"
[[host]]
name = "h1"
agent = "10.77.0.1:7700"
[[host]]
name = "h2"
agent = "10.77.0.2:7700"
[delay]
host = "h2"
port_base = 9000
[[node]]
name = "a"
host = "h1"
[[node]]
name = "b"
host = "h2"
nic = "vhost-user"
[[node]]
name = "c"
host = "h1"
[[lan]]
name = "lan0"
members = ["a", "b", "c"]
[[link]]
name = "l"
a = "a"
b = "c"
"#;

    #[test]
    fn remote_nodes_get_tcp_ports_on_the_delay_hosts_address() {
        let exp = Experiment::from_toml_str(SPEC, None).unwrap();
        let layout = Layout::new(std::path::Path::new("/state"), "t");
        let topo = topology_on_delay_host(&exp, &layout);
        let ports: Vec<_> =
            topo.ports.iter().map(|p| (p.name.as_str(), p.kind, p.socket.to_string_lossy().into_owned())).collect();
        // Ports in order: a.eth0 a.eth1 b.eth0 c.eth0 c.eth1.
        assert_eq!(ports[0], ("a.eth0", PortKind::Tcp, "10.77.0.2:9000".into()));
        // Each TCP port accepts its VM's host only.
        let peers: Vec<_> = topo.ports.iter().map(|p| p.peer.map(|ip| ip.to_string())).collect();
        let h1 = Some("10.77.0.1".to_string());
        assert_eq!(peers, [h1.clone(), h1.clone(), None, h1.clone(), h1]);
        topo.validate().unwrap();
        assert_eq!(ports[1], ("a.eth1", PortKind::Tcp, "10.77.0.2:9001".into()));
        assert_eq!((ports[2].0, ports[2].1), ("b.eth0", PortKind::VhostUser));
        assert_eq!(ports[3], ("c.eth0", PortKind::Tcp, "10.77.0.2:9003".into()));
        assert_eq!(remote_port_addr(&exp, "b", "eth0"), None, "b runs with the delay node");
        assert_eq!(nodes_on(&exp, "h1").iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert!(runs_delay_node(&exp, "h2") && !runs_delay_node(&exp, "h1"));
    }

    #[test]
    fn remote_vms_connect_over_tcp() {
        let exp = Experiment::from_toml_str(SPEC, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "").unwrap();
        let tools = Tools {
            delay_node_bin: "/nonexistent".into(),
            default_kernel: dir.path().join("k"),
            default_initrd: dir.path().join("k"),
            accel: stasis_qemu::accel::Accel::Tcg,
        };
        let layout = Layout::new(dir.path(), "t");
        let a = vm_spec_on_host(&exp, exp.node("a").unwrap(), &layout, &tools).unwrap();
        assert_eq!(a.nics[1].backend, NicBackend::StreamTcp);
        assert_eq!(a.nics[1].tcp_addr().unwrap(), "10.77.0.2:9001".parse().unwrap());
        let b = vm_spec_on_host(&exp, exp.node("b").unwrap(), &layout, &tools).unwrap();
        assert_eq!(b.nics[0].backend, NicBackend::VhostUser);
    }
}
