//! Port lifecycle without QEMU: refusals before any connection, a frontend
//! that connects and leaves, reconnection, and dropping a port while a
//! frontend is still connected (must not hang, must remove the socket).

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use stasis_vhost_user::{PortEvent, VhostError, VhostPort};

fn port(dir: &tempfile::TempDir) -> (VhostPort, Receiver<PortEvent>) {
    let (tx, rx) = channel();
    let p = VhostPort::serve(&dir.path().join("p.sock"), move |ev| {
        let _ = tx.send(ev);
    })
    .unwrap();
    (p, rx)
}

#[test]
fn refuses_frames_before_any_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _rx) = port(&dir);
    assert!(!p.deliver(&[0u8; 60]).unwrap());
    assert!(!p.is_running());
    assert_eq!(p.stats().rx_refused, 1);
    assert_eq!(p.stats().connections, 0);
}

#[test]
fn a_frontend_that_leaves_is_reported_and_the_next_one_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (p, rx) = port(&dir);
    for round in 1..=2u64 {
        let s = UnixStream::connect(p.socket()).unwrap();
        // The connection is counted once the daemon runs it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.stats().connections < round {
            assert!(std::time::Instant::now() < deadline, "connection {round} not served");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(s);
        let ev = rx.recv_timeout(Duration::from_secs(5)).expect("an event after the frontend left");
        assert_eq!(ev, PortEvent::Disconnected, "round {round}");
    }
}

#[test]
fn dropping_a_port_with_a_connected_frontend_returns_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _rx) = port(&dir);
    let path = p.socket().to_path_buf();
    let _s = UnixStream::connect(&path).unwrap();
    while p.stats().connections < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (done_tx, done_rx) = channel();
    std::thread::spawn(move || {
        drop(p);
        let _ = done_tx.send(());
    });
    done_rx.recv_timeout(Duration::from_secs(5)).expect("drop of a connected port hung");
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn serving_in_a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = VhostPort::serve(&dir.path().join("no/such/dir/p.sock"), |_| {});
    assert!(matches!(r, Err(VhostError::Listen { .. })), "{:?}", r.err());
}
