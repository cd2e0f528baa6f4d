//! The live blocks of glibc's malloc (ptmalloc, glibc 2.36 on x86-64), read from the
//! process's memory alone: no agent, no debug symbols.
//!
//! How the heap is found:
//!
//! - the **main arena** (`main_arena`, a `struct malloc_state` in libc's data) by scanning
//!   libc's writable mappings for a structure whose layout checks out: lock and flag
//!   words in range, aligned `top` and fastbin heads, all 127 bin pairs either empty
//!   (pointing at themselves) or aligned pointers, a `next` list of arenas that closes on
//!   itself, `system_mem <= max_system_mem`; its chunks run from the start of `[heap]` to
//!   its `top` chunk;
//! - **thread arenas** through the `next` list: each sits right after the `heap_info` of
//!   the first 64 MiB-aligned heap it made (`ar_ptr`, `prev`, `size`, `mprotect_size`,
//!   `pagesize`); its heaps are found from `top` back through `prev`. Heaps found by
//!   scanning the anonymous mappings at 64 MiB boundaries but reached by no arena are
//!   reported as not walked;
//! - **mmapped chunks** (`IS_MMAPPED`) at page boundaries of the other anonymous mappings,
//!   by their header (`prev_size` 0, a page-multiple size that fits); a `memalign`ed one
//!   keeps the header of the whole mapping at its start and its own (`prev_size` = the
//!   offset) further in, which is looked for at each alignment.
//!
//! A chunk of an arena is in use when the next chunk's `PREV_INUSE` bit is set, except the
//! chunks in fastbins and in a thread's tcache, which keep that bit: every fastbin list of
//! every arena and every tcache list is followed (both are safe-linked since glibc 2.32:
//! a stored `next` is `(address of the field >> 12) ^ next`). A thread's tcache
//! (`tcache_perthread_struct`: `counts[64]` u16, `entries[64]`, a 0x290-byte chunk that is
//! not a program block) is named by a word of its TLS: the walk looks for the offset below
//! the thread pointer at which every thread holds 0 or the address of a chunk whose
//! contents check out as a tcache. A tcache of a thread whose thread pointer is unknown is
//! still recognised when it holds entries; an empty one then looks like a zeroed 0x280-byte
//! block, and the walk says how many of those it could not tell apart. A tcache its thread
//! was changing at the capture (stopped inside malloc or free) is still named by its TLS;
//! its lists are taken as free as far as they hold together, and the walk says so.
//! Likewise an arena whose lock was held: its bins may be half changed.
//!
//! The walk knows usable sizes, not requested ones ([`HeapBlock::usable`]).

use super::{BlockError, BlockList, BlockSource, HeapBlock, Unwalked};
use crate::capture::memory::{read_into, Memory};
use crate::capture::procfs::Mapping;
use std::collections::{HashMap, HashSet};

/// A thread arena's heaps are this big and this aligned (`HEAP_MAX_SIZE`).
pub const HEAP_MAX: u64 = 64 << 20;
/// `sizeof (heap_info)`.
const HEAP_INFO: u64 = 48;
/// `sizeof (struct malloc_state)` in glibc 2.36.
const STATE_BYTES: u64 = 2200;
const STATE_WORDS: usize = (STATE_BYTES / 8) as usize;
const MINSIZE: u64 = 32;
const PREV_INUSE: u64 = 1;
const IS_MMAPPED: u64 = 2;
const FLAGS: u64 = 7;
const PAGE: u64 = 4096;
/// Bytes below the thread pointer searched for the `tcache` variable.
const TLS_WINDOW: u64 = 8192;
const MAX_ARENAS: usize = 4096;
/// Longest free list followed before it is taken for a loop.
const MAX_LIST: usize = 1 << 24;
/// `request2size (sizeof (tcache_perthread_struct))`.
const TCACHE_CHUNK: u64 = 0x290;
const TCACHE_BINS: usize = 64;

/// Word indexes of the fields of `struct malloc_state` (glibc 2.36).
mod field {
    /// `mutex` (low half) and `flags` (high half).
    pub const LOCK_FLAGS: usize = 0;
    /// `have_fastchunks` (low half).
    pub const HAVE_FAST: usize = 1;
    /// `fastbinsY[10]`.
    pub const FASTBINS: usize = 2;
    /// `top`.
    pub const TOP: usize = 12;
    /// `bins[254]`.
    pub const BINS: usize = 14;
    /// `next`.
    pub const NEXT: usize = 270;
    /// `attached_threads`.
    pub const ATTACHED: usize = 272;
    /// `system_mem`.
    pub const SYSTEM_MEM: usize = 273;
    /// `max_system_mem`.
    pub const MAX_SYSTEM_MEM: usize = 274;
}

/// The walk of glibc's heap in one captured moment of a process.
pub struct Ptmalloc<'a> {
    /// The process's memory (frozen, a snapshot copy, a core file).
    pub mem: &'a dyn Memory,
    /// Its mappings.
    pub maps: &'a [Mapping],
    /// The thread pointers (`fs_base`) of its threads: their TLS names their tcaches.
    pub thread_pointers: &'a [u64],
    /// Memory that is never the allocator's, sorted and disjoint (kal's agent's own
    /// mappings, for example): never taken for mmapped chunks.
    pub exclude: &'a [(u64, u64)],
    /// Runs of pages kal's agent parked ([`kal_proto::park_state::PARKED`] only), sorted by
    /// start: a copy of the process reads zeros there, chunk headers included. The walk
    /// steps over them with what the agent noted when it parked each run.
    pub parked: &'a [kal_proto::ParkRun],
}

/// Reads words through a 64 KiB window (chunk walks are sequential).
struct Reader<'a> {
    mem: &'a dyn Memory,
    base: u64,
    buf: Vec<u64>,
    whole: bool,
}

