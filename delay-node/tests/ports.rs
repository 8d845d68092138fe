//! Port behaviour with real sockets: bad input drops only the offending port,
//! reconnection replaces a connection, refusals over the control socket.

mod common;
use common::*;
use delay_node::config::{LinkConfig, PortConfig, Shaping, Topology};
use delay_node::control::ControlError;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

fn setup(dir: &Path) -> (NodeProc, std::path::PathBuf) {
    setup_with(dir, &[])
}

fn setup_with(dir: &Path, extra: &[&std::ffi::OsStr]) -> (NodeProc, std::path::PathBuf) {
    let sh = Shaping { delay_ns: 1_000_000, queue_packets: 10_000, ..Shaping::default() };
    let topo = Topology {
        ports: (0..3)
            .map(|i| PortConfig {
                name: format!("vm{i}"),
                socket: dir.join(format!("vm{i}.sock")),
                kind: Default::default(),
                peer: None,
            })
            .collect(),
        lans: vec![],
        links: vec![LinkConfig { name: "l".into(), a: "vm0".into(), b: "vm1".into(), a_to_b: sh, b_to_a: sh }],
        seed: 0,
    };
    let tp = dir.join("topo.json");
    std::fs::write(&tp, serde_json::to_string(&topo).unwrap()).unwrap();
    let events = dir.join("events.jsonl");
    (NodeProc::start_with(&tp, &dir.join("ctl.sock"), None, &events, extra), events)
}

fn roundtrip(a: &mut std::os::unix::net::UnixStream, b: &mut std::os::unix::net::UnixStream, seq: u32) {
    write_frame(a, &test_frame(1, 0, 0, seq, 0, 60)).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let f = read_frame(b).expect("frame forwarded");
    assert_eq!(u32::from_be_bytes(f[15..19].try_into().unwrap()), seq);
}

#[test]
fn bad_framing_drops_only_the_offending_port() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let mut a = connect_retry(&dir.path().join("vm0.sock"));
    let mut b = connect_retry(&dir.path().join("vm1.sock"));
    roundtrip(&mut a, &mut b, 1);
    for bad in [&b"\x00\x00\x00\x05hello"[..], &b"\xff\xff\xff\xffxx"[..], &b"GET / HTTP/1.1\r\n\r\n"[..]] {
        let mut g = connect_retry(&dir.path().join("vm2.sock"));
        g.write_all(bad).unwrap();
        g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(g.read(&mut buf).unwrap(), 0, "the node closes a port that sends {bad:?}");
    }
    // The other ports carry on.
    roundtrip(&mut a, &mut b, 2);
    let st = rt.block_on(ctl.stats()).unwrap();
    assert_eq!(st.ports[2].counters.errors, 3);
    assert!(!st.ports[2].connected);
    assert!(st.ports[0].connected && st.ports[1].connected);
    let ev = std::fs::read_to_string(events).unwrap();
    assert_eq!(ev.matches("\"port_error\"").count(), 3, "{ev}");
    assert!(ev.contains("runt frame"), "{ev}");
}

#[test]
fn a_new_connection_replaces_the_old_and_unconnected_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, _events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let mut a = connect_retry(&dir.path().join("vm0.sock"));
    // Nobody on vm1 yet: released frames are dropped and counted.
    write_frame(&mut a, &test_frame(1, 0, 0, 0, 0, 60)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rt.block_on(ctl.stats()).unwrap().ports[1].counters.dropped_unconnected, 1);
    let mut old = connect_retry(&dir.path().join("vm1.sock"));
    roundtrip(&mut a, &mut old, 1);
    // A VM restarted from a checkpoint reconnects: the new connection wins.
    let mut new = connect_retry(&dir.path().join("vm1.sock"));
    std::thread::sleep(Duration::from_millis(50));
    roundtrip(&mut a, &mut new, 2);
    old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(old.read(&mut buf).unwrap(), 0, "the replaced connection is closed");
}

