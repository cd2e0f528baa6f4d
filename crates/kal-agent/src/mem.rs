//! Memory for the agent's own use (tables, stacks, buffers): private anonymous mappings
//! fenced by inaccessible pages, so that `/proc/PID/maps` never merges them with the
//! allocator's mappings or a thread's stack, and named `[anon:kal-…]` where the kernel supports it (`PR_SET_VMA_ANON_NAME`).

const PAGE: usize = 4096;
const PR_SET_VMA: i32 = 0x5356_4d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;

/// Maps `len` bytes (rounded up to pages) of zero-filled private memory with no swap
/// reservation, between two `PROT_NONE` pages; `name` (NUL-terminated) names it where the
/// kernel can. Returns null when the kernel refuses.
pub fn map(len: usize, name: &'static [u8]) -> *mut u8 {
    let len = len.div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh private anonymous reservation; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len + 2 * PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return core::ptr::null_mut();
    }
    let inner = (p as usize + PAGE) as *mut libc::c_void;
    // SAFETY: the inner range lies inside the reservation just made.
    let ok = unsafe { libc::mprotect(inner, len, libc::PROT_READ | libc::PROT_WRITE) } == 0;
    if !ok {
        // SAFETY: unmapping our own reservation.
        unsafe { libc::munmap(p, len + 2 * PAGE) };
        return core::ptr::null_mut();
    }
    debug_assert_eq!(name.last(), Some(&0));
    // SAFETY: prctl with a NUL-terminated static name over our own range; failure (kernels
    // without CONFIG_ANON_VMA_NAME) leaves the mapping unnamed and is harmless.
    unsafe {
        libc::prctl(
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            inner as u64,
            len as u64,
            name.as_ptr() as u64,
        )
    };
    inner.cast()
}

/// Gives the memory of `[p, p + len)` back to the kernel; the range stays mapped and reads
/// as zeros (threads that still look at it find nothing there).
pub fn release(p: *mut u8, len: usize) {
    // SAFETY: p..p+len is one of our own mappings; MADV_DONTNEED keeps it mapped.
    unsafe { libc::madvise(p.cast(), len.div_ceil(PAGE) * PAGE, libc::MADV_DONTNEED) };
}
