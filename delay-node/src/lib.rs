//! Userspace link emulator in virtual time whose in-flight frames are checkpointed.
//!
//! [`sched::Scheduler`] is the I/O-free core (links, LANs, virtual clock,
//! freeze/thaw, save/restore); [`node`] runs it over unix sockets;
//! [`control`] is the agent's interface. Design notes: `docs/delay-node.md`.

pub mod config;
pub mod control;
pub mod events;
pub mod frame;
pub mod node;
pub mod pcap;
pub mod sched;
pub mod state;
