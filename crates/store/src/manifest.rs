//! The checkpoint manifest: what a checkpoint contains (component state
//! files with sizes and BLAKE3 digests), which experiment it belongs to, how
//! the freeze went, and a checksum over all of it. Documented in
//! `docs/checkpoint-format.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `format` field of every manifest.
pub const FORMAT: &str = "stasis-checkpoint";
/// The manifest version this code writes; it reads the same major and any
/// minor up to this one.
///
/// 1.1 added `components[].chunks`: the file is kept as chunks in the
/// store's chunk directory instead of a whole file. 1.0 manifests (whole
/// files) still read.
pub const VERSION: ManifestVersion = ManifestVersion { major: 1, minor: 2 };
/// The version written when no further file is chunked (1.1 readers read
/// those); 1.2 added `files[].chunks`, written by remote stores.
pub const VERSION_UNCHUNKED_FILES: ManifestVersion = ManifestVersion { major: 1, minor: 1 };
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest format (not of the crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVersion {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for ManifestVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The experiment a checkpoint belongs to, so a restore can refuse a
/// checkpoint of another experiment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentRef {
    pub name: String,
    /// [`stasis_core::spec::Experiment::digest`].
    pub digest: String,
    /// The canonical spec ([`stasis_core::spec::Experiment::to_toml`]), so a
    /// checkpoint can be restored without the original file.
    pub spec_toml: String,
}

impl ExperimentRef {
    /// The reference to `experiment`.
    pub fn of(experiment: &stasis_core::spec::Experiment) -> ExperimentRef {
        ExperimentRef { name: experiment.name.clone(), digest: experiment.digest(), spec_toml: experiment.to_toml() }
    }
}

/// What a component is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentKind {
    #[default]
    Vm,
    DelayNode,
}

/// One saved component (a VM or a delay node) as recorded in a manifest.
/// Times are CLOCK_MONOTONIC nanoseconds of the host that did the work
/// (`stop_ns`, `resume_ns`) or durations (`frozen_ns`, `save_ns`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub kind: ComponentKind,
    /// File name inside the checkpoint directory (no directories).
    pub file: String,
    pub bytes: u64,
    /// BLAKE3 of the file, lowercase hex.
    pub blake3: String,
    pub stop_ns: u64,
    pub resume_ns: u64,
    pub frozen_ns: u64,
    pub save_ns: u64,
    /// Since 1.1: the file's chunks in order (absent: a whole file in the
    /// checkpoint directory). `bytes` and `blake3` are of the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkRef>>,
}

/// One chunk of a chunked file: its id (BLAKE3 of the plain bytes, hex) and
/// plain length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: String,
    pub len: u64,
}

/// A component as the caller describes it before commit: the store fills in
/// `bytes` and `blake3`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentDraft {
    pub name: String,
    pub kind: ComponentKind,
    /// File name inside the pending directory, as given to `Pending::path`.
    pub file: String,
    pub stop_ns: u64,
    pub resume_ns: u64,
    pub frozen_ns: u64,
    pub save_ns: u64,
}

/// A further file of the checkpoint that belongs to no component's state
/// (a disk overlay, an event log …), verified like component files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
    /// Since 1.2: the file's chunks too (a remote store keeps every file
    /// as chunks in the bucket, and the whole file in its local cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkRef>>,
}

/// How the synchronised freeze went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeReport {
    /// The planned freeze instant T (synchronised-clock nanoseconds).
    pub planned_ns: u64,
    /// How far ahead of T the plan was sent.
    pub lead_ns: u64,
    /// Largest minus smallest actual stop instant across components.
    pub stop_skew_ns: u64,
    /// The frozen duration D every component was held for.
    pub frozen_duration_ns: u64,
    /// Frames in the network core at the freeze (saved with the delay node).
    pub frames_in_flight: u64,
    /// Frames held back at ports that stopped before their VM.
    pub frames_held: u64,
}

/// How long the checkpoint took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From the freeze instant to the durable manifest.
    pub total_save_ns: u64,
    /// Time the store spent fsyncing and hashing files (filled by commit).
    pub commit_ns: u64,
    /// Any further named phases the caller measured.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, u64>,
}

