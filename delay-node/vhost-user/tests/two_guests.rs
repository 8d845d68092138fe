//! Two real TCG guests joined by a `Bridge` of two `VhostPort`s: sequence-
//! numbered UDP from a to b survives a stop/cont of b and a full checkpoint
//! and restore of b (stop, migrate to a file, kill, restore in a new QEMU that
//! reconnects to the same socket, cont) with nothing missing and nothing
//! duplicated; QMP `stop` produces the port's Stopped marker.
//!
//! Needs `target/guest/{vmlinuz,initrd.img}` (`bash guest/build.sh`); fails,
//! does not skip, without them. Takes about a minute under TCG.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{boot, last_json, require_image, wait_serial, GuestSpec, Qmp};
use stasis_core::clock::mono_ns;
use stasis_vhost_user::{Bridge, PortEvent, Side};

type Events = Receiver<(Side, PortEvent, u64)>;

/// Waits for an event of `side` matching `pred`; returns it with its arrival time.
fn wait_event(
    rx: &Events,
    side: Side,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&PortEvent) -> bool,
) -> (PortEvent, u64) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((s, ev, at)) if s == side && pred(&ev) => return (ev, at),
            Ok(_) => {}
            Err(_) => panic!("port {} never reported {what} within {timeout:?}", side.name()),
        }
    }
}

fn received(g: &common::Guest) -> u64 {
    last_json(g, &["\"role\":\"recv\""]).and_then(|v| v["received"].as_u64()).unwrap_or(0)
}

