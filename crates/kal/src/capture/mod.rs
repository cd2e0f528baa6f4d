//! Step 1 of the pipeline: a consistent [`Capture`] of a process — registers of every
//! thread, mappings, the live blocks with stacks (step 2, read from the agent's tables by
//! [`crate::blocks::agent_table`]), a copy of the (small) root memory, and a handle on the
//! heap, whose blocks the scanner reads as it reaches them.
//!
//! Which mappings may hold roots ([`may_hold_roots`]): every readable mapping that can hold
//! a pointer the program stored — anonymous memory, private or shared (`/dev/zero
//! (deleted)`, `/memfd:…`, `/SYSV…`, `/anon_hugepage`, `[anon:…]`, `[stack]`), read-only as
//! well as writable (memory made read-only after a pointer was stored in it still holds
//! it), and file mappings that are writable or hold pages written copy-on-write (smaps
//! `Anonymous:` above 0: data, RELRO). Not roots: kernel-special areas (`[vvar]`,
//! `[vvar_vclock]`, `[vsyscall]`, `[vdso]`, `[uprobes]`), device mappings other than
//! `/dev/zero` (reading them may have side effects or fail), and read-only file mappings
//! never written (code and constant data of programs and libraries: scanning them costs
//! time and yields false pointers). Heap and kal's own mappings are subtracted afterwards.
//!
//! A capture records its [`Gaps`]: what it could not see. Reports say so and nothing is
//! reclaimed from a capture with gaps.

pub mod agentless;
pub mod corefile;
pub mod fatal;
pub mod freeze;
pub mod freeze_copy;
pub mod memory;
pub mod procfs;
pub mod snapshot;
pub mod source;
pub mod tracee;

use crate::blocks::agent_table::{
    read_blocks, read_header, read_stack, read_tables, TableRead, SLOT_BYTES,
};
use crate::blocks::Block;
use crate::capture::freeze::{Frozen, ThreadRegs};
use crate::capture::freeze_copy::Extras;
use crate::capture::memory::{Image, Memory};
use crate::capture::procfs::{Mapping, SmapsEntry};
use crate::capture::source::Source;
use anyhow::{bail, Result};
use kal_proto::{Header, StackSlot};
use std::collections::HashMap;

/// Where the target's memory goes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// Resident set size of the process.
    pub rss_bytes: u64,
    /// Sum of the sizes of live blocks.
    pub live_bytes: u64,
    /// Resident memory the allocator holds that no live block uses: free chunks in bins,
    /// tcache and fastbins, a heap top pinned by a live block, in all arenas. Not a leak.
    pub retained_bytes: u64,
    /// Allocator arenas with live blocks (glibc: the main arena and each secondary one).
    pub arenas: u64,
    /// Resident memory of kal's agent itself (its tables and side stacks), not counted in
    /// any figure above but RSS.
    pub agent_bytes: u64,
}

/// Resident bytes of the parts of each range set, from the process's smaps.
fn resident_in<const N: usize>(smaps: &[SmapsEntry], sets: [&[(u64, u64)]; N]) -> [u64; N] {
    let mut total = [0u64; N];
    for e in smaps {
        let (s, end, rss) = (e.mapping.start, e.mapping.end, e.rss);
        for (t, ranges) in total.iter_mut().zip(sets) {
            let overlap: u64 = ranges
                .iter()
                .map(|r| r.1.min(end).saturating_sub(r.0.max(s)))
                .sum();
            if overlap > 0 {
                *t += (rss as u128 * overlap as u128 / (end - s) as u128) as u64;
            }
        }
    }
    total
}

/// Computes the memory figures of a capture from the smaps of the memory it was read from
/// and the process's resident set size `rss_bytes`.
pub fn memory_stats(
    rss_bytes: u64,
    smaps: &[SmapsEntry],
    blocks: &[Block],
    heap: &[(u64, u64)],
    agent: &[(u64, u64)],
    h: &Header,
) -> MemoryStats {
    let live: u64 = blocks.iter().map(|b| b.size).sum();
    let [resident, agent_bytes] = resident_in(smaps, [heap, agent]);
    let arenas = if h.glibc_malloc != 0 {
        let mut bases: Vec<u64> = blocks
            .iter()
            .filter(|b| b.chunk_flags() & kal_proto::CHUNK_NON_MAIN_ARENA != 0)
            .map(|b| b.addr >> 26)
            .collect();
        bases.sort_unstable();
        bases.dedup();
        1 + bases.len() as u64
    } else {
        0
    };
    MemoryStats {
        rss_bytes,
        live_bytes: live,
        retained_bytes: resident.saturating_sub(live),
        arenas,
        agent_bytes,
    }
}

/// A pointer the kernel holds for the process (a root value), with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelValue {
    /// The value.
    pub value: u64,
    /// Where it came from (`epoll registration (fd 5)`, `POSIX timer sigev_value`).
    pub label: String,
}

