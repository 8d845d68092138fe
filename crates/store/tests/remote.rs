//! The object-store backend over `object_store`'s in-memory store (and
//! wrappers that behave like Garage or like a dead endpoint): commits,
//! a restore elsewhere with a cold cache, the create-only manifest commit
//! with and without conditional PUT, fsck and gc against the bucket,
//! retention, leases, fail-over and the refusals of bad configurations.
//! The same backend against a real 3-node Garage cluster is in
//! `tests/tests/objstore.rs`.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};
use stasis_store::remote::{CachedChunks, LeaseKind, RemoteError, Tuning};
use stasis_store::*;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a wrapped store does differently.
#[derive(Debug, Default)]
struct Faults {
    /// Ignore `PutMode::Create` (Garage 2.x: the PUT overwrites).
    ignore_create: bool,
    /// Every call fails as an unreachable endpoint would.
    dead: AtomicBool,
    /// A manifest PUT is overwritten by "another writer" right after.
    race_manifests: AtomicBool,
    /// A manifest PUT is stored but answered with an error, as Garage does
    /// when the write misses its quorum on the one replica it reached.
    stray_manifests: AtomicBool,
    /// Listing names a manifest whose GET answers 404 (a stray write on a
    /// replica the GET's quorum does not include).
    phantom_manifest: AtomicBool,
}

#[derive(Debug)]
struct Wrapped {
    inner: Arc<InMemory>,
    faults: Arc<Faults>,
}

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wrapped({})", self.inner)
    }
}

impl Wrapped {
    fn check(&self) -> object_store::Result<()> {
        if self.faults.dead.load(Ordering::Relaxed) {
            return Err(object_store::Error::Generic { store: "test", source: "connection refused".into() });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Wrapped {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        if self.faults.ignore_create {
            opts.mode = object_store::PutMode::Overwrite;
        }
        let r = self.inner.put_opts(location, payload, opts).await?;
        if self.faults.race_manifests.load(Ordering::Relaxed) && location.as_ref().contains("checkpoints/") {
            self.inner.put(location, PutPayload::from_static(b"{\"another\":\"writer\"}")).await?;
        }
        if self.faults.stray_manifests.load(Ordering::Relaxed) && location.as_ref().contains("checkpoints/") {
            return Err(object_store::Error::Generic { store: "test", source: "could not reach quorum".into() });
        }
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &ObjPath, options: GetOptions) -> object_store::Result<GetResult> {
        self.check()?;
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &ObjPath) -> object_store::Result<()> {
        self.check()?;
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if let Err(e) = self.check() {
            return Box::pin(futures::stream::once(async move { Err(e) }));
        }
        if self.faults.phantom_manifest.load(Ordering::Relaxed) {
            use futures::StreamExt;
            // Each manifest listed comes with a twin that is not there.
            return Box::pin(self.inner.list(prefix).flat_map(|r| {
                let twin = r.as_ref().ok().filter(|m| m.location.as_ref().ends_with(".json")).map(|m| {
                    let mut t = m.clone();
                    let dir = m.location.as_ref().rsplit_once('/').map_or("", |(d, _)| d).to_owned();
                    t.location = ObjPath::from(format!("{dir}/0009-deadbeef.json"));
                    Ok(t)
                });
                futures::stream::iter(std::iter::once(r).chain(twin))
            }));
        }
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &ObjPath, to: &ObjPath) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &ObjPath, to: &ObjPath) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// A bucket (in memory) and its faults.
struct Bucket {
    mem: Arc<InMemory>,
    faults: Arc<Faults>,
}

impl Bucket {
    fn new(garage_like: bool) -> Bucket {
        Bucket {
            mem: Arc::new(InMemory::new()),
            faults: Arc::new(Faults { ignore_create: garage_like, ..Default::default() }),
        }
    }

    fn remote(&self) -> Arc<Remote> {
        let store: Arc<dyn ObjectStore> = Arc::new(Wrapped { inner: self.mem.clone(), faults: self.faults.clone() });
        Arc::new(Remote::with_stores(vec![("mem://a".into(), store)], "stasis", "exp/one").unwrap())
    }

    fn keys(&self, under: &str) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let prefix = ObjPath::from(format!("exp/one/{under}"));
        rt.block_on(async {
            use futures::TryStreamExt;
            self.mem.list(Some(&prefix)).map_ok(|m| m.location.to_string()).try_collect::<Vec<_>>().await.unwrap()
        })
    }

    fn put_raw(&self, key: &str, data: Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(self.mem.put(&ObjPath::from(format!("exp/one/{key}")), PutPayload::from(data))).unwrap();
    }

    fn delete_raw(&self, key: &str) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(self.mem.delete(&ObjPath::from(format!("exp/one/{key}")))).unwrap();
    }
}

