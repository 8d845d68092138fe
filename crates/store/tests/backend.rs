//! The store on the in-memory chunk backend ([`MemChunks`]): commit,
//! dedup, restore, verify, fsck and gc work through the [`ChunkStorage`]
//! trait alone, with nothing of the chunks on disk.

use std::fs;
use std::sync::Arc;

use stasis_store::*;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 3 MiB of random pages with a few pages replaced per `seed`.
fn state(seed: u64) -> Vec<u8> {
    let mut s = noise(7, 3 << 20);
    for k in 0..seed {
        let at = ((k * 131 + 5) % 768) as usize * 4096;
        s[at..at + 4096].copy_from_slice(&noise(100 + seed * 17 + k, 4096));
    }
    s
}

fn commit(store: &Store, name: &str, files: &[(&str, Vec<u8>)]) -> CheckpointInfo {
    let p = store.begin(Some(name)).unwrap();
    let mut draft = ManifestDraft::default();
    for (file, data) in files {
        fs::write(p.path(file), data).unwrap();
        draft.components.push(ComponentDraft {
            name: (*file).into(),
            kind: ComponentKind::Vm,
            file: (*file).into(),
            ..Default::default()
        });
    }
    p.commit(draft).unwrap()
}

#[test]
fn the_store_runs_on_the_in_memory_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemChunks::default());
    let store = Store::open_with(&tmp.path().join("checkpoints"), mem.clone()).unwrap();
    commit(&store, "one", &[("vm-a", state(0)), ("vm-b", state(0))]);
    let after_one = mem.list().unwrap();
    assert!(!after_one.is_empty());
    let two = commit(&store, "two", &[("vm-a", state(3)), ("vm-b", state(0))]);
    let after_two = mem.list().unwrap();
    // Identical VMs and unchanged data are stored once: checkpoint two
    // adds only the chunks around the 3 changed pages.
    let added = after_two.len() - after_one.len();
    assert!(added > 0 && added * 10 < after_one.len(), "{} -> {}", after_one.len(), after_two.len());
    assert!(
        fs::read_dir(tmp.path().join("checkpoints/chunks")).unwrap().all(|e| e.unwrap().file_name() == ".incoming"),
        "no chunk on disk"
    );

    // Restore: both components come back byte for byte.
    let c = store.open_checkpoint("two").unwrap();
    c.verify().unwrap();
    let m = c.materialized(&tmp.path().join("restore")).unwrap();
    assert_eq!(fs::read(m.file("vm-a")).unwrap(), state(3));
    assert_eq!(fs::read(m.file("vm-b")).unwrap(), state(0));
    assert!(store.fsck().unwrap().is_clean());

    // A damaged chunk: fsck names it, verify and materialize refuse.
    let chunk = &c.manifest.component("vm-a").unwrap().chunks.as_ref().unwrap()[1];
    let id = ChunkId::from_hex(&chunk.id).unwrap();
    let good = mem.get(&id).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    mem.tamper(&id, bad);
    let report = store.fsck().unwrap();
    assert!(report.problems.iter().any(|p| p.chunk.as_deref() == Some(chunk.id.as_str())), "{report:?}");
    assert!(matches!(c.verify(), Err(StoreError::ChunkDamaged { .. })));
    let e = c.materialized(&tmp.path().join("restore2")).unwrap_err();
    assert!(e.to_string().contains(&chunk.id), "{e}");
    mem.tamper(&id, good);

    // gc: drop checkpoint two by hand, and only its own chunks go.
    fs::remove_dir_all(&two.dir).unwrap();
    let gc = store.gc().unwrap();
    assert_eq!(gc.chunks_removed, added, "{gc:?}");
    assert_eq!(mem.list().unwrap(), after_one);
    let one = store.open_checkpoint("one").unwrap();
    let m = one.materialized(&tmp.path().join("restore3")).unwrap();
    assert_eq!(fs::read(m.file("vm-a")).unwrap(), state(0));

    // A missing chunk is refused on open, naming it.
    let first = &one.manifest.component("vm-a").unwrap().chunks.as_ref().unwrap()[0];
    mem.delete(&ChunkId::from_hex(&first.id).unwrap()).unwrap();
    let e = store.open_checkpoint("one").unwrap_err();
    assert!(matches!(e, StoreError::ChunkMissing { .. }) && e.to_string().contains(&first.id), "{e}");
}

#[test]
fn an_aborted_commit_leaves_nothing_in_the_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemChunks::default());
    let store = Store::open_with(&tmp.path().join("checkpoints"), mem.clone()).unwrap();
    let p = store.begin(None).unwrap();
    fs::write(p.path("vm-a"), state(1)).unwrap();
    // A draft naming a missing file fails after vm-a's chunks were put.
    let mut draft = ManifestDraft::default();
    for f in ["vm-a", "vm-missing"] {
        draft.components.push(ComponentDraft {
            name: f.into(),
            kind: ComponentKind::Vm,
            file: f.into(),
            ..Default::default()
        });
    }
    assert!(p.commit(draft).is_err());
    assert!(mem.list().unwrap().is_empty());
    assert_eq!(mem.remove_unpublished().unwrap(), 0, "discarded, not left staged");
    assert!(store.list().unwrap().is_empty());
}
