//! The agent's control socket: `/tmp/kal-UID/agent-PID.sock`, served by one thread. UID is
//! the process's effective uid when the socket was made; a process that switches users
//! (`setuid` and its kin, see [`crate::hooks::pause`]) gets a new socket in its new user's
//! directory, where kal looks for it.
//!
//! The directory must be a real directory owned by us with mode 0700 (created so if
//! missing), or the agent serves nothing. Each connection is checked with `SO_PEERCRED`
//! (same uid, or root), reads are bounded in size and time, and a request that does not
//! decode is refused without touching anything. Requests that act on the process (reclaim,
//! park, trim, snapshot) are served only to a peer that could ptrace it ([`could_ptrace`]);
//! others get [`Status::Denied`].

pub mod alone;
pub mod control;
pub mod ownfd;
pub mod reclaim;
pub mod snapshot;
pub mod threads;

use crate::hooks::real;
use crate::{park, state};
use core::sync::atomic::Ordering;
use kal_proto::ctl::{decode_entry, Op, ReqHeader, Response, Status, ENTRY_SIZE, REQ_HEADER_SIZE};

/// The listening socket.
static LISTEN_FD: crate::server::ownfd::OwnFd = crate::server::ownfd::OwnFd::none();
static mut PATH: [u8; 108] = [0; 108];

/// Writes `/tmp/kal-UID` into `buf` (NUL-terminated); returns its length.
fn dir_path(buf: &mut [u8; 108]) -> usize {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut n = 0;
    for &c in b"/tmp/kal-" {
        buf[n] = c;
        n += 1;
    }
    n += write_num(&mut buf[n..], uid as u64);
    buf[n] = 0;
    n
}

fn write_num(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut k = 0;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        v /= 10;
        k += 1;
        if v == 0 {
            break;
        }
    }
    for i in 0..k {
        out[i] = digits[k - 1 - i];
    }
    k
}

/// A private directory for our sockets: ours, a directory, mode 0700.
fn private_dir(dir: &[u8; 108]) -> bool {
    // SAFETY: dir is NUL-terminated; stat fills a plain struct.
    unsafe {
        let p = dir.as_ptr().cast();
        libc::mkdir(p, 0o700);
        let mut st: libc::stat = core::mem::zeroed();
        if libc::lstat(p, &mut st) != 0 {
            return false;
        }
        st.st_mode & libc::S_IFMT == libc::S_IFDIR
            && st.st_uid == libc::geteuid()
            && st.st_mode & 0o077 == 0
    }
}

/// Binds the socket and starts the serving thread (in a fork child too).
pub fn start() {
    let mut dir = [0u8; 108];
    let n = dir_path(&mut dir);
    if !private_dir(&dir) {
        return;
    }
    // SAFETY: PATH is only written here, by the thread starting the server (init or the
    // fork child's only thread).
    let path = unsafe { &mut *core::ptr::addr_of_mut!(PATH) };
    path[..n].copy_from_slice(&dir[..n]);
    let mut k = n;
    for &c in b"/agent-" {
        path[k] = c;
        k += 1;
    }
    // SAFETY: getpid has no preconditions.
    k += write_num(&mut path[k..], unsafe { libc::getpid() } as u64);
    for &c in b".sock" {
        path[k] = c;
        k += 1;
    }
    path[k] = 0;
    // SAFETY: plain socket calls on our own fd and a zeroed sockaddr filled within bounds.
    unsafe {
        libc::unlink(path.as_ptr().cast());
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut addr: libc::sockaddr_un = core::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, &s) in addr.sun_path.iter_mut().zip(&path[..k]) {
            *d = s as libc::c_char;
        }
        let alen = core::mem::size_of::<libc::sa_family_t>() + k;
        if libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), alen as u32) != 0
            || libc::listen(fd, 8) != 0
        {
            libc::close(fd);
            return;
        }
        // A fork child's copy of the parent's socket, if still ours, goes first.
        LISTEN_FD.close();
        LISTEN_FD.set(fd);
    }
    spawn_server();
}

