//! Crash-test failpoints.

use tracing::warn;

/// Aborts the process at a named point when `STASIS_STORE_FAILPOINT` says
/// so: the crash tests kill a commit or a gc exactly there.
pub(crate) fn failpoint(name: &str) {
    if std::env::var("STASIS_STORE_FAILPOINT").is_ok_and(|v| v == name) {
        warn!(name, "failpoint reached: aborting the process");
        std::process::abort();
    }
}
