//! Where target memory comes from: one [`Memory`] trait for every source, and an [`Image`]
//! (copied segments) that the scanner reads.

/// A read that could not fill its whole buffer: unreadable pages were left as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable {
    /// Bytes that were really read.
    pub read: usize,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memory unreadable ({} bytes read)", self.read)
    }
}

impl std::error::Error for Unreadable {}

/// A source of target memory: a live (frozen) process, a snapshot child, a core file…
pub trait Memory {
    /// Fills `buf` from address `addr`. When part of it cannot be read, the unreadable
    /// pages are left as zeros, the readable ones are filled all the same, and the error
    /// says how many bytes were read: a caller must never take those zeros for memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable>;

    /// The parts of `[start, end)` that may hold non-zero data (pages never touched read as
    /// zeros and need not be copied). By default, all of it.
    fn present(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        vec![(start, end)]
    }
}

/// Asks for transparent huge pages under the untouched capacity of a large vector: the
/// scan reads blocks, states and granule counts at random, and with 4 KiB pages nearly
/// every such read also misses the TLB. Advice only: nothing changes if it is refused.
pub fn prefer_huge_pages<T>(v: &Vec<T>) {
    const HUGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < 2 * HUGE {
        return;
    }
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
    if start < end {
        // SAFETY: advice on whole huge pages inside the vector's own allocation; it never
        // changes the contents or the validity of the memory.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Zero-filled 8-byte words in their own mapping: untouched pages cost nothing, and large
/// buffers use transparent huge pages (one fault per 2 MiB instead of per 4 KiB). Small
/// ones (under [`SMALL_WORDS_BYTES`]) come from the allocator instead: a capture makes
/// dozens, and a mapping each (mmap, a fault per page, munmap) was a good part of a small
/// process's capture.
pub struct Words {
    ptr: *mut u64,
    len: usize,
}

/// Word buffers below this many bytes are allocated, not mapped.
pub const SMALL_WORDS_BYTES: usize = 256 << 10;

fn small_layout(len: usize) -> std::alloc::Layout {
    // A size below SMALL_WORDS_BYTES with the alignment of u64 is always a valid layout.
    std::alloc::Layout::array::<u64>(len).unwrap_or(std::alloc::Layout::new::<u64>())
}

// SAFETY: Words owns its mapping exclusively, like a Box<[u64]>.
unsafe impl Send for Words {}
// SAFETY: shared access is read-only through &[u64].
unsafe impl Sync for Words {}

impl Words {
    /// `len` zero words.
    pub fn zeroed(len: usize) -> Words {
        if len == 0 {
            return Words {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            };
        }
        let bytes = len * 8;
        if bytes < SMALL_WORDS_BYTES {
            // SAFETY: a non-zero-sized layout of u64s.
            let p = unsafe { std::alloc::alloc_zeroed(small_layout(len)) };
            if p.is_null() {
                std::alloc::handle_alloc_error(small_layout(len));
            }
            return Words { ptr: p.cast(), len };
        }
        // SAFETY: a fresh private anonymous mapping of the requested size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "out of address space for a {bytes}-byte copy"
        );
        if bytes >= 2 << 20 {
            // SAFETY: advice on our own fresh mapping.
            unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
        }
        Words { ptr: p.cast(), len }
    }

    /// The words as bytes, for filling.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping holds len*8 bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len * 8) }
    }
}

impl std::ops::Deref for Words {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: ptr is valid for len words (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Clone for Words {
    fn clone(&self) -> Words {
        let mut w = Words::zeroed(self.len);
        w.bytes_mut().copy_from_slice(
            // SAFETY: viewing our own words as bytes.
            unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len * 8) },
        );
        w
    }
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Words({} words)", self.len)
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        if self.len * 8 >= SMALL_WORDS_BYTES {
            // SAFETY: unmapping the mapping this value owns.
            unsafe { libc::munmap(self.ptr.cast(), self.len * 8) };
        } else if self.len > 0 {
            // SAFETY: freeing the allocation this value owns, with the layout it was made
            // with.
            unsafe { std::alloc::dealloc(self.ptr.cast(), small_layout(self.len)) };
        }
    }
}

/// Copies `[addr, addr + 8*len)` from `mem` into fresh words, reading only present pages.
/// Unreadable parts read as zeros; use [`read_words_gaps`] where they matter.
pub fn read_words(mem: &dyn Memory, addr: u64, len: usize) -> Words {
    read_words_gaps(mem, addr, len).0
}