fn commit(store: &Store, name: Option<&str>, seed: u64) -> CheckpointInfo {
    let p = store.begin(name).unwrap();
    let mut draft = ManifestDraft::default();
    for (file, data) in [("vm-a", noise(seed, 1 << 20)), ("net", noise(seed + 1000, 50_000))] {
        fs::write(p.path(file), data).unwrap();
        draft.components.push(ComponentDraft {
            name: file.into(),
            kind: ComponentKind::Vm,
            file: file.into(),
            ..Default::default()
        });
    }
    fs::write(p.path("disks.json"), format!("{{\"seed\":{seed}}}")).unwrap();
    draft.files.push("disks.json".into());
    p.commit(draft).unwrap()
}

#[test]
fn conditional_put_is_probed_at_open() {
    assert!(Bucket::new(false).remote().conditional_put());
    assert!(!Bucket::new(true).remote().conditional_put());
}

#[test]
fn a_checkpoint_restores_elsewhere_from_the_bucket_alone() {
    for garage_like in [false, true] {
        let bucket = Bucket::new(garage_like);
        let tmp = tempfile::tempdir().unwrap();
        let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
        let one = commit(&here, None, 1);
        let two = commit(&here, Some("two"), 2);
        assert_eq!(bucket.keys("checkpoints").len(), 2);

        // Another host: nothing local, a cold cache.
        let there = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
        let ids: Vec<String> = there.list().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![one.id.clone(), two.id.clone()]);
        let c = there.open_checkpoint("two").unwrap();
        assert_eq!(c.manifest.version, VERSION, "files are chunked: 1.2");
        let m = c.materialized(&tmp.path().join("restore")).unwrap();
        assert_eq!(fs::read(m.file("vm-a")).unwrap(), noise(2, 1 << 20));
        assert_eq!(fs::read(m.file("net")).unwrap(), noise(1002, 50_000));
        // The further file came from the bucket too (the other host's copy is not here).
        assert_eq!(fs::read_to_string(m.file("disks.json")).unwrap(), "{\"seed\":2}");
        // The restore filled the cache: chunks are local now.
        assert!(!there.chunks().list().unwrap().is_empty());
        assert!(fs::read_dir(tmp.path().join("h2/chunks")).unwrap().count() > 1);
        assert!(there.fsck().unwrap().is_clean());
        // Committed after the other host last looked: still found there.
        let three = commit(&here, Some("three"), 3);
        let m = there.open_checkpoint(&three.id).unwrap().materialized(&tmp.path().join("restore3")).unwrap();
        assert_eq!(fs::read(m.file("vm-a")).unwrap(), noise(3, 1 << 20));
        assert_eq!(fs::read_to_string(m.file("disks.json")).unwrap(), "{\"seed\":3}");
    }
}

#[test]
fn a_manifest_is_never_overwritten() {
    for garage_like in [false, true] {
        let bucket = Bucket::new(garage_like);
        let remote = bucket.remote();
        remote.commit_manifest("0001-aaaaaaaa", Bytes::from_static(b"{\"first\":1}")).unwrap();
        let e = remote.commit_manifest("0001-aaaaaaaa", Bytes::from_static(b"{\"second\":2}")).unwrap_err();
        assert!(matches!(e, RemoteError::ManifestExists { .. }), "{e}");
        assert_eq!(&remote.manifest("0001-aaaaaaaa").unwrap()[..], b"{\"first\":1}");
        // A writer that raced in between our check and our read-back.
        bucket.faults.race_manifests.store(true, Ordering::Relaxed);
        let e = remote.commit_manifest("0002-bbbbbbbb", Bytes::from_static(b"{\"mine\":1}")).unwrap_err();
        assert!(matches!(e, RemoteError::ManifestRace { .. }), "{e}");
        assert!(e.to_string().contains("bucket stasis"), "{e}");
    }
}

