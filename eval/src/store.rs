//! The store eval: how much the checkpoint store keeps and how fast it
//! commits and restores, on REAL VM state.
//!
//! Inputs are QEMU migration streams of the project's guest image (256 MiB,
//! TCG), captured once through the `stasis` binary and cached:
//! - `idle/NN.vmstate`: one mostly idle guest checkpointed 10 times, a few
//!   seconds apart;
//! - `guests/gN.vmstate`: 4 guests booted the same way (same spec, same
//!   image, checkpointed the same time after boot). They boot one after
//!   the other (this machine runs at most 3 VMs at a time); `g1` is the
//!   idle guest's first checkpoint.
//!
//! Then, in a fresh store on the same file system as the cache:
//! (a) the 10 idle checkpoints committed in turn: stored bytes after 10 vs
//! after 1; (b) the 4 guests committed as one checkpoint: stored bytes vs
//! one guest alone; (c) commit and restore throughput (MiB of state per
//! second) against the raw sequential write (1 MiB writes, then fsync) and
//! cold read (page cache of the file dropped with
//! `posix_fadvise(DONTNEED)` after fsync) of a file of the same size on
//! the same file system, measured in the same run, interleaved.

use crate::run::{Experiment, RunError};
use serde::Serialize;
use stasis_core::clock::mono_ns;
use stasis_store::{ComponentDraft, ComponentKind, ManifestDraft, Store};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the store eval failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreEvalError {
    #[error("experiment")]
    Run(#[from] RunError),
    #[error("store")]
    Store(#[from] Box<stasis_store::StoreError>),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Capture(String),
}

impl From<stasis_store::StoreError> for StoreEvalError {
    fn from(e: stasis_store::StoreError) -> Self {
        StoreEvalError::Store(Box::new(e))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreEvalError + '_ {
    move |source| StoreEvalError::Io { path: path.to_path_buf(), source }
}

/// Number of consecutive checkpoints of the idle guest.
pub const IDLE_CHECKPOINTS: usize = 10;
/// Number of identical guests.
pub const GUESTS: usize = 4;

/// The experiment spec: one idle 256 MiB guest, with `kernel_args` added
/// to its kernel command line (e.g. `nokaslr`).
pub fn spec(name: &str, kernel_args: &str) -> String {
    format!(
        "name = \"{name}\"\n[defaults]\nmemory = \"256M\"\nkernel_args = {kernel_args:?}\n\n[[node]]\nname = \"a\"\n"
    )
}

/// The cached streams.
#[derive(Debug, Clone, Serialize)]
pub struct Streams {
    pub idle: Vec<PathBuf>,
    pub guests: Vec<PathBuf>,
}

impl Streams {
    /// The cache layout under `cache`.
    pub fn at(cache: &Path) -> Streams {
        Streams {
            idle: (1..=IDLE_CHECKPOINTS).map(|i| cache.join("idle").join(format!("{i:02}.vmstate"))).collect(),
            guests: (1..=GUESTS)
                .map(|i| {
                    if i == 1 {
                        cache.join("idle").join("01.vmstate")
                    } else {
                        cache.join("guests").join(format!("g{i}.vmstate"))
                    }
                })
                .collect(),
        }
    }

    fn complete(&self) -> bool {
        self.idle.iter().chain(&self.guests).all(|p| p.is_file())
    }
}

/// Boots a one-guest experiment, waits `settle` after `stasis up` returns
/// (the guest is ready), takes `n` checkpoints `interval` apart, and
/// writes each checkpoint's VM state stream to `out[i]`.
fn capture_run(
    bin: &Path,
    name: &str,
    kernel_args: &str,
    settle: Duration,
    interval: Duration,
    out: &[PathBuf],
) -> Result<(), StoreEvalError> {
    let exp = Experiment::up(bin, name, &spec(name, kernel_args), &["a"])?;
    std::thread::sleep(settle);
    let mut ids = Vec::new();
    for i in 0..out.len() {
        if i > 0 {
            std::thread::sleep(interval);
        }
        let ck = exp.json(&["checkpoint"])?;
        let id = ck["info"]["id"]
            .as_str()
            .ok_or_else(|| StoreEvalError::Capture(format!("checkpoint printed no id: {ck}")))?;
        eprintln!("  {name}: checkpoint {}/{} = {id}", i + 1, out.len());
        ids.push(id.to_owned());
    }
    let store = Store::open(&exp.state().join(name).join("checkpoints"))?;
    for (id, path) in ids.iter().zip(out) {
        let ck = store.open_checkpoint(id)?;
        let vm = ck
            .manifest
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Vm)
            .ok_or_else(|| StoreEvalError::Capture(format!("checkpoint {id} has no VM component")))?;
        let dir = path.parent().expect("cache paths have a parent");
        fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp_dir = dir.join(".materialize");
        let file = ck.materialize(&vm.name, &tmp_dir)?;
        fs::rename(&file, path).map_err(io(path))?;
        let _ = fs::remove_dir_all(&tmp_dir);
    }
    Ok(())
}

/// Captures the streams into `cache` unless they are there already.
pub fn capture(
    bin: &Path,
    cache: &Path,
    kernel_args: &str,
    settle: Duration,
    interval: Duration,
) -> Result<Streams, StoreEvalError> {
    let streams = Streams::at(cache);
    if streams.complete() {
        eprintln!("stasis-eval store: using the cached streams in {}", cache.display());
        return Ok(streams);
    }
    eprintln!("stasis-eval store: capturing real VM state into {} (one guest at a time)", cache.display());
    if !streams.idle.iter().all(|p| p.is_file()) {
        capture_run(bin, "storeidle", kernel_args, settle, interval, &streams.idle)?;
    }
    for (i, g) in streams.guests.iter().enumerate().skip(1) {
        if !g.is_file() {
            capture_run(bin, &format!("storeg{}", i + 1), kernel_args, settle, interval, std::slice::from_ref(g))?;
        }
    }
    Ok(streams)
}

/// Sum of the sizes of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => n += dir_bytes(&e.path()),
            Ok(t) if t.is_file() => n += e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => {}
        }
    }
    n
}

