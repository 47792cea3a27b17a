//! The comparison chart: round-trip median and stream throughput against payload size, one
//! line per mechanism, both axes logarithmic (sizes span 64 B to 1 MiB, times and rates
//! several decades). Drawn with `plotters` into a self-contained SVG string (its SVG backend
//! needs no system fonts: text stays text for the browser to render).

use super::compare::Comparison;
use plotters::prelude::*;

/// One line: its name and its points (size, value).
type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Distinct colours that stay readable on white (one per mechanism).
const COLORS: [(u8, u8, u8); 19] = [
    (0x1f, 0x77, 0xb4),
    (0xff, 0x7f, 0x0e),
    (0x2c, 0xa0, 0x2c),
    (0xd6, 0x27, 0x28),
    (0x94, 0x67, 0xbd),
    (0x8c, 0x56, 0x4b),
    (0xe3, 0x77, 0xc2),
    (0x7f, 0x7f, 0x7f),
    (0xbc, 0xbd, 0x22),
    (0x17, 0xbe, 0xcf),
    (0x39, 0x3b, 0x79),
    (0x63, 0x79, 0x39),
    (0x8c, 0x6d, 0x31),
    (0x84, 0x3c, 0x39),
    (0x7b, 0x41, 0x73),
    (0x31, 0x82, 0xbd),
    (0xe6, 0x55, 0x0d),
    (0x31, 0xa3, 0x54),
    (0x75, 0x6b, 0xb1),
];

fn color(i: usize) -> RGBAColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b).to_rgba()
}

/// An axis label for a byte count: 100 B, 1 kB, 10 kB, 1 MB.
fn bytes_label(v: f64) -> String {
    if v >= 1e6 {
        format!("{} MB", v / 1e6)
    } else if v >= 1e3 {
        format!("{} kB", v / 1e3)
    } else {
        format!("{v} B")
    }
}

const W: u32 = 1400;
const H: u32 = 620;

/// Render the comparison as an SVG document.
///
/// # Errors
/// A drawing error from `plotters` (none expected with finite data).
pub fn render(c: &Comparison) -> anyhow::Result<String> {
    let mut names: Vec<String> = Vec::new();
    for cell in &c.cells {
        let n = cell.mechanism.name();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let series = |f: &dyn Fn(&super::compare::Cell) -> Option<f64>| -> Series {
        names
            .iter()
            .map(|n| {
                let pts = c
                    .cells
                    .iter()
                    .filter(|x| &x.mechanism.name() == n)
                    .filter_map(|x| {
                        Some((
                            x.size.max(1) as f64,
                            f(x).filter(|v| *v > 0.0 && v.is_finite())?,
                        ))
                    })
                    .collect();
                (n.clone(), pts)
            })
            .collect()
    };
    let rtt = series(&|x| x.rtt_p50_us);
    let tput = series(&|x| x.mb_per_s);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, body) = root.split_vertically(50);
        let between = match c.between {
            super::channel::Between::Processes => "between processes",
            super::channel::Between::Threads => "between threads",
        };
        top.draw(&Text::new(
            format!(
                "socklab ipc --compare: {between}, {}, every message verified — {}",
                c.pinning.describe(),
                c.machine.line()
            ),
            (20, 18),
            ("sans-serif", 17).into_font(),
        ))
        .map_err(err)?;
        let (plots, legend) = body.split_horizontally(W - 200);
        let (left, right) = plots.split_horizontally((W - 200) / 2);
        panel(&left, "round trip, median (µs)", &rtt, c)?;
        panel(&right, "one-way stream (payload MB/s)", &tput, c)?;
        for (i, name) in names.iter().enumerate() {
            let y = 30 + i as i32 * 24;
            let color = color(i);
            legend
                .draw(&PathElement::new(
                    vec![(10, y), (40, y)],
                    color.stroke_width(3),
                ))
                .map_err(err)?;
            legend
                .draw(&Text::new(
                    name.clone(),
                    (48, y - 7),
                    ("sans-serif", 14).into_font(),
                ))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e:?}")
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || hi <= 0.0 {
        return (0.1, 10.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    if hi <= lo {
        (lo, lo * 10.0)
    } else {
        (lo, hi)
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    series: &Series,
    c: &Comparison,
) -> anyhow::Result<()> {
    let xs = || c.sizes.iter().map(|&s| s.max(1) as f64);
    let (x0, x1) = (
        xs().fold(f64::INFINITY, f64::min),
        xs().fold(0.0f64, f64::max),
    );
    let (x0, x1) = if x1 > x0 {
        (x0 / 1.5, x1 * 1.5)
    } else {
        (x0 / 2.0, x0 * 2.0)
    };
    let (y0, y1) = bounds(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("payload bytes")
        .x_label_formatter(&|v| bytes_label(v.round()))
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .draw()
        .map_err(err)?;
    for (i, (_, pts)) in series.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    Ok(())
}
