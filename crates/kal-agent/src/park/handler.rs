//! The fault handler: one agent thread reading the userfaultfd. It restores a parked run
//! on any fault in it, gives a run being parked back to the program if the program writes
//! to it, zero-fills other missing pages of registered spans (plain anonymous-memory
//! semantics), and follows `mremap`/`munmap` of registered ranges. It blocks every signal,
//! never allocates and never waits for a program thread.

use super::runs::{self, Locked};
use super::{store, uffd, PAGE};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Decompression buffers, used under the lock: compressed input, then the run's bytes.
static IN: AtomicUsize = AtomicUsize::new(0);
static OUT: AtomicUsize = AtomicUsize::new(0);

fn run_bytes() -> usize {
    (super::RUN_PAGES * PAGE) as usize
}

/// Maps the handler's buffers; false when the kernel gives no memory.
pub fn init() -> bool {
    if IN.load(Ordering::Acquire) == 0 {
        let i = crate::mem::map(
            lz4_flex::block::get_maximum_output_size(run_bytes()),
            b"kal-park-restore\0",
        );
        let o = crate::mem::map(run_bytes(), b"kal-park-restore\0");
        if i.is_null() || o.is_null() {
            return false;
        }
        IN.store(i as usize, Ordering::Release);
        OUT.store(o as usize, Ordering::Release);
    }
    true
}

/// Starts the handler thread with every signal blocked; false if it could not start.
pub fn start() -> bool {
    crate::server::threads::spawn(serve, crate::server::threads::Stack::Sized(256 * 1024))
}

extern "C" fn serve(_: *mut libc::c_void) -> *mut libc::c_void {
    // Anything this thread allocates (nothing, by design) passes through untracked.
    crate::hooks::guard::enter_agent();
    // SAFETY: gettid has no preconditions.
    crate::server::alone::HANDLER_TID.store(unsafe { libc::gettid() }, Ordering::Release);
    let fd = super::fd();
    loop {
        let mut m = uffd::Msg::default();
        // SAFETY: reading one message into a plain struct of the kernel's size.
        let n = unsafe { libc::read(fd, (&mut m as *mut uffd::Msg).cast(), uffd::MSG_SIZE) };
        if n != uffd::MSG_SIZE as isize {
            let e = super::errno();
            if n < 0 && (e == libc::EINTR || e == libc::EAGAIN) {
                continue;
            }
            // The descriptor is gone (a fork child never runs this thread): nothing to do.
            return core::ptr::null_mut();
        }
        handle(fd, &m);
        forget();
    }
}

/// Handles one message of the userfaultfd.
#[inline(never)]
fn handle(fd: i32, m: &uffd::Msg) {
    match m.event {
        uffd::EVENT_PAGEFAULT => fault(fd, m.b, m.a),
        uffd::EVENT_REMAP => remap(m.a, m.b, m.c),
        uffd::EVENT_UNMAP => unmap(m.a, m.b),
        _ => {}
    }
}

/// Bytes of dead frames below the loop's frame that [`forget`] zeroes: more than the
/// deepest [`handle`] goes.
const FORGET_BYTES: usize = 16 << 10;

/// Leaves no heap address in this thread's stack or registers while it waits for the next
/// message: kal scans a waiting thread's stack above its stack pointer and its registers as
/// roots, and the address of a run it just restored (inside a lost block) would make that
/// block look possibly lost.
#[inline(never)]
fn forget() {
    let mut frames = [0u64; FORGET_BYTES / 8];
    for w in frames.iter_mut() {
        // SAFETY: a plain store to our own local; volatile so that it is not elided.
        unsafe { core::ptr::write_volatile(w, 0) };
    }
    core::hint::black_box(&mut frames);
    // SAFETY: only zeroes caller-saved registers this function may clobber anyway.
    unsafe {
        core::arch::asm!(
            "xor eax, eax",
            "xor ecx, ecx",
            "xor edx, edx",
            "xor esi, esi",
            "xor edi, edi",
            "xor r8d, r8d",
            "xor r9d, r9d",
            "xor r10d, r10d",
            "xor r11d, r11d",
            out("rax") _,
            out("rcx") _,
            out("rdx") _,
            out("rsi") _,
            out("rdi") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            options(nostack, nomem)
        );
    }
}

fn page_of(addr: u64) -> u64 {
    addr & !(PAGE - 1)
}

/// Whether a fault at `addr` touched `[a, b)` for certain.
fn inside(addr: u64, a: u64, b: u64) -> bool {
    if super::EXACT.load(Ordering::Relaxed) {
        a <= addr && addr < b
    } else {
        let p = page_of(addr);
        a <= p && p + PAGE <= b
    }
}

