//! Commit and restore throughput of the object-store backend against a raw
//! PUT and GET of the same bytes to the same Garage cluster in the same run
//! (docs/object-store.md, README "Object store"). Three Garage nodes, one
//! per lab host namespace (replication factor 3); the client runs in the
//! lab's bridge namespace and talks to h1's node.
//!
//! Per run: a fresh state of `--mib` MiB of incompressible bytes per VM
//! (`--vms` of them; nothing deduplicates, so the store uploads every byte,
//! as the raw PUT does), then
//! - raw PUT of each VM's bytes as one object, all VMs at once;
//! - a commit of a checkpoint with those files (chunk, hash, compress,
//!   upload, manifest), timed as a whole;
//! - raw GET of those objects;
//! - a restore on a fresh store root (cold cache): open + materialize.
//!
//! Prints medians over `--runs` runs and the ratios. Needs root and the
//! garage binary (`make garage`). Usage:
//! `cargo run --release -p stasis-system-tests --bin stasis-objstore-bench -- --mib 256 --vms 1 --runs 5`

use std::fs;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use stasis_store::*;
use stasis_system_tests::garage::{Garage, Place, BUCKET, REGION};
use stasis_system_tests::hosts::Lab;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib = arg(&args, "--mib", 64);
    let vms = arg(&args, "--vms", 1);
    let runs = arg(&args, "--runs", 5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = Lab::new(tmp.path(), 3);
    let places = lab
        .agents
        .iter()
        .map(|a| Place { ns: Some(a.ns.clone()), ip: a.addr.split(':').next().unwrap().to_owned(), port_base: 3900 })
        .collect();
    let garage = Garage::new(tmp.path(), places);
    let creds = tmp.path().join("s3.toml");
    fs::write(&creds, format!("access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n", garage.key_id, garage.secret))
        .unwrap();
    fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let f = fs::File::open(format!("/run/netns/{}", lab.bridge_ns)).expect("bridge namespace");
    // SAFETY: setns(2) of this (only) thread into the lab's bridge namespace.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let cfg = RemoteConfig {
        url: format!("s3://{BUCKET}/bench"),
        endpoints: garage.endpoints(),
        region: Some(REGION.into()),
        credentials_file: Some(creds),
    };
    let bytes = (mib << 20) * vms;
    let (mut put, mut commit, mut get, mut restore) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let store = Store::bind_remote(&tmp.path().join(format!("h1-{run}")), &cfg).expect("open the bucket");
        let remote = store.remote().unwrap().clone();
        let states: Vec<Vec<u8>> = (0..vms).map(|v| noise((run * 100 + v) as u64 + 1, mib << 20)).collect();

        let t = Instant::now();
        std::thread::scope(|s| {
            for (v, data) in states.iter().enumerate() {
                let remote = remote.clone();
                s.spawn(move || remote.put(&format!("raw/{run}-{v}"), data.clone()).expect("raw PUT"));
            }
        });
        put.push(t.elapsed().as_secs_f64());

        let p = store.begin(None).unwrap();
        let mut draft = ManifestDraft::default();
        for (v, data) in states.iter().enumerate() {
            let file = format!("vm-{v}");
            fs::write(p.path(&file), data).unwrap();
            draft.components.push(ComponentDraft { name: file.clone(), file, ..Default::default() });
        }
        // The state files are in the page cache, as after a save.
        let t = Instant::now();
        let info = p.commit(draft).expect("commit");
        commit.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        std::thread::scope(|s| {
            for v in 0..vms {
                let remote = remote.clone();
                s.spawn(move || remote.get(&format!("raw/{run}-{v}"), (mib << 20) + 1).expect("raw GET"));
            }
        });
        get.push(t.elapsed().as_secs_f64());

        let elsewhere = Store::open_remote(&tmp.path().join(format!("h2-{run}")), remote.clone()).unwrap();
        let out = tmp.path().join(format!("restore-{run}"));
        let t = Instant::now();
        elsewhere.open_checkpoint(&info.id).unwrap().materialized(&out).expect("restore");
        restore.push(t.elapsed().as_secs_f64());
        for v in 0..vms {
            let _ = remote.delete(&format!("raw/{run}-{v}"));
        }
        store.delete_checkpoint(&info.id).unwrap();
        store.gc().unwrap();
        for d in [out, tmp.path().join(format!("h1-{run}")), tmp.path().join(format!("h2-{run}"))] {
            let _ = fs::remove_dir_all(d);
        }
        eprintln!(
            "run {run}: raw PUT {:.2}s, commit {:.2}s, raw GET {:.2}s, restore {:.2}s",
            put[run], commit[run], get[run], restore[run]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rate = |s: f64| bytes as f64 / s / (1 << 20) as f64;
    let (mp, mc, mg, mr) = (median(put), median(commit), median(get), median(restore));
    println!("object store on 3-node Garage (rf 3), {vms} x {mib} MiB incompressible, medians of {runs}:");
    println!("  raw PUT     {:>7.1} MiB/s ({mp:.2} s)", rate(mp));
    println!("  commit      {:>7.1} MiB/s ({mc:.2} s)  = {:.2}x raw PUT (goal >= 0.8)", rate(mc), mp / mc);
    println!("  raw GET     {:>7.1} MiB/s ({mg:.2} s)", rate(mg));
    println!("  restore     {:>7.1} MiB/s ({mr:.2} s)  = {:.2}x raw GET (goal >= 0.8), cold cache", rate(mr), mg / mr);
}
