//! Dedup ratios and throughput of the chunked store on synthetic QEMU-like
//! migration streams. Run: `cargo bench -p stasis-store --bench dedup`.
//! Set STASIS_BENCH_DIR to measure another filesystem than the temp dir.
//!
//! The stream imitates QEMU's RAM section for a 256 MiB guest: one record
//! per 4 KiB page, an 8-byte header then either 1 byte (a zero page) or the
//! 4096-byte page; so pages are NOT 4 KiB-aligned in the stream. A mostly
//! idle guest: 30 % of pages hold data (half text-like, half random),
//! and between consecutive checkpoints 0.5 % of the data pages change and
//! 0.1 % of the zero pages gain data.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use stasis_store::chunk::{self, ChunkId, Chunking, DEFAULT_CHUNKING};
use stasis_store::{ComponentDraft, ComponentKind, ManifestDraft, Store};

const PAGES: usize = 256 << 8; // 256 MiB of 4 KiB pages

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, page: &mut [u8], text: bool) {
        for w in page.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            if text {
                // Compressible: few distinct byte values.
                for (b, x) in w.iter_mut().zip(v) {
                    const LETTERS: &[u8] = b"etaoin shrdlu\n\0\0\0";
                    *b = LETTERS[x as usize % LETTERS.len()];
                }
            } else {
                w.copy_from_slice(&v[..w.len()]);
            }
        }
    }
}

/// A guest's RAM: `None` = zero page, `Some(seed)` = page content from seed.
type Ram = Vec<Option<u64>>;

fn initial_ram(rng: &mut Rng) -> Ram {
    (0..PAGES).map(|_| (rng.next() % 100 < 30).then(|| rng.next())).collect()
}

fn step(ram: &mut Ram, rng: &mut Rng) {
    for p in ram.iter_mut() {
        let r = rng.next() % 1000;
        match p {
            Some(_) if r < 5 => *p = Some(rng.next()),
            None if r < 1 => *p = Some(rng.next()),
            _ => {}
        }
    }
}

fn stream(ram: &Ram) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGES * 9 + ram.iter().flatten().count() * 4096);
    let mut page = vec![0u8; 4096];
    for (i, p) in ram.iter().enumerate() {
        let addr = (i as u64) << 12;
        match p {
            None => {
                out.extend_from_slice(&(addr | 0x2).to_be_bytes());
                out.push(0);
            }
            Some(seed) => {
                out.extend_from_slice(&(addr | 0x8).to_be_bytes());
                Rng(*seed | 1).fill(&mut page, seed % 2 == 0);
                out.extend_from_slice(&page);
            }
        }
    }
    out
}

/// Stored bytes of `streams` under `chunking`, counting each chunk once.
fn stored_bytes(streams: &[&[u8]], chunking: Chunking) -> (u64, usize) {
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    for s in streams {
        chunk::split(*s, chunking, |c| {
            if seen.insert(ChunkId::of(c)) {
                bytes += chunk::encode(c).len() as u64;
            }
            Ok(())
        })
        .unwrap();
    }
    (bytes, seen.len())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    n
}

/// Drops a file's pages from the page cache so the next read hits the disk.
fn evict(path: &Path) {
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap().flatten() {
            evict(&e.path());
        }
        return;
    }
    let f = File::open(path).unwrap();
    // SAFETY: posix_fadvise on a descriptor we own; no memory involved.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn commit_one(store: &Store, files: &[(&str, &[u8])]) -> (stasis_store::CheckpointInfo, f64) {
    let p = store.begin(None).unwrap();
    let mut draft = ManifestDraft::default();
    for (name, data) in files {
        fs::write(p.path(name), data).unwrap();
        draft.components.push(ComponentDraft {
            name: (*name).into(),
            kind: ComponentKind::Vm,
            file: (*name).into(),
            ..Default::default()
        });
    }
    let t = Instant::now();
    let info = p.commit(draft).unwrap();
    (info, t.elapsed().as_secs_f64())
}

