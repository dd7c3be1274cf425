//! The bench report folder: `report.md` (the tables), `report.json` (every figure, every point's
//! full load report and ledger), and three SVG charts; `--replot` redraws the charts from the JSON.

use std::path::{Path, PathBuf};

use super::{charts, markdown};
use crate::bench::{BenchSummary, PointSummary};

/// The charts a report folder holds.
pub const CHARTS: [(&str, &str); 3] = [
    ("breakdown.svg", "Stacked time breakdown of every point"),
    ("overhead.svg", "Overhead ratio against tokens per call"),
    ("workers.svg", "Throughput against workers"),
];

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("drawing {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
}

/// Writes the folder `dir` (created if needed); returns the files written.
pub fn write(summary: &BenchSummary, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let report = dir.join("report.md");
    std::fs::write(&report, markdown::bench_report(summary)).map_err(io(&report))?;
    written.push(report);
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(summary)
        .map_err(|error| ReportError::Json { path: json.clone(), reason: error.to_string() })?;
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    written.push(json);
    written.extend(draw_charts(&summary.points, dir)?);
    Ok(written)
}

/// Draws the charts of `points` into `dir`; none without points.
fn draw_charts(points: &[PointSummary], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if points.is_empty() {
        return Ok(Vec::new());
    }
    let draws: [charts::DrawChart; 3] = [charts::breakdown, charts::overhead, charts::throughput_by_workers];
    let mut written = Vec::new();
    for ((file, _), draw) in CHARTS.iter().zip(draws) {
        let path = dir.join(file);
        draw(points, &path).map_err(|error| ReportError::Chart { path: path.clone(), reason: error.to_string() })?;
        written.push(path);
    }
    Ok(written)
}

/// Redraws the charts of the report folder `dir` from its report.json.
pub fn replot(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Io { path: path.clone(), source })?;
    let summary: BenchSummary = serde_json::from_str(&text)
        .map_err(|error| ReportError::Json { path: path.clone(), reason: error.to_string() })?;
    draw_charts(&summary.points, dir)
}
