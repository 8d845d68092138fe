//! Crash and full-disk safety: the `stasis` process killed while it saves a
//! checkpoint, while it commits one and while it collects garbage; a state
//! directory that runs out of space during a checkpoint. Each time the store
//! stays consistent (`fsck` clean), no partial checkpoint is listed, and the
//! earlier checkpoint restores into a running timeline. Also: `stasis gc`
//! removes the qcow2 images nothing needs and keeps every live chain.

use stasis_system_tests::{received, stasis_bin, Experiment};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spec(name: &str, disk: bool) -> String {
    format!(
        r#"
name = "{name}"
nic = "stream"
[[node]]
name = "a"
memory = "128M"
{}
run = ["sleep 2; stasis-traffic send --node a --to 10.0.1.2:5000 --rate 50 --size 100"]
[[node]]
name = "b"
memory = "128M"
run = ["stasis-traffic recv --node b --port 5000"]
[[link]]
name = "l0"
a = "a"
b = "b"
delay = "5ms"
"#,
        if disk { r#"disk = "32M""# } else { "" }
    )
}

fn stasis(exp: &Experiment, args: &[&str]) -> Command {
    let mut c = Command::new(stasis_bin());
    c.arg("--state-dir").arg(exp.state()).args(["-e", &exp.name]).args(args);
    c
}

fn fsck_clean(exp: &Experiment) {
    let out = exp.run(&["fsck"]);
    assert!(out.status.success(), "fsck not clean: {}", String::from_utf8_lossy(&out.stdout));
}

fn list_names(exp: &Experiment) -> Vec<String> {
    exp.json(&["list"]).as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap_or("-").to_string()).collect()
}

/// Traffic reaches b in `incarnation`, and keeps reaching it.
fn traffic_flows(exp: &Experiment, incarnation: u32) {
    let before = received(&exp.reports("b", incarnation));
    exp.wait_for("b", incarnation, Duration::from_secs(60), "traffic flowing", |r| received(r) > before + 50);
}

