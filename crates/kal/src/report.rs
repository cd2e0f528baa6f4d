//! Step 5: leak records grouped by allocation stack, as text (LSan-like) and JSON.

use crate::capture::{Block, Capture};
use crate::reach::Kind;
use crate::suppress::Suppressions;
use crate::symbolize::{Frame, Symbols};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// Bytes and blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Bytes.
    pub bytes: u64,
    /// Blocks.
    pub blocks: u64,
}

impl Totals {
    fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.blocks += 1;
    }
}

/// Totals per class (suppressed records excluded).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Definitely lost.
    pub direct: Totals,
    /// Indirectly lost.
    pub indirect: Totals,
    /// Possibly lost.
    pub possible: Totals,
    /// Still reachable.
    pub reachable: Totals,
}

impl Summary {
    /// The totals of one class.
    pub fn get(&self, k: Kind) -> Totals {
        match k {
            Kind::Direct => self.direct,
            Kind::Indirect => self.indirect,
            Kind::Possible => self.possible,
            Kind::Reachable => self.reachable,
        }
    }

    fn get_mut(&mut self, k: Kind) -> &mut Totals {
        match k {
            Kind::Direct => &mut self.direct,
            Kind::Indirect => &mut self.indirect,
            Kind::Possible => &mut self.possible,
            Kind::Reachable => &mut self.reachable,
        }
    }
}

/// One leak record: blocks of one class allocated from one stack.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Class.
    pub kind: Kind,
    /// Total bytes.
    pub bytes: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Allocation function (`malloc`, `calloc`, …).
    pub api: &'static str,
    /// Symbolized allocation stack, innermost first.
    pub stack: Vec<Frame>,
    /// The agent's stack id of the allocation site.
    #[serde(skip)]
    pub site: u32,
    /// Without allocation stacks (a check without the agent): what the blocks are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents: Option<crate::contents::Contents>,
}

/// Suppressed records, counted.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Suppressed {
    /// Records suppressed.
    pub records: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Blocks in them.
    pub blocks: u64,
}

/// One allocation site's share of reclaimed memory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Site {
    /// Bytes freed.
    pub bytes: u64,
    /// Blocks freed.
    pub blocks: u64,
    /// Bytes freed (the same as `bytes`).
    pub freed_bytes: u64,
    /// Bytes of pages parked (whole pages of lost blocks, dropped from memory).
    pub parked_bytes: u64,
    /// Blocks with pages parked.
    pub parked_blocks: u64,
    /// Symbolized allocation stack.
    pub stack: Vec<Frame>,
    /// The agent's stack id.
    #[serde(skip)]
    pub site: u32,
}

/// What kal has parked and freed inside the process (leak tolerance).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Reclaimed {
    /// Bytes freed so far.
    pub bytes: u64,
    /// Blocks freed so far.
    pub blocks: u64,
    /// Bytes freed so far (the same as `bytes`).
    pub freed_bytes: u64,
    /// Bytes of pages this kal parked so far.
    pub parked_bytes: u64,
    /// Blocks with pages this kal parked so far.
    pub parked_blocks: u64,
    /// Bytes parked at the agent's last count (parked, not yet restored).
    pub parked_now_bytes: u64,
    /// Bytes restored because the program touched parked pages.
    pub restored_bytes: u64,
    /// Touches of a parked block's own bytes (each bans its site: `never_again`).
    pub touched: u64,
    /// Bytes the agent's compressed store holds for the parked pages.
    pub store_bytes: u64,
    /// Runs left in place because the program wrote to them while they were being parked
    /// (write protection caught the write; nothing was lost).
    pub parking_raced: u64,
    /// By allocation site, largest first.
    pub sites: Vec<Site>,
    /// Sites never reclaimed again: the program freed, reallocated or touched a block kal
    /// had reclaimed or parked there (the scan could not see its pointer).
    pub never_again: Vec<Vec<Frame>>,
}

