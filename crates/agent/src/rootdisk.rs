//! Root disks of OS-image nodes (docs/images.md): the per-node overlay on
//! the user's image, the image's identity recorded in every checkpoint, and
//! the node's cloud-init seed.
//!
//! A root disk is the node's disk ([`stasis_qemu::vm::DISK_ID`]) like a data
//! disk: its chain is `user image ← ov-1 ← ov-2 …` under
//! `<state>/<exp>/disks/<node>/`, switched to a new overlay in every freeze
//! and restarted on a fresh overlay over the frozen one by a restore. The
//! user's image is only ever a backing file, which QEMU opens read-only.
//!
//! **Identity.** The overlays store only the clusters the guest wrote; every
//! other read goes to the user's image, so a restore over a changed image
//! would show the guest a disk it never had. The checkpoint records the
//! image's size and BLAKE3 (`bases.json`); a cheaper fingerprint (size and
//! mtime, or a few sampled blocks) would miss an edit that keeps the size
//! and restores the mtime, or one outside the samples, and a wrong disk is
//! silent corruption. BLAKE3 of a 1 GB image takes a few seconds, so it is
//! computed once per file version and cached by (device, inode, size, mtime
//! in ns) in `<state>/image-ids.json`: a changed file has another key and
//! is hashed again.

use serde::{Deserialize, Serialize};
use stasis_core::spec::{Experiment, Node};
use stasis_core::versioned::{self, FormatVersion, Persisted};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Per-checkpoint record of each root disk's base image (`bases.json`: node → identity).
pub const BASES_FILE: &str = "bases.json";

/// What a base image is: its path, size and BLAKE3 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    pub path: PathBuf,
    pub bytes: u64,
    pub blake3: String,
}

/// Errors of the root disk operations.
#[derive(Debug, thiserror::Error)]
pub enum RootDiskError {
    #[error("node {node:?}: base image {path}")]
    Read {
        node: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "node {node:?}: base image {path} changed since the checkpoint ({was} bytes, BLAKE3 {was_hash}; now {now} \
         bytes, BLAKE3 {now_hash}): its root disk would not be the one checkpointed; put the original image back"
    )]
    Changed { node: String, path: PathBuf, was: u64, was_hash: String, now: u64, now_hash: String },
    #[error("node {node:?}: base image {path} is not what the checkpoint recorded ({recorded})")]
    Moved { node: String, path: PathBuf, recorded: PathBuf },
    #[error("node {node:?}: {message}")]
    Image { node: String, message: String },
    #[error("node {node:?}: root disk overlay")]
    Overlay {
        node: String,
        #[source]
        source: stasis_qemu::disk::DiskError,
    },
    #[error("node {node:?}: cloud-init seed")]
    Seed {
        node: String,
        #[source]
        source: stasis_osguest::seed::SeedError,
    },
    #[error("node {node:?} has an OS image: OS images run on one host only so far (docs/images.md)")]
    MultiHost { node: String },
    #[error("node {node:?}: has both an image and a data disk; an OS-image node's disk is its root disk (give the image room instead: guest/debian/build.sh --size)")]
    ImageAndDisk { node: String },
}

/// The base image identities of a checkpoint (`bases.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bases(pub BTreeMap<String, BaseIdentity>);

