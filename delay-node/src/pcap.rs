//! Per-port packet capture in classic pcap format (nanosecond timestamps,
//! Ethernet link type), readable by tshark and wireshark.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// An open capture file.
#[derive(Debug)]
pub struct PcapWriter {
    w: BufWriter<File>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC when the capture started.
    real_minus_mono: i128,
}

fn realtime_ns() -> i128 {
    i128::from(stasis_core::clock::realtime_ns())
}

impl PcapWriter {
    /// Create `path` and write the global header.
    pub fn create(path: &Path) -> std::io::Result<PcapWriter> {
        let mut w = BufWriter::with_capacity(1 << 16, stasis_core::private::create_file(path)?);
        w.write_all(&0xa1b2_3c4du32.to_le_bytes())?; // nanosecond-resolution magic
        w.write_all(&2u16.to_le_bytes())?;
        w.write_all(&4u16.to_le_bytes())?;
        w.write_all(&0i32.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&(crate::frame::MAX_FRAME as u32).to_le_bytes())?;
        w.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
        let real_minus_mono = realtime_ns() - stasis_core::clock::mono_ns() as i128;
        Ok(PcapWriter { w, real_minus_mono })
    }

    /// Append one frame seen at monotonic instant `at` (the instant the node
    /// stamped it with), written as wall-clock time.
    pub fn record(&mut self, at: stasis_core::clock::MonoNs, frame: &[u8]) -> std::io::Result<()> {
        let t = (at as i128 + self.real_minus_mono).max(0);
        self.w.write_all(&((t / 1_000_000_000) as u32).to_le_bytes())?;
        self.w.write_all(&((t % 1_000_000_000) as u32).to_le_bytes())?;
        self.w.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.w.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.w.write_all(frame)
    }

    /// Flush buffered records to the file.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.w.flush()?;
        self.w.get_ref().sync_all()
    }
}
