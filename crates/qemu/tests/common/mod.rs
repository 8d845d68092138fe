//! Shared helpers of the integration tests: the guest image and process guards.
#![allow(dead_code)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use stasis_qemu::accel::Accel;
use stasis_qemu::vm::{NicSpec, VmSpec};

/// The guest kernel and initrd: `$STASIS_GUEST_KERNEL` (initrd
/// `$STASIS_GUEST_INITRD`, default `initrd.img` beside the kernel), else the
/// image `guest/build.sh` puts in `<workspace>/target/guest/`. A missing image
/// fails the test: these tests are worthless without a kernel to run.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let kernel = match std::env::var_os("STASIS_GUEST_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => workspace.join("target/guest/vmlinuz"),
    };
    let initrd = match std::env::var_os("STASIS_GUEST_INITRD") {
        Some(i) => PathBuf::from(i),
        None => kernel.with_file_name("initrd.img"),
    };
    for (what, p) in [("kernel", &kernel), ("initrd", &initrd)] {
        assert!(
            p.is_file(),
            "guest {what} {} is missing: build the guest image first (guest/build.sh → target/guest/), \
             or point STASIS_GUEST_KERNEL (and STASIS_GUEST_INITRD) at a kernel and initrd",
            p.display()
        );
    }
    (kernel.canonicalize().unwrap(), initrd.canonicalize().unwrap())
}

/// A unix listener standing in for a delay-node port: QEMU's connection sits
/// in its backlog, which is all `-netdev stream,server=off` needs.
pub fn nic_listener(dir: &Path, id: &str, mac: &str) -> (UnixListener, NicSpec) {
    let socket = dir.join(format!("{id}.sock"));
    let listener = UnixListener::bind(&socket).expect("bind NIC listener");
    (listener, NicSpec { id: id.into(), mac: mac.into(), socket, backend: Default::default() })
}

pub fn spec(name: &str, run_dir: &Path, nics: Vec<NicSpec>) -> VmSpec {
    let (kernel, initrd) = guest_image();
    VmSpec {
        name: name.into(),
        memory_mib: 256,
        vcpus: 1,
        kernel,
        initrd,
        append: "console=ttyS0 panic=-1".into(),
        nics,
        accel: Accel::Tcg,
        disk: None,
        machine: None,
        firmware: false,
        seed: None,
        run_dir: run_dir.to_owned(),
    }
}

/// SIGKILLs a QEMU on drop (if it is still the same process), so a failing
/// test leaves nothing running.
pub struct KillOnDrop {
    pub pid: u32,
    pub qmp_path: PathBuf,
}

impl KillOnDrop {
    pub fn new(vm: &stasis_qemu::Vm) -> Self {
        KillOnDrop { pid: vm.pid, qmp_path: vm.qmp_path.clone() }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*self.qmp_path.to_string_lossy()) {
            // SAFETY: signals one process that we checked is our QEMU.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    // Short paths: unix socket paths must stay under 108 bytes.
    tempfile::Builder::new().prefix("sq").tempdir_in("/tmp").expect("tempdir")
}
