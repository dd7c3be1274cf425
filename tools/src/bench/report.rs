//! The bench report folder: `report.md` (the tables), `report.json` (every figure, every point's
//! full load report and ledger), and three SVG charts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::charts::ChartPoint;
use super::{BenchReport, PointResult, PresetResult, charts};
use switchyard_router_client::ledger::CommLedger;
use switchyard_router_client::timing::TimeBreakdown;

/// The files a report folder holds.
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
pub fn write(report: &BenchReport, command: &str, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let markdown = dir.join("report.md");
    std::fs::write(&markdown, render_markdown(report, command)).map_err(io(&markdown))?;
    written.push(markdown);
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(&to_json(report, command)).unwrap_or_default() + "\n";
    std::fs::write(&json, text).map_err(io(&json))?;
    written.push(json);
    let points: Vec<ChartPoint> = report.points.iter().map(ChartPoint::from).collect();
    written.extend(draw_charts(&points, dir)?);
    Ok(written)
}

/// Draws the charts of `points` into `dir`; none without points.
fn draw_charts(points: &[ChartPoint], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
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
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| ReportError::Json { path: path.clone(), reason: error.to_string() })?;
    let points = json["points"]
        .as_array()
        .map(|points| points.iter().map(ChartPoint::from_json).collect::<Option<Vec<_>>>())
        .unwrap_or_default()
        .ok_or_else(|| ReportError::Json { path: path.clone(), reason: "a point lacks a charted field".into() })?;
    draw_charts(&points, dir)
}

pub fn to_json(report: &BenchReport, command: &str) -> serde_json::Value {
    serde_json::json!({
        "command": command,
        "machine": report.machine,
        "settings": report.settings_summary,
        "points": report.points.iter().map(PointResult::to_json).collect::<Vec<_>>(),
        "presets": report.presets.iter().map(PresetResult::to_json).collect::<Vec<_>>(),
    })
}

fn optional(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "–".to_owned(), format)
}

/// The sweep table: one row per point.
pub fn sweep_table(points: &[PointResult]) -> String {
    let mut text = String::new();
    let phases = TimeBreakdown::PHASES.join(" / ");
    let _ = writeln!(
        text,
        "| workers | experts | top-k | d_model x d_ff | tokens | wire | distributed ms | in-process ms | overhead | tokens/s | B/token payload | B/token socket | % {phases} | expert GFLOP/s distributed / in-process | output error |"
    );
    let _ = writeln!(text, "|{}", " ---: |".repeat(15));
    for result in points {
        let shape = result.point.shape;
        let (payload, _, socket) = result.bytes_per_token();
        let shares: Vec<String> = result.phase_shares().iter().map(|share| format!("{:.0}", share * 100.0)).collect();
        let gflops = format!(
            "{} / {}",
            optional(result.distributed_gflops(), |g| format!("{g:.1}")),
            optional(result.reference_gflops(), |g| format!("{g:.1}"))
        );
        let _ = writeln!(
            text,
            "| {} | {} | {} | {}x{} | {} | {} | {:.2} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            shape.workers,
            shape.experts,
            shape.top_k,
            shape.d_model,
            shape.d_ff,
            result.point.tokens,
            result.point.wire_dtype.name(),
            result.distributed_ms(),
            optional(result.reference_ms(), |ms| format!("{ms:.2}")),
            optional(result.overhead_ratio(), |ratio| format!("{ratio:.2}x")),
            result.distributed.tokens_per_second(),
            payload,
            socket,
            shares.join(" / "),
            gflops,
            optional(result.wire_error, |error| format!("{error:.1e}")),
        );
    }
    text
}

