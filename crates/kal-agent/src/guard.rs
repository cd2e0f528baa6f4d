//! Per-thread flags without destructors: the re-entrancy guard of the hooks.
//!
//! Capturing a stack the first time in a thread calls `pthread_getattr_np` and allocates the
//! unwinder cache, which call `malloc` again: those inner calls must pass straight through.

use core::cell::Cell;

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    static RESOLVING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a hook; returns false if it already was (re-entry).
#[inline(always)]
pub fn enter() -> bool {
    IN_HOOK.with(|f| !f.replace(true))
}

/// Leaves the hook entered with a successful [`enter`].
#[inline(always)]
pub fn leave() {
    IN_HOOK.with(|f| f.set(false));
}

/// Whether this thread is the one resolving the next allocator.
pub fn is_resolving_thread() -> bool {
    RESOLVING.with(|f| f.get())
}

/// Marks this thread as the one resolving the next allocator.
pub fn set_resolving_thread(v: bool) {
    RESOLVING.with(|f| f.set(v));
}
