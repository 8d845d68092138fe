//! `stasis up` refuses an experiment this host cannot hold, with the
//! numbers, before anything starts.

use std::process::Command;

#[test]
fn an_overcommitting_spec_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("big.toml");
    // 8 × 16 GiB: more than any development or CI machine here has.
    let mut toml = String::from("name = \"big\"\n[defaults]\nmemory = \"16G\"\n");
    for i in 0..8 {
        toml += &format!("[[node]]\nname = \"n{i}\"\n");
    }
    std::fs::write(&spec, toml).unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_stasis"))
        .arg("--state-dir")
        .arg(&state)
        .arg("up")
        .arg(&spec)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    for part in ["experiment big needs", "8 VMs with 131072 MiB of guest RAM", "MiB are available", "--overcommit"] {
        assert!(err.contains(part), "{part:?} missing in: {err}");
    }
    // Nothing was started or recorded.
    assert!(!state.join("big").join("experiment.toml").exists());
    assert!(!state.join("big").join("run").exists());
}