/// What the caller fills in to commit a checkpoint; the store adds the id,
/// index, name, creation time, file sizes, digests and the checksum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDraft {
    /// Id of the checkpoint the running experiment was restored from.
    pub parent: Option<String>,
    pub experiment: ExperimentRef,
    pub components: Vec<ComponentDraft>,
    /// Further files to record and verify (file names in the pending dir).
    pub files: Vec<String>,
    pub freeze: FreezeReport,
    pub timings: Timings,
}

/// A checkpoint's manifest, as written in `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: ManifestVersion,
    pub id: String,
    pub name: Option<String>,
    pub index: u64,
    pub created_unix_ms: u64,
    pub parent: Option<String>,
    pub experiment: ExperimentRef,
    pub components: Vec<Component>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    pub freeze: FreezeReport,
    pub timings: Timings,
    /// BLAKE3 (hex) of the canonical JSON of the manifest without this field.
    pub checksum: String,
}

impl Manifest {
    /// The component called `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Total bytes of all recorded files.
    pub fn total_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.bytes).sum::<u64>() + self.files.iter().map(|f| f.bytes).sum::<u64>()
    }

    /// Every recorded file as `(owner, file, bytes, blake3)`; the owner is
    /// the component name, or the file itself for further files.
    pub fn recorded_files(&self) -> impl Iterator<Item = (&str, &str, u64, &str)> {
        self.components
            .iter()
            .map(|c| (c.name.as_str(), c.file.as_str(), c.bytes, c.blake3.as_str()))
            .chain(self.files.iter().map(|f| (f.file.as_str(), f.file.as_str(), f.bytes, f.blake3.as_str())))
    }

    /// Computes and sets `checksum`.
    pub fn seal(&mut self) {
        self.checksum = String::new();
        let value = serde_json::to_value(&*self).expect("a manifest always serialises");
        self.checksum = checksum_of(&value);
    }
}

/// The checksum of a manifest given as JSON: BLAKE3 (hex) over the
/// canonical JSON of the object with its `checksum` member removed.
pub fn checksum_of(manifest: &Value) -> String {
    let mut value = manifest.clone();
    if let Value::Object(map) = &mut value {
        map.remove("checksum");
    }
    let mut text = String::new();
    canonical_json(&value, &mut text);
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// Compact JSON with object members sorted by key (bytewise), scalars and
/// strings as serde_json prints them. Independent of how the file was
/// formatted and of serde_json's map ordering feature.
pub fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key], out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A file name a manifest may record: one plain path component.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name != MANIFEST_FILE
        && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_ignores_layout() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "é\n"}}"#).unwrap();
        let b: Value = serde_json::from_str("{\"a\":{\"x\":\"é\\n\",\"y\":[1,2]},\"b\":1}").unwrap();
        let (mut ta, mut tb) = (String::new(), String::new());
        canonical_json(&a, &mut ta);
        canonical_json(&b, &mut tb);
        assert_eq!(ta, tb);
        assert_eq!(ta, "{\"a\":{\"x\":\"é\\n\",\"y\":[1,2]},\"b\":1}");
    }

    #[test]
    fn checksum_ignores_itself_but_nothing_else() {
        let v: Value = serde_json::from_str(r#"{"a": 1, "checksum": "x"}"#).unwrap();
        let w: Value = serde_json::from_str(r#"{"a": 1, "checksum": "y"}"#).unwrap();
        let z: Value = serde_json::from_str(r#"{"a": 2, "checksum": "x"}"#).unwrap();
        assert_eq!(checksum_of(&v), checksum_of(&w));
        assert_ne!(checksum_of(&v), checksum_of(&z));
    }

    #[test]
    fn kinds_are_spelled_as_documented() {
        assert_eq!(serde_json::to_string(&ComponentKind::DelayNode).unwrap(), "\"delay-node\"");
        assert_eq!(serde_json::to_string(&ComponentKind::Vm).unwrap(), "\"vm\"");
    }

    #[test]
    fn plain_names_only() {
        assert!(is_plain_file_name("vm-a.state"));
        for bad in ["", ".hidden", "a/b", "..", "manifest.json", "x\0"] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
    }
}
