//! Processes that ended without the agent's exit handshake: killed by a signal (SIGSEGV, a
//! fatal SIGTERM, SIGKILL), by a raw `exit_group`, or whose agent could not reach kal (it
//! says so itself, in one line). kal cannot read them (a signal's
//! default action cannot be seen coming without changing the program's dispositions),
//! so it says so in one line, with how the process ended.
//!
//! How it ended comes from a pidfd opened when the process said hello
//! (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux 6.15: works even after its parent
//! reaped it), else from `/proc/PID/stat` while it is a zombie.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It is gone and nothing tells how.
    Unknown,
}

impl End {
    /// From a wait status (`task->exit_code`: the signal in the low 7 bits, else the
    /// exit status in bits 8 to 15).
    pub fn from_wait_status(w: i32) -> End {
        if w & 0x7f != 0 {
            End::Signal(w & 0x7f)
        } else {
            End::Code((w >> 8) & 0xff)
        }
    }
}

/// The one line kal prints for a process it could not read.
pub fn line(pid: i32, end: End) -> String {
    let how = match end {
        End::Signal(s) => format!("died of {}", crate::capture::fatal::signal_name(s)),
        End::Code(c) => format!(
            "ended (exit status {c}) without telling kal (a raw exit_group, or its agent could not reach kal)"
        ),
        End::Unknown => "ended without telling kal (killed by a signal?)".to_string(),
    };
    format!("=={pid}== kal: process {pid} {how} before kal could read it: no leak report")
}

/// A process whose connection to kal closed without an exit report.
pub struct Pending {
    /// Its pid.
    pub pid: i32,
    pidfd: Option<OwnedFd>,
    since: Instant,
}

/// How long an ending process may take to be seen ended.
const DECIDE_WITHIN: Duration = Duration::from_secs(5);

/// `pidfd_open(pid)`, or `None` (an old kernel, or the process is gone).
pub fn open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd of the process at the other end of a unix socket (`SO_PEERPIDFD`, Linux 6.5;
/// of a process already reaped, Linux 6.16), or `None`.
pub fn peer_pidfd(stream: &impl AsRawFd) -> Option<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int of the given length.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct pidfd_info`, first version (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// `_IOWR(0xFF, 11, struct pidfd_info)` with the 64-byte first version.
const PIDFD_GET_INFO: u64 = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;

fn exit_info(pidfd: &OwnedFd) -> Option<End> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: the ioctl fills a 64-byte struct we own; an old kernel just fails.
    let rc = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            &mut info as *mut PidfdInfo,
        )
    };
    (rc == 0 && info.mask & PIDFD_INFO_EXIT != 0).then(|| End::from_wait_status(info.exit_code))
}

/// `PF_EXITING` in `/proc/PID/stat`'s flags.
const PF_EXITING: u64 = 4;

impl Pending {
    /// Starts watching `pid`, whose connection just closed.
    pub fn new(pid: i32, pidfd: Option<OwnedFd>) -> Pending {
        Pending {
            pid,
            pidfd,
            since: Instant::now(),
        }
    }

    /// `None` while undecided; `Some(None)` when the process lives on (it exec'd: not an
    /// end); `Some(Some(end))` once it ended.
    pub fn decide(&self) -> Option<Option<End>> {
        if let Some(end) = self.pidfd.as_ref().and_then(exit_info) {
            return Some(Some(end));
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            // Reaped between the pidfd's answer above and this read (the race that made
            // a killed child "ended without telling kal"): asked again, the pidfd tells.
            return Some(Some(
                self.pidfd
                    .as_ref()
                    .and_then(exit_info)
                    .unwrap_or(End::Unknown),
            ));
        };
        let state = crate::capture::procfs::stat_field(&stat, 0).unwrap_or("");
        if state == "Z" || state == "X" {
            return match crate::capture::procfs::stat_field(&stat, 49).and_then(|c| c.parse().ok())
            {
                Some(c) => Some(Some(End::from_wait_status(c))),
                None => Some(Some(End::Unknown)),
            };
        }
        let flags: u64 = crate::capture::procfs::stat_field(&stat, 6)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        if flags & PF_EXITING == 0 {
            return Some(None); // alive: a new image (exec) or a closed connection
        }
        if self.since.elapsed() > DECIDE_WITHIN {
            return Some(Some(End::Unknown));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses() {
        assert_eq!(End::from_wait_status(11), End::Signal(11));
        assert_eq!(End::from_wait_status(6 | 0x80), End::Signal(6));
        assert_eq!(End::from_wait_status(3 << 8), End::Code(3));
        assert_eq!(
            line(42, End::Signal(11)),
            "==42== kal: process 42 died of SIGSEGV before kal could read it: no leak report"
        );
    }

    #[test]
    fn a_killed_child_is_seen_killed_after_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let p = Pending::new(pid, open(pid));
        assert_eq!(p.decide(), Some(None), "alive");
        child.kill().unwrap();
        child.wait().unwrap();
        let end = p.decide().unwrap().unwrap();
        if p.pidfd.is_some() && end != End::Unknown {
            assert_eq!(end, End::Signal(libc::SIGKILL));
        }
    }
}
