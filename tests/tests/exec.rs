//! Getting into a node (docs/exec.md), on one busybox VM: `stasis exec`
//! passes stdout, stderr and the exit status through; `stasis cp` copies a
//! binary file both ways byte for byte; an exec started before a checkpoint
//! carries on across the checkpoint and a restore of it; `stasis console`
//! runs a command line on the serial console and detaches on Ctrl-] while
//! the serial log keeps being written; and the bad inputs are refused naming
//! the node or the path.

use stasis_system_tests::Experiment;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = r#"
name = "exec"
[[node]]
name = "a"
memory = "256M"
"#;

/// Generous: CI may be 4x slower than a developer's machine.
const T: Duration = Duration::from_secs(120);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `stasis exec a -- ARGV` must succeed; its stdout.
fn exec_ok(exp: &Experiment, argv: &[&str]) -> String {
    let mut a = vec!["exec", "a", "--"];
    a.extend_from_slice(argv);
    let o = exp.run(&a);
    assert!(o.status.success(), "stasis exec {argv:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `stasis` with the experiment's state dir, not waited for.
fn spawn(exp: &Experiment, args: &[&str]) -> Command {
    let mut c = Command::new(stasis_system_tests::stasis_bin());
    c.arg("--state-dir").arg(exp.state()).args(["-e", &exp.name]).args(args);
    c
}

/// The restored VM's serial log (incarnation 2), as text.
fn serial_log(exp: &Experiment) -> String {
    String::from_utf8_lossy(&std::fs::read(exp.console("a", 2)).unwrap_or_default()).into_owned()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {T:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn exec_cp_console_work_and_carry_on_across_checkpoint_and_restore() {
    let t0 = Instant::now();
    let exp = Experiment::new("exec", SPEC);
    exp.json(&["up", exp.spec.to_str().unwrap()]);

    // stdout, stderr and a non-zero status pass through.
    let o = exp.run(&["exec", "a", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "the guest command's status: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(stderr(&o).ends_with("err\n"), "{}", stderr(&o));
    let j = exp.run(&["--json", "exec", "a", "--", "sh", "-c", "echo -n json; exit 5"]);
    assert_eq!(j.status.code(), Some(5));
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).expect("one JSON object");
    assert_eq!((v["node"].as_str(), v["exit_code"].as_i64(), v["stdout"].as_str()), (Some("a"), Some(5), Some("json")));
    assert_eq!(exec_ok(&exp, &["cat", "/proc/sys/kernel/hostname"]).trim(), "a");

    // cp both ways: every byte value, more than one agent chunk (1 MiB).
    let blob: Vec<u8> = (0..(1u32 << 20) + 4321).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let local = exp.dir.path().join("blob.bin");
    std::fs::write(&local, &blob).unwrap();
    let o = exp.run(&["cp", local.to_str().unwrap(), "a:/tmp/"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(exec_ok(&exp, &["wc", "-c", "/tmp/blob.bin"]).split_whitespace().next(), Some("1052897"));
    let back = exp.dir.path().join("back.bin");
    let o = exp.run(&["cp", "a:/tmp/blob.bin", back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&back).unwrap() == blob, "the file came back byte-identical");

    // Bad inputs name the node or the path.
    let o = exp.run(&["exec", "nosuch", "--", "true"]);
    assert!(!o.status.success() && stderr(&o).contains("no node \"nosuch\" (its nodes: a)"), "{}", stderr(&o));
    let o = exp.run(&["cp", local.to_str().unwrap(), "a:/proc/nope/x"]);
    assert!(
        !o.status.success() && stderr(&o).contains("node a") && stderr(&o).contains("/proc/nope/x"),
        "{}",
        stderr(&o)
    );
    let unwritable = exp.dir.path().join("no-such-dir").join("x");
    let o = exp.run(&["cp", "a:/tmp/blob.bin", unwritable.to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains(&format!("cannot write {}", unwritable.display())),
        "{}",
        stderr(&o)
    );
    let o = exp.run(&["cp", "a:tmp/x", "y"]);
    assert!(!o.status.success() && stderr(&o).contains("relative"), "{}", stderr(&o));

    // A long exec: started before the checkpoint, it ends only once the test
    // lets it (a file made after the restore), whatever the machine's speed.
    let long = spawn(
        &exp,
        &[
            "--json",
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "touch /tmp/started; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo finished",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("the long exec to start", || {
        exp.run(&["exec", "a", "--", "test", "-e", "/tmp/started"]).status.success()
    });
    exp.json(&["checkpoint", "--name", "c1"]);
    assert_eq!(exec_ok(&exp, &["echo", "after-checkpoint"]), "after-checkpoint\n");
    exp.json(&["restore", "c1"]);
    assert_eq!(exec_ok(&exp, &["echo", "after-restore"]), "after-restore\n");
    // The restored guest holds the file copied in before c1.
    assert_eq!(exec_ok(&exp, &["wc", "-c", "/tmp/blob.bin"]).split_whitespace().next(), Some("1052897"));
    exec_ok(&exp, &["touch", "/tmp/go"]);
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success(), "the long exec: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"].as_str(), Some("finished\n"), "{v}");
    eprintln!("long exec across checkpoint and restore: {} reconnects", v["reconnects"]);

    // The console, not a terminal: Enter activates the shell, a command line
    // runs, Ctrl-] detaches.
    let mut console = spawn(&exp, &["console", "a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keys = console.stdin.take().unwrap();
    let mut screen = console.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = screen.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    keys.write_all(b"\n").unwrap();
    // Typed again until it runs: the shell may still be starting (the
    // expansion, not the echo of the typed line, says it ran).
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("hello-42") {
        assert!(
            Instant::now() < deadline,
            "no hello-42 on the console: {:?}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        keys.write_all(b"echo hello-$((6*7))\n").unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    keys.write_all(&[0x1d]).unwrap();
    let status = console.wait().unwrap();
    assert!(status.success(), "console detached cleanly");
    reader.join().unwrap();
    assert!(serial_log(&exp).contains("hello-42"), "the serial log has it too");
    // Detached, the guest runs on and its console is still logged.
    exec_ok(&exp, &["sh", "-c", "echo after-detach > /dev/console"]);
    wait_until("the serial log after detaching", || serial_log(&exp).contains("after-detach"));

    // A guest without an agent: a timeout naming the node.
    // (Its own status poll then gets no answer either: it fails too.)
    let _ =
        exp.run(&["exec", "--timeout", "3", "--agent-timeout", "3", "a", "--", "sh", "-c", "kill $(pidof stasis-ga)"]);
    let o = exp.run(&["exec", "--agent-timeout", "3", "a", "--", "true"]);
    assert!(!o.status.success() && stderr(&o).contains("node a: no answer from a guest agent"), "{}", stderr(&o));

    exp.json(&["down"]);
    let o = exp.run(&["exec", "a", "--", "true"]);
    assert!(!o.status.success() && stderr(&o).contains("experiment exec is not running"), "{}", stderr(&o));
    eprintln!("exec test took {:?}", t0.elapsed());
}
