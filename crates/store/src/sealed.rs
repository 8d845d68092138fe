//! Sealed checkpoints: every state file written and fsynced, its size and
//! BLAKE3 recorded, but not yet cut into the chunk store. A multi-host agent
//! seals its part inside the frozen window (its SAVED means "durable") and
//! commits it after the resume, so the chunking is not frozen time.
//!
//! ```text
//!  .tmp-<id>/   (Store::begin; owner = this process; removed as stale once it is gone)
//!     | Pending::seal: fsync + measure every file, write sealed.json (fsync), rename, fsync the store
//!  .sealed-<id>/   (no owner: never removed as stale, never listed)
//!     | Sealed::commit: hard-link the files into a fresh .tmp-<id>/, Pending::commit, check
//!     |                 the digests against the seal, then remove .sealed-<id>/
//!  <id>/   (committed)
//! ```
//! A crash during [`Sealed::commit`] leaves the sealed directory whole (the
//! pending copy is only links, removed as stale); a crash after the commit
//! but before the sealed directory went leaves both, and the next
//! [`Sealed::commit`] just removes the sealed one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stasis_core::versioned::{self, FormatVersion, Persisted};
use tracing::{info, warn};

use crate::checkpoint::CheckpointInfo;
use crate::commit::Pending;
use crate::error::{io_err, StoreError};
use crate::manifest::ManifestDraft;
use crate::store::Store;
use crate::util::{measure_all, sync_dir};
use crate::verify::load_manifest;

/// Prefix of a sealed checkpoint's directory in the store.
pub(crate) const SEALED_PREFIX: &str = ".sealed-";
/// The seal record inside it.
const SEAL_FILE: &str = "sealed.json";

/// One sealed file: its name in the checkpoint, size and BLAKE3 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedFile {
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
}

/// `sealed.json`: what [`Sealed::commit`] needs to finish the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SealRecord {
    id: String,
    name: Option<String>,
    index: u64,
    draft: ManifestDraft,
    files: Vec<SealedFile>,
}

impl Persisted for SealRecord {
    const FORMAT: &'static str = "stasis-sealed-checkpoint";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// A sealed checkpoint (see the module docs).
#[derive(Debug)]
pub struct Sealed {
    dir: PathBuf,
    record: SealRecord,
}

impl Pending {
    /// Makes the pending checkpoint durable without committing it: fsyncs
    /// and measures every component and further file (several files at
    /// once, each file's fsync beside its hashing), records them with
    /// `draft` in `sealed.json`, and renames the directory to
    /// `.sealed-<id>` (store fsynced). On error the pending directory is
    /// removed.
    pub fn seal(mut self, draft: ManifestDraft) -> Result<Sealed, StoreError> {
        self.check_draft(&draft)?;
        let names: Vec<&String> = draft.components.iter().map(|c| &c.file).chain(&draft.files).collect();
        let paths: Vec<PathBuf> = names.iter().map(|f| self.dir.join(f)).collect();
        let mut files = Vec::with_capacity(names.len());
        for ((file, path), r) in names.iter().zip(&paths).zip(measure_all(&paths, true)) {
            let (bytes, blake3) = r.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StoreError::FileMissing {
                    checkpoint: self.id.clone(),
                    component: (*file).clone(),
                    path: path.clone(),
                },
                _ => io_err("cannot fsync and hash", path)(e),
            })?;
            files.push(SealedFile { file: (*file).clone(), bytes, blake3 });
        }
        let record = SealRecord { id: self.id.clone(), name: self.name.clone(), index: self.index, draft, files };
        let seal = self.dir.join(SEAL_FILE);
        versioned::write_atomic(&seal, &record).map_err(io_err("cannot write", &seal))?;
        // As a commit's rename: the owner file goes in the same critical
        // section, so the name is never free in between.
        let target = self.root.join(format!("{SEALED_PREFIX}{}", self.id));
        self.rename_into_place(&target)?;
        info!(id = %record.id, name = ?record.name, files = record.files.len(), "checkpoint sealed");
        Ok(Sealed { dir: target, record })
    }
}

impl Sealed {
    /// The checkpoint's id (its directory once committed).
    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn name(&self) -> Option<&str> {
        self.record.name.as_deref()
    }

    /// Every sealed file with its size and digest.
    pub fn files(&self) -> &[SealedFile] {
        &self.record.files
    }

