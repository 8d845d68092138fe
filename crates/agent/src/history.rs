//! The history of an experiment: which branch each checkpoint belongs to
//! and which one it follows (`lineage.json` in the checkpoint), the named
//! branches (`branches.json` beside the store), the frozen disk images of
//! each checkpoint (`disks.json`), and what `stasis log` and `stasis diff`
//! report from them. No I/O beyond reading and writing those records; the
//! CLI prints (docs/disks.md).

use crate::layout::Layout;
use serde::{Deserialize, Serialize};
use stasis_core::versioned::{self, FormatVersion, Persisted, VersionedError};
use stasis_store::{Checkpoint, CheckpointInfo, Store};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Per-checkpoint record of the frozen disk images (`disks.json`: node → absolute path).
pub const DISKS_FILE: &str = "disks.json";
/// Per-checkpoint record of its place in history (`lineage.json`: branch, previous checkpoint).
pub const LINEAGE_FILE: &str = "lineage.json";
/// Per-checkpoint record of each VM's versioned machine type (`machines.json`: node → `pc-i440fx-10.0`).
pub const MACHINES_FILE: &str = "machines.json";
/// The branch a timeline extends when none was named.
pub const MAIN_BRANCH: &str = "main";
/// The named branches of an experiment, beside its store.
pub const BRANCHES_FILE: &str = "branches.json";

/// Where a checkpoint sits in the history tree (its `lineage.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub branch: String,
    /// The checkpoint this one follows on its timeline (the last checkpoint
    /// taken, or the one restored); None for the first.
    pub prev: Option<String>,
}

