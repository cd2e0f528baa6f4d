//! The userfaultfd interface, as far as parking needs it: structures and ioctl numbers of
//! `<linux/userfaultfd.h>` (the installed header predates some features the kernel has),
//! each call a thin wrapper that returns the kernel's verdict.

/// `_IOWR(0xAA, nr, size)`.
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}

/// `_IOR(0xAA, nr, size)`.
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: a new userfaultfd for the caller's memory.
pub const IOC_NEW: u64 = 0xAA00;
const API: u64 = iowr(0x3F, 24);
const REGISTER: u64 = iowr(0x00, 32);
const UNREGISTER: u64 = ior(0x01, 16);
const WAKE: u64 = ior(0x02, 16);
const COPY: u64 = iowr(0x03, 40);
const ZEROPAGE: u64 = iowr(0x04, 32);
const WRITEPROTECT: u64 = iowr(0x06, 24);

/// Faults tell whether they are write-protect faults.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `mremap` keeps the registration and tells the handler where the range went.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `munmap` of a registered range is told to the handler.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Fault addresses are exact, not rounded down to the page.
pub const FEATURE_EXACT_ADDRESS: u64 = 1 << 11;

/// Register for faults on missing pages.
pub const MODE_MISSING: u64 = 1 << 0;
/// Register for faults on write-protected pages.
pub const MODE_WP: u64 = 1 << 1;

/// Event: a page fault.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// Event: a registered range moved (`mremap`).
pub const EVENT_REMAP: u8 = 0x14;
/// Event: a registered range was unmapped.
pub const EVENT_UNMAP: u8 = 0x16;
/// Page fault flag: the fault is a write-protect fault.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// One message read from a userfaultfd (`struct uffd_msg`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    r1: u8,
    r2: u16,
    r3: u32,
    /// Page fault: flags. Remap: from. Unmap: start.
    pub a: u64,
    /// Page fault: address. Remap: to. Unmap: end.
    pub b: u64,
    /// Remap: length.
    pub c: u64,
}

/// Size of a [`Msg`] as the kernel writes it.
pub const MSG_SIZE: usize = core::mem::size_of::<Msg>();
const _: () = assert!(MSG_SIZE == 32);

fn ioctl(fd: i32, req: u64, arg: *mut u64) -> Result<(), i32> {
    // SAFETY: every caller passes a userfaultfd request with a pointer to a structure of
    // the size encoded in `req`, owned by the caller for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: errno is thread-local.
        Err(unsafe { *libc::__errno_location() })
    }
}

/// Enables the API with `features`; returns the features the kernel granted.
pub fn api(fd: i32, features: u64) -> Result<u64, i32> {
    let mut a = [0xAA, features, 0];
    ioctl(fd, API, a.as_mut_ptr())?;
    Ok(a[1])
}

/// Registers `[start, start + len)` in `mode`.
pub fn register(fd: i32, start: u64, len: u64, mode: u64) -> Result<(), i32> {
    let mut r = [start, len, mode, 0];
    ioctl(fd, REGISTER, r.as_mut_ptr())
}

/// Unregisters `[start, start + len)`.
pub fn unregister(fd: i32, start: u64, len: u64) -> Result<(), i32> {
    let mut r = [start, len];
    ioctl(fd, UNREGISTER, r.as_mut_ptr())
}

/// Wakes threads waiting on faults in `[start, start + len)`.
pub fn wake(fd: i32, start: u64, len: u64) -> Result<(), i32> {
    let mut r = [start, len];
    ioctl(fd, WAKE, r.as_mut_ptr())
}

/// Fills missing pages `[dst, dst + len)` with the bytes at `src` (and wakes waiters).
pub fn copy(fd: i32, dst: u64, src: u64, len: u64) -> Result<(), i32> {
    let mut r = [dst, src, len, 0, 0];
    ioctl(fd, COPY, r.as_mut_ptr())
}

/// Maps the zero page at missing pages `[start, start + len)` (and wakes waiters).
pub fn zeropage(fd: i32, start: u64, len: u64) -> Result<(), i32> {
    let mut r = [start, len, 0, 0];
    ioctl(fd, ZEROPAGE, r.as_mut_ptr())
}

/// Write-protects `[start, start + len)` (`on`), or lifts that and wakes waiters.
pub fn writeprotect(fd: i32, start: u64, len: u64, on: bool) -> Result<(), i32> {
    let mut r = [start, len, on as u64];
    ioctl(fd, WRITEPROTECT, r.as_mut_ptr())
}
