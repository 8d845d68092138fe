//! Read-only file mappings for commit.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A file mapped read-only: commit reads state files in place from the page
/// cache (they were just written) instead of copying them into fresh
/// anonymous memory, which costs a page fault and a copy per 4 KiB.
pub(crate) struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views of it across threads is as safe as sharing a `&[u8]`.
unsafe impl Send for Mapped {}
// SAFETY: as above: only read through shared references.
unsafe impl Sync for Mapped {}

impl Mapped {
    pub(crate) fn of(file: &File) -> io::Result<Mapped> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        if len == 0 {
            return Ok(Mapped { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a fresh private read-only mapping of a file we opened; the
        // result is checked before use. The state files are written by the
        // agent before commit and nothing writes them while it runs (a
        // concurrent writer could change bytes under us, which the chunk
        // ids and the whole-file digest would then simply record; one that
        // truncated the file would fault the process with SIGBUS).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes until `drop` unmaps them.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping `of` created, once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}
