//! Per-thread side stacks for the hooks' work, carved from one reserved region.
//!
//! The real allocator and the unwinder spill heap addresses into their stack frames. On the
//! program's own stack those stale copies would later sit in uninitialised slots of live
//! frames and hide leaks from the scan (memcheck never has this problem: its allocator does
//! not run on the client's stack). So each exported allocation function is a naked
//! trampoline ([`crate::hooks`]) that moves to the thread's side stack before doing
//! anything else. All side stacks live in one region that the header names, so the CLI
//! never scans them.
//!
//! Whether the side stack is in use is a per-thread flag, set before the switch and
//! cleared after the switch back, never guessed from the stack pointer: a signal handler
//! that calls `malloc` may interrupt a hook anywhere, and it may run on the program's
//! alternate signal stack (`sigaltstack`) while the interrupted hook's frames are on the
//! side stack. A hook entered while the flag is set runs in place, on whatever stack its
//! caller uses, so it never overwrites frames the interrupted hook still needs.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Usable size of one side stack.
pub const SIZE: usize = 128 * 1024;
const GUARD: usize = 4096;
const SLOT: usize = SIZE + GUARD;
/// Most side stacks (threads alive at once that get one; others run in place and are
/// counted as a gap).
const MAX_SLOTS: usize = 2048;
/// Number of side stacks reserved: [`MAX_SLOTS`], fewer under an address-space limit.
static SLOTS: AtomicUsize = AtomicUsize::new(MAX_SLOTS);

/// How many side stacks to reserve: all of them, or under `RLIMIT_AS` (`ulimit -v`) at
/// most a sixteenth of the limit, so that the program keeps its address space.
fn slots_to_reserve() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a plain struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return MAX_SLOTS;
    }
    (lim.rlim_cur as usize / 16 / SLOT).clamp(1, MAX_SLOTS)
}

static BASE: AtomicUsize = AtomicUsize::new(0);
/// Set once [`init`] has run: a hook without a side stack after that is counted.
static READY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Reserves the region (no memory is used until a stack is touched). Called at start.
pub fn init() {
    if BASE.load(Ordering::Acquire) != 0 {
        return;
    }
    let slots = slots_to_reserve();
    SLOTS.store(slots, Ordering::Release);
    // Fenced by inaccessible pages, so that it never merges with a thread's stack.
    let p = crate::mem::map(SLOT * slots, b"kal-side-stacks\0");
    if !p.is_null() && no_side_stacks_wanted() == 0 {
        BASE.store(p as usize, Ordering::Release);
    }
    READY.store(true, Ordering::Release);
}

/// For tests: `KAL_TEST_NO_SIDE_STACKS=1` leaves the agent without side stacks, so every
/// hook runs on the program's stack and is counted. Read with `getenv` (no allocation).
fn no_side_stacks_wanted() -> usize {
    // SAFETY: a NUL-terminated name; getenv returns null or a NUL-terminated string.
    let v = unsafe { libc::getenv(c"KAL_TEST_NO_SIDE_STACKS".as_ptr()) };
    // SAFETY: non-null, so it points at a NUL-terminated string of at least one byte.
    usize::from(!v.is_null() && unsafe { *v } == b'1' as libc::c_char)
}

/// The reserved region `(start, length, slot size)`, for the header.
pub fn region() -> (u64, u64, u64) {
    (
        BASE.load(Ordering::Acquire) as u64,
        (SLOT * SLOTS.load(Ordering::Acquire)) as u64,
        SLOT as u64,
    )
}

/// A never-used side stack's top, or 0 when the region is exhausted or missing.
pub fn map_stack() -> usize {
    let base = BASE.load(Ordering::Acquire);
    if base == 0 {
        return 0;
    }
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    if i >= SLOTS.load(Ordering::Acquire) {
        return 0;
    }
    let slot = base + i * SLOT;
    // A guard region in the page tables (Linux 6.13) leaves the reservation one mapping;
    // `mprotect` splits it in two per stack, and every mapping costs each fork (a
    // snapshot of 2,000 threads copied 4,000 more mappings, ~3 us each). Older kernels
    // refuse the advice: the guard page is then made with `mprotect`.
    // SAFETY: the guard page lies inside our own reservation.
    if unsafe { libc::madvise(slot as *mut libc::c_void, GUARD, MADV_GUARD_INSTALL) } != 0 {
        // SAFETY: as above.
        unsafe { libc::mprotect(slot as *mut libc::c_void, GUARD, libc::PROT_NONE) };
    }
    slot + SLOT
}

/// `madvise` advice that installs guard markers in the page tables (Linux 6.13).
const MADV_GUARD_INSTALL: libc::c_int = 102;

/// The calling thread's side stack top, or 0 if it has none yet.
pub fn current_top() -> usize {
    crate::hooks::tls::with(|t| t.side_top.get())
}

/// The trampolines' slow path: the top of the calling thread's side stack (16-aligned),
/// now marked in use, or 0 (it has none, or a hook this call interrupted uses it: run in
/// place). The address of the thread's [`crate::hooks::tls::PerThread`] is left at
/// `top - 16`, where the trampoline takes it to pass it on and, once back on the program's
/// stack, to clear the in-use flag (nothing is pushed there: a stale copy of a returned
/// pointer below the program's stack pointer would hide a leak). Called on the program's
/// stack: keep it small.
pub extern "C" fn claim() -> usize {
    let per = crate::hooks::tls::current();
    // SAFETY: this thread's own state, alive as long as the thread.
    let me = unsafe { &*per };
    if me.side_busy.get() != 0 {
        return 0;
    }
    let mut t = me.side_top.get();
    if t == 0 {
        t = first_top(me);
    }
    if t != 0 {
        // One store: a signal before it finds the stack free, after it finds it in use.
        me.side_busy.set(1);
        // SAFETY: t is the top of this thread's own side stack, in use by nobody else now;
        // the 16 bytes below it are inside it.
        unsafe { *((t - 16) as *mut usize) = per as usize };
    }
    t
}

#[cold]
#[inline(never)]
fn first_top(me: &crate::hooks::tls::PerThread) -> usize {
    if !crate::hooks::guard::enter_in(me) {
        return 0;
    }
    let t = crate::hooks::pool::take_stack();
    if t == 0 && READY.load(Ordering::Acquire) {
        // This hook (and the next ones of this thread) run on the program's stack.
        crate::state::note_no_side_stack();
    }
    me.side_top.set(t);
    crate::hooks::guard::leave_in(me);
    t
}
