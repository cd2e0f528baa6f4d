//! The exported allocation functions.
//!
//! Each export is a naked trampoline: it fetches the thread's side stack, switches to it
//! before anything is spilled on the program's stack, and calls the `*_impl` function with
//! the caller's stack pointer and frame pointer (where unwinding starts) and the thread's
//! per-thread state (found once, by the trampoline). The impls forward
//! to the next definition and record the result; none allocates on its own path, none
//! panics.

pub(crate) mod ends;
pub(crate) mod guard;
pub(crate) mod pause;
pub(crate) mod pool;
pub(crate) mod real;
pub(crate) mod side;
pub(crate) mod tls;

use crate::hooks::tls::PerThread;
use crate::state;
use crate::unwind::Regs;
use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};
use kal_proto::Api;

static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

/// A sequence number unique in this process: thread index in the high bits, a per-thread
/// count below. A signal handler's hook may run between any two instructions of the
/// interrupted one's, so the count is taken by one instruction, and an index given twice
/// (both saw none yet) is simply never used again after the second.
#[inline(always)]
fn next_seq(t: &PerThread) -> u64 {
    let (mut index, counter) = (t.thread_index.get(), t.seq.as_ptr());
    if index == 0 {
        index = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
        t.thread_index.set(index);
    }
    let mut old: u64 = 1;
    // SAFETY: `counter` is this thread's own counter; a single `xadd` (no lock prefix:
    // only this thread and its signal handlers touch it) cannot be split by a signal.
    unsafe {
        core::arch::asm!(
            "xadd qword ptr [{c}], {v}",
            c = in(reg) counter,
            v = inout(reg) old,
            options(nostack)
        )
    };
    (index << 40) + old + 1
}

/// What a hook knows of its call: where the caller is, and this thread's state.
#[derive(Clone, Copy)]
struct Call {
    /// The caller's registers, where unwinding starts.
    at: Regs,
    /// This thread's per-thread state.
    t: &'static PerThread,
}

/// The call, from the trampoline's view of the program stack and the state it passed.
#[inline(always)]
fn caller(sp: usize, bp: usize, per: *const PerThread) -> Call {
    // SAFETY: `sp` is the program's stack pointer at entry to the export: it points at the
    // return address pushed by the caller's `call`.
    let ra = unsafe { *(sp as *const u64) };
    Call {
        at: Regs {
            pc: ra,
            sp: sp as u64 + 8,
            bp: bp as u64,
        },
        t: tls::passed(per),
    }
}

/// Records a new block (caller holds the guard).
#[inline(always)]
fn record(p: *mut c_void, size: usize, api: Api, c: Call, r: &real::Real) {
    let Some(t) = state::tables() else { return };
    let stack = crate::unwind::stack_id(c.at, t, c.t);
    let mut info = api as u32;
    if r.glibc {
        // SAFETY: a glibc chunk's size word sits just before the block it returned.
        let size_word = unsafe { *(p as *const u64).sub(1) };
        info |= ((size_word & 7) as u32) << kal_proto::CHUNK_FLAGS_SHIFT;
    }
    t.insert(p as u64, size as u64, next_seq(c.t), stack, info);
}

/// Records a new block allocated by a signal handler that interrupted this thread inside
/// a hook. The interrupted hook may be using this thread's unwinding state or a pool lock,
/// so nothing here touches them: the block is recorded without its stack (the report
/// says "stack unknown"), or counted as dropped if the tables are not mapped yet.
#[cold]
#[inline(never)]
fn record_interrupting(p: *mut c_void, size: usize, api: Api, me: &PerThread) {
    let Some(t) = state::tables_if_ready() else {
        state::note_dropped();
        return;
    };
    let mut info = api as u32;
    if real::get().is_some_and(|r| r.glibc) {
        // SAFETY: a glibc chunk's size word sits just before the block it returned.
        let size_word = unsafe { *(p as *const u64).sub(1) };
        info |= ((size_word & 7) as u32) << kal_proto::CHUNK_FLAGS_SHIFT;
    }
    t.insert(
        p as u64,
        size as u64,
        next_seq(me),
        kal_proto::STACK_UNKNOWN,
        info,
    );
}

/// Runs `alloc` and records its non-null result, unless this thread is running the agent's
/// own code (then the block is the agent's).
#[inline(always)]
fn tracked(
    size: usize,
    api: Api,
    c: Call,
    r: &real::Real,
    alloc: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    if crate::attach::detached() {
        return alloc();
    }
    if !guard::enter_in(c.t) {
        let p = alloc();
        if !p.is_null() && guard::interrupted_hook_in(c.t) {
            record_interrupting(p, size, api, c.t);
        }
        return p;
    }
    let p = alloc();
    if !p.is_null() {
        record(p, size, api, c, r);
    }
    guard::leave_in(c.t);
    p
}

#[inline(always)]
fn forget(p: *mut c_void) -> Option<crate::table::Removed> {
    state::tables().and_then(|t| t.remove(p as u64))
}

