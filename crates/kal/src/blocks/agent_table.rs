//! Step 2 from the agent: the live blocks its allocation tables hold, with their stacks,
//! read from a captured process's memory (a snapshot copy, a frozen process at exit, or a
//! core file). The header ([`read_header`]) says where the tables, the stack table and
//! the agent's own memory are.

use super::Block;
use crate::capture::memory::{read_words, Memory};
use anyhow::{bail, Context, Result};
use kal_proto::{
    slot_state, table_state, Header, Meta, SlotState, StackSlot, TableDesc, TableWord, Window,
    MAGIC, MAX_TABLES, STACK_SLOT_BUSY, VERSION,
};
use std::collections::HashMap;

/// Reads a plain-old-data value of the agent's (`Header`, table words) at `addr`.
pub fn read_pod<T: Copy + Default>(mem: &dyn Memory, addr: u64) -> Option<T> {
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
pub const SLOT_BYTES: u64 = 24;

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
/// each part sorted by address with each address once (a block being moved between two
/// tables may be in both), and the parts of the tables that could not be read.
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
    for part in [&mut lo, &mut hi] {
        part.sort_unstable_by_key(|b| b.addr);
        part.dedup_by_key(|b| b.addr);
    }
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
        (mine, crate::join(other))
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

/// [`read_split`] of `pieces` by two threads (a half of the slots each), merged: sorted,
/// each address once.
fn read_in_two(
    mem: &(dyn Memory + Sync),
    h: &Header,
    pieces: &[(u64, u64)],
) -> (Vec<Block>, Pieces) {
    let total: u64 = pieces.iter().map(|&(s, e)| e - s).sum();
    let pivot = pivot_of(mem, h, pieces);
    let (first, second) = halves(pieces, total / 2 / SLOT_BYTES * SLOT_BYTES);
    let ((a_lo, a_hi, mut unread), (b_lo, b_hi, more)) = std::thread::scope(|sc| {
        let other = sc.spawn(|| read_split(mem, h, &second, pivot));
        let mine = read_split(mem, h, &first, pivot);
        (mine, crate::join(other))
    });
    unread.extend(more);
    (merge_halves([&a_lo, &b_lo], [&a_hi, &b_hi]), unread)
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
        let (blocks, _, unread) = read_split(mem, h, &pieces, u64::MAX);
        (blocks, unread)
    } else {
        read_in_two(mem, h, &pieces)
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

    /// Table slots (address, sequence, meta) at `base`, as memory.
    struct Slots {
        base: u64,
        words: Vec<u64>,
    }

    impl Memory for Slots {
        fn read(
            &self,
            addr: u64,
            buf: &mut [u8],
        ) -> Result<(), crate::capture::memory::Unreadable> {
            for (i, b) in buf.iter_mut().enumerate() {
                let off = (addr + i as u64 - self.base) as usize;
                *b = self
                    .words
                    .get(off / 8)
                    .map_or(0, |w| w.to_le_bytes()[off % 8]);
            }
            Ok(())
        }
    }

    #[test]
    fn two_threads_read_each_block_once_even_when_a_half_holds_it_twice() {
        let meta = Meta {
            size: 16,
            stack: 0,
            api: 0,
        }
        .pack()
        .unwrap();
        // 4,096 slots; block addresses from a shuffled order, every 7th slot empty, and
        // three blocks recorded twice (being moved between tables): twice in the first
        // half, twice in the second, once in each.
        let mut addrs: Vec<u64> = (0..4096u64)
            .map(|i| 0x10_0000 + (i * 2654435761 % 4096) * 32)
            .collect();
        addrs[10] = addrs[20];
        addrs[3000] = addrs[3500];
        addrs[100] = addrs[4000];
        let mut words = Vec::new();
        for (i, &a) in addrs.iter().enumerate() {
            let a = if i % 7 == 0 && ![10, 20, 3000, 3500, 100, 4000].contains(&i) {
                0
            } else {
                a
            };
            words.extend([a, i as u64, meta]);
        }
        let mem = Slots {
            base: 0x7000_0000,
            words,
        };
        let end = 0x7000_0000 + 4096 * SLOT_BYTES;
        let pieces = vec![
            (0x7000_0000, 0x7000_0000 + 1024 * SLOT_BYTES),
            (0x7000_0000 + 1024 * SLOT_BYTES, end),
        ];
        let h = Header::default();
        let (two, unread) = read_in_two(&mem, &h, &pieces);
        let (one, _, _) = read_split(&mem, &h, &pieces, u64::MAX);
        assert!(unread.is_empty());
        let addrs = |v: &[Block]| v.iter().map(|b| b.addr).collect::<Vec<u64>>();
        let mut want = addrs(&one);
        want.dedup();
        assert_eq!(addrs(&one), want, "one thread: each address once");
        assert_eq!(addrs(&two), want, "two threads: the same blocks");
        assert!(want.windows(2).all(|w| w[0] < w[1]));
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