#[test]
fn control_refuses_save_and_thaw_unless_frozen_and_unknown_ports() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, _events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let state = dir.path().join("s.bin");
    let e = rt.block_on(ctl.save(&state)).unwrap_err();
    assert!(matches!(&e, ControlError::Refused(m) if m.contains("not frozen")), "{e:?}");
    assert!(!state.exists());
    assert!(rt.block_on(ctl.thaw_at(0)).is_err());
    assert!(rt.block_on(ctl.pcap("nope", None)).is_err());
    assert!(rt.block_on(ctl.freeze_port_at("nope", 0, 0)).is_err());
    // A garbage line gets an error line, and the connection keeps working.
    let mut raw = std::os::unix::net::UnixStream::connect(dir.path().join("ctl.sock")).unwrap();
    raw.write_all(b"{\"cmd\":\"fly\"}\n").unwrap();
    let mut line = String::new();
    let mut r = std::io::BufReader::new(raw.try_clone().unwrap());
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert!(line.starts_with("{\"error\""), "{line}");
    // Restore refuses a foreign file while frozen.
    let now = stasis_core::clock::mono_ns();
    rt.block_on(ctl.freeze_at(now, 0)).unwrap();
    std::fs::write(&state, b"not a state file").unwrap();
    let e = rt.block_on(ctl.restore(&state)).unwrap_err();
    assert!(matches!(&e, ControlError::Refused(m) if m.contains("bad magic")), "{e:?}");
    let rep = rt.block_on(ctl.save(&state)).unwrap();
    assert!(rep.bytes > 0);
    rt.block_on(ctl.restore(&state)).unwrap();
    rt.block_on(ctl.thaw_at(stasis_core::clock::mono_ns())).unwrap();
    rt.block_on(ctl.shutdown()).unwrap();
}

/// A VM that stops reading: frames pile up in the node's output buffer. A save
/// takes back every frame not yet written (they become held frames in the
/// state), and after the thaw the reader gets every frame exactly once, in order.
#[test]
fn save_takes_back_frames_a_stopped_vm_did_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, _events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let mut a = connect_retry(&dir.path().join("vm0.sock"));
    let mut b = connect_retry(&dir.path().join("vm1.sock"));
    std::thread::sleep(Duration::from_millis(50));
    let n = 3000u32; // 4.5 MB: far more than a unix socket buffers
    for seq in 0..n {
        write_frame(&mut a, &test_frame(1, 0, 0, seq, 0, 1500)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    rt.block_on(ctl.freeze_at(stasis_core::clock::mono_ns(), 0)).unwrap();
    let rep = rt.block_on(ctl.save(&dir.path().join("s.bin"))).unwrap();
    assert!(rep.frames_held > 100, "{rep:?}");
    let st = delay_node::state::NodeState::read_file(&dir.path().join("s.bin")).unwrap();
    assert_eq!(st.ports[1].held.len() as u64, rep.frames_held);
    rt.block_on(ctl.thaw_at(stasis_core::clock::mono_ns())).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for seq in 0..n {
        let f = read_frame(&mut b).expect("frame");
        assert_eq!(u32::from_be_bytes(f[15..19].try_into().unwrap()), seq);
    }
    let st = rt.block_on(ctl.stats()).unwrap();
    assert_eq!(st.ports[1].counters.frames_out, n as u64);
}

/// Per-port freeze over the control socket: delivery to vm1 is held (in order,
/// nothing lost) while vm0 keeps receiving; the port thaw releases the held frames.
#[test]
fn per_port_freeze_holds_one_port_and_releases_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let mut a = connect_retry(&dir.path().join("vm0.sock"));
    let mut b = connect_retry(&dir.path().join("vm1.sock"));
    std::thread::sleep(Duration::from_millis(50));
    let now = stasis_core::clock::mono_ns();
    rt.block_on(ctl.freeze_port_at("vm1", now, 0)).unwrap();
    for seq in 0..20 {
        write_frame(&mut a, &test_frame(1, 0, 0, seq, 0, 60)).unwrap();
    }
    // The other direction is not affected.
    roundtrip(&mut b, &mut a, 100);
    std::thread::sleep(Duration::from_millis(20));
    let st = rt.block_on(ctl.stats()).unwrap();
    assert_eq!(st.ports[1].held_frames, 20);
    b.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut one = [0u8; 1];
    assert!(b.read(&mut one).is_err(), "nothing is delivered to a frozen port");
    let rep = rt.block_on(ctl.thaw_port_at("vm1", stasis_core::clock::mono_ns())).unwrap();
    assert_eq!(rep.held_frames, 20);
    assert!(rep.max_hold_lateness_ns > 0);
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for seq in 0..20 {
        let f = read_frame(&mut b).expect("held frame");
        assert_eq!(u32::from_be_bytes(f[15..19].try_into().unwrap()), seq);
    }
    let ev = std::fs::read_to_string(events).unwrap();
    assert!(ev.contains("\"port_freeze\"") && ev.contains("\"port_thaw\""), "{ev}");
}

