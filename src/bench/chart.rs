//! The comparison chart: a self-contained SVG (no fonts or scripts to fetch) with two panels,
//! verified req/s and p99 latency against the concurrency level, one line per model.

use crate::bench::compare::{Comparison, Scenario};
use crate::bench::proto::BenchService;
use std::fmt::Write as _;

const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// One line per model: its points as (x position, value, whether some connections starved).
type Series = Vec<(String, Vec<(usize, f64, bool)>)>;

const W: f64 = 1100.0;
const H: f64 = 460.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 300.0;
const TOP: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 0.1 {
        format!("{v:.1}")
    } else if v >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Render `c` as an SVG document.
pub fn render(c: &Comparison) -> String {
    let by_idle = c.scenario == Scenario::C10k;
    let mut xs: Vec<usize> = c
        .points
        .iter()
        .map(|p| if by_idle { p.idle } else { p.connections })
        .collect();
    xs.sort_unstable();
    xs.dedup();
    let mut models: Vec<&str> = Vec::new();
    for p in &c.points {
        if !models.contains(&p.model.as_str()) {
            models.push(&p.model);
        }
    }
    let series = |f: &dyn Fn(&crate::bench::compare::Point) -> f64| -> Series {
        models
            .iter()
            .map(|m| {
                let pts = c
                    .points
                    .iter()
                    .filter(|p| p.model == *m)
                    .map(|p| {
                        let x = if by_idle { p.idle } else { p.connections };
                        let pos = xs.iter().position(|&v| v == x).unwrap_or(0);
                        (pos, f(p), p.starved > 0)
                    })
                    .collect();
                (m.to_string(), pts)
            })
            .collect()
    };
    let throughput = series(&|p| p.req_per_s);
    let p99 = series(&|p| p.p99_us as f64 / 1000.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = match c.scenario {
        Scenario::Levels if c.service == BenchService::Http => format!(
            "socklab bench --compare: http GET {}, {:.0} s per point",
            c.path, c.seconds_per_point
        ),
        Scenario::Levels => format!(
            "socklab bench --compare: {} {} B, {:.0} s per point",
            c.service, c.size, c.seconds_per_point
        ),
        Scenario::Stevens => format!(
            "Stevens ch. 30: {} {} B, a connection per request",
            c.service, c.size
        ),
        Scenario::C10k => format!(
            "C10K: {} {} B, 16 active connections beside idle ones",
            c.service, c.size
        ),
    };
    let _ = write!(
        svg,
        r#"<text x="20" y="28" font-size="16" font-weight="bold">{}</text>"#,
        esc(&title)
    );
    let xlabel = if by_idle {
        "idle connections"
    } else {
        "connections"
    };
    panel(
        &mut svg,
        60.0,
        "verified requests per second",
        xlabel,
        &xs,
        &throughput,
        false,
    );
    panel(
        &mut svg,
        560.0,
        "p99 latency (ms, log scale)",
        xlabel,
        &xs,
        &p99,
        true,
    );
    // Legend.
    for (i, m) in models.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let color = COLORS[i % COLORS.len()];
        let _ = write!(
            svg,
            r#"<line x1="985" y1="{y}" x2="1005" y2="{y}" stroke="{color}" stroke-width="3"/><text x="1012" y="{}">{}</text>"#,
            y + 4.0,
            esc(m)
        );
    }
    if c.points.iter().any(|p| p.starved > 0) {
        let _ = write!(
            svg,
            r#"<text x="60" y="{}" font-size="11">hollow point: some connections got no answer at all (the design serves fewer clients at once); its latency covers only the clients it served</text>"#,
            H - 18.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(
    svg: &mut String,
    left: f64,
    title: &str,
    xlabel: &str,
    xs: &[usize],
    series: &Series,
    log: bool,
) {
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let min_pos = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let (lo, hi) = if log {
        let lo = if min_pos.is_finite() {
            min_pos.log10().floor()
        } else {
            -2.0
        };
        let hi = if max > 0.0 { max.log10().ceil() } else { 0.0 };
        (lo, if hi <= lo { lo + 1.0 } else { hi })
    } else {
        (0.0, if max > 0.0 { max * 1.1 } else { 1.0 })
    };
    let y_of = |v: f64| {
        let t = if log {
            if v <= 0.0 {
                0.0
            } else {
                (v.log10() - lo) / (hi - lo)
            }
        } else {
            (v - lo) / (hi - lo)
        };
        TOP + PANEL_H - t.clamp(0.0, 1.0) * PANEL_H
    };
    let n = xs.len().max(1);
    let x_of = |i: usize| {
        if n == 1 {
            left + PANEL_W / 2.0
        } else {
            left + i as f64 * PANEL_W / (n - 1) as f64
        }
    };
    let _ = write!(
        svg,
        r#"<text x="{left}" y="{}" font-size="13">{}</text>"#,
        TOP - 12.0,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
    );
    // Y grid and labels.
    let ticks: Vec<f64> = if log {
        (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|k| hi * k as f64 / 5.0).collect()
    };
    for v in ticks {
        let y = y_of(v);
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + PANEL_W,
            left - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    for (i, x) in xs.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x}</text>"#,
            x_of(i),
            TOP + PANEL_H + 18.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + PANEL_W / 2.0,
        TOP + PANEL_H + 38.0,
        esc(xlabel)
    );
    for (si, (_, pts)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(i, v, _)| format!("{:.1},{:.1}", x_of(i), y_of(v)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(i, v, starved) in pts {
            let fill = if starved { "white" } else { color };
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>"#,
                x_of(i),
                y_of(v)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::compare::Point;
    use crate::bench::proto::BenchService;

    fn point(model: &str, c: usize, rps: f64, p99: u64) -> Point {
        Point {
            model: model.into(),
            connections: c,
            idle: 0,
            req_per_s: rps,
            p50_us: p99 / 2,
            p99_us: p99,
            errors: 0,
            starved: 0,
            cpu_s: 1.0,
            cpu_ms_per_kreq: 0.1,
            rss_mib: 3.0,
        }
    }

    #[test]
    fn renders_one_line_per_model_and_escapes_text() {
        let c = Comparison {
            scenario: Scenario::Levels,
            service: BenchService::Reverse,
            size: 64,
            path: "/".into(),
            seconds_per_point: 1.0,
            connect_per_request: false,
            threads: 2,
            cores: 2,
            points: vec![
                point("epoll", 1, 10_000.0, 100),
                point("epoll", 16, 50_000.0, 900),
                point("a<b", 1, 8_000.0, 0),
                point("a<b", 16, 9_000.0, 40_000),
            ],
        };
        let svg = render(&c);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4, "2 models x 2 panels");
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(fmt_num(0.01), "0.01");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(25_000.0), "25k");
    }
}
