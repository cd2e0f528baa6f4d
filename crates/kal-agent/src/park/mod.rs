//! Parking: leaked pages are dropped from memory and their exact bytes kept compressed, to
//! be put back by a userfaultfd handler the moment anything touches them.
//!
//! For each block the CLI names (definitely lost in two checks in a row, still the same
//! allocation, its site not banned), every page covered only by that block and other named
//! blocks (glibc chunk headers included) becomes part of a *run* of at most [`RUN_PAGES`]
//! pages. A run is parked race-free:
//!
//! 1. its range is registered with the userfaultfd (missing and write-protect modes) and
//!    write-protected, so any write by the program from now on stops in the handler;
//! 2. its present pages are copied (through `process_vm_readv`, which fails instead of
//!    faulting if the program unmapped them meanwhile) and compressed into the store;
//! 3. under the lock the handler also takes, unless the handler marked the run touched
//!    (then the copy is dropped and write protection lifted), the pages are dropped with
//!    `MADV_DONTNEED`.
//!
//! The handler thread ([`handler`]) restores a whole run with `UFFDIO_COPY` (all-zero pages
//! with `UFFDIO_ZEROPAGE`) on any fault in it; a fault inside the lost block's own bytes is
//! a *contradiction* (the program had a pointer kal could not see): counted, and the site
//! banned like a contradicted `free`. The block never leaves the allocator or the table.
//!
//! Everything is restored before the program forks (the child would otherwise read zeros:
//! registrations are not inherited) and when it exits (kal reads the process there, and
//! the handler thread is gone once `exit_group` runs).

mod handler;
mod parker;
pub mod runs;
mod store;
mod uffd;

pub use parker::park_blocks;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Most pages in one run (restored together on a fault).
pub const RUN_PAGES: u64 = 256;
const PAGE: u64 = 4096;

/// Parking was never asked for.
pub const IDLE: u32 = 0;
/// Parking works: the handler runs.
pub const ACTIVE: u32 = 1;
/// userfaultfd is not available to the process (see [`NOTE`]).
pub const UNAVAILABLE: u32 = 2;
/// Parking stopped (a failure, or the process is exiting); nothing is parked.
pub const STOPPED: u32 = 3;

/// Why parking is unavailable or stopped: a `Note` code in the low byte, errno above.
pub static NOTE: AtomicU32 = AtomicU32::new(0);
/// One of [`IDLE`], [`ACTIVE`], [`UNAVAILABLE`], [`STOPPED`].
pub static STATE: AtomicU32 = AtomicU32::new(IDLE);
static UFFD: crate::server::ownfd::OwnFd = crate::server::ownfd::OwnFd::none();
static EXACT: AtomicBool = AtomicBool::new(false);
/// Set while the program forks: no run may be parked then.
static FORKING: AtomicBool = AtomicBool::new(false);

/// Bytes parked now.
pub static PARKED: AtomicU64 = AtomicU64::new(0);
/// Bytes parked since the start.
pub static PARKED_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Bytes restored because the program touched them.
pub static RESTORED: AtomicU64 = AtomicU64::new(0);
/// Runs restored because the program touched them.
pub static RESTORES: AtomicU64 = AtomicU64::new(0);
/// Touches of a parked (or parking) block's own bytes.
pub static CONTRADICTIONS: AtomicU64 = AtomicU64::new(0);
/// Runs not parked because the store limit or the span limit was reached.
pub static SKIPPED: AtomicU64 = AtomicU64::new(0);
/// Runs left in place because the program touched them while they were being parked.
pub static RACED: AtomicU64 = AtomicU64::new(0);
/// Test hook (`KAL_TEST_PARK_PAUSE_MS`): the parker waits this long between copying a run
/// and dropping its pages, so that a test can write into that window at will.
static PAUSE_MS: AtomicU64 = AtomicU64::new(0);
/// `KAL_DEBUG_PARK`: the control thread says on stderr when each park request ran.
static DEBUG: AtomicBool = AtomicBool::new(false);

/// Whether `KAL_DEBUG_PARK` is set.
pub fn debug() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Why parking is not available.
#[repr(u32)]
#[derive(Clone, Copy)]
pub enum Note {
    /// No userfaultfd: the syscall and `/dev/userfaultfd` both refused (errno above).
    NoUffd = 1,
    /// The kernel's userfaultfd lacks write protection of anonymous memory.
    NoWriteProtect = 2,
    /// No memory for the agent's parking tables or store.
    NoMemory = 3,
    /// A parked run could not be decompressed: parking stopped.
    Broken = 4,
    /// The process is exiting: everything was restored.
    Exiting = 5,
}

