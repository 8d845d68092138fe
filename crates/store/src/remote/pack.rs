//! Packs: how a bucket keeps chunks in a few large objects instead of one
//! object per chunk (an object store's cost is per request: Garage writes
//! a replicated metadata entry and a block per object, so one 32 KiB chunk
//! per PUT ran ~5x below a raw PUT of the same bytes).
//!
//! Everything here is I/O-free: the formats, the builder that fills a
//! pack, and the gc planner ([`plan_gc`]), a pure function of the index
//! and the set of live chunks.
//!
//! ```text
//! pack   = encoded chunk ‖ encoded chunk ‖ … ‖ trailer ‖ trailer length (u32 LE)
//! trailer = envelope "pack-trailer" 1.0 (postcard): [Entry]   — the pack's own index
//! index  = envelope "pack-index" 1.0 (postcard): [PackRecord] — many packs' entries
//! Entry  = { chunk id (32 bytes), offset (u32), encoded length (u32) }
//! PackRecord = { pack id (32 bytes), pack length (u64), [Entry] }
//! ```
//!
//! A pack's id is the BLAKE3 of its trailer: the trailer lists every
//! chunk's id, offset and encoded length, and every chunk is checked
//! against its id wherever it is read, so two packs with the same trailer
//! are interchangeable (one name is as good as the other) — and naming a
//! pack costs no second pass over its bytes. An index object's key is the
//! BLAKE3 of its bytes. Both are written once and never changed, so every
//! host caches them as they are.
//!
//! Readers find chunks through the index objects; the trailer makes a pack
//! self-describing, so gc can tell a pack no index names (a dead commit's,
//! or one whose index was lost) that still holds live chunks from one that
//! holds none, and recovers the first instead of deleting it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use stasis_core::envelope::{self, EnvelopeError, FormatVersion, Kind};

use crate::chunk::{ChunkId, MAX_CHUNK};

/// A pack is sealed once it holds this many bytes of chunks (16 MiB: a
/// few requests per VM state, each large enough that the per-object cost
/// is small next to moving its bytes, and several can be in flight).
pub const PACK_TARGET: usize = 16 << 20;
/// The largest pack a reader accepts: the target, one more chunk, and its
/// trailer, with room to spare.
pub const MAX_PACK: u64 = 64 << 20;
/// The largest encoded chunk: its 8-byte header and at most
/// [`MAX_CHUNK`] bytes (zstd keeps an incompressible chunk raw).
pub const MAX_ENCODED: u32 = MAX_CHUNK as u32 + 8;
/// The largest index object (~6 M chunks: ~200 GiB of distinct state).
pub const MAX_INDEX: u64 = 256 << 20;
const MAX_TRAILER: u64 = 8 << 20;

/// The index objects' envelope.
pub const INDEX_KIND: Kind =
    Kind { name: "pack-index", version: FormatVersion { major: 1, minor: 0 }, max_payload: MAX_INDEX };
/// A pack trailer's envelope.
pub const TRAILER_KIND: Kind =
    Kind { name: "pack-trailer", version: FormatVersion { major: 1, minor: 0 }, max_payload: MAX_TRAILER };

/// A pack's id: BLAKE3 of its trailer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// Lowercase hex, 64 characters (the pack's key under `packs/`).
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<PackId> {
        blake3::Hash::from_hex(hex).ok().map(|h| PackId(*h.as_bytes()))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", &self.to_hex()[..12])
    }
}

/// Where one chunk is inside its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: [u8; 32],
    pub offset: u32,
    /// Encoded length (header included).
    pub len: u32,
}

impl Entry {
    /// The chunk's id.
    pub fn chunk(&self) -> ChunkId {
        ChunkId(self.id)
    }

    /// The bytes of this entry in `pack` (`None` when the pack is shorter).
    pub fn slice<'a>(&self, pack: &'a [u8]) -> Option<&'a [u8]> {
        let end = (self.offset as usize).checked_add(self.len as usize)?;
        pack.get(self.offset as usize..end)
    }
}

/// One pack as an index records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    pub id: PackId,
    /// The whole object's length, trailer included.
    pub len: u64,
    pub entries: Vec<Entry>,
}

impl PackRecord {
    /// Encoded bytes of all its chunks.
    pub fn chunk_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len as u64).sum()
    }
}

/// Why an index object or a pack trailer was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("bad envelope")]
    Envelope(#[from] EnvelopeError),
    #[error("pack {pack}: {what}")]
    Bounds { pack: String, what: String },
    #[error("pack {len} bytes long: too short for a trailer")]
    NoTrailer { len: u64 },
}

