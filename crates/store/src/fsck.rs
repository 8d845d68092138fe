//! Checking the whole store (`fsck`) and collecting unreferenced chunks (`gc`).

use tracing::info;

use crate::chunk::{ChunkId, ChunkStorage};
use crate::error::StoreError;
use crate::manifest::ChunkRef;
use crate::remote::LeaseKind;
use crate::verify::{load_manifest, read_chunk_via, verify_files};
use crate::{Store, CHUNKS_DIR};

/// How long gc waits for commits elsewhere to finish.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Who references a chunk: (checkpoint, component, file).
type ChunkUser = (String, String, String);

/// One thing `fsck` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FsckProblem {
    /// The checkpoint directory's name.
    pub checkpoint: String,
    pub component: Option<String>,
    pub chunk: Option<String>,
    pub message: String,
}

/// What [`Store::fsck`] checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    pub checkpoints: usize,
    /// Sum of the checkpoints' logical (whole-file) sizes.
    pub logical_bytes: u64,
    /// Distinct chunks the manifests reference, all read and hash-checked.
    pub chunks_referenced: usize,
    /// Chunks in the chunk store, and their stored (compressed) bytes.
    pub chunks_stored: usize,
    pub stored_bytes: u64,
    /// Stored chunks no manifest references (`stasis gc` removes them).
    pub orphan_chunks: usize,
    pub orphan_bytes: u64,
    pub problems: Vec<FsckProblem>,
}

impl FsckReport {
    /// Whether nothing is wrong (orphans are not a fault).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub checkpoints: usize,
    pub chunks_kept: usize,
    pub chunks_removed: usize,
    /// Stored bytes freed.
    pub bytes_removed: u64,
    /// Leftovers of commits that died before publishing their chunks.
    pub unpublished_removed: usize,
    /// A store bound to a bucket: packs deleted, packs written by
    /// rewriting sparse ones, and the live bytes copied into them.
    pub packs_removed: usize,
    pub packs_written: usize,
    pub bytes_rewritten: u64,
}

impl Store {
    /// Checks everything: every committed manifest (format, version,
    /// checksum), every whole file, every referenced chunk (present,
    /// decodes, hashes to its id, has the recorded length) once however
    /// many checkpoints share it, and counts chunks nothing references.
    /// Reports every problem instead of stopping at the first.
    ///
    /// A store bound to a bucket checks the bucket: manifests committed
    /// anywhere, and every chunk read from the bucket, not the cache.
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        if self.remote.is_some() {
            let _lock = self.lock()?;
            self.sync_locked()?;
        }
        let _lock = self.chunk_lock(false)?;
        let mut report = FsckReport::default();
        let mut users: std::collections::BTreeMap<ChunkId, (u64, Vec<ChunkUser>)> = Default::default();
        let mut bad_ids = Vec::new();
        for dir in self.committed_dirs()? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            report.checkpoints += 1;
            let manifest = match load_manifest(&dir) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(FsckProblem {
                        checkpoint: name,
                        component: None,
                        chunk: None,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            report.logical_bytes += manifest.total_bytes();
            let mut whole_only = manifest.clone();
            for c in &mut whole_only.components {
                if let Some(chunks) = c.chunks.take() {
                    c.file.clear();
                    let sum: u64 = chunks.iter().map(|r| r.len).sum();
                    if sum != c.bytes {
                        report.problems.push(FsckProblem {
                            checkpoint: name.clone(),
                            component: Some(c.name.clone()),
                            chunk: None,
                            message: format!(
                                "checkpoint {name}: {}: chunks add up to {sum} bytes, the manifest records {}",
                                c.name, c.bytes
                            ),
                        });
                    }
                    for r in chunks {
                        match ChunkId::from_hex(&r.id) {
                            Some(id) => users.entry(id).or_insert((r.len, Vec::new())).1.push((
                                name.clone(),
                                c.name.clone(),
                                c.file.clone(),
                            )),
                            None => bad_ids.push(FsckProblem {
                                checkpoint: name.clone(),
                                component: Some(c.name.clone()),
                                chunk: Some(r.id.clone()),
                                message: format!("checkpoint {name}: {}: {:?} is not a chunk id", c.name, r.id),
                            }),
                        }
                    }
                }
            }
            // Further files a remote store also keeps as chunks: those
            // chunks are checked like the components' (the whole file, its
            // local copy, below).
            for f in &manifest.files {
                for r in f.chunks.iter().flatten() {
                    if let Some(id) = ChunkId::from_hex(&r.id) {
                        users.entry(id).or_insert((r.len, Vec::new())).1.push((
                            name.clone(),
                            f.file.clone(),
                            f.file.clone(),
                        ));
                    }
                }
            }
            whole_only.components.retain(|c| !c.file.is_empty());
            if let Err(e) = verify_files(&dir, &whole_only, &name, &*self.chunks, true) {
                report.problems.push(FsckProblem {
                    checkpoint: name,
                    component: None,
                    chunk: None,
                    message: e.to_string(),
                });
            }
        }
        report.problems.extend(bad_ids);
        report.chunks_referenced = users.len();
        // Every referenced chunk from the authoritative copy (a packed
        // store reads whole packs), checked as a restore would.
        let ids: Vec<ChunkId> = users.keys().copied().collect();
        let found: std::sync::Mutex<std::collections::HashMap<ChunkId, StoreError>> = Default::default();
        self.chunks.scan_uncached(&ids, &|id, got| {
            let Some((len, who)) = users.get(id) else { return };
            let (checkpoint, component, file) = &who[0];
            let r = ChunkRef { id: id.to_hex(), len: *len };
            let got = std::cell::Cell::new(Some(got));
            let take = |_: &ChunkId| got.take().unwrap_or_else(|| Err(std::io::Error::other("read twice")));
            if let Err(e) = read_chunk_via(take, checkpoint, (component, file), &r) {
                found.lock().unwrap_or_else(|e| e.into_inner()).insert(*id, e);
            }
        });
        let mut found = found.into_inner().unwrap_or_else(|e| e.into_inner());
        for (id, (_, who)) in &users {
            let Some(err) = found.remove(id) else { continue };
            let what = match &err {
                StoreError::ChunkMissing { .. } => "is missing".to_owned(),
                StoreError::ChunkDamaged { problem, .. } => format!("is damaged: {problem}"),
                other => other.to_string(),
            };
            for (checkpoint, component, file) in who {
                report.problems.push(FsckProblem {
                    checkpoint: checkpoint.clone(),
                    component: Some(component.clone()),
                    chunk: Some(id.to_hex()),
                    message: format!("checkpoint {checkpoint}: {component}: file {file}: chunk {id} {what}"),
                });
            }
        }
        let dir = self.root.join(CHUNKS_DIR);
        let stored = self.chunks.list().map_err(|source| StoreError::ChunkIo {
            op: "cannot list chunks",
            path: dir.clone(),
            source,
        })?;
        report.chunks_stored = stored.len();
        for (id, size) in stored {
            report.stored_bytes += size;
            if !users.contains_key(&id) {
                report.orphan_chunks += 1;
                report.orphan_bytes += size;
            }
        }
        info!(
            checkpoints = report.checkpoints,
            problems = report.problems.len(),
            orphans = report.orphan_chunks,
            "fsck done"
        );
        Ok(report)
    }

