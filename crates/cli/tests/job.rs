//! One command at a time changes an experiment: while one holds the job
//! lock (here: this test, as a running `stasis checkpoint` would), `down`,
//! `restore`, `checkpoint` and `resume` are refused naming it, and `status`
//! says who is at work; once it is released they run.

use std::process::{Command, Output};

use stasis_agent::job::JobLock;
use stasis_agent::layout::Layout;

fn stasis(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stasis")).arg("--state-dir").arg(state).args(args).output().unwrap()
}

#[test]
fn a_second_command_is_refused_naming_the_first_and_runs_once_it_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let layout = Layout::new(&state, "lab");
    std::fs::create_dir_all(layout.root()).unwrap();
    std::fs::write(layout.root().join("experiment.toml"), "name = \"lab\"\n[[node]]\nname = \"a\"\n").unwrap();
    let held = JobLock::acquire(&layout, "lab", "checkpoint").unwrap();
    for args in [&["down"][..], &["restore", "latest"], &["checkpoint"], &["resume"]] {
        let out = stasis(&state, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran during another command: {err}");
        for part in ["experiment \"lab\" is busy", "`stasis checkpoint`", &format!("pid {}", std::process::id())] {
            assert!(err.contains(part), "{args:?}: {part:?} missing in: {err}");
        }
    }
    let out = stasis(&state, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("busy: `stasis checkpoint`"), "status: {text}");
    drop(held);
    // Released: `down` runs (and finds nothing running), no longer "busy".
    let out = stasis(&state, &["down"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("busy"), "{err}");
}
