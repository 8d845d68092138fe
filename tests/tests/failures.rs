//! Checkpoints that fail, and bad input: the experiment keeps running (or is
//! cleanly reported), no partial checkpoint is listed, nothing is deleted,
//! and earlier checkpoints still restore.

use stasis_system_tests::{last_recv, Experiment};
use std::io::Write;
use std::time::{Duration, Instant};

const SPEC: &str = r#"
name = "fail"
[[node]]
name = "a"
run = ["sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --rate 50 --size 100"]
[[node]]
name = "b"
run = ["stasis-traffic recv --node b --port 5000"]
[[link]]
name = "l0"
a = "a"
b = "b"
delay = "5ms"
"#;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn killing_a_vm_during_save_aborts_and_earlier_checkpoints_survive() {
    let exp = Experiment::new("fail", SPEC);
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    exp.wait_for("b", 1, Duration::from_secs(60), "traffic", |r| !last_recv(r).is_empty());
    let good = exp.json(&["checkpoint", "--name", "good"]);
    assert_eq!(good["vms"], 2);
    // Its fidelity report names every component with its frozen duration.
    let show = exp.run(&["show", "good"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success() && text.contains("stop skew") && text.contains("delay-node"), "{text}");
    let shown = exp.json(&["show", "good"]);
    let comps = shown["manifest"]["components"].as_array().unwrap();
    assert_eq!(comps.len(), 3, "2 VMs and the delay node");
    let d = shown["manifest"]["freeze"]["frozen_duration_ns"].as_u64().unwrap();
    for c in comps {
        let frozen = c["frozen_ns"].as_u64().unwrap();
        assert!(frozen.abs_diff(d) < 50_000_000, "{} frozen {frozen} ns, D {d} ns", c["name"]);
    }

    // Start a checkpoint and kill VM b as soon as its state is being saved.
    let pid_b = exp.pids().into_iter().find(|p| p.0 == "b").expect("b runs").1;
    let events = exp.root().join("events.jsonl");
    let seen = std::fs::read_to_string(&events).unwrap().lines().count();
    let child = std::process::Command::new(stasis_system_tests::stasis_bin())
        .arg("--state-dir")
        .arg(exp.state())
        .args(["checkpoint", "--name", "bad", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&events).unwrap();
        if text.lines().skip(seen).any(|l| l.contains("\"saving\"") && l.contains("\"component\":\"b\"")) {
            // SAFETY: kill(2) of the QEMU this test's experiment started.
            unsafe { libc::kill(pid_b as i32, libc::SIGKILL) };
            break;
        }
        assert!(Instant::now() < deadline, "the checkpoint never started saving b");
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!("bad checkpoint: {}", stderr(&out));
    assert!(!out.status.success(), "a checkpoint whose VM died must fail");
    assert!(stderr(&out).contains("aborted"), "{}", stderr(&out));

    // Not listed, no leftovers, and the survivor runs on.
    let list = exp.json(&["list"]);
    let names: Vec<_> = list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(names, ["good"]);
    let leftovers: Vec<_> = std::fs::read_dir(exp.root().join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "chunks")
        .collect();
    assert_eq!(leftovers.len(), 1, "only the good checkpoint is on disk: {leftovers:?}");
    let procs = exp.pids();
    assert!(procs.iter().any(|p| p.0 == "a" && p.2), "VM a keeps running: {procs:?}");
    assert!(procs.iter().any(|p| p.0 == "delay-node" && p.2), "delay node keeps running: {procs:?}");

    // A checkpoint of the damaged experiment fails up front and names b.
    let o = exp.run(&["checkpoint", "--name", "after"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"b\""), "{}", stderr(&o));

    // The earlier checkpoint restores, and traffic flows again.
    let r = exp.json(&["restore", "good"]);
    assert_eq!(r["summary"]["vms"], 2);
    let before = last_recv(&exp.reports("b", 2)).first().and_then(|f| f["received"].as_u64()).unwrap_or(0);
    exp.wait_for("b", 2, Duration::from_secs(60), "traffic after restore", |r| {
        last_recv(r).first().and_then(|f| f["received"].as_u64()).unwrap_or(0) > before + 50
    });
    let f = last_recv(&exp.reports("b", 2)).remove(0);
    assert_eq!(f["missing"].as_u64(), Some(0), "{f}");
    assert_eq!(f["dups"].as_u64(), Some(0), "{f}");

    // A checkpoint of another experiment is refused, naming both.
    let other = exp.state().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("experiment.toml"), "name = \"other\"\n[[node]]\nname = \"x\"\n").unwrap();
    let good_path = exp.root().join("checkpoints").join(good["info"]["id"].as_str().unwrap());
    let o = exp.run(&["-e", "other", "restore", good_path.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"fail\"") && stderr(&o).contains("\"other\""), "{}", stderr(&o));
    assert!(exp.pids().iter().all(|p| p.2), "refusing a foreign checkpoint touches nothing");

    // Damaged checkpoints are refused before anything running is touched.
    let second = exp.json(&["checkpoint", "--name", "second"]);
    let dir = exp.root().join("checkpoints");
    let good_dir = dir.join(good["info"]["id"].as_str().unwrap());
    let second_dir = dir.join(second["info"]["id"].as_str().unwrap());
    // State files are kept as chunks (crates/store): damage a chunk that
    // only this checkpoint's component uses, so the other stays intact.
    // Flip a byte in a chunk of VM a's state of "good".
    let f = unique_chunk(&dir, &good_dir, "vm-a");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let o = exp.run(&["restore", "good"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("vm-a"), "the error names the damaged component: {}", stderr(&o));
    let chunk_id = format!(
        "{}{}",
        f.parent().unwrap().file_name().unwrap().to_string_lossy(),
        f.file_name().unwrap().to_string_lossy()
    );
    assert!(stderr(&o).contains(&chunk_id), "the error names the damaged chunk: {}", stderr(&o));
    // fsck names it too.
    let o = exp.run(&["fsck"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(&chunk_id), "{}", String::from_utf8_lossy(&o.stdout));
    // Truncate a chunk of the delay-node state of "second".
    let f = unique_chunk(&dir, &second_dir, "delay-node");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let o = exp.run(&["restore", "second"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("delay-node"), "{}", stderr(&o));
    // Nothing was deleted, and the experiment still runs.
    assert!(good_dir.join("manifest.json").exists() && second_dir.join("manifest.json").exists());
    assert!(exp.pids().iter().all(|p| p.2), "the running experiment is untouched");
    let _ = std::io::stderr().flush();
}

/// The file of a chunk of the component whose state file is `component` in
/// checkpoint `ckpt` that no other component of any checkpoint in `store`
/// references.
fn unique_chunk(store: &std::path::Path, ckpt: &std::path::Path, component: &str) -> std::path::PathBuf {
    let chunks_of = |manifest: &std::path::Path| -> Vec<(String, String)> {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        let mut out = Vec::new();
        for c in m["components"].as_array().unwrap() {
            for r in c["chunks"].as_array().into_iter().flatten() {
                out.push((c["file"].as_str().unwrap().to_string(), r["id"].as_str().unwrap().to_string()));
            }
        }
        out
    };
    let mine = chunks_of(&ckpt.join("manifest.json"));
    let mut others = std::collections::HashSet::new();
    for e in std::fs::read_dir(store).unwrap().flatten() {
        let m = e.path().join("manifest.json");
        if m.exists() {
            for (name, id) in chunks_of(&m) {
                if e.path() != ckpt || name != component {
                    others.insert(id);
                }
            }
        }
    }
    let id = mine
        .iter()
        .find(|(name, id)| name == component && !others.contains(id))
        .map(|(_, id)| id.clone())
        .unwrap_or_else(|| panic!("{component} of {} has no chunk of its own", ckpt.display()));
    store.join("chunks").join(&id[..2]).join(&id[2..])
}

#[test]
fn bad_specs_and_foreign_checkpoints_are_refused_clearly() {
    // Malformed TOML: error names file, line and column.
    let exp = Experiment::new("bad", "name = \"bad\"\n[[node]]\nname = \"a\"\nmemory = 256M\n");
    let o = exp.run(&["up", exp.spec.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.toml:4"), "{}", stderr(&o));

    // Unknown node in a link.
    std::fs::write(&exp.spec, "name = \"bad\"\n[[node]]\nname = \"a\"\n[[link]]\nname = \"l\"\na = \"a\"\nb = \"z\"\n")
        .unwrap();
    let o = exp.run(&["up", exp.spec.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"z\""), "{}", stderr(&o));

    // Missing kernel: nothing starts.
    std::fs::write(&exp.spec, "name = \"bad\"\n[[node]]\nname = \"a\"\nkernel = \"/nonexistent/vmlinuz\"\n").unwrap();
    let o = exp.run(&["up", exp.spec.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/vmlinuz"), "{}", stderr(&o));

    // Nothing to restore in an empty state dir.
    let o = exp.run(&["restore", "latest"]);
    assert!(!o.status.success());

    // A QEMU that fails to start the second VM: the error names the VM, and
    // nothing of the failed start stays running (the delay node and the
    // first VM were started before it).
    std::fs::write(&exp.spec, "name = \"bad\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n").unwrap();
    let fake = exp.dir.path().join("qemu-failing-for-b");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \"$*\" in *guest=b,*) echo \"no b today\" >&2; exit 1;; esac\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut failing = Experiment::new("bad", "");
    failing.spec = exp.spec.clone();
    failing.wrapper = vec!["env".into(), format!("STASIS_QEMU={}", fake.display())];
    let o = failing.run(&["up", failing.spec.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("VM \"b\"") && stderr(&o).contains("no b today"), "{}", stderr(&o));
    let state = failing.state().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&state) && !c.contains("qemu-failing-for-b"))
        .collect();
    assert!(left.is_empty(), "processes of the failed start still run: {left:?}");
}
