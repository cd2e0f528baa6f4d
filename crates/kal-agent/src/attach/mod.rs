//! Attach mode: the agent loaded by `dlopen` into a running process (`kal attach PID`).
//!
//! A library opened with `dlopen` is not first in the symbol search order, so nothing calls
//! its `malloc`. Instead the agent writes its own functions into the GOT slots of the
//! malloc family in every loaded module (the executable, libc itself, every library):
//! `dl_iterate_phdr` names the modules, each module's dynamic section its relocations
//! (`DT_JMPREL` for calls through the PLT, `DT_RELA` for `GLOB_DAT` slots of code built
//! with `-fno-plt`), its symbol and string tables the names. RELRO pages are made writable
//! for the write and read-only again. Every slot changed is remembered with its old value
//! (in a static array: nothing is allocated), so that detach puts them all back.
//!
//! `kal attach` calls the agent in one thread while every other thread of the program is
//! stopped: the first time through `dlopen` (the constructor sees it was not preloaded:
//! `dlsym(RTLD_DEFAULT, "malloc")` is not the agent's), later through [`kal_agent_attach`].
//! Detach ([`detach`], asked over the control socket) restores the slots and makes the
//! hooks plain pass-through (a function pointer taken while attached may still lead to
//! them); the table is emptied at the next attach, while the program is stopped.
//!
//! Modules loaded after attach get their slots redirected when the `dlopen` or `dlmopen`
//! that loaded them returns (those are hooked too: see [`crate::attach::dlhook`]). Modules in a
//! namespace other than the base one (`dlmopen`) are never touched: they have their own
//! libc and heap. Not covered: calls that do not go through a GOT.

pub mod dlhook;

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Set while the agent is detached: the hooks forward without recording.
static DETACHED: AtomicBool = AtomicBool::new(false);

/// Whether the agent was loaded by `kal attach` (not preloaded).
static ATTACH_MODE: AtomicBool = AtomicBool::new(false);

/// Attach state, read by the CLI through this exported symbol: 0 preloaded (or not
/// started), 1 attached, 2 detached, 3 refused (loaded by `dlopen` without static TLS:
/// inert, see [`refuse_without_static_tls`]).
#[no_mangle]
pub static KAL_ATTACH_STATE: AtomicU64 = AtomicU64::new(0);

/// Number of GOT slots the last attach redirected (read by the CLI).
#[no_mangle]
pub static KAL_ATTACH_SLOTS: AtomicU64 = AtomicU64::new(0);

/// The page `kal attach` runs its call stub in, kept for the next attach (written by kal).
#[no_mangle]
pub static KAL_ATTACH_STUB: AtomicU64 = AtomicU64::new(0);

const MAX_SLOTS: usize = 4096;
/// Changed slots: (address, old value, whether it lies in a RELRO range, whether it is a
/// `dlopen`/`dlmopen` slot). Written under [`LOCK`].
static mut SAVED: [(usize, usize, bool, bool); MAX_SLOTS] = [(0, 0, false, false); MAX_SLOTS];
static SAVED_LEN: AtomicUsize = AtomicUsize::new(0);

/// Held while slots are redirected or restored (the attaching thread, a `dlopen` that
/// returned, the server thread detaching).
static LOCK: AtomicBool = AtomicBool::new(false);

