//! The checkpoint store: one directory per committed checkpoint under an
//! experiment's `checkpoints/` root, each with a checksummed, versioned
//! `manifest.json` that records every state file's size and BLAKE3 digest.
//!
//! A checkpoint exists only once its manifest is durable: components write
//! into a pending `.tmp-<id>/` directory ([`Store::begin`]), and
//! [`Pending::commit`] fsyncs the files, writes the manifest (tmp, fsync,
//! rename) and renames the directory to `<id>/` atomically. A failed or
//! abandoned checkpoint is only ever a `.tmp-*` directory, which is never
//! listed and is removed once its owning process is gone. Opening a
//! checkpoint verifies the manifest and every file. Layout and format are
//! documented in `docs/checkpoint-format.md`.
//!
//! Since manifest 1.1, commit cuts every component file into
//! content-defined chunks ([`chunk`]) kept once in `<store>/chunks/`
//! however many checkpoints use them, and removes the whole file; a restore
//! reassembles it with [`Checkpoint::materialized`], verifying every chunk.
//! [`Store::fsck`] checks everything; [`Store::gc`] removes chunks no
//! manifest reaches.
//!
//! A pending checkpoint can also be *sealed* ([`Pending::seal`]): its files
//! fsynced and measured, kept as `.sealed-<id>/` (never stale, never
//! listed) until [`Sealed::commit`] chunks it — so a caller can call its
//! state durable before it pays for the chunking.

mod checkpoint;
pub mod chunk;
mod commit;
mod error;
mod failpoint;
mod fsck;
pub mod manifest;
mod mapped;
mod names;
mod owner;
pub mod remote;
mod restore;
mod retention;
mod sealed;
mod store;
mod util;
mod verify;

use std::time::Duration;

pub use checkpoint::{Checkpoint, CheckpointInfo};
pub use chunk::{ChunkDamage, ChunkId, ChunkStorage, Chunking, Collected, LocalChunks, MemChunks};
pub use commit::Pending;
pub use error::StoreError;
pub use fsck::{FsckProblem, FsckReport, GcReport};
pub use manifest::{
    Component, ComponentDraft, ComponentKind, ExperimentRef, FileEntry, FreezeReport, Manifest, ManifestDraft,
    ManifestVersion, Timings, FORMAT, MANIFEST_FILE, VERSION, VERSION_UNCHUNKED_FILES,
};
pub use remote::{CachedChunks, Remote, RemoteConfig, RemoteError};
pub use retention::{plan_retention, Retention};
pub use sealed::{Sealed, SealedFile};
pub use store::{GcLock, Store};

pub(crate) const TMP_PREFIX: &str = ".tmp-";
pub(crate) const OWNER_FILE: &str = ".owner";
/// Marks a checkpoint directory whose manifest is in the bucket (so one
/// deleted from the bucket is removed here too).
pub(crate) const IN_BUCKET_FILE: &str = ".in-bucket";
/// The chunk directory inside the store (never a checkpoint id).
pub const CHUNKS_DIR: &str = "chunks";
/// A pending directory without a readable owner is removed once this old.
pub(crate) const STALE_AGE: Duration = Duration::from_secs(60);
