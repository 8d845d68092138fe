//! A client of the QEMU guest agent protocol over the VM's virtio-serial
//! port (QEMU's `-chardev socket` for `org.qemu.guest_agent.0`): the real
//! `qemu-ga` in OS images, `stasis-ga` (guest/tools) in the busybox guest,
//! which answers the same subset: `guest-sync-delimited`, `guest-ping`,
//! `guest-exec`, `guest-exec-status`, `guest-file-open/read/write/close`.
//!
//! ```text
//! host                                   guest agent
//!  | 0xFF {"execute":"guest-sync-delimited","arguments":{"id":N}}\n
//!  |  --------------------------------------->  (0xFF resets its parser)
//!  |  <---------------------------------------  0xFF {"return": N}\n
//!  | {"execute":"guest-exec", ...}\n  ----->
//!  |  <-----  {"return": {"pid": P}}\n       (or {"error": {"class","desc"}})
//! ```
//!
//! Every call connects, synchronises (stale replies of an earlier
//! connection or a timed-out call are skipped up to the 0xFF and the fresh
//! id), sends its command and disconnects, so clients of one node take
//! turns instead of waiting for each other. A checkpoint freezes the guest
//! (calls time out meanwhile) and a restore starts a new QEMU on the same
//! socket path; a long [`AgentClient::run`] carries on across both, polling
//! the same guest process.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The virtio-serial port name qemu-ga opens.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Longest reply line accepted (qemu-ga caps captured output at 16 MiB,
/// which base64 makes 21.3 MiB).
pub const MAX_REPLY: usize = 24 << 20;
/// Bytes per `guest-file-read`/`-write` (qemu-ga accepts up to 48 MiB; small
/// chunks keep each reply short).
pub const FILE_CHUNK: usize = 1 << 20;

