//! `stasis-ga`: the subset of the QEMU guest agent protocol the stasis host
//! uses, for the busybox guest (OS images run the real `qemu-ga`):
//! `guest-sync-delimited`, `guest-sync`, `guest-ping`, `guest-info`,
//! `guest-exec` (path, arg, env, input-data, capture-output),
//! `guest-exec-status`, `guest-file-open/read/write/close`. Replies are the
//! real agent's: one JSON object and a newline per command,
//! `{"return": …}` or `{"error": {"class": "GenericError", "desc": …}}`;
//! the reply to `guest-sync-delimited` is preceded by a 0xFF byte, and a
//! 0xFF byte from the host discards a partial command (how clients resync).
//!
//! [`Agent::handle`] is the I/O-free part (one command line in, one reply
//! out); [`Agent::serve`] reads a port. Captured output is capped at
//! [`MAX_OUTPUT`] per stream like qemu-ga's; a command line at [`MAX_LINE`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use base64::Engine as _;
use serde_json::{json, Value};

/// Captured bytes kept per stream of a `guest-exec` (qemu-ga's limit).
pub const MAX_OUTPUT: usize = 16 << 20;
/// Longest command line accepted (a 48 MiB file write is base64 of 64 MiB in
/// qemu-ga; stasis writes 1 MiB chunks).
pub const MAX_LINE: usize = 8 << 20;
/// Largest `count` of one `guest-file-read`.
pub const MAX_READ: u64 = 4 << 20;
/// At most this many processes and open files at once.
pub const MAX_HANDLES: usize = 1024;

/// Captured output of one stream: the bytes (at most [`MAX_OUTPUT`]) and
/// whether more were dropped.
type Captured = JoinHandle<(Vec<u8>, bool)>;

struct Exec {
    child: Child,
    out: Option<Captured>,
    err: Option<Captured>,
}

/// The agent's state: running processes and open files.
#[derive(Default)]
pub struct Agent {
    execs: HashMap<i64, Exec>,
    files: HashMap<i64, std::fs::File>,
    next_handle: i64,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn capture(mut r: impl Read + Send + 'static) -> Captured {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT - kept.len();
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    truncated |= n > room;
                }
            }
        }
        (kept, truncated)
    })
}

type Reply = Result<Value, String>;

/// What `guest-info` lists.
const SUPPORTED: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-close",
];

impl Agent {
    pub fn new() -> Agent {
        Agent { next_handle: 1, ..Agent::default() }
    }

    /// One command line (without its newline) → the reply bytes to send
    /// (with their newline), or nothing for an empty line.
    pub fn handle(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let (delimited, reply) = match serde_json::from_slice::<Value>(line) {
            Ok(cmd) => {
                let name = cmd.get("execute").and_then(Value::as_str).unwrap_or("").to_owned();
                let args = cmd.get("arguments").cloned().unwrap_or(Value::Null);
                (name == "guest-sync-delimited", self.command(&name, &args))
            }
            Err(e) => (false, Err(format!("invalid JSON: {e}"))),
        };
        let v = match reply {
            Ok(r) => json!({ "return": r }),
            Err(desc) => json!({ "error": { "class": "GenericError", "desc": desc } }),
        };
        let mut out = if delimited { vec![0xff] } else { Vec::new() };
        out.extend(v.to_string().into_bytes());
        out.push(b'\n');
        Some(out)
    }

