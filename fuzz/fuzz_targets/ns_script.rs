//! Emulab NS scripts through the spec's NS importer (its Tcl word parser and
//! the tb_compat commands): hostile scripts must be refused cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_core::spec::Experiment;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Experiment::from_ns_script(text, None);
});
