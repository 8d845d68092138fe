//! Content-addressed chunks: how state files are cut (FastCDC or fixed
//! size), named (BLAKE3 of the plain bytes), encoded (zstd or raw, with a
//! small header) and kept ([`ChunkStorage`], a local directory by default).
//! A chunk is stored once however many checkpoints, VMs or branches use it.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A chunk's id: BLAKE3 of its plain (decoded) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<ChunkId> {
        blake3::Hash::from_hex(hex).ok().map(|h| ChunkId(*h.as_bytes()))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// How files are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// FastCDC (2020) with these minimum, average and maximum sizes.
    FastCdc { min: u32, avg: u32, max: u32 },
    /// Fixed-size chunks (the last one shorter).
    Fixed(u32),
}

/// FastCDC 8/32/128 KiB: what commit uses. QEMU's stream interleaves
/// 8-byte page headers with 4 KiB pages and elides zero pages, so page data
/// is not aligned and fixed-size chunks dedup nothing after the first
/// change; 32 KiB dedups a third better than 64 KiB at 1.5x the chunk
/// count (benchmark figures in `docs/checkpoint-format.md`).
pub const DEFAULT_CHUNKING: Chunking = Chunking::FastCdc { min: 8 << 10, avg: 32 << 10, max: 128 << 10 };

/// zstd level used for chunks.
pub const ZSTD_LEVEL: i32 = 1;

const MAGIC: &[u8; 3] = b"SC1";
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const HEADER: usize = 8;
/// No chunk is larger than this (a damaged header cannot make us allocate more).
pub const MAX_CHUNK: usize = 16 << 20;

/// The chunk boundaries of `data` as `(offset, length)`, in order.
pub fn cut(data: &[u8], chunking: Chunking) -> Vec<(usize, usize)> {
    match chunking {
        Chunking::FastCdc { min, avg, max } => {
            fastcdc::v2020::FastCDC::new(data, min, avg, max).map(|c| (c.offset, c.length)).collect()
        }
        Chunking::Fixed(size) => {
            (0..data.len()).step_by(size as usize).map(|at| (at, (size as usize).min(data.len() - at))).collect()
        }
    }
}

/// [`cut`] on several threads, with exactly the same result: the input is
/// split into `threads` segments cut independently; then, at every seam,
/// chunking continues sequentially from the last cut before the seam until
/// it lands on a cut of the next segment (a content-defined cut depends
/// only on where its chunk starts, so from a shared cut on both agree) —
/// usually within a few chunks. Fixed-size chunking is cheap and stays serial.
pub fn cut_parallel(data: &[u8], chunking: Chunking, threads: usize) -> Vec<(usize, usize)> {
    let Chunking::FastCdc { max, .. } = chunking else {
        return cut(data, chunking);
    };
    // Segments much longer than a chunk, or the seams cost more than they save.
    let segment = data.len().div_ceil(threads.max(1)).max(64 * max as usize);
    cut_segmented(data, chunking, segment)
}

