//! What an experiment resolves to, for people and programs: `stasis validate`
//! and `stasis up --dry-run` print it (text, or JSON with `--json`) without
//! starting anything. Every node with its image and boot mode and every
//! interface with its MAC and address — what the cloud-init seed gives the
//! guest — and every LAN and link with its shaping.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{format_bandwidth_bps, format_bytes, format_duration_ns, format_memory_mib, Boot, Experiment, LinkParams};

/// The derived topology of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub name: String,
    pub digest: String,
    pub source: Option<PathBuf>,
    pub nodes: Vec<NodeDescription>,
    pub lans: Vec<LanDescription>,
    pub links: Vec<LinkDescription>,
    /// Periodic checkpoints (`[checkpoint]`), if any.
    #[serde(default)]
    pub checkpoint: Option<super::CheckpointPolicy>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub os: Option<String>,
    /// The root disk image; `None`: the project's busybox guest.
    pub image: Option<PathBuf>,
    pub boot: Boot,
    /// For `boot = "kernel"`: the kernel and initrd (`None`: the project's).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    pub disk_bytes: Option<u64>,
    pub interfaces: Vec<InterfaceDescription>,
    pub run: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDescription {
    pub name: String,
    pub mac: String,
    /// `10.0.1.1/24`.
    pub address: String,
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanDescription {
    pub name: String,
    pub members: Vec<String>,
    pub shaping: LinkParams,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkDescription {
    pub name: String,
    pub a: String,
    pub b: String,
    pub a_to_b: LinkParams,
    pub b_to_a: LinkParams,
}

impl Experiment {
    /// The experiment as `stasis validate` shows it.
    pub fn describe(&self) -> Description {
        Description {
            name: self.name.clone(),
            digest: self.digest(),
            source: self.source.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeDescription {
                    name: n.name.clone(),
                    memory_mib: n.memory_mib,
                    vcpus: n.vcpus,
                    os: n.os.clone(),
                    image: n.image.clone(),
                    boot: n.boot,
                    kernel: n.kernel.clone(),
                    initrd: n.initrd.clone(),
                    kernel_args: n.kernel_args.clone(),
                    disk_bytes: n.disk_bytes,
                    interfaces: n
                        .ifaces
                        .iter()
                        .map(|i| InterfaceDescription {
                            name: i.name.clone(),
                            mac: i.mac.clone(),
                            address: format!("{}/{}", i.ip, i.prefix_len),
                            network: i.network.clone(),
                        })
                        .collect(),
                    run: n.run.clone(),
                })
                .collect(),
            lans: self
                .lans
                .iter()
                .map(|l| LanDescription { name: l.name.clone(), members: l.members.clone(), shaping: l.params })
                .collect(),
            links: self
                .links
                .iter()
                .map(|l| LinkDescription {
                    name: l.name.clone(),
                    a: l.a.clone(),
                    b: l.b.clone(),
                    a_to_b: l.a_to_b,
                    b_to_a: l.b_to_a,
                })
                .collect(),
            checkpoint: self.checkpoint,
            warnings: self.warnings.clone(),
        }
    }
}

/// `100Mb, delay 10ms, jitter 0, loss 0, queue 50 pkts`.
fn shaping(p: &LinkParams) -> String {
    let mut s = format!(
        "{}, delay {}, jitter {}, loss {}, queue {} pkts",
        format_bandwidth_bps(p.bandwidth_bps),
        format_duration_ns(p.delay_ns),
        format_duration_ns(p.jitter_ns),
        p.loss,
        p.queue_packets
    );
    if p.queue_bytes != super::DEFAULT_QUEUE_BYTES {
        s += &format!(" / {}", format_bytes(p.queue_bytes));
    }
    s
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "experiment {} (digest {})", self.name, &self.digest[..self.digest.len().min(16)])?;
        if let Some(s) = &self.source {
            write!(f, " from {}", s.display())?;
        }
        writeln!(f)?;
        writeln!(f, "nodes ({}):", self.nodes.len())?;
        for n in &self.nodes {
            let what = match (&n.image, n.boot) {
                (None, _) => match &n.kernel {
                    None => "the project's busybox guest".to_owned(),
                    Some(k) => format!("kernel {}", k.display()),
                },
                (Some(i), Boot::Firmware) => format!("image {}, firmware boot", i.display()),
                (Some(i), Boot::Kernel) => format!(
                    "image {}, kernel boot ({})",
                    i.display(),
                    n.kernel.as_ref().map_or("the project's kernel".to_owned(), |k| k.display().to_string())
                ),
            };
            let os = n.os.as_ref().map(|o| format!(" (os {o})")).unwrap_or_default();
            writeln!(
                f,
                "  {}: {}, {} vCPU{}, {what}{os}",
                n.name,
                format_memory_mib(n.memory_mib.into()),
                n.vcpus,
                if n.vcpus == 1 { "" } else { "s" }
            )?;
            if !n.kernel_args.is_empty() {
                writeln!(f, "      kernel args: {}", n.kernel_args)?;
            }
            if let Some(d) = n.disk_bytes {
                writeln!(f, "      data disk: {}", format_bytes(d))?;
            }
            for i in &n.interfaces {
                writeln!(f, "      {} {} {} on {}", i.name, i.mac, i.address, i.network)?;
            }
            for r in &n.run {
                writeln!(f, "      run: {r}")?;
            }
        }
        if !self.lans.is_empty() {
            writeln!(f, "lans ({}):", self.lans.len())?;
            for l in &self.lans {
                writeln!(f, "  {}: {} — {}", l.name, l.members.join(" "), shaping(&l.shaping))?;
            }
        }
        if !self.links.is_empty() {
            writeln!(f, "links ({}):", self.links.len())?;
            for l in &self.links {
                if l.a_to_b == l.b_to_a {
                    writeln!(f, "  {}: {} <-> {} — {}", l.name, l.a, l.b, shaping(&l.a_to_b))?;
                } else {
                    writeln!(f, "  {}: {} -> {} — {}", l.name, l.a, l.b, shaping(&l.a_to_b))?;
                    writeln!(f, "  {}: {} -> {} — {}", l.name, l.b, l.a, shaping(&l.b_to_a))?;
                }
            }
        }
        if let Some(c) = &self.checkpoint {
            writeln!(f, "periodic checkpoints (stasis supervise): {c}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Experiment;

    #[test]
    fn the_description_shows_every_node_interface_and_network() {
        let spec = r#"name = "lab"
[images]
U = "/img/u.qcow2"
[[node]]
name = "a"
os = "U"
[[node]]
name = "b"
run = ["echo hi"]
[[lan]]
name = "lan0"
members = ["a", "b"]
bandwidth = "100Mb"
delay = "10ms"
[[link]]
name = "l0"
a = "a"
b = "b"
bandwidth = "10Mb"
[link.b_to_a]
delay = "7ms"
"#;
        let e = Experiment::from_toml_str(spec, None).unwrap();
        let d = e.describe();
        assert_eq!(d.digest, e.digest());
        assert_eq!(d.nodes[0].interfaces.len(), 2);
        assert_eq!(d.nodes[0].interfaces[1].address, "10.0.2.1/24");
        let text = d.to_string();
        for needle in [
            "experiment lab",
            // 1G: the default memory of a node with an OS image.
            "a: 1G, 1 vCPU, image /img/u.qcow2, firmware boot (os U)",
            "b: 256M, 1 vCPU, the project's busybox guest",
            "eth0 52:54:00:00:00:01 10.0.1.1/24 on lan0",
            "eth1 52:54:00:01:01:01 10.0.2.2/24 on l0",
            "run: echo hi",
            "lan0: a b — 100Mb, delay 10ms",
            "l0: a -> b — 10Mb, delay 0",
            "l0: b -> a — 10Mb, delay 7ms",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        let json: super::Description = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(json, d);
    }
}
