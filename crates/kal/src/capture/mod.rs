//! Step 1 and 2 of the pipeline: a consistent [`Capture`] of a process — registers of every
//! thread, mappings, the agent's live-block table with stacks, a copy of the (small) root
//! memory, and a handle on the heap, whose blocks the scanner reads as it reaches them.
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

use crate::capture::freeze::{Frozen, ThreadRegs};
use crate::capture::freeze_copy::Extras;
use crate::capture::memory::{read_words, Image, Memory};
use crate::capture::procfs::{Mapping, SmapsEntry};
use crate::capture::source::Source;
use anyhow::{bail, Context, Result};
use kal_proto::{
    slot_state, table_state, Header, Meta, SlotState, StackSlot, TableDesc, TableWord, Window,
    MAGIC, MAX_TABLES, STACK_SLOT_BUSY, VERSION,
};
use std::collections::HashMap;

/// A live heap block as the agent recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Address returned to the program.
    pub addr: u64,
    /// Requested size.
    pub size: u64,
    /// Allocation sequence number.
    pub seq: u64,
    /// Stack id (key into [`Capture::stacks`]).
    pub stack: u32,
    /// The allocation API (`kal_proto::Api`, low 8 bits) and glibc's chunk flags shifted
    /// by [`kal_proto::CHUNK_FLAGS_SHIFT`].
    pub api: u16,
    /// Bytes at the end of the block that pointers do not refer to (see [`Block::span`]):
    /// at most 8. Kept this small so that a block takes 32 bytes: a check of a big heap
    /// sorts and looks up millions of them.
    pub tail: u16,
}

// A check of a big heap sorts and looks up millions of blocks: keep them at 32 bytes.
const _: () = assert!(std::mem::size_of::<Block>() == 32);

impl Block {
    /// Pointers into `[addr, addr + span)` refer to this block. Usually `size`; with
    /// glibc's allocator it stops where the next chunk's header begins (the allocator's own
    /// pointers to that header are not pointers into this block).
    #[inline]
    pub fn span(&self) -> u64 {
        self.size.saturating_sub(u64::from(self.tail))
    }

    /// glibc's chunk flag bits recorded with the block (`kal_proto::CHUNK_*`; 0 for
    /// other allocators).
    #[inline]
    pub fn chunk_flags(&self) -> u32 {
        u32::from(self.api) >> kal_proto::CHUNK_FLAGS_SHIFT
    }
}

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

fn read_pod<T: Copy + Default>(mem: &dyn Memory, addr: u64) -> Option<T> {
    let mut v = T::default();
    // SAFETY: T is a plain-old-data repr(C) type (Header, AllocSlot); any bytes are valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut((&mut v as *mut T).cast::<u8>(), std::mem::size_of::<T>())
    };
    mem.read(addr, bytes).is_ok().then_some(v)
}

/// Reads and checks the agent header at `addr`.
pub fn read_header(mem: &dyn Memory, addr: u64) -> Result<Header> {
    let h: Header = read_pod(mem, addr).context("cannot read the kal agent header")?;
    if h.magic != MAGIC {
        bail!("no kal agent header at {addr:#x}");
    }
    if h.version != VERSION || h.header_size as usize != std::mem::size_of::<Header>() {
        bail!(
            "the agent speaks table version {}, this kal understands {VERSION}",
            h.version
        );
    }
    Ok(h)
}

/// Bytes of one allocation-table slot (`kal_proto::AllocSlot`).
const SLOT_BYTES: u64 = 24;

/// The agent's allocation tables: `(descriptors of the tables holding blocks, every table
/// ever made)`. Read from the header's descriptor ring and window.
pub fn read_tables(mem: &dyn Memory, h: &Header) -> (Vec<TableWord>, Vec<TableWord>) {
    let window = read_pod::<u64>(mem, h.table_window).map(Window::decode);
    let descs: Vec<TableWord> = read_words(mem, h.table_descs, MAX_TABLES * 2)
        .chunks_exact(std::mem::size_of::<TableDesc>() / 8)
        .map(|d| TableWord::decode(d[0]))
        .collect();
    let all: Vec<TableWord> = descs.iter().copied().filter(|t| t.slots > 0).collect();
    let Some(w) = window else {
        return (Vec::new(), all);
    };
    let mut live = Vec::new();
    let mut i = w.oldest % MAX_TABLES;
    loop {
        let t = descs[i];
        if t.slots > 0 && (t.state == table_state::LIVE || t.state == table_state::DRAINING) {
            live.push(t);
        }
        if i == w.newest % MAX_TABLES {
            break;
        }
        i = (i + 1) % MAX_TABLES;
    }
    (live, all)
}

