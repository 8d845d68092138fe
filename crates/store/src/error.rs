//! The store's error type.

use std::io;
use std::path::{Path, PathBuf};

use crate::manifest::{ManifestVersion, FORMAT, VERSION};

/// Errors of the store. Each names the checkpoint and, where one is
/// involved, the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {op}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checkpoint {checkpoint}: manifest {} is missing", path.display())]
    MissingManifest { checkpoint: String, path: PathBuf },
    #[error("checkpoint {checkpoint}: manifest {}:{line}:{column}: bad JSON: {message}", path.display())]
    BadJson { checkpoint: String, path: PathBuf, line: usize, column: usize, message: String },
    #[error("checkpoint {checkpoint}: manifest {}: {message}", path.display())]
    BadManifest { checkpoint: String, path: PathBuf, message: String },
    #[error("checkpoint {checkpoint}: not a stasis checkpoint manifest (format {found:?}, expected {FORMAT:?})")]
    WrongFormat { checkpoint: String, found: String },
    #[error("checkpoint {checkpoint}: manifest version {found} is not supported (this build reads {major}.0 to {major}.{minor})", major = VERSION.major, minor = VERSION.minor)]
    UnsupportedVersion { checkpoint: String, found: ManifestVersion },
    #[error("checkpoint {checkpoint}: manifest checksum mismatch (recorded {recorded}, computed {computed}); the manifest was altered or damaged")]
    ChecksumMismatch { checkpoint: String, recorded: String, computed: String },
    #[error("checkpoint {checkpoint}: manifest says id {found} but the directory is {}", dir.display())]
    IdMismatch { checkpoint: String, found: String, dir: PathBuf },
    #[error("checkpoint {checkpoint}: {component}: file {} is missing", path.display())]
    FileMissing { checkpoint: String, component: String, path: PathBuf },
    #[error("checkpoint {checkpoint}: {component}: file {} has {actual} bytes, the manifest records {recorded}", path.display())]
    FileSize { checkpoint: String, component: String, path: PathBuf, recorded: u64, actual: u64 },
    #[error("checkpoint {checkpoint}: {component}: file {} has BLAKE3 {actual}, the manifest records {recorded}", path.display())]
    FileDigest { checkpoint: String, component: String, path: PathBuf, recorded: String, actual: String },
    #[error("checkpoint {checkpoint}: {component}: file {file}: chunk {chunk} is missing")]
    ChunkMissing { checkpoint: String, component: String, file: String, chunk: String },
    #[error("checkpoint {checkpoint}: {component}: file {file}: chunk {chunk} is damaged: {problem}")]
    ChunkDamaged { checkpoint: String, component: String, file: String, chunk: String, problem: String },
    #[error("checkpoint {checkpoint}: {component}: file {file}: the chunks reassemble to {found}, the manifest records {recorded}")]
    Reassembly {
        checkpoint: String,
        component: String,
        file: String,
        /// `<bytes> bytes with BLAKE3 <hex>` of what the chunks gave.
        found: String,
        recorded: String,
    },
    #[error("chunk store {}: {op}", path.display())]
    ChunkIo {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "gc refused: the manifest of {checkpoint} does not read, so its chunks are unknown (repair or remove it first)"
    )]
    GcUnreadableManifest {
        checkpoint: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("no checkpoint {which:?}; known: {known}")]
    UnknownCheckpoint { which: String, known: String },
    #[error("a checkpoint named {name:?} already exists ({existing})")]
    DuplicateName { name: String, existing: String },
    #[error("bad checkpoint name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("checkpoint {checkpoint}: {reason}")]
    BadDraft { checkpoint: String, reason: String },
    #[error("object store")]
    Remote(#[from] crate::remote::RemoteError),
    #[error("checkpoint {checkpoint}: {reason}")]
    Retention { checkpoint: String, reason: &'static str },
    #[error("checkpoint {checkpoint} belongs to experiment {found_name:?} ({found_digest}), not {expected_name:?} ({expected_digest})")]
    ExperimentMismatch {
        checkpoint: String,
        found_name: String,
        found_digest: String,
        expected_name: String,
        expected_digest: String,
    },
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}
