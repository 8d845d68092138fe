//! Checkpoint manifests, hostile and well-sealed. A real checkpoint is made
//! once; each input then replaces its manifest.json either as raw bytes
//! (first byte even) or, parsed as JSON, completed with the right format,
//! version and id and sealed with a correct checksum (first byte odd), so the
//! fuzzer reaches what lies behind the checksum. Listing, opening and
//! verifying must refuse cleanly, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use stasis_store::{manifest::checksum_of, ManifestDraft, Store, FORMAT, MANIFEST_FILE, VERSION};
use std::path::PathBuf;
use std::sync::OnceLock;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ckpt_dir: PathBuf,
    id: String,
}

static FIX: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIX.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
        let root = dir.path().join("store");
        let store = Store::open(&root).expect("open store");
        let info = store.begin(None).expect("begin").commit(ManifestDraft::default()).expect("commit");
        let ckpt = store.open_checkpoint(&info.id).expect("open");
        Fixture { ckpt_dir: ckpt.dir.clone(), id: info.id, root, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(rest) else { return };
        m.entry("format").or_insert(Value::from(FORMAT));
        m.entry("version").or_insert(serde_json::to_value(VERSION).expect("version"));
        m.entry("id").or_insert(Value::from(f.id.clone()));
        let mut v = Value::Object(m);
        let sum = checksum_of(&v);
        v["checksum"] = Value::from(sum);
        serde_json::to_vec(&v).expect("serialise")
    };
    std::fs::write(f.ckpt_dir.join(MANIFEST_FILE), &bytes).expect("write manifest");
    let store = Store::open(&f.root).expect("reopen");
    let _ = store.list();
    if let Ok(c) = store.open_checkpoint(&f.id) {
        let _ = c.verify();
    }
});
