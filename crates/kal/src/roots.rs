//! Step 3a: the roots of the reachability scan.
//!
//! Roots are every mapping that may hold a pointer and is neither heap nor kal's own (the
//! rule is [`crate::capture::may_hold_roots`]: data and bss of every loaded object, private
//! and shared anonymous memory, memfd and SysV shm, read-only or writable; memory a fork
//! copy does not show as it is was read from the frozen target), every thread's stack from
//! its stack pointer up (minus the 128-byte red zone below it), every thread's static TLS
//! block, every thread's integer registers, and the pointers the kernel holds for the
//! process (epoll registrations' data, POSIX timers' `sigev_value`). Heap memory is scanned
//! only as the contents of reached blocks. What could not be read is in the capture's
//! [`crate::capture::Gaps`].
//!
//! Which memory is "heap": `[heap]`; with glibc's allocator, each block's chunk header says
//! whether it was mmapped (then exactly that chunk's mapping) or lives in a secondary arena
//! (then exactly that arena heap, from its `heap_info`); with another allocator, every
//! mapping that holds a live block.

use crate::capture::{active_side_slot, Block, Capture};
use crate::memory::Memory;
use crate::procfs::Mapping;
use crate::ranges::{normalize, subtract, subtract_sorted};
use kal_proto::Header;

/// glibc's `HEAP_MAX_SIZE` on 64-bit: secondary arena heaps are aligned to it.
const HEAP_MAX: u64 = 64 << 20;
/// The System V x86-64 red zone below the stack pointer.
pub(crate) const RED_ZONE: u64 = 128;
/// Bytes above the thread pointer that belong to the thread control block.
const TCB_SPAN: u64 = 0x900;

/// What the scanner starts from.
#[derive(Debug, Default)]
pub struct Roots {
    /// Memory ranges to scan word by word, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Register values.
    pub values: Vec<u64>,
}

/// Ranges of memory the allocator owns, from the blocks' recorded chunk flags.
pub fn heap_ranges(
    maps: &[Mapping],
    blocks: &[Block],
    h: &Header,
    mem: &dyn Memory,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.path == "[heap]")
        .map(|m| (m.start, m.end))
        .collect();
    let main_heap = out.clone();
    let mapping_of = |a: u64| {
        maps.iter()
            .find(|m| m.contains(a))
            .map(|m| (m.start, m.end))
    };
    let glibc = h.glibc_malloc != 0;
    let mut last: (u64, u64) = (0, 0);
    for b in blocks {
        if b.addr >= last.0 && b.addr < last.1 {
            continue;
        }
        let flags = b.api >> kal_proto::CHUNK_FLAGS_SHIFT;
        let r = if !glibc {
            mapping_of(b.addr)
        } else if flags & kal_proto::CHUNK_IS_MMAPPED != 0 {
            // The chunk's own mapping: its header page up to the end of the block's pages.
            Some((
                (b.addr - 16) & !4095,
                (b.addr + b.size.max(1) + 4095) & !4095,
            ))
        } else if flags & kal_proto::CHUNK_NON_MAIN_ARENA != 0 {
            // A secondary arena's heap: heap_info (ar_ptr, prev, size, …) at its aligned base.
            let base = b.addr & !(HEAP_MAX - 1);
            let mut w = [0u8; 8];
            let size = if mem.read(base + 16, &mut w).is_ok() {
                u64::from_le_bytes(w)
            } else {
                0
            };
            if size > 0 && size <= HEAP_MAX {
                Some((base, base + size))
            } else {
                mapping_of(b.addr)
            }
        } else if main_heap.iter().any(|r| b.addr >= r.0 && b.addr < r.1) {
            None
        } else {
            mapping_of(b.addr)
        };
        if let Some(r) = r {
            out.push(r);
            last = r;
        }
    }
    normalize(out)
}

/// Computes the roots of a capture.
pub fn roots(c: &Capture) -> Roots {
    // The blocks, sorted by address: subtracted in one pass, never copied or sorted.
    let blocks = || c.blocks.iter().map(|b| (b.addr, b.addr + b.size.max(1)));
    let tables = c.agent.clone();
    let mut live_stacks = Vec::new();
    let mut dead_stacks = Vec::new();
    let mut tls = Vec::new();
    let tls_size = if c.header.static_tls_size > 0 {
        c.header.static_tls_size
    } else {
        4096
    };
    let h = &c.header;
    let mut side_live = Vec::new();
    for t in &c.threads {
        let mut sp = t.sp();
        if let Some(slot) = active_side_slot(h, sp) {
            // Inside a hook: the used part of its side-stack slot, then its program stack
            // from the stack pointer the trampoline saved at the slot's top.
            side_live.push(slot);
            match c.image.word(slot.1 - 8) {
                Some(saved) => sp = saved,
                None => continue,
            }
        }
        if let Some(m) = c.maps.iter().find(|m| m.contains(sp)) {
            let from = sp.saturating_sub(RED_ZONE).max(m.start);
            live_stacks.push((from, m.end));
            dead_stacks.push((m.start, from));
        }
        let tp = t.thread_pointer();
        if tp > tls_size {
            tls.push((tp - tls_size, tp + TCB_SPAN));
        }
    }
    let mut excluded = c.heap_ranges.clone();
    excluded.extend_from_slice(&tables);
    excluded.extend_from_slice(&dead_stacks);
    let excluded = normalize(excluded);
    let general = c.root_maps.clone();
    let without_blocks = |r: Vec<(u64, u64)>, also: &[(u64, u64)]| {
        subtract_sorted(&subtract(&normalize(r), also), blocks())
    };
    let mut ranges = without_blocks(general, &excluded);
    let tables = normalize(tables);
    ranges.extend(without_blocks(live_stacks, &tables));
    ranges.extend(side_live);
    ranges.extend(without_blocks(tls, &tables));
    let mut values: Vec<u64> = c.threads.iter().flat_map(|t| t.values()).collect();
    values.extend(c.kernel_values.iter().map(|k| k.value));
    Roots {
        ranges: normalize(ranges),
        values,
    }
}
