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
        .unwrap_or_else(|| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/store-bench/idle/01.vmstate").into()
        });
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e} (capture it with `stasis-eval store --capture-only`)");
            std::process::exit(2);
        }
    };
    let mib = data.len() as f64 / (1 << 20) as f64;
    let rate = |t: Instant| format!("{:7.1} ms {:7.0} MiB/s", t.elapsed().as_secs_f64() * 1e3, mib / t.elapsed().as_secs_f64());
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
    let t = Instant::now();
    for (id, e) in ids.iter().zip(&enc) {
        chunk::decode(id, e).expect("decodes");
    }
    println!("decode + verify    {}", rate(t));
}
