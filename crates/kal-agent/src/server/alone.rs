//! The agent never keeps a process alive: when every thread of the program has ended (a
//! main thread that called `pthread_exit`, then its last worker), the resizer calls
//! `exit(0)`, which is what glibc does when a process's last thread ends (atexit handlers
//! run, and so does the exit report). Without this, the agent's threads would keep it
//! running forever.
//!
//! The resizer looks every [`LOOK_EVERY`] wake-ups at the thread count in
//! `/proc/self/stat` and, when that is as low as the agent's threads plus one, at the main
//! thread's state (an exited main thread stays listed, as a zombie, until the process
//! ends). Both files are opened once, by the thread that starts the resizer, and re-read
//! with `pread`: an agent thread that opened files as it runs would take the lowest free
//! descriptor numbers, racing with the program's own `dup2` onto them (`EBUSY`).

use crate::server::ownfd::OwnFd;
use core::sync::atomic::AtomicI32;

/// Thread id of the resizer (the agent's other long-lived thread besides the server).
pub static RESIZER_TID: AtomicI32 = AtomicI32::new(0);
/// Thread id of the userfaultfd handler (parked pages), or 0.
pub static HANDLER_TID: AtomicI32 = AtomicI32::new(0);

/// Resizer wake-ups between two looks.
pub const LOOK_EVERY: u32 = 10;

/// `/proc/self/stat`.
static STAT: OwnFd = OwnFd::none();
/// `/proc/self/task/PID/stat`: the main thread's.
static MAIN_STAT: OwnFd = OwnFd::none();

/// Opens the two files (at agent start, and in a fork child before its agent threads
/// start: no other thread of the process runs then).
pub fn init() {
    STAT.close();
    MAIN_STAT.close();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let main = format!("/proc/self/task/{pid}/stat\0");
    for (own, path) in [
        (&STAT, "/proc/self/stat\0".as_bytes()),
        (&MAIN_STAT, main.as_bytes()),
    ] {
        // SAFETY: opening a NUL-terminated path read-only.
        let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 {
            own.set(fd);
        }
    }
}

/// The fields past the command name of the `stat` file `f`, re-read from its start into
/// `buf`.
fn stat_fields<'a>(f: &OwnFd, buf: &'a mut [u8; 512]) -> Option<core::str::SplitWhitespace<'a>> {
    let fd = f.get();
    if fd < 0 {
        return None;
    }
    // SAFETY: reading into our own buffer from our own descriptor.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    let text = core::str::from_utf8(buf.get(..usize::try_from(n).ok()?)?).ok()?;
    Some(text[text.rfind(')')? + 1..].split_whitespace())
}

/// How many threads of the program (not the agent's) the process has, an exited main
/// thread included; `None` when unknown.
pub fn program_threads() -> Option<usize> {
    // Counted at creation, not when they publish their ids: a thread created but not yet
    // running is the agent's too.
    let agent_running = crate::server::threads::live();
    let mut buf = [0u8; 512];
    let threads = stat_fields(&STAT, &mut buf)
        .and_then(|mut f| f.nth(17))
        .and_then(|n| n.parse::<usize>().ok())?;
    threads.checked_sub(agent_running)
}

/// [`program_threads`], given a moment to settle: a thread that has ended stays counted
/// until the kernel has released it, which can be shortly after its `pthread_join`
/// returned (the kernel clears the joined thread id before it releases the thread). When
/// more than one program thread is counted, looks again every millisecond for at most
/// [`SETTLE_MS`].
pub fn program_threads_settled() -> Option<usize> {
    let mut n = program_threads();
    for _ in 0..SETTLE_MS {
        if n.is_none_or(|n| n <= 1) {
            break;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: nanosleep with a valid request and no remainder pointer.
        unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
        n = program_threads();
    }
    n
}

/// Longest wait of [`program_threads_settled`], in milliseconds.
const SETTLE_MS: u32 = 20;

/// Whether only the agent's threads still run in this process.
pub fn only_agent_threads_left() -> bool {
    if program_threads().is_none_or(|n| n > 1) {
        return false; // unknown, or the program has threads besides a main one
    }
    // Left: the agent's threads and the main one. Only an ended main thread counts as gone.
    let mut buf = [0u8; 512];
    stat_fields(&MAIN_STAT, &mut buf)
        .and_then(|mut f| f.next())
        .is_some_and(|state| state == "Z" || state == "X")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_thread_is_not_an_agent_thread() {
        init();
        assert!(!only_agent_threads_left());
    }
}