/// Something a capture could not see: a range of memory, or a whole kind of roots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// First address (0 with `end` 0: not a range).
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Why.
    pub why: String,
    /// Only a moment's state (a thread was inside the allocator): a capture a little later
    /// is likely to be complete.
    #[serde(skip)]
    pub transient: bool,
}

impl Gap {
    /// A range that could not be read.
    pub fn range(start: u64, end: u64, why: &str) -> Gap {
        Gap {
            start,
            end,
            why: why.to_string(),
            transient: false,
        }
    }

    /// A kind of roots that could not be read.
    pub fn whole(why: &str) -> Gap {
        Gap::range(0, 0, why)
    }

    /// The range, if this gap is one.
    pub fn range_of(&self) -> Option<(u64, u64)> {
        (self.end > self.start).then_some((self.start, self.end))
    }
}

/// What a capture could not see. Anything here can make live blocks look lost.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gaps {
    /// Memory and roots that could not be read.
    pub unread: Vec<Gap>,
    /// Threads whose registers could not be read.
    pub threads_without_registers: u64,
    /// Allocation hooks that ran on the program's stack (no side stack was available):
    /// stale heap addresses they left there may hide leaks, and the count says the agent
    /// ran short.
    pub hooks_without_side_stack: u64,
}

impl Gaps {
    /// Whether the capture saw everything.
    pub fn is_empty(&self) -> bool {
        self.unread.is_empty()
            && self.threads_without_registers == 0
            && self.hooks_without_side_stack == 0
    }

    /// The gaps in one line of text (empty when there are none).
    pub fn line(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let ranges: Vec<&Gap> = self.unread.iter().filter(|g| g.end > g.start).collect();
        if !ranges.is_empty() {
            let bytes: u64 = ranges.iter().map(|g| g.end - g.start).sum();
            let mut whys: Vec<&str> = ranges.iter().map(|g| g.why.as_str()).collect();
            whys.dedup();
            parts.push(format!(
                "{} not read ({} bytes: {})",
                if ranges.len() == 1 {
                    "1 memory range".to_string()
                } else {
                    format!("{} memory ranges", ranges.len())
                },
                bytes,
                whys.join(", ")
            ));
        }
        parts.extend(
            self.unread
                .iter()
                .filter(|g| g.end <= g.start)
                .map(|g| g.why.clone()),
        );
        if self.threads_without_registers > 0 {
            parts.push(format!(
                "registers of {} thread(s) not read",
                self.threads_without_registers
            ));
        }
        if self.hooks_without_side_stack > 0 {
            parts.push(format!(
                "{} allocation hook(s) ran without a side stack",
                self.hooks_without_side_stack
            ));
        }
        parts.join("; ")
    }
}

/// Everything the later steps need. Heap blocks are read through [`Capture::heap`], which
/// must stay readable (process frozen, or snapshot copy alive) until classification is done.
pub struct Capture {
    /// Process id.
    pub pid: i32,
    /// Executable path.
    pub exe: String,
    /// Registers of every thread.
    pub threads: Vec<ThreadRegs>,
    /// Memory mappings.
    pub maps: Vec<Mapping>,
    /// The agent header.
    pub header: Header,
    /// Live blocks, sorted by address.
    pub blocks: Vec<Block>,
    /// Allocation stacks by id (return addresses, innermost first).
    pub stacks: HashMap<u32, Vec<u64>>,
    /// Copied memory that may hold roots and is not heap (see the module doc).
    pub image: Image,
    /// The ranges that may hold roots (before heap, kal's own and stacks are taken out),
    /// sorted and disjoint: the mappings [`may_hold_roots`] admits and what was read from the
    /// frozen target.
    pub root_maps: Vec<(u64, u64)>,
    /// Pointers the kernel holds for the process (epoll data, timer values).
    pub kernel_values: Vec<KernelValue>,
    /// What this capture could not see.
    pub gaps: Gaps,
    /// Memory the allocator owns, sorted and disjoint: scanned only as reached blocks.
    pub heap_ranges: Vec<(u64, u64)>,
    /// Where heap blocks are read from.
    pub heap: Box<dyn Memory + Send + Sync>,
    /// Where the memory goes (RSS, live, retained by the allocator).
    pub memory: MemoryStats,
    /// Stack ids the agent will never reclaim again (the program contradicted a reclaim).
    pub banned: Vec<u32>,
    /// The agent's own mappings (tables, side stacks): never roots, never heap.
    pub agent: Vec<(u64, u64)>,
    /// Block sizes are usable sizes from a heap walk (no agent), not requested ones: the
    /// size asked for may be up to a chunk's rounding smaller.
    pub usable_sizes: bool,
}