/// What [`read_blocks`] found in the agent's tables.
pub struct TableRead {
    /// Live blocks, sorted by address, each once.
    pub blocks: Vec<Block>,
    /// Allocation stacks by id.
    pub stacks: HashMap<u32, Vec<u64>>,
    /// Table ranges that could not be read.
    pub unread: Vec<(u64, u64)>,
}

/// Tables with more touched bytes than this are read by two threads.
const PARALLEL_TABLE_BYTES: u64 = 16 << 20;

/// Address ranges `[start, end)` of table memory.
type Pieces = Vec<(u64, u64)>;

/// Splits table pieces into those before and after `at` bytes into them (a multiple of
/// the slot size).
fn halves(pieces: &[(u64, u64)], mut at: u64) -> (Pieces, Pieces) {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for &(s, e) in pieces {
        if at >= e - s {
            first.push((s, e));
            at -= e - s;
        } else if at > 0 {
            first.push((s, s + at));
            second.push((s + at, e));
            at = 0;
        } else {
            second.push((s, e));
        }
    }
    (first, second)
}

/// The live blocks of table `pieces`, split at address `pivot` (below it, and from it on),
/// each part sorted by address, and the parts of the tables that could not be read.
fn read_split(
    mem: &dyn Memory,
    h: &Header,
    pieces: &[(u64, u64)],
    pivot: u64,
) -> (Vec<Block>, Vec<Block>, Pieces) {
    // Stream the pieces through one reused buffer (whole slots), grown only as far as the
    // longest run needs (a small process's exit report must not zero 4 MiB for nothing).
    const BUF_WORDS: usize = 3 * 170 * 1024;
    let mut buf: Vec<u64> = Vec::new();
    // At most one block a slot: reserved (not touched) up front, so neither vector is
    // copied as it grows. Untouched capacity costs nothing.
    let slots = pieces
        .iter()
        .map(|&(s, e)| (e - s) / SLOT_BYTES)
        .sum::<u64>() as usize;
    let (mut lo, mut hi) = (Vec::with_capacity(slots), Vec::new());
    crate::capture::memory::prefer_huge_pages(&lo);
    if pivot != u64::MAX {
        hi.reserve(slots);
        crate::capture::memory::prefer_huge_pages(&hi);
    }
    let mut unread = Vec::new();
    for &(mut at, e) in pieces {
        while at < e {
            let n = ((e - at) as usize / 8).min(BUF_WORDS);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let words = &mut buf[..n];
            if !crate::capture::memory::read_into(mem, at, words) {
                unread.push((at, at + n as u64 * 8));
            }
            for w in words.chunks_exact(3) {
                if let Some(b) = live_block(h, w) {
                    if b.addr < pivot { &mut lo } else { &mut hi }.push(b);
                }
            }
            at += n as u64 * 8;
        }
    }
    lo.sort_unstable_by_key(|b| b.addr);
    hi.sort_unstable_by_key(|b| b.addr);
    (lo, hi, unread)
}

/// The block a table slot's words hold, if the slot is live.
#[inline]
fn live_block(h: &Header, w: &[u64]) -> Option<Block> {
    match slot_state(w[0]) {
        SlotState::Live(addr) => {
            let m = Meta::unpack(w[2]);
            Some(Block {
                addr,
                seq: w[1],
                size: m.size,
                stack: m.stack,
                api: m.api as u16,
                tail: (m.size - span(h, m.size, m.api)) as u16,
            })
        }
        _ => None,
    }
}

/// Slots sampled to choose the address at which two threads split the blocks.
const PIVOT_SAMPLES: u64 = 4096;

/// About the median address of the blocks in `pieces`, from live slots sampled evenly
/// across them (0 when none is found: then every block falls on one side, which is
/// still correct, only not shared).
fn pivot_of(mem: &dyn Memory, h: &Header, pieces: &[(u64, u64)]) -> u64 {
    const RUN: u64 = 64;
    let slots: u64 = pieces.iter().map(|&(s, e)| (e - s) / SLOT_BYTES).sum();
    let step = (slots / (PIVOT_SAMPLES / RUN)).max(RUN) * SLOT_BYTES;
    let mut addrs = Vec::new();
    let mut words = vec![0u64; 3 * RUN as usize];
    for &(s, e) in pieces {
        let mut at = s;
        while at + RUN * SLOT_BYTES <= e {
            if crate::capture::memory::read_into(mem, at, &mut words) {
                addrs.extend(
                    words
                        .chunks_exact(3)
                        .filter_map(|w| Some(live_block(h, w)?.addr)),
                );
            }
            at += step;
        }
    }
    if addrs.is_empty() {
        return 0;
    }
    let mid = addrs.len() / 2;
    *addrs.select_nth_unstable(mid).1
}

