//! Freezing every thread of a live process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`.
//!
//! Every stop is bounded: a thread that does not stop within the deadline makes the whole
//! freeze fail, and dropping a [`Frozen`] always detaches, re-delivering any signal that
//! arrived meanwhile, so the target is never left stopped or traced.
//!
//! Threads that `kal run`'s tracer keeps traced ([`crate::run::trace`], registered with
//! [`keep`]) are interrupted instead of seized, and resumed instead of detached when the
//! freeze ends (a group-stopped one listens again; one found at its exit event is handed
//! back to the tracer, see [`take_handed_back`]). A capture at exit lets go of them.

use crate::capture::tracee::ptrace;
use crate::capture::tracee::waitpid;
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Threads kal's tracer keeps traced (kal ptraces from one thread only: its main thread).
static KEPT: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Kept threads a freeze found stopped at their exit event, for the tracer.
static HANDED_BACK: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Registers `tid` as traced by kal for as long as kal runs it (a freeze then interrupts
/// and resumes it rather than seizing and detaching it).
pub fn keep(tid: i32) {
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).insert(tid);
}

/// Forgets `tid` (it exited, or kal let go of it).
pub fn unkeep(tid: i32) {
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).remove(&tid);
}

/// Whether kal keeps `tid` traced.
pub fn is_kept(tid: i32) -> bool {
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&tid)
}

/// Kept threads that a freeze found stopped at their exit event and left stopped there:
/// the tracer handles them as if it had just seen that event.
pub fn take_handed_back() -> Vec<i32> {
    std::mem::take(&mut *HANDED_BACK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Leaves kept thread `tid`, stopped at its exit event, for the tracer to handle.
pub fn hand_back(tid: i32) {
    HANDED_BACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(tid);
}

/// Whether `sig` stops a process by default (a ptrace `PTRACE_EVENT_STOP` with it is a
/// group-stop).
pub fn is_stop_signal(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

/// `PTRACE_LISTEN`: a group-stopped tracee stays stopped as it would without a tracer,
/// and is woken by `SIGCONT`.
pub fn listen(tid: i32) {
    // SAFETY: a ptrace request with integer arguments on our own tracee.
    unsafe {
        libc::ptrace(libc::PTRACE_LISTEN, tid, 0usize, 0usize);
    }
}

/// Whether thread `tid` is traced by this thread of kal (read from `/proc`).
fn traced_by_me(tid: i32) -> bool {
    let me = nix::unistd::gettid().as_raw().to_string();
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim() == me)
        })
        .unwrap_or(false)
}

/// Whether thread `tid` has begun to exit (`PF_EXITING`) or is gone: it can no longer be
/// seized.
fn is_exiting(pid: i32, tid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
        return true;
    };
    let flags: u64 = crate::capture::procfs::stat_field(&stat, 6)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    flags & 4 != 0
}

/// Registers of one frozen thread.
#[derive(Debug, Clone, Copy)]
pub struct ThreadRegs {
    /// Thread id.
    pub tid: i32,
    /// General-purpose registers as `PTRACE_GETREGS` returns them.
    pub regs: libc::user_regs_struct,
}

impl ThreadRegs {
    /// Stack pointer.
    pub fn sp(&self) -> u64 {
        self.regs.rsp
    }

    /// Thread pointer (`fs_base`), where TLS lives.
    pub fn thread_pointer(&self) -> u64 {
        self.regs.fs_base
    }

    /// The values that may hold pointers: the sixteen integer registers and `rip`.
    pub fn values(&self) -> [u64; 17] {
        let r = &self.regs;
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip,
        ]
    }
}