fn cut_segmented(data: &[u8], chunking: Chunking, segment: usize) -> Vec<(usize, usize)> {
    let Chunking::FastCdc { min, avg, max } = chunking else {
        return cut(data, chunking);
    };
    if data.len() <= segment {
        return cut(data, chunking);
    }
    let starts: Vec<usize> = (0..data.len()).step_by(segment).collect();
    // Chunk END offsets of every segment, cut as if it were a whole input.
    // The forced cut at a segment's end (not the input's end) is dropped.
    let ends: Vec<Vec<usize>> = std::thread::scope(|scope| {
        let handles: Vec<_> = starts
            .iter()
            .map(|&start| {
                scope.spawn(move || {
                    let end = (start + segment).min(data.len());
                    let mut ends: Vec<usize> = fastcdc::v2020::FastCDC::new(&data[start..end], min, avg, max)
                        .map(|c| start + c.offset + c.length)
                        .collect();
                    if end < data.len() {
                        ends.pop();
                    }
                    ends
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("cutting does not panic")).collect()
    });
    let mut out: Vec<usize> = ends[0].clone();
    let mut k = 1;
    while k < ends.len() {
        // Continue sequentially from the last cut so far until a cut of
        // segment k (or a later one, if segment k was all passed) is hit.
        let mut pos = out.last().copied().unwrap_or(0);
        let mut joined = None;
        'walk: while pos < data.len() {
            let c =
                fastcdc::v2020::FastCDC::new(&data[pos..], min, avg, max).next().expect("non-empty input has a chunk");
            pos += c.length;
            out.push(pos);
            while k < ends.len() && ends[k].last().is_some_and(|&l| l < pos) {
                k += 1;
            }
            if k < ends.len() {
                if let Ok(i) = ends[k].binary_search(&pos) {
                    joined = Some(i);
                    break 'walk;
                }
            }
        }
        match joined {
            Some(i) => {
                out.extend_from_slice(&ends[k][i + 1..]);
                k += 1;
            }
            None => break, // walked to the end of the input
        }
    }
    let mut prev = 0;
    out.into_iter()
        .map(|end| {
            let c = (prev, end - prev);
            prev = end;
            c
        })
        .collect()
}

/// Cuts `reader` into chunks and calls `each` with every chunk's bytes, in order.
pub fn split<R: Read>(reader: R, chunking: Chunking, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    match chunking {
        Chunking::FastCdc { min, avg, max } => {
            // The whole input in memory, cut in place: `StreamCDC` copies
            // every chunk out of a sliding buffer, several times slower
            // (and ~6x slower in unoptimised builds, which the system tests use).
            let mut data = Vec::new();
            let mut reader = reader;
            reader.read_to_end(&mut data)?;
            for chunk in fastcdc::v2020::FastCDC::new(&data, min, avg, max) {
                each(&data[chunk.offset..chunk.offset + chunk.length])?;
            }
            Ok(())
        }
        Chunking::Fixed(size) => {
            let mut reader = reader;
            let mut buf = vec![0u8; size as usize];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    match reader.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                each(&buf[..filled])?;
                if filled < buf.len() {
                    return Ok(());
                }
            }
        }
    }
}

/// Encodes a chunk for storage: `SC1`, codec, plain length (u32 LE), then
/// the zstd frame or, when zstd does not make it smaller, the plain bytes.
pub fn encode(data: &[u8]) -> Vec<u8> {
    encode_with(data, ZSTD_LEVEL)
}

/// [`encode`] at zstd level `level` (negative levels are zstd's `--fast`).
pub fn encode_with(data: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len() / 2);
    out.extend_from_slice(MAGIC);
    out.push(CODEC_ZSTD);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let compressed = with_compressor(level, |c| c.compress(data)).ok();
    match compressed {
        Some(c) if c.len() < data.len() => out.extend_from_slice(&c),
        _ => {
            out[3] = CODEC_RAW;
            out.extend_from_slice(data);
        }
    }
    out
}

// One zstd context per thread, reused: creating one per chunk (what
// `zstd::bulk::compress`/`decompress` do) costs as much as compressing a
// small chunk.
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn with_compressor<R>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> io::Result<R>,
) -> io::Result<R> {
    COMPRESSOR.with(|c| {
        let mut slot = c.borrow_mut();
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, compressor) = slot.as_mut().expect("just set");
        f(compressor)
    })
}

/// Why a stored chunk does not decode to its id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkDamage {
    #[error("bad header")]
    Header,
    #[error("does not decompress: {0}")]
    Decompress(String),
    #[error("decodes to {actual} bytes, its header says {expected}")]
    Length { expected: usize, actual: usize },
    #[error("its content hashes to {0}")]
    Hash(ChunkId),
}

/// Decodes a stored chunk and checks that its plain bytes hash to `id`.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>, ChunkDamage> {
    if stored.len() < HEADER || &stored[..3] != MAGIC {
        return Err(ChunkDamage::Header);
    }
    let len = u32::from_le_bytes(stored[4..8].try_into().expect("4 bytes")) as usize;
    if len > MAX_CHUNK {
        return Err(ChunkDamage::Header);
    }
    let payload = &stored[HEADER..];
    let data = match stored[3] {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => DECOMPRESSOR
            .with(|d| match &mut *d.borrow_mut() {
                Some(d) => d.decompress(payload, len),
                slot => {
                    let mut fresh = zstd::bulk::Decompressor::new()?;
                    let out = fresh.decompress(payload, len);
                    *slot = Some(fresh);
                    out
                }
            })
            .map_err(|e| ChunkDamage::Decompress(e.to_string()))?,
        _ => return Err(ChunkDamage::Header),
    };
    if data.len() != len {
        return Err(ChunkDamage::Length { expected: len, actual: data.len() });
    }
    let actual = ChunkId::of(&data);
    if actual != *id {
        return Err(ChunkDamage::Hash(actual));
    }
    Ok(data)
}