/// Removes the socket file (the serving thread is stopped: [`crate::hooks::pause`], before a
/// call that may change the process's user). The listening socket stays open until
/// [`restart`].
pub fn remove_socket_file() {
    // SAFETY: PATH is NUL-terminated (or empty) and ours; the serving thread is stopped
    // (the caller waited until it was gone), and only the pausing thread touches PATH.
    unsafe {
        let path = &*core::ptr::addr_of!(PATH);
        if path[0] != 0 {
            libc::unlink(path.as_ptr().cast());
        }
    }
}

/// After a call that may have changed the process's user ([`crate::hooks::pause`]): a new
/// socket, made as the process now is, in its user's directory (where kal looks for it,
/// and listened on by that user, whom kal believes), and a serving thread on it.
pub fn restart() {
    LISTEN_FD.close();
    start();
}

/// Starts the serving thread again on the same socket (after [`crate::hooks::pause`]).
pub fn resume() {
    if listening() {
        spawn_server();
    }
}

/// Whether the agent still owns its listening socket (so a serving thread runs, or is
/// about to).
pub fn listening() -> bool {
    LISTEN_FD.get() >= 0
}

/// Wakes the serving thread from its `poll` by connecting to the socket (the connection
/// is served, as an empty request, once the thread runs again).
pub fn wake() {
    // SAFETY: PATH is NUL-terminated (or empty) and ours; plain socket calls on our own
    // descriptor, closed before returning.
    unsafe {
        let path = &*core::ptr::addr_of!(PATH);
        let n = path.iter().position(|&c| c == 0).unwrap_or(0);
        if n == 0 {
            return;
        }
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return;
        }
        let mut addr: libc::sockaddr_un = core::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, &s) in addr.sun_path.iter_mut().zip(&path[..n]) {
            *d = s as libc::c_char;
        }
        let alen = core::mem::size_of::<libc::sa_family_t>() + n;
        libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), alen as u32);
        libc::close(fd);
    }
}

fn spawn_server() {
    // Its own stack, named in the header: the addresses it handles (reclaim requests)
    // must not linger where a scan would take them for the program's pointers.
    let stack = server_stack();
    let on = if stack.is_null() {
        crate::server::threads::Stack::Sized(SERVER_STACK)
    } else {
        crate::server::threads::Stack::Own(stack, SERVER_STACK)
    };
    crate::server::threads::spawn(serve, on);
}

/// Size of the server thread's stack.
const SERVER_STACK: usize = 256 * 1024;

/// A stack for the server thread (mapped once; a fork child reuses its copy, as only
/// the forking thread runs there), or null.
fn server_stack() -> *mut libc::c_void {
    static STACK: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
    let mut p = STACK.load(Ordering::Acquire);
    if p == 0 {
        // Fenced by inaccessible pages: merged with a neighbouring thread stack, it would
        // make the CLI take that stack for part of this thread's (and skip its contents).
        let m = crate::mem::map(SERVER_STACK, b"kal-server-stack\0");
        if m.is_null() {
            return core::ptr::null_mut();
        }
        p = m as usize;
        STACK.store(p, Ordering::Release);
        state::set_server_stack(p as u64, SERVER_STACK as u64);
    }
    p as *mut libc::c_void
}

/// Removes the socket file (at exit).
pub fn stop() {
    // SAFETY: PATH is NUL-terminated (or empty) and ours.
    unsafe {
        let path = &*core::ptr::addr_of!(PATH);
        if path[0] != 0 {
            libc::unlink(path.as_ptr().cast());
        }
    }
}

