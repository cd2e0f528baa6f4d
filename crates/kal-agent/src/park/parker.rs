//! The parker: turns the blocks a park request names into runs and parks each run
//! race-free (see the module documentation of [`super`]). It runs in the control thread;
//! whatever it allocates (the request's lists, lz4's hash table) passes through untracked.

use super::runs::{self, Run};
use super::{store, uffd, PAGE, RUN_PAGES};
use crate::table::Tables;
use core::sync::atomic::{AtomicUsize, Ordering};

static IN: AtomicUsize = AtomicUsize::new(0);
static OUT: AtomicUsize = AtomicUsize::new(0);
/// Floor of the store limit when it is a share of what is parked.
const LIMIT_FLOOR: u64 = 16 << 20;

fn run_bytes() -> usize {
    (RUN_PAGES * PAGE) as usize
}

/// Maps the parker's buffers; false when the kernel gives no memory.
pub fn init() -> bool {
    if IN.load(Ordering::Acquire) == 0 {
        let i = crate::mem::map(run_bytes(), b"kal-park-copy\0");
        let o = crate::mem::map(
            lz4_flex::block::get_maximum_output_size(run_bytes()),
            b"kal-park-copy\0",
        );
        if i.is_null() || o.is_null() {
            return false;
        }
        IN.store(i as usize, Ordering::Release);
        OUT.store(o as usize, Ordering::Release);
    }
    true
}

/// What a park request did.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    /// Entries of which at least one page was parked now.
    pub blocks: u64,
    /// Bytes parked now.
    pub bytes: u64,
    /// Entries no longer that allocation.
    pub stale: u64,
    /// Entries from banned sites.
    pub banned: u64,
    /// Runs not parked: the store or span limit was reached.
    pub skipped: u64,
}

/// One block to park, with the span of memory that is its own (chunk header included).
#[derive(Clone, Copy)]
struct Cand {
    entry: usize,
    addr: u64,
    len: u64,
    stack: u32,
    a: u64,
    b: u64,
    /// `[a, b)` is exactly a glibc heap chunk (not mmapped): `a` holds its header and the
    /// next chunk starts at `b`.
    chunk: bool,
}

/// What a walk of glibc's heap needs to step over run `[rs, re)` of a group of spans
/// `group` (see [`kal_proto::ParkRun`]): the first chunk whose size word lies in the run,
/// and where the chunk holding the run's last byte ends (0 when that is not known).
fn chunk_marks(group: &[Cand], rs: u64, re: u64) -> (Option<u64>, u64) {
    let chunks = || group.iter().filter(|k| k.chunk);
    let first = chunks()
        .map(|k| k.a)
        .filter(|&a| rs <= a + 8 && a + 8 < re)
        .min();
    let resume = chunks()
        .filter(|k| k.a < re && re <= k.b)
        .map(|k| k.b)
        .min()
        .unwrap_or(0);
    (first, resume)
}

/// Reads `out.len()` bytes of our own memory at `addr`, failing (not faulting) where it is
/// not mapped.
fn self_read(addr: u64, out: &mut [u8]) -> bool {
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: out.len(),
    };
    // SAFETY: the local iovec is our own buffer; the remote one is only read by the
    // kernel, which reports unmapped memory as an error.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == out.len() as isize
}

/// The memory that belongs to block `addr` of `len` bytes: with glibc's allocator its whole
/// chunk (the 16-byte header before it up to the next chunk's header; an mmapped chunk's
/// whole mapping), checked against the header; otherwise just its bytes. The flag says
/// whether the span is exactly a heap chunk (not mmapped).
fn span(addr: u64, len: u64, glibc: bool) -> (u64, u64, bool) {
    let plain = (addr, addr + len, false);
    if !glibc || addr < 16 {
        return plain;
    }
    let mut h = [0u8; 16];
    if !self_read(addr - 16, &mut h) {
        return plain;
    }
    let prev = u64::from_le_bytes(h[0..8].try_into().unwrap_or([0; 8]));
    let word = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
    let size = word & !7;
    let chunk = addr - 16;
    if word & 2 != 0 {
        // mmapped: the mapping starts `prev` bytes before the chunk.
        if size % PAGE == 0 && size >= len + 16 && prev % 16 == 0 && prev < PAGE {
            return (chunk - prev, chunk + size, false);
        }
    } else if size >= len + 8 && size <= len + 8 + 64 {
        return (chunk, chunk + size, true);
    }
    plain
}

