//! Two QEMUs on one machine (the installed one and the other one setup.sh
//! unpacked into .cache/qemu/VERSION): a checkpoint taken under the older
//! QEMU restores under the newer one — in the machine type it was saved
//! from, losing and duplicating no frame, no clock step — and a checkpoint
//! of the newer one is refused by the older one before anything is
//! stopped, naming the machine type it lacks.

use stasis_system_tests::{assert_every_frame_once, max_steps, received, Experiment};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Frames of the one flow: 100/s for 20 s.
const PER_FLOW: u64 = 2000;
/// The pause of the checkpoint: a leaked one would show as a clock step.
const PAUSE_NS: u64 = 3_000_000_000;

fn spec() -> String {
    format!(
        r#"
name = "qv"
[defaults]
memory = "256M"

[[node]]
name = "a"
run = ["stasis-probe --node a", "sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --rate 100 --size 200 --count {PER_FLOW}"]
[[node]]
name = "b"
run = ["stasis-probe --node b", "stasis-traffic recv --node b --port 5000"]

[[lan]]
name = "lan0"
members = ["a", "b"]
bandwidth = "100Mb"
delay = "10ms"
"#
    )
}

/// "QEMU emulator version 10.0.2 (…)" → [10, 0].
fn version(qemu: &Path) -> Vec<u32> {
    let out = std::process::Command::new(qemu).arg("--version").output().expect("run qemu --version");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text.split_whitespace().nth(3).unwrap_or_else(|| panic!("{}: no version in {text:?}", qemu.display()));
    v.split('.').take(2).map(|x| x.parse().unwrap()).collect()
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .unwrap_or_else(|| panic!("{name} not on PATH"))
}

/// (older, newer) QEMU binaries with their `pc-i440fx-X.Y` machine types.
fn the_two_qemus() -> [(PathBuf, String); 2] {
    let installed = std::env::var_os("STASIS_QEMU").map(PathBuf::from).unwrap_or_else(|| which("qemu-system-x86_64"));
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/qemu");
    let other = std::fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh unpacks the second QEMU there)", cache.display()))
        .flatten()
        .map(|d| d.path().join("usr/bin/qemu-system-x86_64"))
        .find(|b| b.is_file())
        .unwrap_or_else(|| panic!("no second QEMU in {}", cache.display()));
    let mut two = [installed, other].map(|b| {
        let v = version(&b);
        let machine = format!("pc-i440fx-{}.{}", v[0], v[1]);
        (v, b, machine)
    });
    two.sort();
    assert!(two[0].0 < two[1].0, "two different QEMU versions: {:?} {:?}", two[0], two[1]);
    two.map(|(_, b, m)| (b, m))
}

fn under(exp: &mut Experiment, qemu: &Path) {
    exp.wrapper = vec!["env".into(), format!("STASIS_QEMU={}", qemu.display())];
}

fn machines(v: &serde_json::Value) -> Vec<String> {
    v["vms"].as_array().unwrap_or(&vec![]).iter().map(|m| m["machine"].as_str().unwrap_or("?").to_owned()).collect()
}

#[test]
fn older_qemus_checkpoint_restores_under_the_newer_and_not_the_other_way() {
    let [(old, old_machine), (new, new_machine)] = the_two_qemus();
    eprintln!("older: {} ({old_machine}); newer: {} ({new_machine})", old.display(), new.display());
    let mut exp = Experiment::new("qv", &spec());

    // 1. Under the newer QEMU: its checkpoint is refused by the older one,
    //    before anything is stopped.
    under(&mut exp, &new);
    let up = exp.json(&["up", exp.spec.to_str().unwrap()]);
    assert_eq!(machines(&up), [new_machine.clone(), new_machine.clone()], "{up}");
    exp.wait_for("b", 1, Duration::from_secs(90), "traffic", |r| received(r) > 100);
    exp.json(&["checkpoint", "--name", "newer"]);
    let before = exp.pids();
    under(&mut exp, &old);
    let out = exp.run(&["restore", "newer"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the older QEMU cannot load the newer one's state: {err}");
    assert!(err.contains(&new_machine) && err.contains(&old_machine), "the refusal names both machine types: {err}");
    let after = exp.pids();
    assert_eq!(before, after, "nothing was stopped or replaced");
    assert!(after.iter().all(|p| p.2), "everything still runs: {after:?}");
    assert!(exp.json(&["down"])["stopped"].as_u64().unwrap() >= 3);

    // 2. Under the older QEMU: checkpoint under load with a pause, kill
    //    everything, restore under the newer QEMU.
    let mut exp = Experiment::new("qv", &spec());
    under(&mut exp, &old);
    let up = exp.json(&["up", exp.spec.to_str().unwrap()]);
    assert_eq!(machines(&up), [old_machine.clone(), old_machine.clone()], "{up}");
    exp.wait_for("b", 1, Duration::from_secs(90), "traffic", |r| received(r) > 100);
    let c = exp.json(&["checkpoint", "--name", "older", "--pause-ms", "3000"]);
    assert_eq!(c["vms"], 2, "{c}");
    assert!(exp.json(&["down"])["stopped"].as_u64().unwrap() >= 3);
    under(&mut exp, &new);
    let r = exp.json(&["restore", "older"]);
    assert_eq!(r["summary"]["vms"], 2, "{r}");
    assert_eq!(machines(&r["runtime"]), [old_machine.clone(), old_machine.clone()], "pinned to the saved type: {r}");
    assert_every_frame_once(&exp, "a", &["b"], 2, PER_FLOW);
    for n in ["a", "b"] {
        let steps = max_steps(&exp.reports(n, 2));
        eprintln!("{n}: largest clock steps in the restored timeline {steps:?}");
        for (clock, step) in steps {
            assert!(step < PAUSE_NS / 2, "node {n}: clock {clock} stepped {step} ns across the restore");
        }
    }
}
