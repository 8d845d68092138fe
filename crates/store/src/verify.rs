//! Reading and checking manifests, chunks and files.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::Value;

use crate::chunk::{self, ChunkId, ChunkStorage};
use crate::error::{io_err, StoreError};
use crate::manifest::{self, ChunkRef, Component, Manifest, ManifestVersion, FORMAT, MANIFEST_FILE, VERSION};
use crate::util::{measure_all, par_map};

/// Reads and checks a manifest: JSON, format, version, checksum, id. Does
/// not look at the component files.
pub(crate) fn load_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let checkpoint = dir_name.clone();
    let path = dir.join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::MissingManifest { checkpoint, path }),
        Err(e) => return Err(io_err("cannot read the manifest", &path)(e)),
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadJson {
        checkpoint: checkpoint.clone(),
        path: path.clone(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let format = value.get("format").and_then(Value::as_str).unwrap_or("");
    if format != FORMAT {
        let found = value.get("format").map_or_else(|| "none".to_owned(), |f| f.to_string());
        return Err(StoreError::WrongFormat { checkpoint, found: found.trim_matches('"').to_owned() });
    }
    let version: ManifestVersion =
        value.get("version").cloned().and_then(|v| serde_json::from_value(v).ok()).ok_or_else(|| {
            StoreError::BadManifest {
                checkpoint: checkpoint.clone(),
                path: path.clone(),
                message: "no valid version {major, minor}".into(),
            }
        })?;
    if version.major != VERSION.major || version.minor > VERSION.minor {
        return Err(StoreError::UnsupportedVersion { checkpoint, found: version });
    }
    let recorded = value.get("checksum").and_then(Value::as_str).unwrap_or("").to_owned();
    let computed = manifest::checksum_of(&value);
    if recorded != computed {
        return Err(StoreError::ChecksumMismatch { checkpoint, recorded, computed });
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| StoreError::BadManifest {
        checkpoint: checkpoint.clone(),
        path: path.clone(),
        message: e.to_string(),
    })?;
    if manifest.id != dir_name {
        return Err(StoreError::IdMismatch { checkpoint, found: manifest.id, dir: dir.to_path_buf() });
    }
    Ok(manifest)
}

/// Reads, decodes and checks chunk `r` of component `component`.
pub(crate) fn read_chunk(
    storage: &dyn ChunkStorage,
    label: &str,
    owner: (&str, &str),
    r: &ChunkRef,
) -> Result<Vec<u8>, StoreError> {
    read_chunk_via(|id| storage.get(id), label, owner, r)
}

/// [`read_chunk`] with the bytes from `get`.
pub(crate) fn read_chunk_via(
    get: impl Fn(&ChunkId) -> io::Result<Vec<u8>>,
    label: &str,
    (component, file): (&str, &str),
    r: &ChunkRef,
) -> Result<Vec<u8>, StoreError> {
    let damaged = |problem: String| StoreError::ChunkDamaged {
        checkpoint: label.to_owned(),
        component: component.to_owned(),
        file: file.to_owned(),
        chunk: r.id.clone(),
        problem,
    };
    let id = ChunkId::from_hex(&r.id).ok_or_else(|| damaged("not a chunk id".into()))?;
    let stored = match get(&id) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::ChunkMissing {
                checkpoint: label.to_owned(),
                component: component.to_owned(),
                file: file.to_owned(),
                chunk: r.id.clone(),
            })
        }
        Err(e) => return Err(damaged(format!("cannot read: {e}"))),
    };
    let data = chunk::decode(&id, &stored).map_err(|e| damaged(e.to_string()))?;
    if data.len() as u64 != r.len {
        return Err(damaged(format!("{} bytes, the manifest records {}", data.len(), r.len)));
    }
    Ok(data)
}

/// Streams a chunked component's bytes into `sink`, verifying every chunk
/// and then the whole file's size and BLAKE3.
pub(crate) fn reassemble(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    chunks: &[ChunkRef],
    mut sink: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    // Windows of chunks read and checked several at a time, then consumed in order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for window in chunks.chunks(16 * threads) {
        let batches: Vec<&[ChunkRef]> = window.chunks(16).collect();
        let decoded = par_map(&batches, |batch| {
            batch.iter().map(|r| read_chunk(storage, label, (&c.name, &c.file), r)).collect::<Result<Vec<_>, _>>()
        });
        for batch in decoded {
            for data in batch? {
                hasher.update(&data);
                total += data.len() as u64;
                sink(&data)?;
            }
        }
    }
    let actual = hasher.finalize().to_hex().to_string();
    if total != c.bytes || actual != c.blake3 {
        return Err(StoreError::Reassembly {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            found: format!("{total} bytes with BLAKE3 {actual}"),
            recorded: format!("{} bytes with BLAKE3 {}", c.bytes, c.blake3),
        });
    }
    Ok(())
}

