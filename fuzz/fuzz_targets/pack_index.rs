//! The object store's pack index objects and pack trailers, as read back
//! from a bucket anyone with the credentials may have written. First byte:
//! 0 — raw bytes as an index object; 1 — raw bytes as a pack's tail, the
//! pack's length taken from the next 8 bytes; 2/3 — the rest read as
//! records (8-byte pack length, then 40-byte entries: id, offset, length)
//! and sealed correctly as an index (2) or as a pack's trailer behind some
//! chunk bytes (3), so the fuzzer reaches the bounds checks behind the
//! envelope's checksum. Whatever is accepted must lie inside its pack.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_core::envelope;
use stasis_store::remote::pack::{self, Entry, PackId, PackRecord, MAX_ENCODED, MAX_PACK, TRAILER_KIND};

fn entries_of(bytes: &[u8]) -> Vec<Entry> {
    bytes
        .chunks_exact(40)
        .map(|c| Entry {
            id: c[..32].try_into().expect("32 bytes"),
            offset: u32::from_le_bytes(c[32..36].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(c[36..40].try_into().expect("4 bytes")),
        })
        .collect()
}

fn check(p: &PackRecord) {
    assert!(p.len <= MAX_PACK, "accepted a pack of {} bytes", p.len);
    for e in &p.entries {
        assert!(e.len >= 8 && e.len <= MAX_ENCODED, "accepted an entry of {} bytes", e.len);
        assert!(e.offset as u64 + e.len as u64 <= p.len, "accepted an entry past its pack's end");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            if let Ok(packs) = pack::decode_index(rest) {
                packs.iter().for_each(check);
            }
        }
        1 => {
            if rest.len() < 8 {
                return;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let tail = &rest[8..];
            for len in [len, tail.len() as u64] {
                if let Ok(Ok(p)) = pack::trailer_of(tail, len) {
                    check(&p);
                }
            }
        }
        2 => {
            if rest.len() < 8 {
                return;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let records: Vec<PackRecord> = rest[8..]
                .chunks(400)
                .enumerate()
                .map(|(i, c)| PackRecord { id: PackId([i as u8; 32]), len: len >> (i % 8), entries: entries_of(c) })
                .collect();
            if let Ok(packs) = pack::decode_index(&pack::encode_index(&records)) {
                assert_eq!(packs, records, "an index read back differs");
                packs.iter().for_each(check);
            }
        }
        _ => {
            if rest.len() < 2 {
                return;
            }
            // Some chunk bytes (as many as the first two bytes say), then the trailer.
            let body = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let entries = entries_of(&rest[2..]);
            let trailer = envelope::encode(&TRAILER_KIND, &entries).expect("encodes");
            let mut pack_bytes = vec![0u8; body];
            pack_bytes.extend_from_slice(&trailer);
            pack_bytes.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
            if let Ok(Ok(p)) = pack::trailer_of(&pack_bytes, pack_bytes.len() as u64) {
                check(&p);
                for e in &p.entries {
                    assert!(e.slice(&pack_bytes).is_some(), "an accepted entry does not slice");
                }
            }
        }
    }
});
