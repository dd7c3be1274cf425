//! The report's SVG charts, drawn with `plotters`: the stacked time breakdown of every point, the
//! overhead ratio against tokens per call, and throughput against the number of workers.

use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::bench::{PointSummary, PresetSummary};
use switchyard_router_client::timing::TimeBreakdown;

pub type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Draws one chart of the points into an SVG file.
pub type DrawChart = fn(&[PointSummary], &Path) -> ChartResult;

/// One color per phase of [`TimeBreakdown::PHASES`], and per line.
const PALETTE: [RGBColor; 16] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x1b, 0x1b, 0x1b),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x2c, 0x5f, 0x2d),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x6a, 0x3d, 0x9a),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x99, 0x99, 0x99),
];

/// A short label of a point: what differs between points.
pub fn point_label(result: &PointSummary) -> String {
    let shape = result.point.shape;
    format!(
        "{}w {}e k{} {}x{} {}t {}",
        shape.workers,
        shape.experts,
        shape.top_k,
        shape.d_model,
        shape.d_ff,
        result.point.tokens,
        result.point.wire_dtype
    )
}

/// Horizontal bars, one per point (first at the top): each phase's share of the mean call time.
pub fn breakdown(points: &[PointSummary], path: &Path) -> ChartResult {
    let rows = points.len().max(1);
    let height = 110 + 26 * rows as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    // x beyond 100% holds the legend.
    let mut chart = ChartBuilder::on(&root)
        .caption("Where a layer call's time goes (share of mean wall time)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..128.0, -0.5..rows as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("% of wall time")
        .x_label_formatter(&|x| if *x <= 100.0 { format!("{x:.0}") } else { String::new() })
        .draw()?;
    let row_of = |index: usize| (rows - 1 - index) as f64;
    for (phase_index, name) in TimeBreakdown::PHASES.iter().enumerate() {
        let color = PALETTE[phase_index % PALETTE.len()];
        let bars = points.iter().enumerate().map(|(index, result)| {
            let shares = result.phase_shares.values();
            let start: f64 = shares[..phase_index].iter().sum::<f64>() * 100.0;
            let end = start + shares[phase_index] * 100.0;
            let row = row_of(index);
            Rectangle::new([(start, row - 0.35), (end, row + 0.35)], color.filled())
        });
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()?;
    // Point labels left of their bars, in pixels (the mesh would only label "nice" y values).
    let label_style = ("sans-serif", 13).into_font().into_text_style(&root).pos(Pos::new(HPos::Right, VPos::Center));
    for (index, result) in points.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, row_of(index)));
        root.draw(&Text::new(point_label(result), (x - 8, y), label_style.clone()))?;
    }
    root.present()?;
    Ok(())
}

/// A line chart of `series` (name, points), with a log-scaled x when `log_x`.
fn lines(
    path: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> ChartResult {
    // The right part of the canvas holds the legend, clear of the lines.
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(760);
    if series.is_empty() {
        // Say why the chart is blank rather than draw empty axes.
        plot.draw(&Text::new(caption.to_owned(), (60, 30), ("sans-serif", 18).into_font()))?;
        plot.draw(&Text::new(
            "no series with two or more points in this run (vary the axis to fill it)".to_owned(),
            (60, 260),
            ("sans-serif", 15).into_font(),
        ))?;
        root.present()?;
        return Ok(());
    }
    let all = series.iter().flat_map(|(_, points)| points.iter());
    let (x_min, x_max, y_max) =
        all.fold((f64::MAX, f64::MIN, 0.0f64), |(lo, hi, top), (x, y)| (lo.min(*x), hi.max(*x), top.max(*y)));
    let (x_min, x_max) = if x_min <= x_max { (x_min, x_max.max(x_min * 1.01 + 1e-9)) } else { (1.0, 2.0) };
    let y_range = 0.0..(y_max * 1.15).max(1e-9);
    let mut builder = ChartBuilder::on(&plot);
    builder.caption(caption, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(60);
    if log_x {
        let mut chart = builder.build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), y_range)?;
        draw_lines(&mut chart, series, x_desc, y_desc)?;
    } else {
        let mut chart = builder.build_cartesian_2d(x_min - 0.5..x_max + 0.5, y_range)?;
        draw_lines(&mut chart, series, x_desc, y_desc)?;
    }
    let text = ("sans-serif", 13).into_font();
    for (index, (name, _)) in series.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let y = 60 + 22 * index as i32;
        legend.draw(&PathElement::new(vec![(10, y), (34, y)], color.stroke_width(3)))?;
        legend.draw(&Text::new(name.clone(), (42, y - 7), text.clone()))?;
    }
    root.present()?;
    Ok(())
}

