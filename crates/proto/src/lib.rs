//! The coordinator↔agent checkpoint protocol of stasis.
//!
//! One coordinator holds a TCP connection to the agent of every host. A
//! connection starts with version negotiation and mutual authentication,
//! then carries sealed frames (sequence number + HMAC). One checkpoint round:
//!
//! ```text
//!  coordinator                                   agent i (every host)
//!    |  TCP connect (agent binds only its configured address)
//!    |-- Hello{magic, versions min..=max, nonce_c} -->|
//!    |<-- Welcome{version, nonce_a} ------------------|  disjoint versions → Error{VersionMismatch}
//!    |-- Auth{proof_coord} -------------------------->|  the client proves first; wrong key → Error{AuthFailed}
//!    |<-- Auth{proof_agent} --------------------------|  wrong agent proof → the coordinator refuses it
//!    |   ... every later frame: seq ‖ message ‖ HMAC(session key) ...
//!    |-- Ping -------------------------------------->|
//!    |<-- Pong (RTT → freeze margin) -----------------|
//!    |-- Prepare{ckpt, freeze_at T, hold_lead, deadline} -->|
//!    |                                 (at T - hold_lead) delay node holds
//!    |                                 (at T) stop every VM, stamp stops s_k
//!    |                                 save VMs, disks, delay node; seal: fsync + size + BLAKE3
//!    |<-- Saved{ckpt, [name, bytes, blake3, s_k]} ----|  or SaveFailed{ckpt, reason}
//!    |  all Saved by the deadline?
//!    |    yes: commit the manifest (durable) = the checkpoint exists
//!    |-- Commit{ckpt, D} ---------------------------->|  resume each component at s_k + D
//!    |    no (SaveFailed, deadline, lost connection, manifest failure):
//!    |-- Abort{ckpt, D} ----------------------------->|  resume at s_k + D, delete partial state
//!    |<-- Resumed{ckpt, [name, s_k, resume]} ---------|
//!    |                                 (Commit only) commit the sealed part into the store
//!    |<-- Stored{ckpt, started, commit_ns, error?} ---|  error: the checkpoint is not restorable
//! ```
//! Saved means *durable*: the raw state files are fsynced and measured (a
//! sealed part), so the chunked store commit is not frozen time. An agent
//! that dies before its Stored keeps the sealed part and commits it when it
//! starts again (or at the next restore).
//! `D = decision instant − earliest stop + resume margin` is the same for
//! every component of every host, so stop skew never turns into skew between
//! virtual clocks. Checkpoint ids and message type ids are never 0 (reserved,
//! invalid). See `docs/protocol.md`.
//!
//! Modules: [`msg`] (messages), [`wire`] (frames), [`auth`] (keys and
//! sealing), [`agent`] and [`coordinator`] (I/O-free state machines),
//! [`transport`] (tokio TCP), [`sim`] (discrete-event simulation).

pub mod agent;
pub mod auth;
pub mod coordinator;
pub mod msg;
pub mod sim;
pub mod testing;
pub mod transport;
pub mod wire;

pub use agent::{AgentAction, AgentConfig, AgentCore, AgentState, Refusal};
pub use auth::Key;
pub use coordinator::{AbortReason, CoordAction, CoordConfig, CoordinatorCore, Outcome};
pub use msg::{CkptId, Message};
