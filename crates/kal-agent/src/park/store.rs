//! The compressed store: a memfd (`kal-park`), written with `pwrite` and read with
//! `pread`, never mapped — so its bytes, which hold the parked blocks' pointers, are never
//! part of the process's memory that kal scans, and count against the store limit rather
//! than the program's RSS. Each run gets whole pages at the end of the file; a restored
//! run's pages are punched out (`FALLOC_FL_PUNCH_HOLE`), so the file stays sparse.

use core::sync::atomic::{AtomicU64, Ordering};

static FD: crate::server::ownfd::OwnFd = crate::server::ownfd::OwnFd::none();
static END: AtomicU64 = AtomicU64::new(0);
/// Bytes the store holds now (whole pages).
pub static BYTES: AtomicU64 = AtomicU64::new(0);

/// Creates the store; false if the kernel refuses.
pub fn init() -> bool {
    if FD.get() >= 0 {
        return true;
    }
    // SAFETY: memfd_create with a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"kal-park".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    FD.set(fd);
    true
}

/// Forgets the store without touching it (a fork child shares the parent's file).
pub fn reset() {
    FD.close();
    END.store(0, Ordering::Release);
    BYTES.store(0, Ordering::Release);
}

fn round(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Writes `data`; returns `(offset, extent)`, or `None` if the write failed.
pub fn put(data: &[u8]) -> Option<(u64, u64)> {
    let fd = FD.get();
    if fd < 0 {
        return Default::default();
    }
    let alloc = round(data.len() as u64).max(4096);
    let off = END.fetch_add(alloc, Ordering::AcqRel);
    let mut done = 0usize;
    while done < data.len() {
        // SAFETY: writing from our own buffer into our own file.
        let n = unsafe {
            libc::pwrite(
                fd,
                data[done..].as_ptr().cast(),
                data.len() - done,
                (off + done as u64) as i64,
            )
        };
        if n <= 0 {
            drop_extent(off, alloc);
            return None;
        }
        done += n as usize;
    }
    BYTES.fetch_add(alloc, Ordering::Relaxed);
    Some((off, alloc))
}

/// Reads `out.len()` bytes at `off`; false on a short read.
pub fn get(off: u64, out: &mut [u8]) -> bool {
    let fd = FD.get();
    if fd < 0 {
        return Default::default();
    }
    let mut done = 0usize;
    while done < out.len() {
        // SAFETY: reading from our own file into our own buffer.
        let n = unsafe {
            libc::pread(
                fd,
                out[done..].as_mut_ptr().cast(),
                out.len() - done,
                (off + done as u64) as i64,
            )
        };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

fn drop_extent(off: u64, alloc: u64) {
    // SAFETY: punching a hole in our own file.
    unsafe {
        libc::fallocate(
            FD.get(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            alloc as i64,
        )
    };
}

/// Gives an extent made by [`put`] back.
pub fn free(off: u64, alloc: u64) {
    drop_extent(off, alloc);
    BYTES.fetch_sub(alloc, Ordering::Relaxed);
}
