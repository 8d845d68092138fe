//! What stasis gives a node that boots a real OS image (docs/images.md):
//! its cloud-init NoCloud seed ([`seed`]) and the guest agent client that
//! `stasis exec`, `stasis cp` use ([`agent`]; the busybox guest runs
//! `stasis-ga`, which speaks the same protocol), and the interactive serial
//! console `stasis console` attaches ([`console`]), and the watch on a
//! guest's serial log for its ready line ([`serial`]).

pub mod agent;
pub mod console;
pub mod seed;
pub mod serial;
