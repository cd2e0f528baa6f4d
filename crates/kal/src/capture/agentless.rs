//! `kal check PID` on a process that runs without kal's agent: blocks come from walking
//! glibc's own heap in a copy-on-write snapshot ([`crate::blocks::ptmalloc`]), roots and
//! classification are the same as with the agent. Without the agent there are no
//! allocation stacks (records group blocks by what they are: [`crate::attribute::contents`]), and a
//! block's size is its usable size (what `malloc_usable_size`
//! says), not the size that was asked for: block counts equal a check with the agent,
//! byte counts are a little higher.

use crate::act::report;
use crate::blocks::ptmalloc::Ptmalloc;
use crate::blocks::Block;
use crate::blocks::{BlockSource, Unwalked};
use crate::capture::freeze::ThreadRegs;
use crate::capture::freeze_copy::Extras;
use crate::capture::memory::Image;
use crate::capture::procfs::{self, Mapping};
use crate::capture::source::Source;
use crate::capture::{may_hold_roots, Capture, Gap, Gaps};
use crate::check::Check;
use anyhow::{bail, Result};
use kal_proto::{Api, Header, CHUNK_FLAGS_SHIFT, CHUNK_IS_MMAPPED};
use std::time::Instant;

/// What the report of an agentless check says about allocation stacks.
pub const NO_STACKS: &str = "allocation stacks need kal's agent: this process was not \
     started under `kal run`, so leaks are shown without the code that allocated them, \
     grouped by C++ type, else by size and what they point into, with a sample of their \
     contents; sizes are usable sizes";

/// Allocators other than glibc's that a program may bring, by library name.
const OTHER_ALLOCATORS: [(&str, &str); 4] = [
    ("libjemalloc", "jemalloc"),
    ("libtcmalloc", "tcmalloc"),
    ("libmimalloc", "mimalloc"),
    ("ld-musl", "musl's malloc"),
];

/// Whether process `pid` can be read and has no working kal agent: none mapped, or one
/// that `kal attach` loaded but that stayed inert (no static TLS for it).
pub fn has_no_agent(pid: i32) -> bool {
    procfs::maps(pid).is_ok_and(|maps| {
        !maps.is_empty()
            && (!maps
                .iter()
                .any(|m| crate::agent::is_agent_file(m.file_name()))
                || matches!(
                    crate::agent::attach::agent_state(pid),
                    Ok(Some(crate::agent::attach::NO_STATIC_TLS))
                ))
    })
}

/// The allocator the mappings show, when it is not glibc's.
fn other_allocator(maps: &[Mapping]) -> Option<&'static str> {
    OTHER_ALLOCATORS.iter().find_map(|(lib, name)| {
        maps.iter()
            .any(|m| {
                m.path
                    .rsplit('/')
                    .next()
                    .is_some_and(|f| f.starts_with(lib))
            })
            .then_some(*name)
    })
}

/// Fails with one line when `maps` (of `who`: "process 4242", "core file core.4242") show
/// an allocator other than glibc's, or no glibc at all: the heap walk reads only glibc's.
pub fn ensure_glibc_heap(maps: &[Mapping], who: &str) -> Result<()> {
    if let Some(name) = other_allocator(maps) {
        bail!(
            "{who} allocates with {name}: kal reads only glibc's heap without its agent; start the program under `kal run`, which works with {name}"
        );
    }
    if !maps.iter().any(|m| {
        let f = m.path.rsplit('/').next().unwrap_or("");
        f.starts_with("libc.so") || f.starts_with("libc-2.")
    }) {
        bail!(
            "{who} has no glibc mapped (statically linked?): kal cannot read its heap without its agent; start the program under `kal run`"
        );
    }
    Ok(())
}

