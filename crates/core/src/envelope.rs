//! The checked envelope around every saved state file (delay-node state,
//! checkpoint manifests' binary parts, …).
//!
//! Layout (all integers little-endian), documented in `docs/snapshot-format.md`:
//!
//! ```text
//! offset size  field
//! 0      8     magic: b"STASIS\0\x01"
//! 8      16    kind: ASCII, NUL-padded (e.g. "delay-node")
//! 24     2     format major version
//! 26     2     format minor version
//! 28     4     reserved, zero
//! 32     8     payload length in bytes
//! 40     n     payload (postcard)
//! 40+n   4     CRC-32 (IEEE) of bytes 0 .. 40+n
//! ```
//!
//! A reader refuses a different kind, an unknown major version, a newer minor
//! version than it knows, a length over its cap, a truncated file and a bad
//! checksum, each with its own error.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};

/// First bytes of every stasis state file.
pub const MAGIC: [u8; 8] = *b"STASIS\0\x01";
const HEADER_LEN: usize = 40;
const KIND_LEN: usize = 16;

/// The format version of one kind of state, separate from the crate version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatVersion {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What a kind of state declares about itself.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// Short ASCII name, at most 16 bytes.
    pub name: &'static str,
    /// The version this build writes and the newest it reads.
    pub version: FormatVersion,
    /// Largest payload this build will load.
    pub max_payload: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a stasis state file (bad magic)")]
    BadMagic,
    #[error("state file is a {found:?}, expected a {expected:?}")]
    WrongKind { expected: &'static str, found: String },
    #[error("state format {found} is not readable by this build (reads {supported} and older minors)")]
    UnsupportedVersion { found: FormatVersion, supported: FormatVersion },
    #[error("state payload of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge { len: u64, cap: u64 },
    #[error("state file truncated: expected {expected} bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("state file checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("{0} trailing bytes after the checksum")]
    Trailing(u64),
    #[error("payload does not decode")]
    Decode(#[source] postcard::Error),
    #[error("payload does not encode")]
    Encode(#[source] postcard::Error),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

/// Wrap `value` in an envelope of `kind`.
pub fn encode<T: Serialize>(kind: &Kind, value: &T) -> Result<Vec<u8>, EnvelopeError> {
    assert!(kind.name.len() <= KIND_LEN, "kind name too long");
    let payload = postcard::to_stdvec(value).map_err(EnvelopeError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    let mut name = [0u8; KIND_LEN];
    name[..kind.name.len()].copy_from_slice(kind.name.as_bytes());
    out.extend_from_slice(&name);
    out.extend_from_slice(&kind.version.major.to_le_bytes());
    out.extend_from_slice(&kind.version.minor.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Check and unwrap an envelope of `kind`.
pub fn decode<T: DeserializeOwned>(kind: &Kind, bytes: &[u8]) -> Result<T, EnvelopeError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(EnvelopeError::Truncated { expected: HEADER_LEN as u64, found: bytes.len() as u64 });
    }
    let name_raw = &bytes[8..8 + KIND_LEN];
    let name_end = name_raw.iter().position(|&b| b == 0).unwrap_or(KIND_LEN);
    let found = String::from_utf8_lossy(&name_raw[..name_end]).into_owned();
    if found != kind.name {
        return Err(EnvelopeError::WrongKind { expected: kind.name, found });
    }
    let major = u16::from_le_bytes([bytes[24], bytes[25]]);
    let minor = u16::from_le_bytes([bytes[26], bytes[27]]);
    let found_v = FormatVersion { major, minor };
    if major != kind.version.major || minor > kind.version.minor {
        return Err(EnvelopeError::UnsupportedVersion { found: found_v, supported: kind.version });
    }
    let len = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
    if len > kind.max_payload {
        return Err(EnvelopeError::TooLarge { len, cap: kind.max_payload });
    }
    let total = HEADER_LEN as u64 + len + 4;
    if (bytes.len() as u64) < total {
        return Err(EnvelopeError::Truncated { expected: total, found: bytes.len() as u64 });
    }
    if (bytes.len() as u64) > total {
        return Err(EnvelopeError::Trailing(bytes.len() as u64 - total));
    }
    let body_end = HEADER_LEN + len as usize;
    let stored = u32::from_le_bytes(bytes[body_end..body_end + 4].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&bytes[..body_end]);
    if stored != computed {
        return Err(EnvelopeError::Checksum { stored, computed });
    }
    postcard::from_bytes(&bytes[HEADER_LEN..body_end]).map_err(EnvelopeError::Decode)
}

/// Write an envelope to `w`.
pub fn write_to<T: Serialize, W: Write>(kind: &Kind, value: &T, mut w: W) -> Result<u64, EnvelopeError> {
    let bytes = encode(kind, value)?;
    w.write_all(&bytes)?;
    Ok(bytes.len() as u64)
}

/// Read an envelope from `r`, never reading more than the kind's cap allows.
pub fn read_from<T: DeserializeOwned, R: Read>(kind: &Kind, r: R) -> Result<T, EnvelopeError> {
    let cap = HEADER_LEN as u64 + kind.max_payload + 4;
    let mut bytes = Vec::new();
    r.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        // Let decode report the precise reason (too large, or trailing bytes).
        if bytes.len() >= HEADER_LEN && bytes[..MAGIC.len()] == MAGIC {
            let len = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
            if len > kind.max_payload {
                return Err(EnvelopeError::TooLarge { len, cap: kind.max_payload });
            }
        }
        return Err(EnvelopeError::Trailing(bytes.len() as u64 - cap));
    }
    decode(kind, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: Kind = Kind { name: "test", version: FormatVersion { major: 1, minor: 2 }, max_payload: 1 << 20 };

    #[test]
    fn round_trip() {
        let v = (42u64, "frames".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&K, &v).unwrap();
        let back: (u64, String, Vec<u8>) = decode(&K, &bytes).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn refuses_wrong_kind() {
        let bytes = encode(&K, &1u32).unwrap();
        let other = Kind { name: "other", ..K };
        assert!(matches!(decode::<u32>(&other, &bytes), Err(EnvelopeError::WrongKind { .. })));
    }

    #[test]
    fn refuses_newer_minor_and_other_major() {
        let newer = Kind { version: FormatVersion { major: 1, minor: 3 }, ..K };
        let bytes = encode(&newer, &1u32).unwrap();
        assert!(matches!(decode::<u32>(&K, &bytes), Err(EnvelopeError::UnsupportedVersion { .. })));
        let older_minor = Kind { version: FormatVersion { major: 1, minor: 0 }, ..K };
        let bytes = encode(&older_minor, &1u32).unwrap();
        assert_eq!(decode::<u32>(&K, &bytes).unwrap(), 1);
        let major2 = Kind { version: FormatVersion { major: 2, minor: 0 }, ..K };
        let bytes = encode(&major2, &1u32).unwrap();
        assert!(matches!(decode::<u32>(&K, &bytes), Err(EnvelopeError::UnsupportedVersion { .. })));
    }

    #[test]
    fn refuses_truncation_corruption_and_oversize() {
        let bytes = encode(&K, &vec![7u8; 100]).unwrap();
        assert!(matches!(decode::<Vec<u8>>(&K, &bytes[..bytes.len() - 1]), Err(EnvelopeError::Truncated { .. })));
        let mut bad = bytes.clone();
        bad[50] ^= 0xff;
        assert!(matches!(decode::<Vec<u8>>(&K, &bad), Err(EnvelopeError::Checksum { .. })));
        assert!(matches!(decode::<Vec<u8>>(&K, b"garbage!garbage!"), Err(EnvelopeError::BadMagic)));
        let small = Kind { max_payload: 10, ..K };
        assert!(matches!(decode::<Vec<u8>>(&small, &bytes), Err(EnvelopeError::TooLarge { .. })));
        assert!(matches!(read_from::<Vec<u8>, _>(&small, &bytes[..]), Err(EnvelopeError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<(u64, Vec<u8>)>(&K, &data);
        }

        #[test]
        fn any_single_bit_flip_is_caught(v in proptest::collection::vec(any::<u8>(), 0..64), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&K, &v).unwrap();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(decode::<Vec<u8>>(&K, &bytes).is_err());
        }
    }
}
