//! The watch on a guest's serial log for its ready line
//! (`stasis_osguest::serial::ReadyWatch`): the guest writes whatever it
//! likes, appended in pieces the input chooses, polled after each piece.
//! Checked: the watch says ready exactly when the log holds the marker
//! (wherever the pieces split it), and it never reads a byte twice.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_osguest::serial::{ReadyWatch, READY_MARKER};
use std::io::Write;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    // The first byte sets the piece size (1..=256), the rest is the log.
    let Some((&step, log)) = data.split_first() else { return };
    let step = usize::from(step) + 1;
    let dir = DIR.get_or_init(|| tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir"));
    let path = dir.path().join("serial.log");
    let _ = std::fs::remove_file(&path);
    let mut w = ReadyWatch::new(&path);
    assert!(!w.poll().expect("poll of a missing log"), "a missing log is not ready");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open log");
    let mut written = 0;
    let mut ready = false;
    for piece in log.chunks(step) {
        file.write_all(piece).expect("append");
        written += piece.len();
        ready = w.poll().expect("poll");
        let holds = log[..written].windows(READY_MARKER.len()).any(|x| x == READY_MARKER);
        assert_eq!(ready, holds, "ready after {written} bytes");
        assert!(w.bytes_read() <= written as u64, "read {} of {written} bytes", w.bytes_read());
        if ready {
            break;
        }
    }
    if !ready {
        assert_eq!(w.bytes_read(), log.len() as u64, "every byte read exactly once");
    }
});