const WINDOW: u64 = 64 << 10;

impl<'a> Reader<'a> {
    fn new(mem: &'a dyn Memory) -> Reader<'a> {
        Reader {
            mem,
            base: u64::MAX,
            buf: vec![0; (WINDOW / 8) as usize],
            whole: false,
        }
    }

    fn word(&mut self, addr: u64) -> Option<u64> {
        if !addr.is_multiple_of(8) {
            return self.direct(addr);
        }
        let base = addr & !(WINDOW - 1);
        if base != self.base {
            self.base = base;
            self.whole = read_into(self.mem, base, &mut self.buf);
        }
        if self.whole {
            Some(self.buf[((addr - base) / 8) as usize])
        } else {
            self.direct(addr)
        }
    }

    fn direct(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.mem.read(addr, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn words(&self, addr: u64, n: usize) -> Option<Vec<u64>> {
        let mut v = vec![0; n];
        read_into(self.mem, addr, &mut v).then_some(v)
    }
}

/// An arena: its address and its `malloc_state` words.
struct Arena {
    addr: u64,
    w: Vec<u64>,
}

impl Arena {
    fn top(&self) -> u64 {
        self.w[field::TOP]
    }
    fn locked(&self) -> bool {
        self.w[field::LOCK_FLAGS] as u32 != 0
    }
}

/// `heap_info`: `ar_ptr`, `prev`, `size`, `mprotect_size`, `pagesize`.
#[derive(Debug, Clone, Copy)]
struct HeapInfo {
    ar_ptr: u64,
    prev: u64,
    size: u64,
}

fn heap_info(r: &mut Reader, h: u64) -> Option<HeapInfo> {
    let w: Vec<u64> = (0..5).map(|i| r.word(h + 8 * i)).collect::<Option<_>>()?;
    let (ar_ptr, prev, size, mprotect, pagesize) = (w[0], w[1], w[2], w[3], w[4]);
    let ok = ar_ptr != 0
        && ar_ptr % 8 == 0
        && prev % HEAP_MAX == 0
        && size > 0
        && size <= HEAP_MAX
        && size % PAGE == 0
        && mprotect >= size
        && mprotect <= HEAP_MAX
        && pagesize.is_power_of_two()
        && pagesize >= PAGE;
    ok.then_some(HeapInfo { ar_ptr, prev, size })
}

/// Whether `w` (the words at `a`) has the layout of a glibc 2.36 `malloc_state`.
fn is_state(w: &[u64], a: u64) -> bool {
    let mutex = w[field::LOCK_FLAGS] as u32;
    let flags = (w[field::LOCK_FLAGS] >> 32) as u32;
    let have_fast = w[field::HAVE_FAST] as u32;
    let top = w[field::TOP];
    if mutex > 2 || flags & !7 != 0 || have_fast > 1 || top == 0 || !top.is_multiple_of(16) {
        return false;
    }
    if w[field::FASTBINS..field::FASTBINS + 10]
        .iter()
        .any(|&p| p % 16 != 0)
    {
        return false;
    }
    let mut empty = 0;
    for j in 0..127u64 {
        let me = a + 96 + 16 * j;
        let (fd, bk) = (
            w[field::BINS + 2 * j as usize],
            w[field::BINS + 2 * j as usize + 1],
        );
        if fd == me && bk == me {
            empty += 1;
        } else if fd == 0 || bk == 0 || fd % 16 != 0 || bk % 16 != 0 {
            return false;
        }
    }
    let next = w[field::NEXT];
    // A fragmented arena may have most bins in use, never all of them.
    empty >= 4
        && next != 0
        && next.is_multiple_of(8)
        && w[field::SYSTEM_MEM] <= w[field::MAX_SYSTEM_MEM]
        && w[field::ATTACHED] < 1 << 24
}

/// Validates and returns the tcache at `mem` (a 0x290-byte chunk's user address): the
/// chunk addresses on its lists, or `None` if its contents are not a tcache's.
fn tcache_lists(r: &mut Reader, mem: u64) -> Option<Vec<u64>> {
    let w = r.words(mem, 16 + TCACHE_BINS)?;
    let mut out = Vec::new();
    let mut key = None;
    for i in 0..TCACHE_BINS {
        let count = (w[i / 4] >> (16 * (i % 4))) as u16 as usize;
        let mut e = w[16 + i];
        if count == 0 {
            if e != 0 {
                return None;
            }
            continue;
        }
        let want = MINSIZE + 16 * i as u64;
        for _ in 0..count {
            if e == 0 || e % 16 != 0 {
                return None;
            }
            if r.word(e - 8)? & !FLAGS != want {
                return None;
            }
            // Every entry carries the same random `key` (double-free detection).
            let k = r.word(e + 8)?;
            if *key.get_or_insert(k) != k {
                return None;
            }
            out.push(e - 16);
            e = (e >> 12) ^ r.word(e)?;
        }
        if e != 0 {
            return None;
        }
    }
    Some(out)
}

/// The chunks on the lists of a tcache that does not check out (its thread was changing
/// it): each list followed for up to one entry more than its count, while its entries are
/// aligned chunks of the bin's size.
fn tcache_loose(r: &mut Reader, mem: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let Some(w) = r.words(mem, 16 + TCACHE_BINS) else {
        return out;
    };
    for i in 0..TCACHE_BINS {
        let count = (w[i / 4] >> (16 * (i % 4))) as u16 as usize;
        let want = MINSIZE + 16 * i as u64;
        let mut e = w[16 + i];
        for _ in 0..=count {
            if e == 0 || e % 16 != 0 || r.word(e - 8).map(|s| s & !FLAGS) != Some(want) {
                break;
            }
            out.push(e - 16);
            match r.word(e) {
                Some(next) => e = (e >> 12) ^ next,
                None => break,
            }
        }
    }
    out
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Whether `m` is private anonymous read-write memory.
fn anonymous_rw(m: &Mapping) -> bool {
    m.path.is_empty() && m.read && m.write && !m.shared
}

impl Ptmalloc<'_> {
    /// The ranges of libc's writable data (and its `.bss` continuation).
    fn libc_data(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let is_libc = |m: &Mapping| {
            let name = m.path.rsplit('/').next().unwrap_or("");
            m.is_file() && (name.starts_with("libc.so") || name.starts_with("libc-2."))
        };
        for (i, m) in self.maps.iter().enumerate() {
            if is_libc(m) && m.write {
                out.push((m.start, m.end));
                if let Some(n) = self.maps.get(i + 1) {
                    if anonymous_rw(n) && n.start == m.end {
                        out.push((n.start, n.end));
                    }
                }
            }
        }
        out
    }

    /// The parked run holding address `a`, if any.
    fn parked_at(&self, a: u64) -> Option<&kal_proto::ParkRun> {
        let i = self.parked.partition_point(|r| r.start() <= a);
        let r = self.parked.get(i.checked_sub(1)?)?;
        (a < r.end()).then_some(r)
    }

    /// Reads and validates the `malloc_state` at `a`.
    fn arena_at(&self, r: &Reader, a: u64) -> Option<Arena> {
        let w = r.words(a, STATE_WORDS)?;
        is_state(&w, a).then_some(Arena { addr: a, w })
    }

    /// The main arena: the structure in libc's data that has the layout and whose list
    /// of arenas closes on itself.
    /// The `[heap]` mapping (the main arena's heap), if the process has one.
    /// The `[heap]` range: one mapping, or several in a row (the kernel splits it where
    /// parts differ, for instance pages registered with userfaultfd by kal's parking).
    fn heap_mapping(&self) -> Option<(u64, u64)> {
        let i = self.maps.iter().position(|m| m.path == "[heap]")?;
        let mut range = (self.maps[i].start, self.maps[i].end);
        for m in &self.maps[i + 1..] {
            if m.path != "[heap]" || m.start != range.1 {
                break;
            }
            range.1 = m.end;
        }
        Some(range)
    }

    /// Addresses of every arena (`struct malloc_state`, whose first word is its mutex):
    /// the main arena, then the others through `next`.
    pub fn arena_addresses(&self) -> Result<Vec<u64>, BlockError> {
        let mut r = Reader::new(self.mem);
        let heap = self.heap_mapping();
        let main = self.main_arena(&mut r, heap)?;
        let mut out = vec![main.addr];
        let mut next = main.w[field::NEXT];
        while next != main.addr && next != 0 && out.len() < MAX_ARENAS {
            out.push(next);
            next = r.word(next + 8 * field::NEXT as u64).unwrap_or(main.addr);
        }
        Ok(out)
    }

    fn main_arena(&self, r: &mut Reader, heap: Option<(u64, u64)>) -> Result<Arena, BlockError> {
        let data = self.libc_data();
        if data.is_empty() {
            return Err(BlockError::NotFound(
                "no glibc (libc.so.6) is mapped in the process".into(),
            ));
        }
        let mut found = Vec::new();
        for (s, e) in data {
            let n = ((e - s) / 8) as usize;
            if !(STATE_WORDS..=(16 << 20) / 8).contains(&n) {
                continue;
            }
            let mut w = vec![0; n];
            read_into(self.mem, s, &mut w);
            for i in 0..=n - STATE_WORDS {
                let a = s + 8 * i as u64;
                let top = w[i + field::TOP];
                // Cheap first: an aligned top and a `next` link.
                if top == 0 || !top.is_multiple_of(16) || w[i + field::NEXT] == 0 {
                    continue;
                }
                if is_state(&w[i..i + STATE_WORDS], a) && self.closes(r, a, w[i + field::NEXT]) {
                    found.push(Arena {
                        addr: a,
                        w: w[i..i + STATE_WORDS].to_vec(),
                    });
                }
            }
        }
        if found.len() > 1 {
            // Prefer the one whose top chunk is in [heap] (or was never moved there).
            found.retain(|a| {
                let t = a.top();
                t == a.addr + 96 || heap.is_some_and(|(s, e)| t >= s && t < e)
            });
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(BlockError::NotFound(
                "no glibc malloc arena found in libc's data: the program uses another \
                 allocator, or a glibc whose malloc layout kal does not know (it knows 2.36)"
                    .into(),
            )),
            n => Err(BlockError::NotFound(format!(
                "{n} structures in libc's data look like glibc's main malloc arena; kal \
                 cannot tell which one is"
            ))),
        }
    }

    /// Whether the list of arenas from `main` (whose `next` is `next`) comes back to it.
    fn closes(&self, r: &mut Reader, main: u64, mut next: u64) -> bool {
        for _ in 0..MAX_ARENAS {
            if next == main {
                return true;
            }
            if !next.is_multiple_of(8) {
                return false;
            }
            match r.word(next + 8 * field::NEXT as u64) {
                Some(n) => next = n,
                None => return false,
            }
        }
        false
    }

    /// Walks the chunks from `p` up to `top` (when this heap holds it) or to the end
    /// fencepost before `end`; pushes the chunks marked in use.
    fn walk_chunks(
        &self,
        r: &mut Reader,
        mut p: u64,
        top: Option<u64>,
        end: u64,
        out: &mut Vec<HeapBlock>,
        un: &mut Vec<Unwalked>,
    ) {
        loop {
            if Some(p) == top {
                return;
            }
            if p + 16 > end {
                if top.is_some() || p < end {
                    un.push(Unwalked {
                        transient: false,
                        start: p.min(end),
                        end,
                        why: "chunk chain ends before the top chunk".into(),
                    });
                }
                return;
            }
            if let Some(run) = self.parked_at(p + 8) {
                // A chunk kal parked (a lost block the agent's table holds), or one of the
                // chunks after it inside the run: go on where the run's last chunk ends.
                match run.resume() {
                    Some(x) if x > p && x <= end => {
                        p = x;
                        continue;
                    }
                    _ => {
                        un.push(Unwalked {
                            transient: false,
                            start: p,
                            end,
                            why: "a chunk header in pages kal parked, without the chunk \
                                  that follows them"
                                .into(),
                        });
                        return;
                    }
                }
            }
            let Some(word) = r.word(p + 8) else {
                un.push(Unwalked {
                    transient: false,
                    start: p,
                    end,
                    why: "unreadable heap memory".into(),
                });
                return;
            };
            let size = word & !FLAGS;
            if size == 0 && top.is_none() {
                return; // the end fencepost of a heap the arena has left
            }
            if !size.is_multiple_of(16) || size < 16 || p + size > end || word & IS_MMAPPED != 0 {
                un.push(Unwalked {
                    transient: false,
                    start: p,
                    end,
                    why: format!("broken chunk chain (size word {word:#x})"),
                });
                return;
            }
            if size == 16 {
                p += 16; // a fencepost
                continue;
            }
            let next = p + size;
            let inuse = if next + 16 <= end {
                match self.parked_at(next + 8) {
                    // The next chunk's header was parked: its size word as it was then
                    // (any write since would have brought the run back).
                    Some(run) => run
                        .first_chunk()
                        .filter(|&(a, _)| a == next)
                        .map(|(_, w)| w & PREV_INUSE != 0),
                    None => r.word(next + 8).map(|w| w & PREV_INUSE != 0),
                }
            } else {
                None
            };
            match inuse {
                Some(true) => out.push(HeapBlock {
                    addr: p + 16,
                    usable: size - 8,
                    chunk: size,
                    flags: word & FLAGS,
                }),
                Some(false) => {}
                None => {
                    un.push(Unwalked {
                        transient: false,
                        start: p,
                        end,
                        why: "the chunk after a chunk cannot be read".into(),
                    });
                    return;
                }
            }
            p = next;
        }
    }

    /// Walks every heap of arena `a`; returns the heaps (base addresses) walked.
    fn walk_arena(
        &self,
        r: &mut Reader,
        a: &Arena,
        main: bool,
        heap: Option<(u64, u64)>,
        out: &mut Vec<HeapBlock>,
        un: &mut Vec<Unwalked>,
    ) -> Vec<u64> {
        let top = a.top();
        let system_mem = a.w[field::SYSTEM_MEM];
        if main {
            if top == a.addr + 96 {
                return Vec::new(); // never used
            }
            let Some((s, e)) = heap.filter(|&(s, e)| top >= s && top < e) else {
                un.push(Unwalked {
                    transient: false,
                    start: 0,
                    end: 0,
                    why: format!(
                        "the main arena's top chunk {top:#x} is outside [heap]: its memory \
                         was not walked"
                    ),
                });
                return Vec::new();
            };
            self.walk_chunks(r, align_up(s, 16), Some(top), e, out, un);
            let top_end = top + (r.word(top + 8).unwrap_or(0) & !FLAGS);
            if top_end.saturating_sub(s) != system_mem {
                un.push(Unwalked {
                    transient: false,
                    start: 0,
                    end: 0,
                    why: format!(
                        "the main arena holds {system_mem} bytes but [heap] up to its top \
                         chunk's end covers {}: memory it got elsewhere was not walked",
                        top_end.saturating_sub(s)
                    ),
                });
            }
            return Vec::new();
        }
        let mut heaps = Vec::new();
        let mut total = 0;
        let mut h = top & !(HEAP_MAX - 1);
        for _ in 0..MAX_ARENAS {
            let Some(info) = heap_info(r, h).filter(|i| i.ar_ptr == a.addr) else {
                un.push(Unwalked {
                    transient: false,
                    start: h,
                    end: h + HEAP_INFO,
                    why: format!("no valid heap_info of arena {:#x}", a.addr),
                });
                break;
            };
            heaps.push(h);
            total += info.size;
            let first = if h + HEAP_INFO == a.addr {
                align_up(a.addr + STATE_BYTES + 16, 16) - 16
            } else {
                h + HEAP_INFO
            };
            let end = h + info.size;
            let holds_top = top >= h && top < end;
            self.walk_chunks(r, first, holds_top.then_some(top), end, out, un);
            if info.prev == 0 {
                break;
            }
            h = info.prev;
        }
        if total != system_mem {
            un.push(Unwalked {
                transient: false,
                start: 0,
                end: 0,
                why: format!(
                    "arena {:#x} holds {system_mem} bytes but its heaps add up to {total}",
                    a.addr
                ),
            });
        }
        heaps
    }

    /// The chunks on arena `a`'s fastbin lists.
    fn fastbins(&self, r: &mut Reader, a: &Arena, free: &mut HashSet<u64>, un: &mut Vec<Unwalked>) {
        for i in 0..10 {
            let want = MINSIZE + 16 * i as u64;
            let mut p = a.w[field::FASTBINS + i];
            let mut n = 0;
            while p != 0 {
                let size = r.word(p + 8).map(|w| w & !FLAGS);
                if !p.is_multiple_of(16) || n > MAX_LIST || size != Some(want) {
                    un.push(Unwalked {
                        transient: false,
                        start: 0,
                        end: 0,
                        why: format!(
                            "fastbin {i} of arena {:#x} is inconsistent at {p:#x}: chunks \
                             on it may be taken for live blocks",
                            a.addr
                        ),
                    });
                    break;
                }
                free.insert(p);
                let Some(fd) = r.word(p + 16) else { break };
                p = ((p + 16) >> 12) ^ fd;
                n += 1;
            }
        }
    }

    /// The in-use mmapped chunks in the anonymous mappings outside `skip`.
    fn mmapped(&self, r: &mut Reader, skip: &[(u64, u64)], out: &mut Vec<HeapBlock>) {
        let anon: Vec<(u64, u64)> = self
            .maps
            .iter()
            .filter(|m| anonymous_rw(m))
            .filter(|m| !self.thread_pointers.iter().any(|&tp| m.contains(tp)))
            .map(|m| (m.start, m.end))
            .collect();
        let ranges = crate::reach::ranges::subtract(&crate::reach::ranges::normalize(anon), skip);
        for (s, e) in ranges {
            let mut q = align_up(s, PAGE);
            for (ps, pe) in self.mem.present(s, e) {
                q = q.max(align_up(ps, PAGE));
                while q + 16 <= pe {
                    match self.mmapped_at(r, q, e) {
                        Some((b, end)) => {
                            out.push(b);
                            q = end;
                        }
                        None => q += PAGE,
                    }
                }
            }
        }
    }

    /// An mmapped chunk whose mapping starts at `q` (before `limit`): its block and the
    /// mapping's end.
    fn mmapped_at(&self, r: &mut Reader, q: u64, limit: u64) -> Option<(HeapBlock, u64)> {
        let (prev, word) = (r.word(q)?, r.word(q + 8)?);
        let size = word & !FLAGS;
        if prev != 0 || word & FLAGS != IS_MMAPPED || size < PAGE || !size.is_multiple_of(PAGE) {
            return None;
        }
        if q + size > limit {
            return None;
        }
        // `memalign` keeps the mapping's header and puts its chunk further in, at the first
        // aligned place at least MINSIZE in, with prev_size = its offset.
        let mut align = 32;
        while align <= size / 2 {
            let m = q + 16;
            if !m.is_multiple_of(align) {
                let mut at = align_up(m, align) - 16;
                if at - q < MINSIZE {
                    at += align;
                }
                let o = at - q;
                if o < size
                    && r.word(at) == Some(o)
                    && r.word(at + 8) == Some((size - o) | IS_MMAPPED)
                {
                    let b = HeapBlock {
                        addr: at + 16,
                        usable: size - o - 16,
                        chunk: size - o,
                        flags: IS_MMAPPED,
                    };
                    return Some((b, q + size));
                }
            }
            align *= 2;
        }
        let b = HeapBlock {
            addr: q + 16,
            usable: size - 16,
            chunk: size,
            flags: IS_MMAPPED,
        };
        Some((b, q + size))
    }

    /// Thread pointers found in memory: a thread's control block starts with `tcb` and
    /// has `self` two words further, both its own address. Looked for in the last 16 KiB
    /// of each anonymous mapping (glibc puts it at the top of a thread's stack) and in the
    /// dynamic loader's data (the main thread's). Exited threads' cached stacks keep
    /// theirs, with a tcache pointer of 0.
    fn thread_control_blocks(&self, r: &Reader) -> Vec<u64> {
        const TAIL: u64 = 16 << 10;
        let mut out = Vec::new();
        for m in self.maps {
            let loader = m.is_file() && m.write && m.path.contains("/ld-linux");
            if !(anonymous_rw(m) || loader) {
                continue;
            }
            let start = if loader {
                m.start
            } else {
                m.start.max(m.end.saturating_sub(TAIL))
            };
            let Some(w) = r.words(start, ((m.end - start) / 8) as usize) else {
                continue;
            };
            for i in 0..w.len().saturating_sub(2) {
                let a = start + 8 * i as u64;
                if a.is_multiple_of(64) && w[i] == a && w[i + 2] == a {
                    out.push(a);
                }
            }
        }
        out
    }

    /// The tcaches named by a word at one offset below the thread pointers: at that
    /// offset each thread whose registers are known holds 0 or the user address of an
    /// in-use 0x290-byte chunk (`sized`), and one at least a chunk whose contents check
    /// out as a tcache (`valid`); without registers, the same of each thread whose control
    /// block was found. Threads whose registers are unknown (a thread kal did not stop)
    /// are found by their control block. A named chunk that is not `valid` is the tcache
    /// of a thread stopped while it changed it.
    fn tls_tcaches(&self, r: &Reader, sized: &HashSet<u64>, valid: &HashSet<u64>) -> HashSet<u64> {
        let n = (TLS_WINDOW / 8) as usize;
        // The window may start below the mapping that holds the TLS: what cannot be read
        // is zeros, which name no tcache.
        let tls = |tps: &[u64]| -> Vec<Vec<u64>> {
            tps.iter()
                .filter(|&&tp| tp > TLS_WINDOW)
                .map(|&tp| {
                    let mut v = vec![0; n];
                    read_into(r.mem, tp - TLS_WINDOW, &mut v);
                    v
                })
                .collect()
        };
        let known = tls(self.thread_pointers);
        let found = tls(&self.thread_control_blocks(r));
        let basis = if known.is_empty() { &found } else { &known };
        let mut out = HashSet::new();
        for k in 0..n {
            let mut any = false;
            let ok = basis.iter().all(|t| {
                let v = t[k];
                any |= valid.contains(&v);
                v == 0 || sized.contains(&v)
            });
            if ok && any {
                out.extend(
                    known
                        .iter()
                        .chain(&found)
                        .map(|t| t[k])
                        .filter(|v| sized.contains(v)),
                );
            }
        }
        out
    }
}

impl BlockSource for Ptmalloc<'_> {
    fn live_blocks(&self) -> Result<BlockList, BlockError> {
        let mut r = Reader::new(self.mem);
        let heap = self.heap_mapping();
        let main = self.main_arena(&mut r, heap)?;
        let mut un = Vec::new();
        // The other arenas, through `next`.
        let mut arenas = vec![main];
        let mut next = arenas[0].w[field::NEXT];
        while next != arenas[0].addr && arenas.len() < MAX_ARENAS {
            let base = next.wrapping_sub(HEAP_INFO);
            let ok =
                base % HEAP_MAX == 0 && heap_info(&mut r, base).is_some_and(|i| i.ar_ptr == next);
            match self.arena_at(&r, next).filter(|_| ok) {
                Some(a) => {
                    next = a.w[field::NEXT];
                    arenas.push(a);
                }
                None => {
                    un.push(Unwalked {
                        transient: false,
                        start: next,
                        end: next + STATE_BYTES,
                        why: "an arena on the list does not check out; the arenas after it \
                              were not walked"
                            .into(),
                    });
                    break;
                }
            }
        }
        let mut chunks = Vec::new();
        let mut walked: Vec<u64> = Vec::new();
        let mut free = HashSet::new();
        for (i, a) in arenas.iter().enumerate() {
            if a.locked() {
                un.push(Unwalked {
                    transient: true,
                    start: 0,
                    end: 0,
                    why: format!(
                        "arena {:#x} was locked at the capture: a thread was inside the \
                         allocator and its lists may be half changed",
                        a.addr
                    ),
                });
            }
            walked.extend(self.walk_arena(&mut r, a, i == 0, heap, &mut chunks, &mut un));
            self.fastbins(&mut r, a, &mut free, &mut un);
        }
        // Arena heaps that no arena reaches.
        let mut skip: Vec<(u64, u64)> = self.exclude.to_vec();
        skip.extend(heap);
        for m in self.maps.iter().filter(|m| anonymous_rw(m)) {
            let mut h = align_up(m.start, HEAP_MAX);
            while h + HEAP_INFO <= m.end {
                if let Some(info) = heap_info(&mut r, h) {
                    skip.push((h, h + HEAP_MAX));
                    if !walked.contains(&h) {
                        un.push(Unwalked {
                            transient: false,
                            start: h,
                            end: h + info.size,
                            why: "an arena heap that no arena's list reaches".into(),
                        });
                    }
                }
                h += HEAP_MAX;
            }
        }
        skip.extend(walked.iter().map(|&h| (h, h + HEAP_MAX)));
        let skip = crate::reach::ranges::normalize(skip);
        self.mmapped(&mut r, &skip, &mut chunks);
        // Tcaches: 0x290-byte chunks whose contents check out, named by the threads' TLS.
        let mut lists: HashMap<u64, Vec<u64>> = HashMap::new();
        for b in &chunks {
            if b.chunk == TCACHE_CHUNK && b.flags & IS_MMAPPED == 0 {
                if let Some(l) = tcache_lists(&mut r, b.addr) {
                    lists.insert(b.addr, l);
                }
            }
        }
        let valid: HashSet<u64> = lists.keys().copied().collect();
        let sized: HashSet<u64> = chunks
            .iter()
            .filter(|b| b.chunk == TCACHE_CHUNK && b.flags & IS_MMAPPED == 0)
            .map(|b| b.addr)
            .collect();
        let mut tcaches = self.tls_tcaches(&r, &sized, &valid);
        for &t in tcaches.difference(&valid) {
            // A thread stopped inside malloc or free, between two writes to its tcache:
            // what its lists hold is taken as free as far as they hold together.
            lists.insert(t, tcache_loose(&mut r, t));
            un.push(Unwalked {
                transient: true,
                start: t,
                end: t + TCACHE_CHUNK - 16,
                why: "a thread's tcache was being changed at the capture (the thread was \
                      inside malloc or free)"
                    .into(),
            });
        }
        tcaches.extend(lists.iter().filter(|(_, l)| !l.is_empty()).map(|(&a, _)| a));
        let unowned_empty = valid.difference(&tcaches).count();
        if unowned_empty > 0 {
            un.push(Unwalked {
                transient: false,
                start: 0,
                end: 0,
                why: format!(
                    "{unowned_empty} zeroed 0x280-byte block(s) may be empty tcaches of \
                     threads whose thread pointer is unknown: counted as blocks"
                ),
            });
        }
        for t in &tcaches {
            free.extend(lists[t].iter().copied());
        }
        let before = chunks.len();
        chunks.retain(|b| !tcaches.contains(&b.addr) && !free.contains(&(b.addr - 16)));
        let stray = free.len() + tcaches.len() - (before - chunks.len());
        if stray > 0 {
            un.push(Unwalked {
                transient: false,
                start: 0,
                end: 0,
                why: format!(
                    "{stray} chunk(s) on fastbin or tcache lists were not in-use chunks of \
                     the walk"
                ),
            });
        }
        chunks.sort_unstable_by_key(|b| b.addr);
        chunks.dedup_by_key(|b| b.addr);
        Ok(BlockList {
            blocks: chunks,
            unwalked: un,
            arenas: arenas.iter().map(|a| a.addr).collect(),
        })
    }
}

/// The address of glibc's `main_arena` in a process with these mappings, from libc's debug
/// symbols (`libc6-dbg`), when they can be found: a cross-check of the walk, never needed.
pub fn main_arena_from_symbols(maps: &[Mapping]) -> Option<u64> {
    use blazesym::inspect::source::{Elf, Source};
    let first = maps.iter().find(|m| {
        let name = m.path.rsplit('/').next().unwrap_or("");
        m.is_file() && m.offset == 0 && name.starts_with("libc.so")
    })?;
    let src = Source::Elf(Elf::new(&first.path));
    let inspector = blazesym::inspect::Inspector::new();
    let found = inspector.lookup(&src, &["main_arena"]).ok()?;
    let sym = found.first()?.first()?;
    Some(first.start + sym.addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::memory::Unreadable;

    /// Memory made of word-addressed regions; anything else is unreadable.
    struct Fake(Vec<(u64, Vec<u64>)>);

    impl Fake {
        fn set(&mut self, addr: u64, v: u64) {
            let (s, w) = self
                .0
                .iter_mut()
                .find(|(s, w)| addr >= *s && addr < *s + 8 * w.len() as u64)
                .unwrap();
            w[((addr - *s) / 8) as usize] = v;
        }
    }

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            let end = addr + buf.len() as u64;
            match self
                .0
                .iter()
                .find(|(s, w)| addr >= *s && end <= *s + 8 * w.len() as u64)
            {
                Some((s, w)) => {
                    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let o = (addr - s) as usize;
                    buf.copy_from_slice(&bytes[o..o + buf.len()]);
                    Ok(())
                }
                None => {
                    buf.fill(0);
                    Err(Unreadable { read: 0 })
                }
            }
        }
    }

    fn threads<'a>(mem: &'a Fake, tps: &'a [u64]) -> Ptmalloc<'a> {
        Ptmalloc {
            mem,
            maps: &[],
            thread_pointers: tps,
            exclude: &[],
            parked: &[],
        }
    }

    fn walker(mem: &Fake) -> Ptmalloc<'_> {
        Ptmalloc {
            mem,
            maps: &[],
            thread_pointers: &[],
            exclude: &[],
            parked: &[],
        }
    }

