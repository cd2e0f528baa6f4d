//! `waitpid` and the resuming `ptrace` requests for kal's tracees, for every signal number.
//!
//! nix's `WaitStatus` names a stop's signal with `Signal`, which has no real-time signals
//! (SIGRTMIN+n: glibc's SIGSETXID and SIGCANCEL, a program's timer signals): nix's
//! `waitpid` fails on such a stop (after collecting it), and the signal would be lost when
//! the thread is resumed. Here such a stop is returned as an event stop without a signal,
//! and its signal is kept for the thread: [`ptrace::cont`] and [`ptrace::detach`] deliver
//! it; [`ptrace::step`] (kal's own injected code) leaves it waiting, like a deferred signal.

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::Mutex;

/// Real-time signals collected from stops and not delivered yet: (thread, signal).
static PENDING: Mutex<Vec<(i32, i32)>> = Mutex::new(Vec::new());

fn take_pending(tid: i32) -> Option<i32> {
    let mut v = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let i = v.iter().position(|&(t, _)| t == tid)?;
    Some(v.swap_remove(i).1)
}

/// nix's `waitpid`, except that a stop for a signal nix cannot name is returned as
/// `PtraceEvent(pid, SIGTRAP, 0)` and its signal kept for the thread's resumption.
pub fn waitpid(pid: Pid, flags: Option<WaitPidFlag>) -> nix::Result<WaitStatus> {
    let mut st = 0;
    // SAFETY: waitpid writes one int status.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut st, flags.map_or(0, |f| f.bits())) };
    if r < 0 {
        return Err(Errno::last());
    }
    if r == 0 {
        return Ok(WaitStatus::StillAlive);
    }
    if libc::WIFSTOPPED(st) && st >> 16 == 0 {
        let sig = libc::WSTOPSIG(st);
        if Signal::try_from(sig).is_err() {
            PENDING
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((r, sig));
            return Ok(WaitStatus::PtraceEvent(
                Pid::from_raw(r),
                Signal::SIGTRAP,
                0,
            ));
        }
    }
    WaitStatus::from_raw(Pid::from_raw(r), st)
}

/// nix's `ptrace` module, with the resuming requests that deliver kept signals.
pub mod ptrace {
    use nix::errno::Errno;
    pub use nix::sys::ptrace::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    fn resume(req: libc::c_uint, pid: Pid, sig: Option<Signal>, kept: bool) -> nix::Result<()> {
        let raw = kept
            .then(|| super::take_pending(pid.as_raw()))
            .flatten()
            .unwrap_or_else(|| sig.map_or(0, |s| s as i32));
        // SAFETY: a resuming ptrace request on a stopped tracee, the signal number as data.
        let r = unsafe { libc::ptrace(req, pid.as_raw(), 0usize, raw as usize) };
        Errno::result(r).map(drop)
    }

    /// `PTRACE_CONT`, delivering `sig`, or the real-time signal kept for this thread.
    pub fn cont(pid: Pid, sig: Option<Signal>) -> nix::Result<()> {
        resume(libc::PTRACE_CONT, pid, sig, true)
    }

    /// `PTRACE_DETACH`, delivering `sig`, or the real-time signal kept for this thread.
    pub fn detach(pid: Pid, sig: Option<Signal>) -> nix::Result<()> {
        resume(libc::PTRACE_DETACH, pid, sig, true)
    }

    /// `PTRACE_SINGLESTEP` (kal's injected code): a kept real-time signal keeps waiting.
    pub fn step(pid: Pid, sig: Option<Signal>) -> nix::Result<()> {
        resume(libc::PTRACE_SINGLESTEP, pid, sig, false)
    }
}
