//! OS images (docs/images.md): two nodes on the Debian 12 reference image
//! (`make image`), 1 GiB each by default, one booted by firmware (SeaBIOS →
//! the image's GRUB) and one by direct kernel boot. Each node's `run`
//! command (through its cloud-init seed) counts i = 1, 2, 3 … once a
//! second, appends i to /var/tmp/marks on its ROOT disk, syncs, drops the
//! page cache and prints what the file holds: `{"mark": i, "marks": "1 2 … i"}`.
//!
//! Checkpoint, let it go on, stop everything, restore: every line printed
//! after the restore must show exactly the marks 1..i of its own counter
//! (a root disk from after the checkpoint would show marks the counter does
//! not know yet), and the counter resumes where the checkpoint froze it.
//! The user's image files are never written (hashed before and after).
//! Then the base image of one node is changed: a restore is refused naming
//! the file, and the running experiment is left as it was.

use serde_json::Value;
use stasis_system_tests::{target_dir, Experiment};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP: &str = r#"i=0; while :; do i=$((i+1)); echo $i >> /var/tmp/marks; sync; echo 3 > /proc/sys/vm/drop_caches; r=$(tr "\n" " " < /var/tmp/marks); echo "{\"mark\":$i,\"marks\":\"$r\"}"; sleep 1; done"#;

/// Generous: two systemd guests boot under TCG on a shared machine.
const T: Duration = Duration::from_secs(900);

