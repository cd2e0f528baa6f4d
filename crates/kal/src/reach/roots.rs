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
//! Not roots: the stacks of threads that have exited ([`exited_thread_stacks`]). glibc
//! keeps a finished thread's stack mapping (its `struct pthread` at the top) in its cache
//! for the next thread; the words left there are stale, and memcheck does not scan them.
//! Their static TLS and thread control block stay roots: glibc still uses the latter (its
//! DTV, a joinable thread's result).
//!
//! Which memory is "heap": `[heap]`; with glibc's allocator, each block's chunk header says
//! whether it was mmapped (then exactly that chunk's mapping) or lives in a secondary arena
//! (then exactly that arena heap, from its `heap_info`); with another allocator, every
//! mapping that holds a live block.

use crate::blocks::Block;
use crate::capture::memory::Memory;
use crate::capture::procfs::Mapping;
use crate::capture::{active_side_slot, Capture};
use crate::reach::ranges::{normalize, subtract, subtract_sorted};
use kal_proto::Header;

/// glibc's `HEAP_MAX_SIZE` on 64-bit: secondary arena heaps are aligned to it.
const HEAP_MAX: u64 = 64 << 20;
/// The System V x86-64 red zone below the stack pointer.
pub(crate) const RED_ZONE: u64 = 128;
/// Bytes above the thread pointer that belong to the thread control block.
const TCB_SPAN: u64 = 0x900;
/// glibc's thread control block (`struct pthread`, x86-64; glibc 2.36 checked against
/// libc6-dbg's `ptype/o struct pthread`): offsets of `tid` (0 once
/// the thread has exited: the kernel clears it) and of the `user_stack` flag.
mod tcb {
    /// `tid` (`pid_t`).
    pub const TID: u64 = 720;
    /// `user_stack` (`bool`), the third byte of the word at 1552.
    pub const USER_STACK_WORD: u64 = 1552;
    /// Bit shift of `user_stack` within that word.
    pub const USER_STACK_SHIFT: u64 = 16;
    /// Bytes at the top of a stack mapping searched for the control block.
    pub const TAIL: u64 = 16 << 10;
}

/// What the scanner starts from.
#[derive(Debug, Default)]
pub struct Roots {
    /// Memory ranges to scan word by word, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Register values.
    pub values: Vec<u64>,
    /// The dynamic loader's writable data: a pointer found there into the middle of a
    /// block is the loader's own handle on it (`_dl_find_object`'s segments are held by
    /// their object arrays, after a header), and reaches it as a pointer to its start.
    pub loader: Vec<(u64, u64)>,
}

