//! `kal run` as the ptrace tracer of every process that says hello, so that a process dying
//! of a fatal signal (SIGSEGV, SIGBUS, an unhandled SIGTERM, `raise(SIGABRT)`…) is read at
//! its exit event, while its memory is still mapped, as memcheck reports such a process.
//!
//! Each thread is seized with `PTRACE_O_TRACEEXIT | PTRACE_O_TRACECLONE` (new threads are
//! traced too; forked children are not: they say hello themselves) and never interrupted by
//! the tracer itself. Every stop is resumed as soon as kal sees it: a signal-delivery stop
//! with the same signal (never swallowed, never duplicated), a group-stop with
//! `PTRACE_LISTEN` (the process stays stopped until `SIGCONT`, as without a tracer), an exit
//! event of a thread or of a process ending normally at once. Only the exit event of a
//! process ending by a signal is held, for the capture ([`Event::Dying`]).
//!
//! kal traces from its main thread only (ptrace requests come from the tracing thread), and
//! [`crate::capture::freeze`] knows the threads kept traced ([`crate::capture::freeze::keep`]), so kal's own
//! freezes interrupt them rather than seize them. If kal dies, the kernel detaches them and
//! the program runs on.
//!
//! Another kal (`kal check PID`, `kal reclaim PID`) cannot seize a traced process: it asks
//! `kal run` to lend it ([`borrow`], `MsgKind::Lend`); kal run lets go of the process until
//! that connection closes, then traces it again.

use crate::capture::freeze::{is_stop_signal, keep, listen, unkeep, Frozen};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Resumes thread `tid` from any stop but an exit event (wait status `st`) as if no tracer
/// were there: a signal-delivery stop with its signal, a group-stop listening (the process
/// stays stopped until SIGCONT), any other event stop at once.
fn pass_on(tid: i32, st: i32) {
    let sig = libc::WSTOPSIG(st);
    match st >> 16 {
        0 => deliver(tid, sig),
        libc::PTRACE_EVENT_STOP if Signal::try_from(sig).is_ok_and(is_stop_signal) => listen(tid),
        _ => {
            let _ = ptrace::cont(Pid::from_raw(tid), None);
        }
    }
}

/// Resumes thread `tid` from a signal-delivery stop with its signal `sig`, whatever its
/// number: real-time signals too (glibc's SIGSETXID and SIGCANCEL, a program's timer
/// signals), which nix's `Signal` cannot name — resuming with `None` would swallow them.
fn deliver(tid: i32, sig: i32) {
    // SAFETY: PTRACE_CONT on our own stopped tracee, with a signal number as data.
    unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0usize, sig as usize) };
}

/// The ptrace options kal traces with: exit events, and new threads.
pub fn options() -> ptrace::Options {
    ptrace::Options::PTRACE_O_TRACEEXIT | ptrace::Options::PTRACE_O_TRACECLONE
}

/// What the tracer saw that `kal run` must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child of kal ended (reaped): its pid and wait status.
    Reaped(i32, i32),
    /// Process `pid` is dying of signal `sig`: thread `tid` is held at its exit event.
    Dying {
        /// The process.
        pid: i32,
        /// The thread held at its exit event.
        tid: i32,
        /// The signal.
        sig: i32,
    },
}

/// The processes `kal run` traces.
#[derive(Default)]
pub struct Tracer {
    /// Traced processes (that said hello), with their agent header.
    procs: HashMap<i32, u64>,
    /// Thread id to process id, for the threads seen.
    tids: HashMap<i32, i32>,
    /// Processes lent to another kal, with how many loans are open.
    lent: HashMap<i32, usize>,
}

