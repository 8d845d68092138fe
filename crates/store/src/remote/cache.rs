//! Chunks in the bucket, packed: a commit's new chunks go into a few large
//! pack objects and one index object ([`super::pack`]), and the local
//! chunk directory is a read-through cache of packs (and of single chunks
//! read by range). A restore on the host that took the checkpoint (or
//! restored it before) reads local disk; anywhere else it fetches the
//! packs it needs — whole, or the ranges it needs of packs it needs little
//! of — several at a time, while its readers already consume the ones that
//! arrived.
//!
//! Local layout, inside the cache directory (`<store>/chunks/`):
//!
//! ```text
//! .packs/<pack id>     whole packs: written by a commit, or fetched by a restore
//! .index/<name>        copies of the bucket's index objects (immutable)
//! ab/cdef…             single chunks read by range (LocalChunks)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::pack::{self, Entry, GcPolicy, PackBuilder, PackId, PackRecord, SealedPack};
use super::{Remote, RemoteError};
use crate::chunk::{self, ChunkId, ChunkStorage, Collected, LocalChunks};
use crate::failpoint::failpoint;

/// How packs are cut and moved. The defaults suit Garage and S3 alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// A pack is sealed and uploaded once its chunks reach this many bytes.
    pub pack_target: usize,
    /// Pack uploads in flight per store (each holds one pack in memory).
    pub uploads_in_flight: usize,
    /// Pack (or range) downloads in flight for a restore or fsck.
    pub fetches_in_flight: usize,
    /// A restore fetches a whole pack when it needs at least this share
    /// (percent) of its bytes, or the pack is small; else only the ranges
    /// it needs, neighbours closer than `range_gap` merged.
    pub whole_pack_percent: u64,
    pub range_gap: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            pack_target: pack::PACK_TARGET,
            uploads_in_flight: 4,
            fetches_in_flight: 4,
            whole_pack_percent: 25,
            range_gap: 1 << 20,
        }
    }
}

/// Restore readers at once (most reads are local `pread`s of fetched
/// packs; a reader waits while its pack is on the way).
const READERS: usize = 16;

fn packs_rel(id: &PackId) -> String {
    format!("packs/{}", id.to_hex())
}

fn index_rel(name: &str) -> String {
    format!("index/{name}")
}

fn to_io(e: RemoteError) -> io::Error {
    let kind = if e.is_not_found() { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

fn not_found(id: &ChunkId) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no chunk {id} in the bucket's index"))
}

/// Where a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: PackId,
    offset: u32,
    len: u32,
}

/// The bucket's index as of the last refresh, plus what this process
/// published since.
#[derive(Debug, Default)]
struct View {
    loaded: bool,
    /// Index objects by name.
    indexes: BTreeMap<String, Arc<Vec<PackRecord>>>,
    /// Packs under `packs/` (listed), with their sizes.
    listed: HashMap<PackId, u64>,
    /// Every chunk in an indexed pack that is listed.
    chunks: HashMap<ChunkId, Loc>,
    /// Length of every indexed, listed pack.
    packs: HashMap<PackId, u64>,
}

impl View {
    fn add(&mut self, name: String, records: Arc<Vec<PackRecord>>) {
        for p in records.iter() {
            if !self.listed.contains_key(&p.id) {
                continue;
            }
            self.packs.insert(p.id, p.len);
            for e in &p.entries {
                self.chunks.entry(e.chunk()).or_insert(Loc { pack: p.id, offset: e.offset, len: e.len });
            }
        }
        self.indexes.insert(name, records);
    }
}

/// One planned download: waiters block until it is done.
#[derive(Debug, Default)]
struct Fetch {
    done: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Fetch {
    fn finish(&self, ok: bool) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok);
        self.cv.notify_all();
    }

    fn wait(&self) -> bool {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while done.is_none() {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
        done.unwrap_or(false)
    }
}

type Upload = tokio::task::JoinHandle<Result<PackRecord, RemoteError>>;

/// One commit's packs.
#[derive(Debug, Default)]
struct Txn {
    claimed: HashSet<ChunkId>,
    open: PackBuilder,
    uploads: Vec<Upload>,
    files: Vec<PathBuf>,
}

#[derive(Debug)]
struct Inner {
    local: LocalChunks,
    packs_dir: PathBuf,
    index_dir: PathBuf,
    remote: Arc<Remote>,
    tuning: Tuning,
    view: RwLock<View>,
    refreshing: Mutex<()>,
    /// Completed refreshes (a reader that misses a chunk refreshes once,
    /// unless another refresh completed since it looked).
    refreshed: std::sync::atomic::AtomicU64,
    txns: Mutex<HashMap<String, Txn>>,
    upload_slots: Arc<Semaphore>,
    fetches: Mutex<HashMap<PackId, Arc<Fetch>>>,
    open_packs: Mutex<HashMap<PackId, Arc<File>>>,
}