fn check_entries(pack: &PackId, len: u64, entries: &[Entry], chunks_end: u64) -> Result<(), PackError> {
    let bad = |what: String| PackError::Bounds { pack: pack.to_hex(), what };
    if len > MAX_PACK {
        return Err(bad(format!("{len} bytes, more than the {MAX_PACK} a pack may have")));
    }
    for e in entries {
        if e.len < 8 || e.len > MAX_ENCODED {
            return Err(bad(format!("chunk {} has an encoded length of {}", e.chunk(), e.len)));
        }
        if e.offset as u64 + e.len as u64 > chunks_end {
            return Err(bad(format!(
                "chunk {} at {}+{} is past the chunks' end {chunks_end}",
                e.chunk(),
                e.offset,
                e.len
            )));
        }
    }
    Ok(())
}

/// Encodes an index object recording `packs`.
pub fn encode_index(packs: &[PackRecord]) -> Vec<u8> {
    envelope::encode(&INDEX_KIND, &packs).expect("an index always encodes")
}

/// Decodes and checks an index object: its envelope, and that every entry
/// lies inside its pack and every pack is of a size a reader accepts.
pub fn decode_index(bytes: &[u8]) -> Result<Vec<PackRecord>, PackError> {
    let packs: Vec<PackRecord> = envelope::decode(&INDEX_KIND, bytes)?;
    for p in &packs {
        check_entries(&p.id, p.len, &p.entries, p.len)?;
    }
    Ok(packs)
}

/// The key (under `index/`) of an index object: BLAKE3 of its bytes.
pub fn index_name(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// How many bytes at a pack's end to read to find its trailer at first.
pub const TRAILER_PROBE: u64 = 64 << 10;

/// Reads a pack's trailer from `tail`, the last bytes of a pack `len` bytes
/// long. `Ok(Err(n))`: the trailer needs the last `n` bytes, more than
/// `tail` holds (read again). The record's id is the trailer's BLAKE3.
pub fn trailer_of(tail: &[u8], len: u64) -> Result<Result<PackRecord, u64>, PackError> {
    if len > MAX_PACK {
        return Err(PackError::Bounds { pack: "?".into(), what: format!("{len} bytes, more than {MAX_PACK}") });
    }
    if tail.len() < 4 || len < 4 || tail.len() as u64 > len {
        return Err(PackError::NoTrailer { len });
    }
    let n = u32::from_le_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes")) as u64;
    if n + 4 > len {
        return Err(PackError::NoTrailer { len });
    }
    if n + 4 > tail.len() as u64 {
        return Ok(Err(n + 4));
    }
    let trailer = &tail[tail.len() - 4 - n as usize..tail.len() - 4];
    let entries: Vec<Entry> = envelope::decode(&TRAILER_KIND, trailer)?;
    let id = PackId(*blake3::hash(trailer).as_bytes());
    check_entries(&id, len, &entries, len - 4 - n)?;
    Ok(Ok(PackRecord { id, len, entries }))
}

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<Entry>,
}

/// A sealed pack: its bytes (chunks and trailer) and its record.
#[derive(Debug)]
pub struct SealedPack {
    pub bytes: Vec<u8>,
    pub record: PackRecord,
}

impl PackBuilder {
    /// Appends an encoded chunk.
    pub fn push(&mut self, id: &ChunkId, encoded: &[u8]) {
        debug_assert!(encoded.len() as u32 <= MAX_ENCODED);
        if self.buf.capacity() == 0 {
            self.buf.reserve(PACK_TARGET + (PACK_TARGET >> 3));
        }
        self.entries.push(Entry { id: id.0, offset: self.buf.len() as u32, len: encoded.len() as u32 });
        self.buf.extend_from_slice(encoded);
    }

    /// Bytes of chunks so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no chunk was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the trailer and names the pack.
    pub fn seal(mut self) -> SealedPack {
        let trailer = envelope::encode(&TRAILER_KIND, &self.entries).expect("a trailer always encodes");
        let id = PackId(*blake3::hash(&trailer).as_bytes());
        self.buf.extend_from_slice(&trailer);
        self.buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        let len = self.buf.len() as u64;
        SealedPack { bytes: self.buf, record: PackRecord { id, len, entries: self.entries } }
    }
}

