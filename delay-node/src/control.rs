//! The agent's control interface: JSON lines over a unix socket, one request
//! line answered by one response line, `{"ok": …}` or `{"error": "…"}`, and
//! a typed async client.
//!
//! ```text
//! agent                                  delay-node
//!   │ {"cmd":"freeze_at","at":T,"hold_lead_ns":L} │
//!   │ ───────────────────────────────────────────▶ │ hold deliveries due ≥ T-L, freeze clock at T
//!   │ ◀─────────────────────────────── {"ok":null} │ (immediately)
//!   │ {"cmd":"save","path":"/…/dn.state"}          │
//!   │ ───────────────────────────────────────────▶ │ wait for T, drain sockets, write state
//!   │ ◀────────────────────── {"ok":{SaveReport}}  │
//!   │ {"cmd":"thaw_at","at":T2}                    │
//!   │ ───────────────────────────────────────────▶ │ sleep+spin to T2, thaw
//!   │ ◀────────────────────── {"ok":{ThawReport}}  │
//! ```
//!
//! Other requests: `freeze_port_at {port, at, hold_lead_ns}`, `thaw_port_at
//! {port, at}`, `stats`, `pcap {port, path|null}`, `restore {path}` (frozen
//! only: replace the whole state), `shutdown`.

pub use crate::sched::{PipeStats, PortStats, ReleaseError, Stats, ThawReport};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stasis_core::clock::MonoNs;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    FreezeAt {
        at: MonoNs,
        hold_lead_ns: u64,
    },
    FreezePortAt {
        port: String,
        at: MonoNs,
        hold_lead_ns: u64,
    },
    Save {
        path: PathBuf,
    },
    ThawAt {
        at: MonoNs,
    },
    ThawPortAt {
        port: String,
        at: MonoNs,
    },
    /// Keep the node out of a vhost-user port's guest memory (no RX
    /// delivery, TX ring left alone) while its VM runs, e.g. during a live
    /// checkpoint's background snapshot; frames wait in the node. No-op for
    /// stream ports.
    HoldPort {
        port: String,
    },
    /// End a [`Request::HoldPort`]: queued TX is taken, held frames delivered.
    ReleasePort {
        port: String,
    },
    Stats,
    Pcap {
        port: String,
        path: Option<PathBuf>,
    },
    Restore {
        path: PathBuf,
    },
    Shutdown,
}

/// What `save` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    /// Size of the state file.
    pub bytes: u64,
    /// Frames inside links and LANs.
    pub frames_in_flight: u64,
    /// Frames held back at ports (due during the hold lead, or unwritten).
    pub frames_held: u64,
    /// Host instant of the freeze (0 for a node restored from a file).
    pub frozen_at: MonoNs,
    /// BLAKE3 of the whole state file, hex.
    pub blake3: Option<String>,
}

/// What `thaw_port_at` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortThawReport {
    pub thawed_at: MonoNs,
    pub held_frames: u64,
    pub max_hold_lateness_ns: u64,
}

/// Failures of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O")]
    Io(#[from] std::io::Error),
    #[error("the delay node closed the control connection")]
    Closed,
    #[error("malformed control message")]
    Protocol(#[from] serde_json::Error),
    #[error("delay node refused: {0}")]
    Refused(String),
}

/// Async client of one control connection.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    line: String,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect { path: path.to_owned(), source })?;
        let (r, w) = s.into_split();
        Ok(Client { reader: BufReader::new(r), writer: w, line: String::new() })
    }

    async fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ControlError> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            return Err(ControlError::Closed);
        }
        parse_response(&self.line)
    }

    /// Schedule the freeze: stop delivering to every port at `at - hold_lead_ns`
    /// (frames due later are held, lateness recorded), freeze the virtual clock at `at`.
    pub async fn freeze_at(&mut self, at: MonoNs, hold_lead_ns: u64) -> Result<(), ControlError> {
        self.call(&Request::FreezeAt { at, hold_lead_ns }).await
    }

    /// Hold delivery to one port from `at - hold_lead_ns`; the network keeps running.
    pub async fn freeze_port_at(&mut self, port: &str, at: MonoNs, hold_lead_ns: u64) -> Result<(), ControlError> {
        self.call(&Request::FreezePortAt { port: port.to_owned(), at, hold_lead_ns }).await
    }

    /// Wait until frozen, drain the ports' sockets, write the state file durably.
    pub async fn save(&mut self, path: &Path) -> Result<SaveReport, ControlError> {
        self.call(&Request::Save { path: path.to_owned() }).await
    }

    /// Thaw the whole node at instant `at`; replies after thawing.
    pub async fn thaw_at(&mut self, at: MonoNs) -> Result<ThawReport, ControlError> {
        self.call(&Request::ThawAt { at }).await
    }

    /// End a per-port hold at instant `at`; replies after.
    pub async fn thaw_port_at(&mut self, port: &str, at: MonoNs) -> Result<PortThawReport, ControlError> {
        self.call(&Request::ThawPortAt { port: port.to_owned(), at }).await
    }

    /// [`Request::HoldPort`]; returns whether the port is vhost-user (held).
    pub async fn hold_port(&mut self, port: &str) -> Result<bool, ControlError> {
        let v: serde_json::Value = self.call(&Request::HoldPort { port: port.to_owned() }).await?;
        Ok(v["vhost"].as_bool().unwrap_or(false))
    }

    /// [`Request::ReleasePort`].
    pub async fn release_port(&mut self, port: &str) -> Result<(), ControlError> {
        let _: serde_json::Value = self.call(&Request::ReleasePort { port: port.to_owned() }).await?;
        Ok(())
    }

    pub async fn stats(&mut self) -> Result<Stats, ControlError> {
        self.call(&Request::Stats).await
    }

    /// Start (`Some`) or stop (`None`) capturing a port's frames (both directions).
    pub async fn pcap(&mut self, port: &str, path: Option<&Path>) -> Result<(), ControlError> {
        self.call(&Request::Pcap { port: port.to_owned(), path: path.map(Path::to_owned) }).await
    }

    /// Replace the frozen node's whole state with a state file's.
    pub async fn restore(&mut self, path: &Path) -> Result<(), ControlError> {
        self.call(&Request::Restore { path: path.to_owned() }).await
    }

    pub async fn shutdown(&mut self) -> Result<(), ControlError> {
        self.call(&Request::Shutdown).await
    }
}

/// Parse one response line into `T` or the node's refusal.
pub fn parse_response<T: DeserializeOwned>(line: &str) -> Result<T, ControlError> {
    let mut v: serde_json::Value = serde_json::from_str(line)?;
    if let Some(e) = v.get("error") {
        return Err(ControlError::Refused(e.as_str().unwrap_or("unknown error").to_owned()));
    }
    match v.get_mut("ok") {
        Some(ok) => Ok(serde_json::from_value(ok.take())?),
        None => Err(ControlError::Refused("response has neither ok nor error".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request = serde_json::from_str(r#"{"cmd":"freeze_at","at":5,"hold_lead_ns":7}"#).unwrap();
        assert_eq!(r, Request::FreezeAt { at: 5, hold_lead_ns: 7 });
        assert_eq!(serde_json::to_string(&Request::Stats).unwrap(), r#"{"cmd":"stats"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(
            matches!(parse_response::<()>(r#"{"error":"not frozen"}"#), Err(ControlError::Refused(m)) if m == "not frozen")
        );
        parse_response::<()>(r#"{"ok":null}"#).unwrap();
    }
}
