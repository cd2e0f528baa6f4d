//! Copy-on-write snapshots of a live process.
//!
//! All threads are seized and stopped and their registers saved. Then the copy is made:
//!
//! * **by the agent** (when its control-server thread runs; its id is in the header): kal
//!   leaves that one thread running and asks it for a snapshot over the control socket. It
//!   forks the process (no shared memory, exit signal 0: the program never sees a
//!   `SIGCHLD`), answers with the copy's pid and reaps the copy when it ends; the copy ends
//!   when kal closes the connection, or when kal dies. No thread of the program ever runs
//!   code it would not have run, so killing kal at any instant cannot harm it, and nothing
//!   is left behind (see the agent's `snapshot` module);
//! * **by injection** otherwise: a `clone` is injected into one thread; the child arrives
//!   traced and stopped, is set to die with kal (`PTRACE_O_EXITKILL`), and is reaped by
//!   injecting `wait4` into the target. A kal killed while an injected call is in flight
//!   can still harm the target: this path is the fallback only.
//!
//! Either way the target's threads run on as soon as the copy exists, and kal reads the
//! copy at leisure.
//!
//! What the copy cannot show as the target has it (`MADV_DONTFORK`, `MADV_WIPEONFORK` and
//! shared memory) and the pointers the kernel holds for it are read from the target before
//! its threads are let go ([`crate::capture::freeze_copy`]); the slow part (smaps) before the freeze.
//!
//! Injected registers are restored at the single-step trap that follows the syscall, so the
//! kernel's own restart logic still applies to a syscall the thread was blocked in.

use crate::capture::freeze::{Frozen, ThreadRegs};
use crate::capture::memory::{Memory, ProcessMemory};
use crate::capture::tracee::ptrace;
use crate::capture::tracee::waitpid;
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const SYS_CLONE: u64 = 56;
const SYS_WAIT4: u64 = 61;
const WALL: u64 = 0x4000_0000;
const STEP_DEADLINE: Duration = Duration::from_secs(2);

/// A frozen copy of a process.
pub struct Snapshot {
    /// The target.
    pub pid: i32,
    /// The copy (a stopped child of the target, traced by kal).
    pub child: i32,
    /// Registers of every target thread at the instant of the copy.
    pub threads: Vec<ThreadRegs>,
    /// How long the target's threads were stopped.
    pub pause: Duration,
    /// What was read from the frozen target beside the copy, and what could not be.
    pub extras: crate::capture::freeze_copy::Extras,
    maker: Maker,
    released: bool,
}

/// Who made the copy, and so how it is let go.
enum Maker {
    /// The agent's server thread; the copy lives while this connection is open.
    Agent(UnixStream),
    /// A `clone` injected into thread `injector` at the `syscall` instruction `syscall_at`.
    Injected { syscall_at: u64, injector: i32 },
}

/// Address of a `syscall` instruction (`0f 05`) in the target's libc.
pub(crate) fn find_syscall(pid: i32) -> Result<u64> {
    let maps = crate::capture::procfs::maps(pid)?;
    let mem = ProcessMemory::new(pid);
    for m in maps.iter().filter(|m| m.exec && m.path.contains("libc.so")) {
        let mut at = m.start;
        let mut buf = vec![0u8; 64 * 1024];
        while at < m.end {
            let n = ((m.end - at) as usize).min(buf.len());
            let got = match mem.read(at, &mut buf[..n]) {
                Ok(()) => n,
                Err(e) => e.read,
            };
            if let Some(i) = buf[..got].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(at + i as u64);
            }
            at += n as u64 - 1;
        }
    }
    bail!("no syscall instruction found in the libc of process {pid}")
}