/// When gc rewrites packs instead of leaving their dead chunks in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// A pack whose live chunks fill less than this share (percent) of it
    /// is rewritten (its live chunks copied into a new pack, then deleted).
    pub repack_below_percent: u64,
    /// Packs smaller than this (small commits) are merged …
    pub small_pack: u64,
    /// … once there are at least this many of them.
    pub merge_small_at: usize,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy { repack_below_percent: 50, small_pack: (PACK_TARGET / 4) as u64, merge_small_at: 4 }
    }
}

/// What gc does to the packs ([`plan_gc`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Packs that stay as they are (recorded in the new index).
    pub keep: Vec<PackRecord>,
    /// Packs to delete: no live chunk is (only) in them.
    pub delete: Vec<PackId>,
    /// Packs to rewrite: these live entries are copied into new packs,
    /// then the pack is deleted.
    pub repack: Vec<(PackId, Vec<Entry>)>,
    /// Distinct live chunks found in some pack.
    pub live_chunks: usize,
    /// Live chunks in no pack (fsck reports them as missing; gc cannot help).
    pub live_missing: usize,
    /// Distinct chunks that no pack will hold any more.
    pub removed_chunks: usize,
}

impl GcPlan {
    /// Whether the packs stay exactly as they are.
    pub fn is_noop(&self) -> bool {
        self.delete.is_empty() && self.repack.is_empty()
    }
}

