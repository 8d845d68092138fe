//! The reader of a saved VM state's tail (the guest's virtual clock from
//! QEMU's `timer` section), on arbitrary state files.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir"));
    let path = dir.path().join("vm.state");
    std::fs::write(&path, data).expect("write input");
    let _ = stasis_qemu::vmstate::saved_virtual_clock_ns(&path);
});
