//! The bench report folder: `report.md` (the tables), `report.json` (every figure, every point's
//! full load report and ledger), three SVG charts of the sweep and one of the presets on shaped
//! links; `--replot` redraws the charts from the JSON.

use std::path::{Path, PathBuf};

use super::{charts, markdown};
use crate::bench::BenchSummary;

/// The charts a report folder holds.
pub const CHARTS: [(&str, &str); 3] = [
    ("breakdown.svg", "Stacked time breakdown of every point"),
    ("overhead.svg", "Overhead ratio against tokens per call"),
    ("workers.svg", "Throughput against workers"),
];

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {source} (--replot redraws the charts of a folder an earlier `bench --out` wrote)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("drawing {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
}

/// The chart of the presets on shaped links, when there were any.
pub const LINK_CHART: (&str, &str) = ("links.svg", "Dispatch and combine GB/s against link rate");

/// What a failed write of `path` is reported as.
fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError {
    let path = path.to_owned();
    move |source| ReportError::Write { path, source }
}

/// Makes `dir` (if needed) and checks that files can be written in it: called before a bench
/// runs, so that a folder that cannot take the report fails at once, not after the run.
pub fn prepare(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    let probe = dir.join(".switchyard-write-check");
    std::fs::write(&probe, b"").map_err(write_error(&probe))?;
    std::fs::remove_file(&probe).map_err(write_error(&probe))
}

/// Writes the folder `dir` (created if needed); returns the files written.
pub fn write(summary: &BenchSummary, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    let mut written = Vec::new();
    let report = dir.join("report.md");
    std::fs::write(&report, markdown::bench_report(summary)).map_err(write_error(&report))?;
    written.push(report);
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(summary)
        .map_err(|error| ReportError::Json { path: json.clone(), reason: error.to_string() })?;
    std::fs::write(&json, text + "\n").map_err(write_error(&json))?;
    written.push(json);
    written.extend(draw_charts(summary, dir)?);
    Ok(written)
}

/// Draws the charts of `summary` into `dir`: the sweep's when it has points, the links' when a
/// preset ran on shaped links.
fn draw_charts(summary: &BenchSummary, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let chart_error = |path: &Path| {
        let path = path.to_owned();
        move |error: Box<dyn std::error::Error>| ReportError::Chart { path, reason: error.to_string() }
    };
    let mut written = Vec::new();
    if !summary.points.is_empty() {
        let draws: [charts::DrawChart; 3] = [charts::breakdown, charts::overhead, charts::throughput_by_workers];
        for ((file, _), draw) in CHARTS.iter().zip(draws) {
            let path = dir.join(file);
            draw(&summary.points, &path).map_err(chart_error(&path))?;
            written.push(path);
        }
    }
    if summary.presets.iter().any(|preset| preset.link_rate.is_some()) {
        let path = dir.join(LINK_CHART.0);
        charts::link_rates(&summary.presets, &path).map_err(chart_error(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// Redraws the charts of the report folder `dir` from its report.json.
pub fn replot(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read { path: path.clone(), source })?;
    let summary: BenchSummary = serde_json::from_str(&text)
        .map_err(|error| ReportError::Json { path: path.clone(), reason: error.to_string() })?;
    draw_charts(&summary, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replotting_a_folder_without_its_report_says_what_it_could_not_read() {
        let dir = std::env::temp_dir().join(format!("switchyard-replot-{}", std::process::id()));
        let message = replot(&dir).expect_err("no report.json there").to_string();
        assert!(message.starts_with(&format!("reading {}", dir.join("report.json").display())), "{message}");
        assert!(message.contains("bench --out"), "{message}");
    }

    #[test]
    fn a_report_folder_is_made_and_checked_before_the_run() {
        let base = std::env::temp_dir().join(format!("switchyard-prepare-{}", std::process::id()));
        let nested = base.join("a").join("b");
        prepare(&nested).expect("made");
        assert!(nested.is_dir());
        assert_eq!(std::fs::read_dir(&nested).expect("listed").count(), 0, "the check leaves nothing behind");
        let file = base.join("a-file");
        std::fs::write(&file, "").expect("written");
        let error = prepare(&file).expect_err("a file is no folder").to_string();
        assert!(error.contains(&file.display().to_string()), "{error}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