/// Kernel-special areas: never roots.
const SPECIAL: [&str; 5] = [
    "[vvar]",
    "[vvar_vclock]",
    "[vsyscall]",
    "[vdso]",
    "[uprobes]",
];

/// Whether a mapping may hold root pointers (the rule is in the module doc). `anonymous`:
/// its smaps `Anonymous:` bytes (0 when unknown).
pub fn may_hold_roots(m: &Mapping, anonymous: u64) -> bool {
    let p = m.path.as_str();
    if !m.read || SPECIAL.contains(&p) {
        return false;
    }
    let anon_like = p.is_empty()
        || p.starts_with('[')
        || p.starts_with("/dev/zero")
        || p.starts_with("/memfd:")
        || p.starts_with("/SYSV")
        || p.starts_with("/anon_hugepage");
    if anon_like {
        return true;
    }
    if p.starts_with("/dev/") && !p.starts_with("/dev/shm/") {
        return false; // a device
    }
    m.write || (!m.shared && anonymous > 0)
}

/// Captures a frozen process whose agent header lives at `header_addr`, reading its
/// memory in place (no copy: nothing is hidden from it; the kernel-held pointers are read
/// too).
pub fn capture(frozen: &Frozen, header_addr: u64) -> Result<Capture> {
    let (threads, missing) = frozen.regs_and_missing();
    let mut extras = crate::capture::freeze_copy::in_place(frozen.mem_pid());
    extras.threads_without_registers = missing;
    capture_from(frozen.pid(), frozen.mem_pid(), threads, header_addr, extras)
}

/// Captures process `pid` from the memory of `mem_pid` (the process itself, frozen, or a
/// snapshot copy of it), the registers `threads` taken at the same instant, and what was
/// read from the frozen target beside the copy (`extras`).
pub fn capture_from(
    pid: i32,
    mem_pid: i32,
    threads: Vec<ThreadRegs>,
    header_addr: u64,
    extras: Extras,
) -> Result<Capture> {
    let mut src = crate::capture::source::Live {
        pid,
        mem_pid,
        threads,
        extras,
    };
    capture_table(&mut src, header_addr)
}

/// Captures `src`, whose agent header lives at `header_addr`: blocks and stacks from the
/// agent's table.
pub fn capture_table(src: &mut dyn Source, header_addr: u64) -> Result<Capture> {
    let (t0, c0) = (std::time::Instant::now(), crate::thread_cpu_ms());
    let timing = crate::debug::timing();
    let pid = src.pid();
    let threads = src.threads();
    let extras = src.take_extras();
    let mem = src.memory();
    let header = read_header(&*mem, header_addr)?;
    let smaps = src.smaps()?;
    let maps: Vec<Mapping> = smaps.iter().map(|e| e.mapping.clone()).collect();
    let TableRead {
        blocks,
        stacks,
        unread: table_unread,
    } = read_blocks(&*mem, &header);
    if timing {
        crate::say!(
            "timing: table read {:?} ({} blocks; on-CPU {:.1} ms)",
            t0.elapsed(),
            blocks.len(),
            crate::thread_cpu_ms() - c0
        );
    }
    let agent = agent_ranges(&*mem, &header);
    // An attached agent never saw the blocks allocated before it: glibc's heap walk
    // gives them; with another allocator they are unknown.
    let mut before_gaps = Vec::new();
    let blocks = if !extras.before_attach {
        blocks
    } else if header.glibc_malloc != 0 {
        let t2 = std::time::Instant::now();
        let (merged, gaps) =
            crate::blocks::before_attach::merge(blocks, &*mem, &header, &maps, &threads, &agent);
        if timing {
            crate::say!(
                "timing: heap walk for blocks from before the attach {:?} ({} blocks in all)",
                t2.elapsed(),
                merged.len()
            );
        }
        before_gaps = gaps;
        merged
    } else {
        before_gaps.push(Gap::whole(crate::blocks::before_attach::JEMALLOC_GAP));
        blocks
    };
    let heap_ranges = crate::reach::ranges::subtract(
        &crate::reach::roots::heap_ranges(&maps, &blocks, &header, &*mem),
        &agent,
    );
    let mut skip = agent.clone();
    skip.extend_from_slice(&heap_ranges);
    let skip = crate::reach::ranges::normalize(skip);
    let mut root_maps: Vec<(u64, u64)> = smaps
        .iter()
        .filter(|e| may_hold_roots(&e.mapping, e.anonymous))
        .map(|e| (e.mapping.start, e.mapping.end))
        .collect();
    root_maps.extend_from_slice(&extras.ranges);
    let root_maps = crate::reach::ranges::normalize(root_maps);
    // From the copy: everything but what was read from the frozen target.
    let mut not_here = skip.clone();
    not_here.extend_from_slice(&extras.ranges);
    // Below each thread's stack pointer (and red zone) is memory the roots leave out
    // (`roots::roots`): not copied either. A thread inside a hook is left whole (its
    // program stack pointer is saved in its side-stack slot, read from the copy).
    not_here.extend(threads.iter().filter_map(|t| {
        let sp = t.sp();
        if active_side_slot(&header, sp).is_some() {
            return None;
        }
        let m = maps.iter().find(|m| m.contains(sp))?;
        Some((
            m.start,
            sp.saturating_sub(crate::reach::roots::RED_ZONE)
                .max(m.start),
        ))
    }));
    let not_here = crate::reach::ranges::normalize(not_here);
    let mut ranges = crate::reach::ranges::subtract(&root_maps, &not_here);
    ranges.extend(
        threads
            .iter()
            .filter_map(|t| active_side_slot(&header, t.sp())),
    );
    ranges.extend(crate::reach::roots::server_thread_tls(&header, &*mem));
    let ranges = crate::reach::ranges::normalize(ranges);
    let t1 = std::time::Instant::now();
    let shared: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.shared)
        .map(|m| (m.start, m.end))
        .collect();
    let (mut image, mut unread) = Image::copy(&*mem, &ranges, &shared);
    unread.extend(table_unread);
    let mut gaps = gaps_of(&extras, &smaps, &agent, &heap_ranges, unread, &header);
    gaps.unread.extend(before_gaps);
    let Extras {
        image: parent_image,
        values: kernel_values,
        ..
    } = extras;
    image.overlay(parent_image);
    if timing {
        crate::say!(
            "timing: root memory copy {:?} ({} KiB)",
            t1.elapsed(),
            image.bytes() >> 10
        );
    }
    let memory = memory_stats(src.rss(), &smaps, &blocks, &heap_ranges, &agent, &header);
    let n = (header.banned_len as usize).min(kal_proto::MAX_BANNED);
    let mut raw = vec![0u8; n * 4];
    if n > 0 && mem.read(header.banned_addr, &mut raw).is_err() {
        bail!("cannot read the agent's banned sites");
    }
    let banned: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut stacks = stacks;
    for &id in &banned {
        if let (false, Some(st)) = (stacks.contains_key(&id), read_stack(&*mem, &header, id)) {
            stacks.insert(id, st);
        }
    }
    Ok(Capture {
        pid,
        exe: src.exe(),
        threads,
        maps,
        header,
        blocks,
        stacks,
        image,
        root_maps,
        kernel_values,
        gaps,
        heap_ranges,
        heap: mem,
        memory,
        banned,
        agent,
        usable_sizes: false,
    })
}