/// Drops the page cache of every regular file under `dir` (they must be
/// durable already: DONTNEED only drops clean pages).
pub fn drop_cache(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => drop_cache(&e.path()),
            Ok(t) if t.is_file() => {
                if let Ok(f) = File::open(e.path()) {
                    // SAFETY: fadvise on a descriptor we own for the call.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                }
            }
            _ => {}
        }
    }
}

/// CPU time (user + system) this process has used, ns.
pub fn cpu_ns() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass and keeps no pointer.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn mib_s(bytes: u64, ns: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / (ns.max(1) as f64 / 1e9)
}

/// Raw sequential write (1 MiB writes, then fsync) and cold read of a
/// `bytes`-long file of incompressible data at `path`: MiB/s each.
pub fn raw_disk(path: &Path, bytes: u64) -> Result<(f64, f64), StoreEvalError> {
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let blocks = bytes.div_ceil(1 << 20);
    let t0 = mono_ns();
    let mut f = File::create(path).map_err(io(path))?;
    for i in 0..blocks {
        block[0..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block).map_err(io(path))?;
    }
    f.sync_all().map_err(io(path))?;
    let write = mib_s(blocks << 20, mono_ns() - t0);
    drop(f);
    drop_cache(path.parent().expect("a parent"));
    let t0 = mono_ns();
    let mut f = File::open(path).map_err(io(path))?;
    let mut n = 0u64;
    loop {
        let got = f.read(&mut block).map_err(io(path))?;
        if got == 0 {
            break;
        }
        n += got as u64;
    }
    let read = mib_s(n, mono_ns() - t0);
    fs::remove_file(path).map_err(io(path))?;
    Ok((write, read))
}

/// One commit or restore measured.
#[derive(Debug, Clone, Serialize)]
pub struct Timed {
    pub what: String,
    pub state_bytes: u64,
    pub ns: u64,
    pub mib_s: f64,
    /// Raw write (commit) or cold read (restore) MiB/s measured right before.
    pub raw_mib_s: f64,
    pub share_of_raw: f64,
    /// Commits: the store's phases (read/cut/hash/compress/write chunks;
    /// syncfs + rename + syncfs), from the manifest's `timings.extra`.
    pub chunk_ns: Option<u64>,
    pub publish_ns: Option<u64>,
    /// CPU time (all threads, user + system) spent, ns.
    pub cpu_ns: u64,
}

/// Everything the eval measured.
#[derive(Debug, Clone, Serialize)]
pub struct StoreFigures {
    pub one_raw_bytes: u64,
    pub one_stored_bytes: u64,
    pub ten_raw_bytes: u64,
    pub ten_stored_bytes: u64,
    /// Stored after 10 / stored after 1 (goal ≤ 1.3).
    pub ten_vs_one_stored: f64,
    /// Stored after 10 / raw bytes of one checkpoint.
    pub ten_vs_one_raw: f64,
    pub guest_raw_bytes: Vec<u64>,
    pub four_stored_bytes: u64,
    /// Stored with 4 guests / stored with guest 1 alone (goal ≤ 1.5).
    pub four_vs_one_stored: f64,
    pub commits: Vec<Timed>,
    pub restores: Vec<Timed>,
}

