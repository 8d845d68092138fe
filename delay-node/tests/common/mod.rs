//! Helpers shared by the socket-level tests: the real `delay-node` binary in a
//! guard that kills it on drop, and test clients speaking the stream framing.
#![allow(dead_code)]

pub mod scenario;

use delay_node::control::Client;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The node process; killed and reaped on drop.
pub struct NodeProc {
    pub child: Child,
    pub control: PathBuf,
}

impl NodeProc {
    pub fn start(topology: &Path, control: &Path, restore: Option<&Path>, events: &Path) -> NodeProc {
        Self::start_with(topology, control, restore, events, &[])
    }

    /// [`start`](Self::start) with more arguments for the node.
    pub fn start_with(
        topology: &Path,
        control: &Path,
        restore: Option<&Path>,
        events: &Path,
        extra: &[&std::ffi::OsStr],
    ) -> NodeProc {
        // The control socket's appearance means "ready"; a stale one from a killed node must go first.
        let _ = std::fs::remove_file(control);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_delay-node"));
        cmd.arg("--topology").arg(topology).arg("--control").arg(control).arg("--events").arg(events);
        cmd.args(extra);
        if let Some(r) = restore {
            cmd.arg("--restore").arg(r);
        }
        cmd.stdin(Stdio::null()).env("RUST_LOG", "warn");
        let child = cmd.spawn().expect("spawn delay-node");
        set_fifo(child.id() as i32);
        let p = NodeProc { child, control: control.to_owned() };
        let t0 = Instant::now();
        while !control.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "node did not become ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        p
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub fn client(rt: &tokio::runtime::Runtime, control: &Path) -> Client {
    rt.block_on(Client::connect(control)).expect("control connect")
}

pub fn mac(i: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, i]
}

/// A frame: dst, src, ethertype 0x88b5, flow, seq, send instant, padded to `len`.
pub fn test_frame(dst: u8, src: u8, flow: u8, seq: u32, sent: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&mac(dst));
    f[6..12].copy_from_slice(&mac(src));
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14] = flow;
    f[15..19].copy_from_slice(&seq.to_be_bytes());
    f[19..27].copy_from_slice(&sent.to_be_bytes());
    f
}

pub fn write_frame<S: Write>(s: &mut S, f: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(4 + f.len());
    b.extend_from_slice(&(f.len() as u32).to_be_bytes());
    b.extend_from_slice(f);
    s.write_all(&b)
}

/// Read one frame; `None` at end of stream.
pub fn read_frame<S: Read>(s: &mut S) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).ok()?;
    Some(f)
}

pub fn connect_retry(path: &Path) -> UnixStream {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "cannot connect {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Give a process or thread (0 = the calling thread) SCHED_FIFO priority so
/// timing tests measure the node, not the other jobs on a shared 2-core
/// machine. Best effort: without privilege the test still runs.
pub fn set_fifo(tid: i32) -> bool {
    let p = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on a valid sched_param; a failure only leaves the policy unchanged.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &p) == 0 }
}
