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

pub mod chunk;
pub mod manifest;
mod owner;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::{debug, info, warn};

pub use chunk::{ChunkDamage, ChunkId, ChunkStorage, Chunking, LocalChunks, MemChunks};
use manifest::ChunkRef;
pub use manifest::{
    Component, ComponentDraft, ComponentKind, ExperimentRef, FileEntry, FreezeReport, Manifest,
    ManifestDraft, ManifestVersion, Timings, FORMAT, MANIFEST_FILE, VERSION,
};
use owner::{Owner, StoreLock};

const TMP_PREFIX: &str = ".tmp-";
const OWNER_FILE: &str = ".owner";
/// The chunk directory inside the store (never a checkpoint id).
pub const CHUNKS_DIR: &str = "chunks";
/// A pending directory without a readable owner is removed once this old.
const STALE_AGE: Duration = Duration::from_secs(60);

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
    BadJson {
        checkpoint: String,
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("checkpoint {checkpoint}: manifest {}: {message}", path.display())]
    BadManifest {
        checkpoint: String,
        path: PathBuf,
        message: String,
    },
    #[error("checkpoint {checkpoint}: not a stasis checkpoint manifest (format {found:?}, expected {FORMAT:?})")]
    WrongFormat { checkpoint: String, found: String },
    #[error("checkpoint {checkpoint}: manifest version {found} is not supported (this build reads {major}.0 to {major}.{minor})", major = VERSION.major, minor = VERSION.minor)]
    UnsupportedVersion {
        checkpoint: String,
        found: ManifestVersion,
    },
    #[error("checkpoint {checkpoint}: manifest checksum mismatch (recorded {recorded}, computed {computed}); the manifest was altered or damaged")]
    ChecksumMismatch {
        checkpoint: String,
        recorded: String,
        computed: String,
    },
    #[error("checkpoint {checkpoint}: manifest says id {found} but the directory is {}", dir.display())]
    IdMismatch {
        checkpoint: String,
        found: String,
        dir: PathBuf,
    },
    #[error("checkpoint {checkpoint}: {component}: file {} is missing", path.display())]
    FileMissing {
        checkpoint: String,
        component: String,
        path: PathBuf,
    },
    #[error("checkpoint {checkpoint}: {component}: file {} has {actual} bytes, the manifest records {recorded}", path.display())]
    FileSize {
        checkpoint: String,
        component: String,
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    #[error("checkpoint {checkpoint}: {component}: file {} has BLAKE3 {actual}, the manifest records {recorded}", path.display())]
    FileDigest {
        checkpoint: String,
        component: String,
        path: PathBuf,
        recorded: String,
        actual: String,
    },
    #[error("checkpoint {checkpoint}: {component}: file {file}: chunk {chunk} is missing")]
    ChunkMissing {
        checkpoint: String,
        component: String,
        file: String,
        chunk: String,
    },
    #[error(
        "checkpoint {checkpoint}: {component}: file {file}: chunk {chunk} is damaged: {problem}"
    )]
    ChunkDamaged {
        checkpoint: String,
        component: String,
        file: String,
        chunk: String,
        problem: String,
    },
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
    #[error("gc refused: the manifest of {checkpoint} does not read, so its chunks are unknown (repair or remove it first)")]
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
    #[error("checkpoint {checkpoint} belongs to experiment {found_name:?} ({found_digest}), not {expected_name:?} ({expected_digest})")]
    ExperimentMismatch {
        checkpoint: String,
        found_name: String,
        found_digest: String,
        expected_name: String,
        expected_digest: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

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
    fn of(manifest: &Manifest, dir: PathBuf) -> CheckpointInfo {
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
    chunks: Arc<dyn ChunkStorage>,
    /// Set by [`Checkpoint::materialized`]: the directory its files are in.
    #[serde(skip)]
    materialized_in: Option<PathBuf>,
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
        self.manifest
            .component(component)
            .is_some_and(|c| c.chunks.is_some())
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
        let Some(c) = self.manifest.component(component) else {
            return Ok(self.file(component));
        };
        let Some(chunks) = &c.chunks else {
            return Ok(self.dir.join(&c.file));
        };
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let target = dir.join(&c.file);
        let tmp = dir.join(format!(".{}.tmp", c.file));
        let out = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
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
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let names: Vec<&str> = self
            .manifest
            .components
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for r in par_map(&names, |name| self.materialize(name, dir)) {
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
            std::os::unix::fs::symlink(self.dir.join(file), &link)
                .map_err(io_err("cannot link", &link))?;
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

/// The checkpoints of one experiment, under `<state_dir>/<experiment>/checkpoints`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    chunks: Arc<dyn ChunkStorage>,
}

/// A held [`Store::gc_lock`]; released on drop.
pub struct GcLock(#[allow(dead_code)] StoreLock);

impl std::fmt::Debug for GcLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GcLock")
    }
}

/// A checkpoint being written: components write their files under
/// [`Pending::path`], then the caller commits or aborts. Dropping it
/// without either aborts.
#[derive(Debug)]
pub struct Pending {
    root: PathBuf,
    chunks: Arc<dyn ChunkStorage>,
    dir: PathBuf,
    id: String,
    name: Option<String>,
    index: u64,
    finished: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync directory", dir))
}

/// The index encoded in a checkpoint id (`0007-1a2b3c4d` → 7).
fn index_of_id(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

fn looks_like_id(name: &str) -> bool {
    match name.split_once('-') {
        Some((index, tag)) => {
            !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && tag.len() == 8
                && tag.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1..=64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if name == "latest" {
        return bad("\"latest\" always means the newest checkpoint");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("a number would be read as a checkpoint index");
    }
    if looks_like_id(name) {
        return bad("looks like a checkpoint id");
    }
    Ok(())
}

/// Reads and checks a manifest: JSON, format, version, checksum, id. Does
/// not look at the component files.
fn load_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let checkpoint = dir_name.clone();
    let path = dir.join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::MissingManifest { checkpoint, path })
        }
        Err(e) => return Err(io_err("cannot read the manifest", &path)(e)),
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadJson {
        checkpoint: checkpoint.clone(),
        path: path.clone(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let format = value.get("format").and_then(Value::as_str).unwrap_or("");
    if format != FORMAT {
        let found = value
            .get("format")
            .map_or_else(|| "none".to_owned(), |f| f.to_string());
        return Err(StoreError::WrongFormat {
            checkpoint,
            found: found.trim_matches('"').to_owned(),
        });
    }
    let version: ManifestVersion = value
        .get("version")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| StoreError::BadManifest {
            checkpoint: checkpoint.clone(),
            path: path.clone(),
            message: "no valid version {major, minor}".into(),
        })?;
    if version.major != VERSION.major || version.minor > VERSION.minor {
        return Err(StoreError::UnsupportedVersion {
            checkpoint,
            found: version,
        });
    }
    let recorded = value
        .get("checksum")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let computed = manifest::checksum_of(&value);
    if recorded != computed {
        return Err(StoreError::ChecksumMismatch {
            checkpoint,
            recorded,
            computed,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| StoreError::BadManifest {
            checkpoint: checkpoint.clone(),
            path: path.clone(),
            message: e.to_string(),
        })?;
    if manifest.id != dir_name {
        return Err(StoreError::IdMismatch {
            checkpoint,
            found: manifest.id,
            dir: dir.to_path_buf(),
        });
    }
    Ok(manifest)
}

/// Size and BLAKE3 (hex) of a file, after fsyncing it when `sync`.
fn measure(path: &Path, sync: bool) -> io::Result<(u64, String)> {
    let file = File::open(path)?;
    if sync {
        file.sync_all()?;
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(io::BufReader::with_capacity(1 << 20, &file))?;
    let bytes = file.metadata()?.len();
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

/// `f` of every item, several at a time (one thread per core): hashing and
/// compressing are CPU-bound and concurrent fsyncs share journal commits.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = items.iter().map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every index mapped"))
        .collect()
}

/// [`measure`] of every path, several files at a time.
fn measure_all(paths: &[PathBuf], sync: bool) -> Vec<io::Result<(u64, String)>> {
    par_map(paths, |p| measure(p, sync))
}

/// Aborts the process at a named point when `STASIS_STORE_FAILPOINT` says
/// so: the crash tests kill a commit or a gc exactly there.
fn failpoint(name: &str) {
    if std::env::var("STASIS_STORE_FAILPOINT").is_ok_and(|v| v == name) {
        warn!(name, "failpoint reached: aborting the process");
        std::process::abort();
    }
}

/// Reads, decodes and checks chunk `r` of component `component`.
fn read_chunk(
    storage: &dyn ChunkStorage,
    label: &str,
    (component, file): (&str, &str),
    r: &ChunkRef,
) -> Result<Vec<u8>, StoreError> {
    let damaged = |problem: String| StoreError::ChunkDamaged {
        checkpoint: label.to_owned(),
        component: component.to_owned(),
        file: file.to_owned(),
        chunk: r.id.clone(),
        problem,
    };
    let id = ChunkId::from_hex(&r.id).ok_or_else(|| damaged("not a chunk id".into()))?;
    let stored = match storage.get(&id) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::ChunkMissing {
                checkpoint: label.to_owned(),
                component: component.to_owned(),
                file: file.to_owned(),
                chunk: r.id.clone(),
            })
        }
        Err(e) => return Err(damaged(format!("cannot read: {e}"))),
    };
    let data = chunk::decode(&id, &stored).map_err(|e| damaged(e.to_string()))?;
    if data.len() as u64 != r.len {
        return Err(damaged(format!(
            "{} bytes, the manifest records {}",
            data.len(),
            r.len
        )));
    }
    Ok(data)
}

/// Streams a chunked component's bytes into `sink`, verifying every chunk
/// and then the whole file's size and BLAKE3.
fn reassemble(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    chunks: &[ChunkRef],
    mut sink: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    // Windows of chunks read and checked several at a time, then consumed in order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for window in chunks.chunks(16 * threads) {
        let batches: Vec<&[ChunkRef]> = window.chunks(16).collect();
        let decoded = par_map(&batches, |batch| {
            batch
                .iter()
                .map(|r| read_chunk(storage, label, (&c.name, &c.file), r))
                .collect::<Result<Vec<_>, _>>()
        });
        for batch in decoded {
            for data in batch? {
                hasher.update(&data);
                total += data.len() as u64;
                sink(&data)?;
            }
        }
    }
    let actual = hasher.finalize().to_hex().to_string();
    if total != c.bytes || actual != c.blake3 {
        return Err(StoreError::Reassembly {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            found: format!("{total} bytes with BLAKE3 {actual}"),
            recorded: format!("{} bytes with BLAKE3 {}", c.bytes, c.blake3),
        });
    }
    Ok(())
}

/// Refuses a chunk list whose lengths do not add up to the recorded size.
fn check_lengths(label: &str, c: &Component, chunks: &[ChunkRef]) -> Result<(), StoreError> {
    let total: u64 = chunks.iter().map(|r| r.len).sum();
    if total != c.bytes {
        return Err(StoreError::Reassembly {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            found: format!("{total} bytes (the chunk lengths)"),
            recorded: format!("{} bytes", c.bytes),
        });
    }
    Ok(())
}

/// Refuses a chunk that is not in `storage` (or is not a chunk id).
fn chunk_exists(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    r: &ChunkRef,
) -> Result<(), StoreError> {
    let id = ChunkId::from_hex(&r.id).ok_or_else(|| StoreError::ChunkDamaged {
        checkpoint: label.to_owned(),
        component: c.name.clone(),
        file: c.file.clone(),
        chunk: r.id.clone(),
        problem: "not a chunk id".into(),
    })?;
    match storage.has(&id) {
        Ok(true) => Ok(()),
        Ok(false) => Err(StoreError::ChunkMissing {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            chunk: r.id.clone(),
        }),
        Err(e) => Err(StoreError::ChunkDamaged {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            chunk: r.id.clone(),
            problem: format!("cannot read: {e}"),
        }),
    }
}

/// Threads that read chunks for a restore: more than the cores, so reads
/// of cold chunks (one small file each) overlap with decoding.
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

/// Writes a chunked component into `out` (at `path`): every chunk read,
/// decoded and checked against its id by several threads, each written at
/// its offset. Stops at the first bad chunk (the one earliest in the file
/// among those found) and returns its error.
fn write_chunks_at(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    chunks: &[ChunkRef],
    out: &File,
    path: &Path,
) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    check_lengths(label, c, chunks)?;
    let mut offsets = Vec::with_capacity(chunks.len());
    let mut at = 0u64;
    for r in chunks {
        offsets.push(at);
        at += r.len;
    }
    out.set_len(at).map_err(io_err("cannot size", path))?;
    const BATCH: usize = 8;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: std::sync::Mutex<Option<(usize, StoreError)>> = std::sync::Mutex::new(None);
    let threads = reader_threads().min(chunks.len().div_ceil(BATCH)).max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let from = next.fetch_add(BATCH, Ordering::Relaxed);
                    if from >= chunks.len() {
                        break;
                    }
                    for i in from..(from + BATCH).min(chunks.len()) {
                        let r = read_chunk(storage, label, (&c.name, &c.file), &chunks[i]).and_then(
                            |data| {
                                out.write_all_at(&data, offsets[i])
                                    .map_err(io_err("cannot write", path))
                            },
                        );
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            let earliest = match slot.as_ref() {
                                Some((j, _)) => i < *j,
                                None => true,
                            };
                            if earliest {
                                *slot = Some((i, e));
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// A file mapped read-only: commit reads state files in place from the page
/// cache (they were just written) instead of copying them into fresh
/// anonymous memory, which costs a page fault and a copy per 4 KiB.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views of it across threads is as safe as sharing a `&[u8]`.
unsafe impl Send for Mapped {}
// SAFETY: as above: only read through shared references.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn of(file: &File) -> io::Result<Mapped> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        if len == 0 {
            return Ok(Mapped { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a fresh private read-only mapping of a file we opened; the
        // result is checked before use. The state files are written by the
        // agent before commit and nothing writes them while it runs (a
        // concurrent writer could change bytes under us, which the chunk
        // ids and the whole-file digest would then simply record; one that
        // truncated the file would fault the process with SIGBUS).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes until `drop` unmaps them.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping `of` created, once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Cuts `path` into chunks, putting the new ones into `storage` under
/// transaction `txn`: `(bytes, blake3 of the file, chunk list)`. The file is
/// read whole, cut, then its chunks are hashed, compressed and written
/// several at a time.
fn chunk_file(
    storage: &dyn ChunkStorage,
    txn: &str,
    path: &Path,
) -> io::Result<(u64, String, Vec<ChunkRef>)> {
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
                refs.push(ChunkRef {
                    id: id.to_hex(),
                    len: len as u64,
                });
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

/// Verifies every file a manifest records.
fn verify_files(
    dir: &Path,
    manifest: &Manifest,
    label: &str,
    storage: &dyn ChunkStorage,
    deep: bool,
) -> Result<(), StoreError> {
    let chunked: std::collections::HashSet<&str> = manifest
        .components
        .iter()
        .filter(|c| c.chunks.is_some())
        .map(|c| c.name.as_str())
        .collect();
    let whole = || {
        manifest.recorded_files().filter(|(owner, file, _, _)| {
            !(chunked.contains(owner) && manifest.component(owner).is_some_and(|c| c.file == *file))
        })
    };
    // Every name must be plain, chunked or not: restore writes it under a directory.
    for (owner, file, _, _) in manifest.recorded_files() {
        if !manifest::is_plain_file_name(file) {
            return Err(StoreError::BadManifest {
                checkpoint: label.to_owned(),
                path: dir.join(MANIFEST_FILE),
                message: format!("{owner}: file {file:?} is not a plain file name"),
            });
        }
    }
    // Names and sizes first (cheap), then all digests in parallel.
    let mut paths = Vec::new();
    for (owner, file, bytes, _) in whole() {
        let path = dir.join(file);
        if !manifest::is_plain_file_name(file) {
            return Err(StoreError::BadManifest {
                checkpoint: label.to_owned(),
                path: dir.join(MANIFEST_FILE),
                message: format!("{owner}: file {file:?} is not a plain file name"),
            });
        }
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::FileMissing {
                    checkpoint: label.to_owned(),
                    component: owner.to_owned(),
                    path,
                })
            }
            Err(e) => return Err(io_err("cannot stat", &path)(e)),
        };
        if size != bytes {
            return Err(StoreError::FileSize {
                checkpoint: label.to_owned(),
                component: owner.to_owned(),
                path,
                recorded: bytes,
                actual: size,
            });
        }
        paths.push(path);
    }
    let digests = measure_all(&paths, false);
    for ((owner, _, _, digest), (path, measured)) in whole().zip(paths.into_iter().zip(digests)) {
        let (_, actual) = measured.map_err(io_err("cannot read", &path))?;
        if actual != digest {
            return Err(StoreError::FileDigest {
                checkpoint: label.to_owned(),
                component: owner.to_owned(),
                path,
                recorded: digest.to_owned(),
                actual,
            });
        }
    }
    // Chunked components: every chunk and the reassembled digest (deep),
    // or that every chunk is there and their lengths add up.
    let chunked: Vec<(&Component, &Vec<ChunkRef>)> = manifest
        .components
        .iter()
        .filter_map(|c| c.chunks.as_ref().map(|ch| (c, ch)))
        .collect();
    if !deep {
        for (c, chunks) in &chunked {
            check_lengths(label, c, chunks)?;
        }
        let mut seen = std::collections::HashSet::new();
        let refs: Vec<(&Component, &ChunkRef)> = chunked
            .iter()
            .flat_map(|(c, ch)| ch.iter().map(move |r| (*c, r)))
            .filter(|(_, r)| seen.insert(r.id.as_str()))
            .collect();
        let batches: Vec<&[(&Component, &ChunkRef)]> = refs.chunks(256).collect();
        for r in par_map(&batches, |batch| {
            batch.iter().try_for_each(|(c, r)| chunk_exists(storage, label, c, r))
        }) {
            r?;
        }
        return Ok(());
    }
    for r in par_map(&chunked, |(c, ch)| {
        reassemble(storage, label, c, ch, |_| Ok(()))
    }) {
        r?;
    }
    Ok(())
}

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
}

impl Store {
    /// Opens (creating if missing) the store at `root` and removes pending
    /// directories left by processes that are gone.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let dir = root.join(CHUNKS_DIR);
        let local =
            LocalChunks::open(&dir).map_err(io_err("cannot create the chunk store", &dir))?;
        Store::open_with(root, Arc::new(local))
    }

    /// [`Store::open`] with chunks kept in `chunks` instead of the local
    /// `<root>/chunks/`. The commit/gc lock is still the flock of
    /// `<root>/chunks/`, so gc is safe against commits of this host only.
    pub fn open_with(root: &Path, chunks: Arc<dyn ChunkStorage>) -> Result<Store, StoreError> {
        let dir = root.join(CHUNKS_DIR);
        fs::create_dir_all(&dir).map_err(io_err("cannot create the store", &dir))?;
        let store = Store {
            root: root.to_path_buf(),
            chunks,
        };
        store.remove_stale()?;
        Ok(store)
    }

    /// The chunk storage.
    pub fn chunks(&self) -> &Arc<dyn ChunkStorage> {
        &self.chunks
    }

    fn chunk_lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let dir = self.root.join(CHUNKS_DIR);
        let lock = if exclusive {
            StoreLock::acquire(&dir)
        } else {
            StoreLock::acquire_shared(&dir)
        };
        lock.map_err(io_err("cannot lock the chunk store", &dir))
    }

    /// The lock [`Store::gc`] takes exclusively and a commit takes shared,
    /// for collectors of things kept beside the store (the VMs' qcow2 disk
    /// images): hold it exclusive while collecting, shared while creating or
    /// switching images that no record names yet. Shared holders do not
    /// exclude each other (a commit inside a shared holder is fine); never
    /// call [`Store::gc`] while holding it.
    pub fn gc_lock(&self, exclusive: bool) -> Result<GcLock, StoreError> {
        self.chunk_lock(exclusive).map(GcLock)
    }

    /// Paths of the pending (uncommitted) checkpoint directories, whatever
    /// their owner: what a collector of outside files must treat as live.
    pub fn pending_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        Ok(self.pendings()?.into_iter().map(|(d, _)| d).collect())
    }

    /// Checks everything: every committed manifest (format, version,
    /// checksum), every whole file, every referenced chunk (present,
    /// decodes, hashes to its id, has the recorded length) once however
    /// many checkpoints share it, and counts chunks nothing references.
    /// Reports every problem instead of stopping at the first.
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        let _lock = self.chunk_lock(false)?;
        let mut report = FsckReport::default();
        let mut users: std::collections::BTreeMap<ChunkId, (u64, Vec<ChunkUser>)> =
            Default::default();
        let mut bad_ids = Vec::new();
        for dir in self.committed_dirs()? {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
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
                        report.problems.push(FsckProblem { checkpoint: name.clone(), component: Some(c.name.clone()), chunk: None,
                            message: format!("checkpoint {name}: {}: chunks add up to {sum} bytes, the manifest records {}", c.name, c.bytes) });
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
                                message: format!(
                                    "checkpoint {name}: {}: {:?} is not a chunk id",
                                    c.name, r.id
                                ),
                            }),
                        }
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
        let entries: Vec<(&ChunkId, &(u64, Vec<ChunkUser>))> = users.iter().collect();
        let checked = par_map(&entries, |(id, (len, who))| {
            let (checkpoint, component, file) = &who[0];
            let r = ChunkRef {
                id: id.to_hex(),
                len: *len,
            };
            read_chunk(&*self.chunks, checkpoint, (component, file), &r).err()
        });
        for ((id, (_, who)), err) in entries.iter().zip(checked) {
            let Some(err) = err else { continue };
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
                    message: format!(
                        "checkpoint {checkpoint}: {component}: file {file}: chunk {id} {what}"
                    ),
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
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lock = self.chunk_lock(true)?;
        let mut report = GcReport::default();
        let mut live = std::collections::HashSet::new();
        for dir in self.committed_dirs()? {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let manifest = load_manifest(&dir).map_err(|e| StoreError::GcUnreadableManifest {
                checkpoint: name,
                source: Box::new(e),
            })?;
            report.checkpoints += 1;
            for c in &manifest.components {
                for r in c.chunks.iter().flatten() {
                    if let Some(id) = ChunkId::from_hex(&r.id) {
                        live.insert(id);
                    }
                }
            }
        }
        let dir = self.root.join(CHUNKS_DIR);
        let cio = |op| {
            let path = dir.clone();
            move |source| StoreError::ChunkIo { op, path, source }
        };
        report.unpublished_removed = self
            .chunks
            .remove_unpublished()
            .map_err(cio("cannot remove unpublished chunks"))?;
        for (id, size) in self.chunks.list().map_err(cio("cannot list chunks"))? {
            if live.contains(&id) {
                report.chunks_kept += 1;
                continue;
            }
            self.chunks
                .delete(&id)
                .map_err(cio("cannot delete a chunk"))?;
            report.chunks_removed += 1;
            report.bytes_removed += size;
            failpoint("gc-after-first-delete");
        }
        info!(
            removed = report.chunks_removed,
            bytes = report.bytes_removed,
            kept = report.chunks_kept,
            "gc done"
        );
        Ok(report)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> Result<StoreLock, StoreError> {
        StoreLock::acquire(&self.root).map_err(io_err("cannot lock the store", &self.root))
    }

    /// Pending directories with their owners (`None`: unreadable owner).
    fn pendings(&self) -> Result<Vec<(PathBuf, Option<Owner>)>, StoreError> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.root).map_err(io_err("cannot list the store", &self.root))?
        {
            let entry = entry.map_err(io_err("cannot list the store", &self.root))?;
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let dir = entry.path();
            let owner = fs::read(dir.join(OWNER_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Owner>(&b).ok());
            out.push((dir, owner));
        }
        Ok(out)
    }

    /// Pids of the live processes with a checkpoint pending in this store
    /// (a `stasis checkpoint` still at work).
    pub fn checkpoints_in_progress(&self) -> Result<Vec<u32>, StoreError> {
        Ok(self.pendings()?.into_iter().filter_map(|(_, o)| o.filter(Owner::alive).map(|o| o.pid)).collect())
    }

    /// Removes `.tmp-*` directories whose owner process is gone, or that
    /// have no readable owner and are older than a minute. A pending
    /// directory of a live process is never touched, however old.
    fn remove_stale(&self) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        for (dir, owner) in self.pendings()? {
            let stale = match &owner {
                Some(o) => !o.alive(),
                None => fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_AGE),
            };
            if stale {
                info!(dir = %dir.display(), owner = ?owner, "removing an abandoned pending checkpoint");
                fs::remove_dir_all(&dir)
                    .map_err(io_err("cannot remove a stale pending checkpoint", &dir))?;
            }
        }
        Ok(())
    }

    /// Committed checkpoint directories (names not starting with '.').
    fn committed_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut dirs = Vec::new();
        for entry in
            fs::read_dir(&self.root).map_err(io_err("cannot list the store", &self.root))?
        {
            let entry = entry.map_err(io_err("cannot list the store", &self.root))?;
            let name = entry.file_name();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir && !name.to_string_lossy().starts_with('.') && name != CHUNKS_DIR {
                dirs.push(entry.path());
            }
        }
        dirs.sort();
        Ok(dirs)
    }

    /// Committed checkpoints whose manifest reads and checks, in creation
    /// order. Damaged ones are skipped with a warning (opening one by id
    /// reports what is wrong).
    pub fn list(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let mut infos = Vec::new();
        for dir in self.committed_dirs()? {
            match load_manifest(&dir) {
                Ok(m) => infos.push(CheckpointInfo::of(&m, dir)),
                Err(e) => warn!(error = %e, "skipping a damaged checkpoint"),
            }
        }
        infos.sort_by(|a, b| {
            (a.index, a.created_unix_ms, &a.id).cmp(&(b.index, b.created_unix_ms, &b.id))
        });
        Ok(infos)
    }

    /// Starts a checkpoint: allocates the next index and a fresh id and
    /// makes its pending directory. Refuses a name already taken by a
    /// committed or pending checkpoint.
    pub fn begin(&self, name: Option<&str>) -> Result<Pending, StoreError> {
        if let Some(n) = name {
            check_name(n)?;
        }
        let _lock = self.lock()?;
        let committed = self.list()?;
        let pendings = self.pendings()?;
        if let Some(n) = name {
            if let Some(c) = committed.iter().find(|c| c.name.as_deref() == Some(n)) {
                return Err(StoreError::DuplicateName {
                    name: n.to_owned(),
                    existing: c.id.clone(),
                });
            }
            if let Some((dir, _)) = pendings.iter().find(|(_, o)| {
                o.as_ref()
                    .is_some_and(|o| o.name.as_deref() == Some(n) && o.alive())
            }) {
                return Err(StoreError::DuplicateName {
                    name: n.to_owned(),
                    existing: format!("being written in {}", dir.display()),
                });
            }
        }
        let dir_indices = self
            .committed_dirs()?
            .into_iter()
            .chain(pendings.iter().map(|(d, _)| d.clone()))
            .filter_map(|d| {
                let name = d.file_name()?.to_string_lossy().into_owned();
                index_of_id(name.strip_prefix(TMP_PREFIX).unwrap_or(&name))
            });
        let index = committed
            .iter()
            .map(|c| c.index)
            .chain(dir_indices)
            .max()
            .unwrap_or(0)
            + 1;
        let mut seed = blake3::Hasher::new();
        seed.update(&std::process::id().to_le_bytes());
        seed.update(&index.to_le_bytes());
        seed.update(format!("{:?}{:?}", SystemTime::now(), Instant::now()).as_bytes());
        seed.update(self.root.as_os_str().as_encoded_bytes());
        let id = format!("{index:04}-{}", &seed.finalize().to_hex()[..8]);
        let dir = self.root.join(format!("{TMP_PREFIX}{id}"));
        fs::create_dir(&dir).map_err(io_err("cannot create the pending checkpoint", &dir))?;
        let owner = Owner::me(name.map(str::to_owned), index);
        let owner_path = dir.join(OWNER_FILE);
        let pending = Pending {
            root: self.root.clone(),
            chunks: self.chunks.clone(),
            dir,
            id,
            name: name.map(str::to_owned),
            index,
            finished: false,
        };
        fs::write(
            &owner_path,
            serde_json::to_vec(&owner).expect("owner serialises"),
        )
        .map_err(io_err("cannot write", &owner_path))?;
        debug!(id = %pending.id, "checkpoint begun");
        Ok(pending)
    }

    /// Opens and verifies a checkpoint given as `latest`, an index (`3` or
    /// `#3`), an id, or a name: format, version, manifest checksum, every
    /// whole file's size and BLAKE3 digest, and that every chunk exists.
    /// Chunk contents are checked where they are read: by
    /// [`Checkpoint::materialized`] (a restore), [`Checkpoint::verify`] and
    /// [`Store::fsck`] — so a restore reads each chunk once.
    pub fn open_checkpoint(&self, which: &str) -> Result<Checkpoint, StoreError> {
        let infos = self.list()?;
        let unknown = || {
            let known: Vec<String> = infos
                .iter()
                .map(|i| format!("#{} {}", i.index, i.label()))
                .collect();
            StoreError::UnknownCheckpoint {
                which: which.to_owned(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            }
        };
        let dir = if which == "latest" {
            infos.last().map(|i| i.dir.clone()).ok_or_else(unknown)?
        } else if let Some(index) = which
            .strip_prefix('#')
            .unwrap_or(which)
            .parse::<u64>()
            .ok()
            .filter(|_| {
                which
                    .trim_start_matches('#')
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
        {
            // Damaged checkpoints count too, so asking for one by index
            // reports what is wrong with it rather than "unknown".
            match infos.iter().find(|i| i.index == index) {
                Some(i) => i.dir.clone(),
                None => self
                    .committed_dirs()?
                    .into_iter()
                    .find(|d| {
                        d.file_name()
                            .and_then(|n| index_of_id(&n.to_string_lossy()))
                            == Some(index)
                    })
                    .ok_or_else(unknown)?,
            }
        } else if !which.is_empty()
            && which != CHUNKS_DIR
            && !which.starts_with('.')
            && !which.contains('/')
            && self.root.join(which).is_dir()
        {
            self.root.join(which)
        } else {
            infos
                .iter()
                .find(|i| i.name.as_deref() == Some(which))
                .map(|i| i.dir.clone())
                .ok_or_else(unknown)?
        };
        let manifest = load_manifest(&dir)?;
        let info = CheckpointInfo::of(&manifest, dir.clone());
        verify_files(&dir, &manifest, &info.label(), &*self.chunks, false)?;
        Ok(Checkpoint {
            info,
            manifest,
            dir,
            chunks: self.chunks.clone(),
            materialized_in: None,
        })
    }
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

    fn check_draft(&self, draft: &ManifestDraft) -> Result<(), StoreError> {
        let bad = |reason: String| StoreError::BadDraft {
            checkpoint: self.id.clone(),
            reason,
        };
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for c in &draft.components {
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                return Err(bad(format!(
                    "component name {:?} is empty or repeated",
                    c.name
                )));
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
        let chunk_lock = StoreLock::acquire_shared(&chunk_dir)
            .map_err(io_err("cannot lock the chunk store", &chunk_dir))?;
        let file_paths: Vec<PathBuf> = draft.files.iter().map(|f| self.dir.join(f)).collect();
        let mut file_measures = Vec::new();
        for ((file, path), r) in draft
            .files
            .iter()
            .zip(&file_paths)
            .zip(measure_all(&file_paths, true))
        {
            file_measures.push(r.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::FileMissing {
                    checkpoint: self.id.clone(),
                    component: file.clone(),
                    path: path.clone(),
                },
                _ => io_err("cannot fsync and hash", path)(e),
            })?);
        }
        let comp_paths: Vec<PathBuf> = draft
            .components
            .iter()
            .map(|c| self.dir.join(&c.file))
            .collect();
        let txn = self.id.clone();
        let chunking_from = Instant::now();
        let chunked = par_map(&comp_paths, |p| chunk_file(&*self.chunks, &txn, p));
        let mut components = Vec::new();
        for ((c, path), r) in draft.components.iter().zip(&comp_paths).zip(chunked) {
            let (bytes, blake3, chunks) = r.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::FileMissing {
                    checkpoint: self.id.clone(),
                    component: c.name.clone(),
                    path: path.clone(),
                },
                _ => StoreError::ChunkIo {
                    op: "cannot chunk a component file into",
                    path: chunk_dir.clone(),
                    source: e,
                },
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
        self.chunks
            .publish(&txn)
            .map_err(|source| StoreError::ChunkIo {
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
            .map(|(f, (bytes, blake3))| FileEntry {
                file: f.clone(),
                bytes,
                blake3,
            })
            .collect();
        let mut timings = draft.timings;
        timings.commit_ns = started.elapsed().as_nanos() as u64;
        // The store's own phases: read, cut, hash, compress and write the
        // chunks; make them durable and visible.
        timings.extra.insert("store_chunk_ns".into(), chunk_ns);
        timings.extra.insert("store_publish_ns".into(), publish_ns);
        let mut manifest = Manifest {
            format: FORMAT.to_owned(),
            version: VERSION,
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
        let mut out = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        out.write_all(&serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises"))
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.sync_all())
            .map_err(io_err("cannot write", &tmp))?;
        drop(out);
        let final_manifest = self.dir.join(MANIFEST_FILE);
        fs::rename(&tmp, &final_manifest)
            .map_err(io_err("cannot rename the manifest into place", &tmp))?;
        let owner = self.dir.join(OWNER_FILE);
        fs::remove_file(&owner).map_err(io_err("cannot remove", &owner))?;
        sync_dir(&self.dir)?;

        let target = self.root.join(&self.id);
        {
            let _lock = StoreLock::acquire(&self.root)
                .map_err(io_err("cannot lock the store", &self.root))?;
            fs::rename(&self.dir, &target)
                .map_err(io_err("cannot rename the checkpoint into place", &self.dir))?;
        }
        self.finished = true;
        sync_dir(&self.root)?;
        drop(chunk_lock);
        let info = CheckpointInfo::of(&manifest, target);
        info!(id = %info.id, name = ?info.name, bytes = info.bytes, commit_ns = manifest.timings.commit_ns, "checkpoint committed");
        Ok(info)
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