/// Refuses a chunk list whose lengths do not add up to the recorded size.
pub(crate) fn check_lengths(label: &str, c: &Component, chunks: &[ChunkRef]) -> Result<(), StoreError> {
    let total: u64 = chunks.iter().map(|r| r.len).sum();
    if total != c.bytes {
        return Err(StoreError::Reassembly {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            found: format!("{total} bytes (the chunk lengths)"),
            recorded: format!("{} bytes", c.bytes),
        });
    }
    Ok(())
}

/// Refuses a chunk that is not in `storage` (or is not a chunk id).
pub(crate) fn chunk_exists(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    r: &ChunkRef,
) -> Result<(), StoreError> {
    let id = ChunkId::from_hex(&r.id).ok_or_else(|| StoreError::ChunkDamaged {
        checkpoint: label.to_owned(),
        component: c.name.clone(),
        file: c.file.clone(),
        chunk: r.id.clone(),
        problem: "not a chunk id".into(),
    })?;
    match storage.has(&id) {
        Ok(true) => Ok(()),
        Ok(false) => Err(StoreError::ChunkMissing {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            chunk: r.id.clone(),
        }),
        Err(e) => Err(StoreError::ChunkDamaged {
            checkpoint: label.to_owned(),
            component: c.name.clone(),
            file: c.file.clone(),
            chunk: r.id.clone(),
            problem: format!("cannot read: {e}"),
        }),
    }
}

/// Verifies every file a manifest records.
pub(crate) fn verify_files(
    dir: &Path,
    manifest: &Manifest,
    label: &str,
    storage: &dyn ChunkStorage,
    deep: bool,
) -> Result<(), StoreError> {
    let chunked: std::collections::HashSet<&str> =
        manifest.components.iter().filter(|c| c.chunks.is_some()).map(|c| c.name.as_str()).collect();
    let whole = || {
        manifest.recorded_files().filter(|(owner, file, _, _)| {
            !(chunked.contains(owner) && manifest.component(owner).is_some_and(|c| c.file == *file))
        })
    };
    // Every name must be plain, chunked or not: restore writes it under a directory.
    for (owner, file, _, _) in manifest.recorded_files() {
        if !manifest::is_plain_file_name(file) {
            return Err(StoreError::BadManifest {
                checkpoint: label.to_owned(),
                path: dir.join(MANIFEST_FILE),
                message: format!("{owner}: file {file:?} is not a plain file name"),
            });
        }
    }
    // Names and sizes first (cheap), then all digests in parallel.
    let mut paths = Vec::new();
    for (owner, file, bytes, _) in whole() {
        let path = dir.join(file);
        if !manifest::is_plain_file_name(file) {
            return Err(StoreError::BadManifest {
                checkpoint: label.to_owned(),
                path: dir.join(MANIFEST_FILE),
                message: format!("{owner}: file {file:?} is not a plain file name"),
            });
        }
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::FileMissing { checkpoint: label.to_owned(), component: owner.to_owned(), path })
            }
            Err(e) => return Err(io_err("cannot stat", &path)(e)),
        };
        if size != bytes {
            return Err(StoreError::FileSize {
                checkpoint: label.to_owned(),
                component: owner.to_owned(),
                path,
                recorded: bytes,
                actual: size,
            });
        }
        paths.push(path);
    }
    let digests = measure_all(&paths, false);
    for ((owner, _, _, digest), (path, measured)) in whole().zip(paths.into_iter().zip(digests)) {
        let (_, actual) = measured.map_err(io_err("cannot read", &path))?;
        if actual != digest {
            return Err(StoreError::FileDigest {
                checkpoint: label.to_owned(),
                component: owner.to_owned(),
                path,
                recorded: digest.to_owned(),
                actual,
            });
        }
    }
    // Chunked components: every chunk and the reassembled digest (deep),
    // or that every chunk is there and their lengths add up.
    let chunked: Vec<(&Component, &Vec<ChunkRef>)> =
        manifest.components.iter().filter_map(|c| c.chunks.as_ref().map(|ch| (c, ch))).collect();
    if !deep {
        for (c, chunks) in &chunked {
            check_lengths(label, c, chunks)?;
        }
        let mut seen = std::collections::HashSet::new();
        let refs: Vec<(&Component, &ChunkRef)> = chunked
            .iter()
            .flat_map(|(c, ch)| ch.iter().map(move |r| (*c, r)))
            .filter(|(_, r)| seen.insert(r.id.as_str()))
            .collect();
        let batches: Vec<&[(&Component, &ChunkRef)]> = refs.chunks(256).collect();
        for r in par_map(&batches, |batch| batch.iter().try_for_each(|(c, r)| chunk_exists(storage, label, c, r))) {
            r?;
        }
        return Ok(());
    }
    for r in par_map(&chunked, |(c, ch)| reassemble(storage, label, c, ch, |_| Ok(()))) {
        r?;
    }
    Ok(())
}
