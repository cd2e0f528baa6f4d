//! Step 1 and 2 of the pipeline: a consistent [`Capture`] of a process — registers of every
//! thread, mappings, the agent's live-block table with stacks, and a copy of the memory the
//! scanner needs — taken while the process is frozen.

use crate::freeze::{Frozen, ThreadRegs};
use crate::memory::{Image, Memory, ProcessMemory};
use crate::procfs::{self, Mapping};
use anyhow::{bail, Context, Result};
use kal_proto::{
    slot_state, AllocSlot, Header, SlotState, StackSlot, MAGIC, STACK_SLOT_BUSY, VERSION,
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

/// Everything the later steps need, detached from the process.
#[derive(Debug, Clone)]
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
    /// Copied writable memory (roots and heap).
    pub image: Image,
}

fn read_pod<T: Copy + Default>(mem: &dyn Memory, addr: u64) -> Option<T> {
    let mut v = T::default();
    // SAFETY: T is a plain-old-data repr(C) type (Header, AllocSlot); any bytes are valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut((&mut v as *mut T).cast::<u8>(), std::mem::size_of::<T>())
    };
    (mem.read(addr, bytes) == bytes.len()).then_some(v)
}

fn read_vec<T: Copy + Default>(mem: &dyn Memory, addr: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    // SAFETY: as in read_pod, over a Vec of n plain-old-data values.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * std::mem::size_of::<T>())
    };
    mem.read(addr, bytes);
    v
}

impl Default for StackSlotPod {
    fn default() -> Self {
        StackSlotPod(StackSlot {
            hash: 0,
            depth: 0,
            _pad: 0,
            frames: [0; kal_proto::MAX_FRAMES],
        })
    }
}
#[derive(Clone, Copy)]
struct StackSlotPod(StackSlot);

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

/// Reads the live blocks (sorted by address) and the stacks they use.
pub fn read_blocks(mem: &dyn Memory, h: &Header) -> (Vec<Block>, HashMap<u32, Vec<u64>>) {
    let slots: Vec<AllocSlot> = read_vec(mem, h.table_addr, h.table_slots as usize);
    let mut blocks: Vec<Block> = slots
        .iter()
        .filter_map(|s| match slot_state(s.addr) {
            SlotState::Live(addr) => Some(Block {
                addr,
                size: s.size,
                seq: s.seq,
                stack: s.stack,
                api: s.api,
                span: s.size,
            }),
            _ => None,
        })
        .collect();
    blocks.sort_unstable_by_key(|b| b.addr);
    blocks.dedup_by_key(|b| b.addr);
    let raw: Vec<StackSlotPod> = read_vec(mem, h.stacks_addr, h.stack_slots as usize);
    let mut stacks = HashMap::new();
    for b in &blocks {
        if stacks.contains_key(&b.stack) {
            continue;
        }
        if let Some(StackSlotPod(s)) = raw.get(b.stack as usize) {
            if s.hash != 0 && s.hash != STACK_SLOT_BUSY {
                let d = (s.depth as usize).min(kal_proto::MAX_FRAMES);
                stacks.insert(b.stack, s.frames[..d].to_vec());
            }
        }
    }
    (blocks, stacks)
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
    let mem = ProcessMemory::new(mem_pid);
    let header = read_header(&mem, header_addr)?;
    let maps = procfs::maps(mem_pid)?;
    let (blocks, stacks) = read_blocks(&mem, &header);
    let tables = agent_tables(&header);
    let mut ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| copyable(m))
        .flat_map(|m| crate::ranges::subtract(&[(m.start, m.end)], &tables))
        .collect();
    ranges.extend(
        threads
            .iter()
            .filter_map(|t| active_side_slot(&header, t.sp())),
    );
    let ranges = crate::ranges::normalize(ranges);
    let image = Image::copy(&mem, &ranges)?;
    let mut blocks = blocks;
    if header.glibc_malloc != 0 {
        glibc_spans(&mut blocks, &image);
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
    })
}

/// Shortens each glibc heap block's pointer span to end at the next chunk's header.
pub fn glibc_spans(blocks: &mut [Block], image: &Image) {
    const IS_MMAPPED: u64 = 2;
    for b in blocks {
        let Some(w) = b.addr.checked_sub(8).and_then(|a| image.word(a)) else {
            continue;
        };
        let chunk = w & !7;
        if w & IS_MMAPPED == 0 && chunk >= 32 && chunk <= b.size + 64 {
            b.span = b.size.min(chunk - 16);
        }
    }
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

/// The agent's own table mappings, never scanned as roots.
pub fn agent_tables(h: &Header) -> Vec<(u64, u64)> {
    let mut v = vec![
        (
            h.table_addr,
            h.table_addr + h.table_slots * std::mem::size_of::<AllocSlot>() as u64,
        ),
        (
            h.stacks_addr,
            h.stacks_addr + h.stack_slots * std::mem::size_of::<StackSlot>() as u64,
        ),
        (h.side_addr, h.side_addr + h.side_len),
    ];
    v.sort_unstable();
    v
}