fn lock() {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// Whether the hooks must only forward (the agent is detached).
#[inline(always)]
pub fn detached() -> bool {
    DETACHED.load(Ordering::Relaxed)
}

/// Whether the agent was loaded by `dlopen` (`kal attach`): the constructor leaves the
/// static-TLS shortcuts off and redirects the GOT instead. A preloaded library is loaded
/// before the program's own dependencies, libc included; an opened one after them, so the
/// loader's list of modules tells, without the environment.
pub fn loaded_by_dlopen() -> bool {
    struct Order {
        own: usize,
        index: usize,
        libc: usize,
        me: usize,
    }
    unsafe extern "C" fn look(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: the loader passes a valid info for this call; data is our Order.
        let (info, o) = unsafe { (&*info, &mut *(data as *mut Order)) };
        o.index += 1;
        if info.dlpi_addr as usize == o.own {
            o.me = o.index;
        } else if !info.dlpi_name.is_null() && o.libc == 0 {
            // SAFETY: a NUL-terminated module name from the loader.
            let name = unsafe { core::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
            if name.windows(9).any(|w| w == b"libc.so.6") {
                o.libc = o.index;
            }
        }
        0
    }
    let mut o = Order {
        own: own_base(),
        index: 0,
        libc: 0,
        me: 0,
    };
    // SAFETY: dl_iterate_phdr calls `look` with valid infos and our Order.
    unsafe { libc::dl_iterate_phdr(Some(look), (&mut o as *mut Order).cast()) };
    o.libc != 0 && o.me != 0 && o.libc < o.me
}

/// Whether the agent runs in attach mode.
pub fn attach_mode() -> bool {
    ATTACH_MODE.load(Ordering::Acquire)
}

/// Marks attach mode (before anything reads the static-TLS shortcuts).
pub fn set_attach_mode() {
    ATTACH_MODE.store(true, Ordering::Release);
}

/// The functions redirected.
const NAMES: [&[u8]; 11] = [
    b"malloc\0",
    b"free\0",
    b"calloc\0",
    b"realloc\0",
    b"reallocarray\0",
    b"memalign\0",
    b"posix_memalign\0",
    b"aligned_alloc\0",
    b"valloc\0",
    b"pvalloc\0",
    b"malloc_usable_size\0",
];

/// The agent's own definitions of [`NAMES`], found once by [`resolve_own`].
static OURS: [AtomicUsize; 11] = [const { AtomicUsize::new(0) }; 11];

/// Finds the agent's own definitions: taking a function's address in the agent goes
/// through its GOT, which the loader bound to libc's (first in the global scope), so the
/// agent's own handle is asked (`dlsym` on a handle searches that object first).
fn resolve_own() -> bool {
    // SAFETY: dladdr, dlopen with RTLD_NOLOAD (no load, one more reference, dropped
    // below), dlsym with NUL-terminated names.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(own_base as *const () as *const c_void, &mut info) == 0
            || info.dli_fname.is_null()
        {
            return false;
        }
        let h = libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            return false;
        }
        let mut ok = true;
        for (name, slot) in NAMES.iter().zip(&OURS) {
            let f = libc::dlsym(h, name.as_ptr().cast());
            ok &= !f.is_null();
            slot.store(f as usize, Ordering::Release);
        }
        libc::dlclose(h);
        ok
    }
}

/// The agent's definition of `name`, if it is one of [`NAMES`].
fn ours(name: &[u8]) -> Option<usize> {
    let i = NAMES.iter().position(|n| &n[..n.len() - 1] == name)?;
    Some(OURS[i].load(Ordering::Acquire)).filter(|&f| f != 0)
}

/// The agent's own load address (its slots are never touched).
fn own_base() -> usize {
    // SAFETY: dladdr reads loader data into a plain out-parameter.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(own_base as *const () as *const c_void, &mut info) == 0 {
            return 0;
        }
        info.dli_fbase as usize
    }
}

const PAGE: usize = 4096;

fn protect(addr: usize, prot: c_int) {
    let page = addr & !(PAGE - 1);
    // SAFETY: changing the protection of one page of a loaded module's GOT, which the
    // loader mapped; it stays mapped.
    unsafe { libc::mprotect(page as *mut c_void, PAGE, prot) };
}

/// Writes `value` into GOT slot `slot`, making a RELRO page writable for the write.
fn write_slot(slot: usize, value: usize, relro: bool) {
    if relro {
        protect(slot, libc::PROT_READ | libc::PROT_WRITE);
    }
    // SAFETY: `slot` is an aligned GOT entry of a loaded module, writable now; the store
    // is atomic, so a thread calling through it sees the old or the new function.
    unsafe { (*(slot as *const AtomicUsize)).store(value, Ordering::Release) };
    if relro {
        protect(slot, libc::PROT_READ);
    }
}

struct Walk {
    own: usize,
    count: usize,
}

/// Whether the module whose dynamic section is at `dynamic` is in the base namespace: a
/// module opened by `dlmopen` into another one has its own libc and heap, whose blocks
/// must never reach the base namespace's allocator.
fn in_base_namespace(dynamic: usize) -> bool {
    // SAFETY: dladdr1 fills the link map of a loaded module's address; dlinfo reads its
    // namespace id into a plain out-parameter.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        let mut map: *mut c_void = core::ptr::null_mut();
        if libc::dladdr1(
            dynamic as *const c_void,
            &mut info,
            &mut map as *mut *mut c_void,
            2, // RTLD_DL_LINKMAP
        ) == 0
            || map.is_null()
        {
            return true; // the vDSO and the like: nothing to redirect anyway
        }
        let mut lmid: libc::Lmid_t = 0;
        if libc::dlinfo(
            map,
            libc::RTLD_DI_LMID,
            (&mut lmid as *mut libc::Lmid_t).cast(),
        ) != 0
        {
            return false;
        }
        lmid == libc::LM_ID_BASE
    }
}

/// A module's dynamic entries the walk needs (addresses already relocated).
#[derive(Default)]
struct Dyn {
    jmprel: usize,
    pltrelsz: usize,
    rela: usize,
    relasz: usize,
    symtab: usize,
    strtab: usize,
}

unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> c_int {
    // SAFETY: the loader passes a valid info for this call; data is our Walk.
    let (info, walk) = unsafe { (&*info, &mut *(data as *mut Walk)) };
    let base = info.dlpi_addr as usize;
    if base == walk.own || info.dlpi_phdr.is_null() {
        return 0;
    }
    let mut dynamic = 0usize;
    let mut relro = (0usize, 0usize);
    let mut code = [(0usize, 0usize); 4];
    let mut ncode = 0;
    for i in 0..info.dlpi_phnum as usize {
        // SAFETY: the loader's program headers, dlpi_phnum of them.
        let ph = unsafe { &*info.dlpi_phdr.add(i) };
        match ph.p_type {
            libc::PT_LOAD if ph.p_flags & libc::PF_X != 0 && ncode < code.len() => {
                let lo = base + ph.p_vaddr as usize;
                code[ncode] = (lo, lo + ph.p_memsz as usize);
                ncode += 1;
            }
            libc::PT_DYNAMIC => dynamic = base + ph.p_vaddr as usize,
            libc::PT_GNU_RELRO => {
                let start = (base + ph.p_vaddr as usize) & !(PAGE - 1);
                // The loader makes whole pages read-only: the end rounds down.
                relro = (
                    start,
                    (base + (ph.p_vaddr + ph.p_memsz) as usize) & !(PAGE - 1),
                );
            }
            _ => {}
        }
    }
    if dynamic == 0 || !in_base_namespace(dynamic) {
        return 0;
    }
    // The loader relocates the pointers of a module's dynamic section in place; the vDSO's
    // are left as offsets.
    let fix = |v: usize| if v < base { v + base } else { v };
    let mut d = Dyn::default();
    let mut p = dynamic as *const [u64; 2]; // Elf64_Dyn: d_tag, d_un
    loop {
        // SAFETY: the dynamic section is an array ending with DT_NULL.
        let e = unsafe { &*p };
        let v = e[1] as usize;
        match e[0] {
            0 => break,
            23 => d.jmprel = fix(v), // DT_JMPREL
            2 => d.pltrelsz = v,     // DT_PLTRELSZ
            7 => d.rela = fix(v),    // DT_RELA
            8 => d.relasz = v,       // DT_RELASZ
            6 => d.symtab = fix(v),  // DT_SYMTAB
            5 => d.strtab = fix(v),  // DT_STRTAB
            _ => {}
        }
        // SAFETY: not past DT_NULL yet.
        p = unsafe { p.add(1) };
    }
    if d.symtab == 0 || d.strtab == 0 {
        return 0;
    }
    for (table, size) in [(d.jmprel, d.pltrelsz), (d.rela, d.relasz)] {
        if table == 0 {
            continue;
        }
        let n = size / core::mem::size_of::<libc::Elf64_Rela>();
        for k in 0..n {
            // SAFETY: relocation entries of a loaded module, `n` of them.
            let r = unsafe { &*(table as *const libc::Elf64_Rela).add(k) };
            let kind = (r.r_info & 0xffff_ffff) as u32;
            // R_X86_64_GLOB_DAT (6), R_X86_64_JUMP_SLOT (7).
            if kind != 6 && kind != 7 {
                continue;
            }
            let sym = (r.r_info >> 32) as usize;
            // SAFETY: the symbol table entry a relocation names.
            let s = unsafe { &*(d.symtab as *const libc::Elf64_Sym).add(sym) };
            let name = (d.strtab + s.st_name as usize) as *const c_char;
            // SAFETY: a NUL-terminated name in the module's string table.
            let name = unsafe { core::ffi::CStr::from_ptr(name) }.to_bytes();
            let slot = base + r.r_offset as usize;
            let (ours, dl) = match (ours(name), crate::attach::dlhook::hook_for(name)) {
                (Some(f), _) => (f, false),
                // dlopen and dlmopen only through a PLT entry (see `dlhook`).
                (None, Some((which, hook))) if kind == 7 => {
                    match crate::attach::dlhook::plt_entry(&code[..ncode], slot) {
                        Some(plt) => {
                            let lo = code[..ncode].iter().map(|c| c.0).min().unwrap_or(0);
                            let hi = code[..ncode].iter().map(|c| c.1).max().unwrap_or(0);
                            crate::attach::dlhook::add_module(lo, hi, which, plt);
                            (hook, true)
                        }
                        None => continue,
                    }
                }
                _ => continue,
            };
            let in_relro = slot >= relro.0 && slot < relro.1;
            // SAFETY: a GOT slot of a loaded module, readable.
            let old = unsafe { (*(slot as *const AtomicUsize)).load(Ordering::Acquire) };
            if old == ours {
                continue;
            }
            let i = SAVED_LEN.load(Ordering::Relaxed);
            if i >= MAX_SLOTS {
                return 1;
            }
            // SAFETY: SAVED is written under LOCK only (held by `patch`'s callers).
            unsafe { (*core::ptr::addr_of_mut!(SAVED))[i] = (slot, old, in_relro, dl) };
            SAVED_LEN.store(i + 1, Ordering::Release);
            write_slot(slot, ours, in_relro);
            walk.count += 1;
        }
    }
    0
}