impl Persisted for Lineage {
    const FORMAT: &'static str = "stasis-lineage";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// The frozen disk image of every node with a disk (`disks.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FrozenDisks(pub BTreeMap<String, PathBuf>);

impl Persisted for FrozenDisks {
    const FORMAT: &'static str = "stasis-disks";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// The machine type each VM's saved state needs (`machines.json`; see
/// `stasis_qemu::machine`). Absent in checkpoints taken before it was
/// recorded: those VMs ran `pc`, whatever the QEMU of the day made of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Machines(pub BTreeMap<String, String>);

impl Persisted for Machines {
    const FORMAT: &'static str = "stasis-machines";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// Writes the records every one-host checkpoint carries into `pending`:
/// its lineage (branch, previous checkpoint) and, when known, each VM's
/// machine type. Returns the files written, for the manifest draft.
pub fn write_records(pending: &stasis_store::Pending, rt: &crate::host::Runtime) -> Result<Vec<String>, String> {
    let lineage = Lineage { branch: rt.branch.clone().unwrap_or_else(|| MAIN_BRANCH.into()), prev: rt.head.clone() };
    versioned::write_atomic(&pending.path(LINEAGE_FILE), &lineage)
        .map_err(|e| format!("writing {LINEAGE_FILE}: {e}"))?;
    let mut files = vec![LINEAGE_FILE.to_string()];
    let machines = Machines(rt.vms.iter().filter_map(|v| Some((v.name.clone(), v.machine.clone()?))).collect());
    if !machines.0.is_empty() {
        versioned::write_atomic(&pending.path(MACHINES_FILE), &machines)
            .map_err(|e| format!("writing {MACHINES_FILE}: {e}"))?;
        files.push(MACHINES_FILE.to_string());
    }
    let bases = crate::rootdisk::Bases(rt.vms.iter().filter_map(|v| Some((v.name.clone(), v.base.clone()?))).collect());
    if !bases.0.is_empty() {
        let file = crate::rootdisk::BASES_FILE;
        versioned::write_atomic(&pending.path(file), &bases).map_err(|e| format!("writing {file}: {e}"))?;
        files.push(file.to_string());
    }
    Ok(files)
}

/// The frozen disks recorded in checkpoint directory `dir` (none: empty).
pub fn frozen_disks(dir: &Path) -> Result<FrozenDisks, VersionedError> {
    Ok(versioned::read_opt(&dir.join(DISKS_FILE))?.unwrap_or_default())
}

/// A named line of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRec {
    /// The checkpoint it starts from.
    pub from: String,
    /// Its latest checkpoint (`from` until one is taken on it).
    pub head: String,
    pub created_unix_ms: u64,
}

/// Every named branch (`branches.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Branches(pub BTreeMap<String, BranchRec>);

impl Persisted for Branches {
    const FORMAT: &'static str = "stasis-branches";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// Errors of the history operations.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("bad branch name {0:?}")]
    BadName(String),
    #[error("branch {0:?} exists already")]
    Exists(String),
    #[error(transparent)]
    Record(#[from] VersionedError),
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint store")]
    Store(#[from] stasis_store::StoreError),
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A branch name: what `stasis branch` accepts (no '/' or ' ', and not a
/// key the branches record reserves for its format).
pub fn check_branch_name(name: &str) -> Result<(), HistoryError> {
    let reserved = name == versioned::FORMAT_KEY || name == versioned::VERSION_KEY;
    if name.is_empty() || name.contains(['/', ' ']) || reserved {
        return Err(HistoryError::BadName(name.to_owned()));
    }
    Ok(())
}

/// The lineage of a committed checkpoint: its `lineage.json`, or for
/// checkpoints without one, `main` after the checkpoint it was restored from.
pub fn lineage_of_dir(dir: &Path, parent: Option<&str>) -> Lineage {
    match versioned::read_opt::<Lineage>(&dir.join(LINEAGE_FILE)) {
        Ok(Some(l)) => l,
        Ok(None) => Lineage { branch: MAIN_BRANCH.into(), prev: parent.map(str::to_owned) },
        Err(e) => {
            tracing::warn!(error = %e, "unreadable lineage; taken as main");
            Lineage { branch: MAIN_BRANCH.into(), prev: parent.map(str::to_owned) }
        }
    }
}

/// [`lineage_of_dir`] of an opened checkpoint.
pub fn lineage_of(ckpt: &Checkpoint) -> Lineage {
    lineage_of_dir(&ckpt.dir, ckpt.manifest.parent.as_deref())
}

/// [`lineage_of_dir`] of a listed checkpoint.
pub fn lineage_of_info(info: &CheckpointInfo) -> Lineage {
    lineage_of_dir(&info.dir, info.parent.as_deref())
}

/// The branches of the experiment at `root` (its state directory).
pub struct History {
    root: PathBuf,
}

impl History {
    pub fn new(layout: &Layout) -> History {
        History { root: layout.root().to_owned() }
    }

    fn file(&self) -> PathBuf {
        self.root.join(BRANCHES_FILE)
    }

    /// The recorded branches, heads brought up to date from the lineage of
    /// `checkpoints` (a checkpoint taken on a branch moves its head).
    pub fn branches<'a>(
        &self,
        checkpoints: impl IntoIterator<Item = &'a CheckpointInfo>,
    ) -> Result<Branches, HistoryError> {
        let mut all: Branches = versioned::read_opt(&self.file())?.unwrap_or_default();
        for info in checkpoints {
            let l = lineage_of_info(info);
            if let Some(b) = all.0.get_mut(&l.branch) {
                b.head = info.id.clone();
            }
        }
        Ok(all)
    }

    /// [`Self::branches`] with the heads from the local store.
    pub fn branches_of(&self, store: &Store) -> Result<Branches, HistoryError> {
        let list = store.list()?;
        self.branches(&list)
    }

    fn write(&self, all: &Branches) -> Result<(), HistoryError> {
        stasis_core::private::create_dir_all(&self.root)
            .map_err(|source| HistoryError::Write { path: self.root.clone(), source })?;
        let path = self.file();
        versioned::write_atomic(&path, all).map_err(|source| HistoryError::Write { path, source })
    }

    /// A new branch `name` starting at checkpoint `from`; refused if it exists.
    pub fn create(&self, name: &str, from: &str, current: &Branches) -> Result<BranchRec, HistoryError> {
        check_branch_name(name)?;
        if current.0.contains_key(name) || name == MAIN_BRANCH {
            return Err(HistoryError::Exists(name.to_owned()));
        }
        let rec = BranchRec { from: from.to_owned(), head: from.to_owned(), created_unix_ms: now_ms() };
        let mut all = current.clone();
        all.0.insert(name.to_owned(), rec.clone());
        self.write(&all)?;
        Ok(rec)
    }

    /// Branch `name` from `from` unless it exists (restore --branch).
    pub fn ensure(&self, name: &str, from: &str, current: &Branches) -> Result<(), HistoryError> {
        if current.0.contains_key(name) {
            return Ok(());
        }
        check_branch_name(name)?;
        let mut all = current.clone();
        all.0.insert(
            name.to_owned(),
            BranchRec { from: from.to_owned(), head: from.to_owned(), created_unix_ms: now_ms() },
        );
        self.write(&all)
    }
}

/// One checkpoint in `stasis log`.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub id: String,
    pub index: u64,
    pub name: Option<String>,
    pub branch: String,
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    /// Recorded state (memory, devices, delay node), before deduplication.
    pub bytes: u64,
    /// The checkpoint's frozen disk image per node, and its size on disk
    /// (only what was written since the previous checkpoint of its line).
    pub disks: BTreeMap<String, (PathBuf, u64)>,
}

/// Frozen disks with the bytes each image holds on disk.
pub fn disks_with_usage(dir: &Path) -> BTreeMap<String, (PathBuf, u64)> {
    let map = frozen_disks(dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable disk record");
        FrozenDisks::default()
    });
    map.0
        .into_iter()
        .map(|(node, path)| {
            use std::os::unix::fs::MetadataExt;
            let used = std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0);
            (node, (path, used))
        })
        .collect()
}

/// The log entry of a listed checkpoint.
pub fn log_entry(info: &CheckpointInfo) -> LogEntry {
    let l = lineage_of_info(info);
    LogEntry {
        disks: disks_with_usage(&info.dir),
        id: info.id.clone(),
        index: info.index,
        name: info.name.clone(),
        branch: l.branch,
        parent: l.prev,
        created_unix_ms: info.created_unix_ms,
        bytes: info.bytes,
    }
}

/// The log as a forest: the roots (no parent among `entries`), and each
/// entry's children, in `entries` order.
pub fn children_of<'a>(entries: &'a [LogEntry], parent: Option<&str>) -> Vec<&'a LogEntry> {
    let ids: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    entries
        .iter()
        .filter(|e| match (e.parent.as_deref(), parent) {
            (Some(x), Some(y)) => x == y,
            (x, None) => x.is_none_or(|x| !ids.contains(x)),
            _ => false,
        })
        .collect()
}

/// `stasis diff A B` for one component.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentDiff {
    pub name: String,
    pub bytes_a: u64,
    pub bytes_b: u64,
    pub chunks_a: usize,
    pub chunks_b: usize,
    /// Chunks of B also in A (by id), and their bytes.
    pub shared_chunks: usize,
    pub shared_bytes: u64,
    /// Fraction of B's bytes in chunks A does not have: how much of the VM's state changed.
    pub dirty_share: f64,
}

