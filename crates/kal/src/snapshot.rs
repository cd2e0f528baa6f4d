//! Copy-on-write snapshots of a live process.
//!
//! All threads are seized and stopped, their registers saved, and a `clone` (no shared
//! memory, exit signal 0 so the target never sees a `SIGCHLD`) is injected into one of
//! them. The child — a frozen copy of the whole address space — arrives traced and stopped;
//! the target's threads run on at once. kal reads the child at leisure, then kills it and
//! reaps it by injecting `wait4` into the target. The child is set to die with kal
//! (`PTRACE_O_EXITKILL`), so a killed kal never leaves a running copy behind.
//!
//! What the copy cannot show as the target has it (`MADV_DONTFORK`, `MADV_WIPEONFORK` and
//! shared memory) and the pointers the kernel holds for it are read from the target before
//! its threads are let go ([`crate::freeze_copy`]); the slow part (smaps) before the freeze.
//!
//! Injected registers are restored at the single-step trap that follows the syscall, so the
//! kernel's own restart logic still applies to a syscall the thread was blocked in.

use crate::freeze::{Frozen, ThreadRegs};
use crate::memory::{Memory, ProcessMemory};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
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
    pub extras: crate::freeze_copy::Extras,
    syscall_at: u64,
    injector: i32,
    released: bool,
}

/// Address of a `syscall` instruction (`0f 05`) in the target's libc.
fn find_syscall(pid: i32) -> Result<u64> {
    let maps = crate::procfs::maps(pid)?;
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

/// Runs syscall `nr(args)` in stopped thread `tid` (whose registers are `saved`), restores
/// the registers and returns the syscall's result (and, for clone, the new child).
fn inject(
    frozen: &mut Frozen,
    tid: i32,
    saved: &libc::user_regs_struct,
    at: u64,
    nr: u64,
    args: [u64; 4],
) -> Result<(i64, Option<i32>)> {
    let p = Pid::from_raw(tid);
    let mut r = *saved;
    r.rax = nr;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = 0;
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
        eprintln!("kal: test hold: {stage}");
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// Takes a snapshot of `pid`.
pub fn take(pid: i32) -> Result<Snapshot> {
    let syscall_at = find_syscall(pid)?;
    let plan = crate::freeze_copy::plan(pid);
    let mut frozen = Frozen::freeze(pid)?;
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
    ptrace::setoptions(Pid::from_raw(tid), ptrace::Options::PTRACE_O_TRACECLONE)?;
    let (rc, child) = inject(
        &mut frozen,
        tid,
        &t.regs,
        syscall_at,
        SYS_CLONE,
        [0, 0, 0, 0],
    )?;
    let _ = ptrace::setoptions(Pid::from_raw(tid), ptrace::Options::empty());
    let Some(child) = child.or((rc > 0).then_some(rc as i32)) else {
        bail!(
            "clone failed in process {pid}: {}",
            Errno::from_raw(-rc as i32)
        );
    };
    // The child starts stopped; make sure it dies with kal, whatever happens to kal.
    let cp = Pid::from_raw(child);
    let _ = waitpid(cp, Some(WaitPidFlag::__WALL));
    let _ = ptrace::setoptions(cp, ptrace::Options::PTRACE_O_EXITKILL);
    // Still frozen, at the instant of the copy: what the copy does not show as it is.
    let mut extras = plan.read(pid);
    extras.threads_without_registers = missing;
    let pause = frozen.paused_for();
    // A fatal signal that arrived while kal worked: the process dies once let go.
    let crashing = frozen.ensure_not_crashing();
    drop(frozen);
    let snap = Snapshot {
        pid,
        child,
        threads,
        pause,
        extras,
        syscall_at,
        injector: tid,
        released: false,
    };
    crashing?; // dropping `snap` kills the copy
    Ok(snap)
}

impl Snapshot {
    /// Kills the copy and reaps it inside the target, leaving no trace.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
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
        let mut frozen = Frozen::freeze_one(self.pid, self.injector)?;
        let regs = frozen.regs()?;
        let t = regs.first().context("no thread to reap in")?;
        let (rc, _) = inject(
            &mut frozen,
            t.tid,
            &t.regs,
            self.syscall_at,
            SYS_WAIT4,
            [self.child as u64, 0, WALL, 0],
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
        if !self.released {
            let _ = signal::kill(Pid::from_raw(self.child), Signal::SIGKILL);
        }
    }
}