/// Where chunks live. Shaped so an object store (S3 via `object_store`)
/// can implement it: whole-object put/get/head/list/delete, plus
/// [`ChunkStorage::publish`] for stores where a put is not durable on its own.
///
/// `put` stores *encoded* bytes (see [`encode`]); callers verify on read.
pub trait ChunkStorage: fmt::Debug + Send + Sync {
    /// Stores `encoded` as chunk `id` for transaction `txn` unless the
    /// chunk exists; returns whether it wrote anything. The chunk need not
    /// be durable or visible to `has`/`get` before [`ChunkStorage::publish`].
    fn put(&self, txn: &str, id: &ChunkId, encoded: &[u8]) -> io::Result<bool>;
    /// Makes every chunk `txn` put durable and visible.
    fn publish(&self, txn: &str) -> io::Result<()>;
    /// The encoded bytes of chunk `id` (`NotFound` if absent).
    fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    /// Whether chunk `id` exists (published).
    fn has(&self, id: &ChunkId) -> io::Result<bool>;
    /// Every published chunk with its stored size.
    fn list(&self) -> io::Result<Vec<(ChunkId, u64)>>;
    /// Removes chunk `id` (absent is fine).
    fn delete(&self, id: &ChunkId) -> io::Result<()>;
    /// Drops what `txn` put and did not publish (a failed commit).
    fn discard(&self, txn: &str) -> io::Result<()>;
    /// Removes what unpublished transactions left behind; only called
    /// while no transaction runs. Returns how many objects it removed.
    fn remove_unpublished(&self) -> io::Result<usize>;
    /// The encoded bytes of chunk `id` from the authoritative copy,
    /// bypassing any cache (fsck). Default: [`ChunkStorage::get`].
    fn get_uncached(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        self.get(id)
    }
    /// Brings what `has` knows up to date (a remote store lists its chunks
    /// once, at the start of a commit and of a restore, instead of asking
    /// per chunk). Default: nothing to do.
    fn refresh(&self) -> io::Result<()> {
        Ok(())
    }
    /// How many readers a restore should run at once, if not the default
    /// (a few per core): a remote store wants many requests in flight.
    fn read_parallelism(&self) -> Option<usize> {
        None
    }
    /// A hint that chunks `ids` are about to be read with `get`, roughly
    /// in this order (a restore): a remote store starts fetching them in
    /// large requests. Default: nothing to do.
    fn prefetch(&self, _ids: &[ChunkId]) {}
    /// Reads chunks `ids` from the authoritative copy, bypassing any cache
    /// (fsck), calling `each` once per id with its encoded bytes or the
    /// error (`NotFound` when absent) — from any thread, in any order.
    /// Default: [`ChunkStorage::get_uncached`] of each, several at a time.
    fn scan_uncached(&self, ids: &[ChunkId], each: &(dyn Fn(&ChunkId, io::Result<Vec<u8>>) + Sync)) {
        crate::util::par_map(ids, |id| each(id, self.get_uncached(id)));
    }
    /// Removes every stored chunk not in `live` and returns what it did
    /// (gc: the caller holds what keeps commits out). Default: list, then
    /// delete each unreferenced chunk.
    fn collect(&self, live: &HashSet<ChunkId>) -> io::Result<Collected> {
        let mut out = Collected::default();
        for (id, size) in self.list()? {
            if live.contains(&id) {
                out.chunks_kept += 1;
                continue;
            }
            self.delete(&id)?;
            out.chunks_removed += 1;
            out.bytes_removed += size;
            crate::failpoint::failpoint("gc-after-first-delete");
        }
        Ok(out)
    }
}

/// What [`ChunkStorage::collect`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Collected {
    pub chunks_kept: usize,
    pub chunks_removed: usize,
    /// Stored bytes freed (whole packs deleted, for a packed store).
    pub bytes_removed: u64,
    /// Packed stores: packs deleted, packs written by rewriting sparse
    /// ones, and the bytes of live chunks copied into them.
    pub packs_removed: usize,
    pub packs_written: usize,
    pub bytes_rewritten: u64,
}

/// Chunks in a local directory: `<dir>/ab/cdef…` (the id's first two hex
/// digits, then the other 62). A put writes `<dir>/.incoming/<id>.<txn>`;
/// publish fsyncs the file system once (`syncfs`), renames them into place
/// and syncs again, so a visible chunk is always complete and durable
/// without an fsync per chunk.
#[derive(Debug)]
pub struct LocalChunks {
    dir: PathBuf,
    staged: Mutex<HashSet<(String, ChunkId)>>,
}

const INCOMING: &str = ".incoming";

