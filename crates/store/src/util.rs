//! Small helpers: wall-clock time, directory fsync, hashing files and a
//! parallel map.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{io_err, StoreError};

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", dir))
}

/// Size and BLAKE3 (hex) of a file, fsynced too when `sync`: the fsync
/// (the disk writing back) runs beside the hashing (the CPU reading the
/// just-written pages from the cache), so the two costs overlap.
pub(crate) fn measure(path: &Path, sync: bool) -> io::Result<(u64, String)> {
    let file = File::open(path)?;
    let hash = || -> io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(io::BufReader::with_capacity(1 << 20, &file))?;
        Ok(hasher.finalize().to_hex().to_string())
    };
    let digest = if sync {
        std::thread::scope(|s| {
            let synced = s.spawn(|| file.sync_all());
            let digest = hash();
            synced.join().expect("fsync does not panic")?;
            digest
        })?
    } else {
        hash()?
    };
    Ok((file.metadata()?.len(), digest))
}

/// `f` of every item, several at a time (one thread per core): hashing and
/// compressing are CPU-bound and concurrent fsyncs share journal commits.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = items.iter().map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results.into_iter().map(|r| r.expect("every index mapped")).collect()
}

/// [`measure`] of every path, several files at a time.
pub(crate) fn measure_all(paths: &[PathBuf], sync: bool) -> Vec<io::Result<(u64, String)>> {
    par_map(paths, |p| measure(p, sync))
}