fn image_dir() -> PathBuf {
    let dir = target_dir().join("images").join("debian-12");
    assert!(dir.join("disk.qcow2").exists(), "{} has no disk.qcow2: run `make image`", dir.display());
    std::fs::canonicalize(dir).unwrap()
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

/// The (counter, marks) lines of one node's incarnation.
fn lines(exp: &Experiment, node: &str, inc: u32) -> Vec<(u64, Vec<u64>)> {
    exp.reports(node, inc)
        .iter()
        .filter_map(|v: &Value| {
            let i = v["mark"].as_u64()?;
            let marks = v["marks"].as_str()?.split_whitespace().map(|m| m.parse().unwrap_or(u64::MAX)).collect();
            Some((i, marks))
        })
        .collect()
}

fn last(exp: &Experiment, node: &str, inc: u32) -> u64 {
    lines(exp, node, inc).last().map(|l| l.0).unwrap_or(0)
}

fn wait_mark(exp: &Experiment, node: &str, inc: u32, at_least: u64) {
    exp.wait_for(node, inc, T, &format!("mark >= {at_least}"), |r| {
        r.iter().filter_map(|v| v["mark"].as_u64()).max().unwrap_or(0) >= at_least
    });
}

/// Every line shows exactly the marks 1..=i of its own counter.
fn assert_consistent(exp: &Experiment, node: &str, inc: u32) {
    let ls = lines(exp, node, inc);
    assert!(!ls.is_empty(), "{node}: incarnation {inc} printed nothing");
    for (i, marks) in &ls {
        let want: Vec<u64> = (1..=*i).collect();
        assert_eq!(marks, &want, "{node} incarnation {inc}: counter {i} but the root disk holds {marks:?}");
    }
}

#[test]
fn root_disks_boot_both_ways_checkpoint_restore_and_refuse_a_changed_base() {
    let started = Instant::now();
    let images = image_dir();
    let dir = tempfile::Builder::new().prefix("stasis-osimage").tempdir_in("/tmp").unwrap();
    // The firmware node's base is a copy, so the test can change it.
    let copy = dir.path().join("base.qcow2");
    let cp = std::process::Command::new("cp").arg("--reflink=auto").arg(images.join("disk.qcow2")).arg(&copy).status();
    assert!(cp.unwrap().success());
    let orig_hash = sha256(&images.join("disk.qcow2"));
    let copy_hash = sha256(&copy);
    let spec = format!(
        r#"
name = "osimage"
[[node]]
name = "fw"
image = "{copy}"
run = ['{LOOP}']
[[node]]
name = "kb"
image = "{dir}"
boot = "kernel"
run = ['{LOOP}']
"#,
        copy = copy.display(),
        dir = images.display(),
    );
    let exp = Experiment::new("osimage", &spec);
    let v = exp.json(&["validate", exp.spec.to_str().unwrap()]);
    eprintln!("validate: {v}");

    let up = Instant::now();
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    let boot = up.elapsed();
    for n in ["fw", "kb"] {
        wait_mark(&exp, n, 1, 3);
    }
    // 1 GiB each (the default for image nodes), and the boot modes asked for.
    let cmdline = |n: &str| {
        let pid = exp.pids().into_iter().find(|p| p.0 == n).unwrap().1;
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ")
    };
    let (fw, kb) = (cmdline("fw"), cmdline("kb"));
    assert!(fw.contains("-m 1024M") && kb.contains("-m 1024M"), "{fw}\n{kb}");
    assert!(!fw.contains("-kernel") && fw.contains("bootindex=0"), "fw boots by firmware: {fw}");
    assert!(kb.contains(&format!("-kernel {}", images.join("vmlinuz").display())), "kb boots its kernel: {kb}");
    assert!(fw.contains("id=seed0,readonly=on") && kb.contains("id=seed0,readonly=on"), "seeds attached");

    let before: Vec<u64> = ["fw", "kb"].iter().map(|n| last(&exp, n, 1)).collect();
    let ck = Instant::now();
    let c = exp.json(&["checkpoint", "--name", "c1"]);
    let ck_time = ck.elapsed();
    let after: Vec<u64> = ["fw", "kb"].iter().map(|n| last(&exp, n, 1)).collect();
    let id = c["info"]["id"].as_str().unwrap().to_owned();
    let bases = std::fs::read_to_string(exp.root().join("checkpoints").join(&id).join("bases.json")).unwrap();
    assert!(bases.contains(&copy.display().to_string()) && bases.contains("blake3"), "{bases}");
    // It goes on, writing marks the restore must not see.
    for (n, a) in ["fw", "kb"].iter().zip(&after) {
        wait_mark(&exp, n, 1, a + 4);
        assert_consistent(&exp, n, 1);
    }
    exp.json(&["down"]);

    let rs = Instant::now();
    exp.json(&["restore", "c1"]);
    let rs_time = rs.elapsed();
    for (k, n) in ["fw", "kb"].iter().enumerate() {
        exp.wait_for(n, 2, T, "two lines after the restore", |r| r.iter().filter(|v| v["mark"].is_u64()).count() >= 2);
        assert_consistent(&exp, n, 2);
        let first = lines(&exp, n, 2)[0].0;
        assert!(
            first >= before[k] && first <= after[k] + 1,
            "{n}: restored counter {first} outside the checkpoint's {}..{}",
            before[k],
            after[k]
        );
    }
    assert_eq!(sha256(&images.join("disk.qcow2")), orig_hash, "the reference image was written");
    assert_eq!(sha256(&copy), copy_hash, "the user's image was written");

    // The base changes (one byte appended): a restore is refused naming the
    // file, and the running experiment is left alone.
    let pids = exp.pids();
    let disks_before = list(&exp.root().join("disks"));
    std::fs::OpenOptions::new().append(true).open(&copy).unwrap().write_all(&[0]).unwrap();
    let out = exp.run(&["restore", "c1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restore over a changed base succeeded");
    assert!(err.contains(&copy.display().to_string()) && err.contains("changed"), "{err}");
    assert_eq!(exp.pids(), pids, "nothing was stopped");
    assert!(pids.iter().all(|p| p.2), "{pids:?}");
    assert_eq!(list(&exp.root().join("disks")), disks_before, "no disk image made or removed");
    let now = last(&exp, "fw", 2);
    wait_mark(&exp, "fw", 2, now + 2);
    assert_consistent(&exp, "fw", 2);
    exp.json(&["down"]);
    eprintln!(
        "osimage: up (both booted) {boot:?}, checkpoint {ck_time:?}, restore {rs_time:?}, whole test {:?}",
        started.elapsed()
    );
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(list(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}