/// The thread tracing thread `tid` (0: none), from `/proc`.
fn tracer_of(tid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The thread group (process) of thread `tid`, from `/proc`.
fn tgid_of(tid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Tracer {
    /// A tracer tracing nothing yet.
    pub fn new() -> Tracer {
        Tracer::default()
    }

    /// Traces every thread of `pid` (which said hello, its agent header at `header`),
    /// including threads created meanwhile. A process traced already (it exec'd) only gets
    /// its new header.
    pub fn attach(&mut self, pid: i32, header: u64) -> Result<()> {
        self.procs.insert(pid, header);
        if self.lent.contains_key(&pid) {
            return Ok(());
        }
        let mut gone: Vec<i32> = Vec::new();
        loop {
            let new: Vec<i32> = crate::capture::procfs::tasks(pid)?
                .into_iter()
                .filter(|t| !gone.contains(t) && !crate::capture::freeze::is_kept(*t))
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            for tid in new {
                match ptrace::seize(Pid::from_raw(tid), options()) {
                    Ok(()) => {
                        keep(tid);
                        self.tids.insert(tid, pid);
                    }
                    Err(Errno::ESRCH) => gone.push(tid),
                    Err(Errno::EPERM) => match tracer_of(tid) {
                        Some(t) if t == nix::unistd::gettid().as_raw() => {
                            keep(tid);
                            self.tids.insert(tid, pid);
                        }
                        Some(t) if t != 0 && tid == pid => {
                            self.procs.remove(&pid);
                            bail!("process {pid} is traced by process {t} already");
                        }
                        // Exited meanwhile (a zombie main thread stays listed).
                        _ => gone.push(tid),
                    },
                    Err(e) => return Err(e).with_context(|| format!("cannot trace thread {tid}")),
                }
            }
        }
    }

    /// Whether `pid` said hello and is traced (not lent).
    pub fn traces(&self, pid: i32) -> bool {
        self.procs.contains_key(&pid) && !self.lent.contains_key(&pid)
    }

    /// Whether `pid` is lent to another kal now.
    pub fn is_lent(&self, pid: i32) -> bool {
        self.lent.contains_key(&pid)
    }

    /// Forgets process `pid`: kal let go of it at its exit.
    pub fn forget(&mut self, pid: i32) {
        self.procs.remove(&pid);
        self.tids.retain(|_, p| *p != pid);
    }

    /// Handles every stop and end waiting to be collected, without blocking, and returns
    /// what `kal run` must act on. Stops at the first [`Event::Dying`]: the caller captures
    /// that process before its other threads' exit events are collected here.
    pub fn pump(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        for (tid, st) in std::mem::take(&mut *REAPED.lock().unwrap_or_else(|e| e.into_inner())) {
            unkeep(tid);
            self.tids.remove(&tid);
            out.push(Event::Reaped(tid, st));
        }
        let mut handed = crate::capture::freeze::take_handed_back();
        loop {
            let (tid, st) = if let Some(tid) = handed.pop() {
                // A freeze found it at its exit event and left it there.
                (
                    tid,
                    (libc::PTRACE_EVENT_EXIT << 16) | (libc::SIGTRAP << 8) | 0x7f,
                )
            } else {
                let mut st = 0;
                // SAFETY: waitpid writes the status into our own int.
                let r = unsafe { libc::waitpid(-1, &mut st, libc::__WALL | libc::WNOHANG) };
                if r <= 0 {
                    break;
                }
                (r, st)
            };
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                unkeep(tid);
                self.tids.remove(&tid);
                out.push(Event::Reaped(tid, st));
                continue;
            }
            if !libc::WIFSTOPPED(st) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.tids.entry(tid) {
                // A new thread (attached by the kernel), or a process cloned by one.
                if let Some(p) = tgid_of(tid) {
                    e.insert(p);
                }
                keep(tid);
            }
            match st >> 16 {
                libc::PTRACE_EVENT_EXIT => {
                    let pid = self.tids.get(&tid).copied().unwrap_or(0);
                    let signal = death_signal(tid);
                    if signal != 0 && self.traces(pid) {
                        out.push(Event::Dying {
                            pid,
                            tid,
                            sig: signal,
                        });
                        // Events already taken from a freeze go back for the next round.
                        if !handed.is_empty() {
                            let mut h = crate::capture::freeze::take_handed_back();
                            h.extend(handed);
                            for t in h {
                                crate::capture::freeze::hand_back(t);
                            }
                        }
                        return out;
                    }
                    self.tids.remove(&tid);
                    let_exit(tid);
                }
                _ => pass_on(tid, st),
            }
        }
        out
    }

    /// Captures process `pid`, dying of a signal, at its exit event (thread `tid` is held
    /// there), and lets go of it: it dies once the result is dropped.
    pub fn dying(&mut self, pid: i32, tid: i32) -> Result<(Frozen, u64)> {
        let header = self.procs.get(&pid).copied().unwrap_or(0);
        self.forget(pid);
        Ok((Frozen::at_fatal_exit(pid, tid)?, header))
    }

    /// Lets go of process `pid` until [`Tracer::unlend`]: every thread is stopped, then
    /// detached (a signal that arrived meanwhile is delivered). Fails if the process is
    /// ending.
    pub fn lend(&mut self, pid: i32, leave_blocked: bool) -> Result<()> {
        if let Some(n) = self.lent.get_mut(&pid) {
            *n += 1;
            return Ok(());
        }
        if !self.procs.contains_key(&pid) {
            bail!("kal run does not trace process {pid}");
        }
        // Threads blocked in a call a stop would end early stay traced when the borrower
        // leaves them running too (`--no-interrupt`).
        let mut f = Frozen::freeze_except(pid, 0, leave_blocked)?;
        if f.exiting() {
            bail!("process {pid} is ending");
        }
        for tid in f.let_go_of_kept() {
            self.tids.remove(&tid);
        }
        drop(f);
        self.lent.insert(pid, 1);
        Ok(())
    }

    /// Stops tracing process `pid` for good, if it is alive and not ending (its agent's
    /// connection closed without an exit: it exec'd, or closed that connection).
    pub fn release(&mut self, pid: i32) {
        if !self.traces(pid) {
            return;
        }
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let state = crate::capture::procfs::stat_field(&s, 0)?.to_string();
                let flags: u64 = crate::capture::procfs::stat_field(&s, 6)?.parse().ok()?;
                Some(state != "Z" && state != "X" && flags & 4 == 0)
            })
            .unwrap_or(false);
        if !alive {
            return;
        }
        if let Ok(mut f) = Frozen::freeze(pid) {
            if !f.exiting() {
                f.let_go_of_kept();
                self.forget(pid);
            }
        }
    }

    /// A loan of `pid` ended: once no loan is left, traces it again (if it still lives).
    pub fn unlend(&mut self, pid: i32) {
        let Some(n) = self.lent.get_mut(&pid) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.lent.remove(&pid);
        let header = self.procs.get(&pid).copied().unwrap_or(0);
        // A borrower that died closes its connection before the kernel detaches it from
        // the process: that takes a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match self.attach(pid, header) {
                Ok(()) => return,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    crate::say!(
                        "kal: cannot trace process {pid} again ({e:#}): if it dies of a signal, it gets no leak report"
                    );
                    return;
                }
            }
        }
    }
}

