//! Step 3b: conservative marking from the roots, classified as valgrind's memcheck does.
//!
//! * **reachable** — a chain of start pointers leads to the block from a root;
//! * **possible** — reached from a root, but some link is an interior pointer;
//! * **direct** — nothing points to it (for a cycle with no way in, one leader: the
//!   lowest-addressed block of the first clique found);
//! * **indirect** — reached only from lost blocks.

pub mod heuristics;
pub mod ranges;
pub mod roots;

use crate::blocks::Block;
use crate::capture::memory::{Image, Memory, PageCache, PAGE};
use crate::reach::heuristics::Heuristics;
use crate::reach::roots::Roots;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

/// Class of a block after the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Definitely lost.
    Direct,
    /// Indirectly lost.
    Indirect,
    /// Possibly lost.
    Possible,
    /// Still reachable.
    Reachable,
}

impl Kind {
    /// All kinds, in report order.
    pub const ALL: [Kind; 4] = [
        Kind::Direct,
        Kind::Indirect,
        Kind::Possible,
        Kind::Reachable,
    ];

    /// The JSON / summary name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Indirect => "indirect",
            Kind::Possible => "possible",
            Kind::Reachable => "reachable",
        }
    }
}

// A block's state: bits.
/// Reached from a root (possibly only through interior pointers).
const REACHED: u8 = 1;
/// Reached through start pointers (or interior ones a heuristic accepts): reachable.
const DEFINITE: u8 = 2;
/// Contents scanned while possibly reached.
const SCANNED_POSSIBLE: u8 = 4;
/// Contents scanned while reachable.
const SCANNED_DEFINITE: u8 = 8;
/// Lost, reached from another lost block.
const INDIRECT: u8 = 16;

/// Blocks within this distance of each other share a region of the lookup index.
const REGION_GAP: u64 = 64 << 10;

/// A run of nearby blocks with its own granule table.
struct Region {
    start: u64,
    end: u64,
    /// log2 of the granule size.
    shift: u32,
    /// Index of the region's first block.
    first: usize,
    /// Where the region's granule counts start in [`BlockIndex::counts`].
    base: usize,
}

/// Sorted blocks with fast "which block holds this address" lookup: the address space is
/// cut into regions of nearby blocks, each region into equal granules (one or two blocks
/// each), and for every granule the number of the region's blocks that start before it is
/// recorded, so a lookup is one region search (a directory of equal cells of the address
/// space says which one or two regions a cell meets), one table read and a search among
/// the few blocks of one granule.
pub struct BlockIndex<'a> {
    blocks: &'a [Block],
    lo: u64,
    /// `hi - lo`: addresses in `[lo, hi)` may be in a block.
    width: u64,
    region_starts: Vec<u64>,
    regions: Vec<Region>,
    /// log2 of the size of a directory cell.
    cell_shift: u32,
    /// For each cell of the directory from `lo` (and one past the last): the first region
    /// that ends after the cell's start.
    cells: Vec<u32>,
    /// Per region, per granule (and one past the last): blocks starting before it,
    /// counted from the region's first block.
    counts: Vec<u32>,
}

#[inline]
fn end_of(b: &Block) -> u64 {
    b.addr + b.span().max(1)
}

