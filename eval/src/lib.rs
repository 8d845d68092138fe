//! Evaluations of stasis on real VMs. Each run writes its raw measurements
//! (JSON, CSV), a Markdown report with PNG plots, and prints its figures.

/// The BitTorrent eval: spec, per-leecher records, curves, comparisons.
pub mod bt;
/// The CPU-allocation eval: work per guest second around events, per-run ratios, comparisons (I/O-free).
pub mod cpu;
/// The flagship demo: the Mandelbrot job's image, PNG and time lost (I/O-free).
pub mod demo;
/// Guest-visible downtime of live versus stop-and-copy checkpoints.
pub mod downtime;
/// The iperf3 transparency eval: parsing, per-run metrics, arm comparisons (I/O-free).
pub mod iperf;
/// PNG line plots (plotters, bitmap backend, no text).
pub mod plot;
/// The console tailer and the `stasis` CLI driver: real experiments.
pub mod run;
/// The freeze-instant skew benchmark: PTP agents in network namespaces, the real protocol, QEMU stops.
pub mod skew;
/// Statistics: order statistics, TOST, KS, Anderson–Darling, bootstrap CIs, curve gaps (I/O-free, unit-tested).
pub mod stats;
/// The store eval: dedup ratios and commit/restore throughput on real VM state.
pub mod store;
/// The time eval: clock steps, inter-VM skew and CPU allocation across checkpoints.
pub mod time;
