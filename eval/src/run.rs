//! Runs a real experiment through the `stasis` binary in a private state
//! directory, timestamps every JSON line of the guests' consoles on arrival
//! (host CLOCK_MONOTONIC), and tears everything down when dropped.

use serde_json::Value;
use stasis_core::clock::mono_ns;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a `stasis` command failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The binary could not be started.
    #[error("cannot run {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    /// It exited with an error.
    #[error("stasis {args} failed ({code:?}): {stderr}")]
    Failed { args: String, code: Option<i32>, stderr: String },
    /// Its `--json` output did not parse.
    #[error("stasis {args}: output is not JSON: {source}")]
    Json { args: String, source: serde_json::Error },
    /// Writing the spec or creating the state directory failed.
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
}

/// One console line, as the host saw it arrive.
#[derive(Debug, Clone)]
pub struct Line {
    /// Host CLOCK_MONOTONIC when the tailer read it, ns.
    pub host_ns: u64,
    /// The node whose console printed it.
    pub node: String,
    /// The parsed JSON object.
    pub v: Value,
}

/// A running experiment; `Drop` runs `stasis down` and kills any process
/// that names the private state directory.
pub struct Experiment {
    dir: tempfile::TempDir,
    bin: PathBuf,
    name: String,
    lines: Arc<Mutex<Vec<Line>>>,
    stop: Arc<AtomicBool>,
    tailer: Option<std::thread::JoinHandle<()>>,
}

impl Experiment {
    /// Writes `spec` and runs `stasis up` (booting the VMs); starts tailing
    /// the consoles of `nodes`.
    pub fn up(bin: &Path, name: &str, spec: &str, nodes: &[&str]) -> Result<Experiment, RunError> {
        let dir = tempfile::Builder::new().prefix("stasis-eval").tempdir_in("/tmp")?;
        let spec_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&spec_path, spec)?;
        let mut exp = Experiment {
            dir,
            bin: bin.to_path_buf(),
            name: name.to_string(),
            lines: Arc::default(),
            stop: Arc::default(),
            tailer: None,
        };
        let root = exp.state().join(name);
        let consoles: Vec<(String, PathBuf)> =
            nodes.iter().map(|n| (n.to_string(), root.join("run/vm").join(n).join("serial-1.log"))).collect();
        let (lines, stop) = (exp.lines.clone(), exp.stop.clone());
        exp.tailer = Some(std::thread::spawn(move || tail(consoles, lines, stop)));
        exp.json(&["up", &spec_path.to_string_lossy()])?;
        Ok(exp)
    }

    /// The private state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Runs `stasis ARGS --json` and parses its output.
    pub fn json(&self, args: &[&str]) -> Result<Value, RunError> {
        let joined = args.join(" ");
        tracing::info!("$ stasis {joined}");
        let out = Command::new(&self.bin)
            .arg("--state-dir")
            .arg(self.state())
            .args(["-e", &self.name])
            .args(args)
            .arg("--json")
            .output()
            .map_err(|source| RunError::Spawn { bin: self.bin.clone(), source })?;
        if !out.status.success() {
            return Err(RunError::Failed {
                args: joined,
                code: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|source| RunError::Json { args: joined, source })
    }

    /// A copy of every line seen so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The arrival instant (host ns) of the first line satisfying `pred`,
    /// searched in place (no copy of the lines).
    pub fn first_line(&self, pred: impl Fn(&Line) -> bool) -> Option<u64> {
        self.lines.lock().ok()?.iter().find(|l| pred(l)).map(|l| l.host_ns)
    }

    /// A copy of the first line satisfying `pred`.
    pub fn find_line(&self, pred: impl Fn(&Line) -> bool) -> Option<Line> {
        self.lines.lock().ok()?.iter().find(|l| pred(l)).cloned()
    }

    /// Waits up to `timeout` for `pred` over the lines; returns whether it held.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Line]) -> bool) -> bool {
        let deadline = mono_ns() + timeout.as_nanos() as u64;
        loop {
            if pred(&self.lines()) {
                return true;
            }
            if mono_ns() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tail(consoles: Vec<(String, PathBuf)>, lines: Arc<Mutex<Vec<Line>>>, stop: Arc<AtomicBool>) {
    use std::io::{Read, Seek, SeekFrom};
    let mut pos = vec![0u64; consoles.len()];
    let mut partial = vec![Vec::<u8>::new(); consoles.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, (node, path)) in consoles.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(path) else { continue };
            if f.seek(SeekFrom::Start(pos[i])).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            let Ok(n) = f.read_to_end(&mut buf) else { continue };
            if n == 0 {
                continue;
            }
            let now = mono_ns();
            pos[i] += n as u64;
            partial[i].extend_from_slice(&buf);
            let Some(last_nl) = partial[i].iter().rposition(|&b| b == b'\n') else { continue };
            let complete: Vec<u8> = partial[i].drain(..=last_nl).collect();
            let mut got = Vec::new();
            for l in String::from_utf8_lossy(&complete).lines() {
                let l = l.trim_matches(|c: char| c.is_control() || c.is_whitespace());
                let Some(start) = l.find('{') else { continue };
                if let Ok(v) = serde_json::from_str::<Value>(&l[start..]) {
                    got.push(Line { host_ns: now, node: node.clone(), v });
                }
            }
            if let Ok(mut all) = lines.lock() {
                all.extend(got);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Experiment {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.tailer.take() {
            let _ = t.join();
        }
        let _ = Command::new(&self.bin).arg("--state-dir").arg(self.state()).args(["-e", &self.name, "down"]).output();
        let needle = self.dir.path().to_string_lossy().into_owned();
        let Ok(rd) = std::fs::read_dir("/proc") else { return };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(&needle) {
                    // SAFETY: kill(2) of a process whose command line names our private temp dir.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
