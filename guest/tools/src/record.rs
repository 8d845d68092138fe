//! Wire format of the sequence-numbered traffic records.
//!
//! A record is `size` bytes (at least [`HEADER_LEN`]), all integers big-endian:
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 4    | magic `0x53545351` ("STSQ")             |
//! | 4      | 4    | flow id                                 |
//! | 8      | 8    | sequence number, from 0                 |
//! | 16     | 8    | announced total count, 0 = unbounded    |
//! | 24     | 8    | sender's CLOCK_MONOTONIC at send, ns    |
//! | 32     | ..   | zero padding up to `size`               |
//!
//! Over UDP one datagram carries one record. Over TCP each record is
//! preceded by its length as a 4-byte big-endian integer.

use std::fmt;

/// Identifies a record.
pub const MAGIC: u32 = 0x5354_5351;
/// Bytes before the padding; the smallest record.
pub const HEADER_LEN: usize = 32;
/// The largest record accepted over TCP (UDP is bounded by the datagram).
pub const MAX_RECORD_LEN: usize = 1 << 20;

/// The fields of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Flow id chosen by the sender.
    pub flow: u32,
    /// Sequence number within the flow, from 0.
    pub seq: u64,
    /// Records the sender will send in this flow; 0 = unbounded.
    pub total: u64,
    /// The sender's CLOCK_MONOTONIC when it sent the record, ns.
    pub send_mono_ns: u64,
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the header.
    Short(usize),
    /// The magic number is wrong.
    BadMagic(u32),
    /// A TCP length prefix outside `HEADER_LEN..=MAX_RECORD_LEN`.
    BadLength(usize),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Short(n) => write!(f, "record of {n} bytes is shorter than its {HEADER_LEN}-byte header"),
            RecordError::BadMagic(m) => write!(f, "bad record magic {m:#010x}"),
            RecordError::BadLength(n) => write!(f, "record length {n} outside {HEADER_LEN}..={MAX_RECORD_LEN}"),
        }
    }
}

impl std::error::Error for RecordError {}

impl Record {
    /// Writes the header into `buf[..HEADER_LEN]` and zeroes the rest.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn encode_into(&self, buf: &mut [u8]) {
        assert!(buf.len() >= HEADER_LEN, "record buffer shorter than header");
        buf[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&self.flow.to_be_bytes());
        buf[8..16].copy_from_slice(&self.seq.to_be_bytes());
        buf[16..24].copy_from_slice(&self.total.to_be_bytes());
        buf[24..32].copy_from_slice(&self.send_mono_ns.to_be_bytes());
        buf[HEADER_LEN..].fill(0);
    }

    /// Reads a record from the start of `buf` (padding is ignored).
    pub fn decode(buf: &[u8]) -> Result<Record, RecordError> {
        if buf.len() < HEADER_LEN {
            return Err(RecordError::Short(buf.len()));
        }
        let u32_at = |o: usize| u32::from_be_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_be_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(RecordError::BadMagic(magic));
        }
        Ok(Record { flow: u32_at(4), seq: u64_at(8), total: u64_at(16), send_mono_ns: u64_at(24) })
    }
}

/// Checks a TCP length prefix.
pub fn check_frame_len(len: u32) -> Result<usize, RecordError> {
    let len = len as usize;
    if (HEADER_LEN..=MAX_RECORD_LEN).contains(&len) {
        Ok(len)
    } else {
        Err(RecordError::BadLength(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_padding() {
        let r = Record { flow: 7, seq: 1 << 40, total: 200, send_mono_ns: 123_456_789 };
        let mut buf = vec![0xAA; 100];
        r.encode_into(&mut buf);
        assert!(buf[HEADER_LEN..].iter().all(|&b| b == 0));
        assert_eq!(&buf[0..4], b"STSQ");
        assert_eq!(Record::decode(&buf), Ok(r));
        assert_eq!(Record::decode(&buf[..HEADER_LEN]), Ok(r));
    }

    #[test]
    fn refuses_short_and_foreign_bytes() {
        assert_eq!(Record::decode(&[0; 31]), Err(RecordError::Short(31)));
        let mut buf = [0u8; 32];
        Record { flow: 1, seq: 2, total: 3, send_mono_ns: 4 }.encode_into(&mut buf);
        buf[0] = b'X';
        assert!(matches!(Record::decode(&buf), Err(RecordError::BadMagic(_))));
    }

    #[test]
    fn frame_length_bounds() {
        assert_eq!(check_frame_len(32), Ok(32));
        assert_eq!(check_frame_len(31), Err(RecordError::BadLength(31)));
        assert!(check_frame_len(MAX_RECORD_LEN as u32 + 1).is_err());
    }
}
