//! Starting the agent's own threads (the server, the resizer, the fault handler).
//!
//! Each is detached and blocks every signal (a thread inherits the mask it is created
//! with): no signal meant for the program — a SIGTERM it collects with a signalfd, a timer
//! signal it takes with sigwaitinfo — is ever delivered to, and handled by default in, an
//! agent thread.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Agent threads of this process: counted from the moment one is created (before it has
/// run, let alone published its id) until its entry function returns.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many agent threads this process has (see [`LIVE`]).
pub fn live() -> usize {
    LIVE.load(Ordering::Acquire)
}

/// In a fork child, before any of its agent threads start: the parent's are not there, and
/// their thread ids (the server's, the resizer's, the fault handler's) name no thread of
/// this process. They are cleared, so that [`crate::hooks::pause`] waits for the child's own
/// threads to say who they are: with the parent's ids it took the child's threads for gone
/// at once, made the call beside them and started a second server on the server's stack,
/// where the first still ran (nginx workers crashed or hung in `initgroups`).
pub fn after_fork_child() {
    LIVE.store(0, Ordering::Release);
    crate::state::set_server_tid(0);
    crate::server::alone::RESIZER_TID.store(0, Ordering::Release);
    crate::server::alone::HANDLER_TID.store(0, Ordering::Release);
}

/// Runs the entry function passed as the argument, then counts the thread out.
extern "C" fn trampoline(entry: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `spawn` passes an `extern "C" fn(*mut c_void) -> *mut c_void` as the
    // argument; function and data pointers have the same size here.
    let entry = unsafe {
        core::mem::transmute::<
            *mut libc::c_void,
            extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
        >(entry)
    };
    let r = entry(core::ptr::null_mut());
    LIVE.fetch_sub(1, Ordering::AcqRel);
    r
}

/// Where an agent thread runs.
pub enum Stack {
    /// A stack glibc maps, of this many bytes.
    Sized(usize),
    /// A stack the agent mapped itself (`addr`, `len`); what glibc allocates for the thread
    /// (its DTV) is then left untracked, as the agent's: the CLI never scans that stack, so
    /// the DTV's only pointer would be out of sight.
    Own(*mut libc::c_void, usize),
}

/// Starts `entry` on a new detached thread with every signal blocked; false if it could
/// not start.
pub fn spawn(entry: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void, stack: Stack) -> bool {
    // SAFETY: plain pthread calls with zeroed attributes and a static entry point; the
    // caller's signal mask is restored right after the thread is made.
    unsafe {
        let mut t: libc::pthread_t = 0;
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let own = match stack {
            Stack::Sized(n) => {
                libc::pthread_attr_setstacksize(&mut attr, n);
                false
            }
            Stack::Own(p, n) => libc::pthread_attr_setstack(&mut attr, p, n) == 0,
        };
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let entered = own && crate::hooks::guard::enter_agent();
        LIVE.fetch_add(1, Ordering::AcqRel);
        let rc = libc::pthread_create(&mut t, &attr, trampoline, entry as *mut libc::c_void);
        if rc != 0 {
            LIVE.fetch_sub(1, Ordering::AcqRel);
        }
        if entered {
            crate::hooks::guard::leave();
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        rc == 0
    }
}