impl<'a> BlockIndex<'a> {
    /// Indexes blocks sorted by address.
    pub fn new(blocks: &'a [Block]) -> BlockIndex<'a> {
        let mut regions = Vec::new();
        // At most about a granule per block (reserved, not touched: regions are few).
        let mut counts = Vec::with_capacity(blocks.len() * 2 + 1);
        crate::capture::memory::prefer_huge_pages(&counts);
        let mut hi = 0;
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i].addr;
            let mut end = end_of(&blocks[i]);
            let mut j = i + 1;
            // Relative counts are u32: a region holds fewer than 2^32 blocks.
            while j < blocks.len()
                && blocks[j].addr <= end.saturating_add(REGION_GAP)
                && j - i < u32::MAX as usize
            {
                end = end.max(end_of(&blocks[j]));
                j += 1;
            }
            // Granules of the region's mean block spacing rounded up to a power of two:
            // one or two blocks start in a granule on average, and the granule counts (a
            // fresh vector, slow to fault in) are half as many as with the spacing rounded
            // down.
            let mean = ((end - start) / (j - i) as u64).max(1);
            let shift = (64 - (mean - 1).leading_zeros()).clamp(3, 40);
            let granules = ((end - start - 1) >> shift) as usize + 1;
            let base = counts.len();
            counts.reserve(granules + 1);
            let mut k = i;
            for g in 0..=granules as u64 {
                let at = start.saturating_add(g << shift);
                while k < j && blocks[k].addr < at {
                    k += 1;
                }
                counts.push((k - i) as u32);
            }
            regions.push(Region {
                start,
                end,
                shift,
                first: i,
                base,
            });
            hi = hi.max(end);
            i = j;
        }
        let lo = blocks.first().map_or(0, |b| b.addr);
        let width = hi.saturating_sub(lo);
        // About four cells a region (at most 2^20): a cell usually meets one region.
        let want = (regions.len() as u64 * 4).clamp(1, 1 << 20);
        let cell_shift = (64 - (width / want).leading_zeros()).min(63);
        let n_cells = (width >> cell_shift) as usize + 1;
        let cells = (0..=n_cells as u64)
            .map(|c| {
                let at = lo.saturating_add(c << cell_shift);
                regions.partition_point(|r| r.end <= at) as u32
            })
            .collect();
        BlockIndex {
            blocks,
            lo,
            width,
            region_starts: regions.iter().map(|r| r.start).collect(),
            regions,
            cell_shift,
            cells,
            counts,
        }
    }

    /// Whether `v` is between the first block's start and the last block's end (a cheap
    /// test that rejects most words that are not pointers).
    #[inline(always)]
    pub fn may_hold(&self, v: u64) -> bool {
        v.wrapping_sub(self.lo) < self.width
    }

    /// Where `v` is in the index: its region's first block and the index of `v`'s
    /// granule in [`Self::counts`]; `None` if `v` is outside every region.
    #[inline(always)]
    fn locate(&self, v: u64) -> Option<(usize, usize)> {
        if !self.may_hold(v) {
            return None;
        }
        let r = if self.regions.len() == 1 {
            &self.regions[0]
        } else {
            // The regions that meet v's cell: from the first ending after the cell's
            // start to the first ending after the next cell's start.
            let c = ((v - self.lo) >> self.cell_shift) as usize;
            let (a, b) = (self.cells[c] as usize, self.cells[c + 1] as usize);
            let b = b.min(self.regions.len() - 1);
            let k = a + self.region_starts[a..=b.max(a)].partition_point(|&s| s <= v);
            if k == a {
                // Before the first region that ends in or after the cell.
                return None;
            }
            &self.regions[k - 1]
        };
        (v < r.end).then(|| (r.first, r.base + ((v - r.start) >> r.shift) as usize))
    }

    /// The block containing `v`, and whether `v` is its start.
    #[inline]
    pub fn find(&self, v: u64) -> Option<(usize, bool)> {
        let (first, g) = self.locate(v)?;
        self.find_at(v, first, g)
    }

    /// [`find`](Self::find) for `v` at `(first, g)` = [`locate`](Self::locate)`(v)`.
    #[inline(always)]
    fn find_at(&self, v: u64, first: usize, g: usize) -> Option<(usize, bool)> {
        let (a, b) = (
            first + self.counts[g] as usize,
            first + self.counts[g + 1] as usize,
        );
        // The last block starting at or before v: among those starting in v's granule
        // (looked at from the last one, which the lookup batches prefetch), else the
        // last one before it.
        let mut k = b;
        while k > a && self.blocks[k - 1].addr > v {
            k -= 1;
        }
        let i = k.checked_sub(1).filter(|&i| i >= first)?;
        let blk = &self.blocks[i];
        (v < end_of(blk)).then_some((i, v == blk.addr))
    }
}

/// Pages read ahead in one load while sweeping pending blocks in address order.
const LOAD_PAGES: u64 = 64;
/// Pages the scanner keeps (4 MiB): blocks reached inside them are scanned at once.
const CACHE_PAGES: usize = 1024;

/// Block states and the mark stack (one per marking thread; the states are shared).
struct Marks<'a> {
    blocks: &'a [Block],
    idx: &'a BlockIndex<'a>,
    heuristics: Option<&'a Heuristics<'a>>,
    state: &'a [AtomicU8],
    /// Whether other threads mark at the same time: state bits are then set with atomic
    /// read-modify-writes (a plain store could undo another thread's bit).
    shared: bool,
    /// Reached blocks to scan now if their pages are cached.
    stack: Vec<u32>,
    /// Words queued for lookup ([`Marks::add`]): the first `pending` of them.
    words: [u64; BATCH],
    /// Bit k: `words[k]` comes from definitely reachable memory.
    definite: u64,
    /// How many words are queued.
    pending: usize,
}

/// The 8-aligned range of a block's words.
#[inline]
fn words_range(b: &Block) -> (u64, u64) {
    (b.addr & !7, (b.addr + b.size + 7) & !7)
}

/// Words that may be pointers are looked up this many at a time.
const BATCH: usize = 32;

