//! Ends that skip `atexit`: `_exit`, `_Exit` and `abort` are interposed so that kal is told
//! (the same exit handshake as `exit()`'s) before the real function runs, and the program's
//! status or death signal stays what it was.
//!
//! Only the process that said hello reports: a `vfork`/`posix_spawn` child shares its
//! parent's memory and calls `_exit` with its own pid, and must just call the real one.
//! glibc's own internal calls (`exit()` reaching `_exit`, `posix_spawn`'s child, the
//! allocator's `abort` on heap corruption) use hidden aliases and never come here.
//!
//! Fatal signals cannot be hooked without changing the program's dispositions, which the
//! agent never does: kal says in one line that such a process got no report.

use core::ffi::c_int;
use core::sync::atomic::{AtomicUsize, Ordering};

/// `_exit` of the next object (libc), or 0 when not resolved yet.
static REAL_EXIT: AtomicUsize = AtomicUsize::new(0);
/// `abort` of the next object (libc), or 0 when not resolved yet.
static REAL_ABORT: AtomicUsize = AtomicUsize::new(0);

fn next(name: &core::ffi::CStr, slot: &AtomicUsize) -> usize {
    let known = slot.load(Ordering::Acquire);
    if known != 0 {
        return known;
    }
    // SAFETY: dlsym with a valid NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(p, Ordering::Release);
    p
}

/// Resolves the real `_exit` and `abort` while nothing else runs (agent start): `dlsym`
/// may allocate, which an `abort` after heap corruption must not.
pub fn init() {
    next(c"_exit", &REAL_EXIT);
    next(c"abort", &REAL_ABORT);
}

fn real_exit(status: c_int) -> ! {
    let f = next(c"_exit", &REAL_EXIT);
    if f != 0 {
        // SAFETY: f is libc's `_exit`, which has this signature and never returns.
        unsafe {
            let f: extern "C" fn(c_int) -> ! = core::mem::transmute::<usize, _>(f);
            f(status)
        }
    }
    loop {
        // SAFETY: exit_group ends the process; it takes an int and never returns.
        unsafe { libc::syscall(libc::SYS_exit_group, status) };
    }
}

/// Whether SIGABRT would end the process once raised: its action is the default or
/// ignored (`abort` then restores the default). A handler could `longjmp` away and the
/// process go on, so kal is not told then (the handler's own `_exit` still tells it).
fn abort_is_final() -> bool {
    // SAFETY: querying (not changing) a disposition into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = core::mem::zeroed();
        if libc::sigaction(libc::SIGABRT, core::ptr::null(), &mut old) != 0 {
            return false;
        }
        old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == libc::SIG_IGN
    }
}

/// `_exit`: tells kal (the process that said hello only), then ends as asked. stdio is not
/// flushed and `__libc_freeres` does not run: `_exit` must not write the program's
/// buffered output.
#[no_mangle]
pub extern "C" fn _exit(status: c_int) -> ! {
    crate::server::control::report_exit(false);
    real_exit(status)
}

/// `_Exit`: the same as [`_exit`].
#[no_mangle]
pub extern "C" fn _Exit(status: c_int) -> ! {
    crate::server::control::report_exit(false);
    real_exit(status)
}

/// `abort`: tells kal when SIGABRT will end the process, then calls the real `abort`, so
/// the process dies of SIGABRT exactly as it would have.
#[no_mangle]
pub extern "C" fn abort() -> ! {
    if abort_is_final() {
        crate::server::control::report_exit(false);
    }
    let f = next(c"abort", &REAL_ABORT);
    if f != 0 {
        // SAFETY: f is libc's `abort`, which takes nothing and never returns.
        unsafe {
            let f: extern "C" fn() -> ! = core::mem::transmute::<usize, _>(f);
            f()
        }
    }
    // SAFETY: raising SIGABRT with its default action, as abort does.
    unsafe {
        libc::signal(libc::SIGABRT, libc::SIG_DFL);
        libc::raise(libc::SIGABRT);
    }
    real_exit(127)
}

/// Whether `__libc_freeres`/`__gnu_cxx::__freeres` run at exit (kal's `--no-freeres`
/// sets `KAL_NO_FREERES=1` to turn them off).
static FREERES: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Reads `KAL_NO_FREERES` (agent start).
pub fn read_env() {
    // SAFETY: getenv with a NUL-terminated name; the value is only looked at here.
    let off = unsafe {
        let v = libc::getenv(c"KAL_NO_FREERES".as_ptr());
        !v.is_null() && *v != 0 && *v != b'0' as libc::c_char
    };
    FREERES.store(!off, Ordering::Relaxed);
}

/// Runs libstdc++'s `__gnu_cxx::__freeres` and glibc's `__libc_freeres`, as memcheck does
/// at exit, so that what they free (the exception-handling pool, stdio buffers, cached
/// thread stacks, loader and locale data) is not counted as still reachable.
///
/// Called from the agent's `atexit` handler, which runs after the program's `atexit`
/// handlers and every ELF destructor (`_dl_fini` is registered after the agent starts);
/// `__libc_freeres` flushes stdio first and leaves the streams unbuffered, so output
/// written later still appears, in order. Only when the calling thread is the program's
/// last: another thread could still be using what is freed (or hold an arena lock).
/// memcheck can run them anyway because it ends the other threads first without letting
/// them run; ending real threads could leave a lock they held (an arena's, a stdio
/// stream's, the loader's) held forever, and freeres would then hang the exit. So they
/// are skipped, and the header says why (the report says it in one line). Returns
/// whether they ran.
pub fn freeres() -> bool {
    use kal_proto::{FREERES_OFF, FREERES_RAN, FREERES_SKIPPED_THREADS};
    if !FREERES.load(Ordering::Relaxed) {
        crate::state::set_freeres(FREERES_OFF, 0);
        return false;
    }
    match crate::server::alone::program_threads_settled() {
        Some(1) => {}
        n => {
            let others = n.map_or(0, |n| n.saturating_sub(1));
            crate::state::set_freeres(FREERES_SKIPPED_THREADS, others as u64);
            return false;
        }
    }
    type Fn0 = unsafe extern "C" fn();
    // SAFETY: dlsym with valid names; both functions take nothing and are exported by
    // their libraries for exactly this use (valgrind calls them the same way). The one
    // program thread is this one, so nothing else uses what they free.
    unsafe {
        let cxx = libc::dlsym(libc::RTLD_DEFAULT, c"_ZN9__gnu_cxx9__freeresEv".as_ptr());
        let libc_f = libc::dlsym(libc::RTLD_DEFAULT, c"__libc_freeres".as_ptr());
        if !cxx.is_null() {
            core::mem::transmute::<*mut libc::c_void, Fn0>(cxx)();
        }
        if !libc_f.is_null() {
            core::mem::transmute::<*mut libc::c_void, Fn0>(libc_f)();
            crate::state::set_freeres(FREERES_RAN, 0);
            return true;
        }
    }
    false
}
