//! Talking to the kal CLI over the unix socket named by `KAL_SOCKET`.
//!
//! At start (and in every fork child) the agent says hello and keeps that connection open,
//! so the CLI knows which processes carry an agent. At exit — after the program's atexit
//! handlers and static destructors — it says it is exiting on a second connection and
//! waits for one byte: the CLI freezes and reads the process meanwhile.
//!
//! That second connection is opened right after the hello, not at exit: by then the
//! process may have given up the right to reach kal's private socket (a daemon's worker
//! that switched to an unprivileged user, as nginx's do, may not enter kal's 0700
//! directory). It stays silent until the exit; a fresh connection is tried only if the
//! program closed it.

use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use kal_proto::{Hello, MsgKind, MAGIC, VERSION};

/// The hello connection, kept open while the process lives.
static HELLO_FD: crate::server::ownfd::OwnFd = crate::server::ownfd::OwnFd::none();
/// The connection the exit is said on, opened with the hello (silent until then).
static EXIT_FD: crate::server::ownfd::OwnFd = crate::server::ownfd::OwnFd::none();
/// The process that said hello on `HELLO_FD` (a `vfork` child shares this memory but not
/// the pid).
static HELLO_PID: AtomicI32 = AtomicI32::new(0);
/// Whether this process has told kal it is exiting (a process ends once).
static EXIT_SENT: AtomicBool = AtomicBool::new(false);
/// Whether kal answers the hello (it traces the process: `KAL_HELLO_ACK`).
static HELLO_ACK: AtomicBool = AtomicBool::new(false);
static mut PATH: [u8; 108] = [0; 108];
static mut PATH_LEN: usize = 0;

fn connect() -> i32 {
    // SAFETY: PATH/PATH_LEN are written once in init before any connect; the sockaddr is a
    // zeroed plain struct filled within its bounds.
    unsafe {
        let len = PATH_LEN;
        if len == 0 {
            return -1;
        }
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return -1;
        }
        let mut addr: libc::sockaddr_un = core::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = &*core::ptr::addr_of!(PATH);
        for (dst, &src) in addr.sun_path.iter_mut().zip(&path[..len]) {
            *dst = src as libc::c_char;
        }
        let alen = core::mem::size_of::<libc::sa_family_t>() + len;
        if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), alen as u32) != 0 {
            libc::close(fd);
            return -1;
        }
        fd
    }
}

fn send(fd: i32, kind: MsgKind) -> bool {
    let msg = Hello {
        magic: MAGIC,
        kind: kind as u32,
        // SAFETY: getpid/gettid have no preconditions.
        pid: unsafe { libc::getpid() } as u32,
        // SAFETY: as above.
        tid: unsafe { libc::gettid() } as u32,
        version: VERSION,
        header_addr: crate::state::header_addr(),
    };
    let b = msg.encode();
    // SAFETY: writing a valid buffer to our own socket.
    let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
    n == b.len() as isize
}

fn hello() {
    let fd = connect();
    if fd >= 0 && !send(fd, MsgKind::Hello) {
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        return;
    }
    if fd >= 0 && HELLO_ACK.load(Ordering::Relaxed) {
        wait_ack(fd);
    }
    if fd >= 0 {
        HELLO_FD.set(fd);
        // SAFETY: getpid has no preconditions.
        HELLO_PID.store(unsafe { libc::getpid() }, Ordering::Release);
        let exit_fd = connect();
        if exit_fd >= 0 {
            EXIT_FD.set(exit_fd);
        }
    }
}

/// Waits (at most `HELLO_ACK_WAIT_MS`) for kal's one byte saying it traces this process
/// now; a slow or absent answer only means a fatal signal soon after may go unreported.
fn wait_ack(fd: i32) {
    crate::server::ownfd::set_read_timeout(fd, kal_proto::HELLO_ACK_WAIT_MS);
    let mut b = [0u8; 1];
    for _ in 0..100 {
        // SAFETY: reading at most one byte into a buffer we own.
        let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, 0) };
        // SAFETY: errno is thread-local.
        if n >= 0 || unsafe { *libc::__errno_location() } != libc::EINTR {
            break;
        }
    }
}

unsafe extern "C" fn before_fork() {
    crate::park::before_fork();
}

unsafe extern "C" fn after_fork_parent() {
    crate::park::after_fork_parent();
}

