//! Step 1 and 2 of the pipeline: a consistent [`Capture`] of a process — registers of every
//! thread, mappings, the agent's live-block table with stacks, a copy of the (small) root
//! memory, and a handle on the heap, whose blocks the scanner reads as it reaches them.

use crate::freeze::{Frozen, ThreadRegs};
use crate::memory::{read_words, Image, Memory, ProcessMemory};
use crate::procfs::{self, Mapping};
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
    /// The allocation API (`kal_proto::Api` as u32).
    pub api: u32,
    /// Pointers into `[addr, addr + span)` refer to this block. Usually `size`; with
    /// glibc's allocator it stops where the next chunk's header begins (the allocator's own
    /// pointers to that header are not pointers into this block).
    pub span: u64,
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

/// Resident bytes of the parts of each range set in process `pid`, from one read of smaps.
fn resident_in<const N: usize>(pid: i32, sets: [&[(u64, u64)]; N]) -> [u64; N] {
    let mut total = [0u64; N];
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return total;
    };
    let mut cur: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(m) = procfs::parse_maps(line).into_iter().next() {
            cur = Some((m.start, m.end));
        } else if let (Some((s, e)), Some(kb)) = (cur, line.strip_prefix("Rss:")) {
            let rss = kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024;
            for (t, ranges) in total.iter_mut().zip(sets) {
                let overlap: u64 = ranges
                    .iter()
                    .map(|r| r.1.min(e).saturating_sub(r.0.max(s)))
                    .sum();
                if overlap > 0 {
                    *t += (rss as u128 * overlap as u128 / (e - s) as u128) as u64;
                }
            }
        }
    }
    total
}

