//! `kal diff`: what grew between two JSON reports, by allocation site.
//!
//! A site is an allocation stack without its addresses (function, file, line, module and
//! offset of each frame), so two reports of one program compare across runs too. Per site:
//! lost bytes and blocks (definitely and indirectly lost) and live ones (every record the
//! report lists: lost, possibly lost, and still reachable when the report was written with
//! `--show-reachable`), before, after and the growth; sites whose lost or live bytes grew,
//! by lost growth then live growth.

use crate::act::report::Totals;
use crate::attribute::symbolize::Frame;
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The parts of a saved JSON report that `diff` reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Saved {
    /// Process id.
    pub pid: i32,
    /// Program path.
    pub program: String,
    /// Totals per class.
    pub summary: SavedSummary,
    /// The records.
    pub leaks: Vec<SavedRecord>,
}

/// Totals per class, as saved.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SavedSummary {
    /// Definitely lost.
    pub direct: SavedTotals,
    /// Indirectly lost.
    pub indirect: SavedTotals,
    /// Possibly lost.
    pub possible: SavedTotals,
    /// Still reachable.
    pub reachable: SavedTotals,
}

/// Bytes and blocks, as saved.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct SavedTotals {
    /// Bytes.
    pub bytes: u64,
    /// Blocks.
    pub blocks: u64,
}

/// One record, as saved.
#[derive(Debug, Clone, Deserialize)]
pub struct SavedRecord {
    /// `direct`, `indirect`, `possible` or `reachable`.
    pub kind: String,
    /// Bytes.
    pub bytes: u64,
    /// Blocks.
    pub blocks: u64,
    /// Allocation stack, innermost first (empty without the agent).
    #[serde(default)]
    pub stack: Vec<Frame>,
    /// Without a stack: what the blocks are.
    #[serde(default)]
    pub contents: Option<SavedContents>,
}

/// What a record's blocks are, as saved (records without a stack).
#[derive(Debug, Clone, Deserialize)]
pub struct SavedContents {
    /// C++ type.
    #[serde(rename = "type", default)]
    pub type_name: Option<String>,
    /// Block size.
    #[serde(default)]
    pub block_size: Option<u64>,
    /// Where the blocks come from ("allocated before kal attached").
    #[serde(default)]
    pub origin: Option<String>,
}

impl SavedRecord {
    /// The record's stack, or for one without (a check without the agent) the
    /// pseudo-frame the other outputs draw (see
    /// [`crate::act::report::Record::stack_or_what`]).
    pub fn stack_or_what(&self) -> Vec<Frame> {
        if !self.stack.is_empty() {
            return self.stack.clone();
        }
        let c = self.contents.as_ref();
        vec![crate::act::report::what_frame(
            c.and_then(|c| c.type_name.as_deref()),
            c.and_then(|c| c.block_size),
            c.and_then(|c| c.origin.as_deref()),
        )]
    }

    /// Whether the record's blocks are definitely or indirectly lost.
    pub fn lost(&self) -> bool {
        matches!(self.kind.as_str(), "direct" | "indirect")
    }
}

/// Reads a JSON report written by `--json` (one document; a JSON Lines file of
/// `--check-every` is refused with a hint).
pub fn load(path: &Path) -> Result<Saved> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read report {}", path.display()))?;
    let mut docs = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    let first = match docs.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => bail!("{} is not a JSON report: {e}", path.display()),
        None => bail!("{} is empty", path.display()),
    };
    if docs.next().is_some() {
        bail!(
            "{} holds several JSON documents (a JSON Lines file of --check-every?): give one report, e.g. one line of it saved to a file",
            path.display()
        );
    }
    serde_json::from_value(first)
        .with_context(|| format!("{} is not a kal JSON report", path.display()))
}

/// A change of bytes and blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Growth {
    /// Bytes (negative: shrank).
    pub bytes: i64,
    /// Blocks (negative: shrank).
    pub blocks: i64,
}

