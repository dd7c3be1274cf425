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

/// A line of a chart: its name and its (x, y) points.
type Series = (String, Vec<(f64, f64)>);

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
fn lines(path: &Path, caption: &str, (x_desc, y_desc): (&str, &str), series: &[Series], log_x: bool) -> ChartResult {
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
    series: &[Series],
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
fn series_entry(series: &mut Vec<Series>, name: String) -> &mut Vec<(f64, f64)> {
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
    let series = link_rate_series(presets);
    lines(path, "Transfer GB/s on the busiest link against its rate", ("link Gbit/s", "GB/s"), &series, true)
}

/// [`link_rates`]' lines: each over the rates a preset ran at (once each, ascending), the line
/// rate first; a preset measured on one rate alone draws none.
fn link_rate_series(presets: &[PresetSummary]) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
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
    series
}

/// Overhead ratio (distributed ÷ in-process) against tokens per call: one line per cluster shape
/// and wire dtype.
pub fn overhead(points: &[PointSummary], path: &Path) -> ChartResult {
    let series = overhead_series(points);
    lines(path, "Distributed over in-process time per call", ("tokens per call", "overhead ratio (x)"), &series, true)
}

/// [`overhead`]'s lines, of the points measured both ways; a line of one point is left out.
fn overhead_series(points: &[PointSummary]) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for result in points {
        let Some(ratio) = result.overhead_ratio else { continue };
        let name = format!("{}, {}", result.point.shape, result.point.wire_dtype);
        series_entry(&mut series, name).push((result.point.tokens as f64, ratio));
    }
    series.retain(|(_, points)| points.len() > 1);
    series
}

/// Tokens per second against workers, for the points that differ from the base only in workers:
/// one line per tokens-per-call and wire dtype.
pub fn throughput_by_workers(points: &[PointSummary], path: &Path) -> ChartResult {
    let Some(series) = throughput_series(points) else { return Ok(()) };
    lines(path, "Throughput against expert workers (closed loop)", ("workers", "tokens/s"), &series, false)
}

/// [`throughput_by_workers`]' lines, by workers ascending; `None` without points (no base).
fn throughput_series(points: &[PointSummary]) -> Option<Vec<Series>> {
    let base = points.first()?.point.shape;
    let mut series: Vec<Series> = Vec::new();
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
    Some(series)
}

#[cfg(test)]
mod tests {
    use switchyard_loadtest::shaped_network::LinkRate;
    use switchyard_proto::wire::WireDtype;

    use super::*;
    use crate::bench::plan::{ClusterShape, Point};
    use crate::bench::results::tests::{close, point, preset};

    /// The fixture point's summary, moved to `workers` and `experts`, `tokens` of `wire_dtype`.
    fn at(workers: usize, experts: u32, tokens: usize, wire_dtype: WireDtype) -> PointSummary {
        let mut summary = point().summary();
        let shape = ClusterShape { workers, experts, ..summary.point.shape };
        summary.point = Point { shape, tokens, wire_dtype };
        summary
    }

    fn names(series: &[Series]) -> Vec<&str> {
        series.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[test]
    fn a_points_label_names_what_differs_between_points() {
        assert_eq!(point_label(&at(3, 16, 64, WireDtype::Bf16)), "3w 16e k2 4x8 64t bf16");
    }

    #[test]
    fn the_overhead_chart_draws_a_line_per_shape_and_dtype_over_tokens() {
        let with_ratio =
            |workers, tokens, dtype, ratio| PointSummary { overhead_ratio: ratio, ..at(workers, 8, tokens, dtype) };
        let points = [
            with_ratio(2, 1, WireDtype::F32, Some(1.5)),
            with_ratio(2, 1, WireDtype::Bf16, Some(1.4)),
            with_ratio(2, 16, WireDtype::F32, Some(0.9)),
            with_ratio(2, 16, WireDtype::Bf16, None),
            with_ratio(1, 1, WireDtype::F32, Some(1.2)),
        ];
        let series = overhead_series(&points);
        let shape = points[0].point.shape;
        assert_eq!(names(&series), [format!("{shape}, f32")], "bf16 and 1 worker have one measured point each");
        assert_eq!(series[0].1, [(1.0, 1.5), (16.0, 0.9)]);
    }

    #[test]
    fn the_throughput_chart_varies_workers_alone_around_the_first_shape() {
        let with_rate = |workers, experts, tokens, rate| {
            let mut summary = at(workers, experts, tokens, WireDtype::F32);
            summary.distributed.tokens_per_s = rate;
            summary
        };
        let points = [
            with_rate(2, 8, 16, 200.0),
            with_rate(2, 8, 64, 500.0),
            with_rate(3, 8, 16, 260.0),
            with_rate(1, 8, 16, 120.0),
            with_rate(1, 8, 64, 300.0),
            with_rate(1, 16, 16, 999.0),
            with_rate(2, 8, 256, 900.0),
        ];
        let series = throughput_series(&points).expect("a base");
        assert_eq!(
            names(&series),
            ["16 tokens/call, f32", "64 tokens/call, f32"],
            "256 tokens on one worker count: no line"
        );
        assert_eq!(series[0].1, [(1.0, 120.0), (2.0, 200.0), (3.0, 260.0)], "16 experts is another shape");
        assert_eq!(series[1].1, [(1.0, 300.0), (2.0, 500.0)]);
        assert!(throughput_series(&[]).is_none());
    }

    #[test]
    fn the_link_chart_draws_each_presets_rates_beside_the_line_rate() {
        let on = |name: &str, megabit: u64| {
            let mut summary = preset().summary();
            summary.preset = name.to_owned();
            summary.link_rate = Some(LinkRate::from_bits_per_second(megabit * 1_000_000));
            summary
        };
        let (dispatch, combine) = on("low-latency", 8).floor_ratios().expect("floors on a link");
        let presets = [on("low-latency", 80), on("low-latency", 8), on("low-latency", 8), on("normal", 8)];
        let series = link_rate_series(&presets);
        assert_eq!(
            names(&series),
            ["line rate", "low-latency dispatch", "low-latency combine"],
            "normal ran on one rate"
        );
        assert_eq!(series[0].1, [(0.008, 0.001), (0.08, 0.01)], "once a rate, ascending");
        let [(_, slow), (_, fast)] = series[1].1[..] else { panic!("two rates: {series:?}") };
        assert!(close(slow, 0.001 / dispatch) && close(fast, 0.01 / dispatch), "{series:?}");
        assert!(close(series[2].1[1].1, 0.01 / combine), "{series:?}");
        let on_loopback = PresetSummary { link_rate: None, ..on("loopback", 8) };
        assert!(link_rate_series(&[on_loopback.clone(), on_loopback]).is_empty());
    }

    #[test]
    fn a_chart_names_its_lines_or_says_why_it_has_none() {
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("overhead.svg");
        let points = [at(2, 8, 1, WireDtype::F32), at(2, 8, 16, WireDtype::F32)];
        overhead(&points, &path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg") && svg.contains(&format!("{}, f32", points[0].point.shape)), "{svg}");
        assert!(!svg.contains("no series"), "{svg}");

        overhead(&points[..1], &path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.contains("no series with two or more points in this run"), "{svg}");
    }
}