/// A process whose threads are all stopped under ptrace; detached on drop.
pub struct Frozen {
    pid: i32,
    threads: Vec<(i32, Option<Signal>)>,
    started: Instant,
    /// Threads seen but never stopped (at exit: stuck in the kernel): no registers.
    unstopped: u64,
    /// A thread left running (the agent's server thread, which makes the snapshot), or 0.
    skip: i32,
    /// Leave running the threads blocked in a call that a ptrace stop would end early
    /// with EINTR ([`eintr_call`]).
    leave_blocked: bool,
    /// Threads left running that way, with the call each was blocked in.
    left_running: Vec<(i32, &'static str)>,
    /// Threads kal's tracer keeps traced: resumed, not detached, when the freeze ends.
    kept: Vec<i32>,
    /// A loan of the process from the `kal run` tracing it, held until after the detach
    /// (fields drop after `Drop::drop`).
    _loan: Option<crate::run::trace::Loan>,
    /// Kept threads stopped in a group-stop (they listen again) and at their exit event
    /// (handed back to the tracer).
    group_stopped: Vec<i32>,
    exit_stopped: Vec<i32>,
}

/// The blocking call thread `tid` of `pid` is in, if a ptrace stop would make it return
/// EINTR early (signal(7): these are not restarted after a stop, even without a handler):
/// `epoll_wait` and its variants, `rt_sigtimedwait` (`sigtimedwait`, `sigwaitinfo`),
/// `semop`, `semtimedop`. Read from `/proc/PID/task/TID/syscall` (x86-64 numbers).
pub fn eintr_call(pid: i32, tid: i32) -> Option<&'static str> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let nr: i64 = text.split_whitespace().next()?.parse().ok()?;
    Some(match nr {
        232 => "epoll_wait",
        281 => "epoll_pwait",
        441 => "epoll_pwait2",
        128 => "rt_sigtimedwait",
        65 => "semop",
        220 => "semtimedop",
        _ => return None,
    })
}

/// Why `PTRACE_SEIZE` of process `pid` was refused, as precisely as `/proc` tells.
fn why_not_traceable(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    let tracer = field("TracerPid:");
    if !tracer.is_empty() && tracer != "0" {
        return format!(
            "process {pid} is already traced by process {tracer} (a debugger or strace?): only one tracer at a time"
        );
    }
    let uid = field("Uid:");
    // A process that is not dumpable has its /proc files owned by root.
    let mem_owner = std::fs::metadata(format!("/proc/{pid}/mem"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m).to_string())
        .unwrap_or_default();
    if mem_owner == "0" && uid != "0" && !uid.is_empty() {
        return format!(
            "process {pid} is not dumpable (setuid, or it called prctl(PR_SET_DUMPABLE, 0)): only root can trace it"
        );
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() }.to_string();
    if me != "0" && me != uid {
        return format!("no permission to trace process {pid}: it runs as uid {uid}, kal as {me}");
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    format!(
        "no permission to trace process {pid} (/proc/sys/kernel/yama/ptrace_scope is {}: run kal as root, or start the program under kal run)",
        scope.trim()
    )
}

/// Whether thread `tid` of process `pid` has exited (a zombie, or gone).
fn is_zombie(pid: i32, tid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
        return true;
    };
    crate::capture::procfs::stat_field(&stat, 0).is_some_and(|s| s == "Z" || s == "X")
}

/// How long a thread stopped at its exit is held while the exiting thread's event is
/// awaited (that thread is on its way to `exit_group` already: microseconds).
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// How long one thread may take to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(2);

impl Frozen {
    /// A freeze of `pid` holding no thread yet, started at `started`, with the loan (if
    /// any) that lends it from the `kal run` tracing it.
    fn empty(pid: i32, started: Instant, loan: Option<crate::run::trace::Loan>) -> Frozen {
        Frozen {
            pid,
            threads: Vec::new(),
            started,
            unstopped: 0,
            skip: 0,
            leave_blocked: false,
            left_running: Vec::new(),
            kept: Vec::new(),
            _loan: loan,
            group_stopped: Vec::new(),
            exit_stopped: Vec::new(),
        }
    }

    /// Seizes and stops every thread of `pid`, including threads created meanwhile.
    pub fn freeze(pid: i32) -> Result<Frozen> {
        Frozen::freeze_except(pid, 0, false)
    }

    /// [`Frozen::freeze`], leaving thread `skip` running (0: none), and with
    /// `leave_blocked` the threads blocked in a call a stop would interrupt
    /// ([`eintr_call`]; see [`Frozen::left_running`]).
    pub fn freeze_except(pid: i32, skip: i32, leave_blocked: bool) -> Result<Frozen> {
        // A process another kal run traces is lent to this kal first.
        let loan = crate::run::trace::borrow(pid, leave_blocked);
        let started = Instant::now();
        let mut f = Frozen::empty(pid, started, loan);
        f.skip = skip;
        f.leave_blocked = leave_blocked;
        // Each batch of threads is seized and interrupted first, then their stops are
        // awaited together: the threads stop in parallel, not one after the other (2,000
        // threads took 180 us each one by one).
        let pending = std::cell::RefCell::new(Vec::new());
        f.seize_all(
            ptrace::Options::empty(),
            |_, tid| {
                if ptrace::interrupt(Pid::from_raw(tid)).is_ok() {
                    pending.borrow_mut().push(tid);
                }
                Ok(())
            },
            |f| f.wait_stops(pending.take()),
        )?;
        f.threads.retain(|(t, _)| *t > 0);
        if f.threads.is_empty() {
            bail!("process {pid} has no threads left");
        }
        Ok(f)
    }