extern "C" fn serve(_: *mut libc::c_void) -> *mut libc::c_void {
    // This thread's own allocations (request lists, lz4's table) pass through untracked.
    crate::hooks::guard::enter_agent();
    // SAFETY: gettid has no preconditions.
    state::set_server_tid(unsafe { libc::gettid() } as u64);
    loop {
        // Never accept on a number the program reused for a file of its own.
        let lfd = LISTEN_FD.get();
        if lfd < 0 || crate::hooks::pause::stopping() {
            state::set_server_tid(0);
            return core::ptr::null_mut();
        }
        // Wait with poll, not in accept: a blocked accept holds the lowest free descriptor
        // number reserved, and the program's own dup2 onto it fails with EBUSY.
        let mut p = libc::pollfd {
            fd: lfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd with no timeout.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            continue; // EINTR
        }
        if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            || crate::hooks::pause::stopping()
        {
            state::set_server_tid(0);
            return core::ptr::null_mut();
        }
        // SAFETY: accepting on our own listening socket, without waiting.
        let low = unsafe {
            libc::accept4(
                lfd,
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if low < 0 {
            continue; // nobody after all (EAGAIN), or the client gave up
        }
        // The connection leaves the low numbers at once, and blocks again for the reads.
        // SAFETY: duplicating and closing the descriptor just accepted.
        let fd = unsafe {
            let high = libc::fcntl(low, libc::F_DUPFD_CLOEXEC, 512);
            if high >= 0 {
                libc::close(low);
                high
            } else {
                low
            }
        };
        // SAFETY: clearing O_NONBLOCK on our own descriptor (timeouts bound its reads).
        unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
        if let Some(cred) = peer_allowed(fd) {
            start_deadline();
            handle(fd, could_ptrace(&cred));
        }
        // SAFETY: closing the accepted connection.
        unsafe { libc::close(fd) };
    }
}

/// The peer's credentials if it may talk to us at all (same uid, or root).
fn peer_allowed(fd: i32) -> Option<libc::ucred> {
    // SAFETY: getsockopt fills a plain ucred of the given size; timeouts on our own fd.
    unsafe {
        let mut cred: libc::ucred = core::mem::zeroed();
        let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        let tvp = (&tv as *const libc::timeval).cast();
        let tvl = core::mem::size_of::<libc::timeval>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tvp, tvl);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvl);
        (cred.uid == 0 || cred.uid == libc::geteuid()).then_some(cred)
    }
}

/// Whether the peer could ptrace this process, as the kernel would decide for an ordinary
/// user: root, or a peer whose uid is our real, effective and saved uid and whose gid is
/// our real, effective and saved gid, while we are dumpable (`PR_GET_DUMPABLE` is 1). A
/// same-uid peer of a process that made itself non-dumpable, or changed ids (setuid
/// programs), may not make it free, park or trim memory, nor fork a copy of it.
fn could_ptrace(cred: &libc::ucred) -> bool {
    if cred.uid == 0 {
        return true;
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: getresuid/getresgid fill three plain integers each; prctl(PR_GET_DUMPABLE)
    // takes no pointer.
    unsafe {
        if libc::getresuid(&mut r, &mut e, &mut s) != 0
            || libc::getresgid(&mut rg, &mut eg, &mut sg) != 0
        {
            return false;
        }
        if libc::prctl(libc::PR_GET_DUMPABLE) != 1 {
            return false;
        }
    }
    [r, e, s].iter().all(|&u| u == cred.uid) && [rg, eg, sg].iter().all(|&g| g == cred.gid)
}

/// Longest a client may take to send its whole request: one slow client must not hold
/// the agent's only serving loop (each read is also bounded, to 2 s).
const REQUEST_DEADLINE_MS: i64 = 10_000;

/// When the current connection's request must be in, in `CLOCK_MONOTONIC` milliseconds.
static DEADLINE_MS: core::sync::atomic::AtomicI64 = core::sync::atomic::AtomicI64::new(0);

fn now_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills a plain struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Starts the request deadline of a new connection.
fn start_deadline() {
    DEADLINE_MS.store(now_ms() + REQUEST_DEADLINE_MS, Ordering::Relaxed);
}

/// Bounds the next read on `fd` by what is left of the request deadline (at most 2 s);
/// false once it has passed.
fn arm_read(fd: i32) -> bool {
    let left = DEADLINE_MS.load(Ordering::Relaxed) - now_ms();
    if left <= 0 {
        return false;
    }
    crate::server::ownfd::set_read_timeout(fd, left.min(2000) as u64);
    true
}

fn read_full(fd: i32, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if !arm_read(fd) {
            return false;
        }
        // SAFETY: reading into the unfilled tail of our buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n <= 0 {
            // SAFETY: errno is thread-local.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return false;
        }
        got += n as usize;
    }
    true
}