/// Defines an exported naked trampoline `$name` that runs `$imp` on the side stack.
/// `$imp` takes the three argument registers, then the caller's sp and bp, then the
/// thread's [`tls::PerThread`] (null when the hook runs in place after a failed claim).
macro_rules! trampoline {
    ($(#[$doc:meta])* $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty => $imp:path) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Same contract as the C function it replaces.
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(
                // Fast path: the thread's state at a fixed offset from the thread
                // pointer (static TLS; 0 while unknown or under `dlopen`), its side stack
                // from there, nothing written on this stack. In use (this call
                // interrupted a hook: a signal handler's malloc): run in place. The
                // state's address goes to the impl as its sixth argument (r9).
                "mov r10, qword ptr [rip + {off}]",
                "test r10, r10",
                "jz 4f",
                "mov r9, qword ptr fs:0",
                "add r9, r10",
                "cmp qword ptr [r9 + 8], 0",
                "jne 2f",
                "mov rax, qword ptr [r9]",
                "test rax, rax",
                "jz 4f",
                // Marked in use before the switch, free only after the switch back.
                "mov qword ptr [r9 + 8], 1",
                "mov rcx, rsp",
                "mov r8, rbp",
                "mov rsp, rax",
                "push rcx",
                "push r9",
                "call {imp}",
                "pop r10",
                "pop rsp",
                "mov qword ptr [r10 + 8], 0",
                "ret",
                // Slow path (a thread's first calls, or TLS at no fixed offset).
                "4:",
                "push rdi",
                "push rsi",
                "push rdx",
                "call {claim}",
                "pop rdx",
                "pop rsi",
                "pop rdi",
                "xor r9d, r9d",
                "test rax, rax",
                "jz 2f",
                "mov rcx, rsp",
                "mov r8, rbp",
                "mov rsp, rax",
                "push rcx",
                // [top - 16]: the thread's state, put there by claim.
                "sub rsp, 8",
                "mov r9, qword ptr [rsp]",
                "call {imp}",
                "pop r10",
                "pop rsp",
                "mov qword ptr [r10 + 8], 0",
                "ret",
                // In place (r9: the thread's state, or null).
                "2:",
                "mov rcx, rsp",
                "mov r8, rbp",
                "jmp {imp}",
                claim = sym side::claim,
                off = sym tls::OFFSET,
                imp = sym $imp,
            )
        }
    };
}

trampoline!(
    /// `malloc(3)`.
    malloc(size: usize) -> *mut c_void => malloc_impl
);
trampoline!(
    /// `free(3)`: the block leaves the table *before* the real allocator gets it back.
    free(p: *mut c_void) -> () => free_impl
);
trampoline!(
    /// `calloc(3)`.
    calloc(n: usize, size: usize) -> *mut c_void => calloc_impl
);
trampoline!(
    /// `realloc(3)`.
    realloc(p: *mut c_void, size: usize) -> *mut c_void => realloc_impl
);
trampoline!(
    /// `reallocarray(3)`.
    reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void => reallocarray_impl
);
trampoline!(
    /// `memalign(3)`.
    memalign(align: usize, size: usize) -> *mut c_void => memalign_impl
);
trampoline!(
    /// `aligned_alloc(3)`.
    aligned_alloc(align: usize, size: usize) -> *mut c_void => aligned_alloc_impl
);
trampoline!(
    /// `valloc(3)`.
    valloc(size: usize) -> *mut c_void => valloc_impl
);
trampoline!(
    /// `pvalloc(3)`.
    pvalloc(size: usize) -> *mut c_void => pvalloc_impl
);
trampoline!(
    /// `posix_memalign(3)`.
    posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 => posix_memalign_impl
);

extern "C" fn malloc_impl(
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return real::boot_alloc(size);
    };
    // SAFETY: forwarding the caller's arguments to the real malloc.
    tracked(size, Api::Malloc, caller(sp, bp, per), r, || unsafe {
        (r.malloc)(size)
    })
}

extern "C" fn free_impl(
    p: *mut c_void,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *const PerThread,
) {
    if p.is_null() {
        return;
    }
    // Before the real allocator is known, only bootstrap blocks exist.
    let Some(r) = real::get() else { return };
    if crate::attach::detached() {
        if !real::is_boot(p) {
            // SAFETY: p is the caller's block, handed to the allocator that produced it.
            unsafe { (r.free)(p) };
        }
        return;
    }
    // A block the table knows is the real allocator's (bootstrap blocks are never
    // recorded): the common case asks nothing else.
    let known = state::tables().is_some_and(|t| t.forget(p as u64));
    if !known && (real::is_boot(p) || crate::server::reclaim::contradicts(p as u64)) {
        // A bootstrap block stays where it is; one kal reclaimed already must not be
        // freed twice.
        return;
    }
    // SAFETY: p is the caller's block, handed to the allocator that produced it.
    unsafe { (r.free)(p) }
}

extern "C" fn calloc_impl(
    n: usize,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return match n.checked_mul(size) {
            Some(total) => real::boot_alloc(total),
            None => core::ptr::null_mut(),
        };
    };
    // SAFETY: forwarding the caller's arguments; the real calloc checks for overflow.
    tracked(
        n.wrapping_mul(size),
        Api::Calloc,
        caller(sp, bp, per),
        r,
        || unsafe { (r.calloc)(n, size) },
    )
}