/// The store limit for a request argument: 0 means 25 % of what is parked, bit 31 a
/// percentage in the low bits, anything else MiB; a share never below 16 MiB.
fn limit(arg: u32, adding: u64) -> u64 {
    let parked = super::PARKED.load(Ordering::Relaxed) + adding;
    match arg {
        0 => (parked / 4).max(LIMIT_FLOOR),
        a if a & (1 << 31) != 0 => (parked / 100 * (a & 0xffff) as u64).max(LIMIT_FLOOR),
        mib => (mib as u64) << 20,
    }
}

/// Why parking stopped for the rest of a request.
enum Stop {
    /// Store or span limit reached.
    Full,
    /// Parking is no longer active (stopped, or the program forks).
    Off,
}

/// Parks the pages of the blocks `entries` (address, sequence number) that are still those
/// allocations and not from banned sites; `pages[i]` gets the pages parked for entry `i`.
pub fn park_blocks(t: &Tables, entries: &[(u64, u64)], arg: u32, pages: &mut [u32]) -> Counts {
    let mut c = Counts::default();
    let glibc = crate::hooks::real::get().is_some_and(|r| r.glibc);
    let mut cands: Vec<Cand> = Vec::with_capacity(entries.len());
    for (i, &(addr, seq)) in entries.iter().enumerate() {
        let Some(now) = t.peek(addr, seq) else {
            c.stale += 1;
            continue;
        };
        if crate::server::reclaim::is_banned(t, now.stack) {
            c.banned += 1;
            continue;
        }
        // Parked already (reading its header would fault it back in): nothing to do.
        let own = if glibc { addr.saturating_sub(16) } else { addr };
        if !runs::init() || runs::lock().overlaps(own, addr + now.size.max(1)) {
            continue;
        }
        let (a, b, chunk) = span(addr, now.size, glibc);
        cands.push(Cand {
            entry: i,
            addr,
            len: now.size,
            stack: now.stack,
            a,
            b,
            chunk,
        });
    }
    cands.sort_unstable_by_key(|k| k.a);
    let up = |x: u64| x.div_ceil(PAGE) * PAGE;
    let down = |x: u64| x / PAGE * PAGE;
    let mut g = 0;
    'groups: while g < cands.len() {
        // A group: spans that touch or overlap; its whole pages are covered only by them.
        let mut end = cands[g].b;
        let mut h = g + 1;
        while h < cands.len() && cands[h].a <= end {
            end = end.max(cands[h].b);
            h += 1;
        }
        let (ga, gb) = (up(cands[g].a), down(end));
        for k in g..h {
            let from = up(cands[k].a).max(ga);
            let to = if k + 1 < h { up(cands[k + 1].a) } else { gb }.min(gb);
            let mut p = from;
            while p < to {
                let n = ((to - p) / PAGE).min(RUN_PAGES);
                let marks = chunk_marks(&cands[g..h], p, p + n * PAGE);
                match park_run(p, n, &cands[k], marks, arg) {
                    Ok(done) => {
                        if done > 0 {
                            let e = cands[k].entry;
                            if pages[e] == 0 {
                                c.blocks += 1;
                            }
                            pages[e] += done as u32;
                            c.bytes += done * PAGE;
                        }
                    }
                    Err(Stop::Full) => {
                        c.skipped += 1;
                        super::SKIPPED.fetch_add(1, Ordering::Relaxed);
                        break 'groups;
                    }
                    Err(Stop::Off) => break 'groups,
                }
                p += n * PAGE;
            }
        }
        g = h;
    }
    // Leave no copy of the parked bytes (their pointers) in the agent's memory, which kal
    // scans: the buffers go back to the kernel once per request (not per run: refaulting
    // them costs more than the copy).
    crate::mem::release(IN.load(Ordering::Acquire) as *mut u8, run_bytes());
    crate::mem::release(
        OUT.load(Ordering::Acquire) as *mut u8,
        lz4_flex::block::get_maximum_output_size(run_bytes()),
    );
    // Nor block addresses in this thread's (untracked, unscanned-as-heap) memory: a stale
    // copy there would make the parked blocks look reachable.
    for k in cands.iter_mut() {
        *k = Cand {
            entry: 0,
            addr: 0,
            len: 0,
            stack: 0,
            a: 0,
            b: 0,
            chunk: false,
        };
    }
    c
}