fn write_full(fd: i32, buf: &[u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writing our own buffer to our own socket.
        let n = unsafe {
            libc::send(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return;
        }
        done += n as usize;
    }
}

/// Writes a response and, for a reclaim, its bitmap.
pub(crate) fn reply(fd: i32, r: &Response, bitmap: &[u8]) {
    write_full(fd, &r.encode());
    write_full(fd, bitmap);
}

/// Reads the request header, and a descriptor passed with it (`SCM_RIGHTS`), if any.
fn read_header(fd: i32, hb: &mut [u8; REQ_HEADER_SIZE]) -> Option<i32> {
    let mut passed = -1;
    let mut got = 0;
    while got < hb.len() {
        if !arm_read(fd) {
            close_fd(passed);
            return None;
        }
        let mut cbuf = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: hb[got..].as_mut_ptr().cast(),
            iov_len: hb.len() - got,
        };
        // SAFETY: a zeroed msghdr pointing at our own buffers, sized as given.
        let n = unsafe {
            let mut m: libc::msghdr = core::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf.as_mut_ptr().cast();
            m.msg_controllen = core::mem::size_of_val(&cbuf);
            let n = libc::recvmsg(fd, &mut m, libc::MSG_CMSG_CLOEXEC);
            if n > 0 {
                let mut c = libc::CMSG_FIRSTHDR(&m);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let nfd = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                        let data = libc::CMSG_DATA(c) as *const i32;
                        for k in 0..nfd {
                            let f = data.add(k).read_unaligned();
                            if passed < 0 {
                                passed = f;
                            } else {
                                libc::close(f);
                            }
                        }
                    }
                    c = libc::CMSG_NXTHDR(&m, c);
                }
            }
            n
        };
        if n <= 0 {
            if n < 0 && park_errno() == libc::EINTR {
                continue;
            }
            close_fd(passed);
            return None;
        }
        got += n as usize;
    }
    Some(passed)
}

fn park_errno() -> i32 {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() }
}

fn close_fd(fd: i32) {
    if fd >= 0 {
        // SAFETY: closing a descriptor we were passed and own.
        unsafe { libc::close(fd) };
    }
}

/// Reads `count` entries of a reclaim or park request; `None` if cut short.
fn read_entries(fd: i32, count: usize) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(count);
    let mut chunk = [0u8; ENTRY_SIZE * 256];
    let mut ok = true;
    while out.len() < count {
        let n = (count - out.len()).min(256);
        if !read_full(fd, &mut chunk[..n * ENTRY_SIZE]) {
            ok = false;
            break;
        }
        for e in chunk[..n * ENTRY_SIZE].chunks_exact(ENTRY_SIZE) {
            let mut b = [0u8; ENTRY_SIZE];
            b.copy_from_slice(e);
            out.push(decode_entry(&b));
        }
    }
    chunk.fill(0);
    ok.then_some(out)
}

fn handle(fd: i32, may_act: bool) {
    let mut hb = [0u8; REQ_HEADER_SIZE];
    let Some(passed) = read_header(fd, &mut hb) else {
        return;
    };
    handle_request(fd, &hb, passed, may_act);
    close_fd(passed);
}