impl Growth {
    fn between(before: Totals, after: Totals) -> Growth {
        Growth {
            bytes: after.bytes as i64 - before.bytes as i64,
            blocks: after.blocks as i64 - before.blocks as i64,
        }
    }
}

/// One quantity in both reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Change {
    /// In the first report.
    pub before: Totals,
    /// In the second.
    pub after: Totals,
    /// After minus before.
    pub grew: Growth,
}

impl Change {
    fn new(before: Totals, after: Totals) -> Change {
        Change {
            before,
            after,
            grew: Growth::between(before, after),
        }
    }
}

/// One allocation site in both reports.
#[derive(Debug, Clone, Serialize)]
pub struct SiteGrowth {
    /// The site in one line (see [`crate::attribute::site::where_`]).
    pub site: String,
    /// Definitely and indirectly lost.
    pub lost: Change,
    /// Every listed record (lost, possibly lost, reachable when listed).
    pub live: Change,
    /// The allocation stack (as in the second report, else the first).
    pub stack: Vec<Frame>,
}

/// Which report.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The file.
    pub file: String,
    /// Its process id.
    pub pid: i32,
    /// Its program.
    pub program: String,
}

/// What grew between two reports.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    /// The first report.
    pub before: Side,
    /// The second.
    pub after: Side,
    /// Each class's totals in both.
    pub summary: BTreeMap<&'static str, Change>,
    /// Sites whose lost or live bytes grew, by lost growth then live growth.
    pub grew: Vec<SiteGrowth>,
    /// How many sites shrank or stayed the same (not listed).
    pub other_sites: usize,
    /// A report had still-reachable blocks without listing them (written without
    /// `--show-reachable`): live counts leave out both reports' reachable records.
    pub reachable_unlisted: bool,
}

/// A frame without its address: what names a site across processes.
type FrameKey = (String, String, u32, String, u64);

fn key(stack: &[Frame]) -> Vec<FrameKey> {
    stack
        .iter()
        .map(|f| {
            (
                f.function.clone(),
                f.file.clone(),
                f.line,
                crate::attribute::site::base_name(&f.module).to_string(),
                f.offset,
            )
        })
        .collect()
}

/// Compares report `b` (later) with `a` (earlier), files named `a_file` and `b_file`.
pub fn diff(a: &Saved, a_file: &str, b: &Saved, b_file: &str) -> Diff {
    #[derive(Default)]
    struct Acc {
        lost: [Totals; 2],
        live: [Totals; 2],
        stack: Vec<Frame>,
    }
    // Live counts compare like with like: still-reachable records count only when both
    // reports list them.
    let unlisted = |s: &Saved| {
        s.summary.reachable.blocks > 0 && !s.leaks.iter().any(|r| r.kind == "reachable")
    };
    let reachable_unlisted = unlisted(a) || unlisted(b);
    let mut sites: BTreeMap<Vec<FrameKey>, Acc> = BTreeMap::new();
    let records = a.leaks.iter().map(|r| (0, r));
    let records = records
        .chain(b.leaks.iter().map(|r| (1, r)))
        .filter(|(_, r)| !(reachable_unlisted && r.kind == "reachable"));
    for (i, r) in records {
        let stack = r.stack_or_what();
        let acc = sites.entry(key(&stack)).or_default();
        acc.live[i].bytes += r.bytes;
        acc.live[i].blocks += r.blocks;
        if r.lost() {
            acc.lost[i].bytes += r.bytes;
            acc.lost[i].blocks += r.blocks;
        }
        if i == 1 || acc.stack.is_empty() {
            acc.stack = stack;
        }
    }
    let total = sites.len();
    let mut grew: Vec<SiteGrowth> = sites
        .into_values()
        .map(|acc| SiteGrowth {
            site: crate::attribute::site::where_(&acc.stack),
            lost: Change::new(acc.lost[0], acc.lost[1]),
            live: Change::new(acc.live[0], acc.live[1]),
            stack: acc.stack,
        })
        .filter(|s| s.lost.grew.bytes > 0 || s.live.grew.bytes > 0)
        .collect();
    grew.sort_by(|x, y| {
        (y.lost.grew.bytes, y.live.grew.bytes, y.lost.grew.blocks)
            .cmp(&(x.lost.grew.bytes, x.live.grew.bytes, x.lost.grew.blocks))
            .then_with(|| x.site.cmp(&y.site))
    });
    let t = |s: SavedTotals| Totals {
        bytes: s.bytes,
        blocks: s.blocks,
    };
    let (sa, sb) = (&a.summary, &b.summary);
    let summary = [
        ("direct", sa.direct, sb.direct),
        ("indirect", sa.indirect, sb.indirect),
        ("possible", sa.possible, sb.possible),
        ("reachable", sa.reachable, sb.reachable),
    ]
    .into_iter()
    .map(|(k, x, y)| (k, Change::new(t(x), t(y))))
    .collect();
    let side = |s: &Saved, file: &str| Side {
        file: file.to_string(),
        pid: s.pid,
        program: s.program.clone(),
    };
    Diff {
        reachable_unlisted,
        before: side(a, a_file),
        after: side(b, b_file),
        summary,
        other_sites: total - grew.len(),
        grew,
    }
}

