//! `-machine help` of the QEMU binaries on this machine: the default
//! QEMU's `pc` resolves to its own versioned type, and, where setup.sh
//! unpacked the other version (.cache/qemu/VERSION), each resolves `pc`
//! to its own and the newer one still offers the older one's.

use stasis_qemu::machine;

fn version_of(qemu: &str) -> String {
    let out = std::process::Command::new(qemu).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "QEMU emulator version 10.0.2 (Debian …)" → "10.0"
    let v = text.split_whitespace().nth(3).unwrap_or_default();
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

#[test]
fn pc_resolves_to_this_qemus_own_versioned_type() {
    let qemu = stasis_qemu::vm::qemu_binary();
    let resolved = machine::resolve(&qemu, machine::DEFAULT).unwrap();
    assert_eq!(resolved, format!("pc-i440fx-{}", version_of(&qemu)));
    machine::check(&qemu, &resolved).unwrap();
    let e = machine::check(&qemu, "pc-i440fx-99.9").unwrap_err();
    assert!(matches!(e, machine::MachineError::Unknown { .. }) && e.to_string().contains("pc-i440fx-99.9"), "{e}");
}

#[test]
fn the_other_qemu_on_this_machine_pins_its_own_type_which_the_newer_one_offers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/qemu");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        eprintln!("no other QEMU in {} (scripts/setup.sh unpacks one); nothing to compare", root.display());
        return;
    };
    let this = stasis_qemu::vm::qemu_binary();
    let this_version = version_of(&this);
    for d in dirs.flatten() {
        let other = d.path().join("usr/bin/qemu-system-x86_64");
        let other = other.to_string_lossy().into_owned();
        let v = version_of(&other);
        let pinned = machine::resolve(&other, machine::DEFAULT).unwrap();
        assert_eq!(pinned, format!("pc-i440fx-{v}"));
        let newer_is_this = v.split('.').map(|x| x.parse::<u32>().unwrap()).collect::<Vec<_>>()
            < this_version.split('.').map(|x| x.parse::<u32>().unwrap()).collect::<Vec<_>>();
        let (older_type, newer) =
            if newer_is_this { (pinned, this.clone()) } else { (machine::resolve(&this, "pc").unwrap(), other) };
        machine::check(&newer, &older_type).unwrap_or_else(|e| panic!("{newer} cannot restore {older_type}: {e}"));
    }
}
