//! The client against the busybox guest's agent (`stasis_guest_tools::ga`),
//! served over a unix socket as QEMU's chardev would.

use super::*;
use stasis_guest_tools::ga::Agent;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

/// A connection whose end (read of 0) ends `serve`, as a closed QEMU would.
struct Conn(UnixStream);
impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(b)? {
            0 => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone")),
            n => Ok(n),
        }
    }
}
impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A "QEMU" serving `agent` on `path`, one connection at a time, until stopped.
struct Server {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(path: &Path, agent: Arc<Mutex<Agent>>) -> Server {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let _ = agent.lock().unwrap().serve(&mut Conn(c), || {});
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server { stop, thread: Some(thread) }
    }

    /// The QEMU goes away: no more connections, the socket file is gone.
    fn stop(&mut self, path: &Path) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::fs::remove_file(path).unwrap();
    }
}

fn serve(path: &Path, agent: Arc<Mutex<Agent>>) -> Server {
    Server::start(path, agent)
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn exec_returns_status_and_output() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("ga.sock");
    let _server = serve(&sock, Arc::new(Mutex::new(Agent::new())));
    let mut c = AgentClient::new("a", &sock);
    c.ping().unwrap();
    let out = c
        .run(
            &argv(&["sh", "-c", "read x; echo \"got $x\"; echo oops >&2; exit 7"]),
            Some(b"hi\n"),
            Duration::from_secs(20),
            Duration::from_millis(20),
        )
        .unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(7), None));
    assert_eq!(out.stdout, b"got hi\n");
    assert_eq!(out.stderr, b"oops\n");
    let killed =
        c.run(&argv(&["sh", "-c", "kill -9 $$"]), None, Duration::from_secs(20), Duration::from_millis(20)).unwrap();
    assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));
    let e = c.exec_start(&argv(&["/no/such/tool"]), None).unwrap_err();
    assert!(matches!(&e, AgentError::Guest { node, .. } if node == "a"), "{e}");
    assert!(e.to_string().contains("/no/such/tool"), "{e}");
}

#[test]
fn stale_replies_are_skipped_by_the_sync() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("ga.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Left over from an earlier client: half a reply, an old sync's answer.
        s.write_all(b"{\"return\": {\"pid\": 99}}\n\xff{\"return\": 1}\n").unwrap();
        let mut agent = Agent::new();
        let _ = agent.serve(&mut Conn(s), || {});
    });
    AgentClient::new("a", &sock).ping().unwrap();
    t.join().unwrap();
}

#[test]
fn a_guest_without_an_agent_times_out_naming_the_node() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("ga.sock");
    // QEMU's chardev accepts; nothing in the guest answers.
    let listener = UnixListener::bind(&sock).unwrap();
    let _t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let mut c = AgentClient::new("web-1", &sock);
    c.call_timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let e = c.ping().unwrap_err();
    assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
    assert!(e.to_string().starts_with("node web-1: no answer from a guest agent within 300ms"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let e = AgentClient::new("web-2", &d.path().join("none.sock")).ping().unwrap_err();
    assert!(matches!(e, AgentError::Connect { .. }) && e.to_string().contains("node web-2"), "{e}");
}

#[test]
fn a_command_carries_on_across_a_new_qemu_on_the_same_socket() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("ga.sock");
    // The guest's agent state (its process table) survives, as guest memory
    // does across a checkpoint and restore; the QEMU serving it does not.
    let agent = Arc::new(Mutex::new(Agent::new()));
    let mut first = serve(&sock, agent.clone());
    let runner = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = AgentClient::new("a", &sock);
            c.call_timeout = Duration::from_millis(500);
            c.run(
                &argv(&["sh", "-c", "sleep 1.5; echo finished"]),
                None,
                Duration::from_secs(30),
                Duration::from_millis(50),
            )
        })
    };
    // Another client takes turns with the long one on the same node.
    let mut other = AgentClient::new("a", &sock);
    std::thread::sleep(Duration::from_millis(200));
    let quick = other.run(&argv(&["echo", "quick"]), None, Duration::from_secs(10), Duration::from_millis(20)).unwrap();
    assert_eq!(quick.stdout, b"quick\n");
    // The QEMU is gone for a while; a new one listens on the same path.
    first.stop(&sock);
    std::thread::sleep(Duration::from_millis(700));
    let _second = serve(&sock, agent);
    let out = runner.join().unwrap().unwrap();
    assert_eq!(out.stdout, b"finished\n");
    assert!(out.reconnects > 0, "{out:?}");
}

#[test]
fn files_copy_both_ways_in_chunks_and_refusals_name_node_and_path() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("ga.sock");
    let _server = serve(&sock, Arc::new(Mutex::new(Agent::new())));
    let mut c = AgentClient::new("a", &sock);
    let data: Vec<u8> = (0..(FILE_CHUNK * 2 + 12345)).map(|i| (i * 7 % 251) as u8).collect();
    let guest = d.path().join("in-guest.bin");
    let n = c.write_file(guest.to_str().unwrap(), &mut data.as_slice()).unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(std::fs::read(&guest).unwrap(), data);
    let mut back = Vec::new();
    assert_eq!(c.read_file(guest.to_str().unwrap(), &mut back).unwrap(), data.len() as u64);
    assert_eq!(back, data);
    let e = c.write_file("/proc/stasis-no-such/f", &mut &b"x"[..]).unwrap_err();
    assert!(e.to_string().starts_with("node a: guest agent: guest-file-open failed"), "{e}");
    assert!(e.to_string().contains("/proc/stasis-no-such/f"), "{e}");
    let e = c.read_file("/no/such/file", &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("/no/such/file"), "{e}");
}
