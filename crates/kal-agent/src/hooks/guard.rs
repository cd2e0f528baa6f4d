//! Per-thread flags without destructors: the re-entrancy guard of the hooks.
//!
//! A thread is outside the agent, inside a hook (recording a block), or running the agent's
//! own code (its threads, its start, a thread's first side stack). An allocation made while
//! the thread is in a hook can only come from a signal handler that interrupted it there:
//! it is recorded without touching what the interrupted hook may be using (no unwinding,
//! no pool lock). An allocation made by the agent's own code passes straight through.

use crate::hooks::tls::PerThread;
use core::cell::Cell;

const OUTSIDE: u8 = 0;
const HOOK: u8 = 1;
const AGENT: u8 = 2;

thread_local! {
    static RESOLVING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread (whose state is `t`) as inside a hook; returns false if it already
/// was inside the agent.
#[inline(always)]
pub fn enter_in(t: &PerThread) -> bool {
    let f = &t.guard;
    if f.get() != OUTSIDE {
        return false;
    }
    f.set(HOOK);
    true
}

/// Marks this thread as running the agent's own code (allocations it makes are the
/// agent's, never recorded); returns false if it already was inside the agent.
pub fn enter_agent() -> bool {
    crate::hooks::tls::with(|t| {
        let f = &t.guard;
        if f.get() != OUTSIDE {
            return false;
        }
        f.set(AGENT);
        true
    })
}

/// Whether this thread (whose state is `t`) is inside a hook (not the agent's own code):
/// an allocation now comes from a signal handler that interrupted the hook.
#[inline(always)]
pub fn interrupted_hook_in(t: &PerThread) -> bool {
    t.guard.get() == HOOK
}

/// Leaves the hook or agent code entered with a successful [`enter_in`] or [`enter_agent`].
#[inline(always)]
pub fn leave() {
    crate::hooks::tls::with(leave_in);
}

/// [`leave`] with this thread's state `t` at hand.
#[inline(always)]
pub fn leave_in(t: &PerThread) {
    t.guard.set(OUTSIDE);
}

/// Whether this thread is the one resolving the next allocator.
pub fn is_resolving_thread() -> bool {
    RESOLVING.with(|f| f.get())
}

/// Marks this thread as the one resolving the next allocator.
pub fn set_resolving_thread(v: bool) {
    RESOLVING.with(|f| f.set(v));
}
