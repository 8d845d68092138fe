//! The experiment's job lock (libvirt's per-domain job lock): one command
//! at a time changes an experiment. Without it, `stasis down` or `restore`
//! could run in the middle of a checkpoint and kill the VMs it is saving,
//! or two `up`s of one spec start it twice.
//!
//! The lock is `flock(2)` on `<experiment>/job.lock`: the kernel drops it
//! when its holder dies, however it dies, so a SIGKILLed checkpoint never
//! leaves the experiment locked (`stasis resume` then takes the lock like
//! any other command). The file holds who has the lock (pid, command,
//! since), for the refusal of the next one; the descriptor is close-on-exec,
//! so QEMU and the delay node never inherit the lock.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

/// The lock file's name in the experiment's directory.
pub const FILE: &str = "job.lock";

/// Who holds an experiment's job lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// The command, e.g. "checkpoint".
    pub command: String,
    pub since_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("experiment {experiment:?} is busy: {}; try again once it is done", describe(.holder))]
    Busy { experiment: String, holder: Option<Holder> },
    #[error("{}: cannot take the experiment's job lock", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn describe(h: &Option<Holder>) -> String {
    match h {
        Some(h) => format!("`stasis {}` (pid {}) has been running for {} s", h.command, h.pid, age_s(h.since_unix_ms)),
        None => "another stasis command is running".to_owned(),
    }
}

fn age_s(since_unix_ms: u64) -> u64 {
    unix_ms().saturating_sub(since_unix_ms) / 1000
}

fn unix_ms() -> u64 {
    stasis_core::clock::realtime_ns() / 1_000_000
}

/// A held job lock; dropping it releases the lock.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

impl JobLock {
    /// Takes experiment `experiment`'s job lock for `command`, or refuses at
    /// once, naming the holder. The experiment's directory must exist.
    pub fn acquire(layout: &Layout, experiment: &str, command: &str) -> Result<JobLock, JobError> {
        Self::acquire_file(layout, FILE, experiment, command)
    }

    /// [`JobLock::acquire`] on another lock file of the experiment's
    /// directory (e.g. the supervisor's, [`crate::supervise::LOCK_FILE`]).
    pub fn acquire_file(layout: &Layout, file: &str, experiment: &str, command: &str) -> Result<JobLock, JobError> {
        let path = layout.root().join(file);
        let io = |source| JobError::Io { path: path.clone(), source };
        let mut file = open(&path).map_err(io)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JobError::Busy { experiment: experiment.to_owned(), holder: read_holder(&mut file) });
            }
            return Err(io(e));
        }
        let me = Holder { pid: std::process::id(), command: command.to_owned(), since_unix_ms: unix_ms() };
        let text = serde_json::to_vec(&me).expect("a holder serialises");
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(&text)).map_err(io)?;
        Ok(JobLock { _file: file })
    }

    /// Who holds the lock of the experiment at `layout` now (None: nobody).
    pub fn holder(layout: &Layout) -> Option<Holder> {
        Self::holder_of(layout, FILE)
    }

    /// Who holds lock file `file` of the experiment at `layout` (None: nobody).
    pub fn holder_of(layout: &Layout, file: &str) -> Option<Holder> {
        let mut file = File::open(layout.root().join(file)).ok()?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None;
        }
        read_holder(&mut file)
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The holder record (at most 4 KiB of it: the file is ours, but bounded anyway).
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut buf = Vec::new();
    file.rewind().ok()?;
    file.take(4096).read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_command_is_refused_naming_the_first_until_it_is_done() {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::new(t.path(), "exp");
        std::fs::create_dir(layout.root()).unwrap();
        assert_eq!(JobLock::holder(&layout), None);
        let first = JobLock::acquire(&layout, "exp", "checkpoint").unwrap();
        let held = JobLock::holder(&layout).expect("the holder is recorded");
        assert_eq!((held.pid, held.command.as_str()), (std::process::id(), "checkpoint"));
        let e = JobLock::acquire(&layout, "exp", "down").unwrap_err();
        assert!(matches!(&e, JobError::Busy { holder: Some(h), .. } if h.command == "checkpoint"), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("\"exp\" is busy") && msg.contains("stasis checkpoint") && msg.contains("pid"), "{msg}");
        drop(first);
        assert_eq!(JobLock::holder(&layout), None);
        let second = JobLock::acquire(&layout, "exp", "down").unwrap();
        assert_eq!(JobLock::holder(&layout).unwrap().command, "down");
        drop(second);
    }

    #[test]
    fn the_lock_file_is_owner_only_and_a_symlink_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::new(t.path(), "exp");
        std::fs::create_dir(layout.root()).unwrap();
        drop(JobLock::acquire(&layout, "exp", "up").unwrap());
        let mode = std::fs::metadata(layout.root().join(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(layout.root().join(FILE)).unwrap();
        std::os::unix::fs::symlink(t.path().join("elsewhere"), layout.root().join(FILE)).unwrap();
        let e = JobLock::acquire(&layout, "exp", "up").unwrap_err();
        assert!(matches!(e, JobError::Io { .. }), "{e}");
        assert!(!t.path().join("elsewhere").exists());
    }
}
