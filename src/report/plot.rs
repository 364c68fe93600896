//! One chart of the report as an SVG string, drawn by plotters' SVG backend: a line per
//! series, the metric on y and the step (or round) on x. The legend is the page's (HTML beside
//! the SVG), so that the SVG holds exactly one line per series.

use plotters::prelude::*;
use rudder_engine::report::Chart;

/// Size of one chart in pixels.
pub const WIDTH: u32 = 420;
pub const HEIGHT: u32 = 260;

/// Categorical colours (Tableau 10), cycled: never black or grey, which the axes and grid use.
pub const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#393b79",
];

/// Draws `chart` with the series coloured by `colors` (hex `#rrggbb`, one per series).
pub fn svg(chart: &Chart, colors: &[&str]) -> Result<String, String> {
    let mut out = String::new();
    draw(chart, colors, &mut out).map_err(|e| format!("drawing {}: {e}", chart.metric))?;
    Ok(out)
}

fn draw(
    chart: &Chart,
    colors: &[&str],
    out: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (x, y) = ranges(points.copied());
    // Few logged x values (rounds, a short run): no ticks between them.
    let mut xs: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let x_ticks = xs.len().clamp(2, 6);
    let mut ctx = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)?;
    ctx.configure_mesh()
        .x_desc(chart.x.as_str())
        .y_desc(chart.metric.as_str())
        .x_labels(x_ticks)
        .y_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    for (series, color) in chart.series.iter().zip(colors) {
        let color = rgb(color);
        ctx.draw_series(LineSeries::new(
            series.points.iter().copied(),
            color.stroke_width(2),
        ))?;
        // A line through one point is invisible: mark it.
        if let [only] = series.points.as_slice() {
            ctx.draw_series(std::iter::once(Circle::new(*only, 3, color.filled())))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The axes' ranges: every point with a little room; a flat or single value gets room around it.
fn ranges(
    points: impl Iterator<Item = (f64, f64)>,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..1.0);
    }
    let pad = |lo: f64, hi: f64, fraction: f64| {
        let span = hi - lo;
        if span > 0.0 {
            (lo - span * fraction, hi + span * fraction)
        } else {
            let room = (lo.abs() * 0.1).max(1e-3);
            (lo - room, hi + room)
        }
    };
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { pad(x0, x1, 0.0) };
    let (y0, y1) = pad(y0, y1, 0.05);
    (x0..x1, y0..y1)
}

/// A tick label: short, in scientific notation for very small or large values.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn rgb(hex: &str) -> RGBColor {
    let value = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap_or(0);
    RGBColor((value >> 16) as u8, (value >> 8) as u8, value as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_engine::report::Series;

    #[test]
    fn a_chart_has_one_line_per_series_and_its_axis_labels() {
        let chart = Chart {
            group: "dpo".into(),
            metric: "rewards/margins".into(),
            x: "step".into(),
            series: vec![
                Series {
                    node: "sigmoid".into(),
                    points: vec![(1.0, 0.1), (2.0, 0.3), (3.0, 0.2)],
                },
                Series {
                    node: "ipo".into(),
                    points: vec![(1.0, 0.05)],
                },
            ],
        };
        let svg = svg(&chart, &PALETTE[..2]).unwrap();
        let lines_of = |color: &str| {
            svg.match_indices("<polyline")
                .filter(|(at, _)| {
                    let tag = &svg[*at..at + svg[*at..].find("/>").unwrap()];
                    tag.to_lowercase().contains(&format!("stroke=\"{color}\""))
                })
                .count()
        };
        assert_eq!(lines_of(PALETTE[0]), 1);
        assert_eq!(lines_of(PALETTE[1]), 1);
        assert!(svg.contains(">\nrewards/margins\n</text>"), "{svg}");
        assert!(svg.contains(">\nstep\n</text>"));
        assert!(svg.contains("<circle"), "a single point is marked");
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2e-5), "2.0e-5");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(120.0), "120");
        assert_eq!(tick(-1.23456), "-1.2346");
        assert_eq!(tick(250_000.0), "2.5e5");
    }

    #[test]
    fn flat_and_empty_data_still_have_ranges() {
        let (x, y) = ranges([(5.0, 2.0)].into_iter());
        assert!(x.start < 5.0 && x.end > 5.0 && y.start < 2.0 && y.end > 2.0);
        let (x, y) = ranges(std::iter::empty());
        assert_eq!((x, y), (0.0..1.0, 0.0..1.0));
    }
}