impl LocalChunks {
    /// The chunk directory `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<LocalChunks> {
        stasis_core::private::create_dir_all(&dir.join(INCOMING))?;
        Ok(LocalChunks { dir: dir.to_path_buf(), staged: Mutex::new(HashSet::new()) })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where chunk `id` lives.
    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    fn incoming(&self, txn: &str, id: &ChunkId) -> PathBuf {
        self.dir.join(INCOMING).join(format!("{}.{txn}", id.to_hex()))
    }

    /// Keeps `encoded` as chunk `id` without a transaction or fsync (a
    /// cache fill: a torn copy after a crash fails to decode and is read
    /// again from the authoritative store).
    pub fn insert_cached(&self, id: &ChunkId, encoded: &[u8]) -> io::Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.incoming(&format!("cache-{}-{n}", std::process::id()), id);
        stasis_core::private::write(&tmp, encoded)?;
        let target = self.path(id);
        stasis_core::private::create_dir_all(target.parent().expect("chunk paths have a parent"))?;
        fs::rename(&tmp, &target)
    }

    fn syncfs(&self) -> io::Result<()> {
        let dir = File::open(&self.dir)?;
        // SAFETY: syncfs on a descriptor we own and keep open for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl ChunkStorage for LocalChunks {
    fn put(&self, txn: &str, id: &ChunkId, encoded: &[u8]) -> io::Result<bool> {
        if self.has(id)? {
            return Ok(false);
        }
        // Claim it first, so a chunk repeated within the transaction (by
        // this thread or another) is written once.
        if !self.staged.lock().unwrap_or_else(|e| e.into_inner()).insert((txn.to_owned(), *id)) {
            return Ok(false);
        }
        let path = self.incoming(txn, id);
        let mut f = stasis_core::private::create_file(&path)?;
        f.write_all(encoded)?;
        Ok(true)
    }

    fn publish(&self, txn: &str) -> io::Result<()> {
        let mine: Vec<ChunkId> = {
            let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest): (HashSet<_>, HashSet<_>) = staged.drain().partition(|(t, _)| t == txn);
            *staged = rest;
            mine.into_iter().map(|(_, id)| id).collect()
        };
        if mine.is_empty() {
            return Ok(());
        }
        self.syncfs()?;
        let mut dirs = HashSet::new();
        for id in &mine {
            let target = self.path(id);
            let parent = target.parent().expect("chunk paths have a parent");
            if dirs.insert(parent.to_path_buf()) {
                stasis_core::private::create_dir_all(parent)?;
            }
            fs::rename(self.incoming(txn, id), &target)?;
        }
        self.syncfs()
    }

    fn discard(&self, txn: &str) -> io::Result<()> {
        let mine: Vec<ChunkId> = {
            let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest): (HashSet<_>, HashSet<_>) = staged.drain().partition(|(t, _)| t == txn);
            *staged = rest;
            mine.into_iter().map(|(_, id)| id).collect()
        };
        for id in &mine {
            match fs::remove_file(self.incoming(txn, id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        fs::read(self.path(id))
    }

    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        match fs::symlink_metadata(self.path(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<(ChunkId, u64)>> {
        let mut out = Vec::new();
        for top in fs::read_dir(&self.dir)? {
            let top = top?;
            let prefix = top.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !top.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(top.path())? {
                let entry = entry?;
                let rest = entry.file_name().to_string_lossy().into_owned();
                if let Some(id) = ChunkId::from_hex(&format!("{prefix}{rest}")) {
                    out.push((id, entry.metadata()?.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, id: &ChunkId) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn remove_unpublished(&self) -> io::Result<usize> {
        let mut n = 0;
        let incoming = self.dir.join(INCOMING);
        for entry in fs::read_dir(&incoming)? {
            fs::remove_file(entry?.path())?;
            n += 1;
        }
        Ok(n)
    }
}

/// Chunks in memory: the second implementation of [`ChunkStorage`], which
/// shows the trait is all the store needs (unit tests run commit, restore,
/// fsck and gc on it), and the shape an object store takes: a put is
/// staged per transaction and becomes visible on publish; there are no
/// directories or renames.
#[derive(Debug, Default)]
pub struct MemChunks {
    published: Mutex<std::collections::BTreeMap<ChunkId, Vec<u8>>>,
    staged: Mutex<std::collections::BTreeMap<(String, ChunkId), Vec<u8>>>,
}

impl MemChunks {
    /// Replaces the stored bytes of chunk `id` (fault injection in tests).
    pub fn tamper(&self, id: &ChunkId, stored: Vec<u8>) {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).insert(*id, stored);
    }

    fn take_staged(&self, txn: &str) -> Vec<(ChunkId, Vec<u8>)> {
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        let mine: Vec<(String, ChunkId)> = staged.keys().filter(|(t, _)| t == txn).cloned().collect();
        mine.into_iter().filter_map(|k| staged.remove(&k).map(|v| (k.1, v))).collect()
    }
}

impl ChunkStorage for MemChunks {
    fn put(&self, txn: &str, id: &ChunkId, encoded: &[u8]) -> io::Result<bool> {
        if self.has(id)? {
            return Ok(false);
        }
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.contains_key(&(txn.to_owned(), *id)) {
            return Ok(false);
        }
        staged.insert((txn.to_owned(), *id), encoded.to_vec());
        Ok(true)
    }

    fn publish(&self, txn: &str) -> io::Result<()> {
        let mine = self.take_staged(txn);
        self.published.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
        Ok(())
    }

    fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no chunk {id}")))
    }

    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        Ok(self.published.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id))
    }

    fn list(&self) -> io::Result<Vec<(ChunkId, u64)>> {
        Ok(self
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, b)| (*id, b.len() as u64))
            .collect())
    }

    fn delete(&self, id: &ChunkId) -> io::Result<()> {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        Ok(())
    }

    fn discard(&self, txn: &str) -> io::Result<()> {
        self.take_staged(txn);
        Ok(())
    }

    fn remove_unpublished(&self) -> io::Result<usize> {
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        let n = staged.len();
        staged.clear();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_damage_is_caught() {
        let zeros = vec![0u8; 100_000];
        let enc = encode(&zeros);
        assert!(enc.len() < 1000, "zeros compress");
        let id = ChunkId::of(&zeros);
        assert_eq!(decode(&id, &enc).unwrap(), zeros);
        let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let enc2 = encode(&noise);
        assert_eq!(decode(&ChunkId::of(&noise), &enc2).unwrap(), noise);
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode(&id, &bad).is_err());
        assert_eq!(decode(&id, &enc[..5]), Err(ChunkDamage::Header));
        assert!(matches!(decode(&ChunkId::of(b"x"), &enc), Err(ChunkDamage::Hash(_))));
    }

    #[test]
    fn parallel_cut_equals_the_serial_cut() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut data: Vec<u8> = (0..6_000_000u32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Zero runs and repeats: max-size cuts and long stretches without one.
        data[1_000_000..2_500_000].fill(0);
        let (a, b) = data.split_at_mut(4_000_000);
        b[..1_000_000].copy_from_slice(&a[..1_000_000]);
        let serial = cut(&data, DEFAULT_CHUNKING);
        for segment in [200_000, 333_333, 1 << 20, 3_000_000, 10_000_000] {
            assert_eq!(cut_segmented(&data, DEFAULT_CHUNKING, segment), serial, "segment {segment}");
        }
        for threads in 1..=4 {
            assert_eq!(cut_parallel(&data, DEFAULT_CHUNKING, threads), serial);
        }
        assert!(cut_parallel(&[], DEFAULT_CHUNKING, 2).is_empty());
    }

    #[test]
    fn split_covers_the_input_in_order() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        for chunking in [DEFAULT_CHUNKING, Chunking::Fixed(4096 * 16)] {
            let mut out = Vec::new();
            let mut sizes = Vec::new();
            split(&data[..], chunking, |c| {
                out.extend_from_slice(c);
                sizes.push(c.len());
                Ok(())
            })
            .unwrap();
            assert_eq!(out, data);
            assert!(sizes.len() > 3 && sizes.iter().all(|&s| s <= 256 << 10), "{sizes:?}");
        }
    }

    #[test]
    fn local_put_is_invisible_until_published_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunks::open(dir.path()).unwrap();
        let id = ChunkId::of(b"hello");
        assert!(store.put("t1", &id, &encode(b"hello")).unwrap());
        assert!(!store.has(&id).unwrap());
        store.publish("t1").unwrap();
        assert!(store.has(&id).unwrap());
        assert!(!store.put("t2", &id, &encode(b"hello")).unwrap(), "not rewritten");
        assert_eq!(decode(&id, &store.get(&id).unwrap()).unwrap(), b"hello");
        assert_eq!(store.list().unwrap().len(), 1);
        store.delete(&id).unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(store.put("t3", &id, &encode(b"hello")).unwrap());
        assert_eq!(store.remove_unpublished().unwrap(), 1);
    }
}