/// Serves one request; `may_act` says whether the peer could ptrace us (only stats are
/// served otherwise).
fn handle_request(fd: i32, hb: &[u8; REQ_HEADER_SIZE], passed: i32, may_act: bool) {
    let h = match ReqHeader::decode(hb) {
        Ok(h) => h,
        Err(_) => {
            return reply(
                fd,
                &Response {
                    status: Status::BadRequest as u32,
                    ..Default::default()
                },
                &[],
            )
        }
    };
    if !may_act && h.op != Op::Stats {
        // Entries that follow are never read: nothing of the request is acted on.
        return reply(
            fd,
            &Response {
                status: Status::Denied as u32,
                ..Default::default()
            },
            &[],
        );
    }
    let Some(r) = real::get() else { return };
    match h.op {
        Op::Snapshot => crate::server::snapshot::serve(fd),
        Op::Trim => {
            let released = crate::trim();
            let status = if released.is_some() {
                Status::Ok
            } else {
                Status::Unsupported
            };
            let resp = Response {
                status: status as u32,
                freed_blocks: released.unwrap_or(false) as u64,
                ..Default::default()
            };
            reply(fd, &resp, &[]);
        }
        Op::Reclaim => {
            let Some(t) = state::tables() else { return };
            let mut resp = Response::default();
            let mut bitmap = vec![0u8; (h.count as usize).div_ceil(8)];
            let mut chunk = [0u8; ENTRY_SIZE * 256];
            let mut done = 0usize;
            while done < h.count as usize {
                let n = (h.count as usize - done).min(256);
                if !read_full(fd, &mut chunk[..n * ENTRY_SIZE]) {
                    break; // truncated: what was freed stays freed, the rest is untouched
                }
                for i in 0..n {
                    let mut e = [0u8; ENTRY_SIZE];
                    e.copy_from_slice(&chunk[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE]);
                    let (addr, seq) = decode_entry(&e);
                    match reclaim::reclaim_one(t, addr, seq, r.free) {
                        reclaim::Outcome::Freed(bytes) => {
                            resp.freed_blocks += 1;
                            resp.freed_bytes += bytes;
                            bitmap[(done + i) / 8] |= 1 << ((done + i) % 8);
                        }
                        reclaim::Outcome::Stale => resp.stale += 1,
                        reclaim::Outcome::Banned => resp.banned += 1,
                    }
                }
                done += n;
            }
            // Leave no block addresses behind on this thread's stack.
            chunk.fill(0);
            if resp.freed_blocks > 0 {
                crate::trim();
            }
            publish();
            reply(fd, &resp, &bitmap);
        }
        Op::Park => {
            let Some(t) = state::tables() else { return };
            let Some(mut entries) = read_entries(fd, h.count as usize) else {
                return; // truncated: nothing was parked
            };
            if let Err(note) = park::ensure(passed) {
                let resp = Response {
                    status: Status::Unsupported as u32,
                    note,
                    ..Default::default()
                };
                entries.iter_mut().for_each(|e| *e = (0, 0));
                return reply(fd, &resp, &[]);
            }
            let mut pages = vec![0u32; entries.len()];
            let (t0, cpu0) = (now(), thread_cpu());
            // Parking takes up to a second of CPU a gigabyte, next to the program's own
            // threads: at nice 10 (a tenth of a shared CPU's weight) the program keeps its
            // CPU where they share one, and parking still advances when every CPU is busy
            // (at nice 19 it starved for minutes). The priority comes back afterwards
            // where the kernel lets it (root).
            // SAFETY: get/setpriority on this thread only (PRIO_PROCESS with a thread id).
            let me = unsafe { libc::gettid() } as libc::id_t;
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, me) };
            // SAFETY: as above.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, me, nice.max(10)) };
            let c = park::park_blocks(t, &entries, h.arg, &mut pages);
            // SAFETY: as above.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, me, nice) };
            if park::debug() {
                // (This thread's allocations pass through untracked.)
                let msg = format!(
                    "kal agent: park request of {} blocks ran from {:.6} to {:.6} (unix s), {:.1} ms of CPU\n",
                    entries.len(),
                    t0,
                    now(),
                    (thread_cpu() - cpu0) * 1e3
                );
                crate::diag::say(msg.as_bytes());
            }
            // Leave no block addresses behind in this thread's memory.
            entries.iter_mut().for_each(|e| *e = (0, 0));
            drop(entries);
            let resp = Response {
                status: Status::Ok as u32,
                freed_blocks: c.blocks,
                freed_bytes: c.bytes,
                stale: c.stale,
                banned: c.banned,
                skipped: c.skipped,
                note: park::NOTE.load(Ordering::Relaxed),
            };
            let mut out = Vec::with_capacity(pages.len() * 4);
            for p in &pages {
                out.extend_from_slice(&p.to_le_bytes());
            }
            publish();
            reply(fd, &resp, &out);
        }
        Op::Detach => {
            let attached = crate::attach::attach_mode()
                && crate::attach::KAL_ATTACH_STATE.load(Ordering::Acquire) == 1;
            if attached {
                crate::attach::detach();
            }
            let resp = Response {
                status: Status::Ok as u32,
                freed_blocks: attached as u64,
                ..Default::default()
            };
            reply(fd, &resp, &[]);
            if attached {
                crate::hooks::pause::stop_for_detach();
            }
        }
        Op::Stats => {
            publish();
            let st = park::stats();
            let resp = Response {
                status: Status::Ok as u32,
                note: st.note,
                ..Default::default()
            };
            reply(fd, &resp, &st.encode());
        }
    }
}

fn clock(id: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Seconds since the epoch.
fn now() -> f64 {
    clock(libc::CLOCK_REALTIME)
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Publishes the reclaim counters and banned sites to the header (under the parking
/// lock, which the fault handler holds when it bans a site).
fn publish() {
    let _l = park::runs::lock();
    state::publish_reclaim();
}