    #[test]
    fn tcache_lists_are_decoded_through_safe_linking() {
        const T: u64 = 0x5555_0000_0010; // the tcache's user address
        const A: u64 = 0x5555_0000_1000; // two 0x30-byte chunks (tcache bin 1)
        const B: u64 = 0x5555_0000_3000;
        let mut m = Fake(vec![(T, vec![0; 80]), (A, vec![0; 8]), (B, vec![0; 8])]);
        m.set(T, 2 << 16); // counts[1] = 2
        m.set(T + 128 + 8, A + 16); // entries[1]
        for (c, next) in [(A, B + 16), (B, 0)] {
            m.set(c + 8, 0x31);
            m.set(c + 16, ((c + 16) >> 12) ^ next);
            m.set(c + 24, 0xfeed); // key
        }
        let mut r = Reader::new(&m);
        assert_eq!(tcache_lists(&mut r, T), Some(vec![A, B]));
        // One entry fewer than the count says: not a tcache.
        m.set(T, 3 << 16);
        let mut r = Reader::new(&m);
        assert_eq!(tcache_lists(&mut r, T), None);
        // An all-zero chunk is an empty tcache (or a zeroed block).
        let z = Fake(vec![(T, vec![0; 80])]);
        assert_eq!(tcache_lists(&mut Reader::new(&z), T), Some(vec![]));
    }

