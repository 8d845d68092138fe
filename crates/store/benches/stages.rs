//! Timing splits of a commit's CPU work on one real VM state stream
//! (captured by `stasis-eval store --capture-only` into
//! `target/store-bench/`): FastCDC cut, BLAKE3 of the whole file and of
//! every chunk, zstd encode, decode. Single-threaded figures, so it shows
//! which stage to parallelise or skip.
//! Run: `cargo bench -p stasis-store --bench stages [-- FILE]`.

use std::time::Instant;

use stasis_store::chunk::{self, ChunkId, DEFAULT_CHUNKING};

fn main() {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/store-bench/idle/01.vmstate").into());
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e} (capture it with `stasis-eval store --capture-only`)");
            std::process::exit(2);
        }
    };
    let mib = data.len() as f64 / (1 << 20) as f64;
    let rate = |t: Instant| {
        format!("{:7.1} ms {:7.0} MiB/s", t.elapsed().as_secs_f64() * 1e3, mib / t.elapsed().as_secs_f64())
    };
    println!("{path}: {mib:.1} MiB");
    let t = Instant::now();
    let cuts = chunk::cut(&data, DEFAULT_CHUNKING);
    println!("cut (FastCDC)      {} ({} chunks)", rate(t), cuts.len());
    let t = Instant::now();
    let _ = blake3::hash(&data);
    println!("BLAKE3 whole       {}", rate(t));
    let t = Instant::now();
    let ids: Vec<ChunkId> = cuts.iter().map(|&(a, l)| ChunkId::of(&data[a..a + l])).collect();
    println!("BLAKE3 per chunk   {}", rate(t));
    let t = Instant::now();
    let enc: Vec<Vec<u8>> = cuts.iter().map(|&(a, l)| chunk::encode(&data[a..a + l])).collect();
    let stored: usize = enc.iter().map(Vec::len).sum();
    println!("encode (zstd)      {} -> {:.1} MiB", rate(t), stored as f64 / (1 << 20) as f64);
    for level in [-1, -3, -7, 3] {
        let t = Instant::now();
        let n: usize = cuts.iter().map(|&(a, l)| chunk::encode_with(&data[a..a + l], level).len()).sum();
        println!("encode (zstd {level:2})   {} -> {:.1} MiB", rate(t), n as f64 / (1 << 20) as f64);
    }
    // A fresh zstd context per chunk (zstd::bulk) vs the reused per-thread
    // one `encode`/`decode` use, interleaved so load changes hit both.
    let (mut fresh_c, mut reused_c, mut fresh_d, mut reused_d) = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..3 {
        let t = Instant::now();
        for &(a, l) in &cuts {
            let _ = zstd::bulk::compress(&data[a..a + l], chunk::ZSTD_LEVEL);
        }
        fresh_c += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for &(a, l) in &cuts {
            let _ = chunk::encode(&data[a..a + l]);
        }
        reused_c += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (&(_, l), e) in cuts.iter().zip(&enc) {
            if e[3] == 1 {
                let _ = zstd::bulk::decompress(&e[8..], l);
            }
        }
        fresh_d += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (id, e) in ids.iter().zip(&enc) {
            chunk::decode(id, e).expect("decodes");
        }
        reused_d += t.elapsed().as_secs_f64();
    }
    println!(
        "zstd context per chunk vs reused (3 interleaved rounds): compress {:.0} vs {:.0} ms; decompress {:.0} vs decode+verify {:.0} ms",
        fresh_c * 1e3 / 3.0,
        reused_c * 1e3 / 3.0,
        fresh_d * 1e3 / 3.0,
        reused_d * 1e3 / 3.0
    );
    let t = Instant::now();
    for (id, e) in ids.iter().zip(&enc) {
        chunk::decode(id, e).expect("decodes");
    }
    println!("decode + verify    {}", rate(t));
}
