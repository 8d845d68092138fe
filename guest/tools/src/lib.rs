//! Statically linked tools run inside guests: clock probe, sequence-numbered
//! traffic, and the demo's distributed Mandelbrot job.
//!
//! The binaries (`stasis-probe`, `stasis-traffic`) are thin: argument parsing
//! and socket/clock I/O. Everything that decides something — the clock-step
//! statistics, the send pacing, the gap/duplicate/reorder accounting and the
//! record wire format — lives in I/O-free cores here that take time as a
//! parameter and are unit-tested without sleeping.
//!
//! Every line a tool prints is one JSON object written with a single
//! `write(2)`, so lines from several tools sharing the guest console land
//! unbroken in the serial log (see `docs/guest.md` for the formats). Host-side
//! crates parse them with [`lines::parse`] (feature `parse`).

pub mod args;
pub mod bt;
pub mod clocks;
pub mod clockx;
#[cfg(feature = "agent")]
pub mod ga;
pub mod json;
pub mod lines;
pub mod mandel;
pub mod pace;
pub mod probe;
pub mod record;
pub mod seq;