/// A leak report for one process.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Process id.
    pub pid: i32,
    /// Program path.
    pub program: String,
    /// Totals per class.
    pub summary: Summary,
    /// Records, largest first within each class (reachable only when asked for).
    pub leaks: Vec<Record>,
    /// What suppressions silenced.
    pub suppressed: Suppressed,
    /// Allocations the agent could not record (table full).
    pub untracked_allocations: u64,
    /// Whether the agent recorded every allocation (`untracked_allocations` is 0). When
    /// not, blocks only an unrecorded block points to look lost, and nothing is reclaimed.
    pub tracking_complete: bool,
    /// Whether the lost counts can be trusted: false when anything kal knows of makes
    /// them unreliable (incomplete tracking, or gaps in the capture): they may then
    /// include false positives.
    pub lost_reliable: bool,
    /// What the capture could not see (memory not read, registers, kernel-held pointers,
    /// hooks without a side stack). Not empty: live blocks may look lost, and nothing is
    /// reclaimed.
    pub gaps: crate::capture::Gaps,
    /// Where the memory goes: RSS, live blocks, free memory the allocator keeps.
    pub memory: crate::capture::MemoryStats,
    /// What kal reclaimed in this process.
    pub reclaimed: Reclaimed,
    /// For a live check: how long the target's threads were stopped, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// For a live check: how long copying and scanning the snapshot took, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan_ms: Option<f64>,
    /// What the reader must know about this report as a whole (a check without the
    /// agent: no allocation stacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// At exit: `__libc_freeres` and `__gnu_cxx::__freeres` did not run because this many
    /// other threads of the program were still running (0: how many could not be read).
    /// What they would have freed counts as still reachable, where memcheck frees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeres_skipped_threads: Option<u64>,
}

/// How to build a report.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Include reachable records.
    pub show_reachable: bool,
    /// Suppression patterns.
    pub suppressions: Suppressions,
    /// Live checks leave running the threads blocked in a call that a stop would end
    /// early with EINTR (`epoll_wait`, `sigtimedwait`, …); the capture then has a gap.
    pub no_interrupt: bool,
}

/// Blocks grouped by (class, stack id, API), with their totals, in key order. Millions of
/// blocks share a few thousand keys: each stack id heads a short chain of its groups.
fn group(blocks: &[Block], kinds: &[Kind]) -> Vec<((Kind, u32, u32), Totals)> {
    let heads = blocks
        .iter()
        .map(|b| b.stack as usize + 1)
        .max()
        .unwrap_or(0);
    if heads > 1 << 24 {
        // Stack ids are 16-bit today; never index by a huge one.
        let mut m: BTreeMap<(Kind, u32, u32), Totals> = BTreeMap::new();
        for (b, &k) in blocks.iter().zip(kinds) {
            m.entry((k, b.stack, b.api)).or_default().add(b.size);
        }
        return m.into_iter().collect();
    }
    const NONE: u32 = u32::MAX;
    let mut groups: Vec<((Kind, u32, u32), Totals)> = Vec::new();
    let mut head = vec![NONE; heads];
    let mut next: Vec<u32> = Vec::new();
    for (b, &k) in blocks.iter().zip(kinds) {
        let s = b.stack as usize;
        let mut g = head[s];
        while g != NONE && (groups[g as usize].0 .0 != k || groups[g as usize].0 .2 != b.api) {
            g = next[g as usize];
        }
        if g == NONE {
            g = groups.len() as u32;
            groups.push(((k, b.stack, b.api), Totals::default()));
            next.push(head[s]);
            head[s] = g;
        }
        groups[g as usize].1.add(b.size);
    }
    groups.sort_unstable_by_key(|(key, _)| *key);
    groups
}

