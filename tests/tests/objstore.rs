//! The checkpoint store on a real Garage cluster: three nodes, one in each
//! test host's network namespace, replication factor 3. One cluster serves
//! every scenario (it takes ~10 s to form): what Garage supports, commits
//! and a restore on another "host" with a cold cache, a checkpoint with one
//! node down (commits) and with two down (aborts cleanly, earlier
//! checkpoints restore once they are back), a chunk damaged or deleted in
//! the bucket (fsck names it, a restore refuses), retention and gc, and
//! the refusals of a bad endpoint, bad credentials and a missing bucket.
//! The client runs in the lab's bridge namespace (the coordinator's place),
//! reaching every node. Needs root and `scripts/garage.sh`'s binary.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use stasis_store::remote::{self, Credentials, RemoteError};
use stasis_store::*;
use stasis_system_tests::garage::{Garage, Place, BUCKET, REGION};
use stasis_system_tests::hosts::Lab;

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

/// Moves this thread (and the threads it starts) into network namespace `ns`.
fn enter_netns(ns: &str) {
    let f = fs::File::open(format!("/run/netns/{ns}")).expect("namespace file");
    // SAFETY: setns(2) on a descriptor we own; only this thread changes namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

fn commit(store: &Store, seed: u64) -> Result<CheckpointInfo, StoreError> {
    let p = store.begin(None)?;
    let mut draft = ManifestDraft::default();
    for (file, data) in [("vm-a", noise(seed, 6 << 20)), ("net", noise(seed + 1000, 100_000))] {
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
    p.commit(draft)
}

fn restores(store: &Store, which: &str, seed: u64, dir: &Path) {
    let m = store.open_checkpoint(which).unwrap().materialized(dir).unwrap();
    assert!(fs::read(m.file("vm-a")).unwrap() == noise(seed, 6 << 20), "{which}: vm-a differs");
    assert_eq!(fs::read_to_string(m.file("disks.json")).unwrap(), format!("{{\"seed\":{seed}}}"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_store_on_a_three_node_garage_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(tmp.path(), 3);
    let places = lab
        .agents
        .iter()
        .map(|a| Place { ns: Some(a.ns.clone()), ip: a.addr.split(':').next().unwrap().to_owned(), port_base: 3900 })
        .collect();
    let formed = Instant::now();
    let mut garage = Garage::new(tmp.path(), places);
    eprintln!("garage: 3 nodes formed in {:?}", formed.elapsed());
    let creds = tmp.path().join("s3.toml");
    fs::write(&creds, format!("access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n", garage.key_id, garage.secret))
        .unwrap();
    fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = |first: usize| RemoteConfig {
        url: format!("s3://{BUCKET}/exp"),
        endpoints: (0..3).map(|i| garage.nodes[(first + i) % 3].endpoint()).collect(),
        region: Some(REGION.into()),
        credentials_file: Some(creds.clone()),
    };
    let (h1_cfg, h2_cfg) = (cfg(0), cfg(1));
    let bridge = lab.bridge_ns.clone();
    let root = tmp.path().to_owned();
    // The client side in the bridge namespace; the cluster is driven from here.
    let (to_main, from_client) = std::sync::mpsc::channel::<&'static str>();
    let (to_client, from_main) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        enter_netns(&bridge);
        let step = |what: &'static str| {
            to_main.send(what).unwrap();
            from_main.recv().unwrap();
        };

        // What Garage supports: no conditional create (measured: it overwrites).
        let h1 = Store::bind_remote(&root.join("h1"), &h1_cfg).unwrap();
        let remote = h1.remote().unwrap().clone();
        assert!(!remote.conditional_put(), "Garage now honours If-None-Match: * — docs/object-store.md should say so");
        let c1 = commit(&h1, 1).unwrap();
        let c2 = commit(&h1, 2).unwrap();

        // Another host, nothing local: both restore from the bucket.
        let h2 = Store::bind_remote(&root.join("h2"), &h2_cfg).unwrap();
        assert_eq!(
            h2.list().unwrap().iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            vec![c1.id.clone(), c2.id.clone()]
        );
        restores(&h2, &c1.id, 1, &root.join("r"));
        restores(&h2, &c2.id, 2, &root.join("r"));

        // One node down (h1's own, its first endpoint): still commits.
        step("stop node 1");
        let c3 = commit(&h1, 3).expect("a checkpoint with one Garage node down commits");
        restores(&h2, &c3.id, 3, &root.join("r"));

        // Two down: the commit fails cleanly, nothing is listed or left pending.
        // If it got as far as the manifest's PUT, the one node up may have kept
        // that write (Garage does, and spreads it once the others are back):
        // the store notes it and retracts the manifest at its next listing.
        step("stop node 2");
        let started = Instant::now();
        let e = commit(&h1, 4).expect_err("no quorum: the commit must fail");
        eprintln!("two nodes down: commit failed after {:?}: {}", started.elapsed(), chain(&e));
        assert!(h1.pending_dirs().unwrap().is_empty(), "the aborted checkpoint left a pending directory");
        let unsettled = matches!(&e, StoreError::Remote(RemoteError::ManifestUnsettled { .. }));
        let retractions = |s: &Store| {
            fs::read_dir(s.root())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".retract-"))
                .count()
        };
        assert_eq!(retractions(&h1), usize::from(unsettled), "a manifest PUT that failed is noted for retraction");
        step("start nodes 1 and 2");
        let listed: Vec<String> = h1.list().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(retractions(&h1), 0, "the failed commit's manifest is retracted once the bucket answers");
        assert_eq!(listed, vec![c1.id.clone(), c2.id.clone(), c3.id.clone()], "the aborted checkpoint is not listed");
        let listed: Vec<String> = h2.list().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(listed, vec![c1.id.clone(), c2.id.clone(), c3.id.clone()], "the aborted checkpoint is not listed");
        restores(&h2, &c1.id, 1, &root.join("r"));
        let c5 = commit(&h1, 5).expect("commits again once the nodes are back");

        // Chunks travel in packs (one per 16 MiB of new chunks) with an index per commit.
        assert!(remote.list("chunks").unwrap().is_empty(), "no chunk is an object of its own");
        let packs = remote.list("packs").unwrap().len();
        assert!((4..=8).contains(&packs), "{packs} packs for 4 commits of 6 MiB");

        // A chunk damaged in its pack in the bucket: fsck names it; a cold restore refuses.
        let cp = h1.open_checkpoint(&c5.id).unwrap();
        let chunk = cp.manifest.component("vm-a").unwrap().chunks.as_ref().unwrap()[3].id.clone();
        let locate = |dir: &str| {
            let cached =
                remote::CachedChunks::new(LocalChunks::open(&root.join(dir)).unwrap(), remote.clone()).unwrap();
            cached.locate(&ChunkId::from_hex(&chunk).unwrap()).unwrap().expect("the chunk is in an indexed pack")
        };
        let (pack, offset, len) = locate("probe1");
        let mut bytes = remote.get(&pack, 64 << 20).unwrap().to_vec();
        bytes[(offset + len - 1) as usize] ^= 0x5a;
        remote.put(&pack, bytes).unwrap();
        let report = h1.fsck().unwrap();
        let p = report.problems.iter().find(|p| p.chunk.as_deref() == Some(&chunk)).expect("fsck names the chunk");
        assert_eq!((p.checkpoint.as_str(), p.component.as_deref()), (c5.id.as_str(), Some("vm-a")));
        let h3 = Store::bind_remote(&root.join("h3"), &h2_cfg).unwrap();
        let e = h3.open_checkpoint(&c5.id).unwrap().materialized(&root.join("r3")).unwrap_err();
        assert!(matches!(&e, StoreError::ChunkDamaged { chunk: c, .. } if *c == chunk), "{e}");
        // Its pack deleted: opening refuses everywhere, naming a chunk of it.
        remote.delete(&pack).unwrap();
        // (h2 had not fetched c5 yet: its disks.json, chunked into the same
        // pack, cannot be reassembled, which opening names first.)
        let e = h2.open_checkpoint(&c5.id).unwrap_err();
        assert!(
            matches!(&e, StoreError::ChunkMissing { .. })
                || matches!(&e, StoreError::FileMissing { component, .. } if component == "disks.json"),
            "{e}"
        );
        let report = h1.fsck().unwrap();
        assert!(report.problems.iter().any(|p| p.chunk.as_deref() == Some(&chunk)), "{report:?}");

        // Retention (protecting c1, as a recovery from it would) and gc.
        h1.delete_checkpoint(&c5.id).unwrap();
        let gone = h1.prune(&Retention { keep: 1, keep_daily: 0 }, &[&c1.id]).unwrap();
        assert_eq!(gone.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), vec![c2.id.clone()]);
        let gc = h1.gc().unwrap();
        assert!(gc.chunks_removed > 0);
        let report = h2.fsck().unwrap();
        assert!(report.is_clean() && report.orphan_chunks == 0, "{report:?}");
        restores(&h2, &c1.id, 1, &root.join("r"));
        restores(&h2, &c3.id, 3, &root.join("r"));

        // Bad input, refused at open (before any caller freezes anything).
        let mut bad = h1_cfg.clone();
        bad.endpoints = vec!["http://10.77.0.1:3999".into()];
        let e = Store::bind_remote(&root.join("bad1"), &bad).unwrap_err();
        assert!(matches!(e, StoreError::Remote(RemoteError::Unreachable { .. })), "{e}");
        assert!(chain(&e).contains("http://10.77.0.1:3999") && chain(&e).contains(BUCKET), "{}", chain(&e));
        let wrong = root.join("wrong.toml");
        fs::write(&wrong, "access_key_id = \"GK0123456789abcdef01234567\"\nsecret_access_key = \"0000000000000000000000000000000000000000000000000000000000000000\"\n").unwrap();
        fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut bad = h1_cfg.clone();
        bad.credentials_file = Some(wrong);
        let e = Store::bind_remote(&root.join("bad2"), &bad).unwrap_err();
        assert!(matches!(e, StoreError::Remote(RemoteError::Credentials { .. })), "{}", chain(&e));
        let mut bad = h1_cfg.clone();
        bad.url = "s3://no-such-bucket/exp".into();
        let e = Store::bind_remote(&root.join("bad3"), &bad).unwrap_err();
        assert!(matches!(e, StoreError::Remote(RemoteError::NoBucket { .. })), "{}", chain(&e));
        assert!(chain(&e).contains("no-such-bucket"), "{}", chain(&e));
        let c = Credentials::from_file(&h1_cfg.credentials_file.clone().unwrap()).unwrap();
        assert!(!chain(&e).contains(&c.secret_access_key));
        to_main.send("done").unwrap();
    });
    while let Ok(what) = from_client.recv() {
        match what {
            "stop node 1" => garage.stop(0),
            "stop node 2" => garage.stop(1),
            "start nodes 1 and 2" => {
                garage.start(0);
                garage.start(1);
                garage.wait_healthy();
            }
            "done" => break,
            other => panic!("unknown step {other}"),
        }
        to_client.send(()).unwrap();
    }
    if let Err(e) = client.join() {
        eprintln!("garage logs:\n{}", garage.logs());
        std::panic::resume_unwind(e);
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out.push_str(": ");
        out.push_str(&x.to_string());
        s = x.source();
    }
    out
}
