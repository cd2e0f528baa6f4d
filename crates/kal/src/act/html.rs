//! The report as one self-contained HTML file (`--html FILE`): the summary, the growth
//! over periodic checks when there were some, the flame graph of lost bytes, and the top
//! leaks with their stacks and source lines (read from the source files when they are on
//! this host). No script, style or image is fetched from anywhere.

use crate::act::report::{Record, Report};
use crate::act::sink::{Context, Point, Sink};
use crate::attribute::symbolize::Frame;
use crate::reach::Kind;
use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Leak records shown with their stacks.
const TOP: usize = 10;
/// Source lines shown around a frame's line, each side.
const AROUND: u32 = 2;

/// Writes the report as an HTML page to `path`.
pub struct Html {
    /// Where.
    pub path: PathBuf,
    /// Frames shown per record.
    pub frames: usize,
}

impl Sink for Html {
    fn write(&mut self, report: &Report, cx: &Context<'_>) -> Result<()> {
        let page = page(report, cx.history, self.frames)?;
        std::fs::write(&self.path, page)
            .with_context(|| format!("cannot write HTML report to {}", self.path.display()))
    }
}

/// `s` escaped for HTML text and attribute values.
fn esc(s: &str) -> String {
    crate::act::flamegraph::xml_escape(s)
}

