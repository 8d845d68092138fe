//! This host's part of a multi-host checkpoint in its local store, named
//! `mh-<ckpt>`: sealed inside the frozen window (files durable, sizes and
//! digests known: what SAVED reports), committed into the chunked store
//! after the resume ([`store`]), or removed ([`remove`]). A part left sealed
//! by an agent that died before its commit is committed when the agent
//! starts again ([`store_all_sealed`]) or when a restore needs it
//! ([`open`]); sealed parts are never removed as stale (stasis_store's
//! `Sealed`).

use stasis_proto::msg::CkptId;
use stasis_store::{Checkpoint, CheckpointInfo, Store, StoreError};
use std::path::Path;

/// The local store's name of this host's part of checkpoint `ckpt`.
pub fn part_name(ckpt: CkptId) -> String {
    format!("mh-{ckpt}")
}

/// Why a part could not be committed or opened.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error("checkpoint store")]
    Store(#[from] StoreError),
    #[error("this host holds no part {0} (neither sealed nor committed)")]
    Missing(String),
}

/// Commits the sealed part of `ckpt` in the store at `root` (a part
/// committed already is left as it is).
pub fn store(root: &Path, ckpt: CkptId) -> Result<CheckpointInfo, PartError> {
    let store = Store::open(root)?;
    store_in(&store, &part_name(ckpt))
}

fn store_in(store: &Store, name: &str) -> Result<CheckpointInfo, PartError> {
    if let Some(sealed) = store.sealed()?.into_iter().find(|s| s.name() == Some(name)) {
        return Ok(sealed.commit(store)?);
    }
    store
        .list()?
        .into_iter()
        .find(|c| c.name.as_deref() == Some(name))
        .ok_or_else(|| PartError::Missing(name.to_owned()))
}

/// Opens (verified) this host's part of `ckpt`, committing it first if a
/// previous agent left it sealed.
pub fn open(root: &Path, ckpt: CkptId) -> Result<Checkpoint, PartError> {
    let store = Store::open(root)?;
    let name = part_name(ckpt);
    if store.sealed()?.iter().any(|s| s.name() == Some(name.as_str())) {
        tracing::info!(part = %name, "committing a part left sealed before restoring it");
        store_in(&store, &name)?;
    }
    Ok(store.open_checkpoint(&name)?)
}

/// Removes this host's part of `ckpt`, committed or sealed.
pub fn remove(root: &Path, ckpt: CkptId) {
    let Ok(store) = Store::open(root) else { return };
    let name = part_name(ckpt);
    for c in store.list().unwrap_or_default().into_iter().filter(|c| c.name.as_deref() == Some(name.as_str())) {
        tracing::info!(%ckpt, dir = %c.dir.display(), "removing this host's part");
        // The store's own deletion: under its lock, renamed away first, so
        // an interrupted one never leaves a half-removed part.
        if let Err(e) = store.delete_checkpoint(&c.id) {
            tracing::warn!(%ckpt, error = %e, "cannot remove this host's part");
        }
    }
    for s in store.sealed().unwrap_or_default().into_iter().filter(|s| s.name() == Some(name.as_str())) {
        tracing::info!(%ckpt, dir = %s.dir().display(), "removing this host's sealed part");
        if let Err(e) = s.discard() {
            tracing::warn!(%ckpt, error = %e, "cannot remove a sealed part");
        }
    }
}

/// The names of the parts in the store at `root`: (committed, sealed).
pub fn names(root: &Path) -> (Vec<String>, Vec<String>) {
    let Ok(store) = Store::open(root) else { return (vec![], vec![]) };
    let ours = |n: &str| n.starts_with("mh-");
    let committed = store.list().unwrap_or_default().into_iter().filter_map(|c| c.name).filter(|n| ours(n)).collect();
    let sealed = store
        .sealed()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.name().map(str::to_owned))
        .filter(|n| ours(n))
        .collect();
    (committed, sealed)
}