    /// Seizes every thread of `pid` with `PTRACE_O_TRACEEXIT` without stopping it, calls
    /// `ready` (which lets the process finish exiting), then waits until thread `exiting`
    /// stops at its exit event (`exit_group` has begun, memory is intact) and the other
    /// threads, killed by it, stop at theirs. Signals that arrive meanwhile are passed on.
    pub fn at_exit(pid: i32, exiting: i32, ready: impl FnOnce()) -> Result<Frozen> {
        Frozen::exit_capture(pid, exiting, ready, false)
    }

    /// A process kal traces is dying of a fatal signal: thread `exiting` is stopped at its
    /// exit event (its memory is still mapped). Waits until the other threads, killed with
    /// it, stop at theirs, and holds them all; dropping the result lets the process die.
    pub fn at_fatal_exit(pid: i32, exiting: i32) -> Result<Frozen> {
        Frozen::exit_capture(pid, exiting, || {}, true)
    }

    /// [`Frozen::at_exit`]; with `exiting_stopped`, thread `exiting` is at its exit event
    /// already (kal traces it and saw the event). Threads kal keeps traced are let go of
    /// when the result is dropped: the process is ending.
    fn exit_capture(
        pid: i32,
        exiting: i32,
        ready: impl FnOnce(),
        exiting_stopped: bool,
    ) -> Result<Frozen> {
        let started = Instant::now();
        let mut f = Frozen::empty(pid, started, None);
        let opts = ptrace::Options::PTRACE_O_TRACEEXIT | ptrace::Options::PTRACE_O_TRACECLONE;
        let seized = f.seize_all(opts, |_, _| Ok(()), |_| Ok(()));
        // Kept threads already have these options; at exit kal lets go of them all.
        for tid in std::mem::take(&mut f.kept) {
            unkeep(tid);
        }
        seized?;
        ready();
        let mut stopped: Vec<i32> = Vec::new();
        let mut exit_seen: Option<Instant> = None;
        // Exit events seen while kal waited for an agent, left stopped there.
        for tid in take_handed_back() {
            if f.threads.iter().any(|t| t.0 == tid) {
                exit_seen.get_or_insert_with(Instant::now);
                stopped.push(tid);
            } else {
                hand_back(tid);
            }
        }
        if exiting_stopped {
            unkeep(exiting);
            if !f.threads.iter().any(|t| t.0 == exiting) {
                f.threads.push((exiting, None));
            }
            stopped.push(exiting);
            exit_seen = Some(Instant::now());
        }
        // Threads stopped at their exit before the exiting thread's own event came: most
        // likely killed by its exit_group already (their events may come first), so they
        // are held; one that really ended on its own is let go after a short grace.
        let mut held: Vec<(i32, Instant)> = Vec::new();
        // The exiting thread reaches exit_group within tens of microseconds of `ready`:
        // polled at 10 us, then less often (up to 200 us) should it take longer.
        let mut nap = Duration::from_micros(10);
        loop {
            let mut progress = false;
            if exit_seen.is_some() {
                stopped.extend(held.drain(..).map(|h| h.0));
            } else {
                held.retain(|&(tid, since)| {
                    let keep = since.elapsed() < EXIT_GRACE;
                    if !keep {
                        let _ = ptrace::cont(Pid::from_raw(tid), None);
                    }
                    keep
                });
            }
            let tids: Vec<i32> = f
                .threads
                .iter()
                .map(|t| t.0)
                .filter(|t| !stopped.contains(t) && !held.iter().any(|h| h.0 == *t))
                .collect();
            if tids.is_empty() && held.is_empty() {
                break;
            }
            if let Some(t0) = exit_seen {
                if t0.elapsed() > STOP_DEADLINE {
                    break; // a thread stuck in the kernel: its registers are left out
                }
            }
            for tid in tids {
                let p = Pid::from_raw(tid);
                match waitpid(p, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                    Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_EXIT => {
                        progress = true;
                        if tid == exiting || exit_seen.is_some() {
                            exit_seen.get_or_insert_with(Instant::now);
                            stopped.push(tid);
                        } else {
                            held.push((tid, Instant::now()));
                        }
                    }
                    Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_CLONE => {
                        progress = true;
                        if let Ok(child) = ptrace::getevent(p) {
                            f.threads.push((child as i32, None));
                        }
                        let _ = ptrace::cont(p, None);
                    }
                    Ok(WaitStatus::PtraceEvent(..)) => {
                        progress = true;
                        let _ = ptrace::cont(p, None);
                    }
                    Ok(WaitStatus::Stopped(_, sig)) => {
                        progress = true;
                        let _ = ptrace::cont(p, Some(sig));
                    }
                    Ok(WaitStatus::Exited(..))
                    | Ok(WaitStatus::Signaled(..))
                    | Err(Errno::ECHILD) => {
                        progress = true;
                        f.threads.retain(|t| t.0 != tid);
                        unkeep(tid);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e).context("waiting for the process to exit"),
                }
            }
            if progress {
                nap = Duration::from_micros(10);
            } else {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_micros(200));
            }
        }
        let before = f.threads.len();
        f.threads.retain(|t| stopped.contains(&t.0));
        f.unstopped = (before - f.threads.len()) as u64;
        if f.threads.is_empty() {
            bail!("process {pid} ended before it could be captured");
        }
        f.started = Instant::now();
        Ok(f)
    }

    /// Seizes every thread of the process with `opts`, again and again until no new thread
    /// shows up (threads created meanwhile included), calling `then` after each seize and
    /// `batch_done` after each round of new threads.
    fn seize_all(
        &mut self,
        opts: ptrace::Options,
        mut then: impl FnMut(&mut Frozen, i32) -> Result<()>,
        mut batch_done: impl FnMut(&mut Frozen) -> Result<()>,
    ) -> Result<()> {
        let pid = self.pid;
        // Threads that exited (still listed for a moment, or as a zombie main thread).
        let mut gone: Vec<i32> = Vec::new();
        loop {
            let mut new: Vec<i32> = crate::capture::procfs::tasks(pid)?
                .into_iter()
                .filter(|t| {
                    *t != self.skip
                        && !gone.contains(t)
                        && !self.threads.iter().any(|(x, _)| x == t)
                        && !self.left_running.iter().any(|(x, _)| x == t)
                })
                .collect();
            if self.leave_blocked {
                new.retain(|&t| match eintr_call(pid, t) {
                    Some(call) => {
                        self.left_running.push((t, call));
                        false
                    }
                    None => true,
                });
            }
            if new.is_empty() {
                return Ok(());
            }
            for tid in new {
                if is_kept(tid) {
                    self.kept.push(tid);
                    self.threads.push((tid, None));
                    then(self, tid)?;
                    continue;
                }
                match ptrace::seize(Pid::from_raw(tid), opts) {
                    Ok(()) => self.threads.push((tid, None)),
                    // A thread kal's tracer traces but has not heard of yet (a new
                    // thread of a traced process, attached by the kernel).
                    Err(Errno::EPERM) if traced_by_me(tid) => {
                        keep(tid);
                        self.kept.push(tid);
                        self.threads.push((tid, None));
                    }
                    Err(Errno::ESRCH) => {
                        gone.push(tid); // the thread exited meanwhile
                        continue;
                    }
                    // An exited main thread stays listed as a zombie, and cannot be seized.
                    Err(Errno::EPERM) if is_zombie(pid, tid) || is_exiting(pid, tid) => {
                        gone.push(tid);
                        continue;
                    }
                    Err(Errno::EPERM) => bail!("{}", why_not_traceable(pid)),
                    Err(e) => return Err(e).with_context(|| format!("cannot seize thread {tid}")),
                }
                then(self, tid)?;
            }
            batch_done(self)?;
        }
    }

    /// Waits until each of `tids` (seized and interrupted) has stopped, or exited; each
    /// has [`STOP_DEADLINE`] from now. Records a signal to re-deliver, and forgets threads
    /// that exited.
    fn wait_stops(&mut self, mut tids: Vec<i32>) -> Result<()> {
        let deadline = Instant::now() + STOP_DEADLINE;
        // Kept threads already stopped at their exit event (seen while kal waited for an
        // agent) report no new stop: they are held as they are.
        for tid in take_handed_back() {
            if tids.contains(&tid) {
                tids.retain(|&t| t != tid);
                self.exit_stopped.push(tid);
            } else {
                hand_back(tid);
            }
        }
        while !tids.is_empty() {
            let mut progress = false;
            let mut failed = None;
            let threads = &mut self.threads;
            let (group, at_exit) = (&mut self.group_stopped, &mut self.exit_stopped);
            tids.retain(|&tid| {
                let stop = match waitpid(
                    Pid::from_raw(tid),
                    Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
                ) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => return true,
                    Ok(WaitStatus::Stopped(_, sig)) => Stop::Stopped(Some(sig)),
                    Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_EXIT => {
                        Stop::AtExit
                    }
                    Ok(WaitStatus::PtraceEvent(_, sig, ev))
                        if ev == libc::PTRACE_EVENT_STOP && is_stop_signal(sig) =>
                    {
                        Stop::Group
                    }
                    Ok(WaitStatus::Exited(..))
                    | Ok(WaitStatus::Signaled(..))
                    | Err(Errno::ECHILD) => Stop::Gone,
                    Ok(_) => Stop::Stopped(None),
                    Err(e) => {
                        failed = Some(e);
                        return true;
                    }
                };
                progress = true;
                if let Some(slot) = threads.iter_mut().find(|(t, _)| *t == tid) {
                    match stop {
                        Stop::Stopped(s) => slot.1 = s,
                        Stop::Group => group.push(tid),
                        Stop::AtExit => at_exit.push(tid),
                        Stop::Gone => {
                            // Its end was collected here: the tracer forgets it too.
                            unkeep(tid);
                            slot.0 = -1
                        }
                    }
                }
                false
            });
            if let Some(e) = failed {
                return Err(e).context("waiting for a thread to stop");
            }
            if !tids.is_empty() && !progress {
                if Instant::now() > deadline {
                    bail!("thread {} did not stop within {:?}", tids[0], STOP_DEADLINE);
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// Seizes and stops one thread of `pid` (`tid`, or any if that one is gone).
    pub fn freeze_one(pid: i32, tid: i32) -> Result<Frozen> {
        let loan = crate::run::trace::borrow(pid, false);
        let started = Instant::now();
        let mut f = Frozen::empty(pid, started, loan);
        let mut candidates = vec![tid];
        candidates.extend(crate::capture::procfs::tasks(pid)?);
        for t in candidates {
            let kept = is_kept(t);
            if !kept && ptrace::seize(Pid::from_raw(t), ptrace::Options::empty()).is_err() {
                continue;
            }
            f.threads.push((t, None));
            if kept {
                f.kept.push(t);
            }
            if ptrace::interrupt(Pid::from_raw(t)).is_ok() {
                match wait_stop(t)? {
                    Stop::Stopped(sig) => {
                        f.threads[0].1 = sig;
                        return Ok(f);
                    }
                    Stop::Group => f.group_stopped.push(t),
                    Stop::AtExit => f.exit_stopped.push(t),
                    Stop::Gone => {}
                }
            }
            // Not a thread to work in: let it go (or resume it) before the next one
            // (keeping the loan, if any).
            let loan = f._loan.take();
            drop(std::mem::replace(&mut f, Frozen::empty(pid, started, loan)));
        }
        bail!("process {pid} has no thread left to work in")
    }

    /// Remembers a signal that arrived while kal held thread `tid`; it is delivered on
    /// detach.
    pub fn defer_signal(&mut self, tid: i32, sig: Signal) {
        if let Some(t) = self.threads.iter_mut().find(|t| t.0 == tid) {
            t.1 = Some(sig);
        }
    }

    /// A thread that kal stopped at a signal-delivery stop for a signal that will end the
    /// process once delivered (the process is crashing), as `(tid, signal)`.
    pub fn fatal_signal(&self) -> Option<(i32, i32)> {
        self.threads.iter().find_map(|&(tid, sig)| {
            let sig = sig? as i32;
            crate::capture::fatal::fatal_for(self.pid, sig).then_some((tid, sig))
        })
    }

    /// Fails with [`crate::capture::fatal::Crashing`] when a frozen thread was stopped delivering a
    /// fatal signal; dropping `self` then detaches and lets the signal be delivered.
    pub fn ensure_not_crashing(&self) -> Result<()> {
        match self.fatal_signal() {
            Some((_, sig)) => Err(crate::capture::fatal::Crashing {
                pid: self.pid,
                why: crate::capture::fatal::Dying::Signal(sig),
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Threads left running because they were blocked in a call a stop would have
    /// interrupted, with that call: their registers were not read and their stacks may
    /// change (a capture gap).
    pub fn left_running(&self) -> &[(i32, &'static str)] {
        &self.left_running
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A process id under which the frozen process's memory reads: a stopped thread's (the
    /// main thread may have exited, and its `/proc` entry then shows no memory).
    pub fn mem_pid(&self) -> i32 {
        self.threads
            .iter()
            .map(|t| t.0)
            .find(|&t| t == self.pid)
            .or(self.threads.first().map(|t| t.0))
            .unwrap_or(self.pid)
    }

    /// Registers of every frozen thread that has them, and how many threads kal holds or
    /// saw whose registers it could not read (a thread that exited meanwhile has none and
    /// is not counted).
    pub fn regs_and_missing(&self) -> (Vec<ThreadRegs>, u64) {
        let mut out = Vec::with_capacity(self.threads.len());
        let mut missing = self.unstopped;
        for &(tid, _) in &self.threads {
            match ptrace::getregs(Pid::from_raw(tid)) {
                Ok(regs) => out.push(ThreadRegs { tid, regs }),
                Err(Errno::ESRCH)
                    if !crate::capture::procfs::tasks(self.pid).is_ok_and(|t| t.contains(&tid)) => {
                }
                Err(_) => missing += 1,
            }
        }
        (out, missing)
    }

    /// Registers of every frozen thread.
    pub fn regs(&self) -> Result<Vec<ThreadRegs>> {
        let mut out = Vec::with_capacity(self.threads.len());
        for &(tid, _) in &self.threads {
            match ptrace::getregs(Pid::from_raw(tid)) {
                Ok(regs) => out.push(ThreadRegs { tid, regs }),
                Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read registers of thread {tid}"))
                }
            }
        }
        Ok(out)
    }

    /// Time since the first thread was stopped.
    pub fn paused_for(&self) -> Duration {
        self.started.elapsed()
    }
}

enum Stop {
    /// Stopped; a signal to re-deliver on detach, if the stop was a signal-delivery stop.
    Stopped(Option<Signal>),
    /// In a group-stop (a thread kal keeps traced, stopped by SIGSTOP and the like).
    Group,
    /// At its exit event (a thread kal keeps traced, whose process is ending).
    AtExit,
    /// The thread exited.
    Gone,
}

fn wait_stop(tid: i32) -> Result<Stop> {
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        match waitpid(
            Pid::from_raw(tid),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() > deadline {
                    bail!("thread {tid} did not stop within {:?}", STOP_DEADLINE);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_EXIT => {
                return Ok(Stop::AtExit)
            }
            Ok(WaitStatus::PtraceEvent(_, sig, ev))
                if ev == libc::PTRACE_EVENT_STOP && is_stop_signal(sig) =>
            {
                return Ok(Stop::Group)
            }
            Ok(WaitStatus::PtraceEvent(..)) => return Ok(Stop::Stopped(None)),
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Stopped(Some(sig))),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                return Ok(Stop::Gone)
            }
            Ok(_) => return Ok(Stop::Stopped(None)),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("waiting for a thread to stop"),
        }
    }
}

impl Frozen {
    /// Threads kal's tracer keeps traced among those held: let go of (detached) when the
    /// freeze ends, rather than resumed, and no longer kept (`kal run` lends the process
    /// to another kal).
    pub fn let_go_of_kept(&mut self) -> Vec<i32> {
        for &tid in &self.kept {
            unkeep(tid);
        }
        std::mem::take(&mut self.kept)
    }

    /// Whether a held thread kal keeps traced is at its exit event (the process is ending).
    pub fn exiting(&self) -> bool {
        !self.exit_stopped.is_empty()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &(tid, sig) in &self.threads {
            if tid <= 0 {
                continue;
            }
            if !self.kept.contains(&tid) {
                let _ = ptrace::detach(Pid::from_raw(tid), sig);
            } else if self.exit_stopped.contains(&tid) {
                hand_back(tid);
            } else if self.group_stopped.contains(&tid) {
                listen(tid);
            } else {
                let _ = ptrace::cont(Pid::from_raw(tid), sig);
            }
        }
    }
}
