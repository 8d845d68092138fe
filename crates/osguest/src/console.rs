//! `stasis console NODE`: the node's serial console, interactive. QEMU
//! serves the serial port on a unix socket and keeps writing everything the
//! guest prints to the serial log (`-chardev socket,…,logfile=…`), so the log
//! is complete whether or not anyone is attached. The terminal is put in raw
//! mode while attached; the detach key (Ctrl-], as telnet's) ends the
//! session and leaves the guest running.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Ctrl-].
pub const DETACH_KEY: u8 = 0x1d;

/// Why a console session could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("node {node}: cannot attach to its console socket {}", path.display())]
    Connect {
        node: String,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node {node}: console: {what}")]
    Io {
        node: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The user pressed the detach key.
    Detached,
    /// The input ended (stdin closed).
    InputClosed,
    /// QEMU closed the console (the VM is gone).
    ConsoleClosed,
}

/// Splits keyboard input into what goes to the guest and the detach key.
/// I/O-free.
#[derive(Debug, Default)]
pub struct DetachScanner;

impl DetachScanner {
    /// The bytes of `input` to forward, and whether the detach key came
    /// (nothing after it is forwarded).
    pub fn scan<'a>(&mut self, input: &'a [u8]) -> (&'a [u8], bool) {
        match input.iter().position(|&b| b == DETACH_KEY) {
            Some(i) => (&input[..i], true),
            None => (input, false),
        }
    }
}

/// Raw mode on a terminal, restored on drop.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// `None` when `fd` is not a terminal (input from a pipe stays as it is).
    fn enter(fd: RawFd) -> io::Result<Option<RawMode>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Attaches `input`/`output` to `node`'s console socket until the detach
/// key, the end of input, or QEMU closing it.
pub fn attach<I: Read + AsRawFd, O: Write + Send + 'static>(
    node: &str,
    socket: &Path,
    mut input: I,
    mut output: O,
) -> Result<Ended, ConsoleError> {
    let io_err = |what, source| ConsoleError::Io { node: node.to_owned(), what, source };
    let conn = UnixStream::connect(socket).map_err(|source| ConsoleError::Connect {
        node: node.to_owned(),
        path: socket.to_owned(),
        source,
    })?;
    let mut from_guest = conn.try_clone().map_err(|e| io_err("cannot share the socket", e))?;
    let _raw = RawMode::enter(input.as_raw_fd()).map_err(|e| io_err("cannot put the terminal in raw mode", e))?;
    let printer = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if output.write_all(&buf[..n]).and_then(|_| output.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut to_guest = conn;
    let mut scanner = DetachScanner;
    let mut buf = [0u8; 1024];
    let ended = loop {
        if printer.is_finished() {
            break Ended::ConsoleClosed;
        }
        let n = match input.read(&mut buf) {
            Ok(0) => break Ended::InputClosed,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("cannot read the terminal", e)),
        };
        let (forward, detach) = scanner.scan(&buf[..n]);
        if !forward.is_empty() && to_guest.write_all(forward).is_err() {
            break Ended::ConsoleClosed;
        }
        if detach {
            break Ended::Detached;
        }
    };
    let _ = to_guest.shutdown(std::net::Shutdown::Both);
    let _ = printer.join();
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_detach_key_ends_forwarding() {
        let mut s = DetachScanner;
        assert_eq!(s.scan(b"ls -l\r"), (&b"ls -l\r"[..], false));
        assert_eq!(s.scan(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(s.scan(b"\x1d"), (&b""[..], true));
    }

    /// A sink the test can read after the session.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn keys_reach_the_guest_its_output_reaches_the_terminal_until_detach() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let guest = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"login: ").unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        // Keyboard input from a socket (not a terminal: no raw mode), typed
        // once the guest's prompt is on the screen.
        let (keys, mut keyboard) = UnixStream::pair().unwrap();
        let out = Shared::default();
        let screen = out.clone();
        let typist = std::thread::spawn(move || {
            while !screen.0.lock().unwrap().starts_with(b"login: ") {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            keyboard.write_all(b"root\r\x1dnot sent").unwrap();
            keyboard
        });
        let ended = attach("a", &sock, keys, out.clone()).unwrap();
        assert_eq!(ended, Ended::Detached);
        assert_eq!(guest.join().unwrap(), b"root\r", "keys after the detach key are not sent");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"login: ");
        drop(typist.join().unwrap());
        let e = attach("b", &d.path().join("none.sock"), UnixStream::pair().unwrap().0, Shared::default()).unwrap_err();
        assert!(e.to_string().starts_with("node b: cannot attach to its console socket"), "{e}");
    }
}
