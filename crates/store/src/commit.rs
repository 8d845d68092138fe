//! Writing a checkpoint: the pending directory and the atomic commit.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::checkpoint::CheckpointInfo;
use crate::chunk::{self, ChunkId, ChunkStorage};
use crate::error::{io_err, StoreError};
use crate::failpoint::failpoint;
use crate::manifest::{
    self, ChunkRef, Component, FileEntry, Manifest, ManifestDraft, FORMAT, MANIFEST_FILE, VERSION,
    VERSION_UNCHUNKED_FILES,
};
use crate::mapped::Mapped;
use crate::owner::StoreLock;
use crate::remote::{LeaseKind, Remote};
use crate::util::{measure_all, par_map, sync_dir, unix_ms};
use crate::{CHUNKS_DIR, IN_BUCKET_FILE, OWNER_FILE};

/// How long a commit waits for a gc elsewhere to finish.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A checkpoint being written: components write their files under
/// [`Pending::path`], then the caller commits or aborts. Dropping it
/// without either aborts.
#[derive(Debug)]
pub struct Pending {
    pub(crate) root: PathBuf,
    pub(crate) chunks: Arc<dyn ChunkStorage>,
    /// The bucket of a remote store: the manifest is committed there.
    pub(crate) remote: Option<Arc<Remote>>,
    pub(crate) dir: PathBuf,
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    pub(crate) index: u64,
    pub(crate) finished: bool,
}

/// Cuts `path` into chunks, putting the new ones into `storage` under
/// transaction `txn`: `(bytes, blake3 of the file, chunk list)`. The file is
/// read whole, cut, then its chunks are hashed, compressed and written
/// several at a time.
fn chunk_file(storage: &dyn ChunkStorage, txn: &str, path: &Path) -> io::Result<(u64, String, Vec<ChunkRef>)> {
    let file = File::open(path)?;
    let mapped = Mapped::of(&file)?;
    let data: &[u8] = &mapped;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let whole = std::thread::scope(|s| {
        // The whole file's digest alongside the cutting and the chunks.
        let whole = s.spawn(|| blake3::hash(data).to_hex().to_string());
        let cuts = chunk::cut_parallel(data, chunk::DEFAULT_CHUNKING, threads);
        // Batches of chunks per task, so threads are not handed 32 KiB at a time.
        let batches: Vec<&[(usize, usize)]> = cuts.chunks(64).collect();
        let ids = par_map(&batches, |batch| -> io::Result<Vec<ChunkRef>> {
            let mut refs = Vec::with_capacity(batch.len());
            for &(at, len) in *batch {
                let piece = &data[at..at + len];
                let id = ChunkId::of(piece);
                if !storage.has(&id)? {
                    storage.put(txn, &id, &chunk::encode(piece))?;
                }
                refs.push(ChunkRef { id: id.to_hex(), len: len as u64 });
            }
            Ok(refs)
        });
        (whole.join().expect("hashing does not panic"), ids)
    });
    let (digest, ids) = whole;
    let mut refs = Vec::new();
    for batch in ids {
        refs.extend(batch?);
    }
    Ok((data.len() as u64, digest, refs))
}