/// The DeepEP table: dispatch and combine beside the wire's limits.
pub fn preset_table(presets: &[PresetResult]) -> String {
    let mut text = String::new();
    text.push_str("| preset | tokens | workers | dispatch MB/call | dispatch µs | dispatch GB/s | combine µs | combine GB/s | dispatch incl. encode µs | combine incl. decode + sum µs | request MB | TCP one-way GB/s | TCP echo µs | gRPC one-way GB/s | gRPC echo µs |\n");
    text.push_str(&format!("|{}\n", " ---: |".repeat(15)));
    for preset in presets {
        let report = &preset.result.distributed;
        let [(dispatch_us, dispatch_gbps), (combine_us, combine_gbps)] = preset.transfers();
        let (dispatch_all, combine_all) = preset.end_to_end_us();
        let baselines = &preset.baselines;
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} |",
            preset.name,
            preset.result.point.tokens,
            preset.result.point.shape.workers,
            report.bytes_total.payload_sent as f64 / report.calls.max(1) as f64 / 1e6,
            dispatch_us,
            dispatch_gbps,
            combine_us,
            combine_gbps,
            dispatch_all,
            combine_all,
            baselines.grpc_echo.bytes as f64 / 1e6,
            baselines.tcp_one_way.gb_per_s,
            baselines.tcp_echo.mean_us,
            baselines.grpc_one_way.gb_per_s,
            baselines.grpc_echo.mean_us,
        );
    }
    text
}

/// A ledger as a Markdown table: per (layer → worker), means per call.
pub fn ledger_table(ledger: &CommLedger) -> String {
    let mut text = String::from(
        "| layer → worker | rows | payload B sent / received | message B sent / received | socket B sent / received | encode µs | dispatch µs | queue µs | compute µs | combine-transfer µs | decode µs | combine µs | straggler in |\n",
    );
    text.push_str(&format!("| --- |{}\n", " ---: |".repeat(12)));
    for ((layer, endpoint), pair) in &ledger.pairs {
        let mean = pair.per_call();
        let _ = writeln!(
            text,
            "| {layer} → {endpoint} | {:.0} | {} / {} | {} / {} | {} / {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} of {} calls (by {:.0} µs) |",
            mean.rows,
            mean.payload_sent,
            mean.payload_received,
            mean.message_sent,
            mean.message_received,
            mean.socket_sent,
            mean.socket_received,
            mean.encode_us,
            mean.dispatch_us,
            mean.queue_wait_us,
            mean.compute_us,
            mean.combine_transfer_us,
            mean.decode_us,
            mean.combine_us,
            pair.straggler_calls,
            pair.calls,
            mean.straggler_margin_us,
        );
    }
    text
}

pub fn render_markdown(report: &BenchReport, command: &str) -> String {
    let mut text = String::from("# Switchyard bench report\n\n");
    let _ = writeln!(text, "Command: `{command}`\n\nMachine: {}\n", report.machine);
    let _ = writeln!(text, "Settings: `{}`\n", report.settings_summary);
    if !report.points.is_empty() {
        text.push_str("## Sweep\n\n");
        text.push_str(
            "Each point ran through a local cluster (distributed) and, in the same run, through the in-process \
             reference layer on the same inputs. Overhead = distributed ÷ in-process mean time per call. \
             Bytes per token count both directions. Phase shares are of the mean wall time (they add up to it). \
             GFLOP/s is expert FLOPs over expert compute time. Output error is the relative Frobenius distance \
             of one distributed call from the reference (it shows what the wire dtype costs).\n\n",
        );
        text.push_str(&sweep_table(&report.points));
        text.push('\n');
        for (file, title) in CHARTS {
            let _ = writeln!(text, "![{title}]({file})\n");
        }
        if let Some(base) = report.points.first() {
            let _ =
                writeln!(text, "### Ledger of the first point ({})\n", charts::point_label(&ChartPoint::from(base)));
            text.push_str(&ledger_table(&base.distributed.ledger));
            text.push('\n');
        }
    }
    if !report.presets.is_empty() {
        text.push_str("## DeepEP settings: dispatch and combine alone\n\n");
        text.push_str(
            "Identity experts (no compute, the same bytes back), hidden 7168, top-8 of 256 experts, bf16 both ways \
             (DeepEP dispatches FP8 and combines BF16), capacity large enough that nothing drops. Dispatch is the \
             slowest worker's request transfer per call (client send → worker handler), combine the way back \
             (worker reply → client has the answer); GB/s is the call's payload in that direction over that time. \
             The baselines move one request's payload over TCP and a plain gRPC echo on this machine's loopback, \
             in the same run.\n\n",
        );
        text.push_str(&preset_table(&report.presets));
        text.push('\n');
        for preset in &report.presets {
            let _ = writeln!(text, "### Ledger: {}\n", preset.name);
            text.push_str(&ledger_table(&preset.result.distributed.ledger));
            text.push('\n');
        }
    }
    text
}