/// Asks the processor to start loading the cache line at `p` (no effect on results).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes no architectural state,
    // whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Marks<'_> {
    /// Block `i`'s state.
    #[inline(always)]
    fn st(&self, i: usize) -> u8 {
        self.state[i].load(Relaxed)
    }

    /// Sets `bits` in block `i`'s state; returns the state before.
    #[inline(always)]
    fn set(&self, i: usize, bits: u8) -> u8 {
        if self.shared {
            self.state[i].fetch_or(bits, Relaxed)
        } else {
            let s = self.state[i].load(Relaxed);
            self.state[i].store(s | bits, Relaxed);
            s
        }
    }

    /// Claims the scan of block `i` in its present state (definitely reached or only
    /// possibly): whether it is definite, or `None` if that scan is claimed already (by
    /// this thread earlier, or by another marking thread).
    #[inline]
    fn claim(&self, i: usize) -> Option<bool> {
        let definite = self.st(i) & DEFINITE != 0;
        let bit = if definite {
            SCANNED_DEFINITE
        } else {
            SCANNED_POSSIBLE
        };
        (self.set(i, bit) & bit == 0).then_some(definite)
    }

    /// Queues a word that may point into a block, from definitely reachable memory
    /// (`definite`) or from a possibly reachable block. Words are looked up [`BATCH`] at a
    /// time, across the blocks being scanned (a small block has only a few words), so the
    /// memory reads of different words overlap; [`flush`](Self::flush) looks up the rest.
    #[inline(always)]
    fn add(&mut self, w: u64, definite: bool, cache: &PageCache<'_>) {
        let n = self.pending;
        self.words[n] = w;
        self.definite = (self.definite & !(1 << n)) | (u64::from(definite) << n);
        self.pending = n + 1;
        if n + 1 == BATCH {
            self.flush(cache);
        }
    }

    /// Looks up every queued word ([`push`](Self::push)): first the granule table entries
    /// of all of them are prefetched, then the blocks and states they lead to, then each is
    /// marked (pointers into a large heap mostly miss the processor's caches; this way the
    /// misses of different words overlap instead of waiting for one another).
    fn flush(&mut self, cache: &PageCache<'_>) {
        let n = std::mem::take(&mut self.pending);
        let words = self.words;
        // Each word's region (first block) and granule, usize::MAX for none.
        let mut at = [(0usize, usize::MAX); BATCH];
        let idx = self.idx;
        for (k, &w) in words[..n].iter().enumerate() {
            if let Some((first, g)) = idx.locate(w) {
                prefetch(&idx.counts[g + 1]);
                at[k] = (first, g);
            }
        }
        for &(first, g) in &at[..n] {
            if g != usize::MAX {
                // The last block starting in the granule: usually the one looked at.
                if let Some(i) = (first + idx.counts[g + 1] as usize).checked_sub(1) {
                    prefetch(&self.blocks[i]);
                    prefetch(&self.state[i]);
                }
            }
        }
        for (k, &w) in words[..n].iter().enumerate() {
            let (first, g) = at[k];
            if g != usize::MAX {
                if let Some(found) = idx.find_at(w, first, g) {
                    self.mark_found(found, w, self.definite >> k & 1 != 0, cache);
                }
            }
        }
    }

    /// Marks the block `v` points into, if any, from definitely reachable memory
    /// (`definite`) or from a possibly reachable block. Heuristics read block words from
    /// `cache` when it holds them.
    #[inline]
    fn push(&mut self, v: u64, definite: bool, cache: &PageCache<'_>) {
        if let Some(found) = self.idx.find(v) {
            self.mark_found(found, v, definite, cache);
        }
    }

    /// Marks block `i` (`(i, start)` = [`BlockIndex::find`] of `v`), which `v` points
    /// into, from definitely reachable memory (`definite`) or from a possibly reachable
    /// block.
    #[inline(always)]
    fn mark_found(
        &mut self,
        (i, start): (usize, bool),
        v: u64,
        definite: bool,
        cache: &PageCache<'_>,
    ) {
        let s = self.st(i);
        if s & DEFINITE != 0 {
            return;
        }
        // A start pointer, or an interior one that a known layout makes as good, from
        // definitely reachable memory: reachable.
        if definite
            && (start
                || self.heuristics.is_some_and(|h| {
                    h.reaches_with(&self.blocks[i], v, |a| {
                        cache.word(a).or_else(|| read_word(cache.memory(), a))
                    })
                }))
        {
            if self.set(i, REACHED | DEFINITE) & DEFINITE == 0 {
                self.stack.push(i as u32);
            }
        } else if s & REACHED == 0 && self.set(i, REACHED) & REACHED == 0 {
            self.stack.push(i as u32);
        }
    }
}

/// The marking machinery: block states and mark stack, the page cache, what waits for
/// the next sweep.
struct Marker<'a, 'm> {
    marks: Marks<'a>,
    cache: PageCache<'m>,
    /// Reached blocks to scan in the next sweep.
    deferred: Vec<u32>,
}

impl<'a, 'm> Marker<'a, 'm> {
    /// A marker with an empty stack and cache over shared block states.
    fn new(
        blocks: &'a [Block],
        idx: &'a BlockIndex<'a>,
        heuristics: Option<&'a Heuristics<'a>>,
        state: &'a [AtomicU8],
        heap: &'m dyn Memory,
    ) -> Marker<'a, 'm> {
        Marker {
            marks: Marks {
                blocks,
                idx,
                heuristics,
                state,
                shared: false,
                stack: Vec::new(),
                words: [0; BATCH],
                definite: 0,
                pending: 0,
            },
            cache: PageCache::new(heap, CACHE_PAGES),
            deferred: Vec::new(),
        }
    }

    /// Whether block `i` was reached and not yet scanned in its present state.
    #[inline]
    fn needs_scan(&self, i: usize) -> bool {
        let s = self.marks.st(i);
        if s & DEFINITE != 0 {
            s & SCANNED_DEFINITE == 0
        } else {
            s & REACHED != 0 && s & SCANNED_POSSIBLE == 0
        }
    }

    /// Whether block `i` is too large to be held in the cache at once.
    #[inline]
    fn is_large(&self, i: usize) -> bool {
        let (s, e) = words_range(&self.marks.blocks[i]);
        e > s && (e - 1) / PAGE - s / PAGE >= self.cache.slots() / 2
    }