fn vm_draft(names: &[String]) -> ManifestDraft {
    let mut d = ManifestDraft::default();
    for n in names {
        d.components.push(ComponentDraft {
            name: n.clone(),
            kind: ComponentKind::Vm,
            file: format!("vm-{n}"),
            ..Default::default()
        });
    }
    d
}

/// Commits `streams` as one checkpoint (component `g<i>`) into `store`:
/// copies each into the pending directory and fsyncs it (as the agent's
/// save does, untimed), then times the commit.
/// A commit's id, state bytes, wall ns, and [chunk phase, publish phase, CPU] ns.
type Committed = (String, u64, u64, [Option<u64>; 3]);

fn commit(store: &Store, streams: &[&Path]) -> Result<Committed, StoreEvalError> {
    let pending = store.begin(None)?;
    let names: Vec<String> = (1..=streams.len()).map(|i| format!("g{i}")).collect();
    let mut bytes = 0;
    for (n, s) in names.iter().zip(streams) {
        let dst = pending.path(&format!("vm-{n}"));
        bytes += fs::copy(s, &dst).map_err(io(&dst))?;
        File::open(&dst).and_then(|f| f.sync_all()).map_err(io(&dst))?;
    }
    let (t0, c0) = (mono_ns(), cpu_ns());
    let info = pending.commit(vm_draft(&names))?;
    let (ns, cpu) = (mono_ns() - t0, cpu_ns() - c0);
    let extra = store.open_checkpoint(&info.id)?.manifest.timings.extra;
    Ok((info.id, bytes, ns, [extra.get("store_chunk_ns").copied(), extra.get("store_publish_ns").copied(), Some(cpu)]))
}

/// Times a restore of `id` as the agent does it: open, then materialize
/// every component into `dir`, with the chunk store's page cache dropped.
fn restore(store: &Store, id: &str, dir: &Path) -> Result<(u64, u64, u64), StoreEvalError> {
    drop_cache(&store.root().join(stasis_store::CHUNKS_DIR));
    let _ = fs::remove_dir_all(dir);
    let (t0, c0) = (mono_ns(), cpu_ns());
    let ck = store.open_checkpoint(id)?;
    let m = ck.materialized(dir)?;
    let (ns, cpu) = (mono_ns() - t0, cpu_ns() - c0);
    let bytes = m.manifest.total_bytes();
    fs::remove_dir_all(dir).map_err(io(dir))?;
    Ok((bytes, ns, cpu))
}

