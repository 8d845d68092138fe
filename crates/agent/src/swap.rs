//! Swap-out and swap-in: a checkpoint that releases the machine.
//!
//! `swap_out` takes an ordinary checkpoint and, only once it is committed,
//! stops every process of the experiment and removes its sockets and
//! runtime files; the checkpoint, the disks and the history stay in the
//! state directory, and `swapped-out.json` records which checkpoint to come
//! back to. If the checkpoint fails nothing is released: the experiment
//! keeps running. Swap-in is a restore of that checkpoint (see
//! [`crate::host::restore`]), after which the record is removed.

use crate::event::Observer;
use crate::freeze::FreezeConfig;
use crate::host::{self, CheckpointError, CheckpointSummary, Runtime};
use crate::layout::Layout;
use serde::{Deserialize, Serialize};
use stasis_core::versioned::{self, FormatVersion, Persisted};
use stasis_store::Store;
use std::path::PathBuf;

/// The record of a swapped-out experiment, `<state>/<exp>/swapped-out.json`.
pub const SWAP_FILE: &str = "swapped-out.json";

/// What `swapped-out.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    /// The checkpoint swap-in restores.
    pub checkpoint: String,
    pub name: Option<String>,
    /// The branch the experiment was on.
    pub branch: String,
    pub at_unix_ms: u64,
    /// `qemu-system-x86_64 --version` of the host that saved it (a restore
    /// needs the same QEMU version and machine type).
    pub qemu_version: String,
    /// How many processes were stopped.
    pub stopped: usize,
}

impl Persisted for SwapRecord {
    const FORMAT: &'static str = "stasis-swap";
    const VERSION: FormatVersion = FormatVersion::new(1, 0);
}

/// Errors of [`swap_out`].
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("swap-out checkpoint failed, nothing was released")]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint {checkpoint} committed, but releasing the experiment failed")]
    Release {
        checkpoint: String,
        #[source]
        source: host::AttachError,
    },
    #[error("recording the swap-out in {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The first line of `qemu-system-x86_64 --version` (empty if it does not run).
pub fn qemu_version() -> String {
    std::process::Command::new(stasis_qemu::vm::qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// `major.minor` of a `QEMU emulator version 7.2.19 (Debian …)` line.
pub fn qemu_major_minor(version_line: &str) -> Option<(u32, u32)> {
    let v = version_line.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Checkpoint the experiment, then release every process and socket.
pub async fn swap_out(
    rt: &Runtime,
    layout: &Layout,
    store: &Store,
    name: Option<&str>,
    cfg: &FreezeConfig,
    obs: &dyn Observer,
) -> Result<(CheckpointSummary, SwapRecord), SwapError> {
    let summary = host::checkpoint(rt, store, name, cfg, obs).await?;
    let id = summary.info.id.clone();
    let stopped = host::down(layout).await.map_err(|source| SwapError::Release { checkpoint: id.clone(), source })?;
    release_runtime_files(layout, rt);
    let rec = SwapRecord {
        checkpoint: id,
        name: summary.info.name.clone(),
        branch: rt.branch.clone().unwrap_or_else(|| host::MAIN_BRANCH.into()),
        at_unix_ms: now_ms(),
        qemu_version: qemu_version(),
        stopped,
    };
    let path = layout.root().join(SWAP_FILE);
    versioned::write_atomic(&path, &rec).map_err(|source| SwapError::Record { path: path.clone(), source })?;
    tracing::info!(checkpoint = %rec.checkpoint, stopped, "swapped out");
    Ok((summary, rec))
}

/// What `down` leaves behind that a swapped-out experiment does not need:
/// QMP sockets and pidfiles of the killed QEMUs, the materialized state of
/// the last restore. Logs and consoles stay.
fn release_runtime_files(layout: &Layout, rt: &Runtime) {
    for v in &rt.vms {
        let _ = std::fs::remove_file(&v.qmp);
        if let Some(dir) = v.qmp.parent() {
            let _ = std::fs::remove_file(dir.join(stasis_qemu::vm::PID_FILE));
        }
    }
    let _ = std::fs::remove_dir_all(layout.root().join("restore"));
}

/// Bytes available to us on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// The swap-out record, if the experiment is swapped out.
pub fn swapped_out(layout: &Layout) -> Option<SwapRecord> {
    match versioned::read_opt(&layout.root().join(SWAP_FILE)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable swap-out record");
            None
        }
    }
}

/// Forget the swap-out (after a swap-in, or when the experiment was started
/// or restored otherwise).
pub fn clear(layout: &Layout) {
    let _ = std::fs::remove_file(layout.root().join(SWAP_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_line_parses() {
        assert_eq!(qemu_major_minor("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)"), Some((7, 2)));
        assert_eq!(qemu_major_minor("QEMU emulator version 8.0.0"), Some((8, 0)));
        assert_eq!(qemu_major_minor(""), None);
    }
}