    /// The sealed directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commits the sealed checkpoint into the store (chunking its files,
    /// [`Pending::commit`]) and removes the sealed directory. Refuses, and
    /// removes what it committed, when a file's digest is no longer the one
    /// sealed; the sealed directory then stays. Already committed (a crash
    /// between the commit and the removal): only removes the sealed copy.
    pub fn commit(self, store: &Store) -> Result<CheckpointInfo, StoreError> {
        let committed = store.root.join(&self.record.id);
        if committed.is_dir() {
            if let Ok(m) = load_manifest(&committed) {
                info!(id = %self.record.id, "sealed checkpoint was committed already; removing the sealed copy");
                self.remove()?;
                return Ok(CheckpointInfo::of(&m, committed));
            }
        }
        let pending = store.pending_at(self.record.id.clone(), self.record.name.clone(), self.record.index)?;
        for f in &self.record.files {
            let (from, to) = (self.dir.join(&f.file), pending.path(&f.file));
            fs::hard_link(&from, &to).map_err(io_err("cannot link a sealed file", &from))?;
        }
        let info = pending.commit(self.record.draft.clone())?;
        let manifest = load_manifest(&info.dir)?;
        let recorded = manifest
            .components
            .iter()
            .map(|c| (&c.file, c.bytes, &c.blake3))
            .chain(manifest.files.iter().map(|f| (&f.file, f.bytes, &f.blake3)));
        for (file, bytes, blake3) in recorded {
            let Some(sealed) = self.record.files.iter().find(|s| &s.file == file) else { continue };
            if sealed.bytes != bytes || &sealed.blake3 != blake3 {
                warn!(id = %self.record.id, %file, "a sealed file changed before its commit; removing the commit");
                let _lock = store.lock()?;
                fs::remove_dir_all(&info.dir).map_err(io_err("cannot remove", &info.dir))?;
                return Err(StoreError::FileDigest {
                    checkpoint: self.record.id.clone(),
                    component: file.clone(),
                    path: self.dir.join(file),
                    recorded: sealed.blake3.clone(),
                    actual: format!("{blake3} ({bytes} bytes; sealed {})", sealed.bytes),
                });
            }
        }
        self.remove()?;
        Ok(info)
    }

    /// Gives the sealed checkpoint up: removes its directory.
    pub fn discard(self) -> Result<(), StoreError> {
        self.remove()
    }

    fn remove(self) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(io_err("cannot remove the sealed checkpoint", &self.dir))?;
        if let Some(root) = self.dir.parent() {
            sync_dir(root)?;
        }
        Ok(())
    }
}

