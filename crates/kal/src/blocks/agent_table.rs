//! Step 2 from the agent: the live blocks its allocation tables hold, with their stacks,
//! read from a captured process's memory (a snapshot copy, a frozen process at exit, or a
//! core file). The header ([`read_header`]) says where the tables, the stack table and
//! the agent's own memory are.

use super::{sided, Block};
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

/// Streams the live blocks of table `pieces` to `put`, through one reused buffer (whole
/// slots), and returns the parts of the tables that could not be read.
fn for_each_live(
    mem: &dyn Memory,
    h: &Header,
    pieces: &[(u64, u64)],
    mut put: impl FnMut(Block),
) -> Pieces {
    // Grown only as far as the longest run needs (a small process's exit report must not
    // zero 4 MiB for nothing).
    const BUF_WORDS: usize = 3 * 170 * 1024;
    let mut buf: Vec<u64> = Vec::new();
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
                    put(b);
                }
            }
            at += n as u64 * 8;
        }
    }
    unread
}

/// Slots in `pieces`: at most one live block each.
fn slot_count(pieces: &[(u64, u64)]) -> usize {
    pieces
        .iter()
        .map(|&(s, e)| (e - s) / SLOT_BYTES)
        .sum::<u64>() as usize
}

/// The live blocks of table `pieces` read by one thread, sorted by address, each address
/// once (a block being moved between two tables may be in both), and the parts of the
/// tables that could not be read.
fn read_sorted(mem: &dyn Memory, h: &Header, pieces: &[(u64, u64)]) -> (Vec<Block>, Pieces) {
    // At most one block a slot: reserved (not touched) up front, so the vector is never
    // copied as it grows. Untouched capacity costs nothing.
    let mut blocks = Vec::with_capacity(slot_count(pieces));
    crate::capture::memory::prefer_huge_pages(&blocks);
    let unread = for_each_live(mem, h, pieces, |b| blocks.push(b));
    blocks.sort_unstable_by_key(|b| b.addr);
    blocks.dedup_by_key(|b| b.addr);
    (blocks, unread)
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
    let slots = slot_count(pieces) as u64;
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

/// Sorts `v` by address and moves each address's first block to the front: returns how
/// many addresses there are.
fn sort_dedup(v: &mut [Block]) -> usize {
    v.sort_unstable_by_key(|b| b.addr);
    let mut k = 0;
    for i in 0..v.len() {
        if k == 0 || v[k - 1].addr != v[i].addr {
            v[k] = v[i];
            k += 1;
        }
    }
    k
}

/// The live blocks of table `pieces` read by two threads (half of the slots each),
/// sorted by address, each address once, and the parts of the tables that could not be
/// read. Each thread sends the blocks below about the median address to one side and the
/// others to the other side of one vector ([`sided`]); then each thread sorts one side.
/// No step copies all blocks on one thread, and the result is the only large vector
/// written (fresh memory is slow to fault in).
fn read_in_two(
    mem: &(dyn Memory + Sync),
    h: &Header,
    pieces: &[(u64, u64)],
) -> (Vec<Block>, Pieces) {
    let total: u64 = pieces.iter().map(|&(s, e)| e - s).sum();
    let pivot = pivot_of(mem, h, pieces);
    let (first, second) = halves(pieces, total / 2 / SLOT_BYTES * SLOT_BYTES);
    // At most one block a slot: reserved (not touched) up front.
    let mut blocks: Vec<Block> = Vec::with_capacity(slot_count(pieces));
    crate::capture::memory::prefer_huge_pages(&blocks);
    let ((a, mut unread), (b, more)) = {
        let chunks = sided::Chunks::new(blocks.spare_capacity_mut());
        let fill = |part: &[(u64, u64)]| {
            let mut w = sided::Writer::new(&chunks);
            let unread = for_each_live(mem, h, part, |b| w.push(b.addr >= pivot, b));
            (w.finish(), unread)
        };
        std::thread::scope(|sc| {
            let other = sc.spawn(|| fill(&second));
            let mine = fill(&first);
            (mine, crate::join(other))
        })
    };
    unread.extend(more);
    let n_lo = sided::assemble(&mut blocks, vec![a, b]);
    let (lo, hi) = blocks.split_at_mut(n_lo);
    let (k_lo, k_hi) = std::thread::scope(|sc| {
        let other = sc.spawn(|| sort_dedup(hi));
        let mine = sort_dedup(lo);
        (mine, crate::join(other))
    });
    if k_lo < n_lo {
        // A block recorded twice on the low side (being moved between tables).
        blocks.copy_within(n_lo..n_lo + k_hi, k_lo);
    }
    blocks.truncate(k_lo + k_hi);
    (blocks, unread)
}

/// Reads the live blocks (sorted by address, each once) and the stacks they use. Only
/// pages of the tables that were ever touched are read. A block being moved between two
/// tables may be in both: it is the same allocation.
///
/// Also returns the parts of the tables that could not be read: blocks recorded there are
/// unknown, so the capture has a gap.
pub fn read_blocks(mem: &(dyn Memory + Sync), h: &Header) -> TableRead {
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
    let t0 = std::time::Instant::now();
    let (blocks, unread) = if total < PARALLEL_TABLE_BYTES {
        read_sorted(mem, h, &pieces)
    } else {
        read_in_two(mem, h, &pieces)
    };
    if crate::debug::timing() {
        crate::say!(
            "timing: table slots read and sorted {:?} ({} MiB of slots)",
            t0.elapsed(),
            total >> 20
        );
    }
    let stacks = read_stacks(mem, h, &blocks);
    TableRead {
        blocks,
        stacks,
        unread,
    }
}

/// Stack slots read at once at most (in runs of the slots that `blocks` use).
const STACK_RUN: usize = 256;

/// The stacks that `blocks` use, by id.
fn read_stacks(mem: &dyn Memory, h: &Header, blocks: &[Block]) -> HashMap<u32, Vec<u64>> {
    const STACK_WORDS: usize = std::mem::size_of::<StackSlot>() / 8;
    // The ids in use, as a bitmap (ids are below the stack table's size; unknown ones
    // have no stack).
    let slots = h.stack_slots.min(kal_proto::STACK_SLOTS) as usize;
    let mut used = vec![0u64; slots.div_ceil(64)];
    for b in blocks {
        if let Some(w) = used.get_mut(b.stack as usize / 64) {
            *w |= 1 << (b.stack % 64);
        }
    }
    let ids: Vec<u32> = used
        .iter()
        .enumerate()
        .flat_map(|(k, &w)| {
            (0..64)
                .filter(move |&i| w >> i & 1 != 0)
                .map(move |i| (k * 64 + i) as u32)
        })
        .filter(|&id| (id as usize) < slots)
        .collect();
    // Runs of nearby ids are read at once (one read instead of many, and not the whole
    // 13 MiB table for a few thousand stacks).
    let mut stacks = HashMap::with_capacity(ids.len());
    let mut raw: Vec<u64> = Vec::new();
    let mut k = 0;
    while k < ids.len() {
        let first = ids[k] as usize;
        let mut last = first;
        let mut n = k + 1;
        while n < ids.len() && (ids[n] as usize) < first + STACK_RUN {
            last = ids[n] as usize;
            n += 1;
        }
        raw.resize((last + 1 - first) * STACK_WORDS, 0);
        let at = h.stacks_addr + (first * STACK_WORDS * 8) as u64;
        crate::capture::memory::read_into(mem, at, &mut raw);
        for &id in &ids[k..n] {
            let o = (id as usize - first) * STACK_WORDS;
            let s = &raw[o..o + STACK_WORDS];
            // hash, then depth (low 32 bits) and padding, then the frames.
            if s[0] != 0 && s[0] != STACK_SLOT_BUSY {
                let d = (s[1] as u32 as usize).min(kal_proto::MAX_FRAMES);
                stacks.insert(id, s[2..2 + d].to_vec());
            }
        }
        k = n;
    }
    stacks
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
        // 16,384 slots (several chunks of each side); block addresses from a shuffled
        // order, every 7th slot empty, and three blocks recorded twice (being moved
        // between tables): twice in the first half, twice in the second, once in each.
        const N: u64 = 16384;
        let mut addrs: Vec<u64> = (0..N)
            .map(|i| 0x10_0000 + (i * 2654435761 % N) * 32)
            .collect();
        addrs[10] = addrs[20];
        addrs[9000] = addrs[12000];
        addrs[100] = addrs[16000];
        let mut words = Vec::new();
        for (i, &a) in addrs.iter().enumerate() {
            let a = if i % 7 == 0 && ![10, 20, 9000, 12000, 100, 16000].contains(&i) {
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
        let end = 0x7000_0000 + N * SLOT_BYTES;
        let pieces = vec![
            (0x7000_0000, 0x7000_0000 + 1024 * SLOT_BYTES),
            (0x7000_0000 + 1024 * SLOT_BYTES, end),
        ];
        let h = Header::default();
        let (two, unread) = read_in_two(&mem, &h, &pieces);
        let (one, _) = read_sorted(&mem, &h, &pieces);
        assert!(unread.is_empty());
        let addrs = |v: &[Block]| v.iter().map(|b| b.addr).collect::<Vec<u64>>();
        let mut want = addrs(&one);
        want.dedup();
        assert_eq!(addrs(&one), want, "one thread: each address once");
        assert_eq!(addrs(&two), want, "two threads: the same blocks");
        assert!(want.windows(2).all(|w| w[0] < w[1]));
    }
}
