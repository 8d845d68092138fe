//! Evaluations of stasis on real VMs. Each run writes its raw measurements
//! (JSON, CSV), a Markdown report with PNG plots, and prints its figures.

/// Order statistics: percentiles, medians, IQR (I/O-free, unit-tested).
pub mod stats;
/// The console tailer and the `stasis` CLI driver: real experiments.
pub mod run;
/// The time eval: clock steps, inter-VM skew and CPU allocation across checkpoints.
pub mod time;
/// PNG line plots (plotters, bitmap backend, no text).
pub mod plot;
/// Guest-visible downtime of live versus stop-and-copy checkpoints.
pub mod downtime;