    /// Whether block `i` is not large and all of it is in the cache.
    #[inline]
    fn cached(&self, i: usize) -> bool {
        let (s, e) = words_range(&self.marks.blocks[i]);
        if e <= s {
            return true;
        }
        let (first, last) = (s / PAGE, (e - 1) / PAGE);
        // Most blocks lie in one page.
        self.cache.has(first)
            && (first == last || (last - first < self.cache.slots() / 2 && self.cache.holds(s, e)))
    }

    /// Scans the words of block `i`, whose pages (unless it is large) are cached, unless
    /// another thread has begun to scan it in the same state.
    fn scan(&mut self, i: usize) {
        let Some(definite) = self.marks.claim(i) else {
            return;
        };
        let (s, e) = words_range(&self.marks.blocks[i]);
        if self.is_large(i) {
            // In cache-sized pieces, loaded as they come.
            let chunk = self.cache.slots() / 2 * PAGE;
            let mut at = s;
            while at < e {
                let upto = e.min((at / PAGE) * PAGE + chunk);
                self.cache
                    .load(at / PAGE, (upto - 1) / PAGE - at / PAGE + 1);
                self.scan_range(at, upto, definite);
                at = upto;
            }
        } else if e > s {
            self.scan_range(s, e, definite);
        }
    }

    /// Queues every word of the cached range `[s, e)` that may point into a block.
    #[inline]
    fn scan_range(&mut self, s: u64, e: u64, definite: bool) {
        let (marks, cache) = (&mut self.marks, &self.cache);
        cache.for_each_piece(s, e, |words| {
            for &w in words {
                if marks.idx.may_hold(w) {
                    marks.add(w, definite, cache);
                }
            }
        });
    }

    /// Scans reached blocks from the stack while their pages are cached (depth first);
    /// the others wait for the next sweep.
    fn drain(&mut self) {
        loop {
            self.drain_stack();
            if self.marks.pending == 0 {
                return;
            }
            self.marks.flush(&self.cache);
        }
    }

    /// [`drain`](Self::drain) without looking up the words still queued.
    fn drain_stack(&mut self) {
        while let Some(i) = self.marks.stack.pop() {
            let i = i as usize;
            if !self.needs_scan(i) {
                continue;
            }
            if self.cached(i) {
                self.scan(i);
            } else {
                self.deferred.push(i as u32);
            }
        }
    }

    /// Loads the uncached pages of the blocks `todo` (sorted; the first one not empty and
    /// not large) from the first one on, up to [`LOAD_PAGES`] pages past its first page, in
    /// runs of consecutive pages.
    fn load_ahead(&mut self, todo: &[u32]) {
        // All of the first block (not large: fewer than slots/2 pages), and what follows
        // it up to LOAD_PAGES pages: fewer than `slots` consecutive pages, which never
        // evict one another.
        let (s0, e0) = words_range(&self.marks.blocks[todo[0] as usize]);
        let limit = (s0 / PAGE + LOAD_PAGES.min(self.cache.slots() / 2)).max((e0 - 1) / PAGE + 1);
        let mut run: Option<(u64, u64)> = None;
        for &i in todo {
            let (s, e) = words_range(&self.marks.blocks[i as usize]);
            if s / PAGE >= limit {
                break;
            }
            if e <= s || self.is_large(i as usize) {
                continue;
            }
            for p in s / PAGE..=((e - 1) / PAGE).min(limit - 1) {
                if self.cache.has(p) {
                    continue;
                }
                run = match run {
                    // Contiguous, or across a gap of one page (cheaper than a second read).
                    Some((a, b)) if p >= b && p <= b + 1 => Some((a, p + 1)),
                    Some((a, b)) if p < b => Some((a, b)),
                    Some((a, b)) => {
                        self.cache.load(a, b - a);
                        Some((p, p + 1))
                    }
                    None => Some((p, p + 1)),
                };
            }
        }
        if let Some((a, b)) = run {
            self.cache.load(a, b - a);
        }
    }

    /// Scans everything reachable from what is on the stack: depth first inside the
    /// cached pages, and sweeps over the rest in address order. Large sweeps are shared
    /// between `threads` threads (contiguous parts of the sorted list, each thread with
    /// its own page cache and stack).
    fn mark(&mut self, heap: &(dyn Memory + Sync), threads: usize, parallel_sweep: usize) {
        let mut bits = Vec::new();
        loop {
            self.drain();
            if self.deferred.is_empty() {
                return;
            }
            let t = std::time::Instant::now();
            let mut todo = std::mem::take(&mut self.deferred);
            sort_unique(&mut todo, self.marks.blocks.len(), &mut bits);
            if crate::debug::timing() {
                crate::say!(
                    "timing: sweep of {} blocks (sorted in {:?})",
                    todo.len(),
                    t.elapsed()
                );
            }
            if threads < 2 {
                self.sweep(&todo);
                continue;
            }
            // Large blocks (a hash table's bucket array: millions of pointers) are cut into
            // cache-sized pieces shared between the threads.
            let large: u64 = todo
                .iter()
                .filter(|&&i| self.is_large(i as usize))
                .map(|&i| self.marks.blocks[i as usize].size)
                .sum();
            if large >= parallel_sweep as u64 * PIECE_BYTES_PER_BLOCK {
                let pieces = self.claim_large(&todo);
                let parts: Vec<Job> = (0..threads)
                    .map(|t| Job::Pieces(pieces.iter().skip(t).step_by(threads).copied().collect()))
                    .collect();
                self.in_parallel(heap, parts);
                todo.retain(|&i| !self.is_large(i as usize));
            }
            if todo.len() < parallel_sweep {
                self.sweep(&todo);
                continue;
            }
            let part = todo.len().div_ceil(threads);
            self.in_parallel(heap, todo.chunks(part).map(Job::Sweep).collect());
        }
    }