/// Groups classified blocks into records, symbolizes them and applies suppressions.
/// `reclaimed_sites`: what this kal reclaimed, by stack id.
pub fn build(
    c: &Capture,
    kinds: &[Kind],
    symbols: &Symbols,
    opts: &Options,
    reclaimed_sites: &HashMap<u32, Totals>,
) -> Report {
    let groups = group(&c.blocks, kinds);
    let addrs: Vec<u64> = {
        // Still-reachable records are not shown unless asked: their stacks need no names.
        let sites = groups
            .iter()
            .filter(|((k, _, _), _)| *k != Kind::Reachable || opts.show_reachable)
            .map(|((_, s, _), _)| s)
            .chain(reclaimed_sites.keys())
            .chain(&c.banned);
        let mut v: Vec<u64> = sites
            .filter_map(|s| c.stacks.get(s))
            .flatten()
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let resolved: HashMap<u64, Vec<Frame>> = symbols.resolve(&c.maps, &addrs);
    let mut summary = Summary::default();
    let mut suppressed = Suppressed::default();
    let mut leaks = Vec::new();
    for ((kind, stack_id, api), t) in groups {
        let stack: Vec<Frame> = c
            .stacks
            .get(&stack_id)
            .map(|s| {
                s.iter()
                    .flat_map(|a| resolved.get(a).cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        if !opts.suppressions.is_empty()
            && kind != Kind::Reachable
            && opts.suppressions.matches(&stack)
        {
            suppressed.records += 1;
            suppressed.bytes += t.bytes;
            suppressed.blocks += t.blocks;
            continue;
        }
        let s = summary.get_mut(kind);
        s.bytes += t.bytes;
        s.blocks += t.blocks;
        if kind == Kind::Reachable && !opts.show_reachable {
            continue;
        }
        let api = kal_proto::Api::from_u32(api).name();
        leaks.push(Record {
            kind,
            bytes: t.bytes,
            blocks: t.blocks,
            api,
            stack,
            site: stack_id,
            contents: None,
        });
    }
    leaks.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(b.bytes.cmp(&a.bytes))
            .then(b.blocks.cmp(&a.blocks))
    });
    let stack_of = |id: &u32| -> Vec<Frame> {
        c.stacks
            .get(id)
            .map(|s| {
                s.iter()
                    .flat_map(|a| resolved.get(a).cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut sites: Vec<Site> = reclaimed_sites
        .iter()
        .map(|(id, t)| Site {
            bytes: t.bytes,
            blocks: t.blocks,
            freed_bytes: t.bytes,
            stack: stack_of(id),
            site: *id,
            ..Default::default()
        })
        .collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    let reclaimed = Reclaimed {
        bytes: c.header.reclaimed_bytes,
        blocks: c.header.reclaimed_blocks,
        freed_bytes: c.header.reclaimed_bytes,
        sites,
        never_again: {
            // Several stack ids can symbolize to one stack: name each stack once.
            let mut v: Vec<Vec<Frame>> = Vec::new();
            for st in c.banned.iter().map(stack_of) {
                if !v.contains(&st) {
                    v.push(st);
                }
            }
            v
        },
        ..Default::default()
    };
    Report {
        memory: c.memory,
        reclaimed,
        pid: c.pid,
        program: c.exe.clone(),
        summary,
        leaks,
        suppressed,
        untracked_allocations: c.header.dropped,
        tracking_complete: c.header.dropped == 0,
        lost_reliable: c.header.dropped == 0 && c.gaps.is_empty(),
        gaps: c.gaps.clone(),
        pause_ms: None,
        scan_ms: None,
        note: None,
        freeres_skipped_threads: (c.header.freeres == kal_proto::FREERES_SKIPPED_THREADS)
            .then_some(c.header.freeres_threads),
    }
}

/// The one line saying that the freeres functions did not run at exit because other
/// threads of the program were running (`others` of them; 0: unknown).
fn freeres_skipped_line(others: u64) -> String {
    let who = match others {
        0 => "other threads of the program were".to_string(),
        1 => "1 other thread of the program was".to_string(),
        n => format!("{n} other threads of the program were"),
    };
    format!(
        "note: __libc_freeres and __gnu_cxx::__freeres did not run at exit: {who} still running and could be using what they free; what they free (stdio buffers, the C++ exception pool, cached thread stacks, loader data) counts as still reachable here, where memcheck frees it"
    )
}

fn title(k: Kind) -> &'static str {
    match k {
        Kind::Direct => "Direct leak",
        Kind::Indirect => "Indirect leak",
        Kind::Possible => "Possible leak",
        Kind::Reachable => "Still reachable",
    }
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// Renders the text report (LSan-like), showing at most `frames` frames per record.
pub fn text(r: &Report, frames: usize) -> String {
    let mut s = String::new();
    let tag = format!("=={}==", r.pid);
    if let Some(w) = warning(r) {
        let _ = writeln!(s, "{tag} {w}");
    }
    let _ = writeln!(
        s,
        "{tag} kal: leak report for {} (pid {})",
        r.program, r.pid
    );
    if let Some(n) = &r.note {
        let _ = writeln!(s, "{tag} note: {n}");
    }
    for rec in &r.leaks {
        if let Some(c) = &rec.contents {
            contents_text(&mut s, rec, c);
            continue;
        }
        let _ = writeln!(
            s,
            "\n{} of {} in {} allocated by {} at:",
            title(rec.kind),
            plural(rec.bytes, "byte"),
            plural(rec.blocks, "block"),
            rec.api
        );
        if rec.stack.is_empty() {
            let _ = writeln!(s, "    (no stack recorded)");
        }
        for (i, f) in rec.stack.iter().take(frames).enumerate() {
            let module = if f.line == 0 && !f.module.is_empty() {
                crate::site::module_offset(f)
            } else {
                crate::site::base_name(&f.module).to_string()
            };
            let loc = if f.file.is_empty() {
                String::new()
            } else if f.line > 0 {
                format!(" {}:{}", f.file, f.line)
            } else {
                format!(" {}", f.file)
            };
            let _ = writeln!(
                s,
                "    #{i} {:#x} in {}{loc} ({module})",
                f.address, f.function
            );
        }
        if rec.stack.len() > frames {
            let more = plural((rec.stack.len() - frames) as u64, "more frame");
            let _ = writeln!(s, "    … {more} (--frames N shows more)");
        }
    }
    let sm = &r.summary;
    let _ = write!(
        s,
        "\n{tag} SUMMARY: kal: definitely lost {} in {}, indirectly lost {} in {}, possibly lost {} in {}, still reachable {} in {}",
        plural(sm.direct.bytes, "byte"),
        plural(sm.direct.blocks, "block"),
        plural(sm.indirect.bytes, "byte"),
        plural(sm.indirect.blocks, "block"),
        plural(sm.possible.bytes, "byte"),
        plural(sm.possible.blocks, "block"),
        plural(sm.reachable.bytes, "byte"),
        plural(sm.reachable.blocks, "block"),
    );
    if r.suppressed.records > 0 {
        let _ = write!(
            s,
            "; suppressed {} ({} in {})",
            plural(r.suppressed.records, "record"),
            plural(r.suppressed.bytes, "byte"),
            plural(r.suppressed.blocks, "block")
        );
    }
    s.push('\n');
    let m = &r.memory;
    let _ = writeln!(
        s,
        "{tag} memory: RSS {}, live blocks {}, kept free by the allocator {} ({} arena{})",
        mib(m.rss_bytes),
        mib(m.live_bytes),
        mib(m.retained_bytes),
        m.arenas,
        if m.arenas == 1 { "" } else { "s" }
    );
    if m.retained_bytes >= 32 << 20 && m.retained_bytes > m.live_bytes {
        let _ = writeln!(
            s,
            "{tag} note: {} of this process's memory is freed memory the allocator keeps for reuse — not a leak; `kal trim {}` (or malloc_trim(0) in the program) gives it back to the OS.",
            mib(m.retained_bytes),
            r.pid
        );
    }
    if let Some(n) = r.freeres_skipped_threads {
        let _ = writeln!(s, "{tag} {}", freeres_skipped_line(n));
    }
    let rc = &r.reclaimed;
    if rc.blocks > 0 || rc.parked_blocks > 0 {
        let _ = writeln!(
            s,
            "{tag} reclaimed so far: parked {} of {} (restored on touch since: {}; compressed store {}), freed {} in {}",
            plural(rc.parked_bytes, "byte"),
            plural(rc.parked_blocks, "block"),
            plural(rc.restored_bytes, "byte"),
            plural(rc.store_bytes, "byte"),
            plural(rc.bytes, "byte"),
            plural(rc.blocks, "block")
        );
        for site in &rc.sites {
            let mut what = Vec::new();
            if site.parked_blocks > 0 {
                what.push(format!(
                    "parked {} of {}",
                    plural(site.parked_bytes, "byte"),
                    plural(site.parked_blocks, "block")
                ));
            }
            if site.blocks > 0 {
                what.push(format!(
                    "freed {} in {}",
                    plural(site.bytes, "byte"),
                    plural(site.blocks, "block")
                ));
            }
            if what.is_empty() {
                continue;
            }
            let _ = writeln!(s, "    {} at {}", what.join(", "), where_(&site.stack));
        }
    }
    for st in &rc.never_again {
        let _ = writeln!(
            s,
            "{tag} contradiction: the program freed a block kal had reclaimed, or touched one kal had parked, allocated at {}; that site is never reclaimed again",
            where_(st)
        );
    }
    if let (Some(p), Some(sc)) = (r.pause_ms, r.scan_ms) {
        let _ = writeln!(s, "{tag} live check: the program was paused {p:.2} ms; copying and scanning took {sc:.1} ms");
    }
    s
}

/// A record without a stack: what its blocks are (type, or size and what they point
/// into) and a sample of one.
fn contents_text(s: &mut String, rec: &Record, c: &crate::contents::Contents) {
    let what = match (&c.type_name, c.block_size) {
        (Some(t), _) => format!("of type {t}"),
        (None, Some(size)) => format!("of {}", plural(size, "byte")),
        (None, None) => String::new(),
    };
    let _ = writeln!(
        s,
        "\n{} of {} in {} {what}:",
        title(rec.kind),
        plural(rec.bytes, "byte"),
        plural(rec.blocks, "block"),
    );
    if !c.points_into.is_empty() {
        let _ = writeln!(s, "    pointing into: {}", c.points_into.join(", "));
    }
    let _ = writeln!(s, "    contents: {}", c.sample);
}

/// The warning every report about this capture starts with, if its lost counts cannot be
/// trusted (one line).
pub fn warning(r: &Report) -> Option<String> {
    let mut parts = Vec::new();
    if !r.tracking_complete {
        parts.push(format!(
            "tracking incomplete: {} allocations were not recorded",
            r.untracked_allocations
        ));
    }
    if let Some(g) = gaps_line(r) {
        parts.push(g);
    }
    (!parts.is_empty()).then(|| {
        format!(
            "kal: WARNING: {}; lost counts below are unreliable and may include false positives",
            parts.join("; ")
        )
    })
}

/// The capture's gaps in a few words (`capture incomplete: …`), if it has any.
pub fn gaps_line(r: &Report) -> Option<String> {
    (!r.gaps.is_empty()).then(|| format!("capture incomplete: {}", r.gaps.line()))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// The site of a stack in one line (see [`crate::site`]).
pub use crate::site::where_;

/// Writes the JSON report.
pub fn write_json(r: &Report, path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)
        .with_context(|| format!("cannot write JSON report to {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let wrote = serde_json::to_writer_pretty(&mut w, r)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::io::Write::write_all(&mut w, b"\n").map_err(Into::into))
        .and_then(|()| std::io::Write::flush(&mut w).map_err(Into::into));
    wrote.with_context(|| format!("cannot write JSON report to {}", path.display()))
}