/// Computes the memory figures of a capture.
pub fn memory_stats(
    pid: i32,
    mem_pid: i32,
    blocks: &[Block],
    heap: &[(u64, u64)],
    agent: &[(u64, u64)],
    h: &Header,
) -> MemoryStats {
    let live: u64 = blocks.iter().map(|b| b.size).sum();
    let [resident, agent_bytes] = resident_in(mem_pid, [heap, agent]);
    let arenas = if h.glibc_malloc != 0 {
        let mut bases: Vec<u64> = blocks
            .iter()
            .filter(|b| {
                (b.api >> kal_proto::CHUNK_FLAGS_SHIFT) & kal_proto::CHUNK_NON_MAIN_ARENA != 0
            })
            .map(|b| b.addr >> 26)
            .collect();
        bases.sort_unstable();
        bases.dedup();
        1 + bases.len() as u64
    } else {
        0
    };
    MemoryStats {
        rss_bytes: crate::control::rss(pid).unwrap_or(0),
        live_bytes: live,
        retained_bytes: resident.saturating_sub(live),
        arenas,
        agent_bytes,
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
    /// Copied writable memory that is not heap (where the roots are).
    pub image: Image,
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
}

fn read_pod<T: Copy + Default>(mem: &dyn Memory, addr: u64) -> Option<T> {
    let mut v = T::default();
    // SAFETY: T is a plain-old-data repr(C) type (Header, AllocSlot); any bytes are valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut((&mut v as *mut T).cast::<u8>(), std::mem::size_of::<T>())
    };
    (mem.read(addr, bytes) == bytes.len()).then_some(v)
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

/// Reads the live blocks (sorted by address, each once) and the stacks they use. Only
/// pages of the tables that were ever touched are read. A block being moved between two
/// tables may be in both: it is the same allocation.
pub fn read_blocks(mem: &dyn Memory, h: &Header) -> (Vec<Block>, HashMap<u32, Vec<u64>>) {
    const STACK_WORDS: usize = std::mem::size_of::<StackSlot>() / 8;
    // Stream the touched pages of each table through one reused buffer (whole slots).
    let mut buf = vec![0u64; 3 * 170 * 1024];
    let mut blocks: Vec<Block> = Vec::new();
    for t in read_tables(mem, h).0 {
        let end = t.addr + t.slots * SLOT_BYTES;
        for (s, e) in mem.present(t.addr, end) {
            let mut at = t.addr + (s - t.addr) / SLOT_BYTES * SLOT_BYTES;
            let e = (t.addr + (e - t.addr).div_ceil(SLOT_BYTES) * SLOT_BYTES).min(end);
            while at < e {
                let n = ((e - at) as usize / 8).min(buf.len());
                let words = &mut buf[..n];
                crate::memory::read_into(mem, at, words);
                blocks.extend(
                    words
                        .chunks_exact(3)
                        .filter_map(|w| match slot_state(w[0]) {
                            SlotState::Live(addr) => {
                                let m = Meta::unpack(w[2]);
                                Some(Block {
                                    addr,
                                    seq: w[1],
                                    size: m.size,
                                    stack: m.stack,
                                    api: m.api,
                                    span: span(h, m.size, m.api),
                                })
                            }
                            _ => None,
                        }),
                );
                at += n as u64 * 8;
            }
        }
    }
    blocks.sort_unstable_by_key(|b| b.addr);
    blocks.dedup_by_key(|b| b.addr);
    let raw = read_words(mem, h.stacks_addr, h.stack_slots as usize * STACK_WORDS);
    let mut stacks = HashMap::new();
    for b in &blocks {
        if stacks.contains_key(&b.stack) {
            continue;
        }
        let Some(s) = raw.chunks_exact(STACK_WORDS).nth(b.stack as usize) else {
            continue;
        };
        // hash, then depth (low 32 bits) and padding, then the frames.
        if s[0] != 0 && s[0] != STACK_SLOT_BUSY {
            let d = (s[1] as u32 as usize).min(kal_proto::MAX_FRAMES);
            stacks.insert(b.stack, s[2..2 + d].to_vec());
        }
    }
    (blocks, stacks)
}

/// Reads one stack of the agent's stack table.
pub fn read_stack(mem: &dyn Memory, h: &Header, id: u32) -> Option<Vec<u64>> {
    if id as u64 >= h.stack_slots {
        return None;
    }
    let size = std::mem::size_of::<StackSlot>();
    let mut b = vec![0u8; size];
    mem.read(h.stacks_addr + id as u64 * size as u64, &mut b);
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

/// Whether a mapping's contents should be copied: readable, writable, private, and not a
/// device or a kernel-special area.
pub fn copyable(m: &Mapping) -> bool {
    m.read
        && m.write
        && !m.path.starts_with("/dev/")
        && m.path != "[vvar]"
        && m.path != "[vsyscall]"
}

/// Captures a frozen process whose agent header lives at `header_addr`.
pub fn capture(frozen: &Frozen, header_addr: u64) -> Result<Capture> {
    capture_from(frozen.pid(), frozen.pid(), frozen.regs()?, header_addr)
}

/// Captures process `pid` from the memory of `mem_pid` (the process itself, frozen, or a
/// snapshot copy of it) and the registers `threads` taken at the same instant.
pub fn capture_from(
    pid: i32,
    mem_pid: i32,
    threads: Vec<ThreadRegs>,
    header_addr: u64,
) -> Result<Capture> {
    let t0 = std::time::Instant::now();
    let timing = std::env::var_os("KAL_DEBUG_TIMING").is_some();
    let mem = ProcessMemory::new(mem_pid);
    let header = read_header(&mem, header_addr)?;
    let maps = procfs::maps(mem_pid)?;
    let (blocks, stacks) = read_blocks(&mem, &header);
    if timing {
        eprintln!(
            "timing: table read {:?} ({} blocks)",
            t0.elapsed(),
            blocks.len()
        );
    }
    let agent = agent_ranges(&mem, &header);
    let heap_ranges = crate::ranges::subtract(
        &crate::roots::heap_ranges(&maps, &blocks, &header, &mem),
        &agent,
    );
    let mut skip = agent.clone();
    skip.extend_from_slice(&heap_ranges);
    let skip = crate::ranges::normalize(skip);
    let mut ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| copyable(m))
        .flat_map(|m| crate::ranges::subtract(&[(m.start, m.end)], &skip))
        .collect();
    ranges.extend(
        threads
            .iter()
            .filter_map(|t| active_side_slot(&header, t.sp())),
    );
    let ranges = crate::ranges::normalize(ranges);
    let t1 = std::time::Instant::now();
    let image = Image::copy(&mem, &ranges)?;
    if timing {
        eprintln!(
            "timing: root memory copy {:?} ({} KiB)",
            t1.elapsed(),
            image.bytes() >> 10
        );
    }
    let memory = memory_stats(pid, mem_pid, &blocks, &heap_ranges, &agent, &header);
    let n = (header.banned_len as usize).min(kal_proto::MAX_BANNED);
    let mut raw = vec![0u8; n * 4];
    if n > 0 {
        mem.read(header.banned_addr, &mut raw);
    }
    let banned: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut stacks = stacks;
    for &id in &banned {
        if let (false, Some(st)) = (stacks.contains_key(&id), read_stack(&mem, &header, id)) {
            stacks.insert(id, st);
        }
    }
    Ok(Capture {
        pid,
        exe: procfs::exe(pid),
        threads,
        maps,
        header,
        blocks,
        stacks,
        image,
        heap_ranges,
        heap: Box::new(mem),
        memory,
        banned,
        agent,
    })
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
    ]);
    crate::ranges::normalize(v)
}