    fn command(&mut self, name: &str, a: &Value) -> Reply {
        let int =
            |key: &str| a.get(key).and_then(Value::as_i64).ok_or_else(|| format!("{name}: argument {key} missing"));
        let text =
            |key: &str| a.get(key).and_then(Value::as_str).ok_or_else(|| format!("{name}: argument {key} missing"));
        match name {
            "guest-sync" | "guest-sync-delimited" => {
                a.get("id").cloned().ok_or_else(|| format!("{name}: argument id missing"))
            }
            "guest-ping" => Ok(json!({})),
            "guest-info" => {
                let commands: Vec<Value> = SUPPORTED.iter().map(|c| json!({"name": c, "enabled": true})).collect();
                Ok(json!({
                    "version": concat!("stasis-ga ", env!("CARGO_PKG_VERSION")),
                    "supported_commands": commands,
                }))
            }
            "guest-exec" => self.exec(a),
            "guest-exec-status" => self.exec_status(int("pid")?),
            "guest-file-open" => {
                if self.files.len() >= MAX_HANDLES {
                    return Err(format!("too many open files (at most {MAX_HANDLES})"));
                }
                let path = text("path")?;
                let mode = a.get("mode").and_then(Value::as_str).unwrap_or("r");
                let mut o = std::fs::OpenOptions::new();
                match mode.trim_end_matches('b') {
                    "r" => o.read(true),
                    "r+" => o.read(true).write(true),
                    "w" => o.write(true).create(true).truncate(true),
                    "w+" => o.read(true).write(true).create(true).truncate(true),
                    "a" => o.append(true).create(true),
                    "a+" => o.read(true).append(true).create(true),
                    _ => return Err(format!("invalid file open mode '{mode}'")),
                };
                let f = o.open(path).map_err(|e| format!("failed to open file '{path}' (mode: '{mode}'): {e}"))?;
                let h = self.next_handle;
                self.next_handle += 1;
                self.files.insert(h, f);
                Ok(json!(h))
            }
            "guest-file-read" => {
                let h = int("handle")?;
                let count = a.get("count").and_then(Value::as_u64).unwrap_or(4096);
                if count > MAX_READ {
                    return Err(format!("count {count} is larger than {MAX_READ}"));
                }
                let f = self.files.get_mut(&h).ok_or_else(|| format!("handle '{h}' has not been found"))?;
                let mut buf = Vec::with_capacity(count as usize);
                f.take(count).read_to_end(&mut buf).map_err(|e| format!("failed to read file: {e}"))?;
                Ok(json!({ "count": buf.len(), "buf-b64": b64(&buf), "eof": (buf.len() as u64) < count }))
            }
            "guest-file-write" => {
                let h = int("handle")?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(text("buf-b64")?)
                    .map_err(|e| format!("guest-file-write: buf-b64: {e}"))?;
                let f = self.files.get_mut(&h).ok_or_else(|| format!("handle '{h}' has not been found"))?;
                f.write_all(&data).map_err(|e| format!("failed to write to file: {e}"))?;
                Ok(json!({ "count": data.len(), "eof": false }))
            }
            "guest-file-close" => {
                let h = int("handle")?;
                let f = self.files.remove(&h).ok_or_else(|| format!("handle '{h}' has not been found"))?;
                f.sync_all().map_err(|e| format!("failed to close file: {e}"))?;
                Ok(json!({}))
            }
            "" => Err("the command has no \"execute\"".into()),
            other => Err(format!("The command {other} has not been found")),
        }
    }