/// Everything a capture could not see: the extras' gaps, ranges of the copy that could not
/// be read, memory the copy lacks that was not read from the target, missing registers,
/// and hooks the agent ran without a side stack.
fn gaps_of(
    extras: &Extras,
    smaps: &[SmapsEntry],
    agent: &[(u64, u64)],
    heap: &[(u64, u64)],
    unread: Vec<(u64, u64)>,
    header: &Header,
) -> Gaps {
    let mut g = Gaps {
        unread: extras.gaps.clone(),
        threads_without_registers: extras.threads_without_registers,
        hooks_without_side_stack: header.no_side_stack,
    };
    g.unread.extend(
        unread
            .into_iter()
            .map(|(s, e)| Gap::range(s, e, "unreadable")),
    );
    g.unread.extend(crate::capture::freeze_copy::unseen(
        extras, smaps, agent, heap,
    ));
    g
}

/// For a thread stopped inside a hook: the used part of its side-stack slot, up to the
/// slot's top (where the trampoline saved the program's stack pointer).
pub fn active_side_slot(h: &Header, sp: u64) -> Option<(u64, u64)> {
    if h.side_slot == 0 || sp < h.side_addr || sp >= h.side_addr + h.side_len {
        return None;
    }
    let top = h.side_addr + ((sp - h.side_addr) / h.side_slot + 1) * h.side_slot;
    Some((sp.saturating_sub(128).max(top - h.side_slot), top))
}

/// The agent's own mappings (every allocation table ever made, the stack table, the side
/// stacks, the reclaimed set): never roots, never the allocator's memory.
pub fn agent_ranges(mem: &dyn Memory, h: &Header) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = read_tables(mem, h)
        .1
        .iter()
        .map(|t| (t.addr, t.addr + t.slots * SLOT_BYTES))
        .collect();
    v.extend([
        (
            h.stacks_addr,
            h.stacks_addr + h.stack_slots * std::mem::size_of::<StackSlot>() as u64,
        ),
        (h.side_addr, h.side_addr + h.side_len),
        (
            h.reclaimed_set_addr,
            h.reclaimed_set_addr + h.reclaimed_set_len,
        ),
        (
            h.server_stack_addr,
            h.server_stack_addr + h.server_stack_len,
        ),
    ]);
    crate::reach::ranges::normalize(v)
}