fn draw_lines<'a, 'b: 'a, X>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, RangedCoordf64>>,
    series: &[(String, Vec<(f64, f64)>)],
    x_desc: &str,
    y_desc: &str,
) -> ChartResult
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        // Workers and tokens are whole numbers: no label between them.
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&|y| if y.abs() >= 100.0 { format!("{y:.0}") } else { format!("{y:.2}") })
        .draw()?;
    for (index, (_, points)) in series.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        chart.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|point| Circle::new(*point, 4, color.filled())))?;
    }
    Ok(())
}

/// The points of series `name`, created empty on first use.
fn series_entry(series: &mut Vec<(String, Vec<(f64, f64)>)>, name: String) -> &mut Vec<(f64, f64)> {
    let index = match series.iter().position(|(existing, _)| *existing == name) {
        Some(index) => index,
        None => {
            series.push((name, Vec::new()));
            series.len() - 1
        }
    };
    &mut series[index].1
}

/// Dispatch's and combine's GB/s on the busiest link against the link's rate, one line each per
/// DeepEP preset, beside the line rate itself.
pub fn link_rates(presets: &[PresetSummary], path: &Path) -> ChartResult {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for preset in presets {
        let (Some(rate), Some((dispatch, combine))) = (preset.link_rate, preset.floor_ratios()) else {
            continue;
        };
        let gbit = rate.bits_per_second() as f64 / 1e9;
        let line_gb_per_s = rate.bytes_per_second() / 1e9;
        series_entry(&mut series, "line rate".to_owned()).push((gbit, line_gb_per_s));
        series_entry(&mut series, format!("{} dispatch", preset.preset)).push((gbit, line_gb_per_s / dispatch));
        series_entry(&mut series, format!("{} combine", preset.preset)).push((gbit, line_gb_per_s / combine));
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup_by(|a, b| a.0 == b.0);
    }
    series.retain(|(_, points)| points.len() > 1);
    lines(path, "Transfer GB/s on the busiest link against its rate", ("link Gbit/s", "GB/s"), &series, true)
}

/// Overhead ratio (distributed ÷ in-process) against tokens per call: one line per cluster shape
/// and wire dtype.
pub fn overhead(points: &[PointSummary], path: &Path) -> ChartResult {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for result in points {
        let Some(ratio) = result.overhead_ratio else { continue };
        let name = format!("{}, {}", result.point.shape, result.point.wire_dtype);
        series_entry(&mut series, name).push((result.point.tokens as f64, ratio));
    }
    series.retain(|(_, points)| points.len() > 1);
    lines(path, "Distributed over in-process time per call", ("tokens per call", "overhead ratio (x)"), &series, true)
}

/// Tokens per second against workers, for the points that differ from the base only in workers:
/// one line per tokens-per-call and wire dtype.
pub fn throughput_by_workers(points: &[PointSummary], path: &Path) -> ChartResult {
    let Some(base) = points.first().map(|result| result.point.shape) else { return Ok(()) };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for result in points {
        let shape = result.point.shape;
        if (shape.experts, shape.top_k, shape.d_model, shape.d_ff)
            != (base.experts, base.top_k, base.d_model, base.d_ff)
        {
            continue;
        }
        let name = format!("{} tokens/call, {}", result.point.tokens, result.point.wire_dtype);
        series_entry(&mut series, name).push((shape.workers as f64, result.distributed.tokens_per_s));
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series.retain(|(_, points)| points.len() > 1);
    lines(path, "Throughput against expert workers (closed loop)", ("workers", "tokens/s"), &series, false)
}
