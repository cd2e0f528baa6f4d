//! `unshare`, `setns` and the `set*id` family, interposed: the agent's threads step aside
//! for the call.
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
//! Credentials are the same story in another form: the kernel keeps them per thread, and
//! glibc's `setuid`, `setresgid`, `setgroups`, … apply the change to every thread of the
//! process and abort it if one thread fails where another succeeded. A program that keeps
//! its capabilities across `setresuid` (`PR_SET_KEEPCAPS`, per thread) and then changes its
//! group, as `setpriv` and privilege-dropping daemons do, succeeded in its own thread and
//! failed in the agent's (which lost its capabilities): abort. For these calls, too, the
//! agent's threads are stopped, and the threads started again afterwards inherit the
//! caller's credentials, capabilities and `PR_SET_KEEPCAPS`. After a user call (`setuid`,
//! `seteuid`, `setreuid`, `setresuid`) the server listens on a new socket, made as the
//! process now is: kal finds a process's socket by its user and believes only a socket
//! that user listens on (nginx's workers become `nobody` and were out of reach).
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

/// Asks the agent's server and resizer threads to end for good (`kal detach`): the
/// server ends after the request it serves, the resizer at its next look.
pub fn stop_for_detach() {
    STOP.store(true, Ordering::Release);
    crate::table::resize::hint();
}

/// Starts the agent's threads again after [`stop_for_detach`] (`kal attach` once more),
/// once the old ones have ended.
pub fn resume_after_detach() {
    let server = crate::state::server_tid() as i32;
    let resizer = crate::server::alone::RESIZER_TID.load(Ordering::Acquire);
    let mut waited = 0;
    while !(gone(server) && gone(resizer)) && waited < 1000 {
        sleep_1ms();
        waited += 1;
    }
    STOP.store(false, Ordering::Release);
    crate::server::resume();
    crate::table::resize::resume();
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

/// Whether an agent thread of this process has started but not yet published its id
/// (the server's and the resizer's clear theirs as they end; the fault handler's, which
/// ends only in a fork child that never runs it, stays).
fn unnamed_threads() -> bool {
    let named = usize::from(crate::state::server_tid() != 0)
        + usize::from(crate::server::alone::RESIZER_TID.load(Ordering::Acquire) > 0)
        + usize::from(crate::server::alone::HANDLER_TID.load(Ordering::Acquire) > 0);
    crate::server::threads::live() > named
}

/// What a paused-for call may change that the agent's server depends on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `unshare`, `setns`, the group calls: the server comes back on the same socket.
    Other,
    /// The user calls (`setuid`, `seteuid`, `setreuid`, `setresuid`): kal looks for the
    /// socket of a process of user UID in `/tmp/kal-UID` and believes only a socket that
    /// user listens on, so the server comes back on a new socket made as the process is
    /// after the call (nginx's workers become `nobody`). The old socket file is removed
    /// before the call, while the process may still remove it.
    Users,
}

