//! The saved state of a frozen delay node and its file format.
//!
//! Plain data only (see STYLE.md, "Persist"): every time is relative to the
//! freeze instant in virtual nanoseconds, never a host instant. The file is a
//! `stasis_core::envelope` of kind `"delay-node"` whose payload is the
//! postcard encoding of [`NodeState`].

use crate::config::Topology;
use serde::{Deserialize, Serialize};
use stasis_core::envelope::{self, EnvelopeError, FormatVersion, Kind};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The envelope kind of delay-node state files. Major 2: topology ports
/// carry `peer` (a TCP port's one accepted address).
pub const KIND: Kind = Kind {
    name: "delay-node",
    version: FormatVersion { major: 2, minor: 0 },
    // Generous: 50-frame queues of 64 KiB frames on dozens of pipes fit easily.
    max_payload: 4 << 30,
};

/// Everything needed to continue a frozen node elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// The topology the state belongs to; restoring under another one is refused.
    pub topology: Topology,
    /// ChaCha8 generator: seed, stream and word position.
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: u128,
    /// Next tie-break sequence number.
    pub next_seq: u64,
    /// One per pipe, in the order the topology defines them (see `Scheduler::pipe_names`).
    pub pipes: Vec<PipeState>,
    /// One per port, in topology order.
    pub ports: Vec<PortState>,
    /// One per LAN: learned MAC → member index.
    pub macs: Vec<Vec<([u8; 6], u32)>>,
}

/// One direction of shaping with its frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipeState {
    /// Serialiser busy for this long after the freeze.
    pub busy_remaining_ns: u64,
    /// Last exit time after the freeze (keeps jittered frames in order).
    pub last_exit_remaining_ns: u64,
    pub frames: Vec<FrameState>,
    pub counters: PipeCounters,
}

/// A frame inside a pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameState {
    pub data: Vec<u8>,
    /// Serialisation still to do after the freeze (0 if done).
    pub tx_remaining_ns: u64,
    /// Time until the frame leaves the pipe.
    pub remaining_ns: u64,
    /// Tie-break among frames leaving at the same instant.
    pub seq: u64,
}

/// A port's held frames and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortState {
    /// Frames that were due while delivery to the port was held; `late_ns`
    /// is how long before the freeze each was due.
    pub held: Vec<HeldState>,
    pub counters: PortCounters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldState {
    pub data: Vec<u8>,
    pub late_ns: u64,
}

/// Counters of one pipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeCounters {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
}

/// Counters of one port (VM side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Frames the VM sent.
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames handed to the VM's socket.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Frames released while no VM was connected.
    pub dropped_unconnected: u64,
    /// Frames sent by a port that belongs to no LAN or link.
    pub dropped_unattached: u64,
    /// Connections dropped for bad framing.
    pub errors: u64,
}

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not a usable delay-node state")]
    Envelope {
        path: PathBuf,
        #[source]
        source: EnvelopeError,
    },
}

/// Result of writing a state file.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    pub blake3: String,
}

impl NodeState {
    /// Write durably: a temporary file in the same directory, fsync, rename, fsync the directory.
    pub fn write_file(&self, path: &Path) -> Result<Written, StateFileError> {
        let werr = |source| StateFileError::Write { path: path.to_owned(), source };
        let bytes = envelope::encode(&KIND, self)
            .map_err(|source| StateFileError::Envelope { path: path.to_owned(), source })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = stasis_core::private::create_file(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        Ok(Written { bytes: bytes.len() as u64, blake3: blake3::hash(&bytes).to_hex().to_string() })
    }

    /// Read and check a state file (size-capped, checksummed, versioned).
    pub fn read_file(path: &Path) -> Result<NodeState, StateFileError> {
        let f = std::fs::File::open(path).map_err(|source| StateFileError::Read { path: path.to_owned(), source })?;
        envelope::read_from(&KIND, std::io::BufReader::new(f))
            .map_err(|source| StateFileError::Envelope { path: path.to_owned(), source })
    }
}
