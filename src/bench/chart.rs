//! The comparison chart: a self-contained SVG (no fonts, images or scripts to fetch) drawn
//! with `plotters` (SVG backend only, no system font libraries), two panels against the
//! concurrency level -- verified req/s, and p99 latency on a log scale -- one line per
//! model, and a legend.
//!
//! Why `plotters` rather than SVG written by hand: it gives true log-scale positions, round
//! tick values and the mesh for free, which the hand-written chart got wrong (levels 1, 16,
//! 128 evenly spaced without saying so, y ticks at 29k, 57k, 86k).
//!
//! The x axis is logarithmic, ticks at the levels measured, for connection counts (1, 16,
//! 128, 1024 lie at their true distances); linear for the idle counts of c10k, which start
//! at 0. A point where some connections got no answer at all (*starved*: the design served
//! fewer clients at once) is drawn hollow on a faded, dashed line, and the legend says why:
//! its latency covers only the clients it served, so a low p99 there is no win.

use crate::bench::compare::{Comparison, Point, Scenario};
use crate::bench::proto::BenchService;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

const W: u32 = 1100;
const H: u32 = 500;
/// Width of each panel; the legend takes what is left on the right.
const PANEL_W: u32 = 450;

const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// How much a starved point and the segments touching it keep of their colour.
const STARVED_OPACITY: f64 = 0.35;

