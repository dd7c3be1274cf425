//! Rendering, one module per format, each from the summaries
//! ([`switchyard_loadtest::loadtest::LoadSummary`], [`crate::bench::BenchSummary`]) that hold every
//! figure once:
//!
//! - [`text`]: a load test's report on the terminal (from `switchyard-loadtest`);
//! - [`csv`]: load tests as rows (from `switchyard-loadtest`);
//! - JSON: the summaries themselves, through serde;
//! - [`markdown`]: the bench report's tables;
//! - [`charts`]: the bench report's SVG charts;
//! - [`folder`]: the bench report folder (Markdown, JSON, charts) and redrawing it.

pub mod charts;
pub mod folder;
pub mod markdown;

pub use switchyard_loadtest::report::{LedgerCells, csv, text};
