//! Experiment specs in TOML: parsing and validation refuse cleanly, and an
//! accepted spec prints back to TOML that parses to the same experiment.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stasis_core::spec::Experiment;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(e) = Experiment::from_toml_str(text, None) {
        let again = Experiment::from_toml_str(&e.to_toml(), None).expect("printed spec parses");
        assert_eq!(again.digest(), e.digest());
    }
});