#[test]
fn a_failed_manifest_commit_leaves_no_checkpoint() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    commit(&store, None, 1);
    bucket.faults.race_manifests.store(true, Ordering::Relaxed);
    let p = store.begin(None).unwrap();
    fs::write(p.path("vm-a"), noise(5, 1000)).unwrap();
    let draft = ManifestDraft {
        components: vec![ComponentDraft { name: "vm-a".into(), file: "vm-a".into(), ..Default::default() }],
        ..Default::default()
    };
    let e = p.commit(draft).unwrap_err();
    assert!(matches!(e, StoreError::Remote(RemoteError::ManifestRace { .. })), "{e}");
    bucket.faults.race_manifests.store(false, Ordering::Relaxed);
    // The racing "writer" left a manifest that does not check: skipped.
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(store.pending_dirs().unwrap().is_empty());
}

/// A Garage-like bucket with one checkpoint committed from host "h1".
fn garage_like_with_one_checkpoint() -> (Bucket, tempfile::TempDir, Store, CheckpointInfo) {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let h1 = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    let c1 = commit(&h1, None, 1);
    (bucket, tmp, h1, c1)
}

fn ids(store: &Store) -> Vec<String> {
    store.list().unwrap().into_iter().map(|i| i.id).collect()
}

#[test]
fn a_manifest_put_that_failed_but_was_stored_is_retracted() {
    let (bucket, _tmp, h1, c1) = garage_like_with_one_checkpoint();
    let p = h1.begin(None).unwrap();
    let id = p.id().to_owned();
    fs::write(p.path("vm-a"), noise(6, 1000)).unwrap();
    let draft = ManifestDraft {
        components: vec![ComponentDraft { name: "vm-a".into(), file: "vm-a".into(), ..Default::default() }],
        ..Default::default()
    };
    // The PUT is kept by the bucket but answered with an error.
    bucket.faults.stray_manifests.store(true, Ordering::Relaxed);
    let e = p.commit(draft).unwrap_err();
    bucket.faults.stray_manifests.store(false, Ordering::Relaxed);
    assert!(matches!(e, StoreError::Remote(RemoteError::ManifestUnsettled { .. })), "{e}");
    assert!(h1.pending_dirs().unwrap().is_empty());
    let marker = h1.root().join(format!(".retract-{id}"));
    // The immediate retraction ran while the bucket still answered: gone already.
    assert!(!marker.exists(), "the retraction succeeded at once, so no marker is left");
    assert!(bucket.keys("checkpoints").iter().all(|k| !k.contains(&id)), "{:?}", bucket.keys("checkpoints"));
    assert_eq!(ids(&h1), vec![c1.id.clone()]);
}

#[test]
fn a_retraction_that_cannot_run_at_once_runs_at_the_next_listing() {
    let (bucket, tmp, h1, c1) = garage_like_with_one_checkpoint();
    // A stray manifest of this store's, its retraction noted but not done
    // (the bucket was unreachable when the commit failed).
    let stray = "0002-0badc0de";
    let good = h1.open_checkpoint(&c1.id).unwrap();
    let text = fs::read(good.dir.join("manifest.json")).unwrap();
    bucket.put_raw(&format!("checkpoints/{stray}.json"), text);
    fs::write(h1.root().join(format!(".retract-{stray}")), b"").unwrap();
    // Another host lists before h1 is back: it sees what the bucket holds.
    let h2 = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    bucket.faults.dead.store(true, Ordering::Relaxed);
    assert!(h1.list().is_err(), "an unreachable bucket is an error, not an empty list");
    assert!(h1.root().join(format!(".retract-{stray}")).exists(), "kept until a DELETE succeeds");
    bucket.faults.dead.store(false, Ordering::Relaxed);
    assert_eq!(ids(&h1), vec![c1.id.clone()]);
    assert!(!h1.root().join(format!(".retract-{stray}")).exists());
    assert!(bucket.keys("checkpoints").iter().all(|k| !k.contains(stray)), "{:?}", bucket.keys("checkpoints"));
    assert_eq!(ids(&h2), vec![c1.id.clone()]);
}

