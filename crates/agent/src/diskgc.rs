//! Collecting qcow2 disk images nothing needs any more.
//!
//! An image under `<state>/<exp>/disks/<node>/` is live if a committed or
//! pending checkpoint names it in its `disks.json` (branch heads are
//! checkpoints, so they are covered), if a VM of the running experiment
//! writes to it (`runtime.json`), or if it lies on the backing chain of a
//! live image (read from the qcow2 header). Everything else — the overlay a
//! swapped-out or replaced timeline was writing, the chain of a deleted
//! checkpoint — is removed.
//!
//! Safety against a concurrent checkpoint, `up` or restore: collection holds
//! the store's gc lock exclusively ([`stasis_store::Store::gc_lock`]), the
//! lock a commit holds shared; the CLI holds it shared around every command
//! that creates or switches images until a record names them.

use crate::history::{FrozenDisks, DISKS_FILE};
use crate::host::Runtime;
use crate::layout::Layout;
use serde::Serialize;
use stasis_store::Store;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of [`gc_disks`].
#[derive(Debug, thiserror::Error)]
pub enum DiskGcError {
    #[error("checkpoint store")]
    Store(#[from] stasis_store::StoreError),
    #[error("{path} is damaged: {reason}; refusing to collect disk images")]
    BadRecord { path: PathBuf, reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`gc_disks`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskGcReport {
    pub images_kept: usize,
    pub images_removed: usize,
    pub bytes_removed: u64,
    pub removed: Vec<PathBuf>,
}

/// The backing file named in a qcow2 header, resolved against the image's
/// directory; `None` for an image without one (or a file that is not qcow2).
pub fn qcow2_backing(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut f = std::fs::File::open(path)?;
    let mut h = [0u8; 20];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
    if offset == 0 || size == 0 || size > 4096 {
        return Ok(None);
    }
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(offset))?;
    let mut name = vec![0u8; size];
    f.read_exact(&mut name)?;
    let name = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    Ok(Some(if name.is_absolute() { name } else { path.parent().unwrap_or(Path::new(".")).join(name) }))
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_owned())
}

fn read_disks(dir: &Path) -> Result<Vec<PathBuf>, DiskGcError> {
    let path = dir.join(DISKS_FILE);
    match stasis_core::versioned::read_opt::<FrozenDisks>(&path) {
        Ok(m) => Ok(m.map(|m| m.0.into_values().collect()).unwrap_or_default()),
        Err(e) => Err(DiskGcError::BadRecord { path, reason: e.to_string() }),
    }
}

/// Every image a record names, with their backing chains.
fn live_images(layout: &Layout, store: &Store) -> Result<BTreeSet<PathBuf>, DiskGcError> {
    let mut roots = Vec::new();
    for info in store.list()? {
        roots.extend(read_disks(&info.dir)?);
    }
    for dir in store.pending_dirs()? {
        roots.extend(read_disks(&dir)?);
    }
    match Runtime::load(layout) {
        Ok(rt) => roots.extend(rt.vms.iter().filter_map(|v| v.disk.clone())),
        Err(crate::host::AttachError::NotRunning(_)) => {}
        Err(e) => {
            return Err(DiskGcError::BadRecord { path: layout.runtime_file(), reason: e.to_string() });
        }
    }
    let mut live = BTreeSet::new();
    while let Some(p) = roots.pop() {
        let c = canonical(&p);
        if !live.insert(c.clone()) {
            continue;
        }
        match qcow2_backing(&c) {
            Ok(Some(b)) => roots.push(b),
            Ok(None) => {}
            // A live image that is gone has no chain to keep.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DiskGcError::Io { path: c, source }),
        }
    }
    Ok(live)
}

/// Remove every qcow2 image of the experiment that nothing reaches.
pub fn gc_disks(layout: &Layout, store: &Store) -> Result<DiskGcReport, DiskGcError> {
    let _lock = store.gc_lock(true)?;
    let mut report = DiskGcReport::default();
    let disks = layout.root().join("disks");
    let Ok(nodes) = std::fs::read_dir(&disks) else { return Ok(report) };
    let live = live_images(layout, store)?;
    for node in nodes.flatten() {
        let Ok(images) = std::fs::read_dir(node.path()) else { continue };
        for e in images.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("qcow2") {
                continue;
            }
            if live.contains(&canonical(&p)) {
                report.images_kept += 1;
                continue;
            }
            let bytes = {
                use std::os::unix::fs::MetadataExt;
                e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
            };
            std::fs::remove_file(&p).map_err(|source| DiskGcError::Io { path: p.clone(), source })?;
            tracing::info!(image = %p.display(), bytes, "unreferenced disk image removed");
            report.images_removed += 1;
            report.bytes_removed += bytes;
            report.removed.push(p);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn backing_chain_is_read_from_qcow2_headers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base-1.qcow2");
        let ov = dir.path().join("ov-1.qcow2");
        stasis_qemu::disk::create_base(&base, 1 << 20).unwrap();
        stasis_qemu::disk::create_overlay(&ov, &base).unwrap();
        assert_eq!(qcow2_backing(&base).unwrap(), None);
        assert_eq!(canonical(&qcow2_backing(&ov).unwrap().unwrap()), canonical(&base));
        let not_qcow = dir.path().join("x");
        std::fs::write(&not_qcow, b"hello world, not an image").unwrap();
        assert_eq!(qcow2_backing(&not_qcow).unwrap(), None);
    }

    #[test]
    fn only_unreachable_images_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), "e");
        let node = layout.root().join("disks").join("a");
        std::fs::create_dir_all(&node).unwrap();
        let store = Store::open(&layout.checkpoints()).unwrap();
        // base <- ov-1 <- ov-2 (a pending checkpoint's frozen image) ; ov-3 on ov-2 (orphan); ov-4 on base (orphan)
        let p = |n: &str| node.join(n);
        stasis_qemu::disk::create_base(&p("base-1.qcow2"), 1 << 20).unwrap();
        stasis_qemu::disk::create_overlay(&p("ov-1.qcow2"), &p("base-1.qcow2")).unwrap();
        stasis_qemu::disk::create_overlay(&p("ov-2.qcow2"), &p("ov-1.qcow2")).unwrap();
        stasis_qemu::disk::create_overlay(&p("ov-3.qcow2"), &p("ov-2.qcow2")).unwrap();
        stasis_qemu::disk::create_overlay(&p("ov-4.qcow2"), &p("base-1.qcow2")).unwrap();
        let pending = store.begin(None).unwrap();
        let map: BTreeMap<String, PathBuf> = [("a".to_string(), p("ov-2.qcow2"))].into_iter().collect();
        stasis_core::versioned::write_atomic(&pending.path(DISKS_FILE), &FrozenDisks(map)).unwrap();
        let r = gc_disks(&layout, &store).unwrap();
        let mut removed: Vec<String> =
            r.removed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        removed.sort();
        assert_eq!(removed, ["ov-3.qcow2", "ov-4.qcow2"]);
        assert_eq!(r.images_kept, 3);
        for n in ["base-1.qcow2", "ov-1.qcow2", "ov-2.qcow2"] {
            assert!(p(n).exists(), "{n} is on a live chain");
        }
        // Once nothing names ov-2, its whole chain goes.
        pending.abort();
        let r = gc_disks(&layout, &store).unwrap();
        assert_eq!(r.images_removed, 3);
        assert!(std::fs::read_dir(&node).unwrap().next().is_none());
    }
}
