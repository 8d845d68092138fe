//! Where a remote store lives and how to sign in to it.
//!
//! A store is bound to a bucket by `<store>/.remote.toml` (never holding a
//! secret; mode 0600): the URL `s3://bucket[/prefix]`, the endpoints to try
//! in order (empty: AWS itself, from `region`), the region, and optionally
//! a credentials file. Credentials come, in this order, from that file
//! (TOML `access_key_id`, `secret_access_key`, optional `session_token`;
//! refused unless only its owner can read it), from `$STASIS_S3_CREDENTIALS`
//! naming such a file, or from the usual `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` environment. They are never
//! written to the binding, to a manifest or to a log (`Debug` redacts them).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::RemoteError;

/// The binding file of a store bound to a bucket (inside the store root;
/// its name starts with '.', so it is never taken for a checkpoint).
pub const BINDING_FILE: &str = ".remote.toml";
/// Environment variable naming a credentials file.
pub const CREDENTIALS_ENV: &str = "STASIS_S3_CREDENTIALS";

/// A bucket (and key prefix) at one or more S3 endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// S3 endpoints (`http://10.77.0.1:3900`), tried in order; another is
    /// used while one does not answer. Empty: AWS itself.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The region (`garage` for Garage's default; AWS: e.g. `eu-west-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// A credentials file (see the module docs) instead of the environment.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

impl RemoteConfig {
    /// The bucket and the key prefix (without slashes at either end) of
    /// [`RemoteConfig::url`].
    pub fn bucket_and_prefix(&self) -> Result<(String, String), RemoteError> {
        let bad = |reason: &'static str| RemoteError::BadUrl { url: self.url.clone(), reason };
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| bad("must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(bad("the bucket must be 3..=63 of [a-z0-9.-]"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == "." || s == "..")
            || prefix.contains("//")
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        {
            return Err(bad("the prefix must be of [A-Za-z0-9/._-] without empty, . or .. parts"));
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(RemoteError::BadEndpoint { endpoint: e.clone() });
            }
        }
        Ok((bucket.to_owned(), prefix.to_owned()))
    }

    /// Reads the binding of the store at `root`, if it has one.
    pub fn load(root: &Path) -> Result<Option<RemoteConfig>, RemoteError> {
        let path = root.join(BINDING_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RemoteError::ReadConfig { path, source }),
        };
        let cfg: RemoteConfig = toml::from_str(&text)
            .map_err(|e| RemoteError::BadConfig { path: path.clone(), message: e.message().to_owned() })?;
        cfg.bucket_and_prefix()?;
        Ok(Some(cfg))
    }

    /// Writes the binding of the store at `root` (0600, tmp then rename).
    pub fn save(&self, root: &Path) -> Result<(), RemoteError> {
        self.bucket_and_prefix()?;
        let path = root.join(BINDING_FILE);
        let tmp = root.join(format!("{BINDING_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            stasis_core::private::create_dir_all(root)?;
            let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(toml::to_string(self).expect("a remote config serialises").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| RemoteError::ReadConfig { path, source })
    }

    /// A label for messages: `s3://bucket/prefix at http://…`.
    pub fn label(&self) -> String {
        match self.endpoints.first() {
            Some(e) => format!("{} at {e}", self.url),
            None => format!("{} at AWS", self.url),
        }
    }
}

/// An access key. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Reads a credentials file, refusing one that others may read.
    pub fn from_file(path: &Path) -> Result<Credentials, RemoteError> {
        let meta = fs::metadata(path).map_err(|source| RemoteError::ReadConfig { path: path.to_owned(), source })?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(RemoteError::CredentialsReadable { path: path.to_owned(), mode: mode & 0o777 });
        }
        let text =
            fs::read_to_string(path).map_err(|source| RemoteError::ReadConfig { path: path.to_owned(), source })?;
        // The parser's message may quote the line, which holds the secret:
        // report the place only.
        toml::from_str(&text).map_err(|e| RemoteError::BadConfig {
            path: path.to_owned(),
            message: match e.span() {
                Some(s) => format!("not a credentials file (at byte {})", s.start),
                None => "not a credentials file".to_owned(),
            },
        })
    }

    /// The credentials for `cfg`: its file, `$STASIS_S3_CREDENTIALS`, then
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`(/`AWS_SESSION_TOKEN`).
    /// `None` when there are none; the caller refuses rather than letting
    /// the S3 client go looking for instance metadata.
    pub fn resolve(cfg: &RemoteConfig) -> Result<Option<Credentials>, RemoteError> {
        if let Some(p) = &cfg.credentials_file {
            return Credentials::from_file(p).map(Some);
        }
        if let Some(p) = std::env::var_os(CREDENTIALS_ENV).filter(|p| !p.is_empty()) {
            return Credentials::from_file(Path::new(&p)).map(Some);
        }
        match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(id), Ok(secret)) if !id.is_empty() && !secret.is_empty() => Ok(Some(Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty()),
            })),
            _ => Ok(None),
        }
    }
}
