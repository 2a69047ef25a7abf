//! `kiln report`: one document for a backend — the machine, the
//! conformance table (op × dtype), the bench table and the roofline — as
//! Markdown and as a self-contained HTML page.

use std::collections::BTreeMap;
use std::fmt::Write;

use kiln_bench::roofline::{self, xml};
use kiln_bench::suite::{BenchReport, Measurement};
use kiln_conformance::{Report, Status};
use kiln_core::DType;

/// Where and on what the report was made.
pub struct Meta {
    /// The backend as named on the command line, and its own name.
    pub backend: String,
    /// The host processor and its cores.
    pub machine: String,
    /// The depth and cases the conformance suite ran with.
    pub conformance: String,
    /// When (UTC, seconds since the epoch rendered as a date).
    pub date: String,
}

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::U32];

/// Reports keyed by op, then dtype, in the suite's order.
fn grid(reports: &[Report]) -> Vec<(&str, BTreeMap<usize, &Report>)> {
    let mut rows: Vec<(&str, BTreeMap<usize, &Report>)> = Vec::new();
    for r in reports {
        let col = DTYPES.iter().position(|&d| d == r.dtype).unwrap_or(0);
        match rows.iter_mut().find(|(op, _)| *op == r.op) {
            Some((_, m)) => {
                m.insert(col, r);
            }
            None => rows.push((&r.op, BTreeMap::from([(col, r)]))),
        }
    }
    rows
}

/// The first line of a failure's description (its verdict).
fn first_line(r: &Report) -> &str {
    r.failure
        .as_deref()
        .and_then(|f| f.lines().next())
        .unwrap_or("")
}

fn cell(r: &Report) -> String {
    match r.status {
        Status::Pass | Status::UnexpectedPass => {
            let mut c = format!("{} {:.2} · {} ulp", r.status.label(), r.worst, r.worst_ulps);
            if r.cases == 0 {
                c = format!("{} (no cases at this depth)", r.status.label());
            }
            c
        }
        _ => r.status.label().to_string(),
    }
}

fn counts(reports: &[Report]) -> String {
    let n = |s: Status| reports.iter().filter(|r| r.status == s).count();
    format!(
        "{} checks: {} pass, {} fail, {} unsupported, {} expected failures, {} unexpected passes; {} cases",
        reports.len(),
        n(Status::Pass),
        n(Status::Fail),
        n(Status::Unsupported),
        n(Status::ExpectedFailure),
        n(Status::UnexpectedPass),
        reports.iter().map(|r| u64::from(r.cases)).sum::<u64>()
    )
}

/// The report as Markdown (the roofline as a linked SVG file).
pub fn markdown(meta: &Meta, reports: &[Report], bench: &BenchReport, svg_file: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kiln report: {}\n", meta.backend);
    let _ = writeln!(
        s,
        "- machine: {}\n- date: {}\n- conformance: {}\n- {}\n",
        meta.machine,
        meta.date,
        meta.conformance,
        counts(reports)
    );
    let _ = writeln!(
        s,
        "## Conformance\n\nEach cell: the verdict, the worst error as a fraction of the op's stated bound, and in ulps.\n"
    );
    let _ = writeln!(
        s,
        "| check | f32 | f16 | bf16 | u32 |\n|---|---|---|---|---|"
    );
    for (op, cols) in grid(reports) {
        let cells: Vec<String> = (0..DTYPES.len())
            .map(|i| cols.get(&i).map_or(String::new(), |r| cell(r)))
            .collect();
        let _ = writeln!(s, "| {op} | {} |", cells.join(" | "));
    }
    let failures: Vec<&Report> = reports.iter().filter(|r| r.is_failure()).collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\n### Failures\n");
        for r in failures {
            let first = first_line(r);
            let _ = writeln!(
                s,
                "- **{}/{}**: {}\n  reproduce: `{}`",
                r.op, r.dtype, first, r.reproduce
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Bench\n\ncompute peak {:.1} GFLOP/s ({}); bandwidth {:.1} GB/s ({})\n",
        bench.compute_peak.value,
        bench.compute_peak.how,
        bench.bandwidth.value,
        bench.bandwidth.how
    );
    let _ = writeln!(
        s,
        "| op | shape | median ms | min–max ms | GFLOP/s | GB/s | % peak | % bandwidth | others (GFLOP/s); slow paths |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in &bench.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3}–{:.3} | {:.1} | {:.1} | {:.0}% | {} | {} |",
            m.op,
            m.shape,
            1e3 * m.median_s,
            1e3 * m.min_s,
            1e3 * m.max_s,
            m.gflops,
            m.gbs,
            100.0 * m.of_compute_peak,
            crate::bench::bandwidth_cell(m.of_bandwidth),
            others(m)
        );
    }
    if let Some(note) = crate::bench::in_cache_note(bench) {
        let _ = writeln!(s, "\n{note}");
    }
    let _ = writeln!(s, "\n## Roofline\n\n![roofline]({svg_file})");
    s
}

