//! qcow2 images for VM data disks, made with `qemu-img`: an empty base image
//! and overlays on top of an existing image (backing chains, see
//! docs/disks.md). An overlay only holds the clusters written after it was
//! made, so making one copies nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the `qemu-img` binary (default `qemu-img`).
pub const ENV_QEMU_IMG: &str = "STASIS_QEMU_IMG";

/// Errors of image creation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("backing format {0:?} is neither qcow2 nor raw")]
    BadFormat(String),
    #[error("image path {0} is not usable (not absolute UTF-8 without commas)")]
    BadPath(PathBuf),
}

fn qemu_img(args: &[&str]) -> Result<(), DiskError> {
    let binary = std::env::var(ENV_QEMU_IMG).unwrap_or_else(|_| "qemu-img".to_owned());
    let out = Command::new(&binary).args(args).output().map_err(|source| DiskError::Spawn { binary, source })?;
    if !out.status.success() {
        return Err(DiskError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn checked(path: &Path) -> Result<&str, DiskError> {
    match path.to_str() {
        Some(s) if path.is_absolute() && !s.contains(',') => Ok(s),
        _ => Err(DiskError::BadPath(path.to_owned())),
    }
}

/// Create an empty qcow2 image of `bytes` at `path` (reads as zeros).
pub fn create_base(path: &Path, bytes: u64) -> Result<(), DiskError> {
    qemu_img(&["create", "-q", "-f", "qcow2", checked(path)?, &bytes.to_string()])
}

/// Create a qcow2 overlay at `path` whose backing image is `backing` (by
/// absolute path): it reads as `backing` and takes every later write.
pub fn create_overlay(path: &Path, backing: &Path) -> Result<(), DiskError> {
    create_overlay_of(path, backing, "qcow2")
}

/// [`create_overlay`] on a backing image of format `backing_format`
/// (`qcow2` or `raw`), given explicitly so QEMU never probes a user's
/// image (a raw image probed as qcow2 would be a guest-chosen format).
/// A root disk's overlay sits on the user's image this way; QEMU opens
/// every backing image read-only.
pub fn create_overlay_of(path: &Path, backing: &Path, backing_format: &str) -> Result<(), DiskError> {
    if !matches!(backing_format, "qcow2" | "raw") {
        return Err(DiskError::BadFormat(backing_format.to_owned()));
    }
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", backing_format, "-b", checked(backing)?, checked(path)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_reads_through_to_its_backing_image() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        create_base(&base, 1 << 20).unwrap();
        create_overlay(&top, &base).unwrap();
        let info = Command::new("qemu-img").args(["info", "--output=json", top.to_str().unwrap()]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 1 << 20);
        assert_eq!(v["backing-filename"], base.to_str().unwrap());
        assert!(matches!(create_overlay(Path::new("rel.qcow2"), &base), Err(DiskError::BadPath(_))));
        assert!(matches!(
            create_overlay(&dir.path().join("x.qcow2"), &dir.path().join("missing.qcow2")),
            Err(DiskError::Failed { .. })
        ));
    }
}