/// Redirects the malloc family (and `dlopen`, `dlmopen`) in every loaded module's GOT to
/// the agent. Returns the number of slots changed.
pub fn patch() -> usize {
    if !resolve_own() {
        crate::diag::say(
            b"kal agent: cannot find its own allocation functions: nothing redirected\n",
        );
        return 0;
    }
    crate::attach::dlhook::resolve();
    lock();
    let n = walk_all();
    unlock();
    KAL_ATTACH_SLOTS.store(n as u64, Ordering::Release);
    n
}

fn walk_all() -> usize {
    let mut walk = Walk {
        own: own_base(),
        count: 0,
    };
    // SAFETY: dl_iterate_phdr calls `visit` with valid infos and our Walk.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut walk as *mut Walk).cast()) };
    walk.count
}

/// After a `dlopen` or `dlmopen` returned (in the program's thread that called it):
/// redirects the slots of the modules it loaded (slots already redirected are left).
pub fn patch_new() {
    let entered = crate::hooks::guard::enter_agent();
    lock();
    if !detached() {
        let n = walk_all();
        KAL_ATTACH_SLOTS.fetch_add(n as u64, Ordering::AcqRel);
    }
    unlock();
    if entered {
        crate::hooks::guard::leave();
    }
}

/// How long detach waits for `dlopen` calls in flight to come back before it leaves
/// their slots on the (then pass-through) hooks.
const DL_DRAIN_MS: u32 = 2000;

/// Puts back every slot [`patch`] changed (newest first) and makes the hooks forward only.
/// A `dlopen` slot is put back once no call through it is in flight (its return comes
/// back through the slot): if calls are still in flight after [`DL_DRAIN_MS`], those
/// slots stay on the hooks, which then only forward, and the next detach tries again.
pub fn detach() {
    DETACHED.store(true, Ordering::Release);
    let mut waited = 0;
    while crate::attach::dlhook::in_flight() > 0 && waited < DL_DRAIN_MS {
        // SAFETY: a plain sleep.
        unsafe { libc::usleep(1000) };
        waited += 1;
    }
    let drained = crate::attach::dlhook::in_flight() == 0;
    lock();
    let n = SAVED_LEN.load(Ordering::Acquire);
    let mut kept = 0;
    for i in (0..n).rev() {
        // SAFETY: entries below the length were written by patch, under LOCK (held).
        let (slot, old, relro, dl) = unsafe { (*core::ptr::addr_of!(SAVED))[i] };
        if dl && !drained {
            kept += 1;
            continue;
        }
        write_slot(slot, old, relro);
    }
    if kept > 0 {
        // Keep the dlopen entries (in their order) at the front.
        let mut j = 0;
        for i in 0..n {
            // SAFETY: as above; j <= i, both below the length.
            unsafe {
                let e = (*core::ptr::addr_of!(SAVED))[i];
                if e.3 {
                    (*core::ptr::addr_of_mut!(SAVED))[j] = e;
                    j += 1;
                }
            }
        }
    }
    SAVED_LEN.store(kept, Ordering::Release);
    unlock();
    KAL_ATTACH_STATE.store(2, Ordering::Release);
}

/// Called by `kal attach` (injected, every other program thread stopped and outside the
/// hooks) to attach an agent loaded and detached before: empties the table (what was
/// freed while detached must not look live), redirects the GOT again and starts the
/// agent's threads. Returns the number of slots redirected, or -1 if it is not detached.
#[no_mangle]
pub extern "C" fn kal_agent_attach() -> i64 {
    if KAL_ATTACH_STATE.load(Ordering::Acquire) != 2 {
        return -1;
    }
    let entered = crate::hooks::guard::enter_agent();
    crate::table::clear_all();
    DETACHED.store(false, Ordering::Release);
    let n = patch();
    crate::hooks::pause::resume_after_detach();
    KAL_ATTACH_STATE.store(1, Ordering::Release);
    if entered {
        crate::hooks::guard::leave();
    }
    n as i64
}

/// The agent was loaded by `dlopen` but glibc gave its thread-local state no static TLS
/// (the spare static TLS is used up by other libraries): it redirects nothing, starts no
/// thread and says so to kal (state 3).
pub fn refuse_without_static_tls() {
    KAL_ATTACH_STATE.store(3, Ordering::Release);
}

/// Marks the first attach done (from the constructor, after [`patch`]).
pub fn attached() {
    KAL_ATTACH_STATE.store(1, Ordering::Release);
}
