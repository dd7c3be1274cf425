//! The `switchyard` tool's library: what its subcommands run, kept apart from the client library so
//! that embedders link none of it.
//!
//! - [`local_cluster`]: a coordinator and workers as child processes on 127.0.0.1.
//! - [`loadtest`]: closed- and open-loop load on a cluster or the reference layer, and its report.
//! - [`skew`]: seeded inputs that make experts hot.
//! - [`bench`]: the sweep of cluster shapes, the DeepEP presets, the wire baselines, reports and charts.

pub mod bench;
pub mod loadtest;
pub mod local_cluster;
pub mod skew;
