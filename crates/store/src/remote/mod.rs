//! The object-store backend: a store's chunks and manifests in an S3
//! bucket (AWS S3, Garage, Ceph RGW, MinIO) through the `object_store`
//! crate, with the local store directory as a read-through cache.
//!
//! Keys under the bucket's prefix:
//!
//! ```text
//! packs/<64 hex>             encoded chunks packed together, with a trailer listing them (pack.rs)
//! index/<64 hex>             which chunks are where in which packs: one object per commit (or gc)
//! checkpoints/<id>.json      a committed manifest: its presence is the commit
//! locks/<kind>-<expiry>-<n>  commit (shared) and gc (exclusive) leases
//! .probe/<n>                 the conditional-put probe at open (removed again)
//! ```
//!
//! **Atomic, create-only manifest commit.** An S3 PUT is atomic (the object
//! appears whole or not at all), so the manifest, written last as one
//! object, is the commit point, as the directory rename is locally. Create-
//! only: the key holds the checkpoint id, whose random tag makes it unique
//! to one writer; the commit HEADs the key first and refuses if it exists,
//! PUTs with `If-None-Match: *` ([`PutMode::Create`]) where the server
//! honours it — probed at open: a second create of the probe key must fail
//! — and plain PUT where it does not (Garage 2.x ignores the header), then
//! reads the object back and refuses unless it holds exactly its bytes
//! (read-after-write: a racing writer of the same key is detected, never
//! silently overwritten into a manifest that references chunks it did not
//! upload). See docs/object-store.md for the argument, crashes included.
//!
//! **Commits against gc** on several hosts: a commit holds a *shared*
//! lease, gc an *exclusive* one ([`Remote::lease`]): write the lease object,
//! then list `locks/`; a shared lease yields to a live exclusive one, an
//! exclusive one to any other live lease. Two contenders that both wrote
//! before either listed both see each other and both yield (and retry);
//! one that listed before the other wrote is seen by the other, which
//! yields. So a gc never runs while a commit that may deduplicate against
//! an unreferenced chunk is between its chunk listing and its manifest.
//!
//! Calls are synchronous: the backend owns a small tokio runtime and waits
//! on a channel, which works from any thread, inside another runtime too.

mod cache;
pub mod config;
pub mod pack;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::util::unix_ms;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use tracing::{debug, info, warn};

pub use cache::{CachedChunks, Tuning};
pub use config::{Credentials, RemoteConfig, BINDING_FILE, CREDENTIALS_ENV};

