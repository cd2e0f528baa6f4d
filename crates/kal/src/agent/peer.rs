//! Who is on the other end of an agent's connection to `kal run`, as the kernel says.
//!
//! An agent's hello names a process id, but that is the agent's own view: inside a PID
//! namespace (`unshare -p -f`, containers) its `getpid()` is a small number that names a
//! different process in kal's namespace (PID 1 is the host's init), and anyone who can
//! reach the socket can send a hello naming any process. So kal takes the process id from
//! `SO_PEERCRED` (the kernel translates it into kal's namespace), accepts it only for the
//! program it started or one of its descendants, and maps thread ids through the
//! `NSpid:` lines of `/proc/PID/task/*/status`.

use std::os::fd::AsRawFd;

/// The process id (in kal's namespace) of the process that connected `stream`.
pub fn peer_pid(stream: &impl AsRawFd) -> Option<i32> {
    peer_cred(stream).map(|(pid, _)| pid)
}

/// The process id (in kal's namespace) and effective uid of the process on the other end
/// of `stream` (for a listening socket's connection: the process that listened).
pub fn peer_cred(stream: &impl AsRawFd) -> Option<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length on a connected unix socket.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some((cred.pid, cred.uid))
}

/// The parent of process `pid`, from `/proc/PID/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    crate::capture::procfs::stat_field(&stat, 1)?.parse().ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut p = pid;
    for _ in 0..4096 {
        if p == ancestor {
            return true;
        }
        match parent_of(p) {
            Some(q) if q > 0 && q != p => p = q,
            _ => return false,
        }
    }
    false
}

/// The id in kal's namespace of the thread of process `pid` that calls itself `tid` in its
/// own namespace (the same number when they share one).
pub fn host_tid(pid: i32, tid: i32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let Some(host) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let own = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|ids| ids.split_whitespace().last())
            .and_then(|s| s.parse::<i32>().ok());
        if own == Some(tid) {
            return Some(host);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_descends_from_itself_and_its_parent() {
        let me = std::process::id() as i32;
        assert!(descends_from(me, me));
        let parent = parent_of(me).expect("a parent");
        assert!(descends_from(me, parent));
        assert!(!descends_from(parent, me));
    }

    #[test]
    fn peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        assert_eq!(peer_pid(&a), Some(std::process::id() as i32));
    }

    #[test]
    fn thread_ids_map_to_themselves_without_a_namespace() {
        let me = std::process::id() as i32;
        assert_eq!(host_tid(me, me), Some(me));
        assert_eq!(host_tid(me, -5), None);
    }
}
