//! The load tester behind `switchyard loadtest` and `switchyard local`, apart from the benchmark and
//! everything else that links libtorch, so that the `switchyard` binary starts in milliseconds.
//!
//! - [`local_cluster`]: a coordinator and workers as child processes on 127.0.0.1.
//! - [`loadtest`]: the load engine (closed and open loop, on a cluster or an in-process layer) and
//!   its figures, [`loadtest::LoadSummary`].
//! - [`skew`]: seeded inputs that make experts hot.
//! - [`report`]: a load test's figures as terminal text and CSV rows.

pub mod loadtest;
pub mod local_cluster;
pub mod report;
pub mod shaped_network;
pub mod skew;
