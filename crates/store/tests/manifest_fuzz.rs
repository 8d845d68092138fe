//! Damaged manifests never panic the store and are never accepted unless
//! they still describe the same checkpoint.

use std::fs;

use proptest::prelude::*;
use stasis_store::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_manifest_is_refused_or_equivalent(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let p = store.begin(Some("x")).unwrap();
        fs::write(p.path("vm-a"), b"state of a").unwrap();
        let draft = ManifestDraft {
            components: vec![ComponentDraft { name: "a".into(), file: "vm-a".into(), ..Default::default() }],
            ..Default::default()
        };
        let info = p.commit(draft).unwrap();
        let original = store.open_checkpoint("x").unwrap().manifest;
        let path = info.dir.join("manifest.json");
        let mut bytes = fs::read(&path).unwrap();
        for (at, byte) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        if let Some(t) = truncate {
            bytes.truncate(t.index(bytes.len()));
        }
        fs::write(&path, &bytes).unwrap();
        let _ = store.list().unwrap();
        if let Ok(c) = store.open_checkpoint(&info.id) {
            // Only edits JSON does not see (e.g. whitespace) may pass.
            prop_assert_eq!(c.manifest, original);
        }
    }
}