fn main() {
    let base = std::env::var_os("STASIS_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = match &base {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    println!("store in {}", tmp.path().display());

    let mut rng = Rng(0x5eed);
    let mut ram = initial_ram(&mut rng);
    let mut streams = Vec::new();
    for _ in 0..10 {
        streams.push(stream(&ram));
        step(&mut ram, &mut rng);
    }
    let full = streams[0].len() as u64;
    println!("synthetic 256 MiB guest: stream {:.1} MiB ({} data pages)", mib(full), ram.iter().flatten().count());

    // 1. Which chunking dedups these streams best (in memory).
    println!("\nchunking             1 ckpt stored   10 ckpts stored   ratio 10/1   chunks");
    let refs: Vec<&[u8]> = streams.iter().map(Vec::as_slice).collect();
    for (label, c) in [
        ("fastcdc 16/64/256K", Chunking::FastCdc { min: 16 << 10, avg: 64 << 10, max: 256 << 10 }),
        ("fastcdc 8/32/128K *", DEFAULT_CHUNKING),
        ("fastcdc 4/16/64K", Chunking::FastCdc { min: 4 << 10, avg: 16 << 10, max: 64 << 10 }),
        ("fixed 4K", Chunking::Fixed(4096)),
        ("fixed 64K", Chunking::Fixed(64 << 10)),
    ] {
        let (one, _) = stored_bytes(&refs[..1], c);
        let (ten, n) = stored_bytes(&refs, c);
        println!(
            "{label:<20} {:>10.1} MiB {:>14.1} MiB {:>11.2} {:>8}",
            mib(one),
            mib(ten),
            ten as f64 / one as f64,
            n
        );
    }

    // 2. The real store: raw disk speed, 10 consecutive checkpoints, 4 guests.
    let raw_path = tmp.path().join("raw");
    let t = Instant::now();
    {
        let mut f = File::create(&raw_path).unwrap();
        for block in streams[0].chunks(1 << 20) {
            f.write_all(block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let raw_write = mib(full) / t.elapsed().as_secs_f64();
    evict(&raw_path);
    let t = Instant::now();
    let mut buf = Vec::new();
    File::open(&raw_path).unwrap().read_to_end(&mut buf).unwrap();
    let raw_read = mib(full) / t.elapsed().as_secs_f64();
    fs::remove_file(&raw_path).unwrap();
    drop(buf);
    println!("\nraw disk: sequential write+fsync {raw_write:.0} MiB/s, cold sequential read {raw_read:.0} MiB/s");

    let store = Store::open(&tmp.path().join("a/checkpoints")).unwrap();
    let chunks_dir = store.root().join("chunks");
    let mut infos = Vec::new();
    let mut commit_s = Vec::new();
    let mut after_one = 0;
    for (i, s) in streams.iter().enumerate() {
        let (info, secs) = commit_one(&store, &[("vm-a", s)]);
        commit_s.push(secs);
        infos.push(info);
        if i == 0 {
            after_one = dir_bytes(&chunks_dir);
        }
    }
    let after_ten = dir_bytes(&chunks_dir);
    println!(
        "10 consecutive checkpoints: {:.1} MiB stored vs one full checkpoint {:.1} MiB stored ({:.2}x) / {:.1} MiB raw stream ({:.2}x)",
        mib(after_ten),
        mib(after_one),
        after_ten as f64 / after_one as f64,
        mib(full),
        after_ten as f64 / full as f64
    );
    let first = commit_s[0];
    let rest = commit_s[1..].iter().sum::<f64>() / 9.0;
    println!(
        "commit (chunk+hash+zstd+write+syncfs): first {:.0} ms = {:.0} MiB/s ({:.0} % of raw write); later (dedup) {:.0} ms = {:.0} MiB/s ({:.0} %)",
        first * 1e3,
        mib(full) / first,
        100.0 * mib(full) / first / raw_write,
        rest * 1e3,
        mib(full) / rest,
        100.0 * mib(full) / rest / raw_write
    );

    let out = tmp.path().join("restore");
    let ckpt = store.open_checkpoint(&infos[9].id).unwrap();
    evict(&chunks_dir);
    let t = Instant::now();
    let path = ckpt.materialize("vm-a", &out).unwrap();
    let cold = t.elapsed().as_secs_f64();
    fs::remove_file(&path).unwrap();
    let t = Instant::now();
    ckpt.materialize("vm-a", &out).unwrap();
    let warm = t.elapsed().as_secs_f64();
    println!(
        "materialize (read+verify+write): cold {:.0} ms = {:.0} MiB/s ({:.0} % of raw cold read); page-cached {:.0} ms = {:.0} MiB/s",
        cold * 1e3,
        mib(full) / cold,
        100.0 * mib(full) / cold / raw_read,
        warm * 1e3,
        mib(full) / warm
    );
    let t = Instant::now();
    let report = store.fsck().unwrap();
    println!(
        "fsck: {} checkpoints, {} chunks, {:.0} ms, clean: {}",
        report.checkpoints,
        report.chunks_referenced,
        t.elapsed().as_secs_f64() * 1e3,
        report.is_clean()
    );

    // 3. Four guests booted from the same image: 98 % of pages alike.
    let store4 = Store::open(&tmp.path().join("b/checkpoints")).unwrap();
    let mut rng = Rng(0xfeed);
    let base_ram = initial_ram(&mut rng);
    let guests: Vec<Vec<u8>> = (0..4)
        .map(|g| {
            let mut r = base_ram.clone();
            let mut rng = Rng(1000 + g);
            for p in r.iter_mut().flatten() {
                if rng.next() % 100 < 2 {
                    *p = rng.next();
                }
            }
            stream(&r)
        })
        .collect();
    let one_guest = Store::open(&tmp.path().join("c/checkpoints")).unwrap();
    commit_one(&one_guest, &[("vm-a", &guests[0])]);
    let one = dir_bytes(&one_guest.root().join("chunks"));
    let (_, secs) =
        commit_one(&store4, &[("vm-a", &guests[0]), ("vm-b", &guests[1]), ("vm-c", &guests[2]), ("vm-d", &guests[3])]);
    let four = dir_bytes(&store4.root().join("chunks"));
    let identical = Store::open(&tmp.path().join("d/checkpoints")).unwrap();
    commit_one(&identical, &[("vm-a", &guests[0]), ("vm-b", &guests[0]), ("vm-c", &guests[0]), ("vm-d", &guests[0])]);
    let same = dir_bytes(&identical.root().join("chunks"));
    println!(
        "4 guests: byte-identical {:.2}x one guest's stored state; 98 % alike {:.2}x ({:.1} vs {:.1} MiB; commit {:.0} MiB/s)",
        same as f64 / one as f64,
        four as f64 / one as f64,
        mib(four),
        mib(one),
        4.0 * mib(guests[0].len() as u64) / secs
    );
}
