//! File descriptors the agent owns inside someone else's process.
//!
//! The program may `dup2` over any descriptor number, or close them all (`closefrom`) and
//! open its own: an agent that kept using a number would then write into, read from,
//! accept on, or close the program's file. So each descriptor the agent keeps is moved to a
//! high number with close-on-exec, its identity (device and inode) is recorded, and every
//! use checks it is still that file; once it is not, the agent forgets the number and
//! never touches it again.

use core::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// Lowest number an agent descriptor is moved to (programs use the low ones).
const HIGH: i32 = 512;

/// One descriptor the agent owns, or none.
pub struct OwnFd {
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat fills a plain struct; a bad descriptor only makes it fail.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl OwnFd {
    /// No descriptor.
    pub const fn none() -> OwnFd {
        OwnFd {
            fd: AtomicI32::new(-1),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }

    /// Takes `fd`: moves it to a high number with close-on-exec (keeping it where it is if
    /// that fails) and records what it is. Returns the number it now has.
    pub fn set(&self, fd: i32) -> i32 {
        // SAFETY: duplicating and closing a descriptor the agent just opened.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH) };
        let fd = if high >= 0 {
            // SAFETY: as above; the duplicate keeps the file open.
            unsafe { libc::close(fd) };
            high
        } else {
            fd
        };
        let (dev, ino) = identity(fd).unwrap_or((0, 0));
        self.dev.store(dev, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Release);
        fd
    }

    /// The descriptor if it is still the agent's file, else -1 (and it is forgotten).
    pub fn get(&self) -> i32 {
        let fd = self.fd.load(Ordering::Acquire);
        if fd < 0 {
            return -1;
        }
        let mine = (
            self.dev.load(Ordering::Relaxed),
            self.ino.load(Ordering::Relaxed),
        );
        if identity(fd) == Some(mine) {
            fd
        } else {
            let _ = self
                .fd
                .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
            -1
        }
    }

    /// The descriptor if it is still the agent's file, else -1; forgotten either way (the
    /// caller now owns it).
    pub fn take(&self) -> i32 {
        let fd = self.get();
        self.fd.store(-1, Ordering::Release);
        fd
    }

    /// Closes the descriptor if it is still the agent's; forgets it either way.
    pub fn close(&self) {
        let fd = self.get();
        self.fd.store(-1, Ordering::Release);
        if fd >= 0 {
            // SAFETY: closing a descriptor just checked to be the agent's own file.
            unsafe { libc::close(fd) };
        }
    }
}

/// Bounds each read on socket `fd` to `ms` milliseconds (`SO_RCVTIMEO`).
pub fn set_read_timeout(fd: i32, ms: u64) {
    let tv = libc::timeval {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
    };
    // SAFETY: setting a receive timeout on a socket from a valid timeval.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            core::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}
