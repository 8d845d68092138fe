//! Prints how long committing and verifying checkpoints takes (fsync +
//! BLAKE3 of every file) for VM-sized state files. Run: `cargo bench -p stasis-store`.
//! Set STASIS_BENCH_DIR to measure another filesystem than the temp dir.

use std::fs;
use std::time::Instant;

use stasis_store::{ComponentDraft, ComponentKind, ManifestDraft, Store};

fn main() {
    let base = std::env::var_os("STASIS_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = match &base {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let store = Store::open(&tmp.path().join("checkpoints")).expect("store");
    println!("store in {}", tmp.path().display());
    for (vms, mib) in [(1usize, 16usize), (2, 96), (4, 96)] {
        let mut commit_ms = Vec::new();
        let mut verify_ms = Vec::new();
        for round in 0..3u8 {
            let pending = store.begin(None).expect("begin");
            let mut draft = ManifestDraft::default();
            for vm in 0..vms {
                let file = format!("vm{vm}.state");
                // Non-constant content so nothing compresses or dedups it.
                let data: Vec<u8> =
                    (0..mib << 20).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ round).collect();
                fs::write(pending.path(&file), data).expect("write");
                draft.components.push(ComponentDraft {
                    name: format!("vm{vm}"),
                    kind: ComponentKind::Vm,
                    file,
                    ..Default::default()
                });
            }
            let t = Instant::now();
            let info = pending.commit(draft).expect("commit");
            commit_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let c = store.open_checkpoint(&info.id).expect("open");
            c.verify().expect("verify");
            verify_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let total = (vms * mib) as f64;
        let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{vms} VM x {mib} MiB: commit (fsync+hash+manifest) best {:.1} ms = {:.0} MiB/s, all {:?}; verify best {:.1} ms = {:.0} MiB/s",
            best(&commit_ms),
            total / best(&commit_ms) * 1e3,
            commit_ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
            best(&verify_ms),
            total / best(&verify_ms) * 1e3,
        );
    }
}