/// Waits until the event log, past its first `seen` lines, says the
/// checkpoint started saving VM `a`.
fn wait_saving_a(events: &Path, seen: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(events).unwrap();
        if text.lines().skip(seen).any(|l| l.contains(r#""event":"saving""#) && l.contains(r#""component":"a""#)) {
            return;
        }
        assert!(Instant::now() < deadline, "the checkpoint never started saving a");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every qcow2 image under the experiment's disks/.
fn images(exp: &Experiment) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for node in std::fs::read_dir(exp.root().join("disks")).into_iter().flatten().flatten() {
        for e in std::fs::read_dir(node.path()).into_iter().flatten().flatten() {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

#[test]
fn killed_checkpoints_and_gcs_leave_a_consistent_store() {
    let exp = Experiment::new("crash", &spec("crash", true));
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    traffic_flows(&exp, 1);
    exp.json(&["checkpoint", "--name", "first"]);

    // 1. The process dies between writing chunks and publishing the manifest
    //    (the store's failpoint aborts it there): orphan chunks, no checkpoint.
    let out = stasis(&exp, &["checkpoint", "--name", "halfway"])
        .env("STASIS_STORE_FAILPOINT", "commit-after-chunks")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the failpoint killed the commit");
    assert_eq!(list_names(&exp), ["first"]);

    // 2. SIGKILL while a VM's state is being saved.
    let events = exp.root().join("events.jsonl");
    let seen = std::fs::read_to_string(&events).unwrap().lines().count();
    let mut child =
        stasis(&exp, &["checkpoint", "--name", "doomed"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_saving_a(&events, seen);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(list_names(&exp), ["first"], "no partial checkpoint is listed");

    // 2a. Nobody resumes a SIGKILLed checkpoint's experiment: `status` says
    //     what is frozen, `stasis resume` starts it all again.
    let st = exp.json(&["status"]);
    let frozen_vms = st["frozen"]["vms"].as_array().unwrap_or_else(|| panic!("status reports frozen parts: {st}"));
    assert_eq!(frozen_vms.len(), 2, "both VMs were stopped by the killed checkpoint: {st}");
    assert_eq!(st["frozen"]["delay_node"], true, "{st}");
    let text = String::from_utf8_lossy(&exp.run(&["status"]).stdout).to_string();
    assert!(text.contains("FROZEN") && text.contains("stasis resume"), "status tells what to do: {text}");
    let r = exp.json(&["resume"]);
    eprintln!("resume: {r}");
    assert_eq!(r["frozen"]["vms"].as_array().unwrap().len(), 2, "{r}");
    assert!(r["max_error_ns"].as_u64().unwrap() < 50_000_000, "every part resumed at one instant: {r}");
    let st = exp.json(&["status"]);
    assert!(st["frozen"]["vms"].as_array().unwrap().is_empty() && st["frozen"]["delay_node"] == false, "{st}");
    traffic_flows(&exp, 1);
    let again = exp.json(&["resume"]);
    assert!(again["frozen"]["vms"].as_array().unwrap().is_empty(), "a second resume finds nothing frozen: {again}");

    // 2b. Ctrl-C (SIGINT) while a VM's state is being saved does not leave
    //     the experiment frozen: the checkpoint finishes first.
    let seen = std::fs::read_to_string(&events).unwrap().lines().count();
    let child = stasis(&exp, &["checkpoint", "--name", "interrupted"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_saving_a(&events, seen);
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the interrupted checkpoint finished: {err}");
    assert!(err.contains("interrupt noted"), "the user is told why it goes on: {err}");
    assert_eq!(list_names(&exp), ["first", "interrupted"]);
    let st = exp.json(&["status"]);
    assert!(st["frozen"]["vms"].as_array().unwrap().is_empty(), "{st}");
    traffic_flows(&exp, 1);

    // 3. A gc that dies after its first deletion, and one SIGKILLed at once.
    let out = stasis(&exp, &["gc"]).env("STASIS_STORE_FAILPOINT", "gc-after-first-delete").output().unwrap();
    assert!(!out.status.success(), "the failpoint killed the gc");
    fsck_clean(&exp);
    let mut gc = stasis(&exp, &["gc"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let _ = gc.kill();
    gc.wait().unwrap();
    let gc = exp.json(&["gc"]);
    eprintln!("gc after the crashes: {gc}");

    // 4. The earlier checkpoint restores and runs.
    let first_disk: std::collections::BTreeMap<String, PathBuf> = {
        let dir = exp.json(&["list"])[0]["dir"].as_str().map(PathBuf::from).unwrap();
        serde_json::from_slice(&std::fs::read(dir.join("disks.json")).unwrap()).unwrap()
    };
    let r = exp.json(&["restore", "first"]);
    assert_eq!(r["runtime"]["incarnation"], 2);
    traffic_flows(&exp, 2);

    // 5. Disk gc: the overlays the dead timeline wrote are collected; the
    //    running VM's overlay and the chain under "first" stay.
    let before = images(&exp);
    let gc = exp.json(&["gc"]);
    let after = images(&exp);
    eprintln!("disk images before gc {before:?}\nafter {after:?}\ngc {gc}");
    assert!(gc["disks"]["images_removed"].as_u64().unwrap() >= 1, "the dead timeline's overlays are collected: {gc}");
    assert_eq!(before.len() - after.len(), gc["disks"]["images_removed"].as_u64().unwrap() as usize);
    let running = exp.json(&["status"]);
    assert!(running["processes"].as_array().unwrap().iter().all(|p| p["alive"] == true), "{running}");
    let rt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exp.root().join("runtime.json")).unwrap()).unwrap();
    let live_top = PathBuf::from(rt["vms"][0]["disk"].as_str().unwrap());
    assert!(live_top.exists(), "the running VM's overlay is kept");
    assert!(first_disk["a"].exists(), "the frozen image of 'first' is kept");
    base_chain_exists(&first_disk["a"]);
    traffic_flows(&exp, 2);
    fsck_clean(&exp);
}

/// The backing chain of `image` is whole (qemu-img opens every file of it).
fn base_chain_exists(image: &Path) {
    let out = Command::new("qemu-img").args(["info", "--backing-chain", "-U"]).arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "backing chain of {} broken: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs mounted for one test, unmounted and removed on drop (after the
/// experiment's own teardown, if declared before it). Its root is 0700, as
/// stasis requires of a state directory.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn at(dir: PathBuf, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {} (the test needs root)", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_state_dir_aborts_the_checkpoint_and_the_experiment_runs_on() {
    // Declared first so that it is unmounted after the experiment is down,
    // also when the test fails.
    let fs: Tmpfs;
    let exp = Experiment::new("enospc", &spec("enospc", false));
    // The state dir is the small tmpfs itself (stasis refuses a symlinked one).
    fs = Tmpfs::at(exp.state(), 400);
    exp.json(&["up", exp.spec.to_str().unwrap()]);
    traffic_flows(&exp, 1);
    exp.json(&["checkpoint", "--name", "first"]);

    // Leave 24 MiB: less than one VM's state.
    let free = {
        let out = Command::new("df").args(["-B1", "--output=avail"]).arg(&fs.0).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let filler = fs.0.join("filler");
    let st = Command::new("fallocate").args(["-l", &(free - (24 << 20)).to_string()]).arg(&filler).status().unwrap();
    assert!(st.success());

    let out = exp.run(&["checkpoint", "--name", "second"]);
    assert!(!out.status.success(), "the second checkpoint cannot fit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space"), "a clear 'no space' error: {err}");
    assert!(err.contains("aborted"), "{err}");

    // The experiment runs on; nothing partial is listed; the store is sound.
    traffic_flows(&exp, 1);
    assert_eq!(list_names(&exp), ["first"]);
    fsck_clean(&exp);

    // With room again, the first checkpoint restores.
    std::fs::remove_file(&filler).unwrap();
    let r = exp.json(&["restore", "first"]);
    assert_eq!(r["runtime"]["incarnation"], 2);
    traffic_flows(&exp, 2);
    drop(exp);
    drop(fs);
}