fn signed(n: i64) -> String {
    if n > 0 {
        format!("+{n}")
    } else {
        n.to_string()
    }
}

/// The diff as text: the classes' totals, then one line per site that grew.
pub fn text(d: &Diff) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kal diff: {} (pid {}) -> {} (pid {}), {}",
        d.before.file, d.before.pid, d.after.file, d.after.pid, d.after.program
    );
    for (name, k) in [
        ("definitely lost", "direct"),
        ("indirectly lost", "indirect"),
        ("possibly lost", "possible"),
        ("still reachable", "reachable"),
    ] {
        let c = d.summary[k];
        let _ = writeln!(
            s,
            "  {name}: {} bytes in {} blocks -> {} bytes in {} blocks ({} bytes, {} blocks)",
            c.before.bytes,
            c.before.blocks,
            c.after.bytes,
            c.after.blocks,
            signed(c.grew.bytes),
            signed(c.grew.blocks)
        );
    }
    if d.grew.is_empty() {
        let _ = writeln!(s, "No site grew.");
    } else {
        let _ = writeln!(s, "Sites that grew (lost growth first, then live):");
    }
    for g in &d.grew {
        let _ = writeln!(
            s,
            "  lost {} bytes in {} blocks (now {} bytes), live {} bytes in {} blocks (now {} bytes) at {}",
            signed(g.lost.grew.bytes),
            signed(g.lost.grew.blocks),
            g.lost.after.bytes,
            signed(g.live.grew.bytes),
            signed(g.live.grew.blocks),
            g.live.after.bytes,
            g.site
        );
    }
    if d.other_sites > 0 {
        let _ = writeln!(
            s,
            "({} other site{} shrank or stayed the same)",
            d.other_sites,
            if d.other_sites == 1 { "" } else { "s" }
        );
    }
    if d.reachable_unlisted {
        let _ = writeln!(
            s,
            "(live counts leave out still-reachable blocks: write both reports with --show-reachable to count them)"
        );
    }
    s
}

/// Folded stacks of the lost bytes of a saved report (for a differential flame graph).
pub fn folded_lost(r: &Saved) -> Vec<String> {
    let lost: Vec<(Vec<Frame>, u64)> = r
        .leaks
        .iter()
        .filter(|r| r.lost())
        .map(|r| (r.stack_or_what(), r.bytes))
        .collect();
    crate::act::flamegraph::fold(lost.iter().map(|(st, b)| (st.as_slice(), *b)))
}

/// The differential flame graph of lost bytes from `a` to `b`, as SVG text.
pub fn flamegraph(a: &Saved, b: &Saved) -> Result<String> {
    let lines = crate::act::flamegraph::differential(&folded_lost(a), &folded_lost(b))?;
    crate::act::flamegraph::draw(
        &lines,
        &format!(
            "kal diff: lost bytes by allocation stack, pid {} -> pid {}, {}",
            a.pid, b.pid, b.program
        ),
        true,
    )
}