impl Roots {
    /// Whether the root word at `at` lies in the loader's writable data.
    pub fn in_loader(&self, at: u64) -> bool {
        self.loader.iter().any(|&(s, e)| s <= at && at < e)
    }
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
        let flags = b.chunk_flags();
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

/// The parts of the stacks of exited threads that are not roots: `[mapping start, static
/// TLS)` of each private anonymous read-write mapping that has a guard page (an
/// inaccessible mapping) right below it and a glibc thread control block at its top
/// (`tcb` and `self` words holding its own address, 64-aligned) whose thread is gone: it
/// is no thread's thread pointer, its `tid` is not positive (the kernel clears it when
/// the thread ends; glibc's cache holds -1) and its stack is glibc's (not one the
/// program gave). The static TLS starts at the lowest address the thread's DTV gives a
/// module below the control block (without a readable DTV: the capture's static TLS size
/// below it). A control block found that fails any test keeps its stack a root.
pub fn exited_thread_stacks(c: &Capture) -> Vec<(u64, u64)> {
    let tls_size = if c.header.static_tls_size > 0 {
        c.header.static_tls_size
    } else {
        4096
    };
    let live: std::collections::HashSet<u64> =
        c.threads.iter().map(|t| t.thread_pointer()).collect();
    let mut out = Vec::new();
    for pair in c.maps.windows(2) {
        let (guard, m) = (&pair[0], &pair[1]);
        let guarded = guard.end == m.start && !guard.read && !guard.write && !guard.exec;
        if !guarded || !m.path.is_empty() || m.shared || !m.read || !m.write || m.exec {
            continue;
        }
        let tail = m.start.max(m.end.saturating_sub(tcb::TAIL));
        let Some(w) = c.image.words(tail, m.end - tail) else {
            continue;
        };
        let word = |a: u64| w.get(((a - tail) / 8) as usize).copied();
        let found = (0..w.len().saturating_sub(2)).rev().find_map(|i| {
            let a = tail + 8 * i as u64;
            (a.is_multiple_of(64) && w[i] == a && w[i + 2] == a && a + TCB_SPAN <= m.end)
                .then_some(a)
        });
        let Some(tp) = found else { continue };
        let (Some(tid), Some(flags)) = (word(tp + tcb::TID), word(tp + tcb::USER_STACK_WORD))
        else {
            continue;
        };
        let user_stack = (flags >> tcb::USER_STACK_SHIFT) & 0xff != 0;
        if live.contains(&tp) || tid as u32 as i32 > 0 || user_stack {
            continue;
        }
        let tls = word(tp + 8)
            .and_then(|dtv| static_tls_start(c, dtv, m.start, tp))
            .unwrap_or(tp.saturating_sub(tls_size));
        if tls > m.start {
            out.push((m.start, tls));
        }
    }
    out
}

/// The lowest address in `[low, tp)` that the DTV at `dtv` (as installed in a thread
/// control block: its length at `dtv[-1]`, then one 16-byte entry per module from
/// `dtv[1]`, the first word the module's TLS block) gives a module: where a thread's
/// static TLS starts.
fn static_tls_start(c: &Capture, dtv: u64, low: u64, tp: u64) -> Option<u64> {
    const MAX_MODULES: u64 = 4096;
    let read = |a: u64| {
        let mut b = [0u8; 8];
        c.heap.read(a, &mut b).ok().map(|_| u64::from_le_bytes(b))
    };
    let len = read(dtv.checked_sub(16)?)?;
    if len == 0 || len > MAX_MODULES {
        return None;
    }
    (1..=len)
        .filter_map(|k| read(dtv + 16 * k))
        .filter(|&v| v >= low && v < tp)
        .min()
        .map(|v| v & !7)
}

/// The static TLS and thread control block of the agent's server thread, whose stack is
/// the agent's own mapping (glibc puts them at the top of a thread's stack, found by the
/// control block's two pointers to itself): the rest of that stack is kal's and never a
/// root, but these are the thread's state, which the loader's data for it hangs from (its
/// DTV, the TLS blocks of modules opened later: with an agent loaded by `kal attach`,
/// blocks of glibc's heap the walk finds). The server thread is not frozen for a check,
/// so its thread pointer is not among the registers.
pub(crate) fn server_thread_tls(h: &Header, mem: &dyn Memory) -> Vec<(u64, u64)> {
    let (lo, hi) = (
        h.server_stack_addr,
        h.server_stack_addr + h.server_stack_len,
    );
    if h.server_stack_len < tcb::TAIL {
        return Vec::new();
    }
    let tail = hi - tcb::TAIL;
    let w = crate::capture::memory::read_words(mem, tail, (tcb::TAIL / 8) as usize);
    let found = (0..w.len().saturating_sub(2)).rev().find_map(|i| {
        let a = tail + 8 * i as u64;
        (a.is_multiple_of(64) && w[i] == a && w[i + 2] == a && a + TCB_SPAN <= hi).then_some(a)
    });
    let tls_size = if h.static_tls_size > 0 {
        h.static_tls_size
    } else {
        4096
    };
    found
        .map(|tp| vec![(tp.saturating_sub(tls_size).max(lo), tp + TCB_SPAN)])
        .unwrap_or_default()
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
    excluded.extend(exited_thread_stacks(c));
    let excluded = normalize(excluded);
    let general = c.root_maps.clone();
    let without_blocks = |r: Vec<(u64, u64)>, also: &[(u64, u64)]| {
        subtract_sorted(&subtract(&normalize(r), also), blocks())
    };
    let mut ranges = without_blocks(general, &excluded);
    let tables = normalize(tables);
    ranges.extend(without_blocks(live_stacks, &tables));
    ranges.extend(side_live);
    let server_tls = server_thread_tls(&c.header, c.heap.as_ref());
    let tls_tables = if server_tls.is_empty() {
        tables.clone()
    } else {
        subtract(&tables, &normalize(server_tls.clone()))
    };
    tls.extend(server_tls);
    ranges.extend(without_blocks(tls, &tls_tables));
    let mut values: Vec<u64> = c.threads.iter().flat_map(|t| t.values()).collect();
    if c.header.glibc_malloc != 0 {
        // A thread stopped inside glibc's malloc or free holds the chunk it works on by
        // its header, 16 bytes before the block (the program's own pointer may be gone
        // already): a block in flight, not a lost one. Only registers count so: a chunk
        // header's address in memory is the allocator's bookkeeping of a free chunk.
        let headers: Vec<u64> = values.iter().map(|v| v.wrapping_add(16)).collect();
        values.extend(headers);
    }
    values.extend(c.kernel_values.iter().map(|k| k.value));
    let loader = c
        .maps
        .iter()
        .filter(|m| m.write && m.file_name().starts_with("ld-linux"))
        .map(|m| (m.start, m.end))
        .collect();
    Roots {
        ranges: normalize(ranges),
        values,
        loader,
    }
}