impl Store {
    /// Every sealed checkpoint of the store, in index order. One whose
    /// record does not read is skipped with a warning (and kept).
    pub fn sealed(&self) -> Result<Vec<Sealed>, StoreError> {
        let mut out = Vec::new();
        for dir in self.entries_with_prefix(SEALED_PREFIX)? {
            match versioned::read::<SealRecord>(&dir.join(SEAL_FILE)) {
                Ok(record) => out.push(Sealed { dir, record }),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "skipping a sealed checkpoint whose record does not read")
                }
            }
        }
        out.sort_by_key(|s| s.record.index);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ComponentDraft, ComponentKind};

    fn draft(files: &[&str]) -> ManifestDraft {
        ManifestDraft {
            components: files
                .iter()
                .map(|f| ComponentDraft {
                    name: f.to_string(),
                    kind: ComponentKind::Vm,
                    file: f.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn sealed_store(dir: &Path) -> (Store, Vec<SealedFile>) {
        let store = Store::open(dir).unwrap();
        let p = store.begin(Some("mh-1")).unwrap();
        fs::write(p.path("vm-a"), vec![7u8; 300_000]).unwrap();
        fs::write(p.path("delay-node"), b"queued frames").unwrap();
        let s = p.seal(draft(&["vm-a", "delay-node"])).unwrap();
        (store, s.files().to_vec())
    }

    #[test]
    fn seal_measures_every_file_and_survives_the_stale_cleanup() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, files) = sealed_store(tmp.path());
        assert_eq!(files[0].bytes, 300_000);
        assert_eq!(files[0].blake3, blake3::hash(&vec![7u8; 300_000]).to_hex().to_string());
        assert_eq!(files[1].file, "delay-node");
        assert!(store.list().unwrap().is_empty(), "a sealed checkpoint is not listed");
        // A later process opening the store (its stale cleanup runs) keeps it.
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        let sealed = store.sealed().unwrap();
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].name(), Some("mh-1"));
        assert_eq!(sealed[0].files(), &files[..]);
    }

    #[test]
    fn commit_of_a_sealed_checkpoint_makes_it_restorable_and_removes_the_seal() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = sealed_store(tmp.path());
        let sealed = store.sealed().unwrap().pop().unwrap();
        let id = sealed.id().to_owned();
        let info = sealed.commit(&store).unwrap();
        assert_eq!(info.id, id, "the seal's id and index are kept");
        assert!(store.sealed().unwrap().is_empty());
        let c = store.open_checkpoint("mh-1").unwrap();
        let out = tmp.path().join("out");
        let m = c.materialized(&out).unwrap();
        assert_eq!(fs::read(m.file("vm-a")).unwrap(), vec![7u8; 300_000]);
        // The next checkpoint's index follows it, and its name is taken.
        assert!(matches!(store.begin(Some("mh-1")), Err(StoreError::DuplicateName { .. })));
        assert_eq!(store.begin(None).unwrap().index(), info.index + 1);
    }

    #[test]
    fn a_sealed_name_is_taken_and_its_index_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = sealed_store(tmp.path());
        assert!(matches!(store.begin(Some("mh-1")), Err(StoreError::DuplicateName { .. })));
        let sealed_index = store.sealed().unwrap()[0].record.index;
        assert_eq!(store.begin(None).unwrap().index(), sealed_index + 1);
    }

    #[test]
    fn commit_after_a_crash_mid_commit_or_after_it_finishes_the_job() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = sealed_store(tmp.path());
        let sealed = store.sealed().unwrap().pop().unwrap();
        // A crash mid-commit left a pending copy owned by a dead process.
        let stale = tmp.path().join(format!("{}{}", crate::TMP_PREFIX, sealed.id()));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join(crate::OWNER_FILE), br#"{"pid":4000000000,"start":1,"name":"mh-1","index":1}"#).unwrap();
        fs::hard_link(sealed.dir().join("vm-a"), stale.join("vm-a")).unwrap();
        drop((store, sealed));
        let store = Store::open(tmp.path()).unwrap();
        assert!(!stale.exists(), "the dead process's pending copy is stale");
        let sealed = store.sealed().unwrap().pop().unwrap();
        let keep = sealed.dir().to_owned();
        // Commit, then put the sealed copy back as if the crash came after the rename.
        let copy = tmp.path().join("copy");
        fs::create_dir(&copy).unwrap();
        for f in ["vm-a", "delay-node", SEAL_FILE] {
            fs::copy(keep.join(f), copy.join(f)).unwrap();
        }
        let first = sealed.commit(&store).unwrap();
        fs::rename(&copy, &keep).unwrap();
        let again = store.sealed().unwrap().pop().unwrap().commit(&store).unwrap();
        assert_eq!(again.id, first.id);
        assert!(store.sealed().unwrap().is_empty());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_sealed_file_that_changed_is_refused_and_the_seal_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = sealed_store(tmp.path());
        let sealed = store.sealed().unwrap().pop().unwrap();
        fs::write(sealed.dir().join("delay-node"), b"QUEUED FRAMES").unwrap();
        let err = sealed.commit(&store).unwrap_err();
        assert!(matches!(err, StoreError::FileDigest { .. }), "{err}");
        assert!(store.list().unwrap().is_empty(), "nothing committed");
        assert_eq!(store.sealed().unwrap().len(), 1, "the seal stays");
    }

    #[test]
    fn discard_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = sealed_store(tmp.path());
        store.sealed().unwrap().pop().unwrap().discard().unwrap();
        assert!(store.sealed().unwrap().is_empty());
        assert!(store.begin(Some("mh-1")).is_ok(), "the name is free again");
    }

    #[test]
    fn seal_of_a_missing_file_fails_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let p = store.begin(Some("mh-2")).unwrap();
        let err = p.seal(draft(&["vm-a"])).unwrap_err();
        assert!(matches!(err, StoreError::FileMissing { .. }), "{err}");
        assert!(store.sealed().unwrap().is_empty());
        assert!(store.pending_dirs().unwrap().is_empty());
    }
}
