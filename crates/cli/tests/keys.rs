//! `stasis key host NAME`: each agent's key, derived from the master key,
//! is the key the coordinator uses for that host and no other.

use std::process::Command;

fn host_key(master: &std::path::Path, host: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stasis"))
        .arg("--key-file")
        .arg(master)
        .args(["key", "host", host])
        .output()
        .unwrap()
}

#[test]
fn host_keys_are_the_coordinators_derivation_and_differ_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    let bytes = b"0123456789abcdef0123456789abcdef-master\n";
    stasis_core::private::write(&master, bytes).unwrap();
    let out = host_key(&master, "h1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h1 = String::from_utf8(out.stdout).unwrap();
    let k = stasis_proto::Key::new(&bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(h1, format!("{}\n", k.host_key_hex("h1")), "the trailing newline of the master key file is not key");
    let h2 = String::from_utf8(host_key(&master, "h2").stdout).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(h1.trim().len(), 64);
}

#[test]
fn a_master_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    std::fs::write(&master, b"0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = host_key(&master, "h1");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no key printed");
}