#[test]
fn a_listed_manifest_that_is_not_there_is_skipped() {
    let (bucket, tmp, _h1, c1) = garage_like_with_one_checkpoint();
    bucket.faults.phantom_manifest.store(true, Ordering::Relaxed);
    let h2 = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    assert_eq!(ids(&h2), vec![c1.id.clone()]);
}

/// Where chunk `id` (hex) is in the bucket: `(pack key, offset, encoded
/// length)`, found through the bucket's index as another host would.
fn locate(remote: &Arc<Remote>, dir: &std::path::Path, id: &str) -> (String, u64, u64) {
    let chunks = CachedChunks::new(LocalChunks::open(dir).unwrap(), remote.clone()).unwrap();
    chunks.locate(&ChunkId::from_hex(id).unwrap()).unwrap().expect("the chunk is in an indexed pack")
}

/// Flips a byte inside chunk `id`'s bytes in its pack in the bucket.
fn damage(bucket: &Bucket, dir: &std::path::Path, id: &str) {
    let remote = bucket.remote();
    let (key, offset, len) = locate(&remote, dir, id);
    let mut bytes = remote.get(&key, 64 << 20).unwrap().to_vec();
    bytes[(offset + len - 1) as usize] ^= 0x5a;
    bucket.put_raw(&key, bytes);
}

#[test]
fn chunks_go_to_the_bucket_in_a_few_packs_with_an_index() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    let info = commit(&here, None, 1);
    let c = here.open_checkpoint(&info.id).unwrap();
    let n = c.manifest.component("vm-a").unwrap().chunks.as_ref().unwrap().len();
    assert!(n > 10, "{n} chunks");
    // One commit: one pack (1 MiB is below the pack target) and one index.
    assert_eq!(bucket.keys("packs").len(), 1);
    assert_eq!(bucket.keys("index").len(), 1);
    assert!(bucket.keys("chunks").is_empty(), "no chunk is an object of its own");
    // The same data again dedups against the pack: no pack, no index.
    let again = here.begin(None).unwrap();
    fs::write(again.path("vm-a"), noise(1, 1 << 20)).unwrap();
    again.commit(one_file_draft()).unwrap();
    assert_eq!((bucket.keys("packs").len(), bucket.keys("index").len()), (1, 1));

    // A small pack target: several packs from one commit, one index.
    let tuned = Tuning { pack_target: 64 << 10, ..Default::default() };
    let cached = |dir: &str| {
        CachedChunks::with_tuning(LocalChunks::open(&tmp.path().join(dir)).unwrap(), bucket.remote(), tuned).unwrap()
    };
    let small = Store::open_with(&tmp.path().join("h3"), Arc::new(cached("h3/chunks"))).unwrap();
    let p = small.begin(None).unwrap();
    let data = noise(7, 1 << 20);
    fs::write(p.path("vm-a"), &data).unwrap();
    let info = p.commit(one_file_draft()).unwrap();
    assert!(bucket.keys("packs").len() > 5, "{:?}", bucket.keys("packs"));
    assert_eq!(bucket.keys("index").len(), 2, "one index object per commit");
    let refs = small.open_checkpoint(&info.id).unwrap().manifest.component("vm-a").unwrap().chunks.clone().unwrap();
    let ids: Vec<ChunkId> = refs.iter().map(|r| ChunkId::from_hex(&r.id).unwrap()).collect();
    // Elsewhere, a few chunks (ranges of packs), then all (whole packs,
    // several in flight): each reads back as written.
    let cold = cached("h4");
    let few: Vec<ChunkId> = ids.iter().step_by(7).copied().collect();
    cold.prefetch(&few);
    for id in &few {
        chunk::decode(id, &cold.get(id).unwrap()).unwrap();
    }
    cold.prefetch(&ids);
    let mut back = Vec::new();
    for id in &ids {
        back.extend(chunk::decode(id, &cold.get(id).unwrap()).unwrap());
    }
    assert!(back == data, "the chunks read back differ");
}