/// Errors of the guest agent client; every one names the node.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node {node}: cannot connect to its guest agent socket {}", path.display())]
    Connect {
        node: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: no answer from a guest agent within {after:?} (is qemu-guest-agent, or stasis-ga, running in the guest?)")]
    Timeout { node: String, after: Duration },
    #[error("node {node}: guest agent: {command} failed: {desc}")]
    Guest { node: String, command: String, desc: String },
    #[error("node {node}: guest agent sent a reply that is not the protocol's ({detail})")]
    Protocol { node: String, detail: String },
    #[error("node {node}: {what}")]
    Local {
        node: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `guest-exec-status` says of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatus {
    pub exited: bool,
    #[serde(default)]
    pub exitcode: Option<i64>,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(default, rename = "out-data")]
    pub out_data: Option<String>,
    #[serde(default, rename = "err-data")]
    pub err_data: Option<String>,
    #[serde(default, rename = "out-truncated")]
    pub out_truncated: bool,
    #[serde(default, rename = "err-truncated")]
    pub err_truncated: bool,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    pub pid: i64,
    /// The exit status; `None` when a signal ended it.
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    #[serde(skip)]
    pub stdout: Vec<u8>,
    #[serde(skip)]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Times the client had to reconnect while the command ran (a
    /// checkpoint's freeze or a restore in between).
    pub reconnects: u32,
}

/// A guest agent of one node.
#[derive(Debug)]
pub struct AgentClient {
    node: String,
    path: PathBuf,
    conn: Option<BufReader<UnixStream>>,
    next_id: u64,
    /// How long one call (sync + command) may wait for the guest.
    pub call_timeout: Duration,
    reconnects: u32,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl AgentClient {
    /// A client for `node`'s agent socket; connects on first use.
    pub fn new(node: &str, path: &Path) -> AgentClient {
        AgentClient {
            node: node.to_owned(),
            path: path.to_owned(),
            conn: None,
            // Sync ids differ between clients and runs, so a reply meant for
            // an earlier client on the same socket is never taken as ours.
            next_id: (std::process::id() as u64) << 32
                | (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
                    as u64),
            call_timeout: Duration::from_secs(10),
            reconnects: 0,
        }
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn timeout(&self) -> AgentError {
        AgentError::Timeout { node: self.node.clone(), after: self.call_timeout }
    }

    fn protocol(&self, detail: impl Into<String>) -> AgentError {
        AgentError::Protocol { node: self.node.clone(), detail: detail.into() }
    }

    fn connect(&mut self) -> Result<(), AgentError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let s = UnixStream::connect(&self.path).map_err(|source| AgentError::Connect {
            node: self.node.clone(),
            path: self.path.clone(),
            source,
        })?;
        self.conn = Some(BufReader::new(s));
        Ok(())
    }

    /// Reads one reply line before `deadline`; drops the connection on any error.
    fn read_line(&mut self, deadline: Instant, skip_to_delimiter: bool) -> Result<Vec<u8>, AgentError> {
        let result = (|| {
            let conn = self.conn.as_mut().expect("connected");
            let mut line = Vec::new();
            let mut synced = !skip_to_delimiter;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(None);
                }
                conn.get_ref().set_read_timeout(Some(left)).map_err(|e| Some(e.to_string()))?;
                let buf = match conn.fill_buf() {
                    Ok([]) => return Err(Some("the agent socket closed".to_owned())),
                    Ok(b) => b,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        return Err(None)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Some(e.to_string())),
                };
                let mut used = 0;
                for &b in buf {
                    used += 1;
                    if !synced {
                        synced = b == 0xff;
                        continue;
                    }
                    if b == b'\n' {
                        conn.consume(used);
                        return Ok(line);
                    }
                    if line.len() >= MAX_REPLY {
                        return Err(Some(format!("a reply longer than {MAX_REPLY} bytes")));
                    }
                    line.push(b);
                }
                conn.consume(used);
            }
        })();
        result.map_err(|e| {
            self.conn = None;
            match e {
                None => self.timeout(),
                Some(detail) => self.protocol(detail),
            }
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        let conn = self.conn.as_mut().expect("connected");
        let r = conn.get_mut().write_all(bytes);
        r.map_err(|e| {
            self.conn = None;
            self.protocol(format!("cannot write to the agent socket: {e}"))
        })
    }

    /// `guest-sync-delimited` with a fresh id: skips everything stale.
    fn sync(&mut self, deadline: Instant) -> Result<(), AgentError> {
        self.connect()?;
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let mut msg = vec![0xff];
        msg.extend(json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}).to_string().into_bytes());
        msg.push(b'\n');
        self.send(&msg)?;
        loop {
            let line = self.read_line(deadline, true)?;
            let v: Value = serde_json::from_slice(&line).map_err(|e| self.protocol(format!("sync reply: {e}")))?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
            // A reply to an earlier sync: wait for ours.
        }
    }

    /// One command: its `return` value. Each call has a connection of its
    /// own: QEMU's chardev serves one client at a time, so a connection kept
    /// between the polls of a long command would lock every other client
    /// (another `stasis exec`, a `stasis cp`) out of the node.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, AgentError> {
        let r = self.call_connected(command, arguments);
        self.conn = None;
        r
    }

    fn call_connected(&mut self, command: &str, arguments: Value) -> Result<Value, AgentError> {
        let deadline = Instant::now() + self.call_timeout;
        self.sync(deadline)?;
        let mut msg = if arguments.is_null() {
            json!({"execute": command})
        } else {
            json!({"execute": command, "arguments": arguments})
        }
        .to_string()
        .into_bytes();
        msg.push(b'\n');
        self.send(&msg)?;
        let line = self.read_line(deadline, false)?;
        let v: Value = serde_json::from_slice(&line).map_err(|e| self.protocol(format!("{command} reply: {e}")))?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("(no description)").to_owned();
            return Err(AgentError::Guest { node: self.node.clone(), command: command.to_owned(), desc });
        }
        Err(self.protocol(format!("{command} reply has neither return nor error")))
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<(), AgentError> {
        self.call("guest-ping", Value::Null).map(|_| ())
    }

    /// Starts `argv` in the guest (output captured); its pid.
    pub fn exec_start(&mut self, argv: &[String], input: Option<&[u8]>) -> Result<i64, AgentError> {
        let (path, args) = argv.split_first().ok_or_else(|| self.protocol("an empty command"))?;
        let mut a = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(i) = input {
            a["input-data"] = json!(b64(i));
        }
        let r = self.call("guest-exec", a)?;
        r.get("pid").and_then(Value::as_i64).ok_or_else(|| self.protocol("guest-exec returned no pid"))
    }

    /// `guest-exec-status` of `pid`.
    pub fn exec_status(&mut self, pid: i64) -> Result<ExecStatus, AgentError> {
        let r = self.call("guest-exec-status", json!({"pid": pid}))?;
        serde_json::from_value(r).map_err(|e| self.protocol(format!("guest-exec-status: {e}")))
    }

    /// Runs `argv` to completion (or `timeout`): polls its status every
    /// `poll`, reconnecting as often as needed — the guest may be frozen by
    /// a checkpoint or restored into a new QEMU meanwhile.
    pub fn run(
        &mut self,
        argv: &[String],
        input: Option<&[u8]>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let started = Instant::now();
        let pid = self.exec_start(argv, input)?;
        let reconnects_before = self.reconnects;
        loop {
            match self.exec_status(pid) {
                Ok(st) if st.exited => {
                    let decode = |d: &Option<String>| -> Result<Vec<u8>, AgentError> {
                        d.as_deref()
                            .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
                            .transpose()
                            .map(Option::unwrap_or_default)
                            .map_err(|e| self.protocol(format!("guest-exec-status output: {e}")))
                    };
                    return Ok(ExecOutput {
                        pid,
                        exit_code: st.signal.is_none().then_some(st.exitcode.unwrap_or(0)),
                        signal: st.signal,
                        stdout: decode(&st.out_data)?,
                        stderr: decode(&st.err_data)?,
                        stdout_truncated: st.out_truncated,
                        stderr_truncated: st.err_truncated,
                        reconnects: self.reconnects - reconnects_before,
                    });
                }
                Ok(_) => {}
                // Frozen, or between a QEMU and its restored successor.
                Err(AgentError::Timeout { .. } | AgentError::Connect { .. } | AgentError::Protocol { .. })
                    if started.elapsed() < timeout =>
                {
                    self.reconnects += 1;
                }
                Err(e) => return Err(e),
            }
            if started.elapsed() >= timeout {
                return Err(AgentError::Timeout { node: self.node.clone(), after: timeout });
            }
            std::thread::sleep(poll);
        }
    }

    fn file_open(&mut self, path: &str, mode: &str) -> Result<i64, AgentError> {
        let r = self.call("guest-file-open", json!({"path": path, "mode": mode}))?;
        r.as_i64().ok_or_else(|| self.protocol("guest-file-open returned no handle"))
    }

    fn file_close(&mut self, handle: i64) -> Result<(), AgentError> {
        self.call("guest-file-close", json!({"handle": handle})).map(|_| ())
    }

    /// Copies the guest's file `guest` into `out`; its size.
    pub fn read_file(&mut self, guest: &str, out: &mut dyn Write) -> Result<u64, AgentError> {
        let h = self.file_open(guest, "r")?;
        let mut total = 0u64;
        let result = (|| loop {
            let r = self.call("guest-file-read", json!({"handle": h, "count": FILE_CHUNK}))?;
            let buf = r.get("buf-b64").and_then(Value::as_str).unwrap_or("");
            let data = base64::engine::general_purpose::STANDARD
                .decode(buf)
                .map_err(|e| self.protocol(format!("guest-file-read: {e}")))?;
            if data.len() > FILE_CHUNK {
                return Err(self.protocol(format!("guest-file-read returned {} bytes for {FILE_CHUNK}", data.len())));
            }
            out.write_all(&data).map_err(|source| AgentError::Local {
                node: self.node.clone(),
                what: format!("cannot write what {guest} holds"),
                source,
            })?;
            total += data.len() as u64;
            if r.get("eof").and_then(Value::as_bool).unwrap_or(data.is_empty()) || data.is_empty() {
                return Ok(total);
            }
        })();
        let closed = self.file_close(h);
        let total = result?;
        closed?;
        Ok(total)
    }

    /// Writes everything `input` holds into the guest's file `guest`
    /// (created or truncated); its size.
    pub fn write_file(&mut self, guest: &str, input: &mut dyn Read) -> Result<u64, AgentError> {
        let h = self.file_open(guest, "w")?;
        let mut total = 0u64;
        let mut buf = vec![0u8; FILE_CHUNK];
        let result = (|| loop {
            let n = input.read(&mut buf).map_err(|source| AgentError::Local {
                node: self.node.clone(),
                what: format!("cannot read what to write to {guest}"),
                source,
            })?;
            if n == 0 {
                return Ok(total);
            }
            let r = self.call("guest-file-write", json!({"handle": h, "buf-b64": b64(&buf[..n])}))?;
            let wrote = r.get("count").and_then(Value::as_u64).unwrap_or(0);
            if wrote != n as u64 {
                return Err(AgentError::Guest {
                    node: self.node.clone(),
                    command: "guest-file-write".into(),
                    desc: format!("wrote {wrote} of {n} bytes to {guest}"),
                });
            }
            total += wrote;
        })();
        let closed = self.file_close(h);
        let total = result?;
        closed?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests;
