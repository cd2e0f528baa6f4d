//! Step 5: leak records grouped by allocation stack: the [`Report`] every output
//! ([`crate::act::sink`]) writes.

use crate::act::suppress::Suppressions;
use crate::attribute::symbolize::{Frame, Symbols};
use crate::blocks::Block;
use crate::capture::Capture;
use crate::reach::Kind;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

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
    pub contents: Option<crate::attribute::contents::Contents>,
}

impl Record {
    /// The stack outputs draw for this record: its own, or for a record without one (a
    /// check without the agent) one pseudo-frame that says what its blocks are.
    pub fn stack_or_what(&self) -> std::borrow::Cow<'_, [Frame]> {
        if !self.stack.is_empty() {
            return std::borrow::Cow::Borrowed(&self.stack);
        }
        let c = self.contents.as_ref();
        std::borrow::Cow::Owned(vec![what_frame(
            c.and_then(|c| c.type_name.as_deref()),
            c.and_then(|c| c.block_size),
            c.and_then(|c| c.origin),
        )])
    }
}

/// The pseudo-frame that stands for the stack of blocks allocated from no known stack:
/// `(no stack: TYPE)`, `(no stack: N-byte blocks)`, with where they come from when known.
pub fn what_frame(type_name: Option<&str>, block_size: Option<u64>, origin: Option<&str>) -> Frame {
    let mut what = match (type_name, block_size) {
        (Some(t), _) => vec![t.to_string()],
        (None, Some(size)) => vec![format!("{size}-byte blocks")],
        (None, None) => vec![],
    };
    what.extend(origin.map(String::from));
    let function = if what.is_empty() {
        "(no stack)".to_string()
    } else {
        format!("(no stack: {})", what.join(", "))
    };
    Frame {
        function,
        file: String::new(),
        line: 0,
        module: String::new(),
        address: 0,
        offset: 0,
    }
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
    /// Still-reachable records not listed in `leaks` (not asked for), kept when
    /// [`Options::keep_reachable`] says an output counts all memory in use (pprof).
    #[serde(skip)]
    pub unlisted_reachable: Vec<Record>,
    /// The executable mappings of the modules the stacks' frames are in.
    #[serde(skip)]
    pub modules: Vec<Module>,
}

/// Where a module's code was mapped in the process (for outputs that name mappings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Path of the executable or library.
    pub path: String,
    /// First address of its executable mapping.
    pub start: u64,
    /// One past its last address.
    pub end: u64,
    /// Offset of the mapping in the file.
    pub offset: u64,
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
    /// Symbolize still-reachable records even when they are not shown, into
    /// [`Report::unlisted_reachable`] (for pprof's in-use samples).
    pub keep_reachable: bool,
}

/// Blocks grouped by (class, stack id, API), with their totals, in key order. Millions of
/// blocks share a few thousand keys: each stack id heads a short chain of its groups.
fn group(blocks: &[Block], kinds: &[Kind]) -> Vec<((Kind, u32, u32), Totals)> {
    // Ids past 16 bits (unknown, from before an attach) are few keys: grouped apart.
    const FEW: u32 = 1 << 24;
    if blocks.iter().any(|b| b.stack >= FEW) {
        let mut m: BTreeMap<(Kind, u32, u32), Totals> = BTreeMap::new();
        let mut rest: Vec<(Block, Kind)> = Vec::new();
        for (b, &k) in blocks.iter().zip(kinds) {
            if b.stack >= FEW {
                m.entry((k, b.stack, u32::from(b.api)))
                    .or_default()
                    .add(b.size);
            } else {
                rest.push((*b, k));
            }
        }
        let (bs, ks): (Vec<Block>, Vec<Kind>) = rest.into_iter().unzip();
        let mut groups = group(&bs, &ks);
        groups.extend(m);
        groups.sort_unstable_by_key(|(key, _)| *key);
        return groups;
    }
    let heads = blocks
        .iter()
        .map(|b| b.stack as usize + 1)
        .max()
        .unwrap_or(0);
    if heads > FEW as usize {
        // Stack ids are 16-bit today; never index by a huge one.
        let mut m: BTreeMap<(Kind, u32, u32), Totals> = BTreeMap::new();
        for (b, &k) in blocks.iter().zip(kinds) {
            m.entry((k, b.stack, u32::from(b.api)))
                .or_default()
                .add(b.size);
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
        while g != NONE
            && (groups[g as usize].0 .0 != k || groups[g as usize].0 .2 != u32::from(b.api))
        {
            g = next[g as usize];
        }
        if g == NONE {
            g = groups.len() as u32;
            groups.push(((k, b.stack, u32::from(b.api)), Totals::default()));
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
            .filter(|((k, _, _), _)| {
                *k != Kind::Reachable || opts.show_reachable || opts.keep_reachable
            })
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
    let mut unlisted_reachable = Vec::new();
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
        let unlisted = kind == Kind::Reachable && !opts.show_reachable;
        if unlisted && !opts.keep_reachable {
            continue;
        }
        let api = kal_proto::Api::from_u32(api).name();
        let rec = Record {
            kind,
            bytes: t.bytes,
            blocks: t.blocks,
            api,
            stack,
            site: stack_id,
            contents: None,
        };
        if unlisted {
            unlisted_reachable.push(rec);
        } else {
            leaks.push(rec);
        }
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
        unlisted_reachable,
        modules: modules(&c.maps, &resolved),
    }
}

/// The executable mapping of every module a resolved frame is in.
fn modules(
    maps: &[crate::capture::procfs::Mapping],
    resolved: &HashMap<u64, Vec<Frame>>,
) -> Vec<Module> {
    let mut paths: Vec<&str> = resolved
        .values()
        .flatten()
        .map(|f| f.module.as_str())
        .filter(|p| !p.is_empty())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths
        .into_iter()
        .filter_map(|p| {
            let mut of = maps.iter().filter(|m| m.path == p);
            let m = of.clone().find(|m| m.exec).or_else(|| of.next())?;
            Some(Module {
                path: p.to_string(),
                start: m.start,
                end: m.end,
                offset: m.offset,
            })
        })
        .collect()
}

/// The site of a stack in one line (see [`crate::attribute::site`]).
pub use crate::attribute::site::where_;