    /// Claims the large blocks of `todo` that need a scan (as [`scan`](Self::scan) does)
    /// and returns their words in pieces of half the cache: `(start, end, definite)`.
    fn claim_large(&mut self, todo: &[u32]) -> Vec<(u64, u64, bool)> {
        let chunk = self.cache.slots() / 2 * PAGE;
        let mut pieces = Vec::new();
        for &i in todo {
            let i = i as usize;
            if !self.is_large(i) || !self.needs_scan(i) {
                continue;
            }
            let Some(definite) = self.marks.claim(i) else {
                continue;
            };
            let (s, e) = words_range(&self.marks.blocks[i]);
            let mut at = s;
            while at < e {
                let upto = e.min((at / PAGE) * PAGE + chunk);
                pieces.push((at, upto, definite));
                at = upto;
            }
        }
        pieces
    }

    /// Runs `jobs` on as many threads (this one takes the first), each with its own cache,
    /// stack and batch over the shared block states; what they defer is deferred here.
    fn in_parallel(&mut self, heap: &(dyn Memory + Sync), jobs: Vec<Job<'_>>) {
        let mut jobs = jobs.into_iter();
        let Some(first) = jobs.next() else { return };
        self.marks.shared = true;
        let (blocks, idx, heuristics, state) = (
            self.marks.blocks,
            self.marks.idx,
            self.marks.heuristics,
            self.marks.state,
        );
        let more: Vec<Vec<u32>> = std::thread::scope(|sc| {
            let others: Vec<_> = jobs
                .map(|job| {
                    sc.spawn(move || {
                        let mut w = Marker::new(blocks, idx, heuristics, state, heap);
                        w.marks.shared = true;
                        w.run(job);
                        w.deferred
                    })
                })
                .collect();
            self.run(first);
            others.into_iter().map(crate::join).collect()
        });
        self.marks.shared = false;
        for d in more {
            self.deferred.extend(d);
        }
    }

    /// Does one thread's share of a parallel step, then drains what it reached.
    fn run(&mut self, job: Job<'_>) {
        match job {
            Job::Sweep(todo) => self.sweep(todo),
            Job::Pieces(pieces) => {
                for (s, e, definite) in pieces {
                    self.cache.load(s / PAGE, (e - 1) / PAGE - s / PAGE + 1);
                    self.scan_range(s, e, definite);
                    self.drain_stack();
                }
            }
        }
        self.drain();
    }

    /// Scans the blocks of `todo` (sorted) that still need it, loading their pages in
    /// address order, and whatever they reach inside the cache.
    fn sweep(&mut self, todo: &[u32]) {
        for k in 0..todo.len() {
            let i = todo[k] as usize;
            if !self.needs_scan(i) {
                continue;
            }
            if !self.cached(i) && !self.is_large(i) {
                self.load_ahead(&todo[k..]);
            }
            self.scan(i);
            self.drain_stack();
        }
    }
}

/// Sorts block indices below `n` and removes repeats: through a bitmap of `n` bits
/// (`bits`, all zeros before and after, grown when needed) when there are many of them,
/// else by sorting.
fn sort_unique(v: &mut Vec<u32>, n: usize, bits: &mut Vec<u64>) {
    if v.len() < n / 32 {
        v.sort_unstable();
        v.dedup();
        return;
    }
    bits.resize(n.div_ceil(64), 0);
    for &i in v.iter() {
        bits[i as usize / 64] |= 1 << (i % 64);
    }
    v.clear();
    for (k, w) in bits.iter_mut().enumerate() {
        let mut x = std::mem::take(w);
        while x != 0 {
            v.push((k * 64) as u32 + x.trailing_zeros());
            x &= x - 1;
        }
    }
}

/// Marking threads at most.
const MAX_THREADS: usize = 4;

/// Sweeps of fewer blocks than this are not shared between threads.
const PARALLEL_SWEEP: usize = 50_000;

/// Large blocks are shared between threads when they hold at least this many bytes per
/// block of [`PARALLEL_SWEEP`] (50,000 × 64 = 3.2 MB: about 400,000 words).
const PIECE_BYTES_PER_BLOCK: u64 = 64;

/// One thread's share of a parallel step.
enum Job<'t> {
    /// Part of a sweep's sorted list.
    Sweep(&'t [u32]),
    /// Pieces `(start, end, definite)` of large blocks already claimed.
    Pieces(Vec<(u64, u64, bool)>),
}

/// Reads one 8-byte word from `mem`.
fn read_word(mem: &dyn Memory, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)
        .is_ok()
        .then(|| u64::from_le_bytes(b))
}

