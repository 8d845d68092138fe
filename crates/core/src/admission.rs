//! Admission: whether a host can give an experiment the memory it needs
//! before anything starts. Guest RAM is a lazily allocated memfd, so an
//! overcommitted host does not fail at `up` but later, when the guests touch
//! their memory and the OOM killer picks a QEMU mid-experiment.

use crate::spec::Experiment;
use std::collections::BTreeMap;

/// What one QEMU needs beyond its guest's RAM (device models, TCG's
/// translation cache, QMP, the migration buffer). An estimate from the RSS of
/// 256 MiB TCG guests here minus their RAM, rounded up; re-measure on KVM.
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// What the delay node needs: its queues (bounded by their packet counts),
/// the per-port backlogs and output buffers, mappings aside.
pub const DELAY_NODE_MIB: u64 = 256;

/// What an experiment needs on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDemand {
    /// `None`: the single host of a one-host experiment.
    pub host: Option<String>,
    pub vms: u64,
    pub guest_mib: u64,
}

impl HostDemand {
    /// Guest RAM plus each QEMU's and the delay node's own.
    pub fn total_mib(&self) -> u64 {
        self.guest_mib + self.vms * QEMU_OVERHEAD_MIB + DELAY_NODE_MIB
    }
}

/// A host that cannot give what its part of the experiment needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "experiment {experiment} needs {need} MiB on {where_}: {vms} VMs with {guest} MiB of guest RAM + {vms} × {QEMU_OVERHEAD_MIB} MiB for QEMU + {DELAY_NODE_MIB} MiB for the delay node, but only {available} MiB are available there (MemAvailable); give the nodes less memory, spread them over more hosts, or pass --overcommit to start anyway (the OOM killer may then stop a VM mid-experiment)",
    where_ = host.as_deref().map_or_else(|| "this host".to_owned(), |h| format!("host {h}"))
)]
pub struct Overcommit {
    pub experiment: String,
    pub host: Option<String>,
    pub vms: u64,
    pub guest: u64,
    pub need: u64,
    pub available: u64,
}

/// The experiment's demand per host (`None` for a one-host experiment).
pub fn demand(exp: &Experiment) -> Vec<HostDemand> {
    let mut by_host: BTreeMap<Option<String>, HostDemand> = BTreeMap::new();
    for n in &exp.nodes {
        let d =
            by_host.entry(n.host.clone()).or_insert_with(|| HostDemand { host: n.host.clone(), vms: 0, guest_mib: 0 });
        d.vms += 1;
        d.guest_mib += u64::from(n.memory_mib);
    }
    by_host.into_values().collect()
}

/// Refuses `d` when it needs more than `available_mib`.
pub fn check(experiment: &str, d: &HostDemand, available_mib: u64) -> Result<(), Overcommit> {
    let need = d.total_mib();
    if need > available_mib {
        return Err(Overcommit {
            experiment: experiment.to_owned(),
            host: d.host.clone(),
            vms: d.vms,
            guest: d.guest_mib,
            need,
            available: available_mib,
        });
    }
    Ok(())
}

/// This host's `MemAvailable` in MiB (what can be allocated without
/// swapping), from /proc/meminfo.
pub fn mem_available_mib() -> std::io::Result<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo")?)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemAvailable in /proc/meminfo"))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four_by_8g() -> Experiment {
        let mut toml = String::from("name = \"big\"\n[defaults]\nmemory = \"8G\"\n");
        for n in ["a", "b", "c", "d"] {
            toml += &format!("[[node]]\nname = \"{n}\"\n");
        }
        Experiment::from_toml_str(&toml, None).unwrap()
    }

    #[test]
    fn four_8g_nodes_on_a_24g_host_are_refused_with_the_numbers() {
        let d = demand(&four_by_8g());
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].vms, d[0].guest_mib), (4, 32768));
        let e = check("big", &d[0], 22_000).unwrap_err();
        let m = e.to_string();
        assert_eq!(e.need, 32768 + 4 * QEMU_OVERHEAD_MIB + DELAY_NODE_MIB);
        for part in ["big", "34048 MiB", "4 VMs", "32768 MiB of guest RAM", "22000 MiB", "--overcommit"] {
            assert!(m.contains(part), "{part:?} missing in {m}");
        }
    }

    #[test]
    fn what_fits_is_admitted() {
        let d = demand(&four_by_8g());
        check("big", &d[0], 40_000).unwrap();
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let m = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(parse_mem_available(m), Some(20000));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert!(mem_available_mib().unwrap() > 0);
    }
}