    #[test]
    fn tls_names_tcaches_and_the_one_being_changed() {
        const T1: u64 = 0x5555_0000_0010;
        const T2: u64 = 0x5555_0000_1010;
        const E: u64 = 0x5555_0000_2000; // one 0x20-byte chunk (tcache bin 0)
        const TP: [u64; 3] = [0x7f00_0001_0000, 0x7f00_0002_0000, 0x7f00_0003_0000];
        let tls = |tp: u64| (tp - TLS_WINDOW, vec![0; (TLS_WINDOW / 8) as usize]);
        let mut m = Fake(vec![
            (T1, vec![0; 80]),
            (T2, vec![0; 80]),
            (E, vec![0; 4]),
            tls(TP[0]),
            tls(TP[1]),
            tls(TP[2]),
        ]);
        // T1 holds E (count 1); T2 says 1 but its list is empty (being changed).
        m.set(T1, 1);
        m.set(T1 + 128, E + 16);
        m.set(E + 8, 0x21);
        m.set(E + 16, (E + 16) >> 12);
        m.set(T2, 1);
        m.set(TP[0] - 0x48, T1);
        m.set(TP[1] - 0x48, T2);
        m.set(TP[1] - 0x100, T1); // some other thread-local pointing at a tcache
        let sized: HashSet<u64> = [T1, T2].into();
        let mut r = Reader::new(&m);
        let valid: HashSet<u64> = [T1, T2]
            .into_iter()
            .filter(|&t| tcache_lists(&mut r, t).is_some())
            .collect();
        assert_eq!(valid, [T1].into());
        // -0x48 names both; -0x100 names T1 again (a tcache all the same: harmless).
        assert_eq!(
            threads(&m, &TP).tls_tcaches(&r, &sized, &valid),
            [T1, T2].into()
        );
        // A thread-local holding something else at that offset: no tcache named there.
        m.set(TP[2] - 0x48, 0x1234_5670);
        let r = Reader::new(&m);
        assert_eq!(
            threads(&m, &TP).tls_tcaches(&r, &sized, &valid),
            [T1].into()
        );
        assert_eq!(tcache_loose(&mut Reader::new(&m), T1), vec![E]);
        assert!(tcache_loose(&mut Reader::new(&m), T2).is_empty());
    }

