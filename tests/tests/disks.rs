//! Disks and branching history with one real VM: its data disk must always
//! match its memory. The guest's workload counts i = 1, 2, 3 … once a
//! second, writes the record `f<i>` into sector i of its raw data disk
//! (/dev/vda), syncs, drops its page cache and prints what the DISK holds
//! next to its own counter: `{"disk_i": i, "recs": "f1 f2 … "}`.
//!
//! A VM restored with the wrong disk (another checkpoint's, or one a later
//! run wrote into) would print records its counter does not know, or miss
//! ones it wrote. So after every restore every line must hold exactly
//! f1..f<i>, and the counter must resume where the checkpoint froze it.
//! The guest has no way in from the host, so the branches differ by how long
//! each runs before its checkpoint (b1 ~2 records, b2 ~6), which their
//! restores must tell apart.

use serde_json::Value;
use stasis_system_tests::Experiment;
use std::time::Duration;

// The guest image has no ext4 module: records go to raw sectors. The script
// reads 40 sectors past its counter, so records from a "future" are seen.
const SPEC: &str = r#"
name = "disks"
[[node]]
name = "a"
memory = "128M"
disk = "64M"
run = ['i=0; while :; do i=$((i+1)); echo f$i | dd of=/dev/vda bs=512 seek=$i conv=notrunc 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches; r=$(dd if=/dev/vda bs=512 count=$((i+40)) 2>/dev/null | tr -d "\000" | tr "\n" " "); echo "{\"disk_i\":$i,\"recs\":\"$r\"}"; sleep 1; done']
"#;

const T: Duration = Duration::from_secs(90);

/// The (counter, records) lines of one incarnation's console.
fn lines(exp: &Experiment, inc: u32) -> Vec<(u64, Vec<String>)> {
    exp.reports("a", inc)
        .iter()
        .filter_map(|v: &Value| {
            let i = v["disk_i"].as_u64()?;
            let recs = v["recs"].as_str()?.split_whitespace().map(str::to_owned).collect();
            Some((i, recs))
        })
        .collect()
}

fn last_i(exp: &Experiment, inc: u32) -> u64 {
    lines(exp, inc).last().map(|l| l.0).unwrap_or(0)
}

/// Every line shows exactly the records f1..f<i> of its own counter.
fn assert_consistent(exp: &Experiment, inc: u32) {
    let ls = lines(exp, inc);
    assert!(!ls.is_empty(), "incarnation {inc} printed nothing");
    for (i, recs) in &ls {
        let want: Vec<String> = (1..=*i).map(|k| format!("f{k}")).collect();
        assert_eq!(recs, &want, "incarnation {inc}: counter {i} but the disk holds {recs:?}");
    }
}

fn wait_i(exp: &Experiment, inc: u32, at_least: u64) {
    exp.wait_for("a", inc, T, &format!("disk_i >= {at_least}"), |r| {
        r.iter().filter_map(|v| v["disk_i"].as_u64()).max().unwrap_or(0) >= at_least
    });
}

/// Checkpoint, bracketing the guest's counter at the freeze: the last value
/// printed before and after the checkpoint.
fn checkpoint(exp: &Experiment, inc: u32, name: &str) -> (String, u64, u64) {
    let before = last_i(exp, inc);
    let c = exp.json(&["checkpoint", "--name", name]);
    let after = last_i(exp, inc);
    (c["info"]["id"].as_str().expect("id").to_owned(), before, after)
}

/// Restore `which` as incarnation `inc`; the restored counter must resume
/// inside the checkpoint's bracket and every line must match its disk.
fn restore_and_check(exp: &Experiment, args: &[&str], inc: u32, bracket: (u64, u64)) -> u64 {
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    exp.json(&a);
    // The state reassembled for QEMU and the delay node is gone once they have read it.
    assert!(!exp.root().join("restore").exists(), "restore leaves no state files behind");
    exp.wait_for("a", inc, T, "two lines after the restore", |r| {
        r.iter().filter(|v| v["disk_i"].is_u64()).count() >= 2
    });
    assert_consistent(exp, inc);
    let first = lines(exp, inc)[0].0;
    assert!(
        first >= bracket.0 && first <= bracket.1 + 1,
        "restored counter {first} outside the checkpoint's {bracket:?}"
    );
    first
}

