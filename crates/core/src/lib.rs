//! Shared foundations of stasis: the checked snapshot envelope every saved
//! component state is wrapped in, the host clock all scheduled actions use,
//! and the experiment spec.

pub mod clock;
pub mod envelope;
pub mod spec;