/// [`ChunkStorage`] over a [`Remote`], chunks packed, with a local cache.
///
/// - `put` appends the chunk to the transaction's open pack; a full pack
///   is sealed, written to the cache and uploaded (at most
///   [`Tuning::uploads_in_flight`] at once; `put` waits for a slot).
///   `publish` seals the last pack, waits for every upload, then PUTs the
///   transaction's index object: from then on the chunks exist.
/// - `has` answers from the index as of the last
///   [`ChunkStorage::refresh`] (a LIST of `index/` and of `packs/`, and a
///   GET of each index object not cached yet), plus what this process
///   published since — never from the cache, which may hold packs a gc
///   elsewhere removed.
/// - `get` reads the cached pack, waits for a download [`prefetch`]
///   planned, or reads the chunk's range from the bucket (and caches it);
///   a cached copy that does not decode to its id is read again from the
///   bucket. A pack gone from the bucket (a gc elsewhere rewrote it) makes
///   it refresh the index once and read the chunk where it is now.
/// - `scan_uncached` (fsck) reads packs from the bucket, never the cache.
/// - `collect` (gc) deletes dead packs and rewrites sparse ones
///   ([`pack::plan_gc`]), then replaces every index object by one.
/// - `discard` drops a failed commit's packs from the cache; those already
///   uploaded stay, in no index, until gc removes them.
///
/// [`prefetch`]: ChunkStorage::prefetch
pub struct CachedChunks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CachedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedChunks")
            .field("cache", &self.inner.local.dir())
            .field("remote", &self.inner.remote)
            .finish()
    }
}

impl CachedChunks {
    /// The bucket's chunks, cached in `cache`.
    pub fn new(cache: LocalChunks, remote: Arc<Remote>) -> io::Result<CachedChunks> {
        CachedChunks::with_tuning(cache, remote, Tuning::default())
    }