fn fault(fd: i32, addr: u64, flags: u64) {
    let mut l = runs::lock();
    let page = page_of(addr);
    match l.find(addr) {
        Some(i) => {
            let r = *l.run(i);
            let (a, b) = r.block();
            if inside(addr, a, b) {
                super::CONTRADICTIONS.fetch_add(1, Ordering::Relaxed);
                crate::server::reclaim::ban(r.stack);
                crate::state::publish_reclaim();
            }
            if r.state == runs::PARKING {
                // The program uses the run while it is being copied: it stays as it is.
                l.run(i).abandoned = 1;
                if flags & uffd::PAGEFAULT_FLAG_WP != 0 {
                    let _ = uffd::writeprotect(fd, r.start(), r.end() - r.start(), false);
                } else if uffd::zeropage(fd, page, PAGE).is_err() {
                    let _ = uffd::wake(fd, page, PAGE);
                }
            } else {
                restore(&mut l, i, true);
            }
        }
        None if flags & uffd::PAGEFAULT_FLAG_WP != 0 => {
            let _ = uffd::writeprotect(fd, page, PAGE, false);
        }
        None => {
            if uffd::zeropage(fd, page, PAGE).is_err() {
                let _ = uffd::wake(fd, page, PAGE);
            }
        }
    }
    let _ = uffd::wake(fd, page, PAGE);
}

/// Fills `[dst, dst + len)` (missing pages) from `src`, or with zero pages if `src` is 0;
/// pages already present are left alone.
fn fill(fd: i32, dst: u64, src: u64, len: u64) {
    let once = |d: u64, s: u64, n: u64| {
        for _ in 0..1000 {
            let r = if src == 0 {
                uffd::zeropage(fd, d, n)
            } else {
                uffd::copy(fd, d, s, n)
            };
            match r {
                Err(libc::EAGAIN) => continue,
                r => return r,
            }
        }
        Err(libc::EAGAIN)
    };
    if once(dst, src, len).is_ok() {
        return;
    }
    // Part of it was present (or gone): page by page, ignoring what cannot be filled.
    let mut off = 0;
    while off < len {
        let s = if src == 0 { 0 } else { src + off };
        let _ = once(dst + off, s, PAGE);
        off += PAGE;
    }
}

/// Puts run `i`'s exact bytes back and frees its slot; `touched`: because of a fault
/// (counted as restored), rather than at fork or exit.
pub fn restore(l: &mut Locked, i: usize, touched: bool) {
    let fd = super::fd();
    let r = *l.run(i);
    let bytes = r.end() - r.start();
    let inp = IN.load(Ordering::Acquire) as *mut u8;
    let out = OUT.load(Ordering::Acquire) as *mut u8;
    // SAFETY: both buffers were mapped by init with these bounds (a run is at most
    // RUN_PAGES pages, its compressed form at most the lz4 bound); the lock makes this
    // thread their only user.
    let (inp, out) = unsafe {
        (
            core::slice::from_raw_parts_mut(inp, r.store_len as usize),
            core::slice::from_raw_parts_mut(out, bytes as usize),
        )
    };
    let ok = store::get(r.store_off, inp)
        && lz4_flex::block::decompress_into(inp, out).ok() == Some(bytes as usize);
    if !ok {
        // The exact bytes cannot be had: nothing sensible remains but zeros. Never again.
        super::set_note(super::Note::Broken, 0);
        super::STATE.store(super::STOPPED, Ordering::Release);
        fill(fd, r.start(), 0, bytes);
    } else {
        // Runs of zero pages and of data pages, each filled with one call.
        let mut p = 0u64;
        while p < bytes {
            let zero = super::is_zero(&out[p as usize..(p + PAGE) as usize]);
            let mut q = p + PAGE;
            while q < bytes && super::is_zero(&out[q as usize..(q + PAGE) as usize]) == zero {
                q += PAGE;
            }
            let src = if zero { 0 } else { out.as_ptr() as u64 + p };
            fill(fd, r.start() + p, src, q - p);
            p = q;
        }
    }
    let _ = uffd::wake(fd, r.start(), bytes);
    store::free(r.store_off, r.store_alloc);
    super::PARKED.fetch_sub(bytes, Ordering::Relaxed);
    if touched {
        super::RESTORED.fetch_add(bytes, Ordering::Relaxed);
        super::RESTORES.fetch_add(1, Ordering::Relaxed);
    }
    l.run(i).state = runs::FREE;
    // Leave no copy of the run's pointers in the agent's memory (zeroing the used part is
    // cheaper than giving the pages back and faulting them in at the next restore).
    out.fill(0);
    inp.fill(0);
}

/// `mremap` moved `[from, from + len)` to `to`: so did the runs in it.
fn remap(from: u64, to: u64, len: u64) {
    let mut l = runs::lock();
    for i in 0..l.high() {
        let r = l.run(i);
        if r.state != runs::FREE && from <= r.start() && r.start() < from + len {
            let (s, b) = (r.start(), r.block().0);
            r.start_inv = !(s - from + to);
            r.block_inv = !(b.wrapping_sub(from).wrapping_add(to));
            if r.state == runs::PARKING {
                r.abandoned = 1;
            }
        }
    }
    l.forget_spans(from, from + len);
    l.note_span(to, to + len);
}

/// `[start, end)` was unmapped: parked runs there are gone with it.
fn unmap(start: u64, end: u64) {
    let mut l = runs::lock();
    l.forget_spans(start, end);
    for i in 0..l.high() {
        let r = *l.run(i);
        if r.state == runs::FREE || r.start() < start || r.start() >= end {
            continue;
        }
        if r.state == runs::PARKING {
            l.run(i).abandoned = 1;
        } else {
            store::free(r.store_off, r.store_alloc);
            super::PARKED.fetch_sub(r.end() - r.start(), Ordering::Relaxed);
            l.run(i).state = runs::FREE;
        }
    }
}