    fn exec(&mut self, a: &Value) -> Reply {
        if self.execs.len() >= MAX_HANDLES {
            return Err(format!("too many processes (at most {MAX_HANDLES})"));
        }
        let path = a.get("path").and_then(Value::as_str).ok_or("guest-exec: argument path missing")?;
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match a.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|s| s.as_str().map(str::to_owned).ok_or_else(|| format!("guest-exec: {key} must be strings")))
                    .collect(),
                Some(_) => Err(format!("guest-exec: {key} must be a list")),
            }
        };
        let input = match a.get("input-data").and_then(Value::as_str) {
            Some(s) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("guest-exec: input-data: {e}"))?,
            ),
            None => None,
        };
        let capture_output = a.get("capture-output").and_then(Value::as_bool).unwrap_or(false);
        let mut cmd = Command::new(path);
        cmd.args(strings("arg")?);
        for kv in strings("env")? {
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            cmd.env(k, v);
        }
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        let out = if capture_output { Stdio::piped() } else { Stdio::null() };
        let err = if capture_output { Stdio::piped() } else { Stdio::null() };
        cmd.stdout(out).stderr(err);
        let mut child =
            cmd.spawn().map_err(|e| format!("Failed to execute child process \u{201c}{path}\u{201d} ({e})"))?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let pid = i64::from(child.id());
        let out = child.stdout.take().map(capture);
        let err = child.stderr.take().map(capture);
        self.execs.insert(pid, Exec { child, out, err });
        Ok(json!({ "pid": pid }))
    }

    fn exec_status(&mut self, pid: i64) -> Reply {
        let e = self.execs.get_mut(&pid).ok_or_else(|| "Invalid parameter 'pid'".to_owned())?;
        let Some(status) = e.child.try_wait().map_err(|err| format!("waiting for {pid}: {err}"))? else {
            return Ok(json!({ "exited": false }));
        };
        let mut e = self.execs.remove(&pid).expect("present");
        let mut r = json!({ "exited": true });
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => r["exitcode"] = json!(c),
            (None, Some(s)) => r["signal"] = json!(s),
            (None, None) => {}
        }
        for (key, handle) in [("out", e.out.take()), ("err", e.err.take())] {
            if let Some(h) = handle {
                let (data, truncated) = h.join().unwrap_or_default();
                if !data.is_empty() {
                    r[format!("{key}-data")] = json!(b64(&data));
                }
                if truncated {
                    r[format!("{key}-truncated")] = json!(true);
                }
            }
        }
        Ok(r)
    }

    /// Serves commands from `port` until it fails: lines split at `\n`, a
    /// 0xFF byte discards what came before it, a line longer than
    /// [`MAX_LINE`] is dropped whole. A read of 0 bytes (no host connected
    /// to a virtio-serial port) waits and reads again.
    pub fn serve<P: Read + Write>(&mut self, port: &mut P, idle: impl Fn()) -> io::Result<()> {
        let mut line = Vec::new();
        let mut too_long = false;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match port.read(&mut buf) {
                Ok(0) => {
                    idle();
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for &b in &buf[..n] {
                match b {
                    0xff => {
                        line.clear();
                        too_long = false;
                    }
                    b'\n' => {
                        if !too_long {
                            if let Some(reply) = self.handle(&line) {
                                port.write_all(&reply)?;
                                port.flush()?;
                            }
                        }
                        line.clear();
                        too_long = false;
                    }
                    _ if line.len() >= MAX_LINE => too_long = true,
                    _ => line.push(b),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(a: &mut Agent, cmd: Value) -> Value {
        let out = a.handle(cmd.to_string().as_bytes()).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let body = out.strip_prefix(&[0xff]).unwrap_or(&out);
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn sync_delimited_replies_after_a_0xff_byte() {
        let mut a = Agent::new();
        let out = a.handle(br#"{"execute":"guest-sync-delimited","arguments":{"id":42}}"#).unwrap();
        assert_eq!(out[0], 0xff);
        assert_eq!(&out[1..], b"{\"return\":42}\n");
        assert_eq!(reply(&mut a, json!({"execute": "guest-sync", "arguments": {"id": 7}})), json!({"return": 7}));
        assert_eq!(reply(&mut a, json!({"execute": "guest-ping"})), json!({"return": {}}));
        assert!(a.handle(b"   ").is_none());
    }

    #[test]
    fn unknown_commands_and_bad_json_are_errors_not_silence() {
        let mut a = Agent::new();
        let r = reply(&mut a, json!({"execute": "guest-shutdown"}));
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(r["error"]["desc"].as_str().unwrap().contains("guest-shutdown"));
        let out = a.handle(b"{not json").unwrap();
        let r: Value = serde_json::from_slice(&out).unwrap();
        assert!(r["error"]["desc"].as_str().unwrap().contains("invalid JSON"));
    }

    #[test]
    fn exec_captures_exit_status_and_both_streams() {
        let mut a = Agent::new();
        let r = reply(
            &mut a,
            json!({"execute": "guest-exec", "arguments": {"path": "sh", "arg": ["-c", "cat; echo err >&2; exit 3"],
                   "input-data": b64(b"hello"), "capture-output": true}}),
        );
        let pid = r["return"]["pid"].as_i64().unwrap();
        let st = loop {
            let st = reply(&mut a, json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if st["return"]["exited"] == true {
                break st["return"].clone();
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(st["exitcode"], 3);
        assert_eq!(st["out-data"], b64(b"hello"));
        assert_eq!(st["err-data"], b64(b"err\n"));
        // Reaped: asking again is an error, as in qemu-ga.
        let again = reply(&mut a, json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
        assert!(again.get("error").is_some());
        let r = reply(&mut a, json!({"execute": "guest-exec", "arguments": {"path": "/no/such/program"}}));
        assert!(r["error"]["desc"].as_str().unwrap().contains("/no/such/program"), "{r}");
    }

    #[test]
    fn files_are_written_read_back_and_refused_with_their_path() {
        let d = std::env::temp_dir().join(format!("stasis-ga-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        let path = p.to_str().unwrap();
        let mut a = Agent::new();
        let h = reply(&mut a, json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}))
            ["return"]
            .clone();
        let w = reply(
            &mut a,
            json!({"execute": "guest-file-write", "arguments": {"handle": h, "buf-b64": b64(b"0123456789")}}),
        );
        assert_eq!(w["return"]["count"], 10);
        reply(&mut a, json!({"execute": "guest-file-close", "arguments": {"handle": h}}));
        let h = reply(&mut a, json!({"execute": "guest-file-open", "arguments": {"path": path}}))["return"].clone();
        let r1 = reply(&mut a, json!({"execute": "guest-file-read", "arguments": {"handle": h, "count": 6}}));
        assert_eq!(
            (r1["return"]["buf-b64"].clone(), r1["return"]["eof"].clone()),
            (json!(b64(b"012345")), json!(false))
        );
        let r2 = reply(&mut a, json!({"execute": "guest-file-read", "arguments": {"handle": h, "count": 6}}));
        assert_eq!((r2["return"]["buf-b64"].clone(), r2["return"]["eof"].clone()), (json!(b64(b"6789")), json!(true)));
        let big =
            reply(&mut a, json!({"execute": "guest-file-read", "arguments": {"handle": h, "count": MAX_READ + 1}}));
        assert!(big.get("error").is_some(), "a guest-controlled size is capped");
        let bad =
            reply(&mut a, json!({"execute": "guest-file-open", "arguments": {"path": "/proc/nope/x", "mode": "w"}}));
        assert!(bad["error"]["desc"].as_str().unwrap().contains("/proc/nope/x"), "{bad}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn serve_resyncs_on_0xff_and_drops_overlong_lines() {
        struct Port {
            input: io::Cursor<Vec<u8>>,
            output: Vec<u8>,
        }
        impl Read for Port {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                match self.input.read(b)? {
                    0 => Err(io::Error::new(io::ErrorKind::BrokenPipe, "end of test input")),
                    n => Ok(n),
                }
            }
        }
        impl Write for Port {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.output.write(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut input = b"{\"execute\":\"guest-pi".to_vec();
        input.push(0xff);
        input.extend(b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}\n");
        input.extend(vec![b'x'; MAX_LINE + 10]);
        input.extend(b"\n{\"execute\":\"guest-ping\"}\n");
        let mut port = Port { input: io::Cursor::new(input), output: Vec::new() };
        let _ = Agent::new().serve(&mut port, || {});
        let mut want = vec![0xff];
        want.extend(b"{\"return\":5}\n{\"return\":{}}\n");
        assert_eq!(port.output, want);
    }
}