fn one_file_draft() -> ManifestDraft {
    ManifestDraft {
        components: vec![ComponentDraft { name: "vm-a".into(), file: "vm-a".into(), ..Default::default() }],
        ..Default::default()
    }
}

#[test]
fn fsck_names_a_damaged_or_missing_chunk_in_the_bucket_and_a_restore_refuses() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    let info = commit(&here, Some("good"), 1);
    let c = here.open_checkpoint("good").unwrap();
    let chunks = c.manifest.component("vm-a").unwrap().chunks.clone().unwrap();

    // Damaged in the bucket's pack (the cache here still has the good
    // copy): fsck reads the bucket and names checkpoint, component and chunk.
    let damaged = &chunks[2].id;
    damage(&bucket, &tmp.path().join("probe"), damaged);
    let report = here.fsck().unwrap();
    let p =
        report.problems.iter().find(|p| p.chunk.as_deref() == Some(damaged.as_str())).expect("fsck reports the chunk");
    assert_eq!(p.checkpoint, info.id);
    assert_eq!(p.component.as_deref(), Some("vm-a"));
    assert_eq!(report.problems.len(), 1, "only that chunk: {:?}", report.problems);
    // A restore here reads the good cached pack.
    here.open_checkpoint("good").unwrap().materialized(&tmp.path().join("r1")).unwrap();
    // A restore elsewhere (cold cache) refuses, naming the chunk.
    let there = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    let e = there.open_checkpoint("good").unwrap().materialized(&tmp.path().join("r2")).unwrap_err();
    assert!(
        matches!(&e, StoreError::ChunkDamaged { chunk, component, .. } if chunk == damaged && component == "vm-a"),
        "{e}"
    );
    assert!(!tmp.path().join("r2/vm-a").exists());

    // Its pack deleted from the bucket: opening refuses already (one
    // listing), naming a chunk of it; fsck names every chunk of the pack.
    let (pack, _, _) = locate(&bucket.remote(), &tmp.path().join("probe2"), &chunks[4].id);
    bucket.delete_raw(&pack);
    let e = here.open_checkpoint("good").unwrap_err();
    assert!(matches!(&e, StoreError::ChunkMissing { chunk, .. } if chunks.iter().any(|c| c.id == *chunk)), "{e}");
    let report = here.fsck().unwrap();
    for c in &chunks {
        assert!(report.problems.iter().any(|p| p.chunk.as_deref() == Some(c.id.as_str())), "{} not named", c.id);
    }
}

#[test]
fn a_hostile_index_object_is_ignored_and_its_chunks_are_missing() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    commit(&here, Some("good"), 1);
    let index = bucket.keys("index").pop().unwrap();
    let rel = index.trim_start_matches("exp/one/").to_owned();
    let mut bytes = bucket.remote().get(&rel, 64 << 20).unwrap().to_vec();
    // Rewritten under its own name with other bytes, and garbage under a
    // name that is its hash: both refused, the chunks are missing elsewhere.
    bytes[40] ^= 1;
    bucket.put_raw(&rel, bytes);
    let garbage = b"not an index".to_vec();
    bucket.put_raw(&format!("index/{}", blake3::hash(&garbage).to_hex()), garbage);
    let there = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    // (disks.json, chunked in the bucket, could not be fetched: named.)
    let e = there.open_checkpoint("good").unwrap_err();
    assert!(e.to_string().contains("disks.json") || matches!(e, StoreError::ChunkMissing { .. }), "{e}");
    // gc keeps the pack no good index names: its trailer says it holds
    // live chunks, so it is indexed again and the checkpoint restores.
    let report = there.gc().unwrap();
    assert_eq!(report.packs_removed, 0, "{report:?}");
    let m = there.open_checkpoint("good").unwrap().materialized(&tmp.path().join("r")).unwrap();
    assert_eq!(fs::read(m.file("vm-a")).unwrap(), noise(1, 1 << 20));
    assert!(there.fsck().unwrap().is_clean());
}

