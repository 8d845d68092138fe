//! The delay node's saved state as read back from a file: the state envelope
//! (magic, kind, version, length cap, CRC) and the postcard payload inside.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir"));
    let path = dir.path().join("dn.state");
    std::fs::write(&path, data).expect("write input");
    let _ = delay_node::state::NodeState::read_file(&path);
});
