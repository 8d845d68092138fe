//! Per-port packet capture in classic pcap format (nanosecond timestamps,
//! Ethernet link type), readable by tshark and wireshark.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// An open capture file.
#[derive(Debug)]
pub struct PcapWriter {
    w: BufWriter<File>,
}

impl PcapWriter {
    /// Create `path` and write the global header.
    pub fn create(path: &Path) -> std::io::Result<PcapWriter> {
        let mut w = BufWriter::with_capacity(1 << 16, File::create(path)?);
        w.write_all(&0xa1b2_3c4du32.to_le_bytes())?; // nanosecond-resolution magic
        w.write_all(&2u16.to_le_bytes())?;
        w.write_all(&4u16.to_le_bytes())?;
        w.write_all(&0i32.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&(crate::frame::MAX_FRAME as u32).to_le_bytes())?;
        w.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
        Ok(PcapWriter { w })
    }

    /// Append one frame stamped with the host's real time.
    pub fn record(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        self.w.write_all(&(ts.tv_sec as u32).to_le_bytes())?;
        self.w.write_all(&(ts.tv_nsec as u32).to_le_bytes())?;
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