    #[test]
    fn a_memaligned_mmapped_chunk_is_found_inside_its_mapping() {
        const Q: u64 = 0x7f00_0000_0000;
        let size = 0x3000;
        let mut m = Fake(vec![(Q, vec![0; 0x3000 / 8])]);
        m.set(Q + 8, size | IS_MMAPPED);
        let (b, end) = walker(&m)
            .mmapped_at(&mut Reader::new(&m), Q, Q + size)
            .unwrap();
        assert_eq!((b.addr, b.usable, end), (Q + 16, size - 16, Q + size));
        // memalign(4096, …): the chunk starts 4096 - 16 bytes in.
        let o = 4096 - 16;
        m.set(Q + o, o);
        m.set(Q + o + 8, (size - o) | IS_MMAPPED);
        let (b, end) = walker(&m)
            .mmapped_at(&mut Reader::new(&m), Q, Q + size)
            .unwrap();
        assert_eq!((b.addr, b.usable, end), (Q + 4096, size - o - 16, Q + size));
        // Too big for what is left of the mapping: not a chunk.
        assert!(walker(&m)
            .mmapped_at(&mut Reader::new(&m), Q, Q + 0x2000)
            .is_none());
    }

    #[test]
    fn chunk_walks_read_in_use_from_the_next_chunk_and_stop_at_fenceposts() {
        const H: u64 = 0x7f00_0400_0000; // an old heap: chunks, fenceposts, no top
        let mut m = Fake(vec![(H, vec![0; 0x100 / 8])]);
        // 0x40 in use, 0x30 free, 0x20 in use (NON_MAIN_ARENA), 0x30 free (old top),
        // fencepost 0x10, end 0.
        let chunks = [
            (0x40, 5),
            (0x30, 5),
            (0x20, 4),
            (0x30, 5),
            (0x10, 0),
            (0, 1),
        ];
        let mut at = H;
        for (size, flags) in chunks {
            m.set(at + 8, size | flags);
            at += size;
        }
        let (mut out, mut un) = (Vec::new(), Vec::new());
        walker(&m).walk_chunks(&mut Reader::new(&m), H, None, H + 0x100, &mut out, &mut un);
        assert!(un.is_empty(), "{un:?}");
        let got: Vec<(u64, u64)> = out.iter().map(|b| (b.addr - H, b.usable)).collect();
        // 0x40 is in use (0x30 has PREV_INUSE); 0x30 is free (0x20 lacks it); 0x20 is in
        // use; the old top is free (the fencepost's PREV_INUSE is clear).
        assert_eq!(got, vec![(0x10, 0x38), (0x80, 0x18)]);
        // A size that runs past the end is reported, not followed.
        m.set(H + 8, 0x1000 | 1);
        let (mut out, mut un) = (Vec::new(), Vec::new());
        walker(&m).walk_chunks(&mut Reader::new(&m), H, None, H + 0x100, &mut out, &mut un);
        assert!(out.is_empty());
        assert_eq!((un.len(), un[0].start), (1, H));
    }

