//! Shared harness: boot TCG guests of the project image on vhost-user NICs,
//! a minimal synchronous QMP client, serial-log parsing. Every QEMU is killed
//! by its guard's Drop, also when a test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/guest` of the workspace.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest")
}

/// Fails (does not skip) when the image is missing.
pub fn require_image() -> (PathBuf, PathBuf) {
    let d = guest_dir();
    let (k, i) = (d.join("vmlinuz"), d.join("initrd.img"));
    assert!(
        k.is_file() && i.is_file(),
        "guest image missing: {} and {} must exist; build them with `bash guest/build.sh`",
        k.display(),
        i.display()
    );
    (k, i)
}

pub struct Guest {
    pub name: String,
    pub child: Child,
    pub serial: PathBuf,
    pub qmp: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct GuestSpec<'a> {
    pub name: &'a str,
    pub ip: &'a str,
    pub mac: &'a str,
    pub script: &'a str,
    pub vhost_socket: &'a Path,
    pub dir: &'a Path,
    /// `Some(file)`: start with `-S -incoming exec:cat FILE` (a restore).
    pub incoming: Option<&'a Path>,
    /// Serial log file name suffix, so a restored guest logs to a new file.
    pub log_suffix: &'a str,
    /// Use `-netdev stream` (client of `vhost_socket`) instead of vhost-user.
    pub stream_mode: bool,
}

pub fn boot(spec: &GuestSpec) -> Guest {
    let (kernel, initrd) = require_image();
    let serial = spec.dir.join(format!("{}{}.log", spec.name, spec.log_suffix));
    let qmp = spec.dir.join(format!("{}{}.qmp", spec.name, spec.log_suffix));
    let run = base64(spec.script.as_bytes());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"]);
    if spec.stream_mode {
        cmd.arg("-netdev")
            .arg(format!("stream,id=n0,server=off,addr.type=unix,addr.path={}", spec.vhost_socket.display()))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={},romfile=", spec.mac));
    } else {
        cmd.arg("-chardev")
            .arg(format!("socket,id=c0,path={}", spec.vhost_socket.display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={},vectors=0,romfile=", spec.mac));
    }
    cmd.arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel=1 panic=-1 stasis.node={} stasis.ip=eth0:{}/24 stasis.run={run}",
            spec.name, spec.ip
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(spec.dir.join(format!("{}{}.qemu.err", spec.name, spec.log_suffix))).unwrap(),
        ));
    if let Some(f) = spec.incoming {
        cmd.arg("-S").arg("-incoming").arg(format!("exec:cat {}", f.display()));
    }
    let child = cmd.spawn().expect("qemu-system-x86_64 must be installed");
    Guest { name: spec.name.to_string(), child, serial, qmp }
}

/// Synchronous QMP client; skips asynchronous events.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp { reader: BufReader::new(s.try_clone().unwrap()), writer: s };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "QMP greeting: {greeting}");
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Sends one command and returns its reply line (panics on an error reply).
    pub fn cmd(&mut self, json: &str) -> String {
        self.writer.write_all(json.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "QMP closed while waiting for the reply to {json}");
            if line.contains("\"event\"") {
                continue;
            }
            assert!(!line.contains("\"error\""), "QMP {json} failed: {line}");
            return line;
        }
    }

    /// Polls `query-migrate` until it is completed.
    pub fn wait_migrated(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.cmd(r#"{"execute":"query-migrate"}"#);
            if r.contains("\"completed\"") {
                return;
            }
            assert!(!r.contains("\"failed\""), "migration failed: {r}");
            assert!(Instant::now() < deadline, "migration not completed: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until `pred` holds for some line of the serial log.
pub fn wait_serial(g: &Guest, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(&g.serial) {
            if let Some(l) = text.lines().find(|l| pred(l)) {
                return l.to_string();
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(&g.serial).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            panic!("{} never printed {what} within {timeout:?}; last lines:\n{}", g.name, tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last JSON line of the serial log that contains every `needle`.
pub fn last_json(g: &Guest, needles: &[&str]) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(&g.serial).ok()?;
    text.lines()
        .rev()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with('{') && needles.iter().all(|n| l.contains(n)))
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Standard base64 with padding (the guest's `base64 -d` reads it).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