    /// [`CachedChunks::new`] with packs cut and moved as `tuning` says.
    pub fn with_tuning(cache: LocalChunks, remote: Arc<Remote>, tuning: Tuning) -> io::Result<CachedChunks> {
        let packs_dir = cache.dir().join(".packs");
        let index_dir = cache.dir().join(".index");
        stasis_core::private::create_dir_all(&packs_dir)?;
        stasis_core::private::create_dir_all(&index_dir)?;
        Ok(CachedChunks {
            inner: Arc::new(Inner {
                local: cache,
                packs_dir,
                index_dir,
                remote,
                tuning,
                view: RwLock::new(View::default()),
                refreshing: Mutex::new(()),
                refreshed: std::sync::atomic::AtomicU64::new(0),
                txns: Mutex::new(HashMap::new()),
                upload_slots: Arc::new(Semaphore::new(tuning.uploads_in_flight.max(1))),
                fetches: Mutex::new(HashMap::new()),
                open_packs: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The remote.
    pub fn remote(&self) -> &Arc<Remote> {
        &self.inner.remote
    }

    /// The cache.
    pub fn cache(&self) -> &LocalChunks {
        &self.inner.local
    }

    /// Where chunk `id` is in the bucket: `(pack key, offset, encoded
    /// length)`, as of the last refresh (tests damage packs with it).
    pub fn locate(&self, id: &ChunkId) -> io::Result<Option<(String, u64, u64)>> {
        Ok(self.inner.locate(id)?.map(|l| (format!("packs/{}", l.pack.to_hex()), l.offset as u64, l.len as u64)))
    }

    /// How many packs and index objects the bucket holds (as of the last refresh).
    pub fn pack_counts(&self) -> (usize, usize) {
        let v = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        (v.packs.len(), v.indexes.len())
    }

    /// Seals `builder` and starts its upload (waiting for a slot), writing
    /// the pack into the cache alongside.
    fn ship(&self, builder: PackBuilder) -> io::Result<(Upload, PathBuf)> {
        let inner = &self.inner;
        let SealedPack { bytes, record } = builder.seal();
        let bytes = Bytes::from(bytes);
        let slots = inner.upload_slots.clone();
        let permit =
            inner.remote.run(async move { slots.acquire_owned().await }).map_err(to_io)?.expect("never closed");
        let path = inner.packs_dir.join(record.id.to_hex());
        let upload = inner.remote.put_future(&packs_rel(&record.id), bytes.clone());
        let (cache_path, cache_bytes) = (path.clone(), bytes);
        let handle =
            inner.remote.handle().ok_or_else(|| io::Error::other("the object store's runtime is gone"))?.spawn(
                async move {
                    let cached = tokio::task::spawn_blocking(move || write_cached(&cache_path, &cache_bytes));
                    let r = upload.await;
                    drop(permit);
                    if let Ok(Err(e)) = cached.await {
                        debug!(error = %e, "cannot cache a pack");
                    }
                    r.map(|()| record)
                },
            );
        Ok((handle, path))
    }
}

/// Writes a cache file (tmp, rename; no fsync: a torn copy fails to decode
/// and is read again from the bucket).
fn write_cached(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}-{}-{n}", std::process::id()));
    stasis_core::private::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// A planned download of one pack.
#[derive(Debug, Clone)]
enum Plan {
    Whole { pack: PackId, len: u64 },
    Ranges { pack: PackId, ranges: Vec<(u64, u64)>, entries: Vec<Entry> },
}

impl Plan {
    fn pack(&self) -> PackId {
        match self {
            Plan::Whole { pack, .. } | Plan::Ranges { pack, .. } => *pack,
        }
    }
}

/// Merges `entries` (of one pack) into byte ranges, neighbours closer than `gap` joined.
fn ranges_of(entries: &mut [Entry], gap: u64) -> Vec<(u64, u64)> {
    entries.sort_by_key(|e| e.offset);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in entries.iter() {
        let (s, t) = (e.offset as u64, e.offset as u64 + e.len as u64);
        match out.last_mut() {
            Some(last) if s <= last.1 + gap => last.1 = last.1.max(t),
            _ => out.push((s, t)),
        }
    }
    out
}

impl Inner {
    fn pack_path(&self, id: &PackId) -> PathBuf {
        self.packs_dir.join(id.to_hex())
    }

    /// Loads the index if this process never did.
    fn ensure_loaded(&self) -> io::Result<()> {
        if !self.view.read().unwrap_or_else(|e| e.into_inner()).loaded {
            self.refresh()?;
        }
        Ok(())
    }

    /// The chunk's location (loading the index first if need be).
    fn locate(&self, id: &ChunkId) -> io::Result<Option<Loc>> {
        self.ensure_loaded()?;
        Ok(self.view.read().unwrap_or_else(|e| e.into_inner()).chunks.get(id).copied())
    }

    /// [`Inner::locate`], refreshing the index once when the chunk is not
    /// in it: a reader (unlike `has`) may look for chunks another host
    /// published after our last refresh.
    fn locate_fresh(&self, id: &ChunkId) -> io::Result<Option<Loc>> {
        let seen = self.refreshed.load(std::sync::atomic::Ordering::Acquire);
        if let Some(loc) = self.locate(id)? {
            return Ok(Some(loc));
        }
        self.refresh_since(seen)?;
        Ok(self.view.read().unwrap_or_else(|e| e.into_inner()).chunks.get(id).copied())
    }

    /// Refreshes unless a refresh completed after the caller saw `seen`.
    fn refresh_since(&self, seen: u64) -> io::Result<()> {
        if self.refreshed.load(std::sync::atomic::Ordering::Acquire) != seen {
            return Ok(());
        }
        self.refresh()
    }

    /// The cached pack file, opened once.
    fn cached_pack(&self, pack: &PackId) -> Option<Arc<File>> {
        let mut open = self.open_packs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(pack) {
            return Some(f.clone());
        }
        let f = Arc::new(File::open(self.pack_path(pack)).ok()?);
        if open.len() >= 256 {
            open.clear();
        }
        open.insert(*pack, f.clone());
        Some(f)
    }

    fn read_cached(&self, id: &ChunkId, loc: &Loc) -> Option<Vec<u8>> {
        let f = self.cached_pack(&loc.pack)?;
        let mut buf = vec![0u8; loc.len as usize];
        f.read_exact_at(&mut buf, loc.offset as u64).ok()?;
        if chunk::decode(id, &buf).is_ok() {
            return Some(buf);
        }
        debug!(chunk = %id, pack = %loc.pack, "cached pack holds a damaged copy; reading the bucket");
        None
    }

    fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let Some(loc) = self.locate_fresh(id)? else {
            return Err(not_found(id));
        };
        let planned = self.fetches.lock().unwrap_or_else(|e| e.into_inner()).get(&loc.pack).cloned();
        if let Some(f) = planned {
            f.wait();
        }
        if let Some(data) = self.read_cached(id, &loc) {
            return Ok(data);
        }
        if let Ok(cached) = self.local.get(id) {
            if chunk::decode(id, &cached).is_ok() {
                return Ok(cached);
            }
        }
        let data = match self.fetch_range(&loc) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Rewritten by a gc elsewhere since our refresh: look again.
                self.refresh()?;
                match self.view.read().unwrap_or_else(|e| e.into_inner()).chunks.get(id).copied() {
                    Some(now) if now != loc => self.fetch_range(&now)?,
                    _ => return Err(e),
                }
            }
            r => r?,
        };
        if chunk::decode(id, &data).is_ok() {
            if let Err(e) = self.local.insert_cached(id, &data) {
                debug!(chunk = %id, error = %e, "cannot cache a chunk");
            }
        }
        Ok(data)
    }

    fn fetch_range(&self, loc: &Loc) -> io::Result<Vec<u8>> {
        let (s, t) = (loc.offset as u64, loc.offset as u64 + loc.len as u64);
        Ok(self.remote.get_range(&packs_rel(&loc.pack), s..t).map_err(to_io)?.to_vec())
    }

    /// Lists `index/` and `packs/`, loads index objects not loaded yet
    /// (from the local copy, else the bucket), drops local copies of
    /// index objects no longer listed, and rebuilds the view.
    fn refresh(&self) -> io::Result<()> {
        let _one = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        let names: HashSet<String> = self
            .remote
            .list("index")
            .map_err(to_io)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        let listed: HashMap<PackId, u64> = self
            .remote
            .list("packs")
            .map_err(to_io)?
            .into_iter()
            .filter_map(|(n, size)| PackId::from_hex(&n).map(|id| (id, size)))
            .collect();
        let known: BTreeMap<String, Arc<Vec<PackRecord>>> = {
            let v = self.view.read().unwrap_or_else(|e| e.into_inner());
            v.indexes.iter().filter(|(n, _)| names.contains(*n)).map(|(n, r)| (n.clone(), r.clone())).collect()
        };
        let mut loaded = known;
        let missing: Vec<String> = names.iter().filter(|n| !loaded.contains_key(*n)).cloned().collect();
        let mut to_fetch = Vec::new();
        for name in missing {
            let path = self.index_dir.join(&name);
            match fs::read(&path).ok().filter(|b| pack::index_name(b) == name).map(|b| pack::decode_index(&b)) {
                Some(Ok(records)) => {
                    loaded.insert(name, Arc::new(records));
                }
                _ => to_fetch.push(name),
            }
        }
        if !to_fetch.is_empty() {
            let remote = self.remote.clone();
            let fetched: Vec<(String, Result<Bytes, RemoteError>)> = self
                .remote
                .run(async move {
                    futures::stream::iter(to_fetch)
                        .map(|name| {
                            let f = remote.get_range_future(&index_rel(&name), 0..pack::MAX_INDEX + 64);
                            async move { (name, f.await) }
                        })
                        .buffer_unordered(8)
                        .collect()
                        .await
                })
                .map_err(to_io)?;
            for (name, r) in fetched {
                let bytes = match r {
                    Ok(b) => b,
                    Err(e) if e.is_not_found() => continue, // removed by a gc since the listing
                    Err(e) => return Err(to_io(e)),
                };
                if pack::index_name(&bytes) != name {
                    warn!(index = %name, bucket = %self.remote.bucket(), "an index object does not hash to its name; ignored");
                    continue;
                }
                match pack::decode_index(&bytes) {
                    Ok(records) => {
                        if let Err(e) = stasis_core::private::write(&self.index_dir.join(&name), &bytes) {
                            debug!(error = %e, "cannot cache an index object");
                        }
                        loaded.insert(name, Arc::new(records));
                    }
                    Err(e) => {
                        warn!(index = %name, bucket = %self.remote.bucket(), error = %e, "an index object does not read; ignored")
                    }
                }
            }
        }
        // Local copies of index objects the bucket no longer has.
        if let Ok(dir) = fs::read_dir(&self.index_dir) {
            for e in dir.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !names.contains(&n) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let mut view = View { loaded: true, listed, ..Default::default() };
        for (name, records) in loaded {
            view.add(name, records);
        }
        debug!(
            packs = view.packs.len(),
            chunks = view.chunks.len(),
            indexes = view.indexes.len(),
            "bucket index loaded"
        );
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view;
        self.refreshed.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Downloads `plan`'s pack (or ranges) into the cache.
    async fn fetch(self: Arc<Inner>, plan: Plan) -> bool {
        match plan {
            Plan::Whole { pack, len } => match self.remote.get_range_future(&packs_rel(&pack), 0..len).await {
                Ok(bytes) => {
                    let path = self.pack_path(&pack);
                    tokio::task::spawn_blocking(move || write_cached(&path, &bytes)).await.is_ok_and(|r| r.is_ok())
                }
                Err(e) => {
                    debug!(pack = %pack, error = %e, "cannot fetch a pack; its chunks are read one by one");
                    false
                }
            },
            Plan::Ranges { pack, ranges, entries } => {
                let rel = packs_rel(&pack);
                let mut ok = true;
                for (s, t) in ranges {
                    let bytes = match self.remote.get_range_future(&rel, s..t).await {
                        Ok(b) => b,
                        Err(_) => {
                            ok = false;
                            continue;
                        }
                    };
                    let mine: Vec<Entry> = entries
                        .iter()
                        .filter(|e| e.offset as u64 >= s && e.offset as u64 + e.len as u64 <= t)
                        .copied()
                        .collect();
                    let me = self.clone();
                    let cached = tokio::task::spawn_blocking(move || {
                        for e in mine {
                            let at = (e.offset as u64 - s) as usize;
                            if let Some(enc) = bytes.get(at..at + e.len as usize) {
                                if chunk::decode(&e.chunk(), enc).is_ok() {
                                    let _ = me.local.insert_cached(&e.chunk(), enc);
                                }
                            }
                        }
                    });
                    ok &= cached.await.is_ok();
                }
                ok
            }
        }
    }

    /// Plans downloads of the packs holding `ids` that are not cached, in
    /// the order of first need.
    fn plan(&self, ids: &[ChunkId]) -> Vec<Plan> {
        let v = self.view.read().unwrap_or_else(|e| e.into_inner());
        let mut order: Vec<PackId> = Vec::new();
        let mut need: HashMap<PackId, (HashSet<[u8; 32]>, Vec<Entry>)> = HashMap::new();
        for id in ids {
            let Some(loc) = v.chunks.get(id) else { continue };
            let slot = need.entry(loc.pack).or_insert_with(|| {
                order.push(loc.pack);
                Default::default()
            });
            if slot.0.insert(id.0) {
                slot.1.push(Entry { id: id.0, offset: loc.offset, len: loc.len });
            }
        }
        let t = &self.tuning;
        let mut plans = Vec::new();
        for pack in order {
            if self.pack_path(&pack).exists() {
                continue;
            }
            let len = v.packs.get(&pack).copied().unwrap_or(0);
            let (_, mut entries) = need.remove(&pack).expect("planned");
            // Already in the single-chunk cache.
            entries.retain(|e| !self.local.has(&e.chunk()).unwrap_or(false));
            if entries.is_empty() {
                continue;
            }
            let bytes: u64 = entries.iter().map(|e| e.len as u64).sum();
            if bytes * 100 >= t.whole_pack_percent * len || len <= t.pack_target as u64 / 4 {
                plans.push(Plan::Whole { pack, len });
            } else {
                let ranges = ranges_of(&mut entries, t.range_gap);
                plans.push(Plan::Ranges { pack, ranges, entries });
            }
        }
        plans
    }
}

impl ChunkStorage for CachedChunks {
    fn put(&self, txn: &str, id: &ChunkId, encoded: &[u8]) -> io::Result<bool> {
        let full = {
            let mut txns = self.inner.txns.lock().unwrap_or_else(|e| e.into_inner());
            let t = txns.entry(txn.to_owned()).or_default();
            if !t.claimed.insert(*id) {
                return Ok(false);
            }
            t.open.push(id, encoded);
            (t.open.len() >= self.inner.tuning.pack_target).then(|| std::mem::take(&mut t.open))
        };
        if let Some(builder) = full {
            let (upload, file) = self.ship(builder)?;
            let mut txns = self.inner.txns.lock().unwrap_or_else(|e| e.into_inner());
            let t = txns.entry(txn.to_owned()).or_default();
            t.uploads.push(upload);
            t.files.push(file);
        }
        Ok(true)
    }

    fn publish(&self, txn: &str) -> io::Result<()> {
        let inner = &self.inner;
        let Some(mut t) = inner.txns.lock().unwrap_or_else(|e| e.into_inner()).remove(txn) else {
            return Ok(());
        };
        if !t.open.is_empty() {
            let (upload, file) = self.ship(std::mem::take(&mut t.open))?;
            t.uploads.push(upload);
            t.files.push(file);
        }
        let handles = std::mem::take(&mut t.uploads);
        let n = handles.len();
        let results = inner.remote.run(futures::future::join_all(handles)).map_err(to_io)?;
        let mut records = Vec::with_capacity(n);
        let mut failed = None;
        for r in results {
            match r {
                Ok(Ok(rec)) => records.push(rec),
                Ok(Err(e)) => failed = failed.or(Some(to_io(e))),
                Err(e) => failed = failed.or(Some(io::Error::other(e))),
            }
        }
        if let Some(e) = failed {
            for f in &t.files {
                let _ = fs::remove_file(f);
            }
            return Err(e);
        }
        if records.is_empty() {
            return Ok(());
        }
        let bytes = pack::encode_index(&records);
        let name = pack::index_name(&bytes);
        inner.remote.put(&index_rel(&name), bytes.clone()).map_err(to_io)?;
        if let Err(e) = stasis_core::private::write(&inner.index_dir.join(&name), &bytes) {
            debug!(error = %e, "cannot cache an index object");
        }
        // After any refresh that listed before our PUT, so none drops it.
        let _one = inner.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = inner.view.write().unwrap_or_else(|e| e.into_inner());
        for r in &records {
            v.listed.insert(r.id, r.len);
        }
        v.add(name, Arc::new(records));
        debug!(txn, packs = n, "packs uploaded and indexed");
        Ok(())
    }

    fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        self.inner.get(id)
    }

    fn read_parallelism(&self) -> Option<usize> {
        Some(READERS)
    }

    fn prefetch(&self, ids: &[ChunkId]) {
        let seen = self.inner.refreshed.load(std::sync::atomic::Ordering::Acquire);
        let known = self.inner.ensure_loaded().map(|()| {
            let v = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
            ids.iter().all(|id| v.chunks.contains_key(id))
        });
        // Chunks published elsewhere since our last look: look again.
        let ready = match known {
            Ok(true) => Ok(()),
            Ok(false) => self.inner.refresh_since(seen),
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            debug!(error = %e, "cannot load the index to prefetch; chunks are read one by one");
            return;
        }
        let plans = self.inner.plan(ids);
        if plans.is_empty() {
            return;
        }
        let mut fetches = self.inner.fetches.lock().unwrap_or_else(|e| e.into_inner());
        let mut planned = Vec::with_capacity(plans.len());
        for p in plans {
            if let std::collections::hash_map::Entry::Vacant(slot) = fetches.entry(p.pack()) {
                let f = Arc::new(Fetch::default());
                slot.insert(f.clone());
                planned.push((p, f));
            }
        }
        drop(fetches);
        let plans = planned;
        let Some(handle) = self.inner.remote.handle() else {
            for (_, f) in plans {
                f.finish(false);
            }
            return;
        };
        debug!(packs = plans.len(), "prefetching packs");
        let inner = self.inner.clone();
        let n = inner.tuning.fetches_in_flight.max(1);
        handle.spawn(async move {
            futures::stream::iter(plans)
                .map(|(plan, f)| {
                    let inner = inner.clone();
                    async move {
                        let pack = plan.pack();
                        let ok = inner.clone().fetch(plan).await;
                        // In place first, then unplanned: a reader that no
                        // longer finds the plan finds the file.
                        f.finish(ok);
                        inner.fetches.lock().unwrap_or_else(|e| e.into_inner()).remove(&pack);
                    }
                })
                .buffer_unordered(n)
                .collect::<Vec<()>>()
                .await;
        });
    }

    fn get_uncached(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let Some(loc) = self.inner.locate_fresh(id)? else {
            return Err(not_found(id));
        };
        self.inner.fetch_range(&loc)
    }

    fn scan_uncached(&self, ids: &[ChunkId], each: &(dyn Fn(&ChunkId, io::Result<Vec<u8>>) + Sync)) {
        let inner = &self.inner;
        if let Err(e) = inner.refresh() {
            for id in ids {
                each(id, Err(io::Error::new(e.kind(), e.to_string())));
            }
            return;
        }
        let mut by_pack: BTreeMap<PackId, (u64, Vec<Entry>)> = BTreeMap::new();
        {
            let v = inner.view.read().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                match v.chunks.get(id) {
                    Some(loc) => by_pack
                        .entry(loc.pack)
                        .or_insert_with(|| (v.packs.get(&loc.pack).copied().unwrap_or(0), Vec::new()))
                        .1
                        .push(Entry { id: id.0, offset: loc.offset, len: loc.len }),
                    None => each(id, Err(not_found(id))),
                }
            }
        }
        // Whole packs from the bucket, a few at a time, handed back here.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<Entry>, Result<Bytes, RemoteError>)>(2);
        let remote = inner.remote.clone();
        let n = inner.tuning.fetches_in_flight.max(1);
        let Some(handle) = inner.remote.handle() else {
            for (_, entries) in by_pack.values() {
                for e in entries {
                    each(&e.chunk(), Err(io::Error::other("the object store's runtime is gone")));
                }
            }
            return;
        };
        handle.spawn(async move {
            futures::stream::iter(by_pack)
                .map(|(pack, (len, entries))| {
                    let f = remote.get_range_future(&packs_rel(&pack), 0..len);
                    async move { (entries, f.await) }
                })
                .buffer_unordered(n)
                .for_each(|r| {
                    let tx = tx.clone();
                    async move {
                        let _ = tokio::task::spawn_blocking(move || tx.send(r)).await;
                    }
                })
                .await;
        });
        for (entries, r) in rx {
            match r {
                Ok(bytes) => crate::util::par_map(&entries, |e| {
                    let got = e.slice(&bytes).map(<[u8]>::to_vec).ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("pack is {} bytes, shorter than its index says", bytes.len()),
                        )
                    });
                    each(&e.chunk(), got)
                })
                .into_iter()
                .for_each(drop),
                Err(e) => {
                    let kind = if e.is_not_found() { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
                    for en in &entries {
                        each(&en.chunk(), Err(io::Error::new(kind, e.to_string())));
                    }
                }
            }
        }
    }

    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        Ok(self.inner.locate(id)?.is_some())
    }

    fn refresh(&self) -> io::Result<()> {
        self.inner.refresh()
    }

    fn list(&self) -> io::Result<Vec<(ChunkId, u64)>> {
        self.inner.refresh()?;
        let v = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(ChunkId, u64)> = v.chunks.iter().map(|(id, l)| (*id, l.len as u64)).collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, _id: &ChunkId) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "chunks in packs are removed by gc (collect), not one by one"))
    }

    fn collect(&self, live: &HashSet<ChunkId>) -> io::Result<Collected> {
        self.collect_packs(live, &GcPolicy::default())
    }

    fn discard(&self, txn: &str) -> io::Result<()> {
        let pending = self.inner.txns.lock().unwrap_or_else(|e| e.into_inner()).remove(txn);
        if let Some(t) = pending {
            for h in t.uploads {
                h.abort();
            }
            for f in t.files {
                let _ = fs::remove_file(f);
            }
        }
        self.inner.local.discard(txn)
    }

    fn remove_unpublished(&self) -> io::Result<usize> {
        let mut n = self.inner.local.remove_unpublished()?;
        for e in fs::read_dir(&self.inner.packs_dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl CachedChunks {
    /// gc of the bucket's packs (the caller holds the exclusive lease, so
    /// no commit runs anywhere): plan with [`pack::plan_gc`] over every
    /// indexed pack and every pack no index names (read from its trailer:
    /// a dead commit's, or one whose index was lost — recovered if it
    /// holds live chunks), copy the live chunks of sparse packs into new
    /// ones, PUT one index object for everything kept, then delete the
    /// other index objects and the dead and rewritten packs. Killed at any
    /// point, every live chunk stays reachable through some index (the new
    /// index is in place before anything it replaces is deleted); what is
    /// left over the next gc removes.
    pub fn collect_packs(&self, live: &HashSet<ChunkId>, policy: &GcPolicy) -> io::Result<Collected> {
        let inner = &self.inner;
        inner.refresh()?;
        let (records, old_indexes, listed): (Vec<PackRecord>, Vec<String>, HashMap<PackId, u64>) = {
            let v = inner.view.read().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashSet::new();
            let records = v
                .indexes
                .values()
                .flat_map(|r| r.iter())
                .filter(|p| v.listed.contains_key(&p.id) && seen.insert(p.id))
                .cloned()
                .collect();
            (records, v.indexes.keys().cloned().collect(), v.listed.clone())
        };
        let indexed: HashSet<PackId> = records.iter().map(|p| p.id).collect();
        let mut all = records;
        let mut unreadable = HashSet::new();
        for (&id, &size) in listed.iter().filter(|(id, _)| !indexed.contains(id)) {
            match self.read_trailer(&id, size) {
                Ok(rec) if rec.id == id => all.push(rec),
                Ok(rec) => {
                    warn!(pack = %id, trailer = %rec.id, "a pack whose trailer names another pack; left alone");
                    unreadable.insert(id);
                }
                Err(e) => {
                    warn!(pack = %id, error = %e, "a pack in no index whose trailer does not read; left alone");
                    unreadable.insert(id);
                }
            }
        }
        let recovered: Vec<PackId> = all.iter().filter(|p| !indexed.contains(&p.id)).map(|p| p.id).collect();
        let plan = pack::plan_gc(&all, live, policy);
        let mut out =
            Collected { chunks_kept: plan.live_chunks, chunks_removed: plan.removed_chunks, ..Default::default() };
        let keep_ids: HashSet<PackId> = plan.keep.iter().map(|p| p.id).collect();
        if plan.is_noop() && old_indexes.len() <= 1 && recovered.iter().all(|id| !keep_ids.contains(id)) {
            info!(packs = keep_ids.len(), "gc: every pack stays as it is");
            return Ok(out);
        }
        // Rewrite: the live chunks of sparse packs into new packs.
        let mut new_records = Vec::new();
        let mut builder = PackBuilder::default();
        let mut uploads = Vec::new();
        let mut rewritten = Vec::new();
        for (id, entries) in &plan.repack {
            let len = listed.get(id).copied().unwrap_or(0);
            let bytes = match inner.cached_pack(id).and_then(|f| {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, 0).ok().map(|()| buf)
            }) {
                Some(b) => Bytes::from(b),
                None => inner.remote.get_range(&packs_rel(id), 0..len).map_err(to_io)?,
            };
            let mut copies = Vec::new();
            let mut intact = true;
            for e in entries {
                match e.slice(&bytes).filter(|enc| chunk::decode(&e.chunk(), enc).is_ok()) {
                    Some(enc) => copies.push((e.chunk(), enc.to_vec())),
                    None => intact = false,
                }
            }
            if !intact {
                // Keep the pack (fsck names its damaged chunk); copy nothing.
                warn!(pack = %id, "gc: a pack to rewrite holds a damaged live chunk; it stays as it is");
                if let Some(rec) = all.iter().find(|p| p.id == *id) {
                    new_records.push(rec.clone());
                }
                continue;
            }
            for (cid, enc) in copies {
                builder.push(&cid, &enc);
                out.bytes_rewritten += enc.len() as u64;
                if builder.len() >= inner.tuning.pack_target {
                    uploads.push(self.ship(std::mem::take(&mut builder))?.0);
                }
            }
            rewritten.push(*id);
        }
        if !builder.is_empty() {
            uploads.push(self.ship(builder)?.0);
        }
        out.packs_written = uploads.len();
        for r in inner.remote.run(futures::future::join_all(uploads)).map_err(to_io)? {
            new_records.push(r.map_err(io::Error::other)?.map_err(to_io)?);
        }
        new_records.extend(plan.keep.iter().cloned());
        let bytes = pack::encode_index(&new_records);
        let name = pack::index_name(&bytes);
        inner.remote.put(&index_rel(&name), bytes.clone()).map_err(to_io)?;
        let _ = stasis_core::private::write(&inner.index_dir.join(&name), &bytes);
        failpoint("gc-after-new-index");
        for old in old_indexes.iter().filter(|n| **n != name) {
            inner.remote.delete(&index_rel(old)).map_err(to_io)?;
        }
        let doomed: Vec<PackId> =
            plan.delete.iter().chain(&rewritten).copied().filter(|id| !unreadable.contains(id)).collect();
        for id in &doomed {
            inner.remote.delete(&packs_rel(id)).map_err(to_io)?;
            out.bytes_removed += listed.get(id).copied().unwrap_or(0);
            out.packs_removed += 1;
            failpoint("gc-after-first-pack-delete");
        }
        // The cache: packs the bucket no longer indexes.
        let now: HashSet<PackId> = new_records.iter().map(|p| p.id).collect();
        inner.open_packs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for e in fs::read_dir(&inner.packs_dir)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if PackId::from_hex(&n).is_some_and(|id| !now.contains(&id)) {
                let _ = fs::remove_file(e.path());
            }
        }
        inner.refresh()?;
        info!(
            deleted = out.packs_removed,
            written = out.packs_written,
            rewritten_bytes = out.bytes_rewritten,
            recovered = recovered.len(),
            "gc: packs collected"
        );
        Ok(out)
    }

    /// The trailer of pack `id` (`size` bytes) read from the bucket's copy.
    fn read_trailer(&self, id: &PackId, size: u64) -> io::Result<PackRecord> {
        let remote = &self.inner.remote;
        let rel = packs_rel(id);
        let bad = |e: pack::PackError| io::Error::new(io::ErrorKind::InvalidData, e);
        let probe = size.min(pack::TRAILER_PROBE);
        let tail = remote.get_range(&rel, size - probe..size).map_err(to_io)?;
        match pack::trailer_of(&tail, size).map_err(bad)? {
            Ok(rec) => Ok(rec),
            Err(need) => {
                let tail = remote.get_range(&rel, size - need..size).map_err(to_io)?;
                pack::trailer_of(&tail, size).map_err(bad)?.map_err(|_| bad(pack::PackError::NoTrailer { len: size }))
            }
        }
    }
}