/// Commits every part left sealed in the stores under `state_dir`
/// (`<state>/<experiment>/checkpoints`), by an agent that died between its
/// SAVED and its store commit. Returns the names committed; one that fails
/// stays sealed (a restore tries again) and is logged.
pub fn store_all_sealed(state_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(experiments) = std::fs::read_dir(state_dir) else { return done };
    for exp in experiments.flatten() {
        let root = exp.path().join("checkpoints");
        if !root.is_dir() {
            continue;
        }
        let store = match Store::open(&root) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(store = %root.display(), error = %e, "cannot open a store to commit its sealed parts");
                continue;
            }
        };
        for s in store.sealed().unwrap_or_default() {
            let Some(name) = s.name().filter(|n| n.starts_with("mh-")).map(str::to_owned) else { continue };
            match s.commit(&store) {
                Ok(info) => {
                    tracing::info!(part = %name, id = %info.id, "committed a part a previous agent left sealed");
                    done.push(name);
                }
                Err(e) => tracing::error!(part = %name, error = %e, "cannot commit a part left sealed; kept"),
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_store::manifest::{ComponentDraft, ComponentKind, ManifestDraft};

    fn ckpt(n: u64) -> CkptId {
        CkptId::new(n).unwrap()
    }

    /// A state directory and its experiment "mh"'s store root.
    fn state_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let state = tempfile::tempdir().unwrap();
        let root = state.path().join("mh").join("checkpoints");
        (state, root)
    }

    /// What the round leaves when its agent dies between SAVED and the store commit.
    fn seal(root: &Path, n: u64) {
        let store = Store::open(root).unwrap();
        let p = store.begin(Some(&part_name(ckpt(n)))).unwrap();
        std::fs::write(p.path("vm-a"), vec![n as u8; 100_000]).unwrap();
        let draft = ManifestDraft {
            components: vec![ComponentDraft {
                name: "a".into(),
                kind: ComponentKind::Vm,
                file: "vm-a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        p.seal(draft).unwrap();
    }

    #[test]
    fn a_part_left_sealed_is_committed_at_the_next_start() {
        let (state, root) = state_dir();
        seal(&root, 7);
        assert_eq!(names(&root), (vec![], vec!["mh-7".to_string()]));
        assert_eq!(store_all_sealed(state.path()), vec!["mh-7".to_string()]);
        assert_eq!(names(&root), (vec!["mh-7".to_string()], vec![]));
        let c = open(&root, ckpt(7)).unwrap();
        assert_eq!(c.info.name.as_deref(), Some("mh-7"));
        assert!(store_all_sealed(state.path()).is_empty(), "nothing left to do");
    }

    #[test]
    fn a_restore_commits_a_sealed_part_first() {
        let (state, root) = state_dir();
        seal(&root, 8);
        let c = open(&root, ckpt(8)).unwrap();
        let m = c.materialized(&state.path().join("restore")).unwrap();
        assert_eq!(std::fs::read(m.file("a")).unwrap(), vec![8u8; 100_000]);
        assert_eq!(names(&root).1, Vec::<String>::new());
    }

    #[test]
    fn store_after_the_resume_and_twice() {
        let (_state, root) = state_dir();
        seal(&root, 9);
        let first = store(&root, ckpt(9)).unwrap();
        assert_eq!(store(&root, ckpt(9)).unwrap().id, first.id, "already stored: left as it is");
        assert!(matches!(store(&root, ckpt(10)), Err(PartError::Missing(n)) if n == "mh-10"));
    }

    #[test]
    fn remove_takes_sealed_and_committed_parts() {
        let (_state, root) = state_dir();
        seal(&root, 1);
        seal(&root, 2);
        store(&root, ckpt(2)).unwrap();
        remove(&root, ckpt(1));
        remove(&root, ckpt(2));
        assert_eq!(names(&root), (vec![], vec![]));
        assert!(matches!(open(&root, ckpt(1)), Err(PartError::Store(StoreError::UnknownCheckpoint { .. }))));
    }
}