/// The signal thread `tid`, stopped at its exit event, dies of (0: it exits).
fn death_signal(tid: i32) -> i32 {
    let code = ptrace::getevent(Pid::from_raw(tid)).unwrap_or(0) as i32;
    let sig = code & 0x7f;
    if sig == 0x7f {
        0
    } else {
        sig
    }
}

/// Lets thread `tid`, stopped at its exit event, go on exiting, untraced: it is reaped
/// at once as without kal (a traced thread would stay a zombie, still counted in its
/// process, until kal collected it).
fn let_exit(tid: i32) {
    unkeep(tid);
    let _ = ptrace::detach(Pid::from_raw(tid), None);
}

/// Ends collected while kal waited for an agent ([`service_stops`]), for the tracer.
static REAPED: std::sync::Mutex<Vec<(i32, i32)>> = std::sync::Mutex::new(Vec::new());

/// Resumes the stops of kal's tracees while kal waits for an agent's answer (the wait hook
/// of [`crate::agent::control`]): signal-delivery stops with their signal, group-stops listen,
/// new threads and clone events go on. Exit events are left stopped for the tracer
/// ([`crate::capture::freeze::hand_back`]), and ends are kept for it.
pub fn service_stops() {
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes the status into our own int.
        let tid = unsafe { libc::waitpid(-1, &mut st, libc::__WALL | libc::WNOHANG) };
        if tid <= 0 {
            return;
        }
        if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
            REAPED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((tid, st));
            continue;
        }
        if !libc::WIFSTOPPED(st) {
            continue;
        }
        keep(tid);
        match st >> 16 {
            libc::PTRACE_EVENT_EXIT if death_signal(tid) != 0 => {
                crate::capture::freeze::hand_back(tid)
            }
            libc::PTRACE_EVENT_EXIT => let_exit(tid),
            _ => pass_on(tid, st),
        }
    }
}

