//! kal's in-process agent, `libkal_agent.so`.
//!
//! Loaded into an unmodified program with `LD_PRELOAD` (that is what `kal run` does), it
//! interposes the malloc family (`malloc`, `free`, `calloc`, `realloc`, `reallocarray`,
//! `memalign`, `posix_memalign`, `aligned_alloc`, `valloc`, `pvalloc`,
//! `malloc_usable_size`), forwards each call to the *next* definition — glibc, or jemalloc
//! in a program linked to it — and records every live block with its allocation stack in
//! a lock-free table in the program's own memory (layout in `kal-proto`). The CLI reads
//! that table from the frozen process; the agent itself never scans or reports.
//!
//! ```sh
//! # The agent is not called from Rust; it is preloaded into a program:
//! KAL_SOCKET=/path/to/sock LD_PRELOAD=target/debug/libkal_agent.so ./prog
//! ```
//!
//! Its parts: `hooks` (the exported allocation functions and what they need per thread:
//! side stacks, the re-entrancy guard, the next allocator, the interposed `_exit`, `unshare`
//! and `set*id`), `table` (live blocks and stacks), `unwind`, `server` (the control socket,
//! snapshots, reclaim, the agent's threads), `park` (leaked pages parked) and `attach`
//! (loaded by `kal attach`: the GOT redirected instead of `LD_PRELOAD`).
//!
//! Rules on the hook path: no allocation (the unwinder cache is made once per thread under
//! a re-entrancy guard), no locks around the real allocator, no panics, thread-locals
//! without destructors.

mod attach;
mod diag;
pub mod hooks;
mod mem;
mod park;
mod server;
mod state;
mod table;
mod unwind;

use hooks::{guard, pool, real, side, tls};
use server::control;

use core::alloc::{GlobalAlloc, Layout};

/// The agent's own heap: straight to the next allocator, never recorded.
struct Untracked;

// SAFETY: forwards to a conforming malloc/memalign/free; alignment above 16 uses memalign.
unsafe impl GlobalAlloc for Untracked {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let Some(r) = real::get() else {
            return real::boot_alloc(l.size()).cast();
        };
        // SAFETY: forwarding to the real allocator.
        unsafe {
            if l.align() <= 16 {
                (r.malloc)(l.size()).cast()
            } else {
                (r.memalign)(l.align(), l.size()).cast()
            }
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, _: Layout) {
        if real::is_boot(p.cast()) {
            return;
        }
        if let Some(r) = real::get() {
            // SAFETY: p came from alloc above.
            unsafe { (r.free)(p.cast()) }
        }
    }
}

#[global_allocator]
static ALLOC: Untracked = Untracked;

/// Size of the static TLS block, from the loader (`_dl_get_tls_static_info`), or 0.
fn static_tls_size() -> u64 {
    type InfoFn = unsafe extern "C" fn(*mut usize, *mut usize);
    // SAFETY: dlsym with a valid name; the function, if present, fills two size_t.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"_dl_get_tls_static_info".as_ptr());
        if f.is_null() {
            return 0;
        }
        let f: InfoFn = core::mem::transmute::<*mut libc::c_void, InfoFn>(f);
        let (mut size, mut align) = (0usize, 0usize);
        f(&mut size, &mut align);
        size as u64
    }
}

extern "C" fn agent_start() {
    let attach = attach::loaded_by_dlopen();
    if attach {
        attach::set_attach_mode();
    }
    // Loaded by `kal attach`, the agent's TLS is static only if glibc had room for it:
    // `init` checks (the program's other threads are stopped by kal, and no hook runs
    // before the GOT is redirected below).
    if !tls::init(static_tls_size()) && attach {
        // Its thread-local state would be allocated per thread on first use, by the
        // loader, with `malloc`: a thread's first hook would then re-enter itself through
        // the redirected `malloc` until its stack overflowed. The agent stays inert.
        attach::refuse_without_static_tls();
        return;
    }
    let Some(r) = real::get() else { return };
    if !guard::enter_agent() {
        return;
    }
    state::tables();
    side::init();
    pool::init();
    unwind::init();
    state::describe(
        static_tls_size(),
        r.glibc,
        unwind::agent_text(),
        side::region(),
    );
    state::publish_reclaim();
    control::init();
    server::start();
    table::resize::start();
    if attach {
        // Every other program thread is stopped by kal now: the slots change at once.
        attach::patch();
        attach::attached();
    }
    guard::leave();
}

/// Returns free memory the allocator keeps to the kernel: `malloc_trim(0)` with glibc's
/// allocator, a purge of every arena (`mallctl("arena.4096.purge")`) with jemalloc.
/// Returns whether that was done, or `None` when the allocator is neither.
pub(crate) fn trim() -> Option<bool> {
    type TrimFn = unsafe extern "C" fn(usize) -> i32;
    type MallctlFn = unsafe extern "C" fn(
        *const libc::c_char,
        *mut libc::c_void,
        *mut usize,
        *mut libc::c_void,
        usize,
    ) -> i32;
    if !real::get()?.glibc {
        // SAFETY: dlsym with a valid name; jemalloc's mallctl has this signature, and
        // "arena.4096.purge" (MALLCTL_ARENAS_ALL) takes no old or new value.
        return unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"mallctl".as_ptr());
            if f.is_null() {
                return None;
            }
            let f: MallctlFn = core::mem::transmute::<*mut libc::c_void, MallctlFn>(f);
            let rc = f(
                c"arena.4096.purge".as_ptr(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                0,
            );
            Some(rc == 0)
        };
    }
    // SAFETY: dlsym with a valid name; malloc_trim has this signature in glibc.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"malloc_trim".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: TrimFn = core::mem::transmute::<*mut libc::c_void, TrimFn>(f);
        Some(f(0) != 0)
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = agent_start;