/// Checks process `pid`, which runs without the agent, once.
pub fn check(pid: i32, opts: &report::Options) -> Result<Check> {
    crate::capture::fatal::ensure_not_dying(pid)?;
    ensure_glibc_heap(&procfs::maps(pid)?, &format!("process {pid}"))?;
    // No agent: the copy is made by injection (header address 0 names no agent). A copy
    // taken while a thread was inside the allocator is taken again a moment later.
    let mut attempt = 0;
    let (snap, pause, started, captured) = loop {
        let mut snap = crate::capture::snapshot::take(pid, 0, opts.no_interrupt)?;
        let pause = snap.pause;
        crate::capture::snapshot::test_hold("snapshot");
        let started = Instant::now();
        let extras = std::mem::take(&mut snap.extras);
        let captured = capture(pid, snap.child, snap.threads.clone(), extras);
        let transient = captured
            .as_ref()
            .is_ok_and(|c| c.gaps.unread.iter().any(|g| g.transient));
        if !transient || attempt == TRANSIENT_RETRIES {
            break (snap, pause, started, captured);
        }
        snap.release()?;
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_millis(2 * u64::from(attempt)));
    };
    let scanned = captured.map(|cap| {
        let kinds = crate::classify_with(&cap, &opts.suppressions);
        // What the blocks are, read while the copy is there.
        let t0 = Instant::now();
        let described = crate::attribute::contents::describe(&cap, &kinds, |k| {
            k != crate::reach::Kind::Reachable || opts.show_reachable
        });
        if crate::debug::timing() {
            crate::say!(
                "timing: grouping by contents {:?} ({} records)",
                t0.elapsed(),
                described.len()
            );
        }
        (cap, kinds, described)
    });
    let scan = started.elapsed();
    let released = snap.release();
    let (cap, kinds, described) = scanned?;
    released?;
    let mut report = report::build(
        &cap,
        &kinds,
        &crate::attribute::symbolize::Symbols::new(),
        opts,
        &Default::default(),
    );
    report.pause_ms = Some(pause.as_secs_f64() * 1e3);
    report.scan_ms = Some(scan.as_secs_f64() * 1e3);
    report.note = Some(NO_STACKS.to_string());
    // No stacks to group by: blocks are grouped by what they are.
    report.leaks = described;
    Ok(Check::new(report, &kinds, cap))
}

/// The walk's blocks as capture blocks (no sequence number, no stack; the chunk's flags
/// where the agent keeps them).
pub(crate) fn blocks_of(walk: &[crate::blocks::HeapBlock]) -> Vec<Block> {
    walk.iter()
        .map(|b| {
            let mmapped = b.flags & CHUNK_IS_MMAPPED as u64 != 0;
            Block {
                addr: b.addr,
                size: b.usable,
                seq: 0,
                stack: kal_proto::STACK_UNKNOWN,
                api: (Api::Malloc as u32 | ((b.flags as u32 & 7) << CHUNK_FLAGS_SHIFT)) as u16,
                // A heap chunk's last usable word is the next chunk's prev_size.
                tail: if mmapped { 0 } else { 8 },
            }
        })
        .collect()
}

/// A part of the heap the walk could not see, as a gap of the capture.
pub(crate) fn gap_of(u: Unwalked) -> Gap {
    let why = format!("heap not walked: {}", u.why);
    Gap {
        transient: u.transient,
        ..if u.end > u.start {
            Gap::range(u.start, u.end, &why)
        } else {
            Gap::whole(&why)
        }
    }
}

/// Captures of a process caught inside its allocator (a locked arena, a tcache half
/// changed) are taken again this many times, a moment apart, before one with that gap is
/// reported.
pub(crate) const TRANSIENT_RETRIES: u32 = 5;

/// Captures process `pid` from the memory of `mem_pid` (a snapshot copy of it, or the
/// process itself, frozen), with the registers `threads` and what was read from the
/// frozen target beside the copy (`extras`): blocks from the heap walk.
pub fn capture(
    pid: i32,
    mem_pid: i32,
    threads: Vec<ThreadRegs>,
    extras: Extras,
) -> Result<Capture> {
    capture_source(&mut crate::capture::source::Live {
        pid,
        mem_pid,
        threads,
        extras,
    })
}