/// What changed from checkpoint A to B.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    pub components: Vec<ComponentDiff>,
    /// Frozen disk images of A and B per node (path, bytes on disk).
    pub disks_a: BTreeMap<String, (PathBuf, u64)>,
    pub disks_b: BTreeMap<String, (PathBuf, u64)>,
}

/// Diff two manifests' components by chunk (`label`, `dir` of each for the disks).
pub fn diff_manifests(
    a: (&str, &Path, &stasis_store::Manifest),
    b: (&str, &Path, &stasis_store::Manifest),
) -> DiffReport {
    let mut components = Vec::new();
    for cb in &b.2.components {
        let ca = a.2.component(&cb.name);
        let set_a: HashSet<&str> =
            ca.and_then(|c| c.chunks.as_ref()).map(|v| v.iter().map(|c| c.id.as_str()).collect()).unwrap_or_default();
        let chunks_b = cb.chunks.as_deref().unwrap_or(&[]);
        let shared: Vec<_> = chunks_b.iter().filter(|c| set_a.contains(c.id.as_str())).collect();
        let shared_bytes: u64 = shared.iter().map(|c| c.len).sum();
        components.push(ComponentDiff {
            name: cb.name.clone(),
            bytes_a: ca.map(|c| c.bytes).unwrap_or(0),
            bytes_b: cb.bytes,
            chunks_a: ca.and_then(|c| c.chunks.as_ref()).map(Vec::len).unwrap_or(0),
            chunks_b: chunks_b.len(),
            shared_chunks: shared.len(),
            shared_bytes,
            dirty_share: if cb.bytes == 0 { 0.0 } else { 1.0 - shared_bytes as f64 / cb.bytes as f64 },
        });
    }
    DiffReport {
        a: a.0.to_owned(),
        b: b.0.to_owned(),
        components,
        disks_a: disks_with_usage(a.1),
        disks_b: disks_with_usage(b.1),
    }
}