fn title(k: Kind) -> &'static str {
    match k {
        Kind::Direct => "Direct leak",
        Kind::Indirect => "Indirect leak",
        Kind::Possible => "Possible leak",
        Kind::Reachable => "Still reachable",
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table.sum td,table.sum th{padding:.2em .8em;text-align:right}\
table.sum th:first-child,table.sum td:first-child{text-align:left}\
.warn{background:#fde8e8;border-left:4px solid #c00;padding:.4em .8em}\
.note{background:#eef3fb;border-left:4px solid #36c;padding:.4em .8em}\
.leak{border:1px solid #ccc;border-radius:4px;padding:.5em 1em;margin:1em 0}\
.leak h3{font-size:1em;margin:.2em 0}\
ol.stack{font-family:monospace;padding-left:2.5em}\
pre.src{background:#f6f6f6;margin:.2em 0 .6em;padding:.3em .6em;font-size:.9em}\
pre.src b{background:#ffe9a8;font-weight:normal;display:inline-block;width:100%}\
iframe.fg{border:0;width:100%}";

/// The whole page.
pub fn page(r: &Report, history: &[Point], frames: usize) -> Result<String> {
    let mut s = String::new();
    let name = format!("kal: leak report for {} (pid {})", r.program, r.pid);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&name),
        esc(&name)
    );
    summary(&mut s, r);
    if history.len() >= 2 {
        let _ = writeln!(s, "<h2>Growth over {} checks</h2>", history.len());
        s.push_str(&growth_chart(history));
    }
    let svg = crate::act::flamegraph::svg(r)?;
    let attr = |name: &str| {
        svg.split(&format!(" {name}=\""))
            .nth(1)
            .and_then(|h| h.split('"').next())
            .and_then(|h| h.parse::<u32>().ok())
    };
    let (width, height) = (attr("width").unwrap_or(1200), attr("height").unwrap_or(400));
    // The graph keeps its own document (its script, zoom and search, looks up its own
    // elements), drawn as wide as the page.
    let graph = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
    let doc = format!(
        "<!DOCTYPE html><style>body{{margin:0}}svg{{display:block;width:100%;height:auto}}</style>{graph}"
    );
    let _ = writeln!(
        s,
        "<h2>Lost bytes by allocation stack</h2>\n<iframe class=\"fg\" title=\"flame graph\" style=\"aspect-ratio:{width}/{height}\" srcdoc=\"{}\"></iframe>",
        esc(&doc)
    );
    leaks(&mut s, r, frames);
    s.push_str("</body></html>\n");
    Ok(s)
}

fn summary(s: &mut String, r: &Report) {
    if let Some(w) = crate::act::text::warning(r) {
        let _ = writeln!(s, "<p class=\"warn\">{}</p>", esc(&w));
    }
    if let Some(n) = &r.note {
        let _ = writeln!(s, "<p class=\"note\">{}</p>", esc(n));
    }
    s.push_str("<h2>Summary</h2>\n<table class=\"sum\"><tr><th>class</th><th>bytes</th><th>blocks</th></tr>\n");
    for (label, k) in [
        ("definitely lost", Kind::Direct),
        ("indirectly lost", Kind::Indirect),
        ("possibly lost", Kind::Possible),
        ("still reachable", Kind::Reachable),
    ] {
        let t = r.summary.get(k);
        let _ = writeln!(
            s,
            "<tr><td>{label}</td><td>{}</td><td>{}</td></tr>",
            t.bytes, t.blocks
        );
    }
    s.push_str("</table>\n");
    if r.suppressed.records > 0 {
        let _ = writeln!(
            s,
            "<p>Suppressed: {} records, {} bytes in {} blocks.</p>",
            r.suppressed.records, r.suppressed.bytes, r.suppressed.blocks
        );
    }
    let m = &r.memory;
    let _ = writeln!(
        s,
        "<p>Memory: RSS {}, live blocks {}, kept free by the allocator {} ({} arena{}).</p>",
        mib(m.rss_bytes),
        mib(m.live_bytes),
        mib(m.retained_bytes),
        m.arenas,
        if m.arenas == 1 { "" } else { "s" }
    );
    let rc = &r.reclaimed;
    if rc.blocks > 0 || rc.parked_blocks > 0 {
        let _ = writeln!(
            s,
            "<p>Reclaimed so far: parked {} bytes of {} blocks, freed {} bytes in {} blocks.</p>",
            rc.parked_bytes, rc.parked_blocks, rc.bytes, rc.blocks
        );
    }
    if let (Some(p), Some(sc)) = (r.pause_ms, r.scan_ms) {
        let _ = writeln!(
            s,
            "<p>Live check: the program was paused {p:.2} ms; copying and scanning took {sc:.1} ms.</p>"
        );
    }
}

/// The top records (lost first), each with its stack and source lines.
fn leaks(s: &mut String, r: &Report, frames: usize) {
    let shown: Vec<&Record> = r.leaks.iter().take(TOP).collect();
    if shown.is_empty() {
        s.push_str("<h2>Leaks</h2>\n<p>Nothing lost.</p>\n");
        return;
    }
    let _ = writeln!(
        s,
        "<h2>Top {} of {} records</h2>",
        shown.len(),
        r.leaks.len()
    );
    let mut sources = Sources::default();
    for rec in shown {
        let _ = write!(
            s,
            "<div class=\"leak\"><h3>{} of {} bytes in {} blocks",
            title(rec.kind),
            rec.bytes,
            rec.blocks
        );
        if let Some(c) = &rec.contents {
            let what =
                crate::act::report::what_frame(c.type_name.as_deref(), c.block_size, c.origin)
                    .function;
            let _ = writeln!(
                s,
                " {}</h3><p>contents: <code>{}</code></p></div>",
                esc(&what),
                esc(&c.sample)
            );
            continue;
        }
        let _ = writeln!(
            s,
            " allocated by {} at {}</h3>",
            rec.api,
            esc(&crate::attribute::site::where_(&rec.stack))
        );
        if rec.stack.is_empty() {
            s.push_str("<p>(no stack recorded)</p></div>\n");
            continue;
        }
        s.push_str("<ol class=\"stack\" start=\"0\">\n");
        for f in rec.stack.iter().take(frames) {
            let _ = write!(s, "<li>{}", esc(&frame_line(f)));
            if let Some(src) = sources.around(&f.file, f.line) {
                s.push_str(&src);
            }
            s.push_str("</li>\n");
        }
        if rec.stack.len() > frames {
            let _ = writeln!(
                s,
                "<li>… {} more frames (--frames N shows more)</li>",
                rec.stack.len() - frames
            );
        }
        s.push_str("</ol></div>\n");
    }
}

/// `function file:line (module)`, as the text report writes a frame.
fn frame_line(f: &Frame) -> String {
    let module = if f.line == 0 && !f.module.is_empty() {
        crate::attribute::site::module_offset(f)
    } else {
        crate::attribute::site::base_name(&f.module).to_string()
    };
    let loc = match (f.file.is_empty(), f.line) {
        (true, _) => String::new(),
        (false, 0) => format!(" {}", f.file),
        (false, l) => format!(" {}:{l}", f.file),
    };
    format!("{}{loc} ({module})", f.function)
}

/// Source files read so far (`None`: not on this host).
#[derive(Default)]
struct Sources {
    files: HashMap<String, Option<Vec<String>>>,
}

impl Sources {
    /// The lines around `line` of `file`, the line itself marked, as a `<pre>` block.
    fn around(&mut self, file: &str, line: u32) -> Option<String> {
        if file.is_empty() || line == 0 {
            return None;
        }
        let lines = self
            .files
            .entry(file.to_string())
            .or_insert_with(|| {
                std::fs::read(file).ok().map(|b| {
                    String::from_utf8_lossy(&b)
                        .lines()
                        .map(String::from)
                        .collect()
                })
            })
            .as_ref()?;
        let at = line as usize;
        if at > lines.len() {
            return None;
        }
        let first = at.saturating_sub(AROUND as usize).max(1);
        let last = (at + AROUND as usize).min(lines.len());
        let mut out = String::from("<pre class=\"src\">");
        for n in first..=last {
            let text = format!("{n:>5}  {}", lines[n - 1]);
            if n == at {
                let _ = writeln!(out, "<b>{}</b>", esc(&text));
            } else {
                let _ = writeln!(out, "{}", esc(&text));
            }
        }
        out.push_str("</pre>");
        Some(out)
    }
}

/// A size for people: bytes, KiB or MiB.
fn human(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} bytes"),
        10_000..=9_999_999 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => mib(b),
    }
}

/// A line chart of live and lost bytes over the checks (RSS in the legend: it would
/// flatten them), as inline SVG.
fn growth_chart(points: &[Point]) -> String {
    let (w, h, pad) = (900.0, 260.0, 50.0);
    let t_max = points.iter().map(|p| p.secs).fold(0.0, f64::max).max(1e-9);
    let y_max = points
        .iter()
        .map(|p| p.live.max(p.lost))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |v: u64| h - pad + 20.0 - v as f64 / y_max * (h - 2.0 * pad);
    let mut s = format!(
        "<svg class=\"growth\" width=\"{w}\" height=\"{}\" viewBox=\"0 0 {w} {}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"12\">\n",
        h + 20.0,
        h + 20.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"30\" x2=\"{pad}\" y2=\"{}\" stroke=\"#888\"/>",
        y(0),
        w - pad,
        y(0),
        y(0)
    );
    let _ = writeln!(
        s,
        "<text x=\"{pad}\" y=\"22\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0} s</text>",
        human(y_max as u64),
        w - pad,
        y(0) + 16.0,
        t_max
    );
    for (i, (label, colour, get)) in [
        ("live", "#36c", (|p: &Point| p.live) as fn(&Point) -> u64),
        ("lost", "#c00", |p: &Point| p.lost),
    ]
    .into_iter()
    .enumerate()
    {
        let pts: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.secs), y(get(p))))
            .collect();
        let last = points.last().map(get).unwrap_or(0);
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"22\" fill=\"{colour}\">{label}: {}</text>",
            pts.join(" "),
            200.0 + 200.0 * i as f64,
            human(last)
        );
    }
    let (first, last) = (points[0].rss, points[points.len() - 1].rss);
    let _ = writeln!(
        s,
        "<text x=\"600\" y=\"22\" fill=\"#666\">RSS: {} \u{2192} {}</text>",
        human(first),
        human(last)
    );
    s.push_str("</svg>\n");
    s
}
