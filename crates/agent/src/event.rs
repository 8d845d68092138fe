//! Machine-readable events of the checkpoint life cycle, with monotonic
//! timestamps, written as JSON lines so the eval measures skew and downtime
//! from events rather than from logs.

use serde::Serialize;
use stasis_core::clock::MonoNs;
use std::io::Write;
use std::path::Path;

/// One step of an experiment's life.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    VmLaunched { node: String, pid: u32, incarnation: u32 },
    DelayNodeStarted { pid: u32 },
    Planned { checkpoint: String, freeze_at: MonoNs },
    Stopped { component: String, sent: MonoNs, replied: MonoNs },
    Saving { component: String },
    Saved { component: String, bytes: u64, save_ns: u64 },
    Committed { checkpoint: String, name: String },
    Resumed { component: String, at: MonoNs, planned: MonoNs },
    Aborted { checkpoint: String, reason: String },
    Restoring { checkpoint: String },
    Restored { checkpoint: String, resumed_at: MonoNs },
    Ready { node: String },
}

/// An event with its monotonic timestamp.
#[derive(Debug, Clone, Serialize)]
pub struct Stamped<'a> {
    pub mono_ns: MonoNs,
    #[serde(flatten)]
    pub event: &'a Event,
}

/// Receives every event as it happens (the CLI draws progress from them).
pub trait Observer: Send + Sync {
    fn event(&self, event: &Event);
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &Event) {}
}

/// Appends events to a JSON-lines file, then hands them on.
pub struct EventLog<'a> {
    file: std::sync::Mutex<Option<std::fs::File>>,
    next: &'a dyn Observer,
}

impl<'a> EventLog<'a> {
    pub fn open(path: &Path, next: &'a dyn Observer) -> EventLog<'a> {
        let file = stasis_core::private::open_append(path).ok();
        EventLog { file: std::sync::Mutex::new(file), next }
    }
}

impl Observer for EventLog<'_> {
    fn event(&self, event: &Event) {
        let line = serde_json::to_string(&Stamped { mono_ns: stasis_core::clock::mono_ns(), event })
            .expect("events serialise");
        if let Some(f) = self.file.lock().expect("event log poisoned").as_mut() {
            // Best effort: a full disk must not turn into a failed checkpoint here.
            let _ = writeln!(f, "{line}");
        }
        self.next.event(event);
    }
}