/// Like [`read_words`], and also returns the ranges that could not be read (sorted,
/// disjoint, page-granular), which hold zeros in the copy.
pub fn read_words_gaps(mem: &dyn Memory, addr: u64, len: usize) -> (Words, Vec<(u64, u64)>) {
    let mut w = Words::zeroed(len);
    let end = addr + len as u64 * 8;
    let bytes = w.bytes_mut();
    let mut gaps = Vec::new();
    for (s, e) in mem.present(addr, end) {
        let (s, e) = (s.max(addr), e.min(end));
        if e > s {
            let buf = &mut bytes[(s - addr) as usize..(e - addr) as usize];
            if mem.read(s, buf).is_err() {
                gaps.extend(unreadable_pages(mem, s, buf));
            }
        }
    }
    (w, crate::reach::ranges::normalize(gaps))
}

/// After a read of `[addr, addr + buf.len())` failed: the pages that really cannot be read
/// (each read again on its own, so `buf` ends up with every readable byte).
fn unreadable_pages(mem: &dyn Memory, addr: u64, buf: &mut [u8]) -> Vec<(u64, u64)> {
    let end = addr + buf.len() as u64;
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut at = addr;
    while at < end {
        let next = ((at / PAGE) + 1) * PAGE;
        let upto = next.min(end);
        let piece = &mut buf[(at - addr) as usize..(upto - addr) as usize];
        if mem.read(at, piece).is_err() {
            match gaps.last_mut() {
                Some(g) if g.1 == at => g.1 = upto,
                _ => gaps.push((at, upto)),
            }
        }
        at = upto;
    }
    gaps
}

/// Memory of a live process, read through `/proc/PID/mem` (or with `process_vm_readv`
/// when that file cannot be opened).
///
/// `process_vm_readv` pins the pages it reads, and pinning an anonymous page shared
/// copy-on-write (the heap of a snapshot child and of the target it was forked from)
/// makes the kernel copy it first: reading a snapshot that way runs at half the speed and
/// duplicates every page read. `/proc/PID/mem` reads the pages without pinning them.
pub struct ProcessMemory {
    pid: i32,
    file: Option<std::fs::File>,
}

impl ProcessMemory {
    /// Memory of process `pid` (it should be frozen for a consistent view).
    pub fn new(pid: i32) -> ProcessMemory {
        ProcessMemory {
            pid,
            file: std::fs::File::open(format!("/proc/{pid}/mem")).ok(),
        }
    }

