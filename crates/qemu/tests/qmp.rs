//! The QMP client against a real QEMU (`-machine none`) and, for protocol
//! corner cases QEMU will not produce on demand, a scripted peer.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use stasis_qemu::qmp::{Qmp, QmpError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// A QEMU with no machine at all: a QMP server and nothing else.
struct BareQemu {
    child: Child,
    _dir: tempfile::TempDir,
    qmp: std::path::PathBuf,
}

impl BareQemu {
    fn start() -> BareQemu {
        let dir = common::tempdir();
        let qmp = dir.path().join("qmp.sock");
        let child = Command::new(stasis_qemu::vm::qemu_binary())
            .args(["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 must be installed");
        for _ in 0..500 {
            if qmp.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        BareQemu { child, _dir: dir, qmp }
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn commands_errors_and_events_with_real_qemu() {
    let q = BareQemu::start();
    let mut qmp = Qmp::connect(&q.qmp).await.expect("connect");
    assert!(qmp.greeting()["QMP"]["version"]["qemu"]["major"].as_u64().unwrap() >= 7);

    let v = qmp.execute("query-version", None).await.unwrap();
    assert!(v["qemu"]["major"].as_u64().unwrap() >= 7);

    match qmp.execute("no-such-command", None).await {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("unknown command: {other:?}"),
    }
    match qmp.execute("query-status", Some(json!({"bogus": 1}))).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("bad arguments: {other:?}"),
    }

    // Events arriving while commands run are kept, in order.
    qmp.execute("stop", None).await.unwrap();
    qmp.execute("cont", None).await.unwrap();
    qmp.execute("query-status", None).await.unwrap();
    let names: Vec<String> = qmp.drain_events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["STOP", "RESUME"]);
    assert!(qmp.drain_events().is_empty());

    // wait_event finds an event that arrives later, and one already kept.
    qmp.execute("stop", None).await.unwrap();
    let stop = qmp.wait_event("STOP", Duration::from_secs(5)).await.unwrap();
    assert!(stop.qemu_time_us.is_some());
    match qmp.wait_event("RESUME", Duration::from_millis(200)).await {
        Err(QmpError::Timeout(_)) => {}
        other => panic!("RESUME without cont: {other:?}"),
    }
    qmp.execute("cont", None).await.unwrap();
    qmp.wait_event("RESUME", Duration::from_secs(5)).await.unwrap();

    // One client at a time: a second one gets no greeting while we hold the socket.
    match Qmp::connect_with_timeout(&q.qmp, Duration::from_millis(300)).await {
        Err(QmpError::Timeout(what)) => assert!(what.contains("another client"), "{what}"),
        other => panic!("second client: {other:?}"),
    }
    drop(qmp);
    let mut again = Qmp::connect(&q.qmp).await.expect("reconnect after the first client left");
    again.execute("query-status", None).await.unwrap();

    // quit closes the connection; the client reports it as Closed afterwards.
    let _ = again.execute("quit", None).await;
    match again.execute("query-status", None).await {
        Err(QmpError::Closed | QmpError::Io(_)) => {}
        other => panic!("after quit: {other:?}"),
    }
}

/// Reads one command line from the client and returns its id.
async fn read_command(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> (String, Value) {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    (v["execute"].as_str().unwrap().to_owned(), v["id"].clone())
}

#[tokio::test]
async fn unknown_events_stale_replies_and_fragments_are_tolerated() {
    let dir = common::tempdir();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 99, \"minor\": 0, \"micro\": 0}}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let (cmd, id) = read_command(&mut r).await;
        assert_eq!(cmd, "qmp_capabilities");
        let reply = json!({"return": {}, "id": id});
        w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();

        let (cmd, id) = read_command(&mut r).await;
        assert_eq!(cmd, "query-frobs");
        // A reply to some abandoned command, an invented event split across
        // writes, a blank line, then the real reply.
        w.write_all(b"{\"return\": {\"stale\": true}, \"id\": 999}\r\n").await.unwrap();
        w.write_all(b"{\"event\": \"FROBNICATED\", \"data\": {\"level\": 11, \"new\": [1,2]}, \"timest").await.unwrap();
        w.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.write_all(b"amp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n\r\n").await.unwrap();
        let reply = json!({"return": {"frobs": 3}, "id": id});
        w.write_all(format!("{reply}\r\n{{\"event\": \"LATE_EVENT\"}}\r\n").as_bytes()).await.unwrap();

        let (cmd, id) = read_command(&mut r).await;
        let reply = json!({"error": {"class": "DeviceNotFound", "desc": "no frob"}, "id": id});
        w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
        assert_eq!(cmd, "frob");
        // Garbage ends the session.
        let _ = read_command(&mut r).await;
        w.write_all(b"this is not json\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });

    let mut qmp = Qmp::connect(&path).await.expect("connect to scripted peer");
    let v = qmp.execute("query-frobs", None).await.unwrap();
    assert_eq!(v["frobs"], 3);
    let events = qmp.drain_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].name, "FROBNICATED");
    assert_eq!(events[0].data["level"], 11);
    assert_eq!(events[0].qemu_time_us, Some(1_000_002));
    match qmp.execute("frob", None).await {
        Err(QmpError::Command { class, desc, command }) => {
            assert_eq!((class.as_str(), desc.as_str(), command.as_str()), ("DeviceNotFound", "no frob", "frob"))
        }
        other => panic!("{other:?}"),
    }
    // The event that followed a reply was kept, not lost.
    assert_eq!(qmp.wait_event("LATE_EVENT", Duration::from_secs(1)).await.unwrap().name, "LATE_EVENT");
    match qmp.execute("anything", None).await {
        Err(QmpError::Protocol(msg)) => assert!(msg.contains("not json"), "{msg}"),
        other => panic!("garbage from peer: {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_late_reply_after_a_timeout_does_not_answer_the_next_command() {
    let dir = common::tempdir();
    let path = dir.path().join("slow.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
        let (_, id) = read_command(&mut r).await;
        w.write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes()).await.unwrap();
        // Sit on "slow" past the client's timeout, then answer it late.
        let (cmd, slow_id) = read_command(&mut r).await;
        assert_eq!(cmd, "slow");
        let (cmd, next_id) = read_command(&mut r).await;
        assert_eq!(cmd, "next");
        w.write_all(format!("{}\n", json!({"return": "for slow", "id": slow_id})).as_bytes()).await.unwrap();
        w.write_all(format!("{}\n", json!({"return": "for next", "id": next_id})).as_bytes()).await.unwrap();
    });
    let mut qmp = Qmp::connect(&path).await.unwrap();
    qmp.set_command_timeout(Duration::from_millis(200));
    match qmp.execute("slow", None).await {
        Err(QmpError::Timeout(what)) => assert!(what.contains("slow"), "{what}"),
        other => panic!("unanswered command: {other:?}"),
    }
    qmp.set_command_timeout(Duration::from_secs(5));
    assert_eq!(qmp.execute("next", None).await.unwrap(), "for next");
    server.await.unwrap();
}

#[tokio::test]
async fn commands_at_an_instant_leave_at_their_own_instants() {
    // Two QEMUs, one task: each `cont` is written at its own instant by its
    // own thread, the later one not waiting for the earlier one's reply, and
    // QEMU's RESUME stamp lies after the send instant.
    let (q1, q2) = (BareQemu::start(), BareQemu::start());
    let mut a = Qmp::connect(&q1.qmp).await.expect("connect");
    let mut b = Qmp::connect(&q2.qmp).await.expect("connect");
    for q in [&mut a, &mut b] {
        q.execute("stop", None).await.unwrap();
        q.drain_events();
    }
    let t = stasis_core::clock::mono_ns() + 50_000_000;
    let (ra, rb) = tokio::join!(a.execute_at("cont", None, t), b.execute_at("cont", None, t + 3_000_000));
    let ((_, sa), (_, sb)) = (ra.unwrap(), rb.unwrap());
    assert!(sa.sent >= t && sb.sent >= t + 3_000_000, "not before the instant: {sa:?} {sb:?}");
    assert!(sa.replied >= sa.sent && sb.replied >= sb.sent);
    for (q, s) in [(&mut a, sa), (&mut b, sb)] {
        let ev = q.wait_event("RESUME", Duration::from_secs(5)).await.unwrap();
        let at = stasis_core::clock::wall_to_mono(ev.qemu_time_us.unwrap() * 1_000);
        // µs timestamps and the wall→mono mapping: allow 100 µs.
        assert!(at + 100_000 >= s.sent, "RESUME at {at} before the command was sent at {}", s.sent);
        assert_eq!(q.execute("query-status", None).await.unwrap()["status"], "running");
    }
}

#[tokio::test]
async fn a_saved_state_holds_the_virtual_clock_at_the_freeze() {
    // The guest's virtual clock runs only between cont and stop: two runs
    // of ≥ 300 ms, each saved, show it grew by at least the second run and
    // by no more than the host time between the two freezes.
    let q = BareQemu::start();
    let dir = common::tempdir();
    let mut qmp = Qmp::connect(&q.qmp).await.expect("connect");
    let mut saved = Vec::new();
    for round in 0..2 {
        if round > 0 {
            qmp.execute("cont", None).await.unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let (_, stop) = qmp.execute_timed("stop", None).await.unwrap();
        let file = dir.path().join(format!("state-{round}"));
        qmp.execute("migrate", Some(json!({"uri": format!("exec:cat > {}", file.display())}))).await.unwrap();
        loop {
            let s = qmp.execute("query-migrate", None).await.unwrap();
            match s["status"].as_str() {
                Some("completed") => break,
                Some("failed") => panic!("migration failed: {s}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let v = stasis_qemu::vmstate::saved_virtual_clock_ns(&file).expect("timer section");
        saved.push((stop.sent, v));
    }
    let (t0, v0) = saved[0];
    let (t1, v1) = saved[1];
    assert!(v0 >= 300_000_000, "ran ≥ 300 ms before the first freeze: {v0}");
    assert!(v1 - v0 >= 300_000_000, "the second run: {}", v1 - v0);
    assert!(
        ((v1 - v0) as u64) <= t1 - t0 + 1_000_000,
        "the clock did not run while stopped: {} vs {}",
        v1 - v0,
        t1 - t0
    );
    match stasis_qemu::vmstate::saved_virtual_clock_ns(&dir.path().join("absent")) {
        Err(stasis_qemu::vmstate::VmStateError::Io { .. }) => {}
        other => panic!("{other:?}"),
    }
}
