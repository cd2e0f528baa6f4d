//! The *next* definitions of the malloc family (`dlsym(RTLD_NEXT, …)`), resolved once.
//!
//! `dlsym` itself may allocate (for `dlerror`), so while resolution is in progress every
//! allocation is served from a small static bootstrap arena whose blocks are never freed.

use core::ffi::{c_char, c_void};
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;

/// Function pointers of the allocator that the agent forwards to.
pub struct Real {
    /// `malloc`
    pub malloc: MallocFn,
    /// `free`
    pub free: FreeFn,
    /// `calloc`
    pub calloc: CallocFn,
    /// `realloc`
    pub realloc: ReallocFn,
    /// `memalign`
    pub memalign: MemalignFn,
    /// `posix_memalign`
    pub posix_memalign: PosixMemalignFn,
    /// `aligned_alloc`
    pub aligned_alloc: MemalignFn,
    /// `valloc`
    pub valloc: MallocFn,
    /// `pvalloc`
    pub pvalloc: MallocFn,
    /// `malloc_usable_size`
    pub malloc_usable_size: UsableFn,
    /// True when `malloc` is glibc's own (ptmalloc chunk headers are meaningful).
    pub glibc: bool,
}

const UNRESOLVED: u8 = 0;
const RESOLVING: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNRESOLVED);
static mut REAL: Option<Real> = None;

/// Returns the next allocator, or `None` while it is being resolved (use the bootstrap arena).
#[inline(always)]
pub fn get() -> Option<&'static Real> {
    if STATE.load(Ordering::Acquire) == READY {
        // SAFETY: REAL is written once, before STATE becomes READY (release), never again.
        return unsafe { (*core::ptr::addr_of!(REAL)).as_ref() };
    }
    resolve_slow()
}

#[cold]
fn resolve_slow() -> Option<&'static Real> {
    if STATE
        .compare_exchange(UNRESOLVED, RESOLVING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another thread (or this one, re-entering from dlsym) is resolving.
        while STATE.load(Ordering::Acquire) == RESOLVING {
            if crate::hooks::guard::is_resolving_thread() {
                return None;
            }
            core::hint::spin_loop();
        }
        // SAFETY: STATE is READY, REAL was published before it.
        return unsafe { (*core::ptr::addr_of!(REAL)).as_ref() };
    }
    crate::hooks::guard::set_resolving_thread(true);
    // SAFETY: only this thread writes REAL, and readers wait for READY.
    unsafe {
        let real = Real {
            malloc: core::mem::transmute::<*mut c_void, MallocFn>(next(c"malloc")),
            free: core::mem::transmute::<*mut c_void, FreeFn>(next(c"free")),
            calloc: core::mem::transmute::<*mut c_void, CallocFn>(next(c"calloc")),
            realloc: core::mem::transmute::<*mut c_void, ReallocFn>(next(c"realloc")),
            memalign: core::mem::transmute::<*mut c_void, MemalignFn>(next(c"memalign")),
            posix_memalign: core::mem::transmute::<*mut c_void, PosixMemalignFn>(next(
                c"posix_memalign",
            )),
            aligned_alloc: core::mem::transmute::<*mut c_void, MemalignFn>(next(c"aligned_alloc")),
            valloc: core::mem::transmute::<*mut c_void, MallocFn>(next(c"valloc")),
            pvalloc: core::mem::transmute::<*mut c_void, MallocFn>(next(c"pvalloc")),
            malloc_usable_size: core::mem::transmute::<*mut c_void, UsableFn>(next(
                c"malloc_usable_size",
            )),
            glibc: is_glibc(next(c"malloc")),
        };
        *core::ptr::addr_of_mut!(REAL) = Some(real);
    }
    crate::hooks::guard::set_resolving_thread(false);
    STATE.store(READY, Ordering::Release);
    // SAFETY: just published.
    unsafe { (*core::ptr::addr_of!(REAL)).as_ref() }
}

/// `dlsym(RTLD_NEXT, name)`; aborts the process with a message if the symbol is missing,
/// because without an allocator to forward to nothing can work. An agent loaded by `kal
/// attach` is not in the global scope, and `RTLD_NEXT` from it would search its own
/// dependencies (libc) only: it forwards to what the program itself calls, the global
/// scope's first definition (jemalloc's, in a program linked to it; see
/// [`global_definition`]).
unsafe fn next(name: &core::ffi::CStr) -> *mut c_void {
    let p = if crate::attach::attach_mode() {
        // SAFETY: a valid NUL-terminated name.
        unsafe { global_definition(name) }
    } else {
        // SAFETY: dlsym with a valid NUL-terminated name.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
    };
    if p.is_null() {
        crate::diag::fatal(b"kal agent: no next definition of an allocation function\n");
    }
    p
}

/// `dladdr1`'s request for the symbol table entry.
const RTLD_DL_SYMENT: libc::c_int = 1;

/// Whether the symbol `dladdr` finds at `p` is undefined in its object: a non-PIE
/// executable's canonical PLT entry (`SHN_UNDEF` with a value), which `dlsym` returns so
/// that function pointers compare equal, and which jumps through the executable's GOT slot.
unsafe fn is_canonical_plt(p: *mut c_void) -> bool {
    // SAFETY: dladdr1 only reads loader data into the two out-parameters; the symbol
    // pointer it gives is an Elf64_Sym inside a mapped symbol table.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        let mut sym: *mut c_void = core::ptr::null_mut();
        if libc::dladdr1(p, &mut info, &mut sym, RTLD_DL_SYMENT) == 0 || sym.is_null() {
            return false;
        }
        (*(sym as *const libc::Elf64_Sym)).st_shndx == 0
    }
}

