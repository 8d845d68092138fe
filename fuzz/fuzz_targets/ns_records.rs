//! The Rust half of an NS import without a Tcl process per input: what the
//! interpreter printed (records JSON) about a script, turned into an
//! experiment with spans into the script. A script can steer the records'
//! strings, lines and command texts, so both halves are hostile here.
//! Input: the script, a NUL byte, the records (seeds: real tclsh output).
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_core::spec::Experiment;

fuzz_target!(|data: &[u8]| {
    let Some(nul) = data.iter().position(|&b| b == 0) else { return };
    let Ok(script) = std::str::from_utf8(&data[..nul]) else { return };
    let _ = Experiment::from_ns_records(&data[nul + 1..], script, Some(std::path::Path::new("f.ns")));
});