    /// Removes every chunk no committed manifest references, and what dead
    /// commits left unpublished. Holds the chunk store's exclusive lock
    /// throughout, while a commit holds it shared from its first chunk to
    /// its manifest being in place: so a chunk a running checkpoint has
    /// put or deduplicated against is never removed. Refuses to run if
    /// any committed manifest does not read. Killing it midway leaves only
    /// unreferenced chunks behind.
    ///
    /// A store bound to a bucket collects the bucket, under an exclusive
    /// lease that no commit on any host holds at the same time (waiting up
    /// to [`GC_WAIT`] for running commits), and drops the cache's copies of
    /// what it removed.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lease = match self.remote() {
            Some(r) => {
                let lease = r.lease(LeaseKind::Exclusive, GC_WAIT)?;
                let _lock = self.lock()?;
                self.sync_locked()?;
                Some(lease)
            }
            None => None,
        };
        let _lock = self.chunk_lock(true)?;
        let mut report = GcReport::default();
        let mut live = std::collections::HashSet::new();
        for dir in self.committed_dirs()? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let manifest = load_manifest(&dir)
                .map_err(|e| StoreError::GcUnreadableManifest { checkpoint: name, source: Box::new(e) })?;
            report.checkpoints += 1;
            let refs = manifest
                .components
                .iter()
                .flat_map(|c| c.chunks.iter().flatten())
                .chain(manifest.files.iter().flat_map(|f| f.chunks.iter().flatten()));
            for r in refs {
                if let Some(id) = ChunkId::from_hex(&r.id) {
                    live.insert(id);
                }
            }
        }
        let dir = self.root.join(CHUNKS_DIR);
        let cio = |op| {
            let path = dir.clone();
            move |source| StoreError::ChunkIo { op, path, source }
        };
        report.unpublished_removed =
            self.chunks.remove_unpublished().map_err(cio("cannot remove unpublished chunks"))?;
        let done = self.chunks.collect(&live).map_err(cio("cannot collect chunks"))?;
        report.chunks_kept = done.chunks_kept;
        report.chunks_removed = done.chunks_removed;
        report.bytes_removed = done.bytes_removed;
        report.packs_removed = done.packs_removed;
        report.packs_written = done.packs_written;
        report.bytes_rewritten = done.bytes_rewritten;
        if let Some(cached) = &self.remote {
            // Cached copies of chunks no manifest needs (removed from the
            // bucket now or by a gc elsewhere).
            let cache = cached.cache();
            for (id, _) in cache.list().map_err(cio("cannot list cached chunks"))? {
                if !live.contains(&id) {
                    cache.delete(&id).map_err(cio("cannot delete a cached chunk"))?;
                }
            }
        }
        info!(removed = report.chunks_removed, bytes = report.bytes_removed, kept = report.chunks_kept, "gc done");
        Ok(report)
    }
}
