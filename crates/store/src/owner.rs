//! Who owns a pending checkpoint directory (so stale ones of dead processes
//! can be removed safely) and the store's advisory lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Written as `.owner` inside a pending directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Start time of the process (field 22 of `/proc/<pid>/stat`), so a
    /// reused pid is not mistaken for the owner.
    pub start: u64,
    pub name: Option<String>,
    pub index: u64,
}

/// Start time of process `pid` in clock ticks since boot, if it exists.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Owner {
    /// This process as the owner.
    pub fn me(name: Option<String>, index: u64) -> Owner {
        let pid = std::process::id();
        Owner { pid, start: process_start(pid).unwrap_or(0), name, index }
    }

    /// Whether the owning process still runs.
    pub fn alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

/// An exclusive `flock` on the store directory itself (no lock file, so
/// the directory holds nothing but checkpoints), released on drop.
pub struct StoreLock {
    _dir: File,
}

impl StoreLock {
    pub fn acquire(dir: &Path) -> io::Result<StoreLock> {
        StoreLock::acquire_mode(dir, libc::LOCK_EX)
    }

    /// A shared lock (several holders at once, none while an exclusive one is held).
    pub fn acquire_shared(dir: &Path) -> io::Result<StoreLock> {
        StoreLock::acquire_mode(dir, libc::LOCK_SH)
    }

    fn acquire_mode(dir: &Path, mode: libc::c_int) -> io::Result<StoreLock> {
        let dir = File::open(dir)?;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open for
            // the lifetime of the returned guard; no memory is involved.
            let rc = unsafe { libc::flock(dir.as_raw_fd(), mode) };
            if rc == 0 {
                return Ok(StoreLock { _dir: dir });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_not() {
        assert!(Owner::me(None, 1).alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = process_start(pid);
        child.wait().unwrap();
        let owner = Owner { pid, start: start.unwrap_or(1), name: None, index: 1 };
        assert!(!owner.alive());
    }
}
