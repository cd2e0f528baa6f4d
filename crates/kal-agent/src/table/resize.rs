//! The resizer: one agent thread that keeps the live-block table between 35 % and 75 %
//! full (24-byte slots: 32 to 69 bytes per live block, 48 just after a resize) by making
//! a new table and moving every block into it, while the program runs.
//!
//! It wakes every 50 ms, or earlier when an insert probed far ([`hint`]), samples the
//! newest table, and resizes to twice the live blocks when it is more than 75 % full
//! (tombstones included: a rebuild clears them) or less than 35 % full. The thread blocks
//! every signal, never takes a lock the program could hold, and never waits for a program
//! thread: a slot being written is simply looked at again later.

use super::blocks::{self, Line};
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Futex word: 1 when an insert asked for a look.
static HINT: Line<AtomicU32> = Line(AtomicU32::new(0));
/// Process in which the resizer runs (a fork child has none until it starts its own).
static OWNER: AtomicI32 = AtomicI32::new(0);

/// Asks the resizer to look at the table now (an insert probed far, or a table was made).
#[inline]
pub fn hint() {
    if HINT.load(Ordering::Relaxed) == 0 && HINT.swap(1, Ordering::AcqRel) == 0 {
        // SAFETY: FUTEX_WAKE on a static word; wakes at most one waiter.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                HINT.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }
}

fn sleep(ms: i64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: ms * 1_000_000,
    };
    // SAFETY: nanosleep with a valid request and no remainder pointer.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

fn wait(ms: i64) {
    let ts = libc::timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    // SAFETY: FUTEX_WAIT on a static word with a valid relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            HINT.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            0,
            &ts as *const libc::timespec,
        )
    };
    HINT.store(0, Ordering::Release);
}

/// Starts the resizer thread (at agent start, and in every fork child).
pub fn start() {
    // SAFETY: getpid has no preconditions.
    OWNER.store(unsafe { libc::getpid() }, Ordering::Release);
    crate::server::alone::init();
    resume();
}

/// Starts the resizer thread again (after [`crate::hooks::pause`]), or for the first time.
pub fn resume() {
    crate::server::threads::spawn(run, crate::server::threads::Stack::Sized(64 * 1024));
}

/// In a fork child (noticed by a thread waiting on a slot, or by the child's first hook):
/// release the slots the parent's agent threads held when it forked.
pub fn repair_after_fork() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let owner = OWNER.load(Ordering::Acquire);
    if owner == me
        || OWNER
            .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    blocks::reset_after_fork();
    blocks::repair_slot(blocks::MOVING_KEY.swap(0, Ordering::AcqRel));
    blocks::repair_slot(blocks::CLAIMING_KEY.swap(0, Ordering::AcqRel));
}

/// In the fork child, before anything else runs: repair, then start a resizer.
pub fn after_fork_child() {
    repair_after_fork();
    start();
}

extern "C" fn run(_: *mut libc::c_void) -> *mut libc::c_void {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    crate::server::alone::RESIZER_TID.store(me, Ordering::Release);
    let mut wakeups = 0u32;
    loop {
        if crate::hooks::pause::stopping() {
            crate::server::alone::RESIZER_TID.store(0, Ordering::Release);
            return core::ptr::null_mut();
        }
        wakeups = wakeups.wrapping_add(1);
        if wakeups.is_multiple_of(crate::server::alone::LOOK_EVERY)
            && crate::server::alone::only_agent_threads_left()
        {
            // The program's threads are all gone: end the process as glibc does when its
            // last thread ends (exit(0): atexit handlers run, the exit report too).
            // SAFETY: exit from an agent thread once no program thread is left.
            unsafe { libc::exit(0) };
        }
        let w = blocks::window();
        if w.oldest != w.newest {
            if drain(w.oldest) {
                blocks::retire(w.oldest);
                continue;
            }
            wait(10);
            continue;
        }
        let (seen, live, tomb) = blocks::sample(w.newest, &mut seed);
        let n = blocks::slots(w.newest);
        let live_est = live * n / seen.max(1);
        let full = (live + tomb) * 4 > seen * 3;
        let sparse = live * 20 < seen * 7 && n > blocks::MIN_SLOTS;
        if full || sparse {
            let want = (live_est * 2).max(blocks::MIN_SLOTS);
            if blocks::install(w, want) {
                continue;
            }
        }
        // At most one look every 10 ms, however often inserts hint.
        sleep(10);
        wait(40);
    }
}

/// Moves every block of table `index` to the newest table; true when none is left.
fn drain(index: usize) -> bool {
    let n = blocks::slots(index);
    let (mut lo, mut hi) = (0, n);
    for _ in 0..1000 {
        let (mut first, mut last) = (u64::MAX, 0);
        for i in lo..hi {
            if !blocks::move_slot(index, i) {
                first = first.min(i);
                last = i;
            }
        }
        if first == u64::MAX {
            return true;
        }
        (lo, hi) = (first, last + 1);
        // SAFETY: sched_yield has no preconditions; lets the slot's writer finish.
        unsafe { libc::sched_yield() };
    }
    false
}