unsafe extern "C" fn park_child() {
    // The first child handler the agent registers: no agent thread is started before it.
    crate::server::threads::after_fork_child();
    crate::park::after_fork_child();
}

unsafe extern "C" fn after_fork_child() {
    crate::table::resize::after_fork_child();
    // The child's copy of the hello connection (the parent keeps its own), closed only
    // if the program did not put a file of its own at that number meanwhile.
    HELLO_FD.close();
    EXIT_FD.close();
    HELLO_PID.store(0, Ordering::Release);
    EXIT_SENT.store(false, Ordering::Release);
    hello();
    crate::server::start();
}

extern "C" fn remove_socket() {
    crate::server::stop();
}

extern "C" fn at_exit() {
    exit_handshake(true);
}

/// Tells kal that this process is ending (from `_exit`, `_Exit` or `abort`), when it is
/// the process that said hello: a `vfork` or `posix_spawn` child shares the parent's
/// memory, and must not speak for it.
pub fn report_exit(freeres: bool) {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    if HELLO_PID.load(Ordering::Acquire) != me {
        return;
    }
    exit_handshake(freeres);
}

/// The exit handshake, once per process: restore parked pages, run the freeres functions
/// if asked (and safe: [`crate::hooks::ends::freeres`]), say Exit on the exit connection (a fresh
/// one if the program closed it) and wait for kal's byte (kal has then seized every
/// thread and will read the process at `exit_group`). A process that cannot reach kal
/// says so on stderr, in one line.
fn exit_handshake(freeres: bool) {
    if HELLO_FD.get() < 0 || EXIT_SENT.swap(true, Ordering::AcqRel) {
        return;
    }
    // Parked pages go back now: kal reads this process at exit, and the fault handler
    // does not survive exit_group.
    crate::park::shutdown();
    if freeres {
        crate::hooks::ends::freeres();
    }
    let mut fd = EXIT_FD.take();
    if fd < 0 {
        fd = connect();
    }
    if fd < 0 {
        unreachable_at_exit();
        return;
    }
    if send(fd, MsgKind::Exit) {
        let mut b = [0u8; 1];
        loop {
            // SAFETY: reading into a local buffer from our own socket.
            let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
            // SAFETY: errno is thread-local.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            break;
        }
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
}

/// Says on stderr that this process could not reach kal at its exit (its exit connection
/// was closed by the program, and a new one is refused): kal gets no report of it.
fn unreachable_at_exit() {
    let mut buf = [0u8; 20];
    // SAFETY: getpid has no preconditions.
    let pid = crate::diag::decimal(unsafe { libc::getpid() } as u64, &mut buf);
    crate::diag::say(b"kal agent: process ");
    crate::diag::say(pid);
    crate::diag::say(b" cannot reach kal at its exit (its connection was closed and a new one is refused): no leak report\n");
}

/// Reads `KAL_SOCKET`, says hello and arranges the exit handshake. Without `KAL_SOCKET`
/// the agent records allocations but talks to nobody.
pub fn init() {
    // SAFETY: registering plain extern "C" functions with no captured state. The fork
    // handlers run whether or not kal listens: parked pages must never reach a child.
    unsafe {
        libc::atexit(remove_socket);
        libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(park_child));
    }
    crate::hooks::ends::init();
    // SAFETY: getenv with a NUL-terminated name; the value is copied out at once.
    unsafe {
        let v = libc::getenv(c"KAL_SOCKET".as_ptr());
        if v.is_null() {
            return;
        }
        let s = core::ffi::CStr::from_ptr(v).to_bytes();
        if s.is_empty() || s.len() >= 108 {
            return;
        }
        (&mut *core::ptr::addr_of_mut!(PATH))[..s.len()].copy_from_slice(s);
        PATH_LEN = s.len();
    }
    crate::hooks::ends::read_env();
    // SAFETY: getenv with a NUL-terminated name; the value is only looked at here.
    let ack = unsafe { !libc::getenv(c"KAL_HELLO_ACK".as_ptr()).is_null() };
    HELLO_ACK.store(ack, Ordering::Relaxed);
    hello();
    // SAFETY: registering plain extern "C" functions with no captured state.
    unsafe {
        libc::atexit(at_exit);
        libc::pthread_atfork(None, None, Some(after_fork_child));
    }
}