/// A vhost-user port with no QEMU behind it: the node serves its socket,
/// frames for it wait at the port (nothing was written into a guest ring),
/// and a save puts every one of them in the state.
#[test]
fn frames_for_a_vhost_port_without_a_running_device_are_kept_and_saved() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let topo = Topology {
        ports: vec![
            PortConfig {
                name: "s".into(),
                socket: d.join("s.sock"),
                kind: delay_node::config::PortKind::Stream,
                peer: None,
            },
            PortConfig {
                name: "v".into(),
                socket: d.join("v.sock"),
                kind: delay_node::config::PortKind::VhostUser,
                peer: None,
            },
        ],
        lans: vec![],
        links: vec![LinkConfig {
            name: "l".into(),
            a: "s".into(),
            b: "v".into(),
            a_to_b: Shaping::default(),
            b_to_a: Shaping::default(),
        }],
        seed: 0,
    };
    let tp = d.join("topo.json");
    std::fs::write(&tp, serde_json::to_string(&topo).unwrap()).unwrap();
    let _node = NodeProc::start(&tp, &d.join("ctl.sock"), None, &d.join("events.jsonl"));
    let rt = rt();
    let mut ctl = client(&rt, &d.join("ctl.sock"));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(d.join("v.sock")).unwrap().file_type().is_socket(), "the vhost-user socket is served");
    let mut s = connect_retry(&d.join("s.sock"));
    for q in 0..5 {
        write_frame(&mut s, &test_frame(1, 0, 0, q, 0, 60)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let st = rt.block_on(ctl.stats()).unwrap();
    assert_eq!(st.ports[1].held_frames, 5, "{st:?}");
    assert_eq!(st.ports[1].counters.dropped_unconnected, 0);
    let now = stasis_core::clock::mono_ns();
    rt.block_on(ctl.freeze_at(now + 10_000_000, 20_000_000)).unwrap();
    let rep = rt.block_on(ctl.save(&d.join("dn.state"))).unwrap();
    assert_eq!((rep.frames_held, rep.frames_in_flight), (5, 0), "{rep:?}");
}

/// A node with a unix port "local" linked to a TCP port "remote" on a free
/// loopback address that accepts connections from 127.0.0.1 only.
fn tcp_setup(dir: &Path) -> (NodeProc, std::net::SocketAddr) {
    // A free loopback port (the node binds exactly this address).
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let sh = Shaping { delay_ns: 1_000_000, queue_packets: 10_000, ..Shaping::default() };
    let topo = Topology {
        ports: vec![
            PortConfig {
                name: "local".into(),
                socket: dir.join("local.sock"),
                kind: delay_node::config::PortKind::Stream,
                peer: None,
            },
            PortConfig {
                name: "remote".into(),
                socket: addr.to_string().into(),
                kind: delay_node::config::PortKind::Tcp,
                peer: Some("127.0.0.1".parse().unwrap()),
            },
        ],
        lans: vec![],
        links: vec![LinkConfig { name: "l".into(), a: "local".into(), b: "remote".into(), a_to_b: sh, b_to_a: sh }],
        seed: 0,
    };
    let tp = dir.join("topo.json");
    std::fs::write(&tp, serde_json::to_string(&topo).unwrap()).unwrap();
    (NodeProc::start(&tp, &dir.join("ctl.sock"), None, &dir.join("events.jsonl")), addr)
}

/// Frames both ways between the unix port and the TCP port.
fn tcp_roundtrips(
    local: &mut std::os::unix::net::UnixStream,
    remote: &mut std::net::TcpStream,
    seqs: std::ops::Range<u32>,
) {
    for seq in seqs {
        write_frame(local, &test_frame(1, 0, 0, seq, 0, 60)).unwrap();
        let f = read_frame(remote).expect("frame forwarded to the TCP port");
        assert_eq!(u32::from_be_bytes(f[15..19].try_into().unwrap()), seq);
        write_frame(remote, &test_frame(0, 1, 0, seq + 100, 0, 60)).unwrap();
        let f = read_frame(local).expect("frame forwarded from the TCP port");
        assert_eq!(u32::from_be_bytes(f[15..19].try_into().unwrap()), seq + 100);
    }
}

#[test]
fn a_tcp_port_serves_a_vm_on_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr) = tcp_setup(dir.path());
    let mut local = connect_retry(&dir.path().join("local.sock"));
    let mut remote = std::net::TcpStream::connect(addr).expect("the node listens on the TCP address");
    remote.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    local.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_roundtrips(&mut local, &mut remote, 0..20);
}

