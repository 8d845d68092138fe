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

pub mod manifest;
mod owner;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::{debug, info, warn};

pub use manifest::{
    Component, ComponentDraft, ComponentKind, ExperimentRef, FileEntry, FreezeReport, Manifest,
    ManifestDraft, ManifestVersion, Timings, FORMAT, MANIFEST_FILE, VERSION,
};
use owner::{Owner, StoreLock};

const TMP_PREFIX: &str = ".tmp-";
const OWNER_FILE: &str = ".owner";
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
}

/// A checkpoint being written: components write their files under
/// [`Pending::path`], then the caller commits or aborts. Dropping it
/// without either aborts.
#[derive(Debug)]
pub struct Pending {
    root: PathBuf,
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

/// [`measure`] of every path, several files at a time (one thread per
/// core): hashing is CPU-bound and concurrent fsyncs share journal commits.
fn measure_all(paths: &[PathBuf], sync: bool) -> Vec<io::Result<(u64, String)>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len());
    if threads <= 1 {
        return paths.iter().map(|p| measure(p, sync)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<io::Result<(u64, String)>>> = paths.iter().map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(path) = paths.get(i) else { break };
                let r = measure(path, sync);
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every index measured"))
        .collect()
}

/// Verifies every file a manifest records.
fn verify_files(dir: &Path, manifest: &Manifest, label: &str) -> Result<(), StoreError> {
    // Names and sizes first (cheap), then all digests in parallel.
    let mut paths = Vec::new();
    for (owner, file, bytes, _) in manifest.recorded_files() {
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
    for ((owner, _, _, digest), (path, measured)) in manifest
        .recorded_files()
        .zip(paths.into_iter().zip(digests))
    {
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
    Ok(())
}

impl Store {
    /// Opens (creating if missing) the store at `root` and removes pending
    /// directories left by processes that are gone.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(io_err("cannot create the store", root))?;
        let store = Store {
            root: root.to_path_buf(),
        };
        store.remove_stale()?;
        Ok(store)
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
            if is_dir && !name.to_string_lossy().starts_with('.') {
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
    /// `#3`), an id, or a name: format, version, manifest checksum, and
    /// every file's size and BLAKE3 digest.
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
        verify_files(&dir, &manifest, &info.label())?;
        Ok(Checkpoint {
            info,
            manifest,
            dir,
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

    /// Makes the checkpoint durable: fsyncs and measures every listed file,
    /// writes `manifest.json` (tmp, fsync, rename), renames the directory to
    /// its id and fsyncs the store. On error nothing is committed and the
    /// pending directory is removed.
    pub fn commit(mut self, draft: ManifestDraft) -> Result<CheckpointInfo, StoreError> {
        self.check_draft(&draft)?;
        let started = Instant::now();
        // Every listed file, components first, fsynced and hashed in parallel.
        let owners: Vec<(&str, &str)> = draft
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.file.as_str()))
            .chain(draft.files.iter().map(|f| (f.as_str(), f.as_str())))
            .collect();
        let paths: Vec<PathBuf> = owners.iter().map(|(_, f)| self.dir.join(f)).collect();
        let mut measured = Vec::new();
        for (((owner, _), path), r) in owners.iter().zip(&paths).zip(measure_all(&paths, true)) {
            measured.push(r.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::FileMissing {
                    checkpoint: self.id.clone(),
                    component: (*owner).to_owned(),
                    path: path.clone(),
                },
                _ => io_err("cannot fsync and hash", path)(e),
            })?);
        }
        let mut measured = measured.into_iter();
        let mut components = Vec::new();
        for c in &draft.components {
            let (bytes, blake3) = measured.next().expect("one per component");
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
            });
        }
        let files: Vec<FileEntry> = draft
            .files
            .iter()
            .zip(measured)
            .map(|(f, (bytes, blake3))| FileEntry {
                file: f.clone(),
                bytes,
                blake3,
            })
            .collect();
        let mut timings = draft.timings;
        timings.commit_ns = started.elapsed().as_nanos() as u64;
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
