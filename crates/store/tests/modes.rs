//! Guest memory is only for its owner: after a commit every file under the
//! store is 0600 and every directory 0700, whatever the process umask (this
//! test clears it, as a library user may have it).

use stasis_store::{ComponentDraft, ComponentKind, ManifestDraft, Store};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn walk(dir: &Path, out: &mut Vec<(String, bool, u32)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((e.path().display().to_string(), m.is_dir(), m.mode() & 0o7777));
        if m.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn checkpoint_chunks_manifests_and_dirs_are_private() {
    // SAFETY: umask has no preconditions; this test binary runs one test.
    unsafe { libc::umask(0) };
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("checkpoints")).unwrap();
    let p = store.begin(Some("one")).unwrap();
    // The caller writes the component file; the store must still own its modes.
    stasis_core::private::write(&p.path("vm-a"), &vec![0x5a; 3 << 20]).unwrap();
    let mut draft = ManifestDraft::default();
    draft.components.push(ComponentDraft {
        name: "vm-a".into(),
        kind: ComponentKind::Vm,
        file: "vm-a".into(),
        ..Default::default()
    });
    let info = p.commit(draft).unwrap();
    let c = store.open_checkpoint(&info.id).unwrap();
    c.materialized(&tmp.path().join("restore")).unwrap();
    let mut all = Vec::new();
    walk(tmp.path(), &mut all);
    assert!(all.iter().filter(|(_, d, _)| !d).count() >= 3, "{all:?}");
    let bad: Vec<_> = all.iter().filter(|(_, d, m)| *m != if *d { 0o700 } else { 0o600 }).collect();
    assert!(bad.is_empty(), "not private: {bad:?}");
}
