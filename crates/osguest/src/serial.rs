//! The guest serial log as the agent reads it: watching for the ready line
//! a guest prints when it has booted. The guest decides how much it writes
//! there, so a watch reads only what was appended since its last poll, at
//! most [`MAX_POLL_READ`] bytes per poll in [`CHUNK`]-byte pieces, keeping
//! just enough of the previous read to see a marker split across two.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The line a guest of the project image prints once it is up.
pub const READY_MARKER: &[u8] = b"STASIS-READY";
/// Most bytes one [`ReadyWatch::poll`] reads; a guest writing faster than
/// this per poll delays its own readiness, nothing else.
pub const MAX_POLL_READ: u64 = 1 << 20;
/// Bytes read at a time (the memory a poll uses, with the marker's length).
pub const CHUNK: usize = 64 << 10;

/// Watches one serial log for [`READY_MARKER`].
#[derive(Debug)]
pub struct ReadyWatch {
    path: PathBuf,
    /// Bytes of the log already looked at.
    offset: u64,
    /// The last `READY_MARKER.len() - 1` bytes looked at: the start of a
    /// marker whose end is not written yet.
    tail: Vec<u8>,
    seen: bool,
    /// Bytes read from the log so far (for tests and diagnostics).
    read: u64,
}

impl ReadyWatch {
    pub fn new(path: &Path) -> ReadyWatch {
        ReadyWatch { path: path.to_owned(), offset: 0, tail: Vec::new(), seen: false, read: 0 }
    }

    /// The log this watches.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes read from the log so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Whether the marker has appeared, reading what was appended since the
    /// last poll (at most [`MAX_POLL_READ`] bytes). A log not written yet is
    /// not ready; once seen, the log is not read again.
    pub fn poll(&mut self) -> io::Result<bool> {
        if self.seen {
            return Ok(true);
        }
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated (a log restarted in place): start over.
            self.offset = 0;
            self.tail.clear();
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut limited = file.take(MAX_POLL_READ.min(len - self.offset));
        let mut buf = vec![0u8; self.tail.len() + CHUNK];
        loop {
            let keep = self.tail.len();
            buf[..keep].copy_from_slice(&self.tail);
            let n = limited.read(&mut buf[keep..])?;
            if n == 0 {
                return Ok(false);
            }
            self.offset += n as u64;
            self.read += n as u64;
            let window = &buf[..keep + n];
            if window.windows(READY_MARKER.len()).any(|w| w == READY_MARKER) {
                self.seen = true;
                return Ok(true);
            }
            let from = window.len().saturating_sub(READY_MARKER.len() - 1);
            self.tail = window[from..].to_vec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(bytes).unwrap();
    }

    #[test]
    fn a_marker_split_across_two_appends_is_seen() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        let mut w = ReadyWatch::new(&log);
        assert!(!w.poll().unwrap(), "no log yet");
        append(&log, b"[    0.1] booting\nSTASIS-RE");
        assert!(!w.poll().unwrap());
        append(&log, b"ADY\n");
        assert!(w.poll().unwrap());
        // Each byte was read once.
        assert_eq!(w.bytes_read(), std::fs::metadata(&log).unwrap().len());
        assert!(w.poll().unwrap(), "stays ready without reading");
        assert_eq!(w.bytes_read(), std::fs::metadata(&log).unwrap().len());
    }

    #[test]
    fn a_marker_split_across_chunks_of_one_poll_is_seen() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        let mut text = vec![b'.'; CHUNK - 5];
        text.extend_from_slice(b"STASIS-READY\n");
        append(&log, &text);
        assert!(ReadyWatch::new(&log).poll().unwrap());
    }

    #[test]
    fn a_huge_log_is_read_a_bounded_amount_per_poll_and_never_twice() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        // A guest that printed 8 MiB and no marker.
        let line = [b'x'; 1023].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        let mut f = std::fs::File::create(&log).unwrap();
        for _ in 0..8 * 1024 {
            f.write_all(&line).unwrap();
        }
        drop(f);
        let mut w = ReadyWatch::new(&log);
        assert!(!w.poll().unwrap());
        assert_eq!(w.bytes_read(), MAX_POLL_READ, "one poll reads at most the cap");
        for _ in 0..7 {
            assert!(!w.poll().unwrap());
        }
        assert_eq!(w.bytes_read(), 8 << 20, "eight polls read the log once, not eight times");
        assert!(!w.poll().unwrap());
        assert_eq!(w.bytes_read(), 8 << 20, "nothing appended, nothing read");
        append(&log, b"STASIS-READY\n");
        assert!(w.poll().unwrap());
        assert_eq!(w.bytes_read(), (8 << 20) + 13);
    }
}