#[test]
fn retention_and_gc_work_against_the_bucket() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    let infos: Vec<CheckpointInfo> = (1..=4).map(|s| commit(&here, None, s)).collect();
    assert_eq!(bucket.keys("packs").len(), 4);
    // Keep 1, but protect the first (a recovery restores it).
    let gone = here.prune(&Retention { keep: 1, keep_daily: 0 }, &[&infos[0].id]).unwrap();
    let gone: Vec<&str> = gone.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(gone, vec![infos[1].id.as_str(), infos[2].id.as_str()]);
    assert_eq!(bucket.keys("checkpoints").len(), 2);
    // Another host sees the deletions.
    let there = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    assert_eq!(there.list().unwrap().len(), 2);
    let report = here.gc().unwrap();
    assert!(report.chunks_removed > 0);
    // The two dead checkpoints' packs are gone, the indexes merged into one.
    assert_eq!(report.packs_removed, 2, "{report:?}");
    assert_eq!(bucket.keys("packs").len(), 2);
    assert_eq!(bucket.keys("index").len(), 1);
    // What is left still restores, from a cold cache.
    for keep in [&infos[0], &infos[3]] {
        let m = there.open_checkpoint(&keep.id).unwrap().materialized(&tmp.path().join(&keep.id)).unwrap();
        assert_eq!(fs::read(m.file("vm-a")).unwrap(), noise(keep.index, 1 << 20));
    }
    assert!(here.fsck().unwrap().is_clean());
    assert_eq!(here.fsck().unwrap().orphan_chunks, 0);
    // A second gc has nothing to do.
    let again = here.gc().unwrap();
    assert_eq!((again.packs_removed, again.packs_written, again.chunks_removed), (0, 0, 0), "{again:?}");
}

#[test]
fn gc_rewrites_a_pack_whose_chunks_are_mostly_dead() {
    let bucket = Bucket::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let here = Store::open_remote(&tmp.path().join("h1"), bucket.remote()).unwrap();
    let one = commit(&here, None, 1);
    // The second shares the first 200 KiB of vm-a with the first, then differs.
    let p = here.begin(None).unwrap();
    let mut data = noise(1, 1 << 20)[..200 << 10].to_vec();
    data.extend(noise(9, 800 << 10));
    fs::write(p.path("vm-a"), &data).unwrap();
    let two = p.commit(one_file_draft()).unwrap();
    here.delete_checkpoint(&one.id).unwrap();
    let before: Vec<String> = bucket.keys("packs");
    let report = here.gc().unwrap();
    // The first pack was ~20 % live: its live chunks were copied into a
    // new pack, and it was deleted.
    assert_eq!((report.packs_removed, report.packs_written), (1, 1), "{report:?}");
    assert!(report.bytes_rewritten > 100 << 10 && report.bytes_rewritten < 400 << 10, "{report:?}");
    let after: Vec<String> = bucket.keys("packs");
    assert_eq!(after.len(), 2);
    assert!(after.iter().any(|k| !before.contains(k)), "a new pack");
    let there = Store::open_remote(&tmp.path().join("h2"), bucket.remote()).unwrap();
    let m = there.open_checkpoint(&two.id).unwrap().materialized(&tmp.path().join("r")).unwrap();
    assert_eq!(fs::read(m.file("vm-a")).unwrap(), data);
    let f = there.fsck().unwrap();
    assert!(f.is_clean() && f.orphan_chunks == 0, "{f:?}");
}