/// Runs `call` (a namespace or credential system call returning -1 and setting errno on
/// failure) while the agent's own threads are stopped; keeps its result and errno.
fn with_agent_stopped(name: &[u8], kind: Call, call: impl FnOnce() -> libc::c_long) -> libc::c_int {
    if PAUSING.swap(true, Ordering::AcqRel) {
        // Another thread of the program pauses the agent: the process is multi-threaded
        // by its own doing, and the call behaves as it would without kal.
        return call() as libc::c_int;
    }
    // A thread just started (at agent start, in a fork child, or by the last pause)
    // publishes its id first thing: wait until every agent thread has, so that each is
    // stopped and only those stopped are started again. One that stays unknown (starved
    // of CPU for seconds) is left running: the call is made beside it, and said.
    let mut waited = 0;
    while unnamed_threads() && waited < WAIT_MS {
        sleep_1ms();
        waited += 1;
    }
    let handler = crate::server::alone::HANDLER_TID.load(Ordering::Acquire);
    let server = crate::state::server_tid() as i32;
    let resizer = crate::server::alone::RESIZER_TID.load(Ordering::Acquire);
    if unnamed_threads() {
        crate::diag::say(b"kal agent: ");
        crate::diag::say(name);
        crate::diag::say(
            b" runs beside an agent thread that is still starting: the kernel may refuse it (EINVAL)\n",
        );
        PAUSING.store(false, Ordering::Release);
        return call() as libc::c_int;
    }
    if handler > 0 && !gone(handler) {
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
    let rebind = kind == Call::Users && server > 0 && gone(server) && crate::server::listening();
    if rebind {
        crate::server::remove_socket_file();
    }
    let r = call();
    // SAFETY: errno is thread-local and always readable.
    let err = unsafe { *libc::__errno_location() };
    STOP.store(false, Ordering::Release);
    // What glibc allocates for the new threads is the agent's, as at start.
    let entered = crate::hooks::guard::enter_agent();
    if rebind {
        crate::server::restart();
    } else if server > 0 && gone(server) {
        crate::server::resume();
    }
    if resizer > 0 && gone(resizer) {
        crate::table::resize::resume();
    }
    if entered {
        crate::hooks::guard::leave();
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
    with_agent_stopped(b"unshare", Call::Other, || unsafe {
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
    with_agent_stopped(b"setns", Call::Other, || unsafe {
        libc::syscall(libc::SYS_setns, fd, nstype)
    })
}

/// `dlsym(RTLD_NEXT, name)`, remembered in `slot` (0: not resolved yet).
fn next(name: &core::ffi::CStr, slot: &core::sync::atomic::AtomicUsize) -> usize {
    let known = slot.load(Ordering::Acquire);
    if known != 0 {
        return known;
    }
    // SAFETY: dlsym with a valid NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(p, Ordering::Release);
    p
}

/// Interposes a credential-changing C library function (`$name`, taking `$ty` arguments,
/// of [`Call`] kind `$kind`): the next definition (glibc's, which applies the change to
/// every thread of the program) runs with the agent's threads stopped. If it cannot be found, the call fails with
/// `ENOSYS` (it never happens with glibc).
macro_rules! credential_call {
    ($kind:expr, $(#[$doc:meta])* $name:ident ( $($arg:ident : $ty:ty),* )) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Same contract as the C function it replaces.
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> libc::c_int {
            static REAL: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
            let f = next(
                // SAFETY: the name is a literal with its NUL.
                unsafe {
                    core::ffi::CStr::from_bytes_with_nul_unchecked(
                        concat!(stringify!($name), "\0").as_bytes(),
                    )
                },
                &REAL,
            );
            if f == 0 {
                // SAFETY: errno is thread-local and always writable.
                unsafe { *libc::__errno_location() = libc::ENOSYS };
                return -1;
            }
            with_agent_stopped(stringify!($name).as_bytes(), $kind, || {
                // SAFETY: f is the next definition of this very function, with this
                // signature; the caller's arguments are passed on unchanged.
                let real: unsafe extern "C" fn($($ty),*) -> libc::c_int =
                    unsafe { core::mem::transmute::<usize, _>(f) };
                // SAFETY: as above.
                (unsafe { real($($arg),*) }) as libc::c_long
            })
        }
    };
}

credential_call!(
    Call::Users,
    /// `setuid(2)`, with the agent's threads stopped for the call.
    setuid(uid: libc::uid_t)
);
credential_call!(
    Call::Users,
    /// `seteuid(2)`, with the agent's threads stopped for the call.
    seteuid(uid: libc::uid_t)
);
credential_call!(
    Call::Users,
    /// `setreuid(2)`, with the agent's threads stopped for the call.
    setreuid(ruid: libc::uid_t, euid: libc::uid_t)
);
credential_call!(
    Call::Users,
    /// `setresuid(2)`, with the agent's threads stopped for the call.
    setresuid(ruid: libc::uid_t, euid: libc::uid_t, suid: libc::uid_t)
);
credential_call!(
    Call::Other,
    /// `setgid(2)`, with the agent's threads stopped for the call.
    setgid(gid: libc::gid_t)
);
credential_call!(
    Call::Other,
    /// `setegid(2)`, with the agent's threads stopped for the call.
    setegid(gid: libc::gid_t)
);
credential_call!(
    Call::Other,
    /// `setregid(2)`, with the agent's threads stopped for the call.
    setregid(rgid: libc::gid_t, egid: libc::gid_t)
);
credential_call!(
    Call::Other,
    /// `setresgid(2)`, with the agent's threads stopped for the call.
    setresgid(rgid: libc::gid_t, egid: libc::gid_t, sgid: libc::gid_t)
);
credential_call!(
    Call::Other,
    /// `setgroups(2)`, with the agent's threads stopped for the call.
    setgroups(n: libc::size_t, list: *const libc::gid_t)
);
