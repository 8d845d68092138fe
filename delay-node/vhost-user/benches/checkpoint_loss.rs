//! What a checkpoint/restore of the receiving guest costs in frames, in both
//! modes: a sends sequence-numbered UDP to b at `VHOST_LOSS_PPS` (default
//! 2000); mid-stream b is stopped, saved with `migrate` to a file, killed and
//! restored in a new QEMU on the same socket; frames for b wait in the relay
//! (stream) or the bridge (vhost-user) meanwhile. Prints b's missing/dups
//! count per mode. In stream mode frames QEMU had read from the socket but not
//! put in the stopped guest's ring are lost with the old QEMU; in vhost-user
//! mode nothing sits in QEMU.
//!
//! `cargo bench -p stasis-vhost-user --bench checkpoint_loss` (≈ 2 minutes).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{boot, last_json, wait_serial, GuestSpec, Qmp};
use stasis_vhost_user::Bridge;

/// A `-netdev stream` relay between two sockets that accepts reconnections
/// and keeps frames for a side while it has no connection. Its threads live
/// until the process exits.
struct Relay;

#[derive(Default)]
struct SideState {
    conn: Option<UnixStream>,
    pending: VecDeque<Vec<u8>>,
}

impl Relay {
    fn start(a: &Path, b: &Path) -> Relay {
        let sides = [Arc::new(Mutex::new(SideState::default())), Arc::new(Mutex::new(SideState::default()))];
        for (i, path) in [a, b].into_iter().enumerate() {
            let l = UnixListener::bind(path).unwrap();
            let me = sides[i].clone();
            let peer = sides[1 - i].clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { return };
                    {
                        let mut st = me.lock().unwrap();
                        let mut w = conn.try_clone().unwrap();
                        // Flush what waited for this side.
                        while let Some(f) = st.pending.pop_front() {
                            let _ = w.write_all(&(f.len() as u32).to_be_bytes()).and_then(|_| w.write_all(&f));
                        }
                        st.conn = Some(w);
                    }
                    let mut r = conn;
                    loop {
                        let mut len = [0u8; 4];
                        if r.read_exact(&mut len).is_err() {
                            break;
                        }
                        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                        if r.read_exact(&mut f).is_err() {
                            break;
                        }
                        let mut st = peer.lock().unwrap();
                        let sent = match st.conn.as_mut() {
                            Some(w) => w.write_all(&len).and_then(|_| w.write_all(&f)).is_ok(),
                            None => false,
                        };
                        if !sent {
                            st.conn = None;
                            st.pending.push_back(f);
                        }
                    }
                    me.lock().unwrap().conn = None;
                }
            });
        }
        Relay
    }
}

fn run(dir: &Path, stream_mode: bool, pps: u64, total: u64) -> serde_json::Value {
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let _relay;
    let _bridge;
    if stream_mode {
        _relay = Some(Relay::start(&a_sock, &b_sock));
        _bridge = None;
    } else {
        _relay = None;
        _bridge = Some(Bridge::new(&a_sock, &b_sock, |_, _| {}).unwrap());
    }
    let recv_script = "stasis-traffic recv --port 5000 --proto udp --report-ms 300";
    let send_script = format!(
        "until ping -c 1 -W 1 10.0.1.2 >/dev/null 2>&1; do sleep 0.2; done; sleep 1; \
         stasis-traffic send --to 10.0.1.2:5000 --proto udp --rate {pps} --size 200 --count {total} --report-ms 1000"
    );
    let spec = |name, ip, mac, script, sock, incoming, log_suffix| GuestSpec {
        name,
        ip,
        mac,
        script,
        vhost_socket: sock,
        dir,
        incoming,
        log_suffix,
        stream_mode,
    };
    let b = boot(&spec("b", "10.0.1.2", "52:54:00:00:01:02", recv_script, &b_sock, None, ""));
    let a = boot(&spec("a", "10.0.1.1", "52:54:00:00:01:01", &send_script, &a_sock, None, ""));
    let received =
        |g: &common::Guest| last_json(g, &["\"role\":\"recv\""]).and_then(|v| v["received"].as_u64()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(90);
    while received(&b) < total / 3 {
        assert!(Instant::now() < deadline, "b received too little");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut q = Qmp::connect(&b.qmp);
    q.cmd(r#"{"execute":"stop"}"#);
    let state = dir.join("b.state");
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#, state.display()));
    q.wait_migrated(Duration::from_secs(60));
    drop(q);
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    let b2 = boot(&spec("b", "10.0.1.2", "52:54:00:00:01:02", recv_script, &b_sock, Some(&state), "-restored"));
    let mut q = Qmp::connect(&b2.qmp);
    while q.cmd(r#"{"execute":"query-status"}"#).contains("inmigrate") {
        std::thread::sleep(Duration::from_millis(50));
    }
    q.cmd(r#"{"execute":"cont"}"#);
    wait_serial(&a, "sender done", Duration::from_secs(120), |l| {
        l.contains("\"role\":\"send\"") && l.contains("\"done\":true")
    });
    std::thread::sleep(Duration::from_secs(2));
    let v = last_json(&b2, &["\"role\":\"recv\""]).expect("restored receiver reports");
    drop((a, b2));
    v
}

fn main() {
    common::require_image();
    let pps: u64 = std::env::var("VHOST_LOSS_PPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let total = pps * 12;
    for (mode, stream) in [("stream", true), ("vhost-user", false)] {
        let dir = tempfile::tempdir().unwrap();
        let v = run(dir.path(), stream, pps, total);
        println!(
            "{mode}: {pps} pps, checkpoint+restore of the receiver: received {} of {total}, missing {}, dups {}",
            v["received"], v["missing"], v["dups"]
        );
    }
}