/// Most loaded objects looked at for a definition.
const MAX_OBJECTS: usize = 512;

/// Names of the loaded objects in load order (the executable, whose name is empty, left
/// out), into `out`; how many.
unsafe fn object_names(out: &mut [*const c_char; MAX_OBJECTS]) -> usize {
    struct Acc<'a> {
        out: &'a mut [*const c_char; MAX_OBJECTS],
        n: usize,
    }
    unsafe extern "C" fn cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> i32 {
        // SAFETY: dl_iterate_phdr passes a valid info and our Acc.
        unsafe {
            let acc = &mut *(data as *mut Acc);
            let name = (*info).dlpi_name;
            if !name.is_null() && *name != 0 && acc.n < MAX_OBJECTS {
                acc.out[acc.n] = name;
                acc.n += 1;
            }
        }
        0
    }
    let mut acc = Acc { out, n: 0 };
    // SAFETY: the callback only copies name pointers (link_map names, which live as long
    // as their objects stay loaded: every one here is, the agent holding no lock).
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut acc as *mut Acc).cast()) };
    acc.n
}

/// The definition of `name` that the program's calls through a PLT reach: the global
/// scope's first. `dlsym(RTLD_DEFAULT)` gives it, except for a function whose address a
/// non-PIE executable takes (python3.11's `malloc` and `free`): then it gives the
/// executable's canonical PLT entry, which jumps through the very GOT slot `kal attach`
/// redirects to the agent (forwarding there recursed until the stack overflowed). The
/// loader skips such an entry for calls; so does this, looking in each loaded library in
/// load order for the first one that defines the name itself.
unsafe fn global_definition(name: &core::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with a valid NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    // SAFETY: p is null or a symbol address.
    if p.is_null() || !unsafe { is_canonical_plt(p) } {
        return p;
    }
    let mut names = [core::ptr::null::<c_char>(); MAX_OBJECTS];
    // SAFETY: fills our own array.
    let n = unsafe { object_names(&mut names) };
    // The agent defines the name too (its hook): never forward to it.
    let mut me: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr of one of our own functions into a plain out-parameter.
    let known = unsafe { libc::dladdr(global_definition as *const c_void, &mut me) } != 0
        && !me.dli_fname.is_null();
    for &obj in &names[..n] {
        // SAFETY: both are NUL-terminated loader-owned names.
        if known && unsafe { libc::strcmp(obj, me.dli_fname) } == 0 {
            continue;
        }
        // SAFETY: obj is a loaded object's NUL-terminated name; RTLD_NOLOAD only takes a
        // reference on it (given back at once), and dlsym searches that object and its
        // dependencies, never the executable.
        unsafe {
            let h = libc::dlopen(obj, libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if h.is_null() {
                continue;
            }
            let q = libc::dlsym(h, name.as_ptr());
            libc::dlclose(h);
            if q.is_null() || is_canonical_plt(q) {
                continue;
            }
            let mut info: libc::Dl_info = core::mem::zeroed();
            if libc::dladdr(q, &mut info) != 0
                && !info.dli_fname.is_null()
                && core::ffi::CStr::from_ptr(info.dli_fname) == core::ffi::CStr::from_ptr(obj)
            {
                return q;
            }
        }
    }
    core::ptr::null_mut()
}

/// Whether `f` lives in glibc's `libc.so.6`.
unsafe fn is_glibc(f: *mut c_void) -> bool {
    // SAFETY: dladdr only reads loader data; info is a plain out-parameter.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(f, &mut info) == 0 || info.dli_fname.is_null() {
            return false;
        }
        let name = core::ffi::CStr::from_ptr(info.dli_fname as *const c_char).to_bytes();
        name.windows(9).any(|w| w == b"libc.so.6")
    }
}

// ---------------------------------------------------------------------------------------
// Bootstrap arena: serves allocations made while the next allocator is being resolved.

const BOOT_SIZE: usize = 64 * 1024;
#[repr(C, align(16))]
struct BootArena([u8; BOOT_SIZE]);
static mut BOOT: BootArena = BootArena([0; BOOT_SIZE]);
static BOOT_USED: AtomicUsize = AtomicUsize::new(0);

fn boot_base() -> usize {
    core::ptr::addr_of!(BOOT) as usize
}

/// Allocates `size` bytes (16-aligned, zeroed) from the bootstrap arena; null when full.
pub fn boot_alloc(size: usize) -> *mut c_void {
    let need = (size + 16 + 15) & !15;
    let off = BOOT_USED.fetch_add(need, Ordering::Relaxed);
    if off + need > BOOT_SIZE {
        return core::ptr::null_mut();
    }
    let p = boot_base() + off;
    // SAFETY: [p, p+need) lies inside BOOT and was handed out to nobody else.
    unsafe {
        *(p as *mut usize) = size;
        (p + 16) as *mut c_void
    }
}

/// Whether `p` was handed out by [`boot_alloc`].
#[inline(always)]
pub fn is_boot(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= boot_base() && a < boot_base() + BOOT_SIZE
}

/// Size requested for a bootstrap block.
pub fn boot_size(p: *mut c_void) -> usize {
    // SAFETY: p came from boot_alloc, which stored the size 16 bytes before it.
    unsafe { *((p as usize - 16) as *const usize) }
}
