//! Snapshots made by the agent's own server thread, so that kal injects nothing.
//!
//! kal stops every thread of the process except this one (its id is in the header), then
//! asks for a snapshot. This thread forks the process with a raw `clone` (no shared
//! memory, exit signal 0: the program gets no `SIGCHLD` and its `wait` calls never see the
//! copy), answers with the copy's pid, and waits for the copy to end, reaping it. The copy
//! (only this thread exists in it) does nothing but wait for the connection to close —
//! kal closes it when it has read what it needs, or the kernel does when kal dies — and
//! then exits. So nothing kal started outlives kal, no thread of the program ever runs
//! code it did not run before, and no zombie is left behind.

use kal_proto::ctl::{Response, Status};

/// `__WCLONE`: wait for children whose exit signal is not `SIGCHLD`.
const WCLONE: i32 = 0x8000_0000_u32 as i32;

/// Serves one snapshot request on connection `fd` (the header was already read): answers,
/// then waits until the copy has ended.
pub fn serve(fd: i32) {
    // CLONE_UNTRACED: under `kal run`, which traces this thread with PTRACE_O_TRACECLONE,
    // the clone must not stop for kal's tracer (kal is busy waiting for this answer) nor
    // make the copy a tracee.
    let flags = libc::CLONE_UNTRACED as usize;
    // SAFETY: a raw clone without CLONE_VM is a fork of this process in which only this
    // thread runs; the child below makes raw system calls only (no locks, no allocation).
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid == 0 {
        copy_waits_then_exits(fd);
    }
    if pid < 0 {
        let resp = Response {
            status: Status::Unsupported as u32,
            ..Default::default()
        };
        crate::server::reply(fd, &resp, &[]);
        return;
    }
    let resp = Response {
        status: Status::Ok as u32,
        freed_blocks: pid as u64,
        ..Default::default()
    };
    crate::server::reply(fd, &resp, &[]);
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own clone child.
        let r = unsafe { libc::waitpid(pid as i32, &mut st, WCLONE) };
        // SAFETY: errno is thread-local.
        if r >= 0 || unsafe { *libc::__errno_location() } != libc::EINTR {
            return;
        }
    }
}

/// In the copy: wait until the connection closes (or anything arrives on it), then exit.
fn copy_waits_then_exits(fd: i32) -> ! {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: polling one valid pollfd with no timeout, by raw system call.
        let r = unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1usize, -1) };
        if r != 0 {
            break; // ready, hung up, or an error: the copy's work is over either way
        }
    }
    // SAFETY: ends the copy at once (no atexit handlers, no flushing: they belong to the
    // program); exit_group is the only thing that may run here.
    unsafe { libc::syscall(libc::SYS_exit_group, 0) };
    #[allow(clippy::empty_loop)]
    loop {}
}
