//! A committed checkpoint: its listing entry, verification and
//! materializing its chunked files for a restore.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

use crate::chunk::ChunkStorage;
use crate::error::{io_err, StoreError};
use crate::manifest::Manifest;
use crate::restore::write_chunks_at;
use crate::util::par_map;
use crate::verify::verify_files;

/// A committed checkpoint as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointInfo {
    pub id: String,
    pub name: Option<String>,
    /// 1, 2, 3 … in creation order within this store.
    pub index: u64,
    pub created_unix_ms: u64,
    pub parent: Option<String>,
    pub experiment_name: String,
    pub experiment_digest: String,
    /// Sum of all recorded file sizes.
    pub bytes: u64,
    pub dir: PathBuf,
}

impl CheckpointInfo {
    pub(crate) fn of(manifest: &Manifest, dir: PathBuf) -> CheckpointInfo {
        CheckpointInfo {
            id: manifest.id.clone(),
            name: manifest.name.clone(),
            index: manifest.index,
            created_unix_ms: manifest.created_unix_ms,
            parent: manifest.parent.clone(),
            experiment_name: manifest.experiment.name.clone(),
            experiment_digest: manifest.experiment.digest.clone(),
            bytes: manifest.total_bytes(),
            dir,
        }
    }

    /// `name (id)` or `id`, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} ({})", self.id),
            None => self.id.clone(),
        }
    }
}

/// A committed, verified checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    pub info: CheckpointInfo,
    pub manifest: Manifest,
    pub dir: PathBuf,
    #[serde(skip)]
    pub(crate) chunks: Arc<dyn ChunkStorage>,
    /// Set by [`Checkpoint::materialized`]: the directory its files are in.
    #[serde(skip)]
    pub(crate) materialized_in: Option<PathBuf>,
}

impl Checkpoint {
    /// The state file of component `component` (or, for a name that is no
    /// component, the file of that name in the checkpoint directory).
    pub fn file(&self, component: &str) -> PathBuf {
        match self.manifest.component(component) {
            Some(c) => self.dir.join(&c.file),
            None => self.dir.join(component),
        }
    }

    /// Whether component `component` is kept as chunks (manifest ≥ 1.1)
    /// rather than as a whole file in [`Checkpoint::dir`].
    pub fn is_chunked(&self, component: &str) -> bool {
        self.manifest.component(component).is_some_and(|c| c.chunks.is_some())
    }

    /// Reassembles component `component` into `<dir>/<file>` (tmp, then
    /// rename): chunks are read, decoded and checked against their ids
    /// several at a time and written at their offsets, in one pass (the
    /// ids come from the checksummed manifest, and their lengths must add
    /// up to the recorded size). Refuses on the first missing or damaged
    /// chunk, naming the checkpoint, component and chunk, and removes the
    /// partial file. A whole-file component is returned where it is (it
    /// was verified on open).
    pub fn materialize(&self, component: &str, dir: &Path) -> Result<PathBuf, StoreError> {
        if let Some(chunks) = self.manifest.component(component).and_then(|c| c.chunks.as_ref()) {
            self.chunks.prefetch(&chunk_ids(chunks));
        }
        self.materialize_one(component, dir)
    }

    fn materialize_one(&self, component: &str, dir: &Path) -> Result<PathBuf, StoreError> {
        let Some(c) = self.manifest.component(component) else {
            return Ok(self.file(component));
        };
        let Some(chunks) = &c.chunks else {
            return Ok(self.dir.join(&c.file));
        };
        stasis_core::private::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let target = dir.join(&c.file);
        let tmp = dir.join(format!(".{}.tmp", c.file));
        let out = stasis_core::private::create_file(&tmp).map_err(io_err("cannot create", &tmp))?;
        let label = self.info.label();
        let result = write_chunks_at(&*self.chunks, &label, c, chunks, &out, &tmp);
        drop(out);
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &target).map_err(io_err("cannot rename into place", &tmp))?;
        debug!(checkpoint = %label, component, path = %target.display(), "materialized");
        Ok(target)
    }

    /// This checkpoint with every chunked component reassembled under `dir`
    /// (several at a time, see [`Checkpoint::materialize`]); whole-file
    /// components and further files (`files[]`) are symlinked there.
    /// [`Checkpoint::file`] of the result names real files, e.g. for QEMU's
    /// `-incoming exec:cat <file>`. The files stay until the caller removes
    /// `dir`. Materializing the result again into the same `dir` does nothing.
    ///
    /// This is where a restore reads (and verifies) every chunk, once: call
    /// it before stopping anything that runs, so a damaged checkpoint is
    /// refused while the experiment is untouched.
    pub fn materialized(&self, dir: &Path) -> Result<Checkpoint, StoreError> {
        if self.materialized_in.as_deref() == Some(dir) {
            return Ok(self.clone());
        }
        stasis_core::private::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let names: Vec<&str> = self.manifest.components.iter().map(|c| c.name.as_str()).collect();
        // A remote store starts fetching every chunk the restore reads, in
        // large requests, while the readers below consume what arrived.
        let all: Vec<_> =
            self.manifest.components.iter().filter_map(|c| c.chunks.as_ref()).flat_map(|c| chunk_ids(c)).collect();
        self.chunks.prefetch(&all);
        for r in par_map(&names, |name| self.materialize_one(name, dir)) {
            r?;
        }
        let whole = self
            .manifest
            .components
            .iter()
            .filter(|c| c.chunks.is_none())
            .map(|c| &c.file)
            .chain(self.manifest.files.iter().map(|f| &f.file));
        for file in whole {
            let link = dir.join(file);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(self.dir.join(file), &link).map_err(io_err("cannot link", &link))?;
        }
        let mut out = self.clone();
        out.dir = dir.to_path_buf();
        out.materialized_in = Some(dir.to_path_buf());
        Ok(out)
    }

    /// Reads every chunk of every chunked component and checks it against
    /// its id, and the reassembled size and BLAKE3 of each component (what
    /// `open_checkpoint` did before the single-pass restore; `fsck` does
    /// it for the whole store).
    pub fn verify(&self) -> Result<(), StoreError> {
        if self.materialized_in.is_some() {
            return Ok(());
        }
        verify_files(&self.dir, &self.manifest, &self.info.label(), &*self.chunks, true)
    }

    /// Refuses a checkpoint of another experiment (compares the digests).
    pub fn ensure_experiment(&self, name: &str, digest: &str) -> Result<(), StoreError> {
        let e = &self.manifest.experiment;
        if e.digest == digest {
            return Ok(());
        }
        Err(StoreError::ExperimentMismatch {
            checkpoint: self.info.label(),
            found_name: e.name.clone(),
            found_digest: e.digest.clone(),
            expected_name: name.to_owned(),
            expected_digest: digest.to_owned(),
        })
    }
}

/// The ids of a chunk list, in order (entries that are not ids are left
/// to the reader, which names them).
fn chunk_ids(chunks: &[crate::manifest::ChunkRef]) -> Vec<crate::chunk::ChunkId> {
    chunks.iter().filter_map(|r| crate::chunk::ChunkId::from_hex(&r.id)).collect()
}
