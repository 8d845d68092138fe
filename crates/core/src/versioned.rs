//! Persisted JSON files with a format name and a version: the envelope's
//! rule ([`crate::envelope`]) for the small JSON records stasis keeps
//! beside its checkpoints (runtime, share, branches, lineage, disks, clock
//! anchor, swap record, report, the multi-host catalogue).
//!
//! A record is its payload's JSON object with two more keys:
//!
//! ```json
//! { "format_name": "stasis-runtime", "format_version": "1.0", ...payload... }
//! ```
//!
//! The keys contain `_`, which no node, branch or component name may hold
//! ([`crate::spec`] names match `[a-z][a-z0-9-]*`), so a payload keyed by
//! node names (`disks.json`) cannot collide with them; the version is a
//! string so such a payload stays a map of strings. Reading refuses another
//! format's file, an unknown major version and a newer minor version, each
//! with a message naming the file, what was found and what this build reads.
//! A file written before records were versioned (no `format_name`) is read
//! as version 1.0 of the expected format: the payloads are unchanged.
//!
//! [`write_atomic`] writes a record the way every state file is written:
//! a temporary file (mode 0600), fsync, rename, fsync of the directory.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The key holding the format name.
pub const FORMAT_KEY: &str = "format_name";
/// The key holding the format version (`"MAJOR.MINOR"`).
pub const VERSION_KEY: &str = "format_version";
/// Largest record read (they are a few KiB; a report of many VMs ~100 KiB).
pub const MAX_RECORD: u64 = 16 << 20;

/// A format version: readers accept their own major and any minor up to theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormatVersion {
    pub major: u16,
    pub minor: u16,
}

impl FormatVersion {
    pub const fn new(major: u16, minor: u16) -> FormatVersion {
        FormatVersion { major, minor }
    }

