//! The real binaries on the host's loopback: complete flows over UDP and
//! TCP with several senders and destinations, and the probe's line format.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills and reaps the child even when the test fails.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TRAFFIC: &str = env!("CARGO_BIN_EXE_stasis-traffic");
const PROBE: &str = env!("CARGO_BIN_EXE_stasis-probe");

fn spawn(bin: &str, args: &[&str]) -> (Guard, mpsc::Receiver<Value>) {
    let mut child =
        Command::new(bin).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn tool");
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    (Guard(child), rx)
}

/// A port nobody listens on (for UDP and TCP alike, on this quiet host).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until a UDP receiver has bound `port` (binding it ourselves fails).
fn wait_udp_bound(port: u16) {
    let until = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("0.0.0.0", port)).is_ok() {
        assert!(Instant::now() < until, "receiver never bound udp port {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines until `pred` matches one; panics after 20 s.
fn wait_for(rx: &mpsc::Receiver<Value>, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(_) => {}
            Err(_) => panic!("no line for {what}"),
        }
    }
}

fn assert_clean(v: &Value, count: u64) {
    assert_eq!(v["received"], count, "{v}");
    assert_eq!(v["total"], count, "{v}");
    assert_eq!(v["highest"], count - 1, "{v}");
    assert_eq!(v["missing"], 0, "{v}");
    assert_eq!(v["dups"], 0, "{v}");
}

#[test]
fn udp_two_senders_one_receiver() {
    let port = free_port();
    let p = port.to_string();
    let (_recv, rx) = spawn(TRAFFIC, &["recv", "--port", &p, "--proto", "udp", "--report-ms", "200", "--node", "r"]);
    wait_udp_bound(port);
    let to = format!("127.0.0.1:{port}");
    let (_s1, tx1) =
        spawn(TRAFFIC, &["send", "--to", &to, "--count", "300", "--rate", "3000", "--flow", "1", "--node", "s1"]);
    let (_s2, tx2) = spawn(
        TRAFFIC,
        &["send", "--to", &to, "--count", "200", "--rate", "3000", "--flow", "2", "--size", "1400", "--node", "s2"],
    );
    for (rx_s, count) in [(&tx1, 300), (&tx2, 200)] {
        let done = wait_for(rx_s, "sender done", |v| v["done"] == true);
        assert_eq!(done["sent"], count);
        assert_eq!(
            (done["tool"].as_str(), done["role"].as_str(), done["proto"].as_str()),
            (Some("traffic"), Some("send"), Some("udp"))
        );
        assert_eq!(done["dest"], to.as_str());
    }
    let f1 = wait_for(&rx, "flow 1 complete", |v| v["flow"] == "127.0.0.1/1" && v["received"] == 300);
    assert_clean(&f1, 300);
    assert_eq!(f1["node"], "r");
    let f2 = wait_for(&rx, "flow 2 complete", |v| v["flow"] == "127.0.0.1/2" && v["received"] == 200);
    assert_clean(&f2, 200);
}

#[test]
fn tcp_one_sender_two_destinations() {
    let (pa, pb) = (free_port(), free_port());
    let (_ra, rxa) = spawn(TRAFFIC, &["recv", "--port", &pa.to_string(), "--proto", "tcp", "--report-ms", "200"]);
    let (_rb, rxb) = spawn(TRAFFIC, &["recv", "--port", &pb.to_string(), "--proto", "tcp", "--report-ms", "200"]);
    // No wait for the listeners: the sender retries connecting until it works.
    let (ta, tb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let (mut sender, txs) = spawn(
        TRAFFIC,
        &["send", "--proto", "tcp", "--to", &ta, "--to", &tb, "--count", "250", "--rate", "2000", "--flow", "9"],
    );
    let mut done_dests: Vec<String> = (0..2)
        .map(|_| wait_for(&txs, "sender done", |v| v["done"] == true)["dest"].as_str().unwrap().to_string())
        .collect();
    done_dests.sort();
    let mut want = vec![ta, tb];
    want.sort();
    assert_eq!(done_dests, want);
    // The sender exits by itself once every destination is done.
    assert!(sender.0.wait().unwrap().success());
    for rx in [&rxa, &rxb] {
        let f = wait_for(rx, "flow complete", |v| v["flow"] == "127.0.0.1/9" && v["received"] == 250);
        assert_eq!(f["proto"], "tcp");
        assert_clean(&f, 250);
    }
}

#[test]
fn receiver_counts_duplicates_from_a_replayed_sender() {
    // Running the same bounded flow twice is a replay: every record is a duplicate.
    let port = free_port();
    let (_recv, rx) = spawn(TRAFFIC, &["recv", "--port", &port.to_string(), "--report-ms", "100"]);
    wait_udp_bound(port);
    let to = format!("127.0.0.1:{port}");
    for _ in 0..2 {
        let st = Command::new(TRAFFIC)
            .args(["send", "--to", &to, "--count", "50", "--rate", "5000", "--flow", "4"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let f = wait_for(&rx, "duplicates accounted", |v| v["flow"] == "127.0.0.1/4" && v["dups"] == 50);
    assert_eq!((f["received"].as_u64(), f["missing"].as_u64()), (Some(50), Some(0)));
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["send"][..],
        &["send", "--to", "nonsense"],
        &["recv"],
        &["recv", "--port", "1", "--proto", "sctp"],
        &["frob"],
    ] {
        let out = Command::new(TRAFFIC).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage"), "{args:?}");
    }
    let out = Command::new(PROBE).args(["--interval-ms", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn probe_prints_windows_in_the_documented_format() {
    let (_probe, rx) = spawn(PROBE, &["--interval-ms", "5", "--report-ms", "100", "--node", "p"]);
    let first = wait_for(&rx, "window 1", |_| true);
    let second = wait_for(&rx, "window 2", |_| true);
    assert_eq!((first["window"].as_u64(), second["window"].as_u64()), (Some(1), Some(2)));
    for v in [&first, &second] {
        assert_eq!((v["tool"].as_str(), v["node"].as_str()), (Some("probe"), Some("p")));
        assert_eq!(v["interval_ns"], 5_000_000);
        assert!(v["samples"].as_u64().unwrap() >= 1, "{v}");
        for k in ["mono_ns", "real_ns", "boot_ns", "tsc"] {
            assert!(v[k].as_u64().unwrap() > 0, "{k}: {v}");
        }
        for k in ["mono", "real", "boot", "tsc"] {
            assert!(v["max_step_ns"][k].is_i64(), "{k}: {v}");
        }
        for k in ["real_mono", "boot_mono", "tsc_mono"] {
            assert!(v["max_disagree_ns"][k].is_u64(), "{k}: {v}");
        }
    }
    assert!(second["mono_ns"].as_u64() > first["mono_ns"].as_u64());
}

#[test]
fn a_sender_started_before_its_receiver_loses_nothing() {
    // The sender's start barrier: it numbers no record until the receiver
    // answers its hello, so a receiver that comes up late still gets all.
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let (_send, _send_rx) = spawn(TRAFFIC, &["send", "--to", &to, "--rate", "500", "--count", "300", "--node", "s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (_recv, rx) = spawn(TRAFFIC, &["recv", "--port", &port.to_string(), "--report-ms", "200", "--node", "r"]);
    let done = wait_for(&rx, "the whole flow", |v| v["received"].as_u64() == Some(300));
    assert_clean(&done, 300);
}
