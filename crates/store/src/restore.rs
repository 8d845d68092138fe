//! Reassembling chunked components into files for a restore.

use std::fs::File;
use std::path::Path;

use crate::chunk::ChunkStorage;
use crate::error::{io_err, StoreError};
use crate::manifest::{ChunkRef, Component};
use crate::verify::{check_lengths, read_chunk};

/// Threads that read chunks for a restore: more than the cores, so reads
/// of cold chunks (one small file each) overlap with decoding.
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

/// Writes a chunked component into `out` (at `path`): every chunk read,
/// decoded and checked against its id by several threads, each written at
/// its offset. Stops at the first bad chunk (the one earliest in the file
/// among those found) and returns its error.
pub(crate) fn write_chunks_at(
    storage: &dyn ChunkStorage,
    label: &str,
    c: &Component,
    chunks: &[ChunkRef],
    out: &File,
    path: &Path,
) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    check_lengths(label, c, chunks)?;
    let mut offsets = Vec::with_capacity(chunks.len());
    let mut at = 0u64;
    for r in chunks {
        offsets.push(at);
        at += r.len;
    }
    out.set_len(at).map_err(io_err("cannot size", path))?;
    const BATCH: usize = 8;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: std::sync::Mutex<Option<(usize, StoreError)>> = std::sync::Mutex::new(None);
    let threads = storage.read_parallelism().unwrap_or_else(reader_threads).min(chunks.len().div_ceil(BATCH)).max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let from = next.fetch_add(BATCH, Ordering::Relaxed);
                    if from >= chunks.len() {
                        break;
                    }
                    for i in from..(from + BATCH).min(chunks.len()) {
                        let r = read_chunk(storage, label, (&c.name, &c.file), &chunks[i])
                            .and_then(|data| out.write_all_at(&data, offsets[i]).map_err(io_err("cannot write", path)));
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            let earliest = match slot.as_ref() {
                                Some((j, _)) => i < *j,
                                None => true,
                            };
                            if earliest {
                                *slot = Some((i, e));
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}