/// Errors of the object-store backend. Each names the endpoint and bucket.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("bad store URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("bad S3 endpoint {endpoint:?}: must start with http:// or https://")]
    BadEndpoint { endpoint: String },
    #[error("{}: cannot read", path.display())]
    ReadConfig {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    BadConfig { path: std::path::PathBuf, message: String },
    #[error("{}: credentials file is readable by others (mode {mode:o}); chmod 600 it", path.display())]
    CredentialsReadable { path: std::path::PathBuf, mode: u32 },
    #[error("no credentials for {store}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ${CREDENTIALS_ENV}, or credentials_file in the binding")]
    NoCredentials { store: String },
    #[error("cannot set up the S3 client for {store}")]
    Client {
        store: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot reach {endpoint} (bucket {bucket}): {op}")]
    Unreachable {
        endpoint: String,
        bucket: String,
        op: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{endpoint} refused the credentials for bucket {bucket} ({op})")]
    Credentials {
        endpoint: String,
        bucket: String,
        op: String,
        #[source]
        source: object_store::Error,
    },
    #[error("bucket {bucket} does not exist at {endpoint}")]
    NoBucket {
        endpoint: String,
        bucket: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{endpoint} (bucket {bucket}): {op}")]
    Op {
        endpoint: String,
        bucket: String,
        op: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{endpoint} (bucket {bucket}): manifest {key} already exists; a checkpoint is never overwritten")]
    ManifestExists { endpoint: String, bucket: String, key: String },
    #[error("{endpoint} (bucket {bucket}): manifest {key} read back differs from what was written (another writer raced for the same id)")]
    ManifestRace { endpoint: String, bucket: String, key: String },
    /// The manifest's PUT (or its read-back) failed, so the commit did not
    /// happen as far as the caller is concerned, but the object may still
    /// be there or appear later: a replicated store that missed its write
    /// quorum keeps the write on the replicas it reached (Garage does, and
    /// spreads it once the others are back). The store retracts it.
    #[error("{endpoint} (bucket {bucket}): the PUT of manifest {key} failed, and the object may still appear; the store retracts it once the bucket answers")]
    ManifestUnsettled {
        endpoint: String,
        bucket: String,
        key: String,
        #[source]
        source: Box<RemoteError>,
    },
    #[error("{endpoint} (bucket {bucket}): object {key} is larger than {max} bytes; refused")]
    TooLarge { endpoint: String, bucket: String, key: String, max: usize },
    #[error("bucket {bucket}: {what} is running (lease {holder}); try again once it is done")]
    Busy { bucket: String, what: &'static str, holder: String },
    #[error("bucket {bucket}: the backend's runtime is gone")]
    RuntimeGone { bucket: String },
}

impl RemoteError {
    /// Whether the object (or bucket) was not found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RemoteError::Op { source: object_store::Error::NotFound { .. }, .. })
    }
}

/// A lease's kind: commits share, gc excludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Shared,
    Exclusive,
}

impl LeaseKind {
    fn tag(self) -> &'static str {
        match self {
            LeaseKind::Shared => "commit",
            LeaseKind::Exclusive => "gc",
        }
    }
}

/// The largest manifest read from a bucket (~2 M chunks: a 64 GiB state).
pub const MAX_MANIFEST: usize = 256 << 20;

/// How long a lease lives unless renewed (a holder renews it every third
/// of this): a killed holder blocks gc (or commits) at most this long.
pub const LEASE_TTL: Duration = Duration::from_secs(90);

/// The objects of one store in a bucket, at one or more endpoints.
pub struct Remote {
    runtime: Option<tokio::runtime::Runtime>,
    /// `(endpoint label, client)`, tried in order starting at `current`.
    stores: Vec<(String, Arc<dyn ObjectStore>)>,
    current: AtomicUsize,
    bucket: String,
    prefix: String,
    /// Whether PUT with `If-None-Match: *` refuses an existing key here.
    conditional_put: bool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("endpoints", &self.stores.iter().map(|(e, _)| e).collect::<Vec<_>>())
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("conditional_put", &self.conditional_put)
            .finish()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Never block (or panic) when dropped inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether an error is the transport's (worth another endpoint) rather
/// than the server's definite answer.
fn is_transport(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

/// A fresh random-enough token (process, time, counter, hashed).
fn token() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(format!("{:?}{:?}", SystemTime::now(), std::time::Instant::now()).as_bytes());
    h.finalize().to_hex()[..16].to_owned()
}

impl Remote {
    /// Connects to the bucket of `cfg` and checks, before anything else
    /// happens, that the endpoint answers, the credentials are accepted and
    /// the bucket exists; then probes conditional puts.
    pub fn open(cfg: &RemoteConfig) -> Result<Remote, RemoteError> {
        let (bucket, prefix) = cfg.bucket_and_prefix()?;
        let creds = Credentials::resolve(cfg)?.ok_or_else(|| RemoteError::NoCredentials { store: cfg.label() })?;
        let retry = RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(8),
        };
        let options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(60))
            .with_allow_http(true);
        let endpoints: Vec<Option<&String>> =
            if cfg.endpoints.is_empty() { vec![None] } else { cfg.endpoints.iter().map(Some).collect() };
        let mut stores: Vec<(String, Arc<dyn ObjectStore>)> = Vec::new();
        for e in endpoints {
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&bucket)
                .with_region(cfg.region.as_deref().unwrap_or("us-east-1"))
                .with_access_key_id(&creds.access_key_id)
                .with_secret_access_key(&creds.secret_access_key)
                .with_retry(retry.clone())
                .with_client_options(options.clone())
                // Chunks are checked against their BLAKE3 ids and manifests against
                // their checksums on read, so the payload is not hashed a second
                // time for the signature (SHA-256 of every byte would halve the
                // upload rate on a busy core).
                .with_unsigned_payload(true);
            if let Some(t) = &creds.session_token {
                b = b.with_token(t);
            }
            let label = match e {
                Some(e) => {
                    // Path-style requests: what Garage, RGW and MinIO expect.
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                    e.clone()
                }
                None => format!("s3.{}.amazonaws.com", cfg.region.as_deref().unwrap_or("us-east-1")),
            };
            let s3 = b.build().map_err(|source| RemoteError::Client { store: cfg.label(), source })?;
            stores.push((label, Arc::new(s3)));
        }
        Remote::with_stores(stores, &bucket, &prefix)
    }

    /// A remote over given clients (tests use `object_store::memory`),
    /// probed like [`Remote::open`].
    pub fn with_stores(
        stores: Vec<(String, Arc<dyn ObjectStore>)>,
        bucket: &str,
        prefix: &str,
    ) -> Result<Remote, RemoteError> {
        assert!(!stores.is_empty(), "a remote needs at least one endpoint");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stasis-s3")
            .enable_all()
            .build()
            .map_err(|source| RemoteError::ReadConfig { path: "tokio runtime".into(), source })?;
        let mut remote = Remote {
            runtime: Some(runtime),
            stores,
            current: AtomicUsize::new(0),
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            conditional_put: false,
        };
        remote.probe()?;
        Ok(remote)
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The endpoint in use now.
    pub fn endpoint(&self) -> &str {
        &self.stores[self.current.load(Ordering::Relaxed) % self.stores.len()].0
    }

    /// Whether the server honours `If-None-Match: *` (probed at open).
    pub fn conditional_put(&self) -> bool {
        self.conditional_put
    }

    /// The full key of `rel` under the prefix.
    fn key(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `rel` of a full key (None if outside the prefix).
    fn rel<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(key)
        } else {
            key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it from this
    /// thread (any thread: no `block_on` inside another runtime).
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.runtime.as_ref().ok_or_else(|| RemoteError::RuntimeGone { bucket: self.bucket.clone() })?;
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| RemoteError::RuntimeGone { bucket: self.bucket.clone() })
    }

    pub(crate) fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Runs `op` against the current endpoint, then the others in turn
    /// while the transport fails; classifies the final error.
    fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RemoteError>
    where
        T: Send + 'static,
        F: Fn(Arc<dyn ObjectStore>) -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let n = self.stores.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            let (endpoint, store) = &self.stores[at];
            match self.run(op(store.clone()))? {
                Ok(v) => {
                    if at != start {
                        info!(endpoint = %endpoint, bucket = %self.bucket, "using another S3 endpoint");
                        self.current.store(at, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) if is_transport(&e) && i + 1 < n => {
                    warn!(endpoint = %endpoint, bucket = %self.bucket, op = what, error = %e, "S3 endpoint failed; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(self.classify(at, what, e)),
            }
        }
        let e = last.expect("at least one endpoint was tried");
        Err(self.classify(start, what, e))
    }

    fn classify(&self, at: usize, op: &str, source: object_store::Error) -> RemoteError {
        let endpoint = self.stores[at].0.clone();
        let bucket = self.bucket.clone();
        let op = op.to_owned();
        match source {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                RemoteError::Credentials { endpoint, bucket, op, source }
            }
            object_store::Error::Generic { .. } => RemoteError::Unreachable { endpoint, bucket, op, source },
            source => RemoteError::Op { endpoint, bucket, op, source },
        }
    }

    /// Checks endpoint, credentials and bucket, then whether a create-only
    /// PUT refuses an existing key. The check is a PUT of a probe object:
    /// unlike a LIST (whose failures the S3 client reports untyped), a
    /// PUT's answer is typed — 404 can only mean a missing bucket, 403 the
    /// credentials — and a store must be able to write anyway.
    fn probe(&mut self) -> Result<(), RemoteError> {
        let key = self.key(&format!(".probe/{}", token()));
        let put = |k: ObjPath, mode: PutMode| {
            move |s: Arc<dyn ObjectStore>| {
                let (k, mode) = (k.clone(), mode.clone());
                async move { s.put_opts(&k, PutPayload::from_static(b"probe"), PutOptions::from(mode)).await.map(|_| ()) }
            }
        };
        let missing_bucket = |e: RemoteError| match e {
            RemoteError::Op { endpoint, bucket, source: source @ object_store::Error::NotFound { .. }, .. } => {
                RemoteError::NoBucket { endpoint, bucket, source }
            }
            e => e,
        };
        let supported = match self.call("PUT a probe object", put(key.clone(), PutMode::Create)) {
            Ok(()) => match self.call("PUT a probe object again", put(key.clone(), PutMode::Create)) {
                Ok(()) => false,
                Err(RemoteError::Op {
                    source: object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
                    ..
                }) => true,
                Err(e) => return Err(missing_bucket(e)),
            },
            // A client or server without conditional PUT at all.
            Err(RemoteError::Op {
                source: object_store::Error::NotImplemented | object_store::Error::NotSupported { .. },
                ..
            }) => {
                self.call("PUT a probe object", put(key.clone(), PutMode::Overwrite)).map_err(missing_bucket)?;
                false
            }
            Err(e) => return Err(missing_bucket(e)),
        };
        let k = key.clone();
        if let Err(e) = self.call("remove the probe", move |s| {
            let k = k.clone();
            async move { s.delete(&k).await }
        }) {
            warn!(error = %e, "cannot remove the conditional-PUT probe object");
        }
        self.conditional_put = supported;
        info!(endpoint = %self.endpoint(), bucket = %self.bucket, conditional_put = supported, "object store opened");
        Ok(())
    }

    /// PUT `data` at `rel` (overwriting: content-addressed objects only).
    pub fn put(&self, rel: &str, data: impl Into<Bytes>) -> Result<(), RemoteError> {
        let key = self.key(rel);
        let data: Bytes = data.into();
        self.call("PUT", move |s| {
            let (key, data) = (key.clone(), data.clone());
            async move { s.put(&key, PutPayload::from_bytes(data)).await.map(|_| ()) }
        })
    }

    /// An upload future for [`CachedChunks`] (runs on the backend's runtime,
    /// trying every endpoint in turn).
    pub(crate) fn put_future(
        self: &Arc<Remote>,
        rel: &str,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<(), RemoteError>> + Send + 'static {
        let key = self.key(rel);
        self.clone().call_async("PUT", move |s| {
            let (key, data) = (key.clone(), data.clone());
            async move { s.put(&key, PutPayload::from_bytes(data)).await.map(|_| ()) }
        })
    }

    /// A ranged GET future: bytes `range` of `rel` (fewer when the object
    /// is shorter; never more).
    pub(crate) fn get_range_future(
        self: &Arc<Remote>,
        rel: &str,
        range: std::ops::Range<u64>,
    ) -> impl std::future::Future<Output = Result<Bytes, RemoteError>> + Send + 'static {
        let key = self.key(rel);
        self.clone().call_async("GET a range", move |s| {
            let (key, range) = (key.clone(), range.clone());
            async move {
                let opts = GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() };
                s.get_opts(&key, opts).await?.bytes().await
            }
        })
    }

    /// Bytes `range` of `rel` (see [`Remote::get_range_future`]).
    pub fn get_range(self: &Arc<Remote>, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes, RemoteError> {
        let want = range.end.saturating_sub(range.start);
        let data = self.run(self.get_range_future(rel, range))??;
        if data.len() as u64 > want {
            return Err(RemoteError::TooLarge {
                endpoint: self.endpoint().to_owned(),
                bucket: self.bucket.clone(),
                key: self.key(rel).to_string(),
                max: want as usize,
            });
        }
        Ok(data)
    }

    /// [`Remote::call`] as a future for the backend's runtime.
    pub(crate) async fn call_async<T, F, Fut>(self: Arc<Remote>, what: &'static str, op: F) -> Result<T, RemoteError>
    where
        T: Send + 'static,
        F: Fn(Arc<dyn ObjectStore>) -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let n = self.stores.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            match op(self.stores[at].1.clone()).await {
                Ok(v) => {
                    if at != start {
                        info!(endpoint = %self.stores[at].0, bucket = %self.bucket, "using another S3 endpoint");
                        self.current.store(at, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) if is_transport(&e) && i + 1 < n => {
                    warn!(endpoint = %self.stores[at].0, bucket = %self.bucket, op = what, error = %e, "S3 endpoint failed; trying the next");
                    last = Some((at, e));
                }
                Err(e) => return Err(self.classify(at, what, e)),
            }
        }
        let (at, e) = last.expect("at least one endpoint was tried");
        Err(self.classify(at, what, e))
    }

    /// GET `rel`, refusing an object larger than `max` bytes (the bucket's
    /// sizes are not trusted: at most `max + 1` bytes are ever requested).
    pub fn get(&self, rel: &str, max: usize) -> Result<Bytes, RemoteError> {
        let key = self.key(rel);
        let data = self.call("GET", move |s| {
            let key = key.clone();
            async move {
                let opts = GetOptions { range: Some(GetRange::Bounded(0..max as u64 + 1)), ..Default::default() };
                s.get_opts(&key, opts).await?.bytes().await
            }
        })?;
        if data.len() > max {
            return Err(RemoteError::TooLarge {
                endpoint: self.endpoint().to_owned(),
                bucket: self.bucket.clone(),
                key: self.key(rel).to_string(),
                max,
            });
        }
        Ok(data)
    }

    /// Whether `rel` exists (HEAD).
    pub fn exists(&self, rel: &str) -> Result<bool, RemoteError> {
        let key = self.key(rel);
        match self.call("HEAD", move |s| {
            let key = key.clone();
            async move { s.head(&key).await.map(|_| ()) }
        }) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// DELETE `rel` (absent is fine).
    pub fn delete(&self, rel: &str) -> Result<(), RemoteError> {
        let key = self.key(rel);
        match self.call("DELETE", move |s| {
            let key = key.clone();
            async move { s.delete(&key).await }
        }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// Every object under `rel_dir/` as `(name after rel_dir/, size)`.
    pub fn list(&self, rel_dir: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        let prefix = self.key(rel_dir);
        let keys: Vec<(String, u64)> =
            self.call("LIST", move |s| {
                let prefix = prefix.clone();
                async move {
                    s.list(Some(&prefix)).map_ok(|m| (m.location.to_string(), m.size)).try_collect::<Vec<_>>().await
                }
            })?;
        let dir = format!("{rel_dir}/");
        Ok(keys
            .into_iter()
            .filter_map(|(k, size)| {
                self.rel(&k).and_then(|r| r.strip_prefix(dir.as_str())).map(|name| (name.to_owned(), size))
            })
            .collect())
    }

    /// The key of checkpoint `id`'s manifest.
    fn manifest_rel(id: &str) -> String {
        format!("checkpoints/{id}.json")
    }

    /// Commits manifest `bytes` of checkpoint `id`: create-only and atomic
    /// (see the module docs). Once this returns Ok the checkpoint exists.
    pub fn commit_manifest(&self, id: &str, bytes: Bytes) -> Result<(), RemoteError> {
        let rel = Remote::manifest_rel(id);
        let exists = |e: &Remote| RemoteError::ManifestExists {
            endpoint: e.endpoint().to_owned(),
            bucket: e.bucket.clone(),
            key: e.key(&rel).to_string(),
        };
        if self.exists(&rel)? {
            return Err(exists(self));
        }
        let key = self.key(&rel);
        let mode = if self.conditional_put { PutMode::Create } else { PutMode::Overwrite };
        let data = bytes.clone();
        let unsettled = |e: &Remote, source: RemoteError| RemoteError::ManifestUnsettled {
            endpoint: e.endpoint().to_owned(),
            bucket: e.bucket.clone(),
            key: e.key(&rel).to_string(),
            source: Box::new(source),
        };
        match self.call("PUT the manifest", move |s| {
            let (key, data, mode) = (key.clone(), data.clone(), mode.clone());
            async move { s.put_opts(&key, PutPayload::from_bytes(data), PutOptions::from(mode)).await.map(|_| ()) }
        }) {
            Ok(()) => {}
            Err(RemoteError::Op {
                source: object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
                ..
            }) => return Err(exists(self)),
            Err(e) => return Err(unsettled(self, e)),
        }
        // Anything longer than ours is not ours either.
        let back = match self.get(&rel, bytes.len()) {
            Err(RemoteError::TooLarge { .. }) => None,
            Err(e) => return Err(unsettled(self, e)),
            Ok(b) => Some(b),
        };
        if back.as_ref() != Some(&bytes) {
            return Err(RemoteError::ManifestRace {
                endpoint: self.endpoint().to_owned(),
                bucket: self.bucket.clone(),
                key: self.key(&rel).to_string(),
            });
        }
        debug!(id, bucket = %self.bucket, "manifest committed to the object store");
        Ok(())
    }

    /// Ids of the committed manifests in the bucket.
    pub fn manifest_ids(&self) -> Result<Vec<String>, RemoteError> {
        let mut ids: Vec<String> = self
            .list("checkpoints")?
            .into_iter()
            .filter_map(|(name, _)| name.strip_suffix(".json").map(str::to_owned))
            .filter(|id| !id.contains('/'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The manifest bytes of checkpoint `id`.
    pub fn manifest(&self, id: &str) -> Result<Bytes, RemoteError> {
        self.get(&Remote::manifest_rel(id), MAX_MANIFEST)
    }

    /// Deletes checkpoint `id`'s manifest (the checkpoint is gone once this
    /// returns; its chunks stay until gc).
    pub fn delete_manifest(&self, id: &str) -> Result<(), RemoteError> {
        self.delete(&Remote::manifest_rel(id))
    }

    /// Takes a lease of `kind` (see the module docs), retrying for up to
    /// `wait` while a conflicting one is live.
    pub fn lease(self: &Arc<Remote>, kind: LeaseKind, wait: Duration) -> Result<Lease, RemoteError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.try_lease(kind) {
                Err(RemoteError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    fn lease_rel(kind: LeaseKind, expires_ms: u64, token: &str) -> String {
        format!("locks/{}-{expires_ms:013}-{token}", kind.tag())
    }

    fn try_lease(self: &Arc<Remote>, kind: LeaseKind) -> Result<Lease, RemoteError> {
        let token = token();
        let expires = unix_ms() + LEASE_TTL.as_millis() as u64;
        let rel = Remote::lease_rel(kind, expires, &token);
        self.put(&rel, Bytes::new())?;
        let mine = rel.strip_prefix("locks/").expect("lease keys are under locks/").to_owned();
        let now = unix_ms();
        let conflict = self.list("locks")?.into_iter().find_map(|(name, _)| {
            if name == mine {
                return None;
            }
            let mut parts = name.splitn(3, '-');
            let (tag, exp) = (parts.next()?, parts.next()?.parse::<u64>().ok()?);
            let live = exp > now;
            let conflicts = match kind {
                LeaseKind::Shared => tag == LeaseKind::Exclusive.tag(),
                LeaseKind::Exclusive => true,
            };
            (live && conflicts).then_some(name)
        });
        if let Some(holder) = conflict {
            let _ = self.delete(&rel);
            return Err(RemoteError::Busy {
                bucket: self.bucket.clone(),
                what: if holder.starts_with("gc-") { "gc" } else { "a checkpoint commit" },
                holder,
            });
        }
        Ok(Lease::start(self.clone(), kind, token, rel))
    }
}

/// A held lease, renewed in the background until dropped.
pub struct Lease {
    remote: Arc<Remote>,
    current: Arc<std::sync::Mutex<String>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.current).finish()
    }
}

impl Lease {
    fn start(remote: Arc<Remote>, kind: LeaseKind, token: String, rel: String) -> Lease {
        let current = Arc::new(std::sync::Mutex::new(rel));
        let renewer = remote.handle().map(|h| {
            let (remote, current) = (remote.clone(), current.clone());
            h.spawn(async move {
                loop {
                    tokio::time::sleep(LEASE_TTL / 3).await;
                    let next = Remote::lease_rel(kind, unix_ms() + LEASE_TTL.as_millis() as u64, &token);
                    if remote.put_future(&next, Bytes::new()).await.is_err() {
                        continue;
                    }
                    let old = std::mem::replace(&mut *current.lock().unwrap_or_else(|e| e.into_inner()), next);
                    let key = remote.key(&old);
                    let _ = remote.stores[remote.current.load(Ordering::Relaxed) % remote.stores.len()]
                        .1
                        .delete(&key)
                        .await;
                }
            })
        });
        Lease { remote, current, renewer }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        let rel = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Err(e) = self.remote.delete(&rel) {
            warn!(error = %e, lease = %rel, "cannot remove a lease (it expires by itself)");
        }
    }
}