impl Pending {
    /// The checkpoint's id (also its final directory name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its index in the store (1-based, creation order).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Its pending directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a component writes its state file `file` (a plain file name).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub(crate) fn check_draft(&self, draft: &ManifestDraft) -> Result<(), StoreError> {
        let bad = |reason: String| StoreError::BadDraft { checkpoint: self.id.clone(), reason };
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for c in &draft.components {
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                return Err(bad(format!("component name {:?} is empty or repeated", c.name)));
            }
        }
        let all = draft.components.iter().map(|c| &c.file).chain(&draft.files);
        for file in all {
            if !manifest::is_plain_file_name(file) {
                return Err(bad(format!("{file:?} is not a plain file name")));
            }
            if !files.insert(file.as_str()) {
                return Err(bad(format!("file {file:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// Makes the checkpoint durable: cuts every component file into chunks
    /// and puts the new ones into the chunk store (published: durable and
    /// visible), fsyncs and measures every further file, removes the whole
    /// component files, writes `manifest.json` (tmp, fsync, rename), renames
    /// the directory to its id and fsyncs the store. On error nothing is
    /// committed and the pending directory is removed; chunks already put
    /// are unreferenced until `gc` removes them.
    pub fn commit(mut self, draft: ManifestDraft) -> Result<CheckpointInfo, StoreError> {
        self.check_draft(&draft)?;
        let started = Instant::now();
        let chunk_dir = self.root.join(CHUNKS_DIR);
        // Held shared until the manifest is in place, so gc (exclusive)
        // cannot remove a chunk this commit put or deduplicated against.
        let chunk_lock =
            StoreLock::acquire_shared(&chunk_dir).map_err(io_err("cannot lock the chunk store", &chunk_dir))?;
        // A remote store: a shared lease against gc on any host, held to the
        // manifest's commit, and one listing of the bucket's chunks for
        // dedup (`has`), taken under it.
        let _lease = match &self.remote {
            Some(r) => Some(r.lease(LeaseKind::Shared, GC_WAIT)?),
            None => None,
        };
        self.chunks.refresh().map_err(|source| StoreError::ChunkIo {
            op: "cannot list the chunks",
            path: chunk_dir.clone(),
            source,
        })?;
        let file_paths: Vec<PathBuf> = draft.files.iter().map(|f| self.dir.join(f)).collect();
        let mut file_measures = Vec::new();
        for ((file, path), r) in draft.files.iter().zip(&file_paths).zip(measure_all(&file_paths, true)) {
            file_measures.push(r.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    StoreError::FileMissing { checkpoint: self.id.clone(), component: file.clone(), path: path.clone() }
                }
                _ => io_err("cannot fsync and hash", path)(e),
            })?);
        }
        let comp_paths: Vec<PathBuf> = draft.components.iter().map(|c| self.dir.join(&c.file)).collect();
        let txn = self.id.clone();
        let chunking_from = Instant::now();
        let chunked = par_map(&comp_paths, |p| chunk_file(&*self.chunks, &txn, p));
        // A remote store keeps further files (disk overlays, records) as
        // chunks in the bucket too, so a host that lost everything restores
        // from the bucket alone; the whole files stay here as the cache.
        let mut file_chunks: Vec<Option<Vec<ChunkRef>>> = vec![None; file_paths.len()];
        if self.remote.is_some() {
            for (slot, (path, r)) in file_chunks
                .iter_mut()
                .zip(file_paths.iter().zip(par_map(&file_paths, |p| chunk_file(&*self.chunks, &txn, p))))
            {
                let (_, _, refs) = r.map_err(|source| StoreError::ChunkIo {
                    op: "cannot chunk a file into",
                    path: path.clone(),
                    source,
                })?;
                *slot = Some(refs);
            }
        }
        let mut components = Vec::new();
        for ((c, path), r) in draft.components.iter().zip(&comp_paths).zip(chunked) {
            let (bytes, blake3, chunks) = r.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::FileMissing {
                    checkpoint: self.id.clone(),
                    component: c.name.clone(),
                    path: path.clone(),
                },
                _ => {
                    StoreError::ChunkIo { op: "cannot chunk a component file into", path: chunk_dir.clone(), source: e }
                }
            })?;
            components.push(Component {
                name: c.name.clone(),
                kind: c.kind,
                file: c.file.clone(),
                bytes,
                blake3,
                stop_ns: c.stop_ns,
                resume_ns: c.resume_ns,
                frozen_ns: c.frozen_ns,
                save_ns: c.save_ns,
                chunks: Some(chunks),
            });
        }
        let publish_from = Instant::now();
        self.chunks.publish(&txn).map_err(|source| StoreError::ChunkIo {
            op: "cannot publish chunks",
            path: chunk_dir.clone(),
            source,
        })?;
        let chunk_ns = (publish_from - chunking_from).as_nanos() as u64;
        let publish_ns = publish_from.elapsed().as_nanos() as u64;
        failpoint("commit-after-chunks");
        for path in &comp_paths {
            fs::remove_file(path).map_err(io_err("cannot remove the chunked file", path))?;
        }
        let files: Vec<FileEntry> = draft
            .files
            .iter()
            .zip(file_measures)
            .zip(file_chunks)
            .map(|((f, (bytes, blake3)), chunks)| FileEntry { file: f.clone(), bytes, blake3, chunks })
            .collect();
        let mut timings = draft.timings;
        timings.commit_ns = started.elapsed().as_nanos() as u64;
        // The store's own phases: read, cut, hash, compress and write the
        // chunks; make them durable and visible.
        timings.extra.insert("store_chunk_ns".into(), chunk_ns);
        timings.extra.insert("store_publish_ns".into(), publish_ns);
        let mut manifest = Manifest {
            format: FORMAT.to_owned(),
            version: if files.iter().any(|f| f.chunks.is_some()) { VERSION } else { VERSION_UNCHUNKED_FILES },
            id: self.id.clone(),
            name: self.name.clone(),
            index: self.index,
            created_unix_ms: unix_ms(),
            parent: draft.parent,
            experiment: draft.experiment,
            components,
            files,
            freeze: draft.freeze,
            timings,
            checksum: String::new(),
        };
        manifest.seal();

        let tmp = self.dir.join(".manifest.json.tmp");
        let mut out = stasis_core::private::create_file(&tmp).map_err(io_err("cannot create", &tmp))?;
        let mut text = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
        text.push(b'\n');
        out.write_all(&text).and_then(|()| out.sync_all()).map_err(io_err("cannot write", &tmp))?;
        drop(out);
        let final_manifest = self.dir.join(MANIFEST_FILE);
        fs::rename(&tmp, &final_manifest).map_err(io_err("cannot rename the manifest into place", &tmp))?;
        sync_dir(&self.dir)?;

        let target = self.root.join(&self.id);
        if let Some(remote) = self.remote.clone() {
            // The commit point of a remote store: the manifest object.
            failpoint("commit-before-remote-manifest");
            if let Err(e) = remote.commit_manifest(&self.id, text.into()) {
                if matches!(e, crate::remote::RemoteError::ManifestUnsettled { .. }) {
                    self.retract(&remote);
                }
                return Err(e.into());
            }
            failpoint("commit-after-remote-manifest");
            // From here the checkpoint exists whatever happens locally: a
            // local failure only costs the cache (the next listing fetches
            // the manifest back from the bucket).
            let marker = self.dir.join(IN_BUCKET_FILE);
            let local = stasis_core::private::write(&marker, b"")
                .map_err(io_err("cannot write", &marker))
                .and_then(|()| self.rename_into_place(&target));
            drop(chunk_lock);
            if let Err(e) = local {
                warn!(id = %self.id, error = %e, "committed to the bucket, but the local copy failed");
            }
        } else {
            self.rename_into_place(&target)?;
            drop(chunk_lock);
        }
        let info = CheckpointInfo::of(&manifest, target);
        info!(id = %info.id, name = ?info.name, bytes = info.bytes, commit_ns = manifest.timings.commit_ns, "checkpoint committed");
        Ok(info)
    }

    /// After a manifest PUT with an unknown outcome: notes the id (the
    /// next listing deletes the manifest, [`crate::store::RETRACT_PREFIX`])
    /// and tries the deletion now.
    fn retract(&self, remote: &crate::remote::Remote) {
        let marker = self.root.join(format!("{}{}", crate::store::RETRACT_PREFIX, self.id));
        if let Err(e) = stasis_core::private::write(&marker, b"") {
            warn!(id = %self.id, error = %e, path = %marker.display(), "cannot note a failed commit to retract");
        }
        match remote.delete_manifest(&self.id) {
            Ok(()) => {
                let _ = fs::remove_file(&marker);
            }
            Err(e) => debug!(id = %self.id, error = %e, "cannot retract the manifest now; the next listing will"),
        }
    }

    /// Renames the pending directory to `target` under the store's lock and
    /// fsyncs the store directory.
    pub(crate) fn rename_into_place(&mut self, target: &Path) -> Result<(), StoreError> {
        {
            // The owner file names the checkpoint while it is pending, and
            // `begin` checks names under this lock: it goes in the same
            // critical section as the rename, or a writer could take the
            // name in between (seen: two checkpoints both named "same").
            let _lock = StoreLock::acquire(&self.root).map_err(io_err("cannot lock the store", &self.root))?;
            let owner = self.dir.join(OWNER_FILE);
            fs::remove_file(&owner).map_err(io_err("cannot remove", &owner))?;
            fs::rename(&self.dir, target).map_err(io_err("cannot rename the checkpoint into place", &self.dir))?;
        }
        self.finished = true;
        sync_dir(&self.root)
    }

    /// Gives up: removes the pending directory.
    pub fn abort(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // A failed commit may have put chunks it never published.
        if let Err(e) = self.chunks.discard(&self.id) {
            warn!(id = %self.id, error = %e, "cannot discard unpublished chunks (gc removes them)");
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => debug!(id = %self.id, "pending checkpoint removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove a pending checkpoint")
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.remove();
    }
}
