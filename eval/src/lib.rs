//! Evaluations of stasis on real VMs. Each run writes its raw measurements
//! (JSON, CSV), a Markdown report with PNG plots, and prints its figures.

/// Statistics: order statistics, TOST, KS, Anderson–Darling, bootstrap CIs, curve gaps (I/O-free, unit-tested).
pub mod stats;
/// The console tailer and the `stasis` CLI driver: real experiments.
pub mod run;
/// The time eval: clock steps, inter-VM skew and CPU allocation across checkpoints.
pub mod time;
/// The iperf3 transparency eval: parsing, per-run metrics, arm comparisons (I/O-free).
pub mod iperf;
/// PNG line plots (plotters, bitmap backend, no text).
pub mod plot;
/// The BitTorrent eval: spec, per-leecher records, curves, comparisons.
pub mod bt;
/// The flagship demo: the Mandelbrot job's image, PNG and time lost (I/O-free).
pub mod demo;
/// The freeze-instant skew benchmark: PTP agents in network namespaces, the real protocol, QEMU stops.
pub mod skew;
/// The store eval: dedup ratios and commit/restore throughput on real VM state.
pub mod store;
/// Guest-visible downtime of live versus stop-and-copy checkpoints.
pub mod downtime;
