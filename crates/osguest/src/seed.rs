//! The cloud-init NoCloud seed of a node: `meta-data` (instance id,
//! hostname), `user-data` (`#cloud-config`: hostname, the user's SSH keys,
//! the node's `run` commands started in the background with their output on
//! the serial console, then the `STASIS-READY node=NAME` line stasis waits
//! for) and `network-config` (version 2: every interface matched by MAC,
//! named as in the spec, with its static address and routes). The three
//! documents are JSON, which YAML (and so cloud-init) reads as well.
//!
//! The seed is a FAT image labelled `CIDATA`, written by a pure-Rust FAT
//! writer without mounting anything, byte-identical for the same node (no
//! timestamps, fixed volume id), and attached to the VM as a read-only disk:
//! one of the node's devices, saved with its checkpoints and reattached on
//! restore. Why FAT and not an ISO 9660 `cidata` image: NoCloud accepts
//! either; an ISO needs Joliet or Rock Ridge for the names `meta-data`,
//! `user-data` (ISO 9660 file names are upper-case 8.3) and a writer of its
//! own, while FAT with long names is one small crate (`fatfs`) and a
//! kernel module every distribution ships (`vfat`).

use std::io::{Cursor, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stasis_core::spec::{Experiment, Node};

/// The volume label cloud-init's NoCloud looks for (it accepts either case).
pub const LABEL: &str = "CIDATA";
/// The serial console, where run commands and the ready line print.
pub const CONSOLE: &str = "/dev/ttyS0";
/// The smallest seed image; larger ones grow with their documents.
pub const MIN_IMAGE_BYTES: u64 = 1 << 20;
/// The largest seed image (a node's run commands are what can grow it).
pub const MAX_IMAGE_BYTES: u64 = 16 << 20;

/// One interface of `network-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// The name the guest gives it (`set-name`), as in the spec: `eth0` …
    pub name: String,
    pub mac: String,
    /// `10.0.1.1/24`.
    pub addresses: Vec<String>,
    pub routes: Vec<Route>,
}

/// A static route through an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `10.0.2.0/24` or `default`.
    pub to: String,
    pub via: String,
}

/// A node's seed, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub hostname: String,
    pub instance_id: String,
    pub interfaces: Vec<Interface>,
    /// Started in the background at first boot, in order.
    pub run: Vec<String>,
    pub ssh_keys: Vec<String>,
}

/// Why a seed could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("node {node}: the seed's documents are {bytes} bytes, more than a {max} byte seed image holds")]
    TooLarge { node: String, bytes: usize, max: u64 },
    #[error("node {node}: cannot build the seed image")]
    Fat {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the seed image {}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Seed {
    /// The seed of `node` of `exp`: its addresses as the spec derives them
    /// (docs/spec.md), its run commands, the given SSH public keys.
    pub fn for_node(exp: &Experiment, node: &Node, ssh_keys: &[String]) -> Seed {
        Seed {
            hostname: node.name.clone(),
            // Stable across restores and reboots: cloud-init's per-instance
            // steps run once per root disk, never again on a restored node.
            instance_id: format!("stasis-{}-{}", exp.name, node.name),
            interfaces: node
                .ifaces
                .iter()
                .map(|i| Interface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    addresses: vec![format!("{}/{}", i.ip, i.prefix_len)],
                    routes: Vec::new(),
                })
                .collect(),
            run: node.run.clone(),
            ssh_keys: ssh_keys.to_vec(),
        }
    }

    /// `meta-data`.
    pub fn meta_data(&self) -> String {
        pretty(&json!({ "instance-id": self.instance_id, "local-hostname": self.hostname }))
    }

    /// `user-data`: a `#cloud-config` document.
    pub fn user_data(&self) -> String {
        let mut runcmd: Vec<Value> = self
            .run
            .iter()
            .enumerate()
            .map(|(i, cmd)| {
                // The command is an argument, never pasted into shell text.
                json!([
                    "sh",
                    "-c",
                    format!("setsid sh -c \"$1\" </dev/null >{CONSOLE} 2>&1 &"),
                    format!("stasis-run-{i}"),
                    cmd
                ])
            })
            .collect();
        runcmd.push(json!(["sh", "-c", format!("echo \"$1\" >{CONSOLE}"), "stasis-ready", self.ready_line()]));
        let mut doc = json!({
            "hostname": self.hostname,
            "manage_etc_hosts": true,
            "ssh_pwauth": false,
            "runcmd": runcmd,
        });
        if !self.ssh_keys.is_empty() {
            doc["ssh_authorized_keys"] = json!(self.ssh_keys);
            // The keys go to root as well (cloud-init otherwise gives root
            // a "log in as the default user" stub).
            doc["disable_root"] = json!(false);
        }
        format!("#cloud-config\n{}", pretty(&doc))
    }

    /// `network-config` (version 2).
    pub fn network_config(&self) -> String {
        let mut ethernets = serde_json::Map::new();
        for i in &self.interfaces {
            let mut e = json!({
                "match": { "macaddress": i.mac },
                "set-name": i.name,
                "addresses": i.addresses,
                "dhcp4": false,
                "dhcp6": false,
            });
            if !i.routes.is_empty() {
                e["routes"] = json!(i.routes);
            }
            ethernets.insert(i.name.clone(), e);
        }
        pretty(&json!({ "version": 2, "ethernets": ethernets }))
    }

    /// The line the node prints on its console once its run commands are started.
    pub fn ready_line(&self) -> String {
        format!("STASIS-READY node={}", self.hostname)
    }

    /// The seed as a FAT image labelled [`LABEL`]: `meta-data`, `user-data`,
    /// `network-config`. The same seed gives the same bytes.
    pub fn fat_image(&self) -> Result<Vec<u8>, SeedError> {
        let files = [
            ("meta-data", self.meta_data()),
            ("user-data", self.user_data()),
            ("network-config", self.network_config()),
        ];
        let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
        // Twice the documents (clusters, tables) and room for the root
        // directory, in whole MiB.
        let size = ((bytes as u64 * 2 + (512 << 10)).div_ceil(1 << 20) << 20).max(MIN_IMAGE_BYTES);
        if size > MAX_IMAGE_BYTES {
            return Err(SeedError::TooLarge { node: self.hostname.clone(), bytes, max: MAX_IMAGE_BYTES });
        }
        let fat = |source| SeedError::Fat { node: self.hostname.clone(), source };
        let mut img = Cursor::new(vec![0u8; size as usize]);
        let mut label = [b' '; 11];
        label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new().volume_label(label).volume_id(volume_id(&self.instance_id)),
        )
        .map_err(fat)?;
        {
            // Without fatfs's chrono feature every timestamp is the FAT epoch.
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).map_err(fat)?;
            for (name, text) in &files {
                let mut f = fs.root_dir().create_file(name).map_err(fat)?;
                f.truncate().map_err(fat)?;
                f.write_all(text.as_bytes()).map_err(fat)?;
                f.flush().map_err(fat)?;
            }
            fs.unmount().map_err(fat)?;
        }
        Ok(img.into_inner())
    }

    /// Writes [`Seed::fat_image`] to `path` (owner-only, replaced atomically).
    pub fn write_image(&self, path: &Path) -> Result<(), SeedError> {
        let img = self.fat_image()?;
        let err = |source| SeedError::Write { path: path.to_path_buf(), source };
        let tmp = path.with_extension("tmp");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?;
            f.write_all(&img).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    s.push('\n');
    s
}

/// A FAT volume id from the instance id: stable, and different per node.
fn volume_id(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests;