/// Runs syscall `nr(args)` in stopped thread `tid` (whose registers are `saved`) with the
/// `syscall` instruction at `at`, restores the registers at the single-step trap that
/// follows (an interrupted call of the thread still restarts) and returns the syscall's
/// result (and, for clone, the new child).
pub(crate) fn inject(
    frozen: &mut Frozen,
    tid: i32,
    saved: &libc::user_regs_struct,
    at: u64,
    nr: u64,
    args: [u64; 6],
) -> Result<(i64, Option<i32>)> {
    let p = Pid::from_raw(tid);
    let mut r = *saved;
    r.rax = nr;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    r.orig_rax = u64::MAX;
    r.rip = at;
    ptrace::setregs(p, r).context("cannot set registers")?;
    ptrace::step(p, None).context("cannot single-step")?;
    let deadline = Instant::now() + STEP_DEADLINE;
    let mut child = None;
    loop {
        match waitpid(p, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {
                if Instant::now() > deadline {
                    let _ = ptrace::setregs(p, *saved);
                    bail!("injected syscall did not complete in thread {tid}");
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_CLONE => {
                child = ptrace::getevent(p).ok().map(|c| c as i32);
                ptrace::step(p, None)?;
            }
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal arrived meanwhile: deliver it after we are done.
                frozen.defer_signal(tid, sig);
                ptrace::step(p, None)?;
            }
            Ok(WaitStatus::PtraceEvent(..)) => ptrace::step(p, None)?,
            Ok(other) => bail!("thread {tid} ended while kal was working in it ({other:?})"),
            Err(e) => return Err(e).context("waiting for an injected syscall"),
        }
    }
    let result = ptrace::getregs(p)?.rax as i64;
    ptrace::setregs(p, *saved).context("cannot restore registers")?;
    Ok((result, child))
}

/// For tests of "kal killed mid-check": with `KAL_TEST_HOLD=<stage>`, sleep 5 s at that
/// stage (`frozen`: target stopped; `snapshot`: copy alive) so the test can kill kal there.
/// Says `kal: test hold: <stage>` on stderr once it is there, so a test can wait for it.
pub fn test_hold(stage: &str) {
    if std::env::var("KAL_TEST_HOLD").is_ok_and(|v| v == stage) {
        crate::say!("kal: test hold: {stage}");
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// Takes a snapshot of `pid`, whose agent header is at `header_addr`: made by the agent
/// when its server thread runs, else by injection.
/// With `no_interrupt`, threads blocked in a call that a stop would end early with EINTR
/// are left running ([`crate::capture::freeze::eintr_call`]); the snapshot then has a gap.
pub fn take(pid: i32, header_addr: u64, no_interrupt: bool) -> Result<Snapshot> {
    refuse_seccomp(pid)?;
    let server = server_thread(pid, header_addr);
    if crate::debug::timing() {
        crate::say!(
            "timing: snapshot by {}",
            if server.is_some() {
                "the agent"
            } else {
                "injection"
            }
        );
    }
    // An agent loaded by `kal attach` never saw the blocks allocated before.
    let attached = matches!(crate::agent::attach::agent_state(pid), Ok(Some(1)));
    let mut snap = match server {
        Some(tid) => take_by_agent(pid, header_addr, tid, no_interrupt),
        None => take_injected(pid, no_interrupt),
    }?;
    snap.extras.before_attach = attached;
    Ok(snap)
}

/// A process under seccomp may be killed by its filter for the fork a snapshot needs (a
/// sandbox's filter typically forbids it, with `SIGSYS`): kal does not try.
fn refuse_seccomp(pid: i32) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim)
        .unwrap_or("0");
    if mode != "0" {
        bail!(
            "process {pid} runs under seccomp ({}): its filter may kill it for the fork a live check needs, so kal does not check it live (kal run still reports it at exit)",
            if mode == "1" { "strict mode" } else { "a filter" }
        );
    }
    Ok(())
}

/// Whether `child` is a process whose parent is `pid` (a value that is not a fresh child
/// of the target is never read, traced or signalled as one).
fn is_child_of(child: i32, pid: i32) -> bool {
    crate::agent::peer::parent_of(child) == Some(pid)
}

/// The agent's running server thread, if any.
fn server_thread(pid: i32, header_addr: u64) -> Option<i32> {
    let h = crate::blocks::agent_table::read_header(&ProcessMemory::new(pid), header_addr).ok()?;
    let tid = h.server_tid as i32;
    (tid > 0 && std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()).then_some(tid)
}

/// How long the agent may take to make the copy while the program is stopped.
const AGENT_DEADLINE: Duration = Duration::from_secs(5);

/// A snapshot made by the agent's server thread `server` while kal holds every other thread.
fn take_by_agent(pid: i32, header_addr: u64, server: i32, no_interrupt: bool) -> Result<Snapshot> {
    let plan = crate::capture::freeze_copy::plan(pid);
    let agent = crate::agent::control::Agent::at(pid, header_addr)?;
    let frozen = Frozen::freeze_except(pid, server, no_interrupt)?;
    frozen.ensure_not_crashing()?;
    test_hold("frozen");
    let stopped = frozen.paused_for();
    // What the copy will not show is read from the frozen target. With thousands of
    // mappings (a process with thousands of threads) listing them takes milliseconds,
    // which were the last part of the pause: that is done on another thread, beside the
    // register reads and the agent's fork. A small process reads it after (a thread
    // costs more than the read).
    let (regs, read, made, extras) = std::thread::scope(|sc| {
        let reader = plan.slow_to_read().then(|| sc.spawn(|| plan.read(pid)));
        let regs = frozen.regs_and_missing();
        let read = frozen.paused_for();
        let made = agent.snapshot(AGENT_DEADLINE);
        let extras = match reader {
            Some(r) => crate::join(r),
            None if made.is_ok() => plan.read(pid),
            None => Default::default(),
        };
        (regs, read, made, extras)
    });
    let (conn, child) = made?;
    if crate::debug::timing() {
        crate::say!(
            "timing: {} threads stopped after {:?}, registers read after {:?}, copy made and extras read after {:?}",
            regs.0.len(),
            stopped,
            read,
            frozen.paused_for()
        );
    }
    if !is_child_of(child, pid) {
        bail!("the kal agent of process {pid} named {child}, which is not its copy");
    }
    finish(frozen, extras, regs, child, Maker::Agent(conn))
}

/// The copy `child` exists and `extras` holds what it does not show, read from the
/// target while frozen (at the instant of the copy): lets the target go. A fatal signal that
/// arrived meanwhile makes it an error (dropping the snapshot ends the copy).
fn finish(
    frozen: Frozen,
    mut extras: crate::capture::freeze_copy::Extras,
    (threads, missing): (Vec<ThreadRegs>, u64),
    child: i32,
    maker: Maker,
) -> Result<Snapshot> {
    let pid = frozen.pid();
    extras.threads_without_registers = missing;
    let left = frozen.left_running();
    if !left.is_empty() {
        let mut calls: Vec<&str> = left.iter().map(|t| t.1).collect();
        calls.sort_unstable();
        calls.dedup();
        extras.gaps.push(crate::capture::Gap::whole(&format!(
            "registers and stack of {} thread(s) left running in {} (--no-interrupt)",
            left.len(),
            calls.join(", ")
        )));
    }
    let pause = frozen.paused_for();
    let crashing = frozen.ensure_not_crashing();
    drop(frozen);
    let snap = Snapshot {
        pid,
        child,
        threads,
        pause,
        extras,
        maker,
        released: false,
    };
    crashing?;
    Ok(snap)
}

/// A snapshot made by a `clone` injected into one of the target's threads.
fn take_injected(pid: i32, no_interrupt: bool) -> Result<Snapshot> {
    let syscall_at = find_syscall(pid)?;
    let plan = crate::capture::freeze_copy::plan(pid);
    let mut frozen = Frozen::freeze_except(pid, 0, no_interrupt)?;
    // A thread stopped delivering a fatal signal: the process is crashing, copy nothing.
    frozen.ensure_not_crashing()?;
    test_hold("frozen");
    let (threads, missing) = frozen.regs_and_missing();
    let t = threads
        .iter()
        .find(|t| t.tid == pid)
        .or(threads.first())
        .context("no thread to work in")?;
    let tid = t.tid;
    // A thread kal run's tracer keeps traced gets its options back afterwards.
    let base = if crate::capture::freeze::is_kept(tid) {
        crate::run::trace::options()
    } else {
        ptrace::Options::empty()
    };
    ptrace::setoptions(
        Pid::from_raw(tid),
        base | ptrace::Options::PTRACE_O_TRACECLONE,
    )?;
    let (rc, child) = inject(&mut frozen, tid, &t.regs, syscall_at, SYS_CLONE, [0; 6])?;
    let _ = ptrace::setoptions(Pid::from_raw(tid), base);
    // The clone event names the copy; a return value is trusted only if it is a child of
    // the target (a seccomp TRAP returns the syscall number, which names another process).
    let fresh = (rc > 0 && is_child_of(rc as i32, pid)).then_some(rc as i32);
    let Some(child) = child.or(fresh) else {
        bail!(
            "clone failed in process {pid}: {}",
            Errno::from_raw(-rc as i32)
        );
    };
    // The child starts stopped; make sure it dies with kal, whatever happens to kal.
    let cp = Pid::from_raw(child);
    let _ = waitpid(cp, Some(WaitPidFlag::__WALL));
    let _ = ptrace::setoptions(cp, ptrace::Options::PTRACE_O_EXITKILL);
    let maker = Maker::Injected {
        syscall_at,
        injector: tid,
    };
    let extras = plan.read(pid);
    finish(frozen, extras, (threads, missing), child, maker)
}

impl Snapshot {
    /// Ends the copy, leaving no trace: the agent's copy ends and is reaped by the agent
    /// once the connection closes; an injected one is killed and reaped by injection.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        let (syscall_at, injector) = match std::mem::replace(
            &mut self.maker,
            Maker::Injected {
                syscall_at: 0,
                injector: 0,
            },
        ) {
            Maker::Agent(conn) => {
                drop(conn);
                return Ok(());
            }
            Maker::Injected {
                syscall_at,
                injector,
            } => (syscall_at, injector),
        };
        let cp = Pid::from_raw(self.child);
        let _ = signal::kill(cp, Signal::SIGKILL);
        loop {
            match waitpid(cp, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    break
                }
                Err(Errno::EINTR) | Ok(_) => {}
                Err(e) => return Err(e).context("waiting for the snapshot to die"),
            }
        }
        // The target is the child's parent: reap the zombie there with an injected wait4.
        let mut frozen = Frozen::freeze_one(self.pid, injector)?;
        let regs = frozen.regs()?;
        let t = regs.first().context("no thread to reap in")?;
        let (rc, _) = inject(
            &mut frozen,
            t.tid,
            &t.regs,
            syscall_at,
            SYS_WAIT4,
            [self.child as u64, 0, WALL, 0, 0, 0],
        )?;
        if rc != self.child as i64 {
            bail!(
                "could not reap the snapshot copy {} in process {}: {}",
                self.child,
                self.pid,
                Errno::from_raw(-rc as i32)
            );
        }
        Ok(())
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // An agent's copy ends when the connection (dropped with `maker`) closes.
        if !self.released && matches!(self.maker, Maker::Injected { .. }) {
            let _ = signal::kill(Pid::from_raw(self.child), Signal::SIGKILL);
        }
    }
}