/// One model's points in a panel: (x, value, starved).
struct Line {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64, bool)>,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A number for an axis label: 25k, 1.5M, 0.01.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        trim(format!("{:.1}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        trim(format!("{v:.1}"))
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn trim(s: String) -> String {
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Render `c` as an SVG document.
///
/// # Errors
/// A drawing error from `plotters` (none is expected with an in-memory backend).
pub fn render(c: &Comparison) -> anyhow::Result<String> {
    let mut svg = String::new();
    draw(c, &mut svg).map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    Ok(svg)
}

fn draw(c: &Comparison, svg: &mut String) -> DrawResult<()> {
    let by_idle = c.scenario == Scenario::C10k;
    let x_of = |p: &Point| (if by_idle { p.idle } else { p.connections }) as f64;
    let mut xs: Vec<f64> = c.points.iter().map(x_of).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut models: Vec<&str> = Vec::new();
    for p in &c.points {
        if !models.contains(&p.model.as_str()) {
            models.push(&p.model);
        }
    }
    let lines = |value: &dyn Fn(&Point) -> f64| -> Vec<Line> {
        models
            .iter()
            .enumerate()
            .map(|(i, m)| Line {
                name: m.to_string(),
                color: COLORS[i % COLORS.len()],
                points: c
                    .points
                    .iter()
                    .filter(|p| p.model == *m)
                    .map(|p| (x_of(p), value(p), p.starved > 0))
                    .collect(),
            })
            .collect()
    };
    let throughput = lines(&|p| p.req_per_s);
    // A point with no answer has no latency: it cannot sit on a log scale.
    let mut p99 = lines(&|p| p.p99_us as f64 / 1000.0);
    for l in &mut p99 {
        l.points.retain(|p| p.1 > 0.0);
    }

    let root = SVGBackend::with_string(svg, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &title(c),
            ("sans-serif", 17).into_font().style(FontStyle::Bold),
        )
        .map_err(err)?;
    let (panels, bottom) = root.split_vertically(H - 70);
    let (left, rest) = panels.split_horizontally(PANEL_W);
    let (middle, legend_area) = rest.split_horizontally(PANEL_W + 20);
    let xlabel = if by_idle {
        "idle connections beside 16 active ones"
    } else {
        "connections (log scale)"
    };

    let max_rps = throughput
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let rps_range = 0.0..if max_rps > 0.0 { max_rps * 1.1 } else { 1.0 };
    let (lat_lo, lat_hi) = decades(p99.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    // A little beyond the decades, so their ticks fall inside and are labelled.
    let lat_range = (lat_lo * 0.9..lat_hi * 1.1).log_scale();
    let rps_title = "verified requests per second";
    let lat_title = "p99 latency (ms, log scale)";
    let x_max = xs.last().copied().unwrap_or(1.0);
    if by_idle {
        // Linear (the idle counts start at 0), with round ticks.
        let x = || -x_max.max(1.0) * 0.05..x_max.max(1.0) * 1.05;
        panel(&left, rps_title, xlabel, x(), rps_range, &throughput)?;
        panel(&middle, lat_title, xlabel, x(), lat_range, &p99)?;
    } else {
        let x_min = xs.first().copied().unwrap_or(1.0).max(1.0);
        let x = || {
            ((x_min / 1.6)..(x_max.max(1.0) * 1.6))
                .log_scale()
                .with_key_points(xs.clone())
        };
        panel(&left, rps_title, xlabel, x(), rps_range, &throughput)?;
        panel(&middle, lat_title, xlabel, x(), lat_range, &p99)?;
    }
    legend(&legend_area, &throughput)?;
    if c.points.iter().any(|p| p.starved > 0) {
        let note = ("sans-serif", 12).into_font();
        for (i, text) in [
            "Hollow points on faded dashed lines: some connections got no answer at all (starved) -- the design",
            "served fewer clients at once. Their latency covers only the clients that were served: not a win.",
        ]
        .iter()
        .enumerate()
        {
            bottom
                .draw(&Text::new(*text, (60, 8 + 16 * i as i32), note.clone()))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

fn title(c: &Comparison) -> String {
    match c.scenario {
        Scenario::Levels if c.service == BenchService::Http => format!(
            "socklab bench --compare: http GET {}, {:.0} s per point",
            c.path, c.seconds_per_point
        ),
        Scenario::Levels => format!(
            "socklab bench --compare: {} {} B, {:.0} s per point",
            c.service, c.size, c.seconds_per_point
        ),
        Scenario::Stevens => format!(
            "Stevens ch. 30: {} {} B, a connection per request, {:.0} s per point",
            c.service, c.size, c.seconds_per_point
        ),
        Scenario::C10k => format!(
            "C10K: {} {} B, 16 active connections beside idle ones, {:.0} s per point",
            c.service, c.size, c.seconds_per_point
        ),
    }
}

/// The whole decades around `values` (positive), for a log axis: 0.04..30 gives 0.01..100.
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.01, 1.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    (lo, if hi <= lo { lo * 10.0 } else { hi })
}

/// One panel: mesh, axes with round labels, and each model's line.
fn panel<X, Y>(
    area: &Area<'_>,
    title: &str,
    xlabel: &str,
    x: X,
    y: Y,
    lines: &[Line],
) -> DrawResult<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .x_label_formatter(&|v| fmt_num(*v))
        .y_label_formatter(&|v| fmt_num(*v))
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    for line in lines {
        let full = ShapeStyle::from(&line.color).stroke_width(2);
        let faded = ShapeStyle::from(&line.color.mix(STARVED_OPACITY)).stroke_width(1);
        for pair in line.points.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let seg = [(a.0, a.1), (b.0, b.1)];
            if a.2 || b.2 {
                chart
                    .draw_series(DashedLineSeries::new(seg, 4, 3, faded))
                    .map_err(err)?;
            } else {
                chart.draw_series(LineSeries::new(seg, full)).map_err(err)?;
            }
        }
        chart
            .draw_series(line.points.iter().map(|&(x, v, starved)| {
                let style = if starved {
                    ShapeStyle::from(&line.color.mix(STARVED_OPACITY)).stroke_width(2)
                } else {
                    line.color.filled()
                };
                Circle::new((x, v), 4, style)
            }))
            .map_err(err)?;
    }
    Ok(())
}

/// The legend: one short line and the model's name per model.
fn legend(area: &Area<'_>, lines: &[Line]) -> DrawResult<()> {
    let font = ("sans-serif", 13).into_font();
    for (i, line) in lines.iter().enumerate() {
        let y = 50 + 22 * i as i32;
        area.draw(&PathElement::new(
            vec![(10, y), (34, y)],
            ShapeStyle::from(&line.color).stroke_width(3),
        ))
        .map_err(err)?;
        area.draw(&Text::new(line.name.clone(), (42, y - 7), font.clone()))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::compare::Point;
    use crate::bench::proto::BenchService;

    fn point(model: &str, c: usize, rps: f64, p99: u64, starved: u64) -> Point {
        Point {
            model: model.into(),
            connections: c,
            idle: 0,
            req_per_s: rps,
            p50_us: p99 / 2,
            p99_us: p99,
            errors: 0,
            starved,
            cpu_s: 1.0,
            cpu_ms_per_kreq: 0.1,
            rss_mib: 3.0,
        }
    }

    fn comparison(scenario: Scenario, points: Vec<Point>) -> Comparison {
        Comparison {
            scenario,
            service: BenchService::Reverse,
            size: 64,
            path: "/".into(),
            seconds_per_point: 1.0,
            connect_per_request: false,
            threads: 2,
            cores: 2,
            points,
        }
    }

    #[test]
    fn renders_models_escaped_with_true_log_positions() {
        let c = comparison(
            Scenario::Levels,
            vec![
                point("epoll", 1, 10_000.0, 100, 0),
                point("epoll", 16, 50_000.0, 900, 0),
                point("epoll", 128, 57_000.0, 2_000, 0),
                point("a<b", 1, 8_000.0, 0, 0),
                point("a<b", 16, 9_000.0, 40_000, 3),
                point("a<b", 128, 9_000.0, 30_000, 120),
            ],
        );
        let svg = render(&c).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(svg.contains("not a win"), "the starved note is there");
        // The x labels are the levels, at log positions: 16 is 4/7 of the way from 1 to 128.
        let x_of = |label: &str| -> f64 {
            let at = svg
                .find(&format!(">\n{label}\n</text>"))
                .unwrap_or_else(|| panic!("no x label {label}"));
            let tag = &svg[svg[..at].rfind("<text").unwrap()..at];
            let x = tag.split("x=\"").nth(1).unwrap();
            x[..x.find('"').unwrap()].parse().unwrap()
        };
        let (x1, x16, x128) = (x_of("1"), x_of("16"), x_of("128"));
        let ratio = (x16 - x1) / (x128 - x1);
        assert!((ratio - 4.0 / 7.0).abs() < 0.03, "16 at {ratio} of the way");
    }

    #[test]
    fn y_ticks_are_round_and_numbers_short() {
        assert_eq!(fmt_num(0.01), "0.01");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(25_000.0), "25k");
        assert_eq!(fmt_num(2_500.0), "2.5k");
        assert_eq!(fmt_num(1_500_000.0), "1.5M");
        assert_eq!(decades([0.04, 30.0].into_iter()), (0.01, 100.0));
        let c = comparison(
            Scenario::Levels,
            vec![
                point("x", 1, 86_000.0, 100, 0),
                point("x", 4, 57_000.0, 200, 0),
            ],
        );
        let svg = render(&c).unwrap();
        for odd in [">\n29k\n<", ">\n57k\n<", ">\n86k\n<"] {
            assert!(!svg.contains(odd), "odd tick {odd:?}");
        }
        assert!(
            svg.contains(">\n20k\n<") || svg.contains(">\n10k\n<"),
            "round ticks"
        );
    }

    #[test]
    fn c10k_idle_axis_is_linear_from_zero_and_empty_data_renders() {
        let mut pts = Vec::new();
        for (idle, rps) in [(0, 80_000.0), (1000, 50_000.0), (5000, 6_000.0)] {
            let mut p = point("poll", 16, rps, 1000, 0);
            p.idle = idle;
            pts.push(p);
        }
        let svg = render(&comparison(Scenario::C10k, pts)).unwrap();
        assert!(svg.contains(">\n5k\n<") && svg.contains(">\n0\n<"));
        let svg = render(&comparison(Scenario::Levels, vec![])).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
        let svg = render(&comparison(
            Scenario::Levels,
            vec![point("iterative", 8, 0.0, 0, 8)],
        ))
        .unwrap();
        assert!(!svg.contains("NaN"));
    }
}