extern "C" fn realloc_impl(
    p: *mut c_void,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        if p.is_null() {
            return real::boot_alloc(size);
        }
        return core::ptr::null_mut();
    };
    let at = caller(sp, bp, per);
    if p.is_null() {
        // SAFETY: realloc(NULL, n) allocates like malloc.
        return tracked(size, Api::Realloc, at, r, || unsafe {
            (r.realloc)(core::ptr::null_mut(), size)
        });
    }
    if crate::attach::detached() && !real::is_boot(p) {
        // SAFETY: p is the caller's live block.
        return unsafe { (r.realloc)(p, size) };
    }
    if real::is_boot(p) {
        // SAFETY: a plain allocation for the bootstrap block's new home.
        let q = tracked(size, Api::Realloc, at, r, || unsafe { (r.malloc)(size) });
        if !q.is_null() {
            let n = real::boot_size(p).min(size);
            // SAFETY: both blocks are at least n bytes long and distinct.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n) };
        }
        return q;
    }
    if !guard::enter_in(at.t) {
        if !guard::interrupted_hook_in(at.t) {
            // SAFETY: plain forwarding while the agent's own code runs.
            return unsafe { (r.realloc)(p, size) };
        }
        // A signal handler interrupted a hook: same steps, without the stack.
        let old = forget(p);
        if old.is_none() && crate::server::reclaim::contradicts(p as u64) {
            // SAFETY: forwarding a plain allocation (p was reclaimed by kal already).
            let q = unsafe { (r.malloc)(size) };
            if !q.is_null() {
                record_interrupting(q, size, Api::Realloc, at.t);
            }
            return q;
        }
        // SAFETY: p is the caller's live block.
        let q = unsafe { (r.realloc)(p, size) };
        if !q.is_null() {
            record_interrupting(q, size, Api::Realloc, at.t);
        } else if size != 0 {
            if let (Some(o), Some(t)) = (old, state::tables_if_ready()) {
                t.insert(p as u64, o.size, o.seq, o.stack, o.api);
            }
        }
        return q;
    }
    let old = forget(p);
    if old.is_none() && crate::server::reclaim::contradicts(p as u64) {
        // kal reclaimed p already: give the program a fresh block (its old contents are gone).
        // SAFETY: forwarding a plain allocation.
        let q = unsafe { (r.malloc)(size) };
        if !q.is_null() {
            record(q, size, Api::Realloc, at, r);
        }
        guard::leave_in(at.t);
        return q;
    }
    // SAFETY: p is the caller's live block.
    let q = unsafe { (r.realloc)(p, size) };
    if !q.is_null() {
        record(q, size, Api::Realloc, at, r);
    } else if size != 0 {
        // Failed: p is still the caller's, put it back as it was.
        if let (Some(o), Some(t)) = (old, state::tables()) {
            t.insert(p as u64, o.size, o.seq, o.stack, o.api);
        }
    }
    guard::leave_in(at.t);
    q
}

extern "C" fn reallocarray_impl(
    p: *mut c_void,
    n: usize,
    size: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => realloc_impl(p, total, 0, sp, bp, per),
        None => {
            // SAFETY: errno is thread-local and always writable.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            core::ptr::null_mut()
        }
    }
}

extern "C" fn memalign_impl(
    align: usize,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return real::boot_alloc(size);
    };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, caller(sp, bp, per), r, || unsafe {
        (r.memalign)(align, size)
    })
}

extern "C" fn aligned_alloc_impl(
    align: usize,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return real::boot_alloc(size);
    };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, caller(sp, bp, per), r, || unsafe {
        (r.aligned_alloc)(align, size)
    })
}

extern "C" fn valloc_impl(
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return core::ptr::null_mut();
    };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, caller(sp, bp, per), r, || unsafe {
        (r.valloc)(size)
    })
}

extern "C" fn pvalloc_impl(
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> *mut c_void {
    let Some(r) = real::get() else {
        return core::ptr::null_mut();
    };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, caller(sp, bp, per), r, || unsafe {
        (r.pvalloc)(size)
    })
}

extern "C" fn posix_memalign_impl(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
    sp: usize,
    bp: usize,
    per: *const PerThread,
) -> i32 {
    let Some(r) = real::get() else {
        return libc::ENOMEM;
    };
    let mut rc = 0;
    // SAFETY: forwarding; out is the caller's pointer, written by the real function.
    tracked(size, Api::Memalign, caller(sp, bp, per), r, || unsafe {
        rc = (r.posix_memalign)(out, align, size);
        if rc == 0 {
            *out
        } else {
            core::ptr::null_mut()
        }
    });
    rc
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// `p` is null or a block from this allocator.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if real::is_boot(p) {
        return real::boot_size(p);
    }
    let Some(r) = real::get() else { return 0 };
    // SAFETY: forwarding.
    unsafe { (r.malloc_usable_size)(p) }
}