/// The other libraries' GFLOP/s on a row's problem and kiln's ratio to
/// each, then the row's slow paths.
fn others(m: &Measurement) -> String {
    let v: Vec<String> = m
        .compared
        .iter()
        .map(|c| {
            format!(
                "{} {:.1} (kiln {:.2}×)",
                c.library,
                c.gflops,
                m.gflops / c.gflops
            )
        })
        .chain(m.slow_paths.iter().map(|p| format!("slow path: {p}")))
        .collect();
    v.join("; ")
}

const STYLE: &str = "body{font-family:'DejaVu Sans',sans-serif;margin:2em auto;max-width:1100px;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}\
th{background:#f3f3f3}td.pass{background:#e8f6ec}td.fail{background:#f9d6d5;font-weight:bold}\
td.unsupported{background:#eee;color:#777}td.xfail{background:#fdf2d0}td.num{text-align:right}\
code{font-size:12px}h1{font-size:22px}h2{font-size:18px;margin-top:1.5em}";

fn class(s: Status) -> &'static str {
    match s {
        Status::Pass | Status::UnexpectedPass => "pass",
        Status::Fail => "fail",
        Status::Unsupported => "unsupported",
        Status::ExpectedFailure => "xfail",
    }
}

/// The report as one self-contained HTML page (styles and the roofline inline).
pub fn html(meta: &Meta, reports: &[Report], bench: &BenchReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kiln report: {}</title><style>{STYLE}</style></head><body>\n",
        xml(&meta.backend)
    );
    let _ = writeln!(
        s,
        "<h1>kiln report: {}</h1><ul><li>machine: {}</li><li>date: {}</li><li>conformance: {}</li><li>{}</li></ul>",
        xml(&meta.backend),
        xml(&meta.machine),
        xml(&meta.date),
        xml(&meta.conformance),
        xml(&counts(reports))
    );
    let _ = writeln!(
        s,
        "<h2>Conformance</h2><p>Each cell: the verdict, the worst error as a fraction of the op's stated bound, and in ulps.</p><table><tr><th>check</th><th>f32</th><th>f16</th><th>bf16</th><th>u32</th></tr>"
    );
    for (op, cols) in grid(reports) {
        let _ = write!(s, "<tr><td>{}</td>", xml(op));
        for i in 0..DTYPES.len() {
            match cols.get(&i) {
                Some(r) => {
                    let title = r
                        .failure
                        .as_deref()
                        .map(|f| format!(" title=\"{}\"", xml(f.lines().next().unwrap_or(""))))
                        .unwrap_or_default();
                    let _ = write!(
                        s,
                        "<td class=\"{}\"{title}>{}</td>",
                        class(r.status),
                        xml(&cell(r))
                    );
                }
                None => s.push_str("<td></td>"),
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    let failures: Vec<&Report> = reports.iter().filter(|r| r.is_failure()).collect();
    if !failures.is_empty() {
        s.push_str("<h3>Failures</h3><ul>");
        for r in failures {
            let first = first_line(r);
            let _ = write!(
                s,
                "<li><b>{}/{}</b>: {}<br>reproduce: <code>{}</code></li>",
                xml(&r.op),
                r.dtype,
                xml(first),
                xml(&r.reproduce)
            );
        }
        s.push_str("</ul>\n");
    }
    let _ = writeln!(
        s,
        "<h2>Bench</h2><p>compute peak {:.1} GFLOP/s ({}); bandwidth {:.1} GB/s ({})</p>",
        bench.compute_peak.value,
        xml(&bench.compute_peak.how),
        bench.bandwidth.value,
        xml(&bench.bandwidth.how)
    );
    s.push_str("<table><tr><th>op</th><th>shape</th><th>median ms</th><th>min–max ms</th><th>GFLOP/s</th><th>GB/s</th><th>% peak</th><th>% bandwidth</th><th>others (GFLOP/s); slow paths</th></tr>\n");
    for m in &bench.rows {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}–{:.3}</td><td class=\"num\">{:.1}</td><td class=\"num\">{:.1}</td><td class=\"num\">{:.0}%</td><td class=\"num\">{}</td><td>{}</td></tr>",
            xml(&m.op),
            xml(&m.shape),
            1e3 * m.median_s,
            1e3 * m.min_s,
            1e3 * m.max_s,
            m.gflops,
            m.gbs,
            100.0 * m.of_compute_peak,
            crate::bench::bandwidth_cell(m.of_bandwidth),
            xml(&others(m))
        );
    }
    s.push_str("</table>\n");
    if let Some(note) = crate::bench::in_cache_note(bench) {
        let _ = writeln!(s, "<p>{}</p>", xml(note));
    }
    s.push_str("<h2>Roofline</h2>\n");
    s.push_str(&roofline::svg(bench));
    s.push_str("</body></html>\n");
    s
}