    fn read_some(&self, addr: u64, buf: &mut [u8]) -> usize {
        if let Some(f) = &self.file {
            use std::os::unix::fs::FileExt;
            // Addresses above i64::MAX are not valid file offsets: nothing is there.
            if addr > i64::MAX as u64 {
                return 0;
            }
            return f.read_at(buf, addr).unwrap_or(0);
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: both iovecs describe valid memory of the stated length (ours is `buf`;
        // the remote one is checked by the kernel).
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        n.max(0) as usize
    }
}

impl ProcessMemory {
    /// Present (or swapped) page runs of `[start, end)`, from `/proc/PID/pagemap`; the
    /// whole range if pagemap cannot be read.
    fn pagemap_runs(&self, start: u64, end: u64) -> Option<Vec<(u64, u64)>> {
        use std::os::unix::fs::FileExt;
        const PAGE: u64 = 4096;
        let f = std::fs::File::open(format!("/proc/{}/pagemap", self.pid)).ok()?;
        let (first, last) = (start / PAGE, end.div_ceil(PAGE));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut entries = vec![0u8; 8 * 8192];
        let mut page = first;
        while page < last {
            let n = ((last - page) as usize).min(8192);
            let buf = &mut entries[..n * 8];
            f.read_exact_at(buf, page * 8).ok()?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(e.try_into().ok()?);
                if v & (3 << 62) != 0 {
                    let a = (page + i as u64) * PAGE;
                    match runs.last_mut() {
                        Some(r) if r.1 == a => r.1 = a + PAGE,
                        _ => runs.push((a, a + PAGE)),
                    }
                }
            }
            page += n as u64;
        }
        for r in &mut runs {
            *r = (r.0.max(start), r.1.min(end));
        }
        Some(runs)
    }
}

impl Memory for ProcessMemory {
    fn present(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        // Small ranges are cheaper to read than to look up.
        if end - start < (1 << 20) {
            return vec![(start, end)];
        }
        self.pagemap_runs(start, end)
            .unwrap_or_else(|| vec![(start, end)])
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
        const CHUNK: usize = 1 << 20;
        let mut done = 0;
        let mut total = 0;
        while done < buf.len() {
            let end = (done + CHUNK).min(buf.len());
            let n = self.read_some(addr + done as u64, &mut buf[done..end]);
            total += n;
            if n < end - done {
                // Partial: step over the unreadable page and go on.
                let at = addr + (done + n) as u64;
                let next_page = ((at / 4096) + 1) * 4096;
                done = ((next_page - addr) as usize)
                    .min(buf.len())
                    .max(done + n + 1);
                continue;
            }
            done = end;
        }
        if total == buf.len() {
            Ok(())
        } else {
            Err(Unreadable { read: total })
        }
    }
}

/// Bytes in a [`PageCache`] page.
pub const PAGE: u64 = 4096;
const PAGE_WORDS: usize = (PAGE / 8) as usize;

/// A direct-mapped cache of target pages, for reading many small heap blocks with few
/// system calls: the caller loads runs of pages (one read per contiguous run) and then
/// scans the blocks in them. Page `p` lives in slot `p % slots`, so a sweep in address
/// order keeps the last `slots` pages (read-behind) and a load of fewer than `slots`
/// consecutive page numbers never evicts one of its own pages.
pub struct PageCache<'m> {
    mem: &'m dyn Memory,
    buf: Vec<u64>,
    /// Page number held by each slot (`u64::MAX`: none).
    tags: Vec<u64>,
    /// Whether the slot's page was read in full (else unreadable parts are zeros).
    whole: Vec<bool>,
    mask: u64,
}

impl<'m> PageCache<'m> {
    /// A cache of `slots` pages (a power of two) over `mem`.
    pub fn new(mem: &'m dyn Memory, slots: usize) -> PageCache<'m> {
        assert!(
            slots.is_power_of_two(),
            "page cache slots must be a power of two"
        );
        PageCache {
            mem,
            buf: vec![0u64; slots * PAGE_WORDS],
            tags: vec![u64::MAX; slots],
            whole: vec![false; slots],
            mask: slots as u64 - 1,
        }
    }

    /// Number of page slots.
    pub fn slots(&self) -> u64 {
        self.mask + 1
    }

    /// The memory the pages come from.
    pub fn memory(&self) -> &'m dyn Memory {
        self.mem
    }

    /// Whether page number `page` is cached.
    #[inline]
    pub fn has(&self, page: u64) -> bool {
        self.tags[(page & self.mask) as usize] == page
    }

    /// Whether every page of the non-empty range `[start, end)` is cached.
    #[inline]
    pub fn holds(&self, start: u64, end: u64) -> bool {
        (start / PAGE..=(end - 1) / PAGE).all(|p| self.has(p))
    }

    /// Reads pages `[first, first + n)` (`n` at most [`slots`](Self::slots)) into their
    /// slots, one read per run of slots that does not wrap around.
    pub fn load(&mut self, first: u64, n: u64) {
        debug_assert!(n <= self.slots());
        let mut page = first;
        while page < first + n {
            let slot = page & self.mask;
            let k = (first + n - page).min(self.slots() - slot);
            let (a, b) = (slot as usize, (slot + k) as usize);
            let words = &mut self.buf[a * PAGE_WORDS..b * PAGE_WORDS];
            let whole = read_into(self.mem, page * PAGE, words);
            for (i, s) in (a..b).enumerate() {
                self.tags[s] = page + i as u64;
                self.whole[s] = whole;
            }
            page += k;
        }
    }

    /// The cached word at 8-aligned `addr`, if its page is cached and was read in full.
    #[inline]
    pub fn word(&self, addr: u64) -> Option<u64> {
        let page = addr / PAGE;
        let slot = (page & self.mask) as usize;
        (self.tags[slot] == page && self.whole[slot])
            .then(|| self.buf[slot * PAGE_WORDS + ((addr % PAGE) / 8) as usize])
    }