/// Classifies every block. `blocks` must be sorted by address; their contents are read
/// from `heap` a few pages at a time as the marking reaches them.
pub fn classify(
    blocks: &[Block],
    image: &Image,
    roots: &Roots,
    heap: &(dyn Memory + Sync),
    heuristics: Option<&Heuristics<'_>>,
) -> Vec<Kind> {
    // Asked once: the answer reads cgroup files each time (~65 us, per exit report).
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    });
    classify_in(
        blocks,
        image,
        roots,
        heap,
        heuristics,
        threads,
        PARALLEL_SWEEP,
    )
}

/// [`classify`] with `threads` marking threads for sweeps of at least `parallel_sweep`
/// blocks.
fn classify_in(
    blocks: &[Block],
    image: &Image,
    roots: &Roots,
    heap: &(dyn Memory + Sync),
    heuristics: Option<&Heuristics<'_>>,
    threads: usize,
    parallel_sweep: usize,
) -> Vec<Kind> {
    assert!(
        blocks.len() < u32::MAX as usize,
        "more than 2^32 blocks: the mark stack holds u32 indices"
    );
    let t0 = std::time::Instant::now();
    let idx = BlockIndex::new(blocks);
    if crate::debug::timing() {
        crate::say!(
            "timing: block index {:?} ({} regions, {} granules)",
            t0.elapsed(),
            idx.regions.len(),
            idx.counts.len()
        );
    }
    let state: Vec<AtomicU8> = {
        let mut v = Vec::with_capacity(blocks.len());
        crate::capture::memory::prefer_huge_pages(&v);
        v.resize_with(blocks.len(), || AtomicU8::new(0));
        v
    };
    let mut m = Marker::new(blocks, &idx, heuristics, &state, heap);

    for &v in &roots.values {
        m.marks.push(v, true, &m.cache);
    }
    let why = crate::debug::roots();
    // glibc's thread control block: [tcb] = tcb, [tcb+8] = &dtv[1], [tcb+16] = tcb. The dtv
    // field points 16 bytes into the dtv block; it is that block's owning pointer. The
    // neighbours come from the same piece of words when they are in it.
    let word_at = |words: &[u64], first: u64, a: u64| {
        let k = a.wrapping_sub(first) / 8;
        if a >= first && (k as usize) < words.len() {
            Some(words[k as usize])
        } else {
            image.word(a)
        }
    };
    for &(s, e) in &roots.ranges {
        image.for_each_piece(s, e, |first, words| {
            for (k, &w) in words.iter().enumerate() {
                if !m.marks.idx.may_hold(w) {
                    continue;
                }
                let at = first + k as u64 * 8;
                let tcb = at.wrapping_sub(8);
                let w = if at >= 8
                    && word_at(words, first, tcb) == Some(tcb)
                    && word_at(words, first, at + 8) == Some(tcb)
                    && matches!(m.marks.idx.find(w), Some((_, false)))
                {
                    w.wrapping_sub(16)
                } else if roots.in_loader(at) {
                    // The loader's interior handle on a block: its start.
                    match m.marks.idx.find(w) {
                        Some((i, false)) => blocks[i].addr,
                        _ => w,
                    }
                } else {
                    w
                };
                if why
                    && m.marks
                        .idx
                        .find(w)
                        .is_some_and(|(i, _)| m.marks.st(i) & REACHED == 0)
                {
                    let (bi, st) = m.marks.idx.find(w).unwrap_or_default();
                    crate::say!(
                        "root word at {at:#x} -> {w:#x} block {:#x}+{} start={st}",
                        blocks[bi].addr,
                        blocks[bi].size
                    );
                }
                m.marks.add(w, true, &m.cache);
            }
        });
    }
    let t1 = std::time::Instant::now();
    m.mark(heap, threads, parallel_sweep);
    drop(m);
    if crate::debug::timing() {
        crate::say!("timing: marking from the roots {:?}", t1.elapsed());
    }
    let mut state: Vec<u8> = state.into_iter().map(AtomicU8::into_inner).collect();
    let mut m = Marker::new(blocks, &idx, heuristics, &[], heap);

    // Lost blocks: first the pointers between them, then cliques. Each unreached block not
    // yet claimed (in address order) leads the blocks it reaches, which become indirect.
    let unreached: Vec<u32> = (0..blocks.len() as u32)
        .filter(|&i| state[i as usize] & REACHED == 0)
        .collect();
    let mut pos = vec![
        0u32;
        if unreached.is_empty() {
            0
        } else {
            blocks.len()
        }
    ];
    for (p, &i) in unreached.iter().enumerate() {
        pos[i as usize] = p as u32;
    }
    // Edges in compressed rows: block unreached[p] points to edges[from[p]..from[p + 1]].
    let mut from: Vec<usize> = Vec::with_capacity(unreached.len() + 1);
    let mut edges: Vec<u32> = Vec::new();
    for k in 0..unreached.len() {
        let i = unreached[k] as usize;
        from.push(edges.len());
        let (s, e) = words_range(&blocks[i]);
        if e <= s {
            continue;
        }
        let large = m.is_large(i);
        if !m.cached(i) && !large {
            m.load_ahead(&unreached[k..]);
        }
        let chunk = m.cache.slots() / 2 * PAGE;
        let mut at = s;
        while at < e {
            let upto = if large {
                e.min((at / PAGE) * PAGE + chunk)
            } else {
                e
            };
            if large {
                m.cache.load(at / PAGE, (upto - 1) / PAGE - at / PAGE + 1);
            }
            m.cache.for_each_piece(at, upto, |words| {
                for &w in words {
                    if let Some((j, _)) = m.marks.idx.find(w) {
                        if j != i && state[j] & REACHED == 0 {
                            edges.push(j as u32);
                        }
                    }
                }
            });
            at = upto;
        }
    }
    from.push(edges.len());
    let mut stack: Vec<u32> = Vec::new();
    for &leader in &unreached {
        if state[leader as usize] != 0 {
            continue;
        }
        stack.push(leader);
        while let Some(i) = stack.pop() {
            let p = pos[i as usize] as usize;
            for &j in &edges[from[p]..from[p + 1]] {
                // An unreached block here is fresh, or an earlier leader now absorbed.
                if j != leader && state[j as usize] == 0 {
                    state[j as usize] = INDIRECT;
                    stack.push(j);
                }
            }
        }
    }

    state
        .into_iter()
        .map(|s| {
            if s & INDIRECT != 0 {
                Kind::Indirect
            } else if s & DEFINITE != 0 {
                Kind::Reachable
            } else if s & REACHED != 0 {
                Kind::Possible
            } else {
                Kind::Direct
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory backed by one vector of words at a base address; zeros elsewhere.
    struct Flat {
        base: u64,
        words: Vec<u64>,
    }

    impl Memory for Flat {
        fn read(
            &self,
            addr: u64,
            buf: &mut [u8],
        ) -> Result<(), crate::capture::memory::Unreadable> {
            for (k, b) in buf.iter_mut().enumerate() {
                let a = addr + k as u64;
                *b = a
                    .checked_sub(self.base)
                    .and_then(|o| self.words.get((o / 8) as usize))
                    .map_or(0, |w| w.to_le_bytes()[(a % 8) as usize]);
            }
            Ok(())
        }
    }

    fn block(addr: u64, size: u64) -> Block {
        Block {
            addr,
            size,
            seq: 0,
            stack: 0,
            api: 0,
            tail: 0,
        }
    }

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Blocks of mixed sizes (a few larger than half the page cache) in clusters with
    /// small and large gaps between them, and a few of size 0.
    fn random_blocks(rng: &mut Rng, n: usize, base: u64) -> Vec<Block> {
        let mut at = base;
        let mut v = Vec::new();
        for _ in 0..n {
            at += match rng.below(100) {
                0 => 1 << 20,
                1..=3 => rng.below(64 << 10),
                _ => 16 * rng.below(3),
            };
            let size = match rng.below(1000) {
                0 => 3 << 20,
                1..=20 => rng.below(40_000),
                21..=30 => 0,
                _ => rng.below(100),
            };
            v.push(block(at, size));
            at += size.max(1).div_ceil(16) * 16 + 16;
        }
        v
    }

    #[test]
    fn sort_unique_sorts_and_drops_repeats_either_way() {
        let mut rng = Rng(7);
        let mut bits = Vec::new();
        for (len, n) in [
            (0, 10),
            (5, 1000),
            (500, 1000),
            (5000, 1000),
            (70_000, 100_000),
        ] {
            let v: Vec<u32> = (0..len).map(|_| rng.below(n as u64) as u32).collect();
            let mut want = v.clone();
            want.sort_unstable();
            want.dedup();
            let mut got = v;
            sort_unique(&mut got, n, &mut bits);
            assert_eq!(got, want, "{len} of {n}");
            assert!(bits.iter().all(|&w| w == 0), "the bitmap is left clear");
        }
    }

    #[test]
    fn index_finds_what_a_binary_search_finds() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let base = 0x5555_0000_0000;
        // Blocks near one base; then clusters far apart too (a brk heap, mmapped arenas
        // and a stray low block: directory cells then span many regions).
        let mut sets: Vec<Vec<Block>> = [0, 1, 2, 10, 3000]
            .map(|n| random_blocks(&mut rng, n, base))
            .into();
        let mut spread = vec![block(0x1000, 16)];
        for b in [
            0x5555_0000_0000u64,
            0x7f00_0000_0000,
            0x7f00_4000_0000,
            0x7ffe_0000_0000,
        ] {
            spread.extend(random_blocks(&mut rng, 700, b));
        }
        sets.push(spread);
        for blocks in sets {
            let n = blocks.len();
            let idx = BlockIndex::new(&blocks);
            let naive = |v: u64| {
                let i = blocks.partition_point(|b| b.addr <= v).checked_sub(1)?;
                let b = &blocks[i];
                (v < b.addr + b.span().max(1)).then_some((i, v == b.addr))
            };
            let lo = blocks.first().map_or(base, |b| b.addr);
            let hi = blocks
                .last()
                .map_or(base + 0x1_0000, |b| b.addr + b.size + 64);
            let mut probes: Vec<u64> = vec![0, 1, u64::MAX, base - 8, hi];
            for b in &blocks {
                probes.extend([
                    b.addr,
                    b.addr + 1,
                    b.addr + b.span(),
                    b.addr.wrapping_sub(1),
                ]);
            }
            probes.extend((0..20_000).map(|_| lo + rng.below(hi - lo)));
            // Near the blocks, where the random probes over a wide space seldom land.
            for _ in 0..20_000 {
                let b = blocks.get(rng.below(n.max(1) as u64) as usize);
                probes.extend(b.map(|b| (b.addr + rng.below(1 << 17)).wrapping_sub(1 << 16)));
            }
            for v in probes {
                assert_eq!(idx.find(v), naive(v), "address {v:#x}, {n} blocks");
            }
        }
    }

    /// The marking and classification this module does, written plainly: a whole-memory
    /// fixpoint with a binary search per word and no page cache.
    fn reference(blocks: &[Block], mem: &Flat, values: &[u64]) -> Vec<Kind> {
        let find = |v: u64| {
            let i = blocks.partition_point(|b| b.addr <= v).checked_sub(1)?;
            let b = &blocks[i];
            (v < b.addr + b.span().max(1)).then_some((i, v == b.addr))
        };
        let words = |b: &Block| {
            let (s, e) = words_range(b);
            let mut buf = vec![0u8; (e - s) as usize];
            mem.read(s, &mut buf).unwrap();
            buf.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<u64>>()
        };
        // 0 unreached, 1 possible, 2 reachable, 3 indirect.
        let mut st = vec![0u8; blocks.len()];
        let mut work: Vec<usize> = Vec::new();
        let push = |v: u64, definite: bool, st: &mut Vec<u8>, work: &mut Vec<usize>| {
            if let Some((i, start)) = find(v) {
                if st[i] != 2 && definite && start {
                    st[i] = 2;
                    work.push(i);
                } else if st[i] == 0 {
                    st[i] = 1;
                    work.push(i);
                }
            }
        };
        for &v in values {
            push(v, true, &mut st, &mut work);
        }
        while let Some(i) = work.pop() {
            let definite = st[i] == 2;
            for w in words(&blocks[i]) {
                push(w, definite, &mut st, &mut work);
            }
        }
        let unreached: Vec<usize> = (0..blocks.len()).filter(|&i| st[i] == 0).collect();
        let edges: Vec<Vec<usize>> = unreached
            .iter()
            .map(|&i| {
                words(&blocks[i])
                    .into_iter()
                    .filter_map(find)
                    .map(|(j, _)| j)
                    .filter(|&j| j != i && st[j] == 0)
                    .collect()
            })
            .collect();
        for &leader in &unreached {
            if st[leader] != 0 {
                continue;
            }
            work.push(leader);
            while let Some(i) = work.pop() {
                let p = unreached.binary_search(&i).unwrap();
                for &j in &edges[p] {
                    if j != leader && st[j] == 0 {
                        st[j] = 3;
                        work.push(j);
                    }
                }
            }
        }
        st.iter()
            .map(|s| {
                [
                    Kind::Direct,
                    Kind::Possible,
                    Kind::Reachable,
                    Kind::Indirect,
                ][*s as usize]
            })
            .collect()
    }

    #[test]
    fn classify_agrees_with_the_plain_reference() {
        let base = 0x5555_0000_0000u64;
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let blocks = random_blocks(&mut rng, 4000, base);
            let end = blocks.last().map_or(base, |b| b.addr + b.size + 8);
            let mut mem = Flat {
                base,
                words: vec![0; ((end - base) / 8) as usize],
            };
            // Each block gets a few pointers to other blocks (start, interior, past the
            // span) and data; few blocks are pointed at from the roots.
            let density = 1 + seed % 3;
            for b in &blocks {
                let (s, e) = words_range(b);
                for w in (s..e).step_by(8) {
                    let slot = &mut mem.words[((w - base) / 8) as usize];
                    *slot = match rng.below(8) {
                        x if x < density => {
                            let t = &blocks[rng.below(blocks.len() as u64) as usize];
                            match rng.below(10) {
                                0 => t.addr + rng.below(t.size.max(1)),
                                1 => t.addr + t.span() + 8,
                                _ => t.addr,
                            }
                        }
                        _ => rng.next() >> 20,
                    };
                }
            }
            let values: Vec<u64> = (0..5)
                .map(|_| {
                    let t = &blocks[rng.below(blocks.len() as u64) as usize];
                    t.addr + if rng.below(3) == 0 { 8 } else { 0 }
                })
                .collect();
            let roots = Roots {
                ranges: Vec::new(),
                values: values.clone(),
                loader: Vec::new(),
            };
            let want = reference(&blocks, &mem, &values);
            // One thread, and sweeps of any size shared between three.
            for (threads, min) in [(1, usize::MAX), (3, 1)] {
                let got = classify_in(&blocks, &Image::default(), &roots, &mem, None, threads, min);
                assert_eq!(got, want, "seed {seed}, {threads} threads");
            }
            let got = classify(&blocks, &Image::default(), &roots, &mem, None);
            let count = |v: &[Kind], k: Kind| v.iter().filter(|&&x| x == k).count();
            for k in Kind::ALL {
                crate::say!("seed {seed}: {} {}", k.name(), count(&want, k));
            }
            assert_eq!(got, want, "seed {seed}");
        }
    }
}
