//! The qemu-guest-agent client (`stasis_osguest::agent::AgentClient`)
//! against a hostile guest: a fake agent that synchronises correctly (so
//! the input reaches the replies behind the sync) and answers every command
//! with the next piece of the input (pieces split at NUL bytes, each sent
//! with a newline), then hangs up. The client runs a command to its end,
//! copies a file out of the guest and pings — everything that reads
//! guest-written bytes: the 0xFF-delimited framing, the reply cap, JSON,
//! base64 output and file data.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_osguest::agent::AgentClient;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    listener: UnixListener,
}

static FIX: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIX.get_or_init(|| {
        // SAFETY: setting a signal disposition to SIG_IGN at start-up
        // (libFuzzer's main, unlike Rust's, leaves SIGPIPE fatal).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
        let path = dir.path().join("ga.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        Fixture { _dir: dir, path, listener }
    })
}

/// The id of a `guest-sync-delimited` request line (after its 0xFF).
fn sync_id(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line.strip_prefix(&[0xff])?).ok()?;
    (v.get("execute")?.as_str()? == "guest-sync-delimited").then(|| v["arguments"]["id"].as_u64())?
}

fuzz_target!(|data: &[u8]| {
    let fix = fixture();
    let replies: Vec<Vec<u8>> = data.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    let done = Arc::new(AtomicBool::new(false));
    let listener = fix.listener.try_clone().expect("listener");
    let stop = done.clone();
    let guest = std::thread::spawn(move || {
        let mut replies = replies.into_iter();
        // One connection per client call; the last one (after `stop`) is
        // the wake-up below.
        while !stop.load(Ordering::SeqCst) {
            let Ok((s, _)) = listener.accept() else { return };
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            let mut line = Vec::new();
            loop {
                line.clear();
                if !matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    break;
                }
                let answer = match sync_id(line.trim_ascii_end()) {
                    Some(id) => {
                        let mut a = vec![0xff];
                        a.extend(format!("{{\"return\": {id}}}\n").into_bytes());
                        a
                    }
                    None => match replies.next() {
                        Some(mut reply) => {
                            reply.push(b'\n');
                            reply
                        }
                        None => break,
                    },
                };
                if w.write_all(&answer).is_err() {
                    break;
                }
            }
        }
    });
    let mut c = AgentClient::new("fuzz", &fix.path);
    c.call_timeout = Duration::from_secs(5);
    let argv = vec!["/bin/true".to_string()];
    let _ = c.run(&argv, Some(b"input"), Duration::ZERO, Duration::ZERO);
    let mut out = Vec::new();
    let _ = c.read_file("/etc/hostname", &mut out);
    let _ = c.ping();
    done.store(true, Ordering::SeqCst);
    // Wake the fake agent from accept so it sees `done`.
    let _ = std::os::unix::net::UnixStream::connect(&fix.path);
    guest.join().expect("fake guest agent");
});
