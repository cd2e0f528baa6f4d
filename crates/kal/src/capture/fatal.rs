//! Is a process dying? A process with a fatal signal pending or being delivered (or dumping
//! core) must not be checked — freezing and injecting into it races its death — and above
//! all must not have blocks freed inside it.
//!
//! A signal is fatal when its default action terminates the process and the process
//! neither catches nor ignores it; it is about to be delivered when it is pending for a
//! thread (or for the whole process) that does not block it. `SIGKILL` always is.

use std::fmt;

/// Signals whose default action is to ignore or to stop/continue: never fatal by default.
const NOT_FATAL: [i32; 8] = [
    libc::SIGCHLD,
    libc::SIGCONT,
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGURG,
    libc::SIGWINCH,
];

/// Bit of signal `sig` in the masks of `/proc/PID/status`.
fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// Signals (1 to 64) whose default action ends the process.
pub fn fatal_by_default() -> u64 {
    NOT_FATAL.iter().fold(u64::MAX, |m, &s| m & !bit(s))
}

/// Why a process is to be left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dying {
    /// Signal `0` is pending (or being delivered) and will end the process.
    Signal(i32),
    /// The kernel is writing its core dump.
    CoreDump,
}

impl fmt::Display for Dying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dying::Signal(s) => write!(f, "it is dying of {}", signal_name(*s)),
            Dying::CoreDump => write!(f, "it is dumping core"),
        }
    }
}

/// The error a check or a reclaim of a dying process fails with (callers may downcast
/// to it to tell it from a failure).
#[derive(Debug, Clone, Copy)]
pub struct Crashing {
    /// The process.
    pub pid: i32,
    /// Why.
    pub why: Dying,
}

impl fmt::Display for Crashing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "process {} is left alone: {} (no check, no reclaim)",
            self.pid, self.why
        )
    }
}

impl std::error::Error for Crashing {}

/// `SIGSEGV`, `SIGABRT`, …, or `signal N`.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// The fields of one `/proc/.../status` this module needs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Signals pending for this thread.
    pub sig_pnd: u64,
    /// Signals pending for the whole process.
    pub shd_pnd: u64,
    /// Signals this thread blocks.
    pub sig_blk: u64,
    /// Signals the process ignores.
    pub sig_ign: u64,
    /// Signals the process catches.
    pub sig_cgt: u64,
    /// `CoreDumping: 1`.
    pub core_dumping: bool,
    /// State letter (`R`, `S`, `Z`, …).
    pub state: char,
}

/// Parses the text of a `/proc/PID/status` (or `/proc/PID/task/TID/status`) file.
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let val = val.trim();
        let hex = || u64::from_str_radix(val, 16).unwrap_or(0);
        match key {
            "SigPnd" => s.sig_pnd = hex(),
            "ShdPnd" => s.shd_pnd = hex(),
            "SigBlk" => s.sig_blk = hex(),
            "SigIgn" => s.sig_ign = hex(),
            "SigCgt" => s.sig_cgt = hex(),
            "CoreDumping" => s.core_dumping = val == "1",
            "State" => s.state = val.chars().next().unwrap_or('?'),
            _ => {}
        }
    }
    s
}

/// A fatal signal that thread status `t` is about to take, if any.
pub fn fatal_pending(t: &Status) -> Option<i32> {
    let pending = t.sig_pnd | t.shd_pnd;
    if pending & bit(libc::SIGKILL) != 0 {
        return Some(libc::SIGKILL);
    }
    let fatal = pending & !t.sig_blk & !t.sig_ign & !t.sig_cgt & fatal_by_default();
    (fatal != 0).then(|| fatal.trailing_zeros() as i32 + 1)
}

/// Whether signal `sig`, reported at a ptrace signal-delivery stop of a thread of `pid`,
/// will end the process once kal lets it be delivered.
pub fn fatal_for(pid: i32, sig: i32) -> bool {
    if sig == libc::SIGKILL {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let s = parse_status(&text);
    bit(sig) & fatal_by_default() & !s.sig_ign & !s.sig_cgt != 0
}

/// Whether process `pid` is dying of a signal, from its threads' status files. A process
/// that is gone, or whose threads are all zombies, is not "dying": it is dead, and the
/// caller finds that out on its own.
pub fn dying(pid: i32) -> Option<Dying> {
    let tasks = crate::capture::procfs::tasks(pid).unwrap_or_default();
    for tid in tasks.into_iter().chain(std::iter::once(pid)) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue;
        };
        let s = parse_status(&text);
        if s.core_dumping {
            return Some(Dying::CoreDump);
        }
        if matches!(s.state, 'Z' | 'X') {
            continue;
        }
        if let Some(sig) = fatal_pending(&s) {
            return Some(Dying::Signal(sig));
        }
    }
    None
}

/// Whether process `pid` has ended: gone from `/proc`, or only zombie threads left.
pub fn ended(pid: i32) -> bool {
    let tasks = crate::capture::procfs::tasks(pid).unwrap_or_default();
    !tasks.iter().any(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .map(|t| !matches!(parse_status(&t).state, 'Z' | 'X'))
            .unwrap_or(false)
    })
}

/// Fails with [`Crashing`] when process `pid` is dying.
pub fn ensure_not_dying(pid: i32) -> anyhow::Result<()> {
    match dying(pid) {
        Some(why) => Err(Crashing { pid, why }.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pnd: u64, shd: u64, blk: u64, ign: u64, cgt: u64) -> Status {
        Status {
            sig_pnd: pnd,
            shd_pnd: shd,
            sig_blk: blk,
            sig_ign: ign,
            sig_cgt: cgt,
            core_dumping: false,
            state: 'S',
        }
    }

    #[test]
    fn fatal_only_when_deliverable_and_not_handled() {
        let segv = bit(libc::SIGSEGV);
        assert_eq!(
            fatal_pending(&status(segv, 0, 0, 0, 0)),
            Some(libc::SIGSEGV)
        );
        assert_eq!(
            fatal_pending(&status(0, segv, 0, 0, 0)),
            Some(libc::SIGSEGV)
        );
        assert_eq!(fatal_pending(&status(segv, 0, segv, 0, 0)), None);
        assert_eq!(fatal_pending(&status(0, segv, 0, 0, segv)), None);
        assert_eq!(fatal_pending(&status(0, segv, 0, segv, 0)), None);
        let chld = bit(libc::SIGCHLD) | bit(libc::SIGSTOP) | bit(libc::SIGWINCH);
        assert_eq!(fatal_pending(&status(chld, 0, 0, 0, 0)), None);
        let kill = bit(libc::SIGKILL);
        assert_eq!(
            fatal_pending(&status(0, kill, kill, kill, kill)),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn parses_proc_status() {
        let text = "Name:\tx\nState:\tt (tracing stop)\nSigPnd:\t0000000000000400\n\
                    ShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\n\
                    SigIgn:\t0000000000001000\nSigCgt:\t0000000180000000\nCoreDumping:\t0\n";
        let s = parse_status(text);
        assert_eq!(s.state, 't');
        assert_eq!(s.sig_pnd, bit(libc::SIGSEGV));
        assert_eq!(s.sig_ign, bit(libc::SIGPIPE));
        assert!(!s.core_dumping);
        assert_eq!(fatal_pending(&s), Some(libc::SIGSEGV));
        assert_eq!(signal_name(libc::SIGABRT), "SIGABRT");
    }
}
