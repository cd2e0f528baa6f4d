//! Unwinder caches of exited threads, kept for reuse by new threads.
//!
//! A `pthread_key_t` destructor (not a Rust thread-local destructor) hands a thread's cache
//! back when it exits, so programs that create many short threads do not grow.

use crate::unwind::ThreadState;
use core::sync::atomic::{AtomicBool, Ordering};

type Cache = ThreadState;

static LOCK: AtomicBool = AtomicBool::new(false);
static mut FREE: Vec<usize> = Vec::new();
static mut STACKS: Vec<usize> = Vec::new();
static mut KEY: libc::pthread_key_t = 0;
static KEY_READY: AtomicBool = AtomicBool::new(false);

fn with_pool<R>(f: impl FnOnce(&mut Vec<usize>, &mut Vec<usize>) -> R) -> R {
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: LOCK gives exclusive access to FREE and STACKS.
    let r = f(unsafe { &mut *core::ptr::addr_of_mut!(FREE) }, unsafe {
        &mut *core::ptr::addr_of_mut!(STACKS)
    });
    LOCK.store(false, Ordering::Release);
    r
}

unsafe extern "C" fn on_thread_exit(_: *mut libc::c_void) {
    crate::unwind::release_thread_cache();
    crate::side::release_thread_stack();
}

fn arm_exit_key() {
    if KEY_READY.load(Ordering::Acquire) {
        // SAFETY: KEY is valid once KEY_READY is set; a non-null value arms the destructor.
        unsafe { libc::pthread_setspecific(KEY, core::ptr::dangling::<libc::c_void>()) };
    }
}

/// Creates the thread-exit key (once, at agent start).
pub fn init() {
    // SAFETY: KEY is written once here before KEY_READY is published.
    unsafe {
        if libc::pthread_key_create(core::ptr::addr_of_mut!(KEY), Some(on_thread_exit)) == 0 {
            KEY_READY.store(true, Ordering::Release);
        }
    }
}

/// A cache for the calling thread: from the pool, or new.
pub fn take_cache() -> *mut Cache {
    arm_exit_key();
    match with_pool(|v, _| v.pop()) {
        Some(c) => c as *mut Cache,
        None => crate::unwind::new_cache(),
    }
}

/// Returns a cache to the pool.
pub fn give_cache(c: *mut Cache) {
    with_pool(|v, _| v.push(c as usize));
}

/// A side stack for the calling thread: from the pool, or new (0 if none can be mapped).
pub fn take_stack() -> usize {
    arm_exit_key();
    with_pool(|_, s| s.pop()).unwrap_or_else(crate::side::map_stack)
}

/// Returns a side stack to the pool.
pub fn give_stack(top: usize) {
    with_pool(|_, s| s.push(top));
}
