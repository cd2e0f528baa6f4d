//! `unshare` and `setns`, interposed: the agent's threads step aside for the call.
//!
//! The kernel lets only a single-threaded process enter a new user namespace
//! (`unshare(CLONE_NEWUSER)`, `setns` to a user namespace) or join a mount namespace
//! (`setns(fd, CLONE_NEWNS)`: no other thread may share its filesystem context). A program
//! that is single-threaded without kal must not fail there because the agent started
//! threads. So these two calls stop the agent's server and resizer threads, wait until the
//! kernel has removed them, make the system call, and start the threads again (the server
//! on the same socket). Both threads hold no lock the program could need, so stopping them
//! between two requests or two looks changes nothing else.
//!
//! Not covered: the same system calls made without the C library's functions (a raw
//! `syscall(SYS_unshare, …)`), and the fault handler thread that exists once kal has parked
//! pages of this process (it cannot stop while pages are parked): then the call fails as it
//! would with any extra thread, and the agent says so in one line.

use core::sync::atomic::{AtomicBool, Ordering};

/// Set while the agent's threads are asked to end.
static STOP: AtomicBool = AtomicBool::new(false);
/// Held by the thread that pauses the agent (others call through).
static PAUSING: AtomicBool = AtomicBool::new(false);

/// Longest wait for the agent's threads to end (the server may be finishing a request).
const WAIT_MS: u32 = 15_000;

/// Whether the agent's threads are asked to end now.
pub fn stopping() -> bool {
    STOP.load(Ordering::Acquire)
}

fn gone(tid: i32) -> bool {
    if tid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the thread exists; getpid has no preconditions.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) };
    // SAFETY: errno is thread-local and always readable.
    r != 0 && unsafe { *libc::__errno_location() } == libc::ESRCH
}

fn sleep_1ms() {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    // SAFETY: nanosleep with a valid request and no remainder pointer.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

/// Runs `call` (a namespace system call returning -1 and setting errno on failure) while
/// the agent's own threads are stopped; keeps its result and errno.
fn with_agent_stopped(name: &[u8], call: impl FnOnce() -> libc::c_long) -> libc::c_int {
    if PAUSING.swap(true, Ordering::AcqRel) {
        // Another thread of the program pauses the agent: the process is multi-threaded
        // by its own doing, and the call behaves as it would without kal.
        return call() as libc::c_int;
    }
    // A thread just started (at agent start, or by the last pause) publishes its id first
    // thing: wait for that, so that it is stopped too.
    let mut waited = 0;
    while crate::table::resize::started()
        && (crate::alone::RESIZER_TID.load(Ordering::Acquire) <= 0
            || (crate::server::listening() && crate::state::server_tid() == 0))
        && waited < 1000
    {
        sleep_1ms();
        waited += 1;
    }
    let handler = crate::alone::HANDLER_TID.load(Ordering::Acquire);
    let server = crate::state::server_tid() as i32;
    let resizer = crate::alone::RESIZER_TID.load(Ordering::Acquire);
    if handler > 0 {
        crate::diag::say(b"kal agent: ");
        crate::diag::say(name);
        crate::diag::say(
            b" runs beside the agent's page-fault thread (pages of this process are parked): the kernel may refuse it (EINVAL)\n",
        );
        PAUSING.store(false, Ordering::Release);
        return call() as libc::c_int;
    }
    STOP.store(true, Ordering::Release);
    crate::server::wake();
    crate::table::resize::hint();
    let mut waited = 0;
    while !(gone(server) && gone(resizer)) && waited < WAIT_MS {
        sleep_1ms();
        waited += 1;
    }
    if waited >= WAIT_MS {
        crate::diag::say(b"kal agent: ");
        crate::diag::say(name);
        crate::diag::say(
            b" runs while the agent's threads are still busy: the kernel may refuse it (EINVAL)\n",
        );
    }
    let r = call();
    // SAFETY: errno is thread-local and always readable.
    let err = unsafe { *libc::__errno_location() };
    STOP.store(false, Ordering::Release);
    // What glibc allocates for the new threads is the agent's, as at start.
    let entered = crate::guard::enter_agent();
    if server > 0 && gone(server) {
        crate::server::resume();
    }
    if resizer > 0 && gone(resizer) {
        crate::table::resize::resume();
    }
    if entered {
        crate::guard::leave();
    }
    PAUSING.store(false, Ordering::Release);
    // SAFETY: as above; the program sees the errno of its own call.
    unsafe { *libc::__errno_location() = err };
    r as libc::c_int
}

/// `unshare(2)`, with the agent's threads stopped for the call.
///
/// # Safety
/// Same contract as the C function it replaces.
#[no_mangle]
pub unsafe extern "C" fn unshare(flags: libc::c_int) -> libc::c_int {
    // SAFETY: the system call with the caller's argument, as glibc's wrapper makes it.
    with_agent_stopped(b"unshare", || unsafe {
        libc::syscall(libc::SYS_unshare, flags)
    })
}

/// `setns(2)`, with the agent's threads stopped for the call.
///
/// # Safety
/// Same contract as the C function it replaces.
#[no_mangle]
pub unsafe extern "C" fn setns(fd: libc::c_int, nstype: libc::c_int) -> libc::c_int {
    // SAFETY: the system call with the caller's arguments, as glibc's wrapper makes it.
    with_agent_stopped(b"setns", || unsafe {
        libc::syscall(libc::SYS_setns, fd, nstype)
    })
}
