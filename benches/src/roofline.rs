//! A roofline picture of a [`BenchReport`], as a self-contained SVG: each
//! op at its arithmetic intensity (FLOP per byte) and GFLOP/s, under the
//! measured memory roof (a slope) and compute roof (flat), log–log.

use std::fmt::Write;

use crate::suite::BenchReport;

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

/// The SVG text of the roofline for `report`.
pub fn svg(report: &BenchReport) -> String {
    let pts: Vec<(f64, f64, &str)> = report
        .rows
        .iter()
        .filter(|r| r.flops > 0.0 && r.bytes > 0.0 && r.gflops > 0.0)
        .map(|r| (r.flops / r.bytes, r.gflops, r.op.as_str()))
        .collect();
    let (peak, bw) = (
        report.compute_peak.value.max(1e-3),
        report.bandwidth.value.max(1e-3),
    );
    let ridge = peak / bw;
    let decade = |v: f64, up: bool| {
        let e = v.log10();
        10f64.powf(if up { e.ceil() } else { e.floor() })
    };
    let (mut x0, mut x1) = (ridge / 10.0, ridge * 10.0);
    let (mut y0, mut y1) = (peak / 1000.0, peak * 2.0);
    for &(x, y, _) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1, y0, y1) = (
        decade(x0, false),
        decade(x1, true),
        decade(y0, false),
        decade(y1, true),
    );
    let px =
        |x: f64| LEFT + (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) * (W - LEFT - RIGHT);
    let py = |y: f64| {
        H - BOTTOM - (y.log10() - y0.log10()) / (y1.log10() - y0.log10()) * (H - TOP - BOTTOM)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">Roofline: {} ({})</text>
"##,
        W / 2.0,
        xml(&report.backend),
        xml(&report.cpu)
    );
    // Grid and axes, one line per decade.
    let mut d = x0;
    while d <= x1 * 1.0001 {
        let x = px(d);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            num(d)
        );
        d *= 10.0;
    }
    let mut d = y0;
    while d <= y1 * 1.0001 {
        let y = py(d);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            num(d)
        );
        d *= 10.0;
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">arithmetic intensity (FLOP/byte)</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">GFLOP/s</text>"##,
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    );
    // The roofs: bandwidth·intensity up to the ridge, then the peak.
    let (ra, rb) = (x0.max(y0 / bw), ridge);
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#c0392b" stroke-width="2" points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>
<text x="{:.1}" y="{:.1}" fill="#c0392b">{:.0} GFLOP/s peak</text>
<text x="{:.1}" y="{:.1}" fill="#c0392b">{:.0} GB/s</text>"##,
        px(ra),
        py(bw * ra),
        px(rb),
        py(peak),
        px(x1),
        py(peak),
        px(rb) + 4.0,
        py(peak) - 6.0,
        peak,
        px(ra) + 4.0,
        py(bw * ra) - 8.0,
        bw
    );
    let colours = [
        "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#d62728", "#393b79", "#637939", "#8c6d31", "#843c39",
    ];
    let mut legend: Vec<&str> = Vec::new();
    for &(x, y, op) in &pts {
        let i = legend.iter().position(|&l| l == op).unwrap_or_else(|| {
            legend.push(op);
            legend.len() - 1
        });
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}" fill-opacity="0.85"><title>{} {:.1} GFLOP/s</title></circle>"##,
            px(x),
            py(y),
            colours[i % colours.len()],
            xml(op),
            y
        );
    }
    for (i, op) in legend.iter().enumerate() {
        let y = TOP + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<circle cx="{}" cy="{y:.1}" r="5" fill="{}"/><text x="{}" y="{:.1}">{}</text>"##,
            W - RIGHT + 18.0,
            colours[i % colours.len()],
            W - RIGHT + 28.0,
            y + 4.0,
            xml(op)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn num(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Escapes text for XML (also used by the HTML report).
pub fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