    /// Calls `f` with the words of the 8-aligned range `[start, end)`, every page of which
    /// must be cached, in as few pieces as the slots allow (one unless it wraps around).
    #[inline]
    pub fn for_each_piece(&self, start: u64, end: u64, mut f: impl FnMut(&[u64])) {
        let mut at = start;
        while at < end {
            let slot = (at / PAGE) & self.mask;
            debug_assert!(self.has(at / PAGE));
            // Up to the end of the range or of the buffer, whichever comes first.
            let upto = end.min((at / PAGE + self.slots() - slot) * PAGE);
            let from = (slot * PAGE + at % PAGE) as usize / 8;
            f(&self.buf[from..from + ((upto - at) / 8) as usize]);
            at = upto;
        }
    }
}

/// Fills `words` from `addr` (unreadable parts as zeros). Returns whether all was read.
pub fn read_into(mem: &dyn Memory, addr: u64, words: &mut [u64]) -> bool {
    // SAFETY: a u64 slice viewed as bytes of the same length; u8 has no alignment.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
    if mem.read(addr, bytes).is_err() {
        // Partly unreadable: what read() could not fill must not keep old contents.
        bytes.fill(0);
        let _ = mem.read(addr, bytes);
        return false;
    }
    true
}

/// Words viewed as bytes.
fn as_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: a u64 slice viewed as bytes of the same length; u8 has no alignment.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * 8) }
}

/// Shortest run of untouched pages that [`Image::copy`] leaves out of its segments.
pub const SPARSE_RUN: u64 = 1 << 20;

/// The parts of the 8-aligned `[start, end)` to copy: all of it, less runs of at least
/// [`SPARSE_RUN`] bytes that `mem` says were never touched.
fn touched_runs(mem: &dyn Memory, start: u64, end: u64) -> Vec<(u64, u64)> {
    if end - start < SPARSE_RUN {
        return vec![(start, end)];
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut from = start;
    let mut last = start;
    for (s, e) in mem.present(start, end) {
        if s - last >= SPARSE_RUN {
            if last > from {
                out.push((from, last));
            }
            from = s;
        }
        last = e;
    }
    if end - last >= SPARSE_RUN {
        if last > from {
            out.push((from, last));
        }
    } else {
        out.push((from, end));
    }
    out
}

/// A copied segment of target memory.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Address of the first byte.
    pub start: u64,
    /// The bytes, as 8-byte words (so scanning needs no unaligned reads).
    pub words: Words,
}

impl Segment {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.words.len() as u64 * 8
    }
}

/// Copied target memory: non-overlapping segments sorted by address.
#[derive(Debug, Default, Clone)]
pub struct Image {
    segments: Vec<Segment>,
}

impl Image {
    /// Copies the 8-aligned ranges `ranges` (sorted, non-overlapping) from `mem`. Also
    /// returns the ranges that could not be read: they hold zeros in the image, and a
    /// capture records them as gaps.
    ///
    /// Runs of at least [`SPARSE_RUN`] bytes of pages never touched (which read as zeros)
    /// are left out: a mostly untouched mapping (a 20 GiB reservation with a few pages
    /// used) costs what its touched pages cost, to copy and to scan. Ranges that overlap
    /// `dense` are copied whole: a shared mapping's page that another process wrote is
    /// not present in this one's page table, yet holds data.
    pub fn copy(
        mem: &dyn Memory,
        ranges: &[(u64, u64)],
        dense: &[(u64, u64)],
    ) -> (Image, Vec<(u64, u64)>) {
        let mut segments = Vec::with_capacity(ranges.len());
        let mut gaps = Vec::new();
        for &(s, e) in ranges {
            let (s, e) = (s & !7, (e + 7) & !7);
            if e <= s {
                continue;
            }
            let runs = if dense.iter().any(|&(a, b)| a < e && s < b) {
                vec![(s, e)]
            } else {
                touched_runs(mem, s, e)
            };
            for (s, e) in runs {
                let (words, g) = read_words_gaps(mem, s, ((e - s) / 8) as usize);
                gaps.extend(g);
                segments.push(Segment { start: s, words });
            }
        }
        segments.sort_by_key(|s| s.start);
        (Image { segments }, gaps)
    }

