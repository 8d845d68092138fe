//! `stasis-ga [--device PATH]`: the guest agent of the busybox guest (the
//! protocol subset of qemu-ga that stasis uses; `stasis_guest_tools::ga`).
//! Without `--device` it finds the virtio-serial port named
//! `org.qemu.guest_agent.0` under /sys/class/virtio-ports.

use std::path::PathBuf;
use std::time::Duration;

use stasis_guest_tools::ga::Agent;

const PORT_NAME: &str = "org.qemu.guest_agent.0";

fn find_port() -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = match args.as_slice() {
        [] => find_port(),
        [flag, path] if flag == "--device" => Some(PathBuf::from(path)),
        _ => {
            eprintln!("usage: stasis-ga [--device PATH]");
            std::process::exit(2);
        }
    };
    let Some(device) = device else {
        eprintln!("stasis-ga: no virtio-serial port named {PORT_NAME}");
        std::process::exit(1);
    };
    let mut port = match std::fs::OpenOptions::new().read(true).write(true).open(&device) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("stasis-ga: cannot open {}: {e}", device.display());
            std::process::exit(1);
        }
    };
    // Reads return 0 while no host is connected: poll gently.
    let idle = || std::thread::sleep(Duration::from_millis(100));
    if let Err(e) = Agent::new().serve(&mut port, idle) {
        eprintln!("stasis-ga: {}: {e}", device.display());
        std::process::exit(1);
    }
}