/// Runs the measurements on `streams` in a fresh store under `work`.
pub fn measure(streams: &Streams, work: &Path) -> Result<StoreFigures, StoreEvalError> {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).map_err(io(work))?;
    let raw_file = work.join("raw.bin");
    let restore_dir = work.join("restore");
    let size_of = |p: &Path| fs::metadata(p).map(|m| m.len()).map_err(io(p));
    let mut commits = Vec::new();
    let mut restores = Vec::new();
    let timed = |what: String, bytes: u64, ns: u64, raw: f64| {
        let mib_s = mib_s(bytes, ns);
        Timed {
            what,
            state_bytes: bytes,
            ns,
            mib_s,
            raw_mib_s: raw,
            share_of_raw: mib_s / raw,
            chunk_ns: None,
            publish_ns: None,
            cpu_ns: 0,
        }
    };

    // (a) ten consecutive checkpoints of one idle guest.
    let a_root = work.join("a");
    let store = Store::open(&a_root)?;
    let chunks = a_root.join(stasis_store::CHUNKS_DIR);
    let mut one_stored = 0;
    let mut last_id = String::new();
    for (i, s) in streams.idle.iter().enumerate() {
        let (w, _) = raw_disk(&raw_file, size_of(s)?)?;
        let (id, bytes, ns, [chunk_ns, publish_ns, cpu]) = commit(&store, &[s])?;
        commits.push(Timed {
            chunk_ns,
            publish_ns,
            cpu_ns: cpu.unwrap_or(0),
            ..timed(format!("idle checkpoint {}", i + 1), bytes, ns, w)
        });
        if i == 0 {
            one_stored = dir_bytes(&chunks);
        }
        last_id = id;
        let ms = |n: Option<u64>| n.unwrap_or(0) as f64 / 1e6;
        eprintln!(
            "  commit idle {:2}: {:.0} MiB/s (raw write {w:.0} MiB/s): {:.0} ms = chunks {:.0} + publish {:.0} + rest; CPU {:.0} ms",
            i + 1,
            mib_s(bytes, ns),
            ns as f64 / 1e6,
            ms(chunk_ns),
            ms(publish_ns),
            ms(cpu)
        );
    }
    let ten_stored = dir_bytes(&chunks);
    for _ in 0..3 {
        let (_, r) = raw_disk(&raw_file, size_of(&streams.idle[IDLE_CHECKPOINTS - 1])?)?;
        let (bytes, ns, cpu) = restore(&store, &last_id, &restore_dir)?;
        restores.push(Timed { cpu_ns: cpu, ..timed(format!("idle checkpoint {IDLE_CHECKPOINTS}"), bytes, ns, r) });
        eprintln!(
            "  restore idle {IDLE_CHECKPOINTS}: {:.0} MiB/s (raw cold read {r:.0} MiB/s)",
            restores.last().map_or(0.0, |t| t.mib_s)
        );
    }
    let one_raw = size_of(&streams.idle[0])?;
    let ten_raw = streams.idle.iter().map(|p| size_of(p)).sum::<Result<u64, _>>()?;
    drop(store);
    fs::remove_dir_all(&a_root).map_err(io(&a_root))?;

    // (b) four identical guests in one checkpoint, vs guest 1 alone.
    let one_root = work.join("b1");
    let store = Store::open(&one_root)?;
    commit(&store, &[&streams.guests[0]])?;
    let g1_stored = dir_bytes(&one_root.join(stasis_store::CHUNKS_DIR));
    drop(store);
    fs::remove_dir_all(&one_root).map_err(io(&one_root))?;
    let b_root = work.join("b");
    let store = Store::open(&b_root)?;
    let guests: Vec<&Path> = streams.guests.iter().map(PathBuf::as_path).collect();
    let total: u64 = guests.iter().map(|p| size_of(p)).sum::<Result<u64, _>>()?;
    let (w, _) = raw_disk(&raw_file, total)?;
    let (id, bytes, ns, [chunk_ns, publish_ns, cpu]) = commit(&store, &guests)?;
    commits.push(Timed {
        chunk_ns,
        publish_ns,
        cpu_ns: cpu.unwrap_or(0),
        ..timed(format!("{GUESTS} guests in one checkpoint"), bytes, ns, w)
    });
    let four_stored = dir_bytes(&b_root.join(stasis_store::CHUNKS_DIR));
    let (_, r) = raw_disk(&raw_file, total)?;
    let (bytes, ns, cpu) = restore(&store, &id, &restore_dir)?;
    restores.push(Timed { cpu_ns: cpu, ..timed(format!("{GUESTS} guests"), bytes, ns, r) });
    drop(store);
    let guest_raw = guests.iter().map(|p| size_of(p)).collect::<Result<Vec<_>, _>>()?;
    let _ = fs::remove_dir_all(work);

    Ok(StoreFigures {
        one_raw_bytes: one_raw,
        one_stored_bytes: one_stored,
        ten_raw_bytes: ten_raw,
        ten_stored_bytes: ten_stored,
        ten_vs_one_stored: ten_stored as f64 / one_stored.max(1) as f64,
        ten_vs_one_raw: ten_stored as f64 / one_raw.max(1) as f64,
        guest_raw_bytes: guest_raw,
        four_stored_bytes: four_stored,
        four_vs_one_stored: four_stored as f64 / g1_stored.max(1) as f64,
        commits,
        restores,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The figures as a Markdown table (printed and written to the report).
pub fn table(f: &StoreFigures) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let first = &f.commits[0];
    let later: Vec<&Timed> = f.commits.iter().skip(1).take(IDLE_CHECKPOINTS - 1).collect();
    let later_share = median(later.iter().map(|t| t.share_of_raw).collect());
    let later_mib = median(later.iter().map(|t| t.mib_s).collect());
    let four = f.commits.last().expect("the 4-guest commit");
    let idle_r: Vec<&Timed> = f.restores.iter().filter(|t| t.what.starts_with("idle")).collect();
    let r_share = median(idle_r.iter().map(|t| t.share_of_raw).collect());
    let r_mib = median(idle_r.iter().map(|t| t.mib_s).collect());
    let r_raw = median(idle_r.iter().map(|t| t.raw_mib_s).collect());
    let four_r = f.restores.last().expect("the 4-guest restore");
    let mut s = String::new();
    s.push_str("| Figure | Result | Goal |\n|---|---|---|\n");
    s.push_str(&format!(
        "| (a) 10 checkpoints of an idle 256 MiB guest | {:.1} MiB stored after 10 vs {:.1} MiB after 1 = **{:.2}×** ({:.2}× the {:.1} MiB raw stream of one) | ≤ 1.3× |\n",
        mib(f.ten_stored_bytes), mib(f.one_stored_bytes), f.ten_vs_one_stored, f.ten_vs_one_raw, mib(f.one_raw_bytes)
    ));
    s.push_str(&format!(
        "| (b) 4 identical guests in one checkpoint | {:.1} MiB stored vs {:.1} MiB for one = **{:.2}×** | ≤ 1.5× |\n",
        mib(f.four_stored_bytes),
        mib(f.four_stored_bytes) / f.four_vs_one_stored,
        f.four_vs_one_stored
    ));
    s.push_str(&format!(
        "| (c) commit, first checkpoint ({:.0} MiB) | {:.0} MiB/s = **{:.0} %** of raw write ({:.0} MiB/s) | ≥ 80 % |\n",
        mib(first.state_bytes), first.mib_s, first.share_of_raw * 100.0, first.raw_mib_s
    ));
    s.push_str(&format!(
        "| (c) commit, checkpoints 2–10 (median) | {later_mib:.0} MiB/s = **{:.0} %** of raw write | ≥ 80 % |\n",
        later_share * 100.0
    ));
    s.push_str(&format!(
        "| (c) commit, 4 guests ({:.0} MiB) | {:.0} MiB/s = **{:.0} %** of raw write ({:.0} MiB/s) | ≥ 80 % |\n",
        mib(four.state_bytes),
        four.mib_s,
        four.share_of_raw * 100.0,
        four.raw_mib_s
    ));
    let cpu_per_mib = |t: &Timed| t.cpu_ns as f64 / 1e6 / (t.state_bytes as f64 / (1 << 20) as f64);
    s.push_str(&format!(
        "| CPU per MiB of state (all threads): commit first / later (median) / 4 guests | {:.1} / {:.1} / {:.1} ms | |\n",
        cpu_per_mib(first),
        median(later.iter().map(|t| cpu_per_mib(t)).collect()),
        cpu_per_mib(four)
    ));
    s.push_str(&format!(
        "| (c) restore (open + materialize, chunks cold), one guest (median of {}) | {r_mib:.0} MiB/s = **{:.0} %** of raw cold read ({r_raw:.0} MiB/s) | ≥ 80 % |\n",
        idle_r.len(), r_share * 100.0
    ));
    s.push_str(&format!(
        "| (c) restore, 4 guests ({:.0} MiB) | {:.0} MiB/s = **{:.0} %** of raw cold read ({:.0} MiB/s) | ≥ 80 % |\n",
        mib(four_r.state_bytes),
        four_r.mib_s,
        four_r.share_of_raw * 100.0,
        four_r.raw_mib_s
    ));
    s.push_str(&format!(
        "| CPU per MiB of state: restore one guest (median) / 4 guests | {:.1} / {:.1} ms | |\n",
        median(idle_r.iter().map(|t| cpu_per_mib(t)).collect()),
        cpu_per_mib(four_r)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measuring half on small made-up streams (the real ones need
    /// VMs): every figure is computed, and the dedup ratios are what the
    /// streams imply.
    #[test]
    fn measure_runs_on_small_streams() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::at(dir.path());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let base: Vec<u8> = (0..(2 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (i, p) in streams.idle.iter().chain(&streams.guests).enumerate() {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let mut s = base.clone();
            // One changed 4 KiB page per stream, far apart.
            let at = (i * 97 % 400) * 4096;
            s[at..at + 4096].fill(i as u8 + 1);
            fs::write(p, s).unwrap();
        }
        let f = measure(&streams, &dir.path().join("work")).unwrap();
        assert_eq!(f.commits.len(), IDLE_CHECKPOINTS + 1);
        assert_eq!(f.restores.len(), 4);
        assert!(f.one_stored_bytes > 0 && f.ten_stored_bytes >= f.one_stored_bytes);
        // Random data does not compress; each stream adds a chunk or two.
        assert!(f.ten_vs_one_stored > 1.0 && f.ten_vs_one_stored < 1.6, "{}", f.ten_vs_one_stored);
        assert!(f.four_vs_one_stored > 1.0 && f.four_vs_one_stored < 1.3, "{}", f.four_vs_one_stored);
        assert!(f.commits.iter().all(|c| c.mib_s > 0.0 && c.raw_mib_s > 0.0 && c.chunk_ns.is_some()));
        assert!(!dir.path().join("work").exists(), "the work dir is removed");
        let t = table(&f);
        assert!(t.contains("(a)") && t.contains("(b)") && t.contains("restore"), "{t}");
    }
}