    /// `"1.0"` → 1.0; anything else is `None`.
    pub fn parse(text: &str) -> Option<FormatVersion> {
        let (a, b) = text.split_once('.')?;
        let ok = |s: &str| !s.is_empty() && s.len() <= 5 && s.bytes().all(|c| c.is_ascii_digit());
        if !ok(a) || !ok(b) {
            return None;
        }
        Some(FormatVersion { major: a.parse().ok()?, minor: b.parse().ok()? })
    }
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A payload that is persisted as a versioned record.
pub trait Persisted: Serialize + DeserializeOwned {
    /// The format's name, e.g. `"stasis-runtime"`.
    const FORMAT: &'static str;
    /// The version this build writes (and the newest it reads).
    const VERSION: FormatVersion;
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error)]
pub enum VersionedError {
    #[error("{}: cannot read", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {bytes} bytes, more than a record may hold ({MAX_RECORD})", path.display())]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("{}: not JSON ({source})", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: not a {expected} record (a JSON object expected)", path.display())]
    NotAnObject { path: PathBuf, expected: &'static str },
    #[error("{}: a {found:?} record, not {expected:?}", path.display())]
    WrongFormat { path: PathBuf, found: String, expected: &'static str },
    #[error("{}: {expected} version {found:?} is not MAJOR.MINOR", path.display())]
    BadVersion { path: PathBuf, found: String, expected: &'static str },
    #[error("{}: {format} version {found} cannot be read by this build, which reads {}.0 to {ours}{}", path.display(), ours.major, if found > ours { "; use a newer stasis" } else { "" })]
    Unsupported { path: PathBuf, format: &'static str, found: FormatVersion, ours: FormatVersion },
    #[error("{}: {format} record does not match its format ({source})", path.display())]
    Payload { path: PathBuf, format: &'static str, source: serde_json::Error },
}

/// The record of `value`: its JSON object with the format name and version.
/// Panics if the payload does not serialise to a JSON object (a programming
/// error: every [`Persisted`] type is a struct or a map).
pub fn to_value<T: Persisted>(value: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(value).expect("a persisted record serialises");
    let obj = v.as_object_mut().unwrap_or_else(|| panic!("{} payload is not a JSON object", T::FORMAT));
    debug_assert!(
        !obj.contains_key(FORMAT_KEY) && !obj.contains_key(VERSION_KEY),
        "payload of {} uses a reserved key",
        T::FORMAT
    );
    obj.insert(FORMAT_KEY.into(), T::FORMAT.into());
    obj.insert(VERSION_KEY.into(), T::VERSION.to_string().into());
    v
}

/// The record of `value`, pretty-printed.
pub fn to_vec<T: Persisted>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&to_value(value)).expect("JSON values serialise");
    out.push(b'\n');
    out
}

/// Check a record read from `path` and decode its payload.
pub fn from_slice<T: Persisted>(path: &Path, bytes: &[u8]) -> Result<T, VersionedError> {
    let p = || path.to_path_buf();
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| VersionedError::Json { path: p(), source })?;
    let obj = v.as_object_mut().ok_or_else(|| VersionedError::NotAnObject { path: p(), expected: T::FORMAT })?;
    match obj.remove(FORMAT_KEY) {
        // Written before records carried a version: version 1.0.
        None => {}
        Some(serde_json::Value::String(name)) if name == T::FORMAT => {
            let found =
                match obj.remove(VERSION_KEY) {
                    Some(serde_json::Value::String(s)) => FormatVersion::parse(&s)
                        .ok_or(VersionedError::BadVersion { path: p(), found: s, expected: T::FORMAT })?,
                    other => {
                        return Err(VersionedError::BadVersion {
                            path: p(),
                            found: other.map(|o| o.to_string()).unwrap_or_else(|| "none".into()),
                            expected: T::FORMAT,
                        })
                    }
                };
            if found.major != T::VERSION.major || found.minor > T::VERSION.minor {
                return Err(VersionedError::Unsupported { path: p(), format: T::FORMAT, found, ours: T::VERSION });
            }
        }
        Some(other) => {
            let found = other.as_str().map(str::to_owned).unwrap_or_else(|| other.to_string());
            return Err(VersionedError::WrongFormat { path: p(), found, expected: T::FORMAT });
        }
    }
    serde_json::from_value(v).map_err(|source| VersionedError::Payload { path: p(), format: T::FORMAT, source })
}

/// Read and check the record at `path`.
pub fn read<T: Persisted>(path: &Path) -> Result<T, VersionedError> {
    let io = |source| VersionedError::Io { path: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > MAX_RECORD {
        return Err(VersionedError::TooLarge { path: path.to_path_buf(), bytes: len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_RECORD + 1), &mut bytes).map_err(io)?;
    from_slice(path, &bytes)
}

/// [`read`], with a missing file as `Ok(None)`.
pub fn read_opt<T: Persisted>(path: &Path) -> Result<Option<T>, VersionedError> {
    match read(path) {
        Err(VersionedError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// Write the record of `value` to `path` durably: `<path>.tmp` (mode 0600),
/// fsync, rename over `path`, fsync of the directory.
pub fn write_atomic<T: Persisted>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&to_vec(value))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A record's payload, for places that want a value (`Versioned(&x)`
/// serialises as the record of `x`).
#[derive(Debug, Clone, Copy)]
pub struct Versioned<T>(pub T);

impl<T: Persisted> Serialize for Versioned<&T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        to_value(self.0).serialize(s)
    }
}

impl<'de, T: Persisted> Deserialize<'de> for Versioned<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let bytes = serde_json::to_vec(&v).map_err(serde::de::Error::custom)?;
        from_slice(Path::new("<record>"), &bytes).map(Versioned).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }
    impl Persisted for Rec {
        const FORMAT: &'static str = "stasis-test";
        const VERSION: FormatVersion = FormatVersion::new(1, 2);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(transparent)]
    struct Map(BTreeMap<String, String>);
    impl Persisted for Map {
        const FORMAT: &'static str = "stasis-map";
        const VERSION: FormatVersion = FormatVersion::new(1, 0);
    }

    fn p() -> &'static Path {
        Path::new("/x/rec.json")
    }

    #[test]
    fn a_record_round_trips_and_carries_its_format() {
        let r = Rec { a: 7, b: Some("x".into()) };
        let bytes = to_vec(&r);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v[FORMAT_KEY], "stasis-test");
        assert_eq!(v[VERSION_KEY], "1.2");
        assert_eq!(v["a"], 7);
        assert_eq!(from_slice::<Rec>(p(), &bytes).unwrap(), r);
    }

    #[test]
    fn a_map_payload_stays_a_map_of_strings() {
        let m = Map([("a".to_string(), "/d/a.qcow2".to_string())].into());
        let bytes = to_vec(&m);
        // Readers of the bare map (older tools) still parse it.
        let plain: BTreeMap<String, String> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(plain["a"], "/d/a.qcow2");
        assert_eq!(from_slice::<Map>(p(), &bytes).unwrap(), m);
    }