    /// Adds segments copied elsewhere (from another source), replacing what this image
    /// holds of their ranges.
    pub fn overlay(&mut self, other: Image) {
        let taken: Vec<(u64, u64)> = other.segments.iter().map(|g| (g.start, g.end())).collect();
        let mut kept = Vec::with_capacity(self.segments.len() + other.segments.len());
        for g in std::mem::take(&mut self.segments) {
            for (s, e) in crate::reach::ranges::subtract(&[(g.start, g.end())], &taken) {
                let a = ((s - g.start) / 8) as usize;
                let mut words = Words::zeroed(((e - s) / 8) as usize);
                words
                    .bytes_mut()
                    .copy_from_slice(as_bytes(&g.words[a..a + ((e - s) / 8) as usize]));
                kept.push(Segment { start: s, words });
            }
        }
        kept.extend(other.segments);
        kept.sort_by_key(|s| s.start);
        self.segments = kept;
    }

    /// The words covering `[addr, addr+len)`, if one segment holds them all
    /// (`addr` rounded down and the end rounded up to 8).
    pub fn words(&self, addr: u64, len: u64) -> Option<&[u64]> {
        let (s, e) = (addr & !7, (addr + len + 7) & !7);
        let i = self.segments.partition_point(|g| g.start <= s);
        let g = self.segments.get(i.checked_sub(1)?)?;
        if e > g.end() {
            return None;
        }
        let a = ((s - g.start) / 8) as usize;
        Some(&g.words[a..a + ((e - s) / 8) as usize])
    }

    /// Calls `f` with the address and the copied words of every segment piece overlapping
    /// `[start, end)` (what no segment holds is skipped).
    pub fn for_each_piece(&self, start: u64, end: u64, mut f: impl FnMut(u64, &[u64])) {
        let (s, e) = (start & !7, (end + 7) & !7);
        let first = self.segments.partition_point(|g| g.end() <= s);
        for g in &self.segments[first..] {
            if g.start >= e {
                break;
            }
            let a = ((s.max(g.start) - g.start) / 8) as usize;
            let b = ((e.min(g.end()) - g.start) / 8) as usize;
            if a < b {
                f(g.start + a as u64 * 8, &g.words[a..b]);
            }
        }
    }

    /// The 8-byte word at `addr` (8-aligned), if copied.
    pub fn word(&self, addr: u64) -> Option<u64> {
        self.words(addr, 8).map(|w| w[0])
    }

