//! What the `switchyard` command's libtorch side runs (`switchyard-torch`): the benchmark and the
//! device check, kept apart from the client library so that embedders link none of it. The load
//! tester, which links no libtorch, is `switchyard-loadtest`.
//!
//! - [`bench`](mod@bench): the sweep of cluster shapes, the DeepEP presets, the wire baselines, and their
//!   figures, [`bench::BenchSummary`].
//! - [`device_check`]: this machine's device against the CPU and transformers, and its matmul peak.
//! - [`report`]: rendering the figures, one module per format (text, CSV, Markdown, SVG).

pub mod bench;
pub mod device_check;
pub mod report;
