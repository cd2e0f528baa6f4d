//! Flame graphs of lost bytes by allocation stack (`--flamegraph FILE.svg`), drawn by
//! inferno; `kal diff` draws a differential one (red: grew, blue: shrank).

use crate::act::report::Report;
use crate::act::sink::{Context, Sink};
use crate::attribute::symbolize::Frame;
use crate::reach::Kind;
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Writes the flame graph of the report's lost bytes to `path`.
pub struct Flamegraph {
    /// Where.
    pub path: PathBuf,
}

impl Sink for Flamegraph {
    fn write(&mut self, report: &Report, _: &Context<'_>) -> Result<()> {
        let svg = svg(report)?;
        std::fs::write(&self.path, svg)
            .with_context(|| format!("cannot write flame graph to {}", self.path.display()))
    }
}

/// The report's flame graph of definitely and indirectly lost bytes, as SVG text.
pub fn svg(report: &Report) -> Result<String> {
    let lost: Vec<_> = report
        .leaks
        .iter()
        .filter(|r| matches!(r.kind, Kind::Direct | Kind::Indirect))
        .map(|r| (r.stack_or_what(), r.bytes))
        .collect();
    let lines = fold(lost.iter().map(|(st, b)| (&st[..], *b)));
    draw(
        &lines,
        &format!(
            "kal: lost bytes by allocation stack, {} (pid {})",
            report.program, report.pid
        ),
        false,
    )
}

/// A frame's name in a flame graph: the function, or `module+0x…` for an unknown one
/// (`;` cannot appear: it separates frames).
fn name(f: &Frame) -> String {
    let n = if f.function.is_empty() || f.function == "??" {
        crate::attribute::site::describe(f)
    } else {
        f.function.clone()
    };
    n.replace(';', ":")
}

/// Folded stacks (`root;…;leaf COUNT`, the format of Brendan Gregg's flamegraph.pl) of
/// `(stack innermost first, bytes)` pairs, equal stacks added up, sorted.
pub fn fold<'a>(records: impl Iterator<Item = (&'a [Frame], u64)>) -> Vec<String> {
    let mut by_stack: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, bytes) in records {
        let mut names: Vec<String> = stack.iter().rev().map(name).collect();
        if names.is_empty() {
            names.push("(no stack)".into());
        }
        *by_stack.entry(names.join(";")).or_default() += bytes;
    }
    by_stack
        .into_iter()
        .filter(|(_, b)| *b > 0)
        .map(|(s, b)| format!("{s} {b}"))
        .collect()
}

/// Draws folded `lines` (with two counts each, before and after, when `differential`)
/// as SVG titled `title`. Nothing to draw gives a small SVG that says so.
pub fn draw(lines: &[String], title: &str, differential: bool) -> Result<String> {
    if lines.is_empty() {
        return Ok(format!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"600\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{}</text><text x=\"600\" y=\"48\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">nothing to draw: no bytes{}</text></svg>\n",
            xml_escape(title),
            if differential { " grew or shrank" } else { " lost" }
        ));
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "bytes".into();
    opts.name_type = "Function:".into();
    opts.colors =
        inferno::flamegraph::color::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    // The same function gets the same colour in every graph.
    opts.hash = true;
    opts.deterministic = true;
    if differential {
        opts.subtitle = Some("red: grew, blue: shrank (widths: the second report)".into());
    }
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)
        .context("drawing the flame graph")?;
    String::from_utf8(out).context("the flame graph is not UTF-8")
}

/// Folded lines with two counts, `before` and `after` (each folded lines), for a
/// differential flame graph.
pub fn differential(before: &[String], after: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options::default(),
        before.join("\n").as_bytes(),
        after.join("\n").as_bytes(),
        &mut out,
    )
    .context("folding the two reports")?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .map(String::from)
        .collect())
}

/// `s` with XML's special characters escaped.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str) -> Frame {
        Frame {
            function: function.into(),
            file: String::new(),
            line: 0,
            module: "/bin/prog".into(),
            address: 0x1000,
            offset: 0x10,
        }
    }

    #[test]
    fn stacks_fold_root_first_and_add_up() {
        let a = [frame("leak"), frame("main")];
        let b = [frame("other;x"), frame("main")];
        let lines = fold([(&a[..], 10), (&b[..], 5), (&a[..], 7), (&[][..], 3)].into_iter());
        assert_eq!(
            lines,
            ["(no stack) 3", "main;leak 17", "main;other:x 5"].map(String::from)
        );
        let diff = differential(&lines[1..2], &lines[1..]).unwrap();
        assert!(diff.contains(&"main;leak 17 17".to_string()), "{diff:?}");
        assert!(diff.contains(&"main;other:x 0 5".to_string()), "{diff:?}");
        let svg = draw(&diff, "t", true).unwrap();
        assert!(svg.contains("main") && svg.contains("leak"));
        assert!(draw(&[], "a <b>", false).unwrap().contains("a &lt;b&gt;"));
    }
}