/// A peer that is not the VM's host (here: from 127.0.0.2, the port accepts
/// 127.0.0.1) is closed before a byte is read, however often it tries: the
/// live VM keeps its port (before, each new connection replaced the VM's),
/// and a peer that connects before the VM does not get the port either.
#[test]
fn an_unauthenticated_tcp_peer_cannot_take_a_remote_vms_port() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr) = tcp_setup(dir.path());
    let rt = rt();
    let intruder = || {
        rt.block_on(async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let mut s = s.connect(addr).await.expect("the TCP handshake itself completes").into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // Whatever it sends is never read as frames.
            let _ = write_frame(&mut s, &test_frame(0, 1, 0, 999, 0, 60));
            s
        })
    };
    let closed = |mut s: std::net::TcpStream| {
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("an intruder read {n} bytes from the port"),
            Err(e) => panic!("the intruder's connection stayed open: {e}"),
        }
    };
    // Before the VM: refused, and the VM then connects as usual.
    closed(intruder());
    let mut local = connect_retry(&dir.path().join("local.sock"));
    let mut remote = std::net::TcpStream::connect(addr).unwrap();
    remote.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    local.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_roundtrips(&mut local, &mut remote, 0..5);
    // While the VM is connected: ten intruders, each closed, none displacing it.
    for _ in 0..10 {
        closed(intruder());
    }
    tcp_roundtrips(&mut local, &mut remote, 5..10);
    // Recorded (once per power of two of refusals: 1, 2, 4, 8).
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_eq!(events.lines().filter(|l| l.contains("port_refused")).count(), 4, "{events}");
    assert!(!events.contains("replaced"), "{events}");
}

/// Peak resident memory of a process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A stream-mode VM whose QEMU stops reading: the node's output buffer for it
/// stays bounded (frames wait in the scheduler's bounded backlog, then are
/// dropped and counted) instead of growing with everything sent to it.
#[test]
fn a_vm_that_stops_reading_does_not_grow_the_nodes_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _events) = setup(dir.path());
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let mut a = connect_retry(&dir.path().join("vm0.sock"));
    let _b = connect_retry(&dir.path().join("vm1.sock")); // never read
    std::thread::sleep(Duration::from_millis(50));
    let before = peak_rss_kb(node.child.id());
    let n = 60_000u32; // 90 MB of frames towards vm1
    for seq in 0..n {
        write_frame(&mut a, &test_frame(1, 0, 0, seq, 0, 1500)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let st = rt.block_on(ctl.stats()).unwrap();
    let grew_mb = (peak_rss_kb(node.child.id()) - before) / 1024;
    assert!(st.ports[1].counters.dropped_unconnected > 0, "{:?}", st.ports[1]);
    // Bounded: the 4 MiB output cap, 4096 held frames and the 10 000-frame
    // pipe queue are ~25 MB at most; the 90 MB sent must not all be kept.
    assert!(grew_mb < 40, "the node grew by {grew_mb} MB for a VM that does not read");
}

#[test]
fn a_confined_node_saves_captures_and_restores_only_inside_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("exp");
    std::fs::create_dir(&inside).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (_node, _events) = setup_with(dir.path(), &["--confine".as_ref(), inside.as_os_str()]);
    let rt = rt();
    let mut ctl = client(&rt, &dir.path().join("ctl.sock"));
    let refused = |e: ControlError, what: &str| {
        assert!(matches!(&e, ControlError::Refused(m) if m.contains("outside the directories")), "{what}: {e:?}");
    };
    // A capture: outside refused (nothing created), inside taken.
    let out_pcap = outside.path().join("a.pcap");
    refused(rt.block_on(ctl.pcap("vm0", Some(&out_pcap))).unwrap_err(), "pcap outside");
    assert!(!out_pcap.exists());
    // `..` and a symlinked directory inside that points outside are outside too.
    let dotdot = inside.join("..").join("b.pcap");
    refused(rt.block_on(ctl.pcap("vm0", Some(&dotdot))).unwrap_err(), "pcap via ..");
    std::os::unix::fs::symlink(outside.path(), inside.join("link")).unwrap();
    refused(rt.block_on(ctl.pcap("vm0", Some(&inside.join("link").join("c.pcap")))).unwrap_err(), "pcap via symlink");
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none(), "nothing written outside");
    let in_pcap = inside.join("a.pcap");
    rt.block_on(ctl.pcap("vm0", Some(&in_pcap))).unwrap();
    rt.block_on(ctl.pcap("vm0", None)).unwrap();
    assert!(in_pcap.exists());
    // Save: the path is checked before anything else (the node is not even frozen).
    let e = rt.block_on(ctl.save(&outside.path().join("s.bin"))).unwrap_err();
    refused(e, "save outside");
    // A relative path is the node's working directory's (here not inside).
    refused(rt.block_on(ctl.save(Path::new("relative.bin"))).unwrap_err(), "save relative");
    // Freeze, then save inside works and a restore from outside is refused.
    let now = stasis_core::clock::mono_ns();
    rt.block_on(ctl.freeze_at(now + 20_000_000, 0)).unwrap();
    let state = inside.join("s.bin");
    rt.block_on(ctl.save(&state)).unwrap();
    let foreign = outside.path().join("s.bin");
    std::fs::copy(&state, &foreign).unwrap();
    refused(rt.block_on(ctl.restore(&foreign)).unwrap_err(), "restore outside");
    rt.block_on(ctl.restore(&state)).unwrap();
}