#[test]
fn gc_and_commits_exclude_each_other_through_leases() {
    let bucket = Bucket::new(true);
    let remote = bucket.remote();
    let commit_lease = remote.lease(LeaseKind::Shared, std::time::Duration::ZERO).unwrap();
    // Commits share.
    let other_commit = remote.lease(LeaseKind::Shared, std::time::Duration::ZERO).unwrap();
    let e = remote.lease(LeaseKind::Exclusive, std::time::Duration::ZERO).unwrap_err();
    assert!(matches!(e, RemoteError::Busy { what: "a checkpoint commit", .. }), "{e}");
    drop(commit_lease);
    drop(other_commit);
    assert!(bucket.keys("locks").is_empty(), "released leases are removed");
    let gc = remote.lease(LeaseKind::Exclusive, std::time::Duration::ZERO).unwrap();
    let e = remote.lease(LeaseKind::Shared, std::time::Duration::ZERO).unwrap_err();
    assert!(matches!(e, RemoteError::Busy { what: "gc", .. }), "{e}");
    // The loser removed its own lease object: only gc's is there.
    assert_eq!(bucket.keys("locks").len(), 1);
    drop(gc);
    // A lease whose holder died (expired) does not count.
    bucket.put_raw("locks/gc-0000000000001-deadbeef", vec![]);
    remote.lease(LeaseKind::Shared, std::time::Duration::ZERO).unwrap();
}

#[test]
fn another_endpoint_is_used_while_one_is_dead() {
    let mem = Arc::new(InMemory::new());
    let dead = Arc::new(Faults::default());
    dead.dead.store(true, Ordering::Relaxed);
    let stores: Vec<(String, Arc<dyn ObjectStore>)> = vec![
        ("dead".into(), Arc::new(Wrapped { inner: mem.clone(), faults: dead.clone() })),
        ("alive".into(), Arc::new(Wrapped { inner: mem.clone(), faults: Arc::default() })),
    ];
    let remote = Arc::new(Remote::with_stores(stores, "stasis", "p").unwrap());
    assert_eq!(remote.endpoint(), "alive");
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_remote(tmp.path(), remote).unwrap();
    commit(&store, None, 3);
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn bad_configurations_are_refused_before_anything_else() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |url: &str, endpoints: Vec<&str>| RemoteConfig {
        url: url.into(),
        endpoints: endpoints.into_iter().map(str::to_owned).collect(),
        region: Some("garage".into()),
        credentials_file: None,
    };
    // URLs and endpoints.
    for url in ["http://bucket", "s3://B", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"] {
        let e = Store::bind_remote(tmp.path(), &cfg(url, vec!["http://127.0.0.1:1"])).unwrap_err();
        assert!(matches!(e, StoreError::Remote(RemoteError::BadUrl { .. })), "{url}: {e}");
    }
    let e = Store::bind_remote(tmp.path(), &cfg("s3://ok-bucket", vec!["127.0.0.1:1"])).unwrap_err();
    assert!(matches!(e, StoreError::Remote(RemoteError::BadEndpoint { .. })), "{e}");
    // A credentials file others can read.
    let creds = tmp.path().join("creds.toml");
    fs::write(&creds, "access_key_id = \"GK1\"\nsecret_access_key = \"s3cr3t\"\n").unwrap();
    fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut c = cfg("s3://ok-bucket", vec!["http://127.0.0.1:1"]);
    c.credentials_file = Some(creds.clone());
    let e = Store::bind_remote(tmp.path(), &c).unwrap_err();
    assert!(matches!(e, StoreError::Remote(RemoteError::CredentialsReadable { .. })), "{e}");
    // An endpoint nothing listens on: named, and quickly.
    fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let started = std::time::Instant::now();
    let e = Store::bind_remote(&tmp.path().join("s"), &c).unwrap_err();
    assert!(matches!(e, StoreError::Remote(RemoteError::Unreachable { .. })), "{e}");
    let chain = anyhow_like(&e);
    assert!(chain.contains("http://127.0.0.1:1") && chain.contains("ok-bucket"), "{chain}");
    assert!(!chain.contains("s3cr3t"), "the secret never shows: {chain}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // Nothing was bound.
    assert!(!tmp.path().join("s").join(stasis_store::remote::BINDING_FILE).exists());
}

/// The error and its sources, as a binary prints them.
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out.push_str(": ");
        out.push_str(&x.to_string());
        s = x.source();
    }
    out
}

#[test]
fn credentials_never_show_in_debug_output() {
    let c = stasis_store::remote::Credentials {
        access_key_id: "GKabc".into(),
        secret_access_key: "very-secret".into(),
        session_token: None,
    };
    let shown = format!("{c:?}");
    assert!(shown.contains("GKabc") && !shown.contains("very-secret"), "{shown}");
}
