//! Shared foundations of stasis: the checked snapshot envelope every saved
//! component state is wrapped in, the host clock all scheduled actions use,
//! the experiment spec, and versioned JSON records ([`versioned`]).

pub mod admission;
pub mod background;
pub mod clock;
pub mod envelope;
pub mod private;
pub mod spec;
pub mod versioned;