/// Merges two address-sorted block lists into `out` (at least their length), each
/// address once; returns how many blocks it wrote (fewer when an address was in both).
fn merge_into(a: &[Block], b: &[Block], out: &mut [std::mem::MaybeUninit<Block>]) -> usize {
    let (mut i, mut j, mut k) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        if a[i].addr <= b[j].addr {
            // The same block in both halves (being moved between tables): once.
            j += usize::from(a[i].addr == b[j].addr);
            out[k].write(a[i]);
            i += 1;
        } else {
            out[k].write(b[j]);
            j += 1;
        }
        k += 1;
    }
    for x in a[i..].iter().chain(&b[j..]) {
        out[k].write(*x);
        k += 1;
    }
    k
}

/// The result of a scoped thread, its panic passed on.
fn join<T>(t: std::thread::ScopedJoinHandle<'_, T>) -> T {
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// One sorted list from the sorted low parts and the sorted high parts (every low address
/// below every high one), each address once: two threads merge one side each.
fn merge_halves(lo: [&[Block]; 2], hi: [&[Block]; 2]) -> Vec<Block> {
    let n_lo = lo[0].len() + lo[1].len();
    let n = n_lo + hi[0].len() + hi[1].len();
    let mut blocks: Vec<Block> = Vec::with_capacity(n);
    crate::capture::memory::prefer_huge_pages(&blocks);
    let (out_lo, out_hi) = blocks.spare_capacity_mut()[..n].split_at_mut(n_lo);
    let (k_lo, k_hi) = std::thread::scope(|sc| {
        let other = sc.spawn(|| merge_into(hi[0], hi[1], out_hi));
        let mine = merge_into(lo[0], lo[1], out_lo);
        (mine, join(other))
    });
    if k_lo < n_lo {
        // Addresses in both lists (a block being moved between tables) left a gap.
        let base = blocks.as_mut_ptr();
        // SAFETY: both ranges lie within the capacity (n); `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(base.add(n_lo), base.add(k_lo), k_hi) };
    }
    // SAFETY: merge_into initialised the first k_lo elements and (after the copy) the
    // k_hi that follow; Block is Copy (nothing to drop).
    unsafe { blocks.set_len(k_lo + k_hi) };
    blocks
}

/// Up to this many distinct allocation stacks are read one by one (one small read each);
/// more, and the stack table's touched pages are read at once.
const FEW_STACKS: usize = 256;

/// Reads the live blocks (sorted by address, each once) and the stacks they use. Only
/// pages of the tables that were ever touched are read. A block being moved between two
/// tables may be in both: it is the same allocation.
///
/// Also returns the parts of the tables that could not be read: blocks recorded there are
/// unknown, so the capture has a gap.
pub fn read_blocks(mem: &(dyn Memory + Sync), h: &Header) -> TableRead {
    const STACK_WORDS: usize = std::mem::size_of::<StackSlot>() / 8;
    // The touched parts of the tables, in whole slots.
    let mut pieces = Vec::new();
    for t in read_tables(mem, h).0 {
        let end = t.addr + t.slots * SLOT_BYTES;
        for (s, e) in mem.present(t.addr, end) {
            let at = t.addr + (s - t.addr) / SLOT_BYTES * SLOT_BYTES;
            let e = (t.addr + (e - t.addr).div_ceil(SLOT_BYTES) * SLOT_BYTES).min(end);
            if at < e {
                pieces.push((at, e));
            }
        }
    }
    // Large tables are read by two threads, each splitting its half of the slots at about
    // the median address and sorting both parts; then one thread merges the low parts
    // and the other the high parts, each into its own end of the result: no step copies
    // all blocks on one thread, and fresh memory (slow to fault in) is touched once by
    // each thread.
    let total: u64 = pieces.iter().map(|&(s, e)| e - s).sum();
    let (blocks, unread) = if total < PARALLEL_TABLE_BYTES {
        let (mut blocks, _, unread) = read_split(mem, h, &pieces, u64::MAX);
        blocks.dedup_by_key(|b| b.addr);
        (blocks, unread)
    } else {
        let pivot = pivot_of(mem, h, &pieces);
        let (first, second) = halves(&pieces, total / 2 / SLOT_BYTES * SLOT_BYTES);
        let ((a_lo, a_hi, mut unread), (b_lo, b_hi, more)) = std::thread::scope(|sc| {
            let other = sc.spawn(|| read_split(mem, h, &second, pivot));
            let mine = read_split(mem, h, &first, pivot);
            (mine, join(other))
        });
        unread.extend(more);
        (merge_halves([&a_lo, &b_lo], [&a_hi, &b_hi]), unread)
    };
    let mut ids: Vec<u32> = blocks.iter().map(|b| b.stack).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() <= FEW_STACKS {
        // A few stacks (a small process): read one by one, not the whole 13 MiB table.
        let stacks = ids
            .into_iter()
            .filter_map(|id| Some((id, read_stack(mem, h, id)?)))
            .collect();
        return TableRead {
            blocks,
            stacks,
            unread,
        };
    }
    let raw = read_words(mem, h.stacks_addr, h.stack_slots as usize * STACK_WORDS);
    let mut stacks = HashMap::new();
    let mut seen = vec![false; raw.len() / STACK_WORDS];
    for b in &blocks {
        let Some(s) = raw.chunks_exact(STACK_WORDS).nth(b.stack as usize) else {
            continue;
        };
        if std::mem::replace(&mut seen[b.stack as usize], true) {
            continue;
        }
        // hash, then depth (low 32 bits) and padding, then the frames.
        if s[0] != 0 && s[0] != STACK_SLOT_BUSY {
            let d = (s[1] as u32 as usize).min(kal_proto::MAX_FRAMES);
            stacks.insert(b.stack, s[2..2 + d].to_vec());
        }
    }
    TableRead {
        blocks,
        stacks,
        unread,
    }
}

/// Reads one stack of the agent's stack table.
pub fn read_stack(mem: &dyn Memory, h: &Header, id: u32) -> Option<Vec<u64>> {
    if id as u64 >= h.stack_slots {
        return None;
    }
    let size = std::mem::size_of::<StackSlot>();
    let mut b = vec![0u8; size];
    mem.read(h.stacks_addr + id as u64 * size as u64, &mut b)
        .ok()?;
    let w: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if w[0] == 0 || w[0] == STACK_SLOT_BUSY {
        return None;
    }
    let d = (w[1] as u32 as usize).min(kal_proto::MAX_FRAMES);
    Some(w[2..2 + d].to_vec())
}

/// glibc's chunk size for a request (`request2size`).
pub fn glibc_chunk_size(size: u64) -> u64 {
    ((size + 8 + 15) & !15).max(32)
}

/// Pointers into `[addr, addr + span)` count as pointers into the block: with glibc, a
/// heap chunk's last 8 usable bytes are the next chunk's `prev_size` field, and the
/// allocator's own pointers to that next chunk must not count.
fn span(h: &Header, size: u64, api: u32) -> u64 {
    let flags = api >> kal_proto::CHUNK_FLAGS_SHIFT;
    if h.glibc_malloc != 0 && flags & kal_proto::CHUNK_IS_MMAPPED == 0 {
        size.min(glibc_chunk_size(size) - 16)
    } else {
        size
    }
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
    let timing = std::env::var_os("KAL_DEBUG_TIMING").is_some();
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
            crate::blocks::before_attach::merge(blocks, &*mem, &maps, &threads, &agent);
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

#[cfg(test)]
mod table_read_tests {
    use super::*;

    fn b(addr: u64) -> Block {
        Block {
            addr,
            size: 8,
            seq: addr,
            stack: 0,
            api: 0,
            tail: 0,
        }
    }

    #[test]
    fn halves_split_at_a_byte_offset_and_cover_everything() {
        let p = vec![(0, 48), (100, 196), (300, 324)];
        let (a, b) = halves(&p, 72);
        assert_eq!(a, vec![(0, 48), (100, 124)]);
        assert_eq!(b, vec![(124, 196), (300, 324)]);
        let (a, b) = halves(&p, 48);
        assert_eq!(a, vec![(0, 48)]);
        assert_eq!(b, vec![(100, 196), (300, 324)]);
    }

    #[test]
    fn merge_keeps_order_and_each_address_once() {
        let addrs = |v: Vec<Block>| v.iter().map(|x| x.addr).collect::<Vec<u64>>();
        let lo = ([1, 4, 5, 9].map(b), [2, 4, 9].map(b));
        let hi = ([12, 20].map(b), [12, 15, 30].map(b));
        let m = merge_halves([&lo.0, &lo.1], [&hi.0, &hi.1]);
        assert_eq!(addrs(m), vec![1, 2, 4, 5, 9, 12, 15, 20, 30]);
        // One side empty, duplicates only on the other.
        let m = merge_halves([&[], &[]], [&hi.0, &hi.1]);
        assert_eq!(addrs(m), vec![12, 15, 20, 30]);
        let m = merge_halves([&lo.0, &lo.1], [&[], &[]]);
        assert_eq!(addrs(m), vec![1, 2, 4, 5, 9]);
    }
}
