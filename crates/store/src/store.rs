//! The store: opening it, listing, beginning and opening checkpoints.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::checkpoint::{Checkpoint, CheckpointInfo};
use crate::chunk::{ChunkStorage, LocalChunks};
use crate::commit::Pending;
use crate::error::{io_err, StoreError};
use crate::names::{check_name, index_of_id, looks_like_id};
use crate::owner::{Owner, StoreLock};
use crate::remote::{CachedChunks, Remote, RemoteConfig};
use crate::retention::{plan_retention, Retention};
use crate::verify::{load_manifest, verify_files};
use crate::{CHUNKS_DIR, IN_BUCKET_FILE, OWNER_FILE, STALE_AGE, TMP_PREFIX};

/// Prefix of a directory a manifest is being fetched into from the bucket.
const FETCH_PREFIX: &str = ".fetch-";
/// Prefix of a checkpoint directory being deleted: renamed to
/// `.trash-<id>-<token>` first (the local deletion's commit point: from then
/// on it is neither listed nor opened), removed after; a leftover of an
/// interrupted deletion is removed when the store opens.
const TRASH_PREFIX: &str = ".trash-";
/// Marks a checkpoint fetched from the bucket with a further file whose
/// chunks did not read then (a pack briefly unreachable, or lost until a
/// gc recovered it): the next listing fetches it again.
const INCOMPLETE_FILE: &str = ".incomplete";
/// Prefix of a file naming a checkpoint whose manifest PUT failed with an
/// unknown outcome ([`crate::remote::RemoteError::ManifestUnsettled`]):
/// its manifest is deleted from the bucket at the next listing that
/// reaches it, so a commit reported failed never turns into a checkpoint.
pub(crate) const RETRACT_PREFIX: &str = ".retract-";

/// The checkpoints of one experiment, under `<state_dir>/<experiment>/checkpoints`.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) chunks: Arc<dyn ChunkStorage>,
    /// Set when the store is bound to a bucket: `chunks` is this too.
    pub(crate) remote: Option<Arc<CachedChunks>>,
}

/// A held [`Store::gc_lock`]; released on drop.
pub struct GcLock(#[allow(dead_code)] StoreLock);

impl std::fmt::Debug for GcLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GcLock")
    }
}

