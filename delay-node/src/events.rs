//! Machine-readable events (`--events`): one JSON object per line, each with
//! the `CLOCK_MONOTONIC` instant `mono_ns` at which it happened.

use serde_json::{json, Value};
use stasis_core::clock::{mono_ns, MonoNs};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Appends events to a file; a sink without a file does nothing.
#[derive(Debug, Default)]
pub struct EventLog {
    file: Option<File>,
}

impl EventLog {
    pub fn open(path: Option<&Path>) -> std::io::Result<EventLog> {
        let file = match path {
            Some(p) => Some(stasis_core::private::open_append(p)?),
            None => None,
        };
        Ok(EventLog { file })
    }

    /// Record `event` (a name such as `"freeze"`) at instant `at` with extra fields.
    pub fn emit(&mut self, at: MonoNs, event: &str, fields: Value) {
        let Some(f) = &mut self.file else { return };
        let mut obj = json!({ "mono_ns": at, "event": event });
        if let (Value::Object(o), Value::Object(extra)) = (&mut obj, fields) {
            o.extend(extra);
        }
        let mut line = obj.to_string();
        line.push('\n');
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot write event");
        }
    }

    /// Record `event` now.
    pub fn emit_now(&mut self, event: &str, fields: Value) {
        self.emit(mono_ns(), event, fields)
    }
}