    #[test]
    fn older_minor_and_unversioned_files_are_read() {
        let old = br#"{"format_name":"stasis-test","format_version":"1.0","a":1}"#;
        assert_eq!(from_slice::<Rec>(p(), old).unwrap(), Rec { a: 1, b: None });
        assert_eq!(from_slice::<Rec>(p(), br#"{"a":2}"#).unwrap(), Rec { a: 2, b: None });
    }

    #[test]
    fn newer_wrong_and_broken_records_are_refused_with_the_place() {
        let newer = br#"{"format_name":"stasis-test","format_version":"1.3","a":1}"#;
        let e = from_slice::<Rec>(p(), newer).unwrap_err();
        assert!(matches!(e, VersionedError::Unsupported { found: FormatVersion { major: 1, minor: 3 }, .. }), "{e}");
        assert_eq!(e.to_string(), "/x/rec.json: stasis-test version 1.3 cannot be read by this build, which reads 1.0 to 1.2; use a newer stasis");
        let major = br#"{"format_name":"stasis-test","format_version":"2.0","a":1}"#;
        assert!(matches!(from_slice::<Rec>(p(), major), Err(VersionedError::Unsupported { .. })));
        let older_major = br#"{"format_name":"stasis-test","format_version":"0.9","a":1}"#;
        let e = from_slice::<Rec>(p(), older_major).unwrap_err();
        assert!(
            matches!(e, VersionedError::Unsupported { .. }) && !e.to_string().contains("newer"),
            "an unknown major is refused too: {e}"
        );
        let other = br#"{"format_name":"stasis-map","format_version":"1.0","a":1}"#;
        let e = from_slice::<Rec>(p(), other).unwrap_err();
        assert!(e.to_string().contains("\"stasis-map\" record, not \"stasis-test\""), "{e}");
        for bad in [
            &br#"{"format_name":"stasis-test","format_version":"1","a":1}"#[..],
            br#"{"format_name":"stasis-test","a":1}"#,
            br#"{"format_name":"stasis-test","format_version":1.0,"a":1}"#,
        ] {
            assert!(
                matches!(from_slice::<Rec>(p(), bad), Err(VersionedError::BadVersion { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(from_slice::<Rec>(p(), b"[1]"), Err(VersionedError::NotAnObject { .. })));
        assert!(matches!(from_slice::<Rec>(p(), b"{"), Err(VersionedError::Json { .. })));
        assert!(matches!(from_slice::<Rec>(p(), br#"{"a":"x"}"#), Err(VersionedError::Payload { .. })));
        assert!(matches!(
            from_slice::<Rec>(p(), br#"{"format_name":7,"a":1}"#),
            Err(VersionedError::WrongFormat { .. })
        ));
    }

    #[test]
    fn versions_parse_strictly() {
        assert_eq!(FormatVersion::parse("1.0"), Some(FormatVersion::new(1, 0)));
        assert_eq!(FormatVersion::parse("12.34"), Some(FormatVersion::new(12, 34)));
        for bad in ["", "1", "1.", ".1", "1.0.0", "a.b", "+1.0", "1.-1", "99999999.0"] {
            assert_eq!(FormatVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn records_are_written_atomically_and_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        assert!(read_opt::<Rec>(&path).unwrap().is_none());
        write_atomic(&path, &Rec { a: 3, b: None }).unwrap();
        assert_eq!(read::<Rec>(&path).unwrap(), Rec { a: 3, b: None });
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("rec.json.tmp").exists());
        let big = dir.path().join("big.json");
        std::fs::File::create(&big).unwrap().set_len(MAX_RECORD + 1).unwrap();
        assert!(matches!(read::<Rec>(&big), Err(VersionedError::TooLarge { .. })));
    }

    #[test]
    fn the_wrapper_serialises_as_the_record() {
        let r = Rec { a: 5, b: None };
        let v = serde_json::to_value(Versioned(&r)).unwrap();
        assert_eq!(v[FORMAT_KEY], "stasis-test");
        let back: Versioned<Rec> = serde_json::from_value(v).unwrap();
        assert_eq!(back.0, r);
    }
}
