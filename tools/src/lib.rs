//! The `switchyard` tool's library: what its subcommands run, kept apart from the client library so
//! that embedders link none of it.
//!
//! - [`local_cluster`]: a coordinator and workers as child processes on 127.0.0.1.
//! - [`loadtest`]: the load engine (closed and open loop, on a cluster or the reference layer) and
//!   its figures, [`loadtest::LoadSummary`].
//! - [`skew`]: seeded inputs that make experts hot.
//! - [`bench`]: the sweep of cluster shapes, the DeepEP presets, the wire baselines, and their
//!   figures, [`bench::BenchSummary`].
//! - [`device_check`]: this machine's device against the CPU and transformers, and its matmul peak.
//! - [`report`]: rendering the figures, one module per format (text, CSV, Markdown, SVG).

pub mod bench;
pub mod device_check;
pub mod loadtest;
pub mod local_cluster;
pub mod report;
pub mod skew;