fn wait_received(g: &common::Guest, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while received(g) < n {
        assert!(Instant::now() < deadline, "{} received only {} of {n} within {timeout:?}", g.name, received(g));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// QMP `stop`; returns (ns from sending stop to the Stopped marker's `at`,
/// ns from the QMP reply to `at`; negative = the marker came first).
fn stop_and_measure(qmp: &mut Qmp, rx: &Events, side: Side) -> (i64, i64) {
    let sent = mono_ns();
    qmp.cmd(r#"{"execute":"stop"}"#);
    let replied = mono_ns();
    let (ev, _) = wait_event(rx, side, "Stopped after QMP stop", Duration::from_secs(10), |e| {
        matches!(e, PortEvent::Stopped { .. })
    });
    let PortEvent::Stopped { at } = ev else { unreachable!() };
    (at as i64 - sent as i64, at as i64 - replied as i64)
}

#[test]
fn sequenced_udp_survives_stop_cont_and_checkpoint_restore_with_nothing_lost() {
    require_image();
    let dir = tempfile::tempdir().unwrap();
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (tx, rx) = channel();
    let bridge = Bridge::new(&a_sock, &b_sock, move |side, ev| {
        let _ = tx.send((side, ev.clone(), mono_ns()));
    })
    .unwrap();

    const TOTAL: u64 = 1500;
    let recv_script = "stasis-traffic recv --port 5000 --proto udp --report-ms 300";
    let send_script = format!(
        "until ping -c 1 -W 1 10.0.1.2 >/dev/null 2>&1; do sleep 0.2; done; sleep 1; \
         stasis-traffic send --to 10.0.1.2:5000 --proto udp --rate 100 --size 200 --count {TOTAL} --report-ms 1000"
    );
    let b = boot(&GuestSpec {
        name: "b",
        ip: "10.0.1.2",
        mac: "52:54:00:00:01:02",
        script: recv_script,
        vhost_socket: &b_sock,
        dir: dir.path(),
        incoming: None,
        log_suffix: "",
        stream_mode: false,
    });
    let a = boot(&GuestSpec {
        name: "a",
        ip: "10.0.1.1",
        mac: "52:54:00:00:01:01",
        script: &send_script,
        vhost_socket: &a_sock,
        dir: dir.path(),
        incoming: None,
        log_suffix: "",
        stream_mode: false,
    });
    let mut qmp_b = Qmp::connect(&b.qmp);
    for g in [&a, &b] {
        wait_serial(g, "STASIS-READY", Duration::from_secs(90), |l| l.contains("STASIS-READY"));
    }

    // Phase 1: stop b for a second while a keeps sending.
    wait_received(&b, 200, Duration::from_secs(60));
    let (from_send, from_reply) = stop_and_measure(&mut qmp_b, &rx, Side::B);
    eprintln!("stop marker (stop/cont): {from_send} ns after sending stop, {from_reply} ns after its reply");
    assert!(!bridge.port(Side::B).is_running());
    assert!(!bridge.port(Side::B).deliver(&[0u8; 60]).unwrap(), "a stopped device takes no frame");
    std::thread::sleep(Duration::from_secs(1));
    qmp_b.cmd(r#"{"execute":"cont"}"#);
    wait_event(&rx, Side::B, "Started after cont", Duration::from_secs(10), |e| *e == PortEvent::Started);

    // Phase 1b: hold b (as for a live snapshot) for a second while it runs.
    wait_received(&b, 350, Duration::from_secs(60));
    bridge.hold(Side::B);
    assert!(bridge.port(Side::B).is_running() && bridge.port(Side::B).is_held());
    let before = bridge.port(Side::B).stats();
    std::thread::sleep(Duration::from_secs(1));
    let after = bridge.port(Side::B).stats();
    assert_eq!(after.rx_frames, before.rx_frames, "a held port wrote into the guest");
    assert!(after.rx_refused > before.rx_refused, "frames for b kept coming and were refused");
    bridge.release(Side::B);

    // Phase 2: checkpoint b (stop + migrate to a file), kill it, restore it in
    // a new QEMU on the same socket, cont.
    wait_received(&b, 600, Duration::from_secs(60));
    let (from_send, from_reply) = stop_and_measure(&mut qmp_b, &rx, Side::B);
    eprintln!("stop marker (checkpoint): {from_send} ns after sending stop, {from_reply} ns after its reply");
    let state = dir.path().join("b.state");
    let t_save = Instant::now();
    qmp_b.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#, state.display()));
    qmp_b.wait_migrated(Duration::from_secs(60));
    eprintln!("save: {:?}, {} bytes", t_save.elapsed(), std::fs::metadata(&state).unwrap().len());
    let received_at_checkpoint = received(&b);
    drop(qmp_b);
    drop(b);
    wait_event(&rx, Side::B, "Disconnected after kill", Duration::from_secs(10), |e| *e == PortEvent::Disconnected);

    let t_restore = Instant::now();
    let b2 = boot(&GuestSpec {
        name: "b",
        ip: "10.0.1.2",
        mac: "52:54:00:00:01:02",
        script: recv_script,
        vhost_socket: &b_sock,
        dir: dir.path(),
        incoming: Some(&state),
        log_suffix: "-restored",
        stream_mode: false,
    });
    let mut qmp_b2 = Qmp::connect(&b2.qmp);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = qmp_b2.cmd(r#"{"execute":"query-status"}"#);
        if !st.contains("inmigrate") {
            break;
        }
        assert!(Instant::now() < deadline, "incoming migration did not finish: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    qmp_b2.cmd(r#"{"execute":"cont"}"#);
    wait_event(&rx, Side::B, "Started after restore", Duration::from_secs(20), |e| *e == PortEvent::Started);
    eprintln!("restore to Started: {:?}", t_restore.elapsed());

    // The sender finishes; the restored receiver must have everything exactly once.
    wait_serial(&a, "the sender's done line", Duration::from_secs(120), |l| {
        l.contains("\"role\":\"send\"") && l.contains("\"done\":true")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let v = last_json(&b2, &["\"role\":\"recv\""]);
        if let Some(v) = &v {
            if v["received"].as_u64() == Some(TOTAL) {
                break v.clone();
            }
        }
        assert!(Instant::now() < deadline, "restored receiver's last report: {v:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("receiver: {last}; {received_at_checkpoint} received before the checkpoint");
    assert_eq!(last["missing"].as_u64(), Some(0), "{last}");
    assert_eq!(last["dups"].as_u64(), Some(0), "{last}");
    assert_eq!(last["total"].as_u64(), Some(TOTAL), "{last}");
    let dropped: u64 = bridge.stats().dropped.iter().map(|d| d.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert_eq!(dropped, 0, "the bridge dropped frames");
    let deferred = bridge.stats().deferred[1].load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("frames for b that waited in the bridge while b was stopped or full: {deferred}");
    assert!(deferred > 0, "b was stopped twice while a sent at 100 pps: some frames must have waited");
    drop(a);
}
