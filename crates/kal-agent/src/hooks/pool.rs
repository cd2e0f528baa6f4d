//! Per-thread resources of the agent (unwinder caches, side stacks), reused after their
//! thread exits, without taking anything from the program.
//!
//! A thread exit is noticed without any registration (no `pthread_key`: a program may need
//! all `PTHREAD_KEYS_MAX` of them, and no TLS destructor, which glibc runs before the
//! program's own key destructors that may still allocate): each resource is leased to the
//! thread that took it, by (process, thread) id, and when the free list is empty the leases
//! of threads that no longer exist (`tgkill(pid, tid, 0)` fails with `ESRCH`) are taken back.
//! A dead thread can no longer run on its side stack or use its cache. A reused thread id
//! only delays a resource's return until that thread ends too. Sweeps are amortised: one
//! happens only after enough new leases, so creating threads stays O(1) on average.

use core::sync::atomic::{AtomicBool, Ordering};

/// A resource leased to a thread.
#[derive(Clone, Copy)]
struct Lease {
    pid: i32,
    tid: i32,
    value: usize,
}

/// The free and leased resources of one kind.
struct Kind {
    free: Vec<usize>,
    leased: Vec<Lease>,
    /// Leases made since the last sweep.
    since_sweep: usize,
}

impl Kind {
    const fn new() -> Kind {
        Kind {
            free: Vec::new(),
            leased: Vec::new(),
            since_sweep: 0,
        }
    }

    /// Moves the resources of threads that no longer exist to the free list.
    fn sweep(&mut self) {
        self.since_sweep = 0;
        let mut i = 0;
        while i < self.leased.len() {
            let l = self.leased[i];
            if thread_gone(l.pid, l.tid) {
                self.free.push(l.value);
                self.leased.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// A free resource, sweeping first when it is worth it (or `force`d).
    fn pop(&mut self, force: bool) -> Option<usize> {
        if self.free.is_empty() && (force || self.since_sweep >= 16.max(self.leased.len() / 8)) {
            self.sweep();
        }
        self.free.pop()
    }

    fn lease(&mut self, value: usize) {
        let (pid, tid) = ids();
        self.since_sweep += 1;
        self.leased.push(Lease { pid, tid, value });
    }
}

static LOCK: AtomicBool = AtomicBool::new(false);
static mut CACHES: Kind = Kind::new();
static mut STACKS: Kind = Kind::new();

fn with<R>(f: impl FnOnce(&mut Kind, &mut Kind) -> R) -> R {
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: LOCK gives exclusive access to CACHES and STACKS.
    let r = f(unsafe { &mut *core::ptr::addr_of_mut!(CACHES) }, unsafe {
        &mut *core::ptr::addr_of_mut!(STACKS)
    });
    LOCK.store(false, Ordering::Release);
    r
}

/// This process's id and the calling thread's id, from the kernel (not glibc's caches).
fn ids() -> (i32, i32) {
    // SAFETY: getpid and gettid have no preconditions.
    unsafe {
        (
            libc::syscall(libc::SYS_getpid) as i32,
            libc::syscall(libc::SYS_gettid) as i32,
        )
    }
}

/// Whether thread `tid` of process `pid` no longer exists.
fn thread_gone(pid: i32, tid: i32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists; nothing is delivered.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, 0) };
    // SAFETY: reading errno right after the failed call.
    r != 0 && unsafe { *libc::__errno_location() } == libc::ESRCH
}

/// In a fork child: only the forking thread exists. Its leases move to its new ids; every
/// other lease was a parent thread's and is free here.
unsafe extern "C" fn after_fork_child() {
    let (pid, tid) = ids();
    let mine = [
        crate::unwind::current_cache() as usize,
        crate::hooks::side::current_top(),
    ];
    with(|c, s| {
        for k in [c, s] {
            for l in core::mem::take(&mut k.leased) {
                if l.value != 0 && mine.contains(&l.value) {
                    k.leased.push(Lease {
                        pid,
                        tid,
                        value: l.value,
                    });
                } else {
                    k.free.push(l.value);
                }
            }
            k.since_sweep = 0;
        }
    });
}

/// Prepares the pool (once, at agent start).
pub fn init() {
    // SAFETY: registers a plain function as a fork child handler.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
}

/// A cache for the calling thread: a dead thread's, or new.
pub fn take_cache() -> *mut crate::unwind::ThreadState {
    let c = with(|c, _| c.pop(false)).unwrap_or_else(|| crate::unwind::new_cache() as usize);
    with(|k, _| k.lease(c));
    c as *mut crate::unwind::ThreadState
}

/// A side stack's top for the calling thread: a dead thread's, or a never-used one (0 when
/// the region is exhausted even after taking back every dead thread's).
pub fn take_stack() -> usize {
    let mut t = with(|_, s| s.pop(false)).unwrap_or_else(crate::hooks::side::map_stack);
    if t == 0 {
        t = with(|_, s| s.pop(true)).unwrap_or(0);
    }
    if t != 0 {
        with(|_, s| s.lease(t));
    }
    t
}