    #[test]
    fn chunk_walks_step_over_parked_runs_with_what_the_agent_noted() {
        const H: u64 = 0x5555_0000_0000; // page-aligned
        let mut m = Fake(vec![(H, vec![0; 0x4000 / 8])]);
        // A in use; X1 and X2 lost blocks whose pages kal parked (the copy reads zeros in
        // [H + 0x1000, H + 0x3000), X2's header included); F free; B and C in use.
        let chunks = [
            (0x0, 0x20 | 1),
            (0x20, 0x1800 | 1),
            (0x3020, 0x30 | 1),
            (0x3050, 0x20),
            (0x3070, 0x40 | 1),
            (0x30b0, 0xf50 | 1), // top
        ];
        for (at, word) in chunks {
            m.set(H + at + 8, word);
        }
        let run = |start: u64, first: Option<(u64, u64)>, resume: u64| kal_proto::ParkRun {
            state: kal_proto::park_state::PARKED,
            start_inv: !(H + start),
            pages: 1,
            first_inv: first.map_or(0, |(a, _)| !(H + a)),
            first_word: first.map_or(0, |(_, w)| w),
            resume_inv: !(H + resume),
            ..Default::default()
        };
        let parked = [
            run(0x1000, Some((0x1820, 0x1800 | 1)), 0x3020),
            run(0x2000, None, 0x3020),
        ];
        let walk = |parked: &[kal_proto::ParkRun]| {
            let w = Ptmalloc {
                parked,
                ..walker(&m)
            };
            let (mut out, mut un) = (Vec::new(), Vec::new());
            let top = Some(H + 0x30b0);
            w.walk_chunks(&mut Reader::new(&m), H, top, H + 0x4000, &mut out, &mut un);
            let got: Vec<(u64, u64)> = out.iter().map(|b| (b.addr - H, b.usable)).collect();
            (got, un)
        };
        let (got, un) = walk(&parked);
        assert!(un.is_empty(), "{un:?}");
        // X1's in-use bit comes from X2's size word as the agent noted it; X2 (in the
        // agent's table) is stepped over; F is free.
        assert_eq!(
            got,
            vec![(0x10, 0x18), (0x30, 0x17f8), (0x3060, 0x18), (0x3080, 0x38)]
        );
        // Without the runs: X2's zeroed header says X1 is free, and the chain breaks there.
        let (got, un) = walk(&[]);
        assert_eq!(got, vec![(0x10, 0x18)]);
        assert_eq!((un.len(), un[0].start), (1, H + 0x1820));
        // A run without the chunk after it: reported, not guessed.
        let mut lost = parked;
        lost[0].resume_inv = 0;
        let (_, un) = walk(&lost);
        assert_eq!((un.len(), un[0].start), (1, H + 0x1820), "{un:?}");
    }

    #[test]
    fn a_fresh_arena_has_the_layout_and_a_shifted_view_does_not() {
        const A: u64 = 0x7f00_0000_0870;
        let mut w = vec![0u64; STATE_WORDS + 1];
        w[field::TOP] = 0x7f00_0000_1000;
        for j in 0..127u64 {
            let me = A + 96 + 16 * j;
            w[field::BINS + 2 * j as usize] = me;
            w[field::BINS + 2 * j as usize + 1] = me;
        }
        w[field::NEXT] = A;
        w[field::ATTACHED] = 1;
        w[field::SYSTEM_MEM] = 0x21000;
        w[field::MAX_SYSTEM_MEM] = 0x21000;
        assert!(is_state(&w[..STATE_WORDS], A));
        assert!(!is_state(&w[1..], A + 8));
        w[field::LOCK_FLAGS] = 7; // no such lock value
        assert!(!is_state(&w[..STATE_WORDS], A));
    }
}
