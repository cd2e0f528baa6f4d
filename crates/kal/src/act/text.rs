//! The text report (LSan/valgrind-like) on stderr.

use crate::act::report::{Record, Report};
use crate::act::sink::{Context, Sink};
use crate::reach::Kind;
use anyhow::Result;
use std::fmt::Write as _;

/// Prints the text report on stderr, at most `frames` frames per record.
pub struct Text {
    /// Frames shown per record.
    pub frames: usize,
}

impl Sink for Text {
    fn write(&mut self, report: &Report, _: &Context<'_>) -> Result<()> {
        crate::say_raw!("{}", render(report, self.frames));
        Ok(())
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
pub fn render(r: &Report, frames: usize) -> String {
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
                crate::attribute::site::module_offset(f)
            } else {
                crate::attribute::site::base_name(&f.module).to_string()
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
            let _ = writeln!(
                s,
                "    {} at {}",
                what.join(", "),
                crate::attribute::site::where_(&site.stack)
            );
        }
    }
    for st in &rc.never_again {
        let _ = writeln!(
            s,
            "{tag} contradiction: the program freed a block kal had reclaimed, or touched one kal had parked, allocated at {}; that site is never reclaimed again",
            crate::attribute::site::where_(st)
        );
    }
    if let (Some(p), Some(sc)) = (r.pause_ms, r.scan_ms) {
        let _ = writeln!(s, "{tag} live check: the program was paused {p:.2} ms; copying and scanning took {sc:.1} ms");
    }
    s
}

/// A record without a stack: what its blocks are (type, or size and what they point
/// into) and a sample of one.
fn contents_text(s: &mut String, rec: &Record, c: &crate::attribute::contents::Contents) {
    let what = match (&c.type_name, c.block_size) {
        (Some(t), _) => format!("of type {t}"),
        (None, Some(size)) => format!("of {}", plural(size, "byte")),
        (None, None) => String::new(),
    };
    let origin = c.origin.map(|o| format!(", {o}")).unwrap_or_default();
    let _ = writeln!(
        s,
        "\n{} of {} in {} {what}{origin}:",
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