/// Whether kal has children left (peeked at, nothing reaped or consumed).
pub fn has_children() -> bool {
    // SAFETY: a zeroed siginfo is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid peeks (WNOWAIT) at our own children into our own siginfo.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
        )
    };
    r == 0
}

/// The socket of this kal's own `kal run`, if it is one: never borrowed from (that would
/// be asking itself).
static OWN_SOCKET: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Records this `kal run`'s socket (see `OWN_SOCKET`).
pub fn set_own_socket(p: &std::path::Path) {
    let _ = OWN_SOCKET.set(p.to_path_buf());
}

/// Whether thread `tid` belongs to this process.
fn tracer_of_self_group(tid: i32) -> bool {
    tgid_of(tid) == Some(std::process::id() as i32)
}

/// The agent socket `kal run` process `kal` listens on: a listening unix socket of its
/// own (`/proc/KAL/fd`) whose path (`/proc/KAL/net/unix`) ends in `agent.sock`.
fn listening_socket(kal: i32) -> Option<std::path::PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{kal}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let l = std::fs::read_link(e.path()).ok()?;
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{kal}/net/unix")).ok()?;
    table.lines().skip(1).find_map(|l| {
        // Num RefCount Protocol Flags Type St Inode Path
        let f: Vec<&str> = l.split_whitespace().collect();
        let listening = u32::from_str_radix(f.get(3)?, 16).ok()? & 0x10000 != 0;
        let (inode, path) = (f.get(6)?, f.get(7)?);
        (listening && inodes.iter().any(|i| i == inode) && path.ends_with("/agent.sock"))
            .then(|| std::path::PathBuf::from(path))
    })
}

/// A loan from `kal run` of a process it traces, held while this kal works on it.
pub struct Loan {
    _stream: UnixStream,
}

/// If process `pid` is traced by another kal's `kal run` (its `KAL_SOCKET` names that
/// kal), asks it to let go of the process while the returned loan lives (with
/// `leave_blocked`, of all but the threads blocked in a call a stop would end early). `None` when the process is not
/// traced, or by something else (then seizing it fails with a clear error).
pub fn borrow(pid: i32, leave_blocked: bool) -> Option<Loan> {
    let tracer = tracer_of(pid)?;
    // Not traced, traced by this kal, or by something that is not a kal.
    if tracer == 0 || tracer_of_self_group(tracer) {
        return None;
    }
    // A kal is known by the agent socket it listens on, whatever its binary is called;
    // failing that (its descriptors unreadable), by its name.
    let sock = listening_socket(tracer).or_else(|| {
        let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm")).ok()?;
        if comm.trim() != "kal" {
            return None;
        }
        // The program's environment names it too, unless the program wrote over it
        // (a process title, as redis-server sets).
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let key = format!("{}=", kal_proto::ENV_SOCKET);
        let sock = env
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(key.as_bytes()))?;
        Some(std::path::PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(sock),
        ))
    })?;
    if OWN_SOCKET.get() == Some(&sock) {
        return None;
    }
    let mut stream = UnixStream::connect(&sock).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let msg = kal_proto::Hello {
        magic: kal_proto::MAGIC,
        kind: kal_proto::MsgKind::Lend as u32,
        pid: pid as u32,
        // Flags: 1 = leave running the threads blocked in calls a stop would end early.
        tid: leave_blocked as u32,
        version: kal_proto::VERSION,
        header_addr: 0,
    };
    stream.write_all(&msg.encode()).ok()?;
    let mut b = [0u8; 1];
    stream.read_exact(&mut b).ok()?;
    (b[0] == 1).then_some(Loan { _stream: stream })
}