fn active() -> bool {
    super::STATE.load(Ordering::Acquire) == super::ACTIVE && !super::FORKING.load(Ordering::Acquire)
}

/// Gives run `i` back untouched: write protection lifted, slot and store extent freed.
fn abandon(l: &mut runs::Locked, i: usize, extent: Option<(u64, u64)>) {
    let r = *l.run(i);
    let _ = uffd::writeprotect(super::fd(), r.start(), r.end() - r.start(), false);
    if let Some((off, alloc)) = extent {
        store::free(off, alloc);
    }
    l.run(i).state = runs::FREE;
}

/// Parks `n` pages at `start`, part of block `k` (`marks`: from [`chunk_marks`]); returns
/// the pages parked (0: left alone, e.g. already parked or touched meanwhile).
fn park_run(
    start: u64,
    n: u64,
    k: &Cand,
    marks: (Option<u64>, u64),
    arg: u32,
) -> Result<u64, Stop> {
    let fd = super::fd();
    let len = n * PAGE;
    let i = {
        let mut l = runs::lock();
        if !active() {
            return Err(Stop::Off);
        }
        if l.overlaps(start, start + len) {
            return Ok(0);
        }
        if !l.registered(start, start + len) {
            if uffd::register(fd, start, len, uffd::MODE_MISSING | uffd::MODE_WP).is_err() {
                return Ok(0);
            }
            if !l.note_span(start, start + len) {
                let _ = uffd::unregister(fd, start, len);
                return Err(Stop::Full);
            }
        }
        let run = Run {
            start_inv: !start,
            pages: n,
            block_inv: !k.addr,
            block_len: k.len,
            stack: k.stack,
            first_inv: marks.0.map_or(0, |a| !a),
            resume_inv: if marks.1 == 0 { 0 } else { !marks.1 },
            ..Run::default()
        };
        match l.add(run) {
            Some(i) => i,
            None => return Err(Stop::Full),
        }
    };
    // From here on every write by the program to the run stops in the handler.
    if uffd::writeprotect(fd, start, len, true).is_err() {
        abandon(&mut runs::lock(), i, None);
        return Ok(0);
    }
    let inp = IN.load(Ordering::Acquire) as *mut u8;
    let out = OUT.load(Ordering::Acquire) as *mut u8;
    // SAFETY: both buffers were mapped by init with these bounds; only this (control)
    // thread uses them.
    let (inp, out) = unsafe {
        (
            core::slice::from_raw_parts_mut(inp, len as usize),
            core::slice::from_raw_parts_mut(
                out,
                lz4_flex::block::get_maximum_output_size(run_bytes()),
            ),
        )
    };
    let mut present = [0u8; RUN_PAGES as usize];
    // SAFETY: mincore over our own range into a vector of one byte per page.
    let rc = unsafe {
        libc::mincore(
            start as *mut libc::c_void,
            len as usize,
            present.as_mut_ptr(),
        )
    };
    let mut ok = rc == 0;
    let mut p = 0usize;
    while ok && p < n as usize {
        let mut q = p + 1;
        while q < n as usize && (present[q] & 1) == (present[p] & 1) {
            q += 1;
        }
        let (a, b) = (p * PAGE as usize, q * PAGE as usize);
        if present[p] & 1 != 0 {
            ok = self_read(start + a as u64, &mut inp[a..b]);
        } else {
            // Never touched (or given back): it reads as zeros, and must not be touched now.
            inp[a..b].fill(0);
        }
        p = q;
    }
    let packed = if ok {
        lz4_flex::block::compress_into(inp, out).ok()
    } else {
        None
    };
    let Some(m) = packed else {
        abandon(&mut runs::lock(), i, None);
        return Ok(0);
    };
    let full =
        store::BYTES.load(Ordering::Relaxed) + (m as u64).div_ceil(PAGE) * PAGE > limit(arg, len);
    let extent = if full { None } else { store::put(&out[..m]) };
    let pause = super::PAUSE_MS.load(Ordering::Relaxed);
    if pause > 0 {
        let ts = libc::timespec {
            tv_sec: (pause / 1000) as i64,
            tv_nsec: ((pause % 1000) * 1_000_000) as i64,
        };
        // SAFETY: nanosleep with a valid request and no remainder pointer.
        unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
    }
    let mut l = runs::lock();
    let Some((off, alloc)) = extent else {
        abandon(&mut l, i, None);
        return if full { Err(Stop::Full) } else { Ok(0) };
    };
    let r = *l.run(i);
    if r.abandoned != 0 || !active() {
        if r.abandoned != 0 {
            super::RACED.fetch_add(1, Ordering::Relaxed);
        }
        abandon(&mut l, i, Some((off, alloc)));
        return Ok(0);
    }
    // SAFETY: the run's pages are write-protected and copied; nobody wrote them since
    // (the handler would have marked the run), and the lock keeps the handler out while
    // they are dropped.
    let rc = unsafe {
        libc::madvise(
            r.start() as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        abandon(&mut l, i, Some((off, alloc)));
        return Ok(0);
    }
    let run = l.run(i);
    // The first chunk's size word as the copy has it: the run was write-protected before
    // the copy, so it is what the dropped page holds.
    if let Some(a) = marks.0 {
        let o = (a + 8 - start) as usize;
        run.first_word = inp
            .get(o..o + 8)
            .and_then(|w| w.try_into().ok())
            .map_or(0, u64::from_le_bytes);
    }
    run.store_off = off;
    run.store_alloc = alloc;
    run.store_len = m as u32;
    run.state = runs::PARKED;
    super::PARKED.fetch_add(len, Ordering::Relaxed);
    super::PARKED_TOTAL.fetch_add(len, Ordering::Relaxed);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(a: u64, b: u64) -> Cand {
        Cand {
            entry: 0,
            addr: a + 16,
            len: b - a - 16,
            stack: 0,
            a,
            b,
            chunk: true,
        }
    }

    #[test]
    fn runs_note_the_first_header_in_them_and_where_the_chunks_after_them_start() {
        const H: u64 = 0x5555_0000_0000;
        // Three adjacent lost chunks: [H+0x20, H+0x1820), [H+0x1820, H+0x3020),
        // [H+0x3020, H+0x3040) (a small one whose header shares X2's last page).
        let g = [
            chunk(H + 0x20, H + 0x1820),
            chunk(H + 0x1820, H + 0x3020),
            chunk(H + 0x3020, H + 0x3040),
        ];
        assert_eq!(
            chunk_marks(&g, H + 0x1000, H + 0x2000),
            (Some(H + 0x1820), H + 0x3020)
        );
        assert_eq!(chunk_marks(&g, H + 0x2000, H + 0x3000), (None, H + 0x3020));
        // A header page-aligned at the run's start is the run's own first header.
        let g2 = [chunk(H + 0x1000, H + 0x3000)];
        assert_eq!(
            chunk_marks(&g2, H + 0x1000, H + 0x2000),
            (Some(H + 0x1000), H + 0x3000)
        );
        // A span that is not exactly a chunk says nothing about boundaries.
        let plain = [Cand {
            chunk: false,
            ..chunk(H + 0x20, H + 0x3020)
        }];
        assert_eq!(chunk_marks(&plain, H + 0x1000, H + 0x2000), (None, 0));
    }
}
