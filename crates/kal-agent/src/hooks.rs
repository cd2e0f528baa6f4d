//! The exported allocation functions. Each forwards to the next definition and records the
//! result; none allocates on its own path, none panics.

use crate::{guard, real, state};
use core::cell::Cell;
use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};
use kal_proto::{Api, MAX_FRAMES, STACK_UNKNOWN};

static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static SEQ: Cell<u64> = const { Cell::new(0) };
}

/// A sequence number unique in this process: thread index in the high bits.
#[inline(always)]
fn next_seq() -> u64 {
    SEQ.with(|s| {
        let mut v = s.get();
        if v == 0 {
            v = NEXT_THREAD.fetch_add(1, Ordering::Relaxed) << 40;
        }
        v += 1;
        s.set(v);
        v
    })
}

/// Records a new block (caller holds the guard).
#[inline(always)]
fn record(p: *mut c_void, size: usize, api: Api) {
    let Some(t) = state::tables() else { return };
    let mut frames = [0u64; MAX_FRAMES];
    let n = crate::unwind::capture(&mut frames);
    let stack = if n == 0 { STACK_UNKNOWN } else { t.intern_stack(&frames[..n]) };
    t.insert(p as u64, size as u64, next_seq(), stack, api as u32);
}

/// Runs `alloc` and records its non-null result, unless this thread is already in a hook.
#[inline(always)]
fn tracked(size: usize, api: Api, alloc: impl FnOnce() -> *mut c_void) -> *mut c_void {
    if !guard::enter() {
        return alloc();
    }
    let p = alloc();
    if !p.is_null() {
        record(p, size, api);
    }
    guard::leave();
    p
}

#[inline(always)]
fn forget(p: *mut c_void) -> Option<crate::table::Removed> {
    state::tables().and_then(|t| t.remove(p as u64))
}

/// `malloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return real::boot_alloc(size) };
    // SAFETY: forwarding the caller's arguments to the real malloc.
    tracked(size, Api::Malloc, || unsafe { (r.malloc)(size) })
}

/// `free(3)`: the block leaves the table *before* the real allocator gets it back.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || real::is_boot(p) {
        return;
    }
    let Some(r) = real::get() else { return };
    forget(p);
    // SAFETY: p is the caller's block, handed to the allocator that produced it.
    unsafe { (r.free)(p) }
}

/// `calloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(r) = real::get() else {
        return match n.checked_mul(size) {
            Some(total) => real::boot_alloc(total),
            None => core::ptr::null_mut(),
        };
    };
    // SAFETY: forwarding the caller's arguments; the real calloc checks for overflow.
    tracked(n.wrapping_mul(size), Api::Calloc, || unsafe { (r.calloc)(n, size) })
}

/// `realloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: realloc(NULL, n) is malloc(n).
        return unsafe { realloc_fresh(size) };
    }
    if real::is_boot(p) {
        // SAFETY: allocate anew and copy what the bootstrap block held.
        unsafe {
            let q = realloc_fresh(size);
            if !q.is_null() {
                let n = real::boot_size(p).min(size);
                core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n);
            }
            return q;
        }
    }
    let Some(r) = real::get() else { return core::ptr::null_mut() };
    if !guard::enter() {
        // SAFETY: plain forwarding while re-entered.
        return unsafe { (r.realloc)(p, size) };
    }
    let old = forget(p);
    // SAFETY: p is the caller's live block.
    let q = unsafe { (r.realloc)(p, size) };
    if !q.is_null() {
        record(q, size, Api::Realloc);
    } else if size != 0 {
        // Failed: p is still the caller's, put it back as it was.
        if let (Some(o), Some(t)) = (old, state::tables()) {
            t.insert(p as u64, o.size, o.seq, o.stack, o.api);
        }
    }
    guard::leave();
    q
}

unsafe fn realloc_fresh(size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return real::boot_alloc(size) };
    // SAFETY: realloc(NULL, n) allocates like malloc.
    tracked(size, Api::Realloc, || unsafe { (r.realloc)(core::ptr::null_mut(), size) })
}

/// `reallocarray(3)`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: same contract as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            // SAFETY: errno is thread-local and always writable.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            core::ptr::null_mut()
        }
    }
}

/// `memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return real::boot_alloc(size) };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, || unsafe { (r.memalign)(align, size) })
}

/// `aligned_alloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return real::boot_alloc(size) };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, || unsafe { (r.aligned_alloc)(align, size) })
}

/// `valloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return core::ptr::null_mut() };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, || unsafe { (r.valloc)(size) })
}

/// `pvalloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(r) = real::get() else { return core::ptr::null_mut() };
    // SAFETY: forwarding.
    tracked(size, Api::Memalign, || unsafe { (r.pvalloc)(size) })
}

/// `posix_memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    let Some(r) = real::get() else { return libc::ENOMEM };
    let mut rc = 0;
    // SAFETY: forwarding; out is the caller's pointer, written by the real function.
    let p = tracked(size, Api::Memalign, || unsafe {
        rc = (r.posix_memalign)(out, align, size);
        if rc == 0 { *out } else { core::ptr::null_mut() }
    });
    let _ = p;
    rc
}

/// `malloc_usable_size(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if real::is_boot(p) {
        return real::boot_size(p);
    }
    let Some(r) = real::get() else { return 0 };
    // SAFETY: forwarding.
    unsafe { (r.malloc_usable_size)(p) }
}