    /// All segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Total copied bytes.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.words.len() as u64 * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((addr + i as u64) & 0xff) as u8;
            }
            Ok(())
        }
    }

    impl Fake {
        fn word_at(&self, addr: u64) -> Option<u64> {
            let mut b = [0u8; 8];
            self.read(addr, &mut b).ok()?;
            Some(u64::from_le_bytes(b))
        }
    }

    #[test]
    fn image_lookups_stay_inside_segments() {
        let (img, gaps) = Image::copy(&Fake, &[(0x1000, 0x1010), (0x2000, 0x2008)], &[]);
        assert!(gaps.is_empty());
        assert_eq!(
            img.word(0x1008),
            Some(u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]))
        );
        assert_eq!(img.words(0x1000, 16).map(|w| w.len()), Some(2));
        assert!(img.words(0x1008, 16).is_none());
        assert!(img.word(0x1800).is_none());
        assert_eq!(img.bytes(), 24);
        let mut pieces = Vec::new();
        img.for_each_piece(0x1008, 0x2008, |at, w| pieces.push((at, w.len())));
        assert_eq!(pieces, vec![(0x1008, 1), (0x2000, 1)]);
    }

    /// [`Fake`] whose pages are touched only at 0x1000_0000 (one page), at 0x1030_0000
    /// (two pages) and at 0x1040_0000 (one page): runs apart by 3 MiB, then by under 1 MiB.
    struct Sparse;
    impl Memory for Sparse {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            Fake.read(addr, buf)
        }
        fn present(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
            [
                (0x1000_0000, 0x1000_1000),
                (0x1030_0000, 0x1030_2000),
                (0x1040_0000, 0x1040_1000),
            ]
            .into_iter()
            .map(|(s, e): (u64, u64)| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
            .collect()
        }
    }

    #[test]
    fn long_untouched_runs_are_neither_copied_nor_scanned() {
        let (img, gaps) = Image::copy(&Sparse, &[(0x0f00_0000, 0x2000_0000)], &[]);
        assert!(gaps.is_empty());
        let segs: Vec<(u64, u64)> = img.segments().iter().map(|g| (g.start, g.end())).collect();
        // The 3 MiB hole is left out, the shorter one kept (read as zeros), and the
        // untouched head and tail are left out.
        assert_eq!(
            segs,
            vec![(0x1000_0000, 0x1000_1000), (0x1030_0000, 0x1040_1000)]
        );
        assert_eq!(img.word(0x1000_0008), Fake.word_at(0x1000_0008));
        assert!(img.word(0x1010_0000).is_none());
        let mut pieces = Vec::new();
        img.for_each_piece(0x0f00_0000, 0x2000_0000, |at, w| {
            pieces.push((at, w.len() * 8))
        });
        // Each piece comes with its address: what was left out is skipped, not slid over.
        assert_eq!(
            pieces,
            vec![(0x1000_0000, 0x1000), (0x1030_0000, 0x10_1000)]
        );
        // A short range is copied whole, touched or not.
        let (img, _) = Image::copy(&Sparse, &[(0x0500_0000, 0x0500_8000)], &[]);
        assert_eq!(img.bytes(), 0x8000);
        // A shared mapping is copied whole.
        let (img, _) = Image::copy(
            &Sparse,
            &[(0x0f00_0000, 0x2000_0000)],
            &[(0x1f00_0000, 0x1f00_1000)],
        );
        assert_eq!(img.bytes(), 0x1100_0000);
    }

    /// [`Fake`] with the page at 0x3000 unreadable.
    struct Holed;
    impl Memory for Holed {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            let mut read = 0;
            for (i, b) in buf.iter_mut().enumerate() {
                let a = addr + i as u64;
                *b = if (0x3000..0x4000).contains(&a) {
                    0
                } else {
                    (a & 0xff) as u8
                };
                read += usize::from(!(0x3000..0x4000).contains(&a));
            }
            if read == buf.len() {
                Ok(())
            } else {
                Err(Unreadable { read })
            }
        }
    }

    #[test]
    fn an_unreadable_page_is_a_recorded_gap_not_silent_zeros() {
        let (img, gaps) = Image::copy(&Holed, &[(0x2ff8, 0x4010)], &[]);
        assert_eq!(gaps, vec![(0x3000, 0x4000)]);
        assert_eq!(
            img.word(0x2ff8),
            Some(u64::from_le_bytes(std::array::from_fn(|i| 0xf8 + i as u8)))
        );
        assert_eq!(
            img.word(0x4008),
            Some(u64::from_le_bytes(std::array::from_fn(|i| 8 + i as u8)))
        );
    }

    #[test]
    fn page_cache_loads_runs_and_wraps() {
        let mem = Fake;
        let mut c = PageCache::new(&mem, 4);
        // Pages 6..9 use slots 2, 3, 0, 1: two reads, and a range over them comes in two
        // pieces.
        c.load(6, 4);
        assert!(c.holds(6 * PAGE, 10 * PAGE) && !c.has(5) && !c.has(10));
        let start = 7 * PAGE - 16;
        let mut pieces: Vec<(usize, u64)> = Vec::new();
        c.for_each_piece(start, start + 32, |w| pieces.push((w.len(), w[0])));
        let at =
            |a: u64| u64::from_le_bytes(std::array::from_fn(|i| ((a + i as u64) & 0xff) as u8));
        assert_eq!(pieces, vec![(4, at(start))]);
        pieces.clear();
        c.for_each_piece(8 * PAGE - 8, 8 * PAGE + 8, |w| pieces.push((w.len(), w[0])));
        assert_eq!(pieces, vec![(1, at(8 * PAGE - 8)), (1, at(8 * PAGE))]);
        assert_eq!(c.word(9 * PAGE + 16), Some(at(9 * PAGE + 16)));
        // Loading page 10 evicts page 6 (same slot).
        c.load(10, 1);
        assert!(c.has(10) && !c.has(6) && c.word(6 * PAGE).is_none());
    }

    #[test]
    fn live_read_of_own_memory_and_of_a_hole() {
        let data = [7u8; 64];
        let mem = ProcessMemory::new(std::process::id() as i32);
        let mut buf = [0u8; 64];
        assert_eq!(mem.read(data.as_ptr() as u64, &mut buf), Ok(()));
        assert_eq!(buf, data);
        assert_eq!(mem.read(8, &mut buf[..8]), Err(Unreadable { read: 0 }));
    }
}