/// Captures `src` (a live process or a core file) with blocks from the heap walk.
pub fn capture_source(src: &mut dyn Source) -> Result<Capture> {
    let pid = src.pid();
    let threads = src.threads();
    let extras = src.take_extras();
    let mem = src.memory();
    let smaps = src.smaps()?;
    let maps: Vec<Mapping> = smaps.iter().map(|e| e.mapping.clone()).collect();
    let tps: Vec<u64> = threads.iter().map(|t| t.thread_pointer()).collect();
    let (t0, c0) = (Instant::now(), crate::thread_cpu_ms());
    let walk = Ptmalloc {
        mem: &*mem,
        maps: &maps,
        thread_pointers: &tps,
        exclude: &[],
        parked: &[],
    }
    .live_blocks()
    .map_err(|e| anyhow::anyhow!("cannot walk the heap of process {pid}: {e}"))?;
    if crate::debug::timing() {
        crate::say!(
            "timing: heap walk {:?} ({} blocks, {} arenas; on-CPU {:.1} ms)",
            t0.elapsed(),
            walk.blocks.len(),
            walk.arenas.len(),
            crate::thread_cpu_ms() - c0
        );
    }
    let mut unwalked = walk.unwalked;
    // With libc's debug symbols at hand, the main arena found must be theirs.
    let unusable = src.unusable_files();
    let readable: Vec<Mapping> = maps
        .iter()
        .filter(|m| !unusable.contains(&m.path))
        .cloned()
        .collect();
    if let Some(sym) = crate::blocks::ptmalloc::main_arena_from_symbols(&readable) {
        if walk.arenas.first() != Some(&sym) {
            unwalked.push(Unwalked {
                transient: false,
                start: 0,
                end: 0,
                why: format!(
                    "the main arena found ({:#x}) is not glibc's main_arena ({sym:#x}, from its debug symbols)",
                    walk.arenas.first().copied().unwrap_or(0)
                ),
            });
        }
    }
    let blocks = blocks_of(&walk.blocks);
    let header = Header {
        glibc_malloc: 1,
        ..Default::default()
    };
    let heap_ranges = crate::reach::roots::heap_ranges(&maps, &blocks, &header, &*mem);
    let root_maps: Vec<(u64, u64)> = smaps
        .iter()
        .filter(|e| may_hold_roots(&e.mapping, e.anonymous))
        .map(|e| (e.mapping.start, e.mapping.end))
        .chain(extras.ranges.iter().copied())
        .collect();
    let root_maps = crate::reach::ranges::normalize(root_maps);
    let mut not_here = heap_ranges.clone();
    not_here.extend_from_slice(&extras.ranges);
    let ranges =
        crate::reach::ranges::subtract(&root_maps, &crate::reach::ranges::normalize(not_here));
    let shared: Vec<(u64, u64)> = smaps
        .iter()
        .filter(|e| e.mapping.shared)
        .map(|e| (e.mapping.start, e.mapping.end))
        .collect();
    let (mut image, unread) = Image::copy(&*mem, &ranges, &shared);
    let mut gaps = Gaps {
        unread: extras.gaps.clone(),
        threads_without_registers: extras.threads_without_registers,
        hooks_without_side_stack: 0,
    };
    gaps.unread.extend(
        unread
            .into_iter()
            .map(|(s, e)| Gap::range(s, e, "unreadable")),
    );
    gaps.unread.extend(crate::capture::freeze_copy::unseen(
        &extras,
        &smaps,
        &[],
        &heap_ranges,
    ));
    gaps.unread.extend(unwalked.into_iter().map(gap_of));
    let Extras {
        image: parent_image,
        values: kernel_values,
        ..
    } = extras;
    image.overlay(parent_image);
    let memory =
        crate::capture::memory_stats(src.rss(), &smaps, &blocks, &heap_ranges, &[], &header);
    Ok(Capture {
        pid,
        exe: src.exe(),
        threads,
        maps,
        header,
        blocks,
        stacks: Default::default(),
        image,
        root_maps,
        kernel_values,
        gaps,
        heap_ranges,
        heap: mem,
        memory,
        banned: Vec::new(),
        agent: Vec::new(),
        usable_sizes: true,
    })
}