fn set_note(n: Note, errno: i32) {
    NOTE.store(n as u32 | ((errno as u32) << 8), Ordering::Relaxed);
}

/// The userfaultfd (valid while [`STATE`] is [`ACTIVE`]).
fn fd() -> i32 {
    UFFD.get()
}

fn errno() -> i32 {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() }
}

/// A new userfaultfd: from `/dev/userfaultfd` (`dev`, opened and passed by a root kal) if
/// given, else from the syscall. Never `UFFD_USER_MODE_ONLY`: faults taken by the kernel
/// (a `write(2)` from a parked page) must be resolved too.
fn new_uffd(dev: i32) -> Result<i32, i32> {
    let fd = if dev >= 0 {
        // SAFETY: USERFAULTFD_IOC_NEW on the device takes the new descriptor's flags.
        unsafe { libc::ioctl(dev, uffd::IOC_NEW as libc::c_ulong, libc::O_CLOEXEC) }
    } else {
        // SAFETY: the userfaultfd syscall takes only flags.
        unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32 }
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// Makes parking ready (once): a userfaultfd with write protection, the tables, the store
/// and the handler thread. `dev` is a descriptor of `/dev/userfaultfd` or -1.
pub fn ensure(dev: i32) -> Result<(), u32> {
    match STATE.load(Ordering::Acquire) {
        ACTIVE => return Ok(()),
        STOPPED => return Err(NOTE.load(Ordering::Relaxed)),
        UNAVAILABLE if dev < 0 => return Err(NOTE.load(Ordering::Relaxed)),
        _ => {}
    }
    let want = uffd::FEATURE_PAGEFAULT_FLAG_WP
        | uffd::FEATURE_EVENT_REMAP
        | uffd::FEATURE_EVENT_UNMAP
        | uffd::FEATURE_EXACT_ADDRESS;
    let mut made = None;
    for features in [want, want & !uffd::FEATURE_EXACT_ADDRESS] {
        let fd = match new_uffd(dev).or_else(|e| if dev >= 0 { new_uffd(-1) } else { Err(e) }) {
            Ok(fd) => fd,
            Err(e) => {
                set_note(Note::NoUffd, e);
                STATE.store(UNAVAILABLE, Ordering::Release);
                return Err(NOTE.load(Ordering::Relaxed));
            }
        };
        match uffd::api(fd, features) {
            Ok(got) if got & uffd::FEATURE_PAGEFAULT_FLAG_WP != 0 => {
                made = Some((fd, features));
                break;
            }
            r => {
                let e = r.err().unwrap_or(libc::EINVAL);
                // SAFETY: closing the descriptor just made.
                unsafe { libc::close(fd) };
                set_note(Note::NoWriteProtect, e);
            }
        }
    }
    let Some((fd, features)) = made else {
        STATE.store(UNAVAILABLE, Ordering::Release);
        return Err(NOTE.load(Ordering::Relaxed));
    };
    if !runs::init() || !store::init() || !parker::init() || !handler::init() {
        // SAFETY: closing our own descriptor; nothing was registered with it.
        unsafe { libc::close(fd) };
        set_note(Note::NoMemory, 0);
        STATE.store(UNAVAILABLE, Ordering::Release);
        return Err(NOTE.load(Ordering::Relaxed));
    }
    RUNS_READY.store(true, Ordering::Release);
    // SAFETY: getenv with NUL-terminated names; the values are parsed at once.
    unsafe {
        DEBUG.store(
            !libc::getenv(c"KAL_DEBUG_PARK".as_ptr()).is_null(),
            Ordering::Relaxed,
        );
        let v = libc::getenv(c"KAL_TEST_PARK_PAUSE_MS".as_ptr());
        if !v.is_null() {
            let ms = core::ffi::CStr::from_ptr(v)
                .to_bytes()
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .fold(0u64, |a, c| a * 10 + (c - b'0') as u64);
            PAUSE_MS.store(ms.min(10_000), Ordering::Relaxed);
        }
    }
    EXACT.store(
        features & uffd::FEATURE_EXACT_ADDRESS != 0,
        Ordering::Relaxed,
    );
    UFFD.set(fd);
    if !handler::start() {
        UFFD.close();
        set_note(Note::NoMemory, 0);
        STATE.store(UNAVAILABLE, Ordering::Release);
        return Err(NOTE.load(Ordering::Relaxed));
    }
    NOTE.store(0, Ordering::Relaxed);
    STATE.store(ACTIVE, Ordering::Release);
    Ok(())
}

/// Restores every parked run (the lock held).
fn restore_all(l: &mut runs::Locked) {
    for i in 0..l.high() {
        if l.run(i).state == runs::PARKED {
            handler::restore(l, i, false);
        }
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (0 if unknown), read without allocating.
fn mem_available() -> u64 {
    let mut buf = [0u8; 4096];
    // SAFETY: open/read/close of a proc file into a stack buffer.
    let n = unsafe {
        let fd = libc::open(c"/proc/meminfo".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let text = &buf[..n.max(0) as usize];
    let key = b"MemAvailable:";
    let Some(at) = text.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    let kib = text[at + key.len()..]
        .iter()
        .skip_while(|c| **c == b' ')
        .take_while(|c| c.is_ascii_digit())
        .fold(0u64, |v, c| v * 10 + (c - b'0') as u64);
    kib * 1024
}

/// At exit: restores everything (kal reads the process at exit, and the handler thread
/// does not survive `exit_group`), unregisters every span and parks nothing again. When
/// restoring would take more than half the memory available, the parked pages are left
/// as zeros instead of risking the OOM killer: only the exit path's own code (after kal's
/// exit handler: other libraries' late destructors) could still read them.
pub fn shutdown() {
    if STATE.load(Ordering::Acquire) != ACTIVE {
        return;
    }
    let mut l = runs::lock();
    set_note(Note::Exiting, 0);
    STATE.store(STOPPED, Ordering::Release);
    let avail = mem_available();
    if avail == 0 || PARKED.load(Ordering::Relaxed) <= avail / 2 {
        restore_all(&mut l);
    }
    let fd = fd();
    let n = l.nspans();
    for k in 0..n {
        if let Some((a, b)) = l.spans().nth(k) {
            let _ = uffd::unregister(fd, a, b - a);
        }
    }
    l.clear_spans();
}

/// `pthread_atfork` prepare: the child would read parked pages as zeros (it does not
/// inherit the registrations), so restore them all first.
pub fn before_fork() {
    if STATE.load(Ordering::Acquire) != ACTIVE {
        return;
    }
    let mut l = runs::lock();
    FORKING.store(true, Ordering::Release);
    restore_all(&mut l);
}

/// `pthread_atfork` parent: parking may go on.
pub fn after_fork_parent() {
    FORKING.store(false, Ordering::Release);
}

/// `pthread_atfork` child: the parent's parking is not the child's; start afresh.
pub fn after_fork_child() {
    FORKING.store(false, Ordering::Release);
    UFFD.close();
    runs::reset();
    store::reset();
    STATE.store(IDLE, Ordering::Release);
    NOTE.store(0, Ordering::Relaxed);
    for c in [
        &PARKED,
        &PARKED_TOTAL,
        &RESTORED,
        &RESTORES,
        &CONTRADICTIONS,
        &SKIPPED,
        &RACED,
    ] {
        c.store(0, Ordering::Relaxed);
    }
}

/// The counters, for the stats request.
pub fn stats() -> kal_proto::ctl::ParkStats {
    let (runs_now, spans) = if RUNS_READY.load(Ordering::Acquire) {
        let mut l = runs::lock();
        let n = (0..l.high())
            .filter(|&i| l.run(i).state == runs::PARKED)
            .count();
        (n as u64, l.nspans() as u64)
    } else {
        (0, 0)
    };
    kal_proto::ctl::ParkStats {
        state: STATE.load(Ordering::Acquire),
        note: NOTE.load(Ordering::Relaxed),
        parked_bytes: PARKED.load(Ordering::Relaxed),
        parked_total: PARKED_TOTAL.load(Ordering::Relaxed),
        restored_bytes: RESTORED.load(Ordering::Relaxed),
        restores: RESTORES.load(Ordering::Relaxed),
        contradictions: CONTRADICTIONS.load(Ordering::Relaxed),
        store_bytes: store::BYTES.load(Ordering::Relaxed),
        runs: runs_now,
        spans,
        skipped: SKIPPED.load(Ordering::Relaxed),
        raced: RACED.load(Ordering::Relaxed),
    }
}

/// Whether the run tables exist (parking was set up once).
static RUNS_READY: AtomicBool = AtomicBool::new(false);

/// Whether all of `page` is zero.
fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 words (align_to keeps alignment).
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}