impl Persisted for Bases {
    const FORMAT: &'static str = "stasis-bases";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// The identity cache: `dev:ino:size:mtime_ns` → BLAKE3.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
struct IdCache(BTreeMap<String, String>);

impl Persisted for IdCache {
    const FORMAT: &'static str = "stasis-image-ids";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

fn cache_key(m: &std::fs::Metadata) -> String {
    format!("{}:{}:{}:{}", m.dev(), m.ino(), m.size(), m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The identity of `path`, hashed only when `cache` (a file) has no entry
/// for this version of it.
pub fn identity(node: &str, path: &Path, cache: &Path) -> Result<BaseIdentity, RootDiskError> {
    let read = |source| RootDiskError::Read { node: node.into(), path: path.into(), source };
    let before = std::fs::metadata(path).map_err(read)?;
    let key = cache_key(&before);
    let mut ids: IdCache = versioned::read_opt(cache).ok().flatten().unwrap_or_default();
    let hash = match ids.0.get(&key) {
        Some(h) => h.clone(),
        None => {
            let h = hash_file(path).map_err(read)?;
            // Written while it was hashed: do not cache what may be a mix.
            let after = std::fs::metadata(path).map_err(read)?;
            if cache_key(&after) == key {
                ids.0.insert(key, h.clone());
                if let Err(e) = versioned::write_atomic(cache, &ids) {
                    tracing::warn!(cache = %cache.display(), error = %e, "cannot cache the image identity");
                }
            }
            h
        }
    };
    Ok(BaseIdentity { path: path.to_owned(), bytes: before.size(), blake3: hash })
}

/// Refuses `now` unless it is the `recorded` identity of `node`'s base.
pub fn check(node: &str, recorded: &BaseIdentity, now: &BaseIdentity) -> Result<(), RootDiskError> {
    if recorded.path != now.path {
        return Err(RootDiskError::Moved {
            node: node.into(),
            path: now.path.clone(),
            recorded: recorded.path.clone(),
        });
    }
    if recorded.bytes != now.bytes || recorded.blake3 != now.blake3 {
        return Err(RootDiskError::Changed {
            node: node.into(),
            path: now.path.clone(),
            was: recorded.bytes,
            was_hash: recorded.blake3.clone(),
            now: now.bytes,
            now_hash: now.blake3.clone(),
        });
    }
    Ok(())
}

/// `<state>/image-ids.json`, beside every experiment's directory (an image
/// shared by experiments is hashed once).
pub fn cache_path(layout: &crate::layout::Layout) -> PathBuf {
    layout.root().parent().unwrap_or(layout.root()).join("image-ids.json")
}

/// The first overlay of `node`'s root disk in `dir`, on its image (format
/// given explicitly, probed from the file's first bytes as the spec did).
pub fn create_root_overlay(node: &Node, image: &Path, dir: &Path) -> Result<PathBuf, RootDiskError> {
    let format = stasis_core::spec::probe_image(image)
        .map_err(|e| RootDiskError::Image { node: node.name.clone(), message: e.to_string() })?;
    let image = std::path::absolute(image).map_err(|source| RootDiskError::Read {
        node: node.name.clone(),
        path: image.into(),
        source,
    })?;
    let top = crate::host::next_overlay(dir);
    stasis_qemu::disk::create_overlay_of(&top, &image, format.as_str())
        .map_err(|source| RootDiskError::Overlay { node: node.name.clone(), source })?;
    Ok(top)
}

/// `<state>/<exp>/seeds/<node>.img`: the node's cloud-init seed.
pub fn seed_path(layout: &crate::layout::Layout, node: &str) -> PathBuf {
    layout.root().join("seeds").join(format!("{node}.img"))
}

/// Writes `node`'s seed (owner-only). The same spec gives the same bytes,
/// so a restore rewriting it attaches what the guest saw.
pub fn write_seed(exp: &Experiment, node: &Node, layout: &crate::layout::Layout) -> Result<PathBuf, RootDiskError> {
    let path = seed_path(layout, &node.name);
    let err = |source| RootDiskError::Seed { node: node.name.clone(), source };
    if let Some(dir) = path.parent() {
        stasis_core::private::create_dir_all(dir).map_err(|source| RootDiskError::Read {
            node: node.name.clone(),
            path: dir.into(),
            source,
        })?;
    }
    stasis_osguest::seed::Seed::for_node(exp, node, &[]).write_image(&path).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_hashed_once_per_file_version_and_a_change_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let cache = dir.path().join("ids.json");
        std::fs::write(&img, vec![7u8; 4096]).unwrap();
        let a = identity("n", &img, &cache).unwrap();
        assert_eq!(a.bytes, 4096);
        assert_eq!(a.blake3, blake3::hash(&[7u8; 4096]).to_hex().to_string());
        // Cached: a wrong cached hash is what comes back for the same version.
        let mut ids: IdCache = versioned::read(&cache).unwrap();
        assert_eq!(ids.0.len(), 1);
        for v in ids.0.values_mut() {
            *v = "cached".into();
        }
        versioned::write_atomic(&cache, &ids).unwrap();
        assert_eq!(identity("n", &img, &cache).unwrap().blake3, "cached");
        // Same size, other bytes, other mtime: hashed again, and refused.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&img, vec![8u8; 4096]).unwrap();
        let b = identity("n", &img, &cache).unwrap();
        assert_eq!(b.blake3, blake3::hash(&[8u8; 4096]).to_hex().to_string());
        check("n", &a, &a).unwrap();
        let e = check("n", &a, &b).unwrap_err();
        assert!(matches!(e, RootDiskError::Changed { .. }));
        assert!(e.to_string().contains(&img.display().to_string()), "{e}");
        let moved = BaseIdentity { path: dir.path().join("other.raw"), ..a.clone() };
        assert!(matches!(check("n", &a, &moved), Err(RootDiskError::Moved { .. })));
        // A missing image names its file.
        let gone = identity("n", &dir.path().join("gone.qcow2"), &cache).unwrap_err();
        assert!(gone.to_string().contains("gone.qcow2"), "{gone}");
    }

    #[test]
    fn a_root_overlay_names_its_base_and_the_base_format() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let node_dir = dir.path().join("disks").join("a");
        std::fs::create_dir_all(&node_dir).unwrap();
        let exp = Experiment::from_toml_str("name = \"e\"\n[[node]]\nname = \"a\"\n", None).unwrap();
        let top = create_root_overlay(&exp.nodes[0], &img, &node_dir).unwrap();
        assert_eq!(top, node_dir.join("ov-1.qcow2"));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", top.to_str().unwrap()])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["backing-filename"], img.to_str().unwrap());
        assert_eq!(v["backing-filename-format"], "raw");
        assert_eq!(std::fs::read(&img).unwrap(), vec![0u8; 1 << 20], "the base is not written");
        // Not an image: refused naming the file.
        let junk = dir.path().join("junk.vmdk");
        std::fs::write(&junk, b"KDMV\x01\x00\x00\x00").unwrap();
        let e = create_root_overlay(&exp.nodes[0], &junk, &node_dir).unwrap_err();
        assert!(e.to_string().contains("junk.vmdk"), "{e}");
    }
}
