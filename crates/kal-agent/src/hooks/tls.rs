//! The hooks' per-thread state, reached without a call.
//!
//! The agent is a shared library, so Rust's `thread_local!` reaches its variables through
//! `__tls_get_addr` (the general-dynamic TLS model): a call into the dynamic loader on every
//! hook. But a library loaded at start (`LD_PRELOAD`) gets *static* TLS: its block sits at
//! the same offset from the thread pointer (`fs:0`) in every thread. [`init`] measures that
//! offset once, in the thread that starts the agent; from then on [`with`] is the thread
//! pointer plus the offset. Until then, or if the offset looks wrong, the `thread_local!`
//! path is taken. Loaded by `dlopen` (`kal attach`), the agent's TLS may be allocated per
//! thread on demand: [`init`] then keeps the offset unknown.

use core::cell::Cell;
use core::sync::atomic::{AtomicIsize, Ordering};

/// What the hooks keep per thread. The trampolines read the first two fields at fixed
/// offsets (0 and 8), and pass the whole block's address to the hooks' functions, which
/// then reach the rest without looking for it again.
#[repr(C)]
pub struct PerThread {
    /// Top of the thread's side stack (16-aligned), 0 while it has none (see
    /// [`crate::hooks::side`]).
    pub side_top: Cell<usize>,
    /// Non-zero while a hook runs on the side stack (set before the switch, cleared after
    /// the switch back).
    pub side_busy: Cell<usize>,
    /// Re-entrancy state (see [`crate::hooks::guard`]).
    pub guard: Cell<u8>,
    /// The thread's index for sequence numbers, 0 until its first allocation.
    pub thread_index: Cell<u64>,
    /// The thread's allocation counter (see [`crate::hooks`]).
    pub seq: Cell<u64>,
    /// The thread's unwinding state, null until its first allocation (see [`crate::unwind`]).
    pub unwind: Cell<*mut crate::unwind::ThreadState>,
}

thread_local! {
    static PER: PerThread = const {
        PerThread {
            side_top: Cell::new(0),
            side_busy: Cell::new(0),
            guard: Cell::new(0),
            thread_index: Cell::new(0),
            seq: Cell::new(0),
            unwind: Cell::new(core::ptr::null_mut()),
        }
    };
}

/// `PER`'s address minus the thread pointer, the same in every thread; 0 while unknown
/// (and always when the agent was loaded by `dlopen`). The trampolines read it too.
pub static OFFSET: AtomicIsize = AtomicIsize::new(0);

/// Static TLS lies below the thread pointer, within this distance (glibc's static TLS of a
/// program and its start-time libraries is a few KiB).
const MAX_OFFSET: isize = 1 << 20;

#[inline(always)]
fn thread_pointer() -> isize {
    let tp: isize;
    // SAFETY: on x86-64 Linux, fs:0 holds the thread pointer itself (the TCB's self link).
    unsafe {
        core::arch::asm!("mov {0}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    tp
}

/// Measures the offset of the per-thread state from the thread pointer. Called once, by the
/// thread that starts the agent. `static_size` is the size of the static TLS area (below
/// the thread pointer; 0 when unknown).
///
/// Preloaded, the agent has static TLS. Loaded by `dlopen` (`kal attach`), it has static
/// TLS when glibc found room for it in its spare static TLS (the agent's thread-locals are
/// reached through TLS descriptors, see `.cargo/config.toml`), else a block allocated per
/// thread: the offset is used only when this thread's block lies inside its static TLS
/// area, where no allocated block can be, and is then the same in every thread. Returns
/// whether the offset is known.
pub fn init(static_size: u64) -> bool {
    let off = PER
        .with(|p| p as *const PerThread as isize)
        .wrapping_sub(thread_pointer());
    let limit = match isize::try_from(static_size) {
        Ok(n) if n > 0 => n.min(MAX_OFFSET),
        _ => MAX_OFFSET,
    };
    if (-limit..0).contains(&off) {
        OFFSET.store(off, Ordering::Release);
        return true;
    }
    false
}

/// The calling thread's state.
#[inline(always)]
pub fn current() -> *const PerThread {
    let off = OFFSET.load(Ordering::Relaxed);
    if off == 0 {
        // A const-initialised thread-local without a destructor: always accessible, and
        // its address stays valid as long as the thread.
        return PER.with(|p| p as *const PerThread);
    }
    // Static TLS puts this thread's `PER` at the thread pointer plus the offset measured
    // in the starting thread (`init`).
    thread_pointer().wrapping_add(off) as *const PerThread
}

/// Runs `f` with the calling thread's state.
#[inline(always)]
pub fn with<R>(f: impl FnOnce(&PerThread) -> R) -> R {
    // SAFETY: `current` is this thread's own state, alive as long as the thread; only this
    // thread (and its signal handlers, which the fields are made for) touch it.
    f(unsafe { &*current() })
}

/// The state a trampoline passed (`per`, this thread's), or the calling thread's when it
/// passed none (null: the hook runs in place after a failed claim).
#[inline(always)]
pub fn passed(per: *const PerThread) -> &'static PerThread {
    let p = if per.is_null() { current() } else { per };
    // SAFETY: a non-null `per` is the address the trampoline computed or `claim` stored
    // for this very thread; either way it is this thread's own state, alive as long as
    // the thread, which is longer than any hook call.
    unsafe { &*p }
}
