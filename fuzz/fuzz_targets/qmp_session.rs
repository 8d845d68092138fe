//! A QMP session (`stasis_qemu::Qmp`) against a fake QEMU that sends the
//! input as its side of the conversation: greeting, replies, events, any
//! bytes at all, then closes. The client connects (greeting, capabilities),
//! runs two commands and drains and waits for events — every path that
//! reads what QEMU (compromised, or simply broken) writes. Seeds hold real
//! QEMU 7.2/10.0 transcripts; ids are deterministic (1, 2, 3), so replies in
//! the input are taken.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::OnceLock;
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    listener: UnixListener,
    rt: tokio::runtime::Runtime,
}

static FIX: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIX.get_or_init(|| {
        // libFuzzer's own main does not ignore SIGPIPE as Rust's does.
        // SAFETY: setting a signal disposition to SIG_IGN at start-up.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Fixture { _dir: dir, path, listener, rt }
    })
}

fuzz_target!(|data: &[u8]| {
    let fix = fixture();
    let script = data.to_vec();
    let listener = fix.listener.try_clone().expect("listener");
    let qemu = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let _ = s.write_all(&script);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Read until the client hangs up, so its writes never fail midway.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    fix.rt.block_on(async {
        let Ok(mut qmp) = stasis_qemu::Qmp::connect_with_timeout(&fix.path, Duration::from_secs(5)).await else {
            return;
        };
        qmp.set_command_timeout(Duration::from_secs(5));
        let _ = qmp.execute("query-status", None).await;
        let _ = qmp.execute_timed("stop", None).await;
        let _ = qmp.drain_events();
        let _ = qmp.wait_event("RESUME", Duration::from_millis(1)).await;
    });
    qemu.join().expect("fake QEMU");
});
