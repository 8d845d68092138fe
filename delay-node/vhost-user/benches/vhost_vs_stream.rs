//! Two TCG guests, iperf3 TCP for 10 s, joined (1) by the vhost-user `Bridge`
//! and (2) by a byte relay between two `-netdev stream` sockets (the stream
//! framing is the same on both sides, so the relay copies bytes). Then, on the
//! vhost-user pair, the delay between QMP `stop` and the Stopped marker over
//! repeated stop/cont cycles. Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p stasis-vhost-user --bench vhost_vs_stream` (≈ 2 minutes;
//! `VHOST_BENCH_RUNS=n` runs per mode, default 2). Needs the guest image with
//! iperf3 (`bash guest/build.sh` on a host with iperf3 installed).

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{boot, wait_serial, GuestSpec, Qmp};
use stasis_core::clock::mono_ns;
use stasis_vhost_user::{Bridge, PortEvent, Side};

const SERVER: &str = "iperf3 -s -1 >/dev/null 2>&1";
const CLIENT: &str = "until ping -c 1 -W 1 10.0.1.1 >/dev/null 2>&1; do sleep 0.2; done; sleep 1; \
    iperf3 -c 10.0.1.1 -t 10 -f m 2>&1 | grep -E 'receiver|sender|error'; echo IPERF-DONE";

fn pair(dir: &Path, stream_mode: bool) -> (common::Guest, common::Guest) {
    let spec = |name, ip, mac, script, sock: &'static str| GuestSpec {
        name,
        ip,
        mac,
        script,
        vhost_socket: Box::leak(dir.join(sock).into_boxed_path()),
        dir,
        incoming: None,
        log_suffix: "",
        stream_mode,
    };
    let a = boot(&spec("a", "10.0.1.1", "52:54:00:00:01:01", SERVER, "a.sock"));
    let b = boot(&spec("b", "10.0.1.2", "52:54:00:00:01:02", CLIENT, "b.sock"));
    (a, b)
}

/// Mbit/s of the receiver line, from the client's console.
fn iperf_mbits(b: &common::Guest) -> f64 {
    wait_serial(b, "IPERF-DONE", Duration::from_secs(120), |l| l.contains("IPERF-DONE"));
    let line = wait_serial(b, "an iperf3 receiver line", Duration::from_secs(1), |l| l.contains("receiver"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec").unwrap_or_else(|| panic!("no Mbits/sec in {line}"));
    words[i - 1].parse().unwrap()
}

fn run_vhost(dir: &Path, stop_cycles: usize) -> (f64, Vec<(i64, i64)>) {
    let (tx, rx) = channel();
    let _bridge = Bridge::new(&dir.join("a.sock"), &dir.join("b.sock"), move |side, ev| {
        let _ = tx.send((side, ev.clone()));
    })
    .unwrap();
    let (a, b) = pair(dir, false);
    let mbits = iperf_mbits(&b);
    let mut qmp = Qmp::connect(&a.qmp);
    let mut marks = Vec::new();
    for _ in 0..stop_cycles {
        while rx.try_recv().is_ok() {}
        let sent = mono_ns();
        qmp.cmd(r#"{"execute":"stop"}"#);
        let replied = mono_ns();
        let at = loop {
            if let (Side::A, PortEvent::Stopped { at }) =
                rx.recv_timeout(Duration::from_secs(10)).expect("Stopped marker")
            {
                break at;
            }
        };
        marks.push((at as i64 - sent as i64, at as i64 - replied as i64));
        qmp.cmd(r#"{"execute":"cont"}"#);
        loop {
            if let (Side::A, PortEvent::Started) = rx.recv_timeout(Duration::from_secs(10)).expect("Started") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (mbits, marks)
}

fn run_stream(dir: &Path) -> f64 {
    let la = UnixListener::bind(dir.join("a.sock")).unwrap();
    let lb = UnixListener::bind(dir.join("b.sock")).unwrap();
    let relay = std::thread::spawn(move || {
        let (sa, _) = la.accept().unwrap();
        let (sb, _) = lb.accept().unwrap();
        let (sa2, sb2) = (sa.try_clone().unwrap(), sb.try_clone().unwrap());
        let t = std::thread::spawn(move || std::io::copy(&mut &sa2, &mut &sb2));
        let _ = std::io::copy(&mut &sb, &mut &sa);
        let _ = t.join();
    });
    let (a, b) = pair(dir, true);
    let mbits = iperf_mbits(&b);
    drop((a, b));
    let _ = relay.join();
    mbits
}

fn stats(v: &mut [i64]) -> String {
    v.sort_unstable();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e6;
    format!("min {:.3} median {:.3} p95 {:.3} max {:.3} ms", p(0.0), p(0.5), p(0.95), p(1.0))
}

fn main() {
    common::require_image();
    let runs: usize = std::env::var("VHOST_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let mut results = Vec::new();
    let mut marks = Vec::new();
    for run in 0..runs {
        for mode in ["vhost-user", "stream"] {
            let dir = tempfile::tempdir().unwrap();
            let t = Instant::now();
            let mbits = if mode == "vhost-user" {
                let (m, mk) = run_vhost(dir.path(), 20);
                marks.extend(mk);
                m
            } else {
                run_stream(dir.path())
            };
            println!("run {run} {mode}: iperf3 TCP {mbits:.0} Mbit/s ({:.0?} total)", t.elapsed());
            results.push((mode, mbits));
        }
    }
    for mode in ["vhost-user", "stream"] {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == mode).map(|r| r.1).collect();
        println!("{mode}: mean {:.0} Mbit/s over {} runs {v:?}", v.iter().sum::<f64>() / v.len() as f64, v.len());
    }
    let mut from_send: Vec<i64> = marks.iter().map(|m| m.0).collect();
    let mut from_reply: Vec<i64> = marks.iter().map(|m| m.1).collect();
    println!("Stopped marker after sending QMP stop ({} cycles): {}", marks.len(), stats(&mut from_send));
    println!("Stopped marker relative to the QMP stop reply (negative = before): {}", stats(&mut from_reply));
}