/// [`diff_manifests`] of two opened checkpoints.
pub fn diff(a: &Checkpoint, b: &Checkpoint) -> DiffReport {
    diff_manifests((&a.info.id, &a.dir, &a.manifest), (&b.info.id, &b.dir, &b.manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_records_each_vms_machine_type_and_its_lineage() {
        use crate::host::{DelayProc, Runtime, VmProc};
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let vm = |name: &str, machine: Option<&str>| VmProc {
            name: name.into(),
            pid: 1,
            qmp: t.path().join("q"),
            serial_log: t.path().join("s"),
            disk: None,
            machine: machine.map(Into::into),
            base: None,
        };
        let mut rt = Runtime {
            experiment: "e".into(),
            spec_toml: String::new(),
            spec_digest: String::new(),
            accel: "Tcg".into(),
            incarnation: 1,
            restored_from: None,
            delay_node: DelayProc { pid: 1, control: t.path().join("c") },
            vms: vec![vm("a", Some("pc-i440fx-7.2")), vm("b", Some("pc-i440fx-10.0"))],
            branch: Some("other".into()),
            head: Some("0001-aaaaaaaa".into()),
            runtime_file: None,
        };
        let p = store.begin(None).unwrap();
        assert_eq!(write_records(&p, &rt).unwrap(), [LINEAGE_FILE, MACHINES_FILE]);
        let m: Machines = versioned::read(&p.path(MACHINES_FILE)).unwrap();
        assert_eq!(m.0.get("a").map(String::as_str), Some("pc-i440fx-7.2"));
        assert_eq!(m.0.get("b").map(String::as_str), Some("pc-i440fx-10.0"));
        let l: Lineage = versioned::read(&p.path(LINEAGE_FILE)).unwrap();
        assert_eq!((l.branch.as_str(), l.prev.as_deref()), ("other", Some("0001-aaaaaaaa")));
        // VMs whose type is not known (attached to a runtime written before
        // it was recorded): no record, and a restore launches `pc` as before.
        rt.vms = vec![vm("a", None)];
        let p = store.begin(None).unwrap();
        assert_eq!(write_records(&p, &rt).unwrap(), [LINEAGE_FILE]);
        assert!(!p.path(MACHINES_FILE).exists());
    }

    fn entry(id: &str, parent: Option<&str>) -> LogEntry {
        LogEntry {
            id: id.into(),
            index: 0,
            name: None,
            branch: MAIN_BRANCH.into(),
            parent: parent.map(Into::into),
            created_unix_ms: 0,
            bytes: 0,
            disks: BTreeMap::new(),
        }
    }

    #[test]
    fn the_log_is_a_forest_of_parents() {
        let e = [entry("1", None), entry("2", Some("1")), entry("3", Some("1")), entry("4", Some("gone"))];
        let roots: Vec<&str> = children_of(&e, None).iter().map(|e| e.id.as_str()).collect();
        assert_eq!(roots, ["1", "4"], "an entry whose parent is not listed is a root");
        let kids: Vec<&str> = children_of(&e, Some("1")).iter().map(|e| e.id.as_str()).collect();
        assert_eq!(kids, ["2", "3"]);
    }

    #[test]
    fn branches_are_created_once_and_bad_names_refused() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(&Layout::new(dir.path(), "e"));
        let none = h.branches([]).unwrap();
        assert!(none.0.is_empty());
        let rec = h.create("other", "0001-aaaaaaaa", &none).unwrap();
        assert_eq!(rec.head, "0001-aaaaaaaa");
        let all = h.branches([]).unwrap();
        assert_eq!(all.0["other"], rec);
        assert!(matches!(h.create("other", "x", &all), Err(HistoryError::Exists(_))));
        assert!(matches!(h.create(MAIN_BRANCH, "x", &all), Err(HistoryError::Exists(_))));
        for bad in ["", "a/b", "a b", "format_name"] {
            assert!(matches!(h.create(bad, "x", &all), Err(HistoryError::BadName(_))), "{bad:?}");
        }
        // The record is versioned.
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("e").join(BRANCHES_FILE)).unwrap()).unwrap();
        assert_eq!(v["format_name"], "stasis-branches");
        assert_eq!(v["other"]["from"], "0001-aaaaaaaa");
    }

    #[test]
    fn a_checkpoint_without_lineage_is_on_main_after_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            lineage_of_dir(dir.path(), Some("p")),
            Lineage { branch: MAIN_BRANCH.into(), prev: Some("p".into()) }
        );
        versioned::write_atomic(&dir.path().join(LINEAGE_FILE), &Lineage { branch: "b".into(), prev: None }).unwrap();
        assert_eq!(lineage_of_dir(dir.path(), Some("p")).branch, "b");
    }
}
