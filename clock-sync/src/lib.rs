//! PTP-synchronised agent clocks.
//!
//! Each agent runs one PTP node ([`service`]) on statime 0.4. The node steers a
//! statime `OverlayClock` (never the real system clock) over a base clock that
//! is the host clock with an injected offset and drift ([`skew`]), and reports
//! its state, estimates and exact true error ([`metrics`]). Scheduled actions
//! wait for an instant of the synced clock with [`actuate`].

pub mod actuate;
pub mod metrics;
pub mod service;
pub mod skew;

pub use actuate::{wait_until_synced, wait_until_synced_async, Actuation};
pub use metrics::{Convergence, Metrics, SyncState};
pub use service::{start, RunError, Service, ServiceConfig, StartError, SyncedClock};
pub use skew::{HostClock, Skew, SkewedClock};