/// Decides what gc does with `packs` (every pack known, from the indexes
/// and from the trailers of packs no index names; duplicates by id are
/// merged) given the chunks `live` that some manifest references.
///
/// Each live chunk is assigned to one pack holding it — the fullest of
/// live data first, so a chunk two commits both wrote lives on in the
/// better pack. Then a pack with nothing assigned is deleted, one whose
/// assigned chunks fill less than `repack_below_percent` of it is
/// rewritten, and small packs are merged once there are
/// `merge_small_at` of them; the rest stay. A rewrite copies only the
/// chunks no kept pack already holds.
pub fn plan_gc(packs: &[PackRecord], live: &HashSet<ChunkId>, policy: &GcPolicy) -> GcPlan {
    let mut seen = HashSet::new();
    let packs: Vec<&PackRecord> = packs.iter().filter(|p| seen.insert(p.id)).collect();
    let live_bytes = |p: &PackRecord| -> u64 {
        let mut ids = HashSet::new();
        p.entries.iter().filter(|e| live.contains(&e.chunk()) && ids.insert(e.id)).map(|e| e.len as u64).sum()
    };
    // The fullest first (by share of the pack, then by id for determinism).
    let mut order: Vec<(u64, &PackRecord)> = packs.iter().map(|p| (live_bytes(p), *p)).collect();
    order.sort_by(|(a, p), (b, q)| (b * p.len.max(1)).cmp(&(a * q.len.max(1))).then(p.id.cmp(&q.id)));
    let mut owner: HashMap<[u8; 32], PackId> = HashMap::new();
    for (_, p) in &order {
        for e in &p.entries {
            if live.contains(&e.chunk()) {
                owner.entry(e.id).or_insert(p.id);
            }
        }
    }
    let mut plan = GcPlan { live_chunks: owner.len(), ..Default::default() };
    plan.live_missing = live.len() - live.iter().filter(|c| owner.contains_key(&c.0)).count();
    let assigned = |p: &PackRecord| -> Vec<Entry> {
        let mut ids = HashSet::new();
        p.entries.iter().filter(|e| owner.get(&e.id) == Some(&p.id) && ids.insert(e.id)).copied().collect()
    };
    let mut keep = Vec::new();
    let mut repack = Vec::new();
    for (_, p) in &order {
        let mine = assigned(p);
        let bytes: u64 = mine.iter().map(|e| e.len as u64).sum();
        if mine.is_empty() {
            plan.delete.push(p.id);
        } else if bytes * 100 < policy.repack_below_percent * p.len {
            repack.push((p.id, mine));
        } else {
            keep.push(*p);
        }
    }
    let small: Vec<usize> =
        keep.iter().enumerate().filter(|(_, p)| p.len < policy.small_pack).map(|(i, _)| i).collect();
    if small.len() >= policy.merge_small_at {
        for &i in small.iter().rev() {
            let p = keep.remove(i);
            repack.push((p.id, assigned(p)));
        }
    }
    // What a kept pack holds need not be copied again.
    let kept: HashSet<[u8; 32]> = keep.iter().flat_map(|p| p.entries.iter().map(|e| e.id)).collect();
    for (_, entries) in &mut repack {
        entries.retain(|e| !kept.contains(&e.id));
    }
    let all: HashSet<[u8; 32]> = packs.iter().flat_map(|p| p.entries.iter().map(|e| e.id)).collect();
    let after: HashSet<[u8; 32]> =
        kept.iter().copied().chain(repack.iter().flat_map(|(_, es)| es.iter().map(|e| e.id))).collect();
    plan.removed_chunks = all.len() - after.len();
    repack.sort_by_key(|(id, _)| *id);
    plan.delete.sort();
    plan.keep = keep.into_iter().cloned().collect();
    plan.keep.sort_by_key(|p| p.id);
    plan.repack = repack;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::encode;

    fn chunk(n: u32, size: usize) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> =
            (0..size as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(n * 7919) >> 11) as u8).collect();
        (ChunkId::of(&data), encode(&data))
    }

    fn pack_of(chunks: &[(ChunkId, Vec<u8>)]) -> SealedPack {
        let mut b = PackBuilder::default();
        for (id, enc) in chunks {
            b.push(id, enc);
        }
        b.seal()
    }

    #[test]
    fn a_sealed_pack_finds_its_chunks_and_its_trailer() {
        let chunks: Vec<_> = (0..20).map(|n| chunk(n, 5000 + n as usize * 100)).collect();
        let sealed = pack_of(&chunks);
        assert_eq!(sealed.record.len, sealed.bytes.len() as u64);
        for ((id, enc), e) in chunks.iter().zip(&sealed.record.entries) {
            assert_eq!(e.chunk(), *id);
            assert_eq!(e.slice(&sealed.bytes).unwrap(), &enc[..]);
        }
        // The trailer from the whole pack, and from a short tail (asks for more).
        let back = trailer_of(&sealed.bytes, sealed.record.len).unwrap().unwrap();
        assert_eq!(back, sealed.record);
        let need = trailer_of(&sealed.bytes[sealed.bytes.len() - 10..], sealed.record.len).unwrap().unwrap_err();
        let tail = &sealed.bytes[sealed.bytes.len() - need as usize..];
        assert_eq!(trailer_of(tail, sealed.record.len).unwrap().unwrap(), sealed.record);
        // The same chunks in the same order: the same id.
        assert_eq!(pack_of(&chunks).record.id, sealed.record.id);
    }

    #[test]
    fn an_index_round_trips_and_refuses_what_does_not_fit() {
        let a = pack_of(&[chunk(1, 3000), chunk(2, 4000)]).record;
        let b = pack_of(&[chunk(3, 3000)]).record;
        let bytes = encode_index(&[a.clone(), b.clone()]);
        assert_eq!(decode_index(&bytes).unwrap(), vec![a.clone(), b]);
        assert_eq!(index_name(&bytes).len(), 64);
        // An entry past the pack's end.
        let mut bad = a.clone();
        bad.entries[1].offset = bad.len as u32;
        assert!(matches!(decode_index(&encode_index(&[bad])), Err(PackError::Bounds { .. })));
        // An encoded length below the header or above the largest chunk.
        let mut bad = a.clone();
        bad.entries[0].len = 3;
        assert!(matches!(decode_index(&encode_index(&[bad])), Err(PackError::Bounds { .. })));
        // A pack larger than readers accept.
        let mut bad = a.clone();
        bad.len = MAX_PACK + 1;
        assert!(matches!(decode_index(&encode_index(&[bad])), Err(PackError::Bounds { .. })));
        // Damage anywhere: the envelope's checksum.
        let mut damaged = bytes.clone();
        damaged[50] ^= 1;
        assert!(matches!(decode_index(&damaged), Err(PackError::Envelope(_))));
        assert!(decode_index(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_index(b"").is_err());
    }

    #[test]
    fn a_trailer_that_lies_is_refused() {
        let sealed = pack_of(&[chunk(1, 3000)]);
        let len = sealed.record.len;
        // A length suffix pointing before the pack's start.
        let mut bytes = sealed.bytes.clone();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(trailer_of(&bytes, len), Err(PackError::NoTrailer { .. })));
        // A damaged trailer.
        let mut bytes = sealed.bytes.clone();
        bytes[n - 10] ^= 0xff;
        assert!(trailer_of(&bytes, len).is_err());
        assert!(matches!(trailer_of(&[1, 2], len), Err(PackError::NoTrailer { .. })));
        assert!(trailer_of(&sealed.bytes, MAX_PACK + 1).is_err());
    }

    fn rec(id: u8, len: u64, chunks: &[(u8, u32)]) -> PackRecord {
        let mut at = 0;
        let entries = chunks
            .iter()
            .map(|&(c, l)| {
                let e = Entry { id: [c; 32], offset: at, len: l };
                at += l;
                e
            })
            .collect();
        PackRecord { id: PackId([id; 32]), len, entries }
    }

    fn live(ids: &[u8]) -> HashSet<ChunkId> {
        ids.iter().map(|&c| ChunkId([c; 32])).collect()
    }

    #[test]
    fn gc_deletes_dead_packs_keeps_full_ones_and_rewrites_sparse_ones() {
        let policy = GcPolicy { small_pack: 0, ..Default::default() };
        let packs = vec![
            rec(1, 1000, &[(1, 500), (2, 500)]),           // all live: keep
            rec(2, 1000, &[(3, 500), (4, 500)]),           // nothing live: delete
            rec(3, 1000, &[(5, 100), (6, 450), (7, 450)]), // 10 % live: rewrite chunk 5
            rec(4, 1000, &[(8, 600), (9, 400)]),           // 60 % live: keep
        ];
        let plan = plan_gc(&packs, &live(&[1, 2, 5, 8]), &policy);
        assert_eq!(plan.keep.iter().map(|p| p.id).collect::<Vec<_>>(), vec![PackId([1; 32]), PackId([4; 32])]);
        assert_eq!(plan.delete, vec![PackId([2; 32])]);
        assert_eq!(plan.repack.len(), 1);
        assert_eq!(plan.repack[0].0, PackId([3; 32]));
        assert_eq!(plan.repack[0].1.iter().map(|e| e.id[0]).collect::<Vec<_>>(), vec![5]);
        assert_eq!((plan.live_chunks, plan.live_missing), (4, 0));
        // 3, 4 (deleted), 6, 7 (not copied); 9 stays in a kept pack.
        assert_eq!(plan.removed_chunks, 4);
        assert!(!plan.is_noop());
        // Everything live and full: nothing to do.
        let plan = plan_gc(&packs[..1], &live(&[1, 2]), &policy);
        assert!(plan.is_noop());
    }

    #[test]
    fn a_chunk_in_two_packs_lives_on_in_the_fuller_one() {
        let policy = GcPolicy { small_pack: 0, ..Default::default() };
        // Chunk 1 is in both; pack 2 is otherwise all live, pack 1 all dead.
        let packs = vec![rec(1, 1000, &[(1, 500), (2, 500)]), rec(2, 1000, &[(1, 500), (3, 500)])];
        let plan = plan_gc(&packs, &live(&[1, 3]), &policy);
        assert_eq!(plan.keep.iter().map(|p| p.id).collect::<Vec<_>>(), vec![PackId([2; 32])]);
        assert_eq!(plan.delete, vec![PackId([1; 32])]);
        // The same pack recorded twice (two indexes) counts once.
        let plan = plan_gc(&[packs[1].clone(), packs[1].clone()], &live(&[1, 3]), &policy);
        assert_eq!(plan.keep.len(), 1);
        assert!(plan.is_noop());
        // A live chunk nowhere is counted, not invented.
        let plan = plan_gc(&packs, &live(&[1, 3, 99]), &policy);
        assert_eq!(plan.live_missing, 1);
    }

    #[test]
    fn small_packs_are_merged_once_there_are_enough() {
        let policy = GcPolicy { repack_below_percent: 50, small_pack: 100, merge_small_at: 3 };
        let small = |id: u8| rec(id, 50, &[(id, 50)]);
        let big = rec(9, 1000, &[(9, 1000)]);
        let ids: Vec<u8> = vec![1, 2, 9];
        let plan = plan_gc(&[small(1), small(2), big.clone()], &live(&ids), &policy);
        assert!(plan.is_noop(), "two small packs stay");
        let plan = plan_gc(&[small(1), small(2), small(3), big], &live(&[1, 2, 3, 9]), &policy);
        assert_eq!(plan.keep.iter().map(|p| p.id).collect::<Vec<_>>(), vec![PackId([9; 32])]);
        let mut copied: Vec<u8> = plan.repack.iter().flat_map(|(_, es)| es.iter().map(|e| e.id[0])).collect();
        copied.sort();
        assert_eq!(copied, vec![1, 2, 3]);
        assert_eq!(plan.removed_chunks, 0);
    }
}