impl Store {
    /// Opens (creating if missing) the store at `root` and removes pending
    /// directories left by processes that are gone. A store bound to a
    /// bucket (`<root>/.remote.toml`, [`Store::bind_remote`]) opens its
    /// bucket first — endpoint, credentials and bucket are checked here,
    /// before any caller freezes anything — and `root` becomes its cache.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        match RemoteConfig::load(root)? {
            None => {
                let dir = root.join(CHUNKS_DIR);
                let local = LocalChunks::open(&dir).map_err(io_err("cannot create the chunk store", &dir))?;
                Store::open_with(root, Arc::new(local))
            }
            Some(cfg) => Store::open_remote(root, Arc::new(Remote::open(&cfg)?)),
        }
    }

    /// Binds the store at `root` to the bucket of `cfg` (checked first) and
    /// opens it; later [`Store::open`]s of `root` use the bucket.
    pub fn bind_remote(root: &Path, cfg: &RemoteConfig) -> Result<Store, StoreError> {
        let remote = Arc::new(Remote::open(cfg)?);
        stasis_core::private::create_dir_all(root).map_err(io_err("cannot create the store", root))?;
        cfg.save(root)?;
        Store::open_remote(root, remote)
    }

    /// The store at `root` as the cache of `remote`'s bucket.
    pub fn open_remote(root: &Path, remote: Arc<Remote>) -> Result<Store, StoreError> {
        let dir = root.join(CHUNKS_DIR);
        let local = LocalChunks::open(&dir).map_err(io_err("cannot create the chunk store", &dir))?;
        let cached = Arc::new(CachedChunks::new(local, remote).map_err(io_err("cannot create the pack cache", &dir))?);
        let mut store = Store::open_with(root, cached.clone())?;
        store.remote = Some(cached);
        Ok(store)
    }

    /// The bucket, for a store bound to one.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref().map(|c| c.remote())
    }

    /// [`Store::open`] with chunks kept in `chunks` instead of the local
    /// `<root>/chunks/`. The commit/gc lock is still the flock of
    /// `<root>/chunks/`, so gc is safe against commits of this host only.
    pub fn open_with(root: &Path, chunks: Arc<dyn ChunkStorage>) -> Result<Store, StoreError> {
        let dir = root.join(CHUNKS_DIR);
        stasis_core::private::create_dir_all(&dir).map_err(io_err("cannot create the store", &dir))?;
        let store = Store { root: root.to_path_buf(), chunks, remote: None };
        store.remove_stale()?;
        Ok(store)
    }

    /// The chunk storage.
    pub fn chunks(&self) -> &Arc<dyn ChunkStorage> {
        &self.chunks
    }

    pub(crate) fn chunk_lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let dir = self.root.join(CHUNKS_DIR);
        let lock = if exclusive { StoreLock::acquire(&dir) } else { StoreLock::acquire_shared(&dir) };
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
    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn lock(&self) -> Result<StoreLock, StoreError> {
        StoreLock::acquire(&self.root).map_err(io_err("cannot lock the store", &self.root))
    }

    /// The entries of the store directory whose names start with `prefix`.
    pub(crate) fn entries_with_prefix(&self, prefix: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("cannot list the store", &self.root))? {
            let entry = entry.map_err(io_err("cannot list the store", &self.root))?;
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    /// Pending directories with their owners (`None`: unreadable owner).
    fn pendings(&self) -> Result<Vec<(PathBuf, Option<Owner>)>, StoreError> {
        Ok(self
            .entries_with_prefix(TMP_PREFIX)?
            .into_iter()
            .map(|dir| {
                let owner = fs::read(dir.join(OWNER_FILE)).ok().and_then(|b| serde_json::from_slice::<Owner>(&b).ok());
                (dir, owner)
            })
            .collect())
    }

    /// Pids of the live processes with a checkpoint pending in this store
    /// (a `stasis checkpoint` still at work).
    pub fn checkpoints_in_progress(&self) -> Result<Vec<u32>, StoreError> {
        Ok(self.pendings()?.into_iter().filter_map(|(_, o)| o.filter(Owner::alive).map(|o| o.pid)).collect())
    }

    /// Removes what interrupted deletions left (`.trash-*`: every deletion
    /// renames and removes under the store lock, held here, so none is in
    /// progress) and `.tmp-*` directories whose owner process is gone, or
    /// that have no readable owner and are older than a minute. A pending
    /// directory of a live process is never touched, however old.
    fn remove_stale(&self) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        for trash in self.entries_with_prefix(TRASH_PREFIX)? {
            info!(dir = %trash.display(), "removing what an interrupted checkpoint deletion left");
            fs::remove_dir_all(&trash).map_err(io_err("cannot remove", &trash))?;
        }
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
                fs::remove_dir_all(&dir).map_err(io_err("cannot remove a stale pending checkpoint", &dir))?;
            }
        }
        Ok(())
    }

    /// Committed checkpoint directories (names not starting with '.').
    pub(crate) fn committed_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("cannot list the store", &self.root))? {
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
        if self.remote.is_some() {
            let _lock = self.lock()?;
            self.sync_locked()?;
        }
        self.list_local()
    }

    /// Brings the local catalogue in line with the bucket (call with the
    /// store lock held): manifests committed elsewhere are fetched (with
    /// their further files, reassembled), checkpoints deleted from the
    /// bucket are removed here. Checkpoints that were never in the bucket
    /// (taken before the store was bound) stay as they are.
    pub(crate) fn sync_locked(&self) -> Result<(), StoreError> {
        let Some(cached) = &self.remote else {
            return Ok(());
        };
        let remote = cached.remote();
        let unsettled = self.retract_unsettled(remote)?;
        let ids: std::collections::BTreeSet<String> = remote
            .manifest_ids()?
            .into_iter()
            .filter(|id| !unsettled.contains(id))
            .filter(|id| {
                let ok = looks_like_id(id);
                if !ok {
                    warn!(key = %id, bucket = %remote.bucket(), "ignoring an object under checkpoints/ that is not a checkpoint id");
                }
                ok
            })
            .collect();
        for p in self.entries_with_prefix(FETCH_PREFIX)? {
            fs::remove_dir_all(&p).map_err(io_err("cannot remove", &p))?;
        }
        let mut local = std::collections::BTreeSet::new();
        for dir in self.committed_dirs()? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !ids.contains(&name) && dir.join(IN_BUCKET_FILE).exists() {
                info!(checkpoint = %name, bucket = %remote.bucket(), "checkpoint deleted from the bucket; removing its local copy");
                self.remove_checkpoint_dir(&dir)?;
                continue;
            }
            if dir.join(INCOMPLETE_FILE).exists() && dir.join(IN_BUCKET_FILE).exists() {
                debug!(checkpoint = %name, "fetching a checkpoint again whose files were incomplete");
                self.remove_checkpoint_dir(&dir)?;
                continue;
            }
            local.insert(name);
        }
        for id in ids.difference(&local) {
            self.fetch_checkpoint(id)?;
        }
        Ok(())
    }

    /// Deletes from the bucket the manifest of every commit of this store
    /// that failed with an unknown outcome (see [`RETRACT_PREFIX`]), and
    /// returns the ids it could not delete yet (they are not listed).
    fn retract_unsettled(&self, remote: &Remote) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let mut left = std::collections::BTreeSet::new();
        for marker in self.entries_with_prefix(RETRACT_PREFIX)? {
            let name = marker.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Some(id) = name.strip_prefix(RETRACT_PREFIX) else { continue };
            match remote.delete_manifest(id) {
                Ok(()) => {
                    info!(checkpoint = %id, bucket = %remote.bucket(), "retracted the manifest of a commit that had failed");
                    fs::remove_file(&marker).map_err(io_err("cannot remove", &marker))?;
                }
                Err(e) => {
                    debug!(checkpoint = %id, error = %e, "cannot retract a failed commit's manifest yet");
                    left.insert(id.to_owned());
                }
            }
        }
        Ok(left)
    }

    /// Fetches checkpoint `id`'s manifest from the bucket into a local
    /// directory, with its further files reassembled from their chunks. A
    /// manifest that does not check is kept as it is (listing skips it,
    /// opening and fsck report it); a file whose chunks do not read stays
    /// absent (opening reports it, fsck names the chunk) and the next
    /// listing tries again.
    fn fetch_checkpoint(&self, id: &str) -> Result<(), StoreError> {
        let cached = self.remote.as_ref().expect("only called for remote stores");
        let bytes = match cached.remote().manifest(id) {
            // Listed but gone: deleted since the listing, or a write that
            // missed its quorum and is not settled yet (a later listing
            // sees what it became).
            Err(e) if e.is_not_found() => {
                debug!(checkpoint = %id, "a listed manifest is not there; skipping it");
                return Ok(());
            }
            r => r?,
        };
        let tmp = self.root.join(format!("{FETCH_PREFIX}{id}"));
        let tmp_named = tmp.join(id);
        stasis_core::private::create_dir_all(&tmp_named).map_err(io_err("cannot create", &tmp_named))?;
        let mpath = tmp_named.join(crate::MANIFEST_FILE);
        stasis_core::private::write(&mpath, &bytes).map_err(io_err("cannot write", &mpath))?;
        stasis_core::private::write(&tmp_named.join(IN_BUCKET_FILE), b"")
            .map_err(io_err("cannot write", &tmp_named))?;
        match load_manifest(&tmp_named) {
            Ok(m) => {
                let ids: Vec<crate::chunk::ChunkId> = m
                    .files
                    .iter()
                    .flat_map(|f| f.chunks.iter().flatten())
                    .filter_map(|r| crate::chunk::ChunkId::from_hex(&r.id))
                    .collect();
                self.chunks.prefetch(&ids);
                for f in &m.files {
                    let Some(chunks) = &f.chunks else { continue };
                    if !crate::manifest::is_plain_file_name(&f.file) {
                        continue;
                    }
                    let c = crate::manifest::Component {
                        name: f.file.clone(),
                        file: f.file.clone(),
                        bytes: f.bytes,
                        blake3: f.blake3.clone(),
                        ..Default::default()
                    };
                    let out = tmp_named.join(&f.file);
                    let file = stasis_core::private::create_file(&out).map_err(io_err("cannot create", &out))?;
                    if let Err(e) = crate::restore::write_chunks_at(&*self.chunks, id, &c, chunks, &file, &out) {
                        warn!(checkpoint = %id, file = %f.file, error = %e, "cannot fetch a file of a checkpoint");
                        drop(file);
                        let _ = fs::remove_file(&out);
                        let marker = tmp_named.join(INCOMPLETE_FILE);
                        stasis_core::private::write(&marker, b"").map_err(io_err("cannot write", &marker))?;
                    }
                }
            }
            Err(e) => warn!(checkpoint = %id, error = %e, "the bucket holds a manifest that does not check"),
        }
        let target = self.root.join(id);
        fs::rename(&tmp_named, &target).map_err(io_err("cannot rename into place", &tmp_named))?;
        let _ = fs::remove_dir_all(&tmp);
        debug!(checkpoint = %id, "fetched from the bucket");
        Ok(())
    }

    /// Deletes checkpoint `which` (as [`Store::open_checkpoint`] names
    /// them): from the bucket first (the deletion's commit point), then
    /// here. Its chunks stay until [`Store::gc`].
    pub fn delete_checkpoint(&self, which: &str) -> Result<CheckpointInfo, StoreError> {
        let _lock = self.lock()?;
        self.sync_locked()?;
        let infos = self.list_local()?;
        let dir = self.resolve(which, &infos)?;
        let manifest = load_manifest(&dir)?;
        let info = CheckpointInfo::of(&manifest, dir.clone());
        if let Some(r) = self.remote() {
            r.delete_manifest(&info.id)?;
        }
        self.remove_checkpoint_dir(&dir)?;
        info!(checkpoint = %info.label(), "checkpoint deleted");
        Ok(info)
    }

    /// Removes the committed checkpoint directory `dir` (call with the store
    /// lock held) so that an interruption never leaves a half-removed one
    /// that lists or opens as damaged: it is renamed to a trash name and the
    /// store directory fsynced (the commit point), then removed. A trash
    /// directory that cannot be removed now is removed at the next open.
    fn remove_checkpoint_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let token = format!("{:x}-{:x}", std::process::id(), crate::util::unix_ms());
        let trash = self.root.join(format!("{TRASH_PREFIX}{name}-{token}"));
        fs::rename(dir, &trash).map_err(io_err("cannot move to the trash", dir))?;
        crate::util::sync_dir(&self.root)?;
        crate::failpoint::failpoint("delete-after-trash-rename");
        if let Err(e) = fs::remove_dir_all(&trash) {
            warn!(dir = %trash.display(), error = %e, "cannot remove a deleted checkpoint's files yet; the next open removes them");
        }
        Ok(())
    }

    /// Applies a retention policy ([`plan_retention`]): deletes the
    /// checkpoints it does not keep, never one in `protect` (e.g. the one a
    /// recovery restores from) nor the newest. Returns what it deleted.
    pub fn prune(&self, policy: &Retention, protect: &[&str]) -> Result<Vec<CheckpointInfo>, StoreError> {
        let infos = self.list()?;
        let doomed = plan_retention(&infos, policy, protect)?;
        let mut out = Vec::new();
        for id in doomed {
            out.push(self.delete_checkpoint(&id)?);
        }
        Ok(out)
    }

    /// [`Store::list`] without looking at the bucket.
    pub(crate) fn list_local(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let mut infos = Vec::new();
        for dir in self.committed_dirs()? {
            match load_manifest(&dir) {
                Ok(m) => infos.push(CheckpointInfo::of(&m, dir)),
                Err(e) => warn!(error = %e, "skipping a damaged checkpoint"),
            }
        }
        infos.sort_by(|a, b| (a.index, a.created_unix_ms, &a.id).cmp(&(b.index, b.created_unix_ms, &b.id)));
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
        self.sync_locked()?;
        let committed = self.list_local()?;
        let pendings = self.pendings()?;
        let sealed = self.sealed()?;
        if let Some(n) = name {
            if let Some(c) = committed.iter().find(|c| c.name.as_deref() == Some(n)) {
                return Err(StoreError::DuplicateName { name: n.to_owned(), existing: c.id.clone() });
            }
            if let Some(s) = sealed.iter().find(|s| s.name() == Some(n)) {
                return Err(StoreError::DuplicateName {
                    name: n.to_owned(),
                    existing: format!("sealed, not yet committed, in {}", s.dir().display()),
                });
            }
            if let Some((dir, _)) =
                pendings.iter().find(|(_, o)| o.as_ref().is_some_and(|o| o.name.as_deref() == Some(n) && o.alive()))
            {
                return Err(StoreError::DuplicateName {
                    name: n.to_owned(),
                    existing: format!("being written in {}", dir.display()),
                });
            }
        }
        let dir_indices =
            self.committed_dirs()?.into_iter().chain(pendings.iter().map(|(d, _)| d.clone())).filter_map(|d| {
                let name = d.file_name()?.to_string_lossy().into_owned();
                index_of_id(name.strip_prefix(TMP_PREFIX).unwrap_or(&name))
            });
        let sealed_indices = sealed.iter().filter_map(|s| index_of_id(s.id()));
        let index = committed.iter().map(|c| c.index).chain(dir_indices).chain(sealed_indices).max().unwrap_or(0) + 1;
        let mut seed = blake3::Hasher::new();
        seed.update(&std::process::id().to_le_bytes());
        seed.update(&index.to_le_bytes());
        seed.update(format!("{:?}{:?}", SystemTime::now(), Instant::now()).as_bytes());
        seed.update(self.root.as_os_str().as_encoded_bytes());
        let id = format!("{index:04}-{}", &seed.finalize().to_hex()[..8]);
        self.pending_at(id, name.map(str::to_owned), index)
    }

    /// Makes the pending directory of checkpoint `id` (owned by this process).
    pub(crate) fn pending_at(&self, id: String, name: Option<String>, index: u64) -> Result<Pending, StoreError> {
        let dir = self.root.join(format!("{TMP_PREFIX}{id}"));
        stasis_core::private::create_dir(&dir).map_err(io_err("cannot create the pending checkpoint", &dir))?;
        let owner = Owner::me(name.clone(), index);
        let owner_path = dir.join(OWNER_FILE);
        let pending = Pending {
            root: self.root.clone(),
            chunks: self.chunks.clone(),
            remote: self.remote().cloned(),
            dir,
            id,
            name,
            index,
            finished: false,
        };
        stasis_core::private::write(&owner_path, &serde_json::to_vec(&owner).expect("owner serialises"))
            .map_err(io_err("cannot write", &owner_path))?;
        debug!(id = %pending.id, "checkpoint begun");
        Ok(pending)
    }

    /// The directory of checkpoint `which` among `infos` (see
    /// [`Store::open_checkpoint`] for the forms it takes).
    fn resolve(&self, which: &str, infos: &[CheckpointInfo]) -> Result<PathBuf, StoreError> {
        let unknown = || {
            let known: Vec<String> = infos.iter().map(|i| format!("#{} {}", i.index, i.label())).collect();
            StoreError::UnknownCheckpoint {
                which: which.to_owned(),
                known: if known.is_empty() { "none".into() } else { known.join(", ") },
            }
        };
        Ok(if which == "latest" {
            infos.last().map(|i| i.dir.clone()).ok_or_else(unknown)?
        } else if let Some(index) = which
            .strip_prefix('#')
            .unwrap_or(which)
            .parse::<u64>()
            .ok()
            .filter(|_| which.trim_start_matches('#').bytes().all(|b| b.is_ascii_digit()))
        {
            // Damaged checkpoints count too, so asking for one by index
            // reports what is wrong with it rather than "unknown".
            match infos.iter().find(|i| i.index == index) {
                Some(i) => i.dir.clone(),
                None => self
                    .committed_dirs()?
                    .into_iter()
                    .find(|d| d.file_name().and_then(|n| index_of_id(&n.to_string_lossy())) == Some(index))
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
            infos.iter().find(|i| i.name.as_deref() == Some(which)).map(|i| i.dir.clone()).ok_or_else(unknown)?
        })
    }

    /// Opens and verifies a checkpoint given as `latest`, an index (`3` or
    /// `#3`), an id, or a name: format, version, manifest checksum, every
    /// whole file's size and BLAKE3 digest, and that every chunk exists.
    /// Chunk contents are checked where they are read: by
    /// [`Checkpoint::materialized`] (a restore), [`Checkpoint::verify`] and
    /// [`Store::fsck`] — so a restore reads each chunk once.
    pub fn open_checkpoint(&self, which: &str) -> Result<Checkpoint, StoreError> {
        let infos = self.list()?;
        let dir = self.resolve(which, &infos)?;
        // A remote store's `has` answers from one listing of the bucket.
        self.chunks.refresh().map_err(|source| StoreError::ChunkIo {
            op: "cannot list the chunks",
            path: self.root.join(CHUNKS_DIR),
            source,
        })?;
        let manifest = load_manifest(&dir)?;
        let info = CheckpointInfo::of(&manifest, dir.clone());
        verify_files(&dir, &manifest, &info.label(), &*self.chunks, false)?;
        Ok(Checkpoint { info, manifest, dir, chunks: self.chunks.clone(), materialized_in: None })
    }
}