#[test]
fn each_checkpoint_and_branch_sees_exactly_its_own_disk() {
    let exp = Experiment::new("disks", SPEC);
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    wait_i(&exp, 1, 3);
    let (c1, a1, b1) = checkpoint(&exp, 1, "c1");
    // The VM runs, and the checkpoint records, the versioned machine type
    // `pc` stands for on this QEMU: what a restore under another QEMU needs.
    let qemu = std::env::var("STASIS_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let version = String::from_utf8_lossy(&std::process::Command::new(&qemu).arg("--version").output().unwrap().stdout)
        .split_whitespace()
        .nth(3)
        .map(|v| v.split('.').take(2).collect::<Vec<_>>().join("."))
        .unwrap();
    let pinned = format!("\"a\":\"pc-i440fx-{version}\"");
    let machines = std::fs::read_to_string(exp.root().join("checkpoints").join(&c1).join("machines.json")).unwrap();
    assert!(machines.replace(' ', "").contains(&pinned), "{pinned} not in machines.json: {machines}");
    wait_i(&exp, 1, b1 + 3);
    let (c2, a2, b2) = checkpoint(&exp, 1, "c2");
    wait_i(&exp, 1, b2 + 1);
    assert_consistent(&exp, 1);
    exp.json(&["down"]);

    // Back to c1, then forward to c2: each sees the disk of its moment.
    let r1 = restore_and_check(&exp, &["c1"], 2, (a1, b1));
    let rt = std::fs::read_to_string(exp.root().join("runtime.json")).unwrap();
    assert!(rt.contains(&format!("pc-i440fx-{version}")), "the restored VM runs the recorded machine type: {rt}");
    assert!(r1 < a2, "c1 restored with counter {r1}, c2 was at {a2}");
    restore_and_check(&exp, &["c2"], 3, (a2, b2));

    // Two branches from c1; b1 runs briefly, b2 longer.
    exp.json(&["branch", "c1", "b1"]);
    exp.json(&["branch", "c1", "b2"]);
    let s1 = restore_and_check(&exp, &["b1"], 4, (a1, b1));
    wait_i(&exp, 4, s1 + 2);
    let (cb1, ab1, bb1) = checkpoint(&exp, 4, "b1-done");
    let s2 = restore_and_check(&exp, &["b2"], 5, (a1, b1));
    wait_i(&exp, 5, s2 + 6);
    let (cb2, ab2, bb2) = checkpoint(&exp, 5, "b2-done");
    assert!(bb1 < ab2, "the branches must differ: b1 at {ab1}..{bb1}, b2 at {ab2}..{bb2}");
    // Each branch's checkpoint, restored by branch name after both ran.
    restore_and_check(&exp, &["b1"], 6, (ab1, bb1));
    restore_and_check(&exp, &["b2"], 7, (ab2, bb2));
    exp.json(&["down"]);

    // The history tree: c2 and both branches grow from c1.
    let log = exp.json(&["log"]);
    let cks = log["checkpoints"].as_array().unwrap();
    let find = |id: &str| cks.iter().find(|c| c["id"] == id).unwrap_or_else(|| panic!("{id} not in {log}"));
    assert_eq!(find(&c1)["parent"], Value::Null);
    assert_eq!(find(&c2)["parent"], c1.as_str());
    assert_eq!(find(&cb1)["parent"], c1.as_str());
    assert_eq!(find(&cb1)["branch"], "b1");
    assert_eq!(find(&cb2)["parent"], c1.as_str());
    assert_eq!(find(&cb2)["branch"], "b2");
    assert_eq!(log["branches"]["b1"]["head"], cb1.as_str());
    assert_eq!(log["branches"]["b2"]["head"], cb2.as_str());
    // Every checkpoint froze its own disk image; no two share one.
    let images: std::collections::HashSet<String> =
        cks.iter().map(|c| c["disks"]["a"][0].as_str().unwrap().to_owned()).collect();
    assert_eq!(images.len(), cks.len(), "{log}");

    let d = exp.json(&["diff", "c1", "c2"]);
    let vm = d["components"].as_array().unwrap().iter().find(|c| c["name"] == "a").expect("VM a in the diff").clone();
    let share = vm["dirty_share"].as_f64().unwrap();
    assert!(vm["shared_chunks"].as_u64().unwrap() > 0 && share > 0.0 && share < 1.0, "{d}");
    // The disk switch is timed in the manifest (it lengthens the freeze).
    let show = exp.json(&["show", "c2"]);
    let snap = show["manifest"]["timings"]["extra"]["disk_snapshot_ns"].as_u64().expect("disk_snapshot_ns recorded");
    assert!(snap > 0, "{show}");
    let text = exp.run(&["log"]);
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success() && shown.contains("head of b1") && shown.contains("[b2]"), "{shown}");
    let diff_text = exp.run(&["diff", "c1", "c2"]);
    assert!(diff_text.status.success());
    eprintln!("disk snapshot {snap} ns\nlog: {log}\ndiff c1 c2: {d}");
}
