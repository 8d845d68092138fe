//! One host's half of a checkpoint: launching an experiment's VMs and its
//! delay node, freezing them all at one instant, saving them into the store,
//! resuming them after one common frozen duration, and restoring them.
//!
//! The spine runs this in-process from the CLI (one host); the multi-host
//! agent daemon drives the same code.

pub mod coordinator;
pub mod daemon;
/// Collection of qcow2 disk images nothing references.
pub mod diskgc;
pub mod event;
pub mod freeze;
pub mod guest;
pub mod history;
pub mod host;
/// One command at a time changes an experiment.
pub mod job;
pub mod layout;
/// Live checkpoints (guest RAM written by QEMU's background snapshot while guests run).
pub mod live;
pub mod part;
pub mod placement;
/// An experiment a dead checkpoint left frozen: finding it, resuming it.
pub mod recover;
pub mod rootdisk;
/// Reading guest serial logs (a guest controls their size) for the ready
/// line; it lives in stasis-osguest, beside the other guest-facing parsers,
/// so the fuzz targets reach it without the agent.
pub use stasis_osguest::serial;
/// Periodic checkpoints with retention (`stasis supervise`).
pub mod supervise;
/// Swap-out (checkpoint, then release everything) and swap-in records.
pub mod swap;
pub mod topology;
