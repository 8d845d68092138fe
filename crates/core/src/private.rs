//! Files and directories only their owner can read: stasis runs as root and
//! keeps guest memory, keys and state, so everything it creates is 0600
//! (files) or 0700 (directories), opened without following a symlink an
//! attacker may have planted, and a state directory someone else could
//! write to is refused rather than used (docs/threat-model.md).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Mode of every file stasis creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory stasis creates.
pub const DIR_MODE: u32 = 0o700;

/// Why a directory is not fit to hold stasis state.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a symbolic link; give the real directory")]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is owned by uid {owner}, not by us (uid {us}): another user could read or replace what stasis keeps there")]
    NotOurs { path: PathBuf, owner: u32, us: u32 },
    #[error(
        "{path} has mode {mode:04o}: group or others can write to it; use a directory only you can write (chmod 700)"
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// Why a file is not fit to hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has mode {mode:04o}: group or others can read it; chmod 600 it")]
    Readable { path: PathBuf, mode: u32 },
    #[error("{path} is owned by uid {owner}, not by us (uid {us})")]
    NotOurs { path: PathBuf, owner: u32, us: u32 },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `path` (and missing parents) 0700, or checks an existing one:
/// it must be a real directory owned by us that neither group nor others
/// can write; group/other read and search bits are removed.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    let io = |source| PrivateDirError::Io { path: path.to_owned(), source };
    match DirBuilder::new().recursive(true).mode(DIR_MODE).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(PrivateDirError::Symlink { path: path.to_owned() });
    }
    if !meta.is_dir() {
        return Err(PrivateDirError::NotADirectory { path: path.to_owned() });
    }
    let us = euid();
    if meta.uid() != us {
        return Err(PrivateDirError::NotOurs { path: path.to_owned(), owner: meta.uid(), us });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateDirError::Writable { path: path.to_owned(), mode });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o077)).map_err(io)?;
    }
    Ok(())
}

/// Opens (creating or truncating) `path` for writing, mode 0600 when
/// created, refusing a symbolic link in its last component.
pub fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Opens `path` for appending (a log, an event stream), mode 0600 when
/// created, refusing a symbolic link in its last component.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(FILE_MODE).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Writes `bytes` to `path` as [`create_file`] opens it.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    create_file(path)?.write_all(bytes)
}

/// Creates `path` and its missing parents with mode 0700.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// Creates the directory `path` (its parent must exist) with mode 0700.
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Listens on a unix socket at `path` that only its owner can connect to,
/// with no moment at which anyone else could: the socket's mode is set to
/// 0600 with fchmod(2) *before* bind(2), which on Linux creates the file
/// with that mode (less the umask), so it never depends on the process
/// umask and a library caller gets it too. A stale socket at `path` is
/// replaced (never another kind of file). The socket is bound at `path`
/// itself, so a peer's getpeername(2) names `path` (QEMU reports that
/// address for its stream NICs, and the NIC check compares it).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"));
        }
        std::fs::remove_file(path)?;
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long for sun_path, or has a NUL"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let cvt = |rc: libc::c_int| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) };
    // SAFETY: plain syscalls on a descriptor owned here from its creation.
    unsafe {
        let fd = OwnedFd::from_raw_fd(cvt(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0))?);
        cvt(libc::fchmod(std::os::fd::AsRawFd::as_raw_fd(&fd), FILE_MODE))?;
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        cvt(libc::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), std::ptr::addr_of!(addr).cast(), len))?;
        cvt(libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 128))?;
        Ok(UnixListener::from(fd))
    }
}

/// Reads a secret (a key file): refuses a symbolic link, a file owned by
/// someone else, or one group or others can read.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, PrivateFileError> {
    use std::io::Read;
    let io = |source| PrivateFileError::Io { path: path.to_owned(), source };
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    let us = euid();
    if meta.uid() != us {
        return Err(PrivateFileError::NotOurs { path: path.to_owned(), owner: meta.uid(), us });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Readable { path: path.to_owned(), mode });
    }
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

/// Makes every file and directory this process (and the QEMU and delay-node
/// processes it starts) creates private to its owner, whatever mode the code
/// asks for: call first thing in each binary.
pub fn restrict_umask() {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_dir_is_0700_and_a_readable_one_of_ours_is_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn a_group_or_world_writable_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        for m in [0o777, 0o770, 0o1777, 0o702] {
            std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(m)).unwrap();
            let e = ensure_private_dir(t.path()).unwrap_err();
            assert!(matches!(e, PrivateDirError::Writable { .. }), "{m:o}: {e}");
        }
    }

    #[test]
    fn a_dir_made_by_another_user_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        // As an attacker pre-creating /tmp/stasis for us would.
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("stasis");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(12345), Some(12345)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = ensure_private_dir(&d).unwrap_err();
        assert!(matches!(e, PrivateDirError::NotOurs { owner: 12345, us: 0, .. }), "{e}");
        assert!(e.to_string().contains("owned by uid 12345"), "{e}");
    }

    #[test]
    fn a_symlinked_dir_or_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        symlink(&real, &link).unwrap();
        assert!(matches!(ensure_private_dir(&link).unwrap_err(), PrivateDirError::Symlink { .. }));
        let target = t.path().join("victim");
        std::fs::write(&target, b"x").unwrap();
        let planted = t.path().join("planted");
        symlink(&target, &planted).unwrap();
        assert_eq!(create_file(&planted).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }

    #[test]
    fn a_bound_socket_is_0600_whatever_the_umask_and_replaces_only_a_stale_socket() {
        // The test process runs under the usual umask 022, under which a
        // plain bind makes the socket 0755: connectable by everyone.
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("ctl");
        let l = bind_unix(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        let c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let peer = c.peer_addr().unwrap();
        assert_eq!(peer.as_pathname(), Some(p.as_path()), "a peer sees the socket's own path (QEMU's NIC check)");
        drop(l);
        // A stale socket (its listener gone) is replaced.
        let l = bind_unix(&p).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        assert_eq!(mode(&p), 0o600);
        drop(l);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ctl")]);
        // A file that is not a socket is never replaced.
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(bind_unix(&f).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }

    #[test]
    fn created_files_are_0600_and_secrets_readable_by_others_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("k");
        write(&f, &[7; 32]).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(read_secret(&f).unwrap(), vec![7; 32]);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret(&f).unwrap_err();
        assert!(matches!(e, PrivateFileError::Readable { mode: 0o644, .. }), "{e}");
    }
}
