//! The `-netdev stream` framing: a 4-byte big-endian length, then an Ethernet
//! frame without FCS. [`FrameDecoder`] cuts a byte stream into frames and
//! refuses anything that cannot come from a NIC.

/// Smallest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Largest frame accepted (QEMU with offloads can send up to ~64 KiB).
pub const MAX_FRAME: usize = 65536;
/// Length of the prefix before each frame.
pub const PREFIX: usize = 4;

/// Why a port's byte stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("runt frame: length prefix {0} is below the {MIN_FRAME}-byte Ethernet header")]
    Runt(u32),
    #[error("oversize frame: length prefix {0} exceeds {MAX_FRAME} bytes")]
    Oversize(u32),
}

/// Incremental decoder of one connection's byte stream.
///
/// Feed it whatever a read returned; take complete frames out. After an error
/// the stream is unusable (there is no way to resynchronise) and the decoder
/// keeps returning that error.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 256 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        if avail.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        if (len as usize) < MIN_FRAME {
            self.failed = Some(FrameError::Runt(len));
            return Err(FrameError::Runt(len));
        }
        if len as usize > MAX_FRAME {
            self.failed = Some(FrameError::Oversize(len));
            return Err(FrameError::Oversize(len));
        }
        let total = PREFIX + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let begin = self.start + PREFIX;
        self.start += total;
        Ok(Some(&self.buf[begin..begin + len as usize]))
    }

    /// Bytes buffered that do not yet form a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Append `frame` with its length prefix to `out`.
pub fn encode_into(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    #[test]
    fn splits_frames_across_arbitrary_reads() {
        let mut wire = Vec::new();
        encode_into(&frame(14, 1), &mut wire);
        encode_into(&frame(1514, 2), &mut wire);
        encode_into(&frame(60, 3), &mut wire);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            d.extend(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, vec![frame(14, 1), frame(1514, 2), frame(60, 3)]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn refuses_runt_and_oversize_and_stays_failed() {
        let mut d = FrameDecoder::new();
        d.extend(&13u32.to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::Runt(13)));
        d.extend(&[0; 100]);
        assert_eq!(d.next_frame(), Err(FrameError::Runt(13)));
        let mut d = FrameDecoder::new();
        d.extend(&65537u32.to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::Oversize(65537)));
        let mut d = FrameDecoder::new();
        d.extend(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_frame(), Err(FrameError::Oversize(_))));
        let mut d = FrameDecoder::new();
        d.extend(&65536u32.to_be_bytes());
        d.extend(&vec![0; 65536]);
        assert_eq!(d.next_frame().unwrap().map(|f| f.len()), Some(65536));
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_frames_respect_limits(data in proptest::collection::vec(any::<u8>(), 0..4096), cut in 1usize..64) {
            let mut d = FrameDecoder::new();
            for chunk in data.chunks(cut) {
                d.extend(chunk);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => prop_assert!(f.len() >= MIN_FRAME && f.len() <= MAX_FRAME),
                        Ok(None) => break,
                        Err(_) => break,
                    }
                }
            }
        }

        #[test]
        fn valid_streams_round_trip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), MIN_FRAME..300), 0..20), cut in 1usize..500) {
            let mut wire = Vec::new();
            for f in &frames { encode_into(f, &mut wire); }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.extend(chunk);
                while let Some(f) = d.next_frame().unwrap() { got.push(f.to_vec()); }
            }
            prop_assert_eq!(got, frames);
        }
    }
}
