//! What a saved VM state stream says about the guest's clocks.
//!
//! QEMU 7.2 writes its `timer` vmstate section (softmmu/cpu-timers.c,
//! version 2: `cpu_ticks_offset`, 8 unused bytes, `cpu_clock_offset`, all
//! big-endian i64) among the device sections at the end of a migration
//! stream. While the VM is stopped, `cpu_clock_offset` is the guest's
//! virtual clock (ns) at the instant its ticks were disabled, i.e. when its
//! clocks froze. With the host instant and virtual clock of the previous
//! resume, that gives the freeze instant exactly, where QMP only brackets
//! it between the `stop` command's write and the STOP event.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `QEMU_VM_SECTION_FULL`, then (after the 4-byte section id) the idstr
/// `timer` with its length byte, instance id 0 and version id 2.
const HEADER: &[u8] = b"\x05timer\x00\x00\x00\x00\x00\x00\x00\x02";
const SECTION_FULL: u8 = 0x04;
/// The device sections follow the RAM: only the stream's tail is searched.
const TAIL: u64 = 8 << 20;

/// Why the virtual clock could not be read from a state file.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no QEMU 7.2 `timer` section (version 2) in the last {TAIL} bytes")]
    NoTimerSection { path: PathBuf },
}

/// The guest's virtual clock (ns) at its freeze, from a state file saved
/// while the VM was stopped.
pub fn saved_virtual_clock_ns(path: &Path) -> Result<i64, VmStateError> {
    let io = |source| VmStateError::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).map_err(io)?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(io)?;
    virtual_clock_in(&tail).ok_or_else(|| VmStateError::NoTimerSection { path: path.to_owned() })
}

/// The last well-formed `timer` section in `bytes`.
fn virtual_clock_in(bytes: &[u8]) -> Option<i64> {
    let mut end = bytes.len();
    while let Some(i) = bytes[..end].windows(HEADER.len()).rposition(|w| w == HEADER) {
        let body = i + HEADER.len();
        if i >= 5 && bytes[i - 5] == SECTION_FULL && bytes.len() >= body + 24 {
            let v = i64::from_be_bytes(bytes[body + 16..body + 24].try_into().expect("8 bytes"));
            return Some(v);
        }
        end = i + HEADER.len() - 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(v: i64) -> Vec<u8> {
        let mut s = vec![SECTION_FULL, 0, 0, 0, 9];
        s.extend_from_slice(HEADER);
        s.extend_from_slice(&123i64.to_be_bytes());
        s.extend_from_slice(&[0; 8]);
        s.extend_from_slice(&v.to_be_bytes());
        s.push(0x00); // the next section
        s
    }

    #[test]
    fn finds_the_last_well_formed_section() {
        let mut b = vec![7u8; 100];
        b.extend(section(5_000_000_000));
        assert_eq!(virtual_clock_in(&b), Some(5_000_000_000));
        // A header without the section byte before it (say, inside RAM) is skipped.
        let mut c = b.clone();
        c.extend_from_slice(&[1, 1, 1, 1, 1]);
        c.extend_from_slice(HEADER);
        c.extend_from_slice(&[0; 24]);
        assert_eq!(virtual_clock_in(&c), Some(5_000_000_000));
        // Truncated after the header: not a section.
        assert_eq!(virtual_clock_in(&section(1)[..HEADER.len() + 5 + 10]), None);
        assert_eq!(virtual_clock_in(b"no timer here"), None);
    }
}
