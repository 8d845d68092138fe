//! Frames on the TCP stream: a 4-byte big-endian length (1 ..= [`MAX_FRAME`])
//! followed by that many bytes. Before authentication a frame holds one
//! [`Message`](crate::msg::Message); after it, a sealed message (see
//! [`crate::auth`]).

/// Largest frame payload accepted or sent.
pub const MAX_FRAME: usize = 1 << 20;

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame length 0 is invalid")]
    Empty,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
}

/// Length prefix plus payload.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    check_len(payload.len())?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Validate a length read from a prefix before allocating for it.
pub fn check_len(len: usize) -> Result<usize, FrameError> {
    match len {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME => Err(FrameError::TooLong(n)),
        n => Ok(n),
    }
}

/// Split the first complete frame off `buf`: `Ok(None)` while incomplete,
/// else the payload and the number of bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buf.get(..4) else { return Ok(None) };
    let len = check_len(u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize)?;
    Ok(buf.get(4..4 + len).map(|p| (p, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_incomplete() {
        let f = encode_frame(b"abc").unwrap();
        assert_eq!(f, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(decode_frame(&f).unwrap(), Some((&b"abc"[..], 7)));
        for cut in 0..f.len() {
            assert_eq!(decode_frame(&f[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn refuses_empty_and_oversize() {
        assert_eq!(encode_frame(b""), Err(FrameError::Empty));
        assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(FrameError::Empty));
        assert_eq!(decode_frame(&[0xff, 0xff, 0xff, 0xff]), Err(FrameError::TooLong(u32::MAX as usize)));
        assert_eq!(encode_frame(&vec![0; MAX_FRAME + 1]), Err(FrameError::TooLong(MAX_FRAME + 1)));
    }
}
