//! One JSON object per output line, built without a serialisation framework
//! and written to stdout with a single `write(2)`.

use std::fmt::Write as _;

/// Builder of one JSON object; `finish` yields the line including its `\n`.
#[derive(Debug, Clone)]
pub struct JsonLine {
    buf: String,
    empty: bool,
}

impl Default for JsonLine {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonLine {
    /// An empty object.
    pub fn new() -> Self {
        JsonLine { buf: String::from("{"), empty: true }
    }

    fn key(&mut self, k: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        push_str_literal(&mut self.buf, k);
        self.buf.push(':');
    }

    /// Adds a string field (escaped).
    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        push_str_literal(&mut self.buf, v);
        self
    }

    /// Adds an unsigned integer field.
    pub fn u64(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// Adds a signed integer field.
    pub fn i64(mut self, k: &str, v: i64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// Adds an unsigned integer field, or `null`.
    pub fn opt_u64(mut self, k: &str, v: Option<u64>) -> Self {
        self.key(k);
        match v {
            Some(v) => {
                let _ = write!(self.buf, "{v}");
            }
            None => self.buf.push_str("null"),
        }
        self
    }

    /// Adds a signed integer field, or `null`.
    pub fn opt_i64(mut self, k: &str, v: Option<i64>) -> Self {
        self.key(k);
        match v {
            Some(v) => {
                let _ = write!(self.buf, "{v}");
            }
            None => self.buf.push_str("null"),
        }
        self
    }

    /// Adds a boolean field.
    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    /// Adds a field whose value is already a JSON object (e.g. the one line
    /// of `/proc/stasis_fw`); anything not shaped like one object (`{…}`
    /// without a line break) is written as `null`, so the line stays one
    /// JSON object.
    pub fn raw_object(mut self, k: &str, v: Option<&str>) -> Self {
        self.key(k);
        match v.map(str::trim) {
            Some(v) if v.starts_with('{') && v.ends_with('}') && !v.contains('\n') => self.buf.push_str(v),
            _ => self.buf.push_str("null"),
        }
        self
    }

    /// Adds a nested object.
    pub fn object(mut self, k: &str, v: JsonLine) -> Self {
        self.key(k);
        self.buf.push_str(&v.buf);
        self.buf.push('}');
        self
    }

    /// The finished object followed by a newline.
    pub fn finish(mut self) -> String {
        self.buf.push_str("}\n");
        self.buf
    }

    /// Writes the finished line to stdout with one `write(2)`.
    pub fn emit(self) {
        emit_line(&self.finish());
    }
}

fn push_str_literal(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => buf.push(c),
        }
    }
    buf.push('"');
}

/// Writes `line` to stdout in as few `write(2)` calls as the kernel allows
/// (one, for anything shorter than a pipe or tty buffer), bypassing Rust's
/// line buffering so that lines from concurrent tools never interleave.
pub fn emit_line(line: &str) {
    let mut bytes = line.as_bytes();
    while !bytes.is_empty() {
        // SAFETY: fd 1 is owned by the process for its lifetime; the pointer
        // and length describe the live `bytes` slice.
        let n = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return; // stdout gone: nothing sensible left to report to
        }
        bytes = &bytes[n as usize..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_valid_json_with_escapes_and_nesting() {
        let line = JsonLine::new()
            .str("node", "a\"b\\c\nd\u{1}")
            .u64("n", 7)
            .i64("neg", -3)
            .opt_u64("none", None)
            .bool("done", true)
            .object("inner", JsonLine::new().u64("x", 1).opt_i64("y", Some(-2)))
            .finish();
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1, "exactly one newline: {line:?}");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["node"], "a\"b\\c\nd\u{1}");
        assert_eq!(v["n"], 7);
        assert_eq!(v["neg"], -3);
        assert!(v["none"].is_null());
        assert_eq!(v["done"], true);
        assert_eq!(v["inner"]["x"], 1);
        assert_eq!(v["inner"]["y"], -2);
    }

    #[test]
    fn empty_object() {
        assert_eq!(JsonLine::new().finish(), "{}\n");
        assert_eq!(JsonLine::new().object("o", JsonLine::new()).finish(), "{\"o\":{}}\n");
    }

    #[test]
    fn raw_object_embeds_one_object_or_null() {
        let line = JsonLine::new()
            .raw_object("kmod", Some("{\"version\":1,\"m\":{\"a\":2}}\n"))
            .raw_object("missing", None)
            .raw_object("garbage", Some("oops"))
            .raw_object("two_lines", Some("{\"a\":1}\n{\"b\":2}"))
            .finish();
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["kmod"]["m"]["a"], 2);
        assert!(v["missing"].is_null());
        assert!(v["garbage"].is_null());
        assert!(v["two_lines"].is_null());
    }
}
