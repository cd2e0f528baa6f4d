//! Stack capture without frame pointers: DWARF CFI (`.eh_frame`) with framehop.
//!
//! The unwinder is built from `dl_iterate_phdr` (every loaded object's `.eh_frame_hdr` and
//! `.eh_frame`, read in place from memory), published behind an atomic pointer, and rebuilt
//! when an address falls outside every known module and the loader says objects were added
//! or removed since (`dlopen`/`dlclose`). Old unwinders are never freed: a thread may still
//! be using one. Each thread has its own rule cache; capture never allocates after the
//! first call in a thread.

use core::cell::Cell;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, MustNotAllocateDuringUnwind, Unwinder};
use kal_proto::{MAX_FRAMES, STACK_UNKNOWN};

type Unw = UnwinderX86_64<&'static [u8], MustNotAllocateDuringUnwind>;
type Cache = CacheX86_64<MustNotAllocateDuringUnwind>;

/// A published unwinder with the module ranges it knows.
struct Published {
    unwinder: Unw,
    ranges: Vec<(u64, u64)>,
    generation: u64,
}

static CURRENT: AtomicPtr<Published> = AtomicPtr::new(core::ptr::null_mut());
static BUILDING: AtomicBool = AtomicBool::new(false);
/// Start and end of the agent's own executable segment.
static AGENT_TEXT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The agent's own code range, `(start, end)`.
pub fn agent_text() -> (u64, u64) {
    (
        AGENT_TEXT[0].load(Ordering::Relaxed),
        AGENT_TEXT[1].load(Ordering::Relaxed),
    )
}

/// Loader generation: objects added plus removed, as counted by `dl_iterate_phdr`.
fn loader_generation() -> u64 {
    unsafe extern "C" fn cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> i32 {
        // SAFETY: the loader passes a valid info; data points at our u64.
        unsafe {
            *(data as *mut u64) = (*info).dlpi_adds.wrapping_add((*info).dlpi_subs);
        }
        1
    }
    let mut g: u64 = 0;
    // SAFETY: callback matches the expected signature; data outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut g as *mut u64).cast()) };
    g
}

struct Collect {
    modules: Vec<Module<&'static [u8]>>,
    ranges: Vec<(u64, u64)>,
    self_addr: u64,
}

/// Reads the `.eh_frame` address out of an `.eh_frame_hdr` (only the common encodings).
///
/// # Safety
/// `hdr` must point at a mapped `.eh_frame_hdr`.
unsafe fn eh_frame_from_hdr(hdr: u64) -> Option<u64> {
    // SAFETY: per the contract, the first bytes of the header are mapped.
    let (version, enc) = unsafe { (*(hdr as *const u8), *((hdr + 1) as *const u8)) };
    if version != 1 {
        return None;
    }
    let field = hdr + 4;
    // SAFETY: the encoded pointer follows the 4 header bytes.
    let value = unsafe {
        match enc & 0x0f {
            0x0b => *(field as *const i32) as i64 as u64, // sdata4
            0x03 => *(field as *const u32) as u64,        // udata4
            0x0c | 0x04 => *(field as *const u64),        // sdata8 / udata8
            _ => return None,
        }
    };
    match enc & 0x70 {
        0x10 => Some(field.wrapping_add(value)), // pcrel
        0x30 => Some(hdr.wrapping_add(value)),   // datarel (relative to the hdr)
        0x00 => Some(value),
        _ => None,
    }
}

unsafe extern "C" fn collect_cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> i32 {
    // SAFETY: the loader passes a valid info for the duration of the callback; data is our
    // Collect; phdrs and the segments they describe are mapped while the object is loaded.
    unsafe {
        let c = &mut *(data as *mut Collect);
        let info = &*info;
        let base = info.dlpi_addr;
        let phdrs = core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
        let mut text: Option<(u64, u64)> = None;
        let mut hdr: Option<(u64, u64)> = None;
        let mut loads: Vec<(u64, u64)> = Vec::new();
        for ph in phdrs {
            if ph.p_type == libc::PT_LOAD {
                let r = (base + ph.p_vaddr, base + ph.p_vaddr + ph.p_memsz);
                loads.push(r);
                if ph.p_flags & libc::PF_X != 0 {
                    text = Some(text.map_or(r, |t| (t.0.min(r.0), t.1.max(r.1))));
                }
            } else if ph.p_type == libc::PT_GNU_EH_FRAME {
                hdr = Some((base + ph.p_vaddr, ph.p_memsz));
            }
        }
        let Some(text) = text else { return 0 };
        if c.self_addr >= text.0 && c.self_addr < text.1 {
            AGENT_TEXT[0].store(text.0, Ordering::Relaxed);
            AGENT_TEXT[1].store(text.1, Ordering::Relaxed);
        }
        c.ranges.push(text);
        let Some((hdr_avma, hdr_len)) = hdr else {
            return 0;
        };
        let Some(eh_avma) = eh_frame_from_hdr(hdr_avma) else {
            return 0;
        };
        // .eh_frame has no length in the header: it runs at most to the end of its segment.
        let Some(seg) = loads.iter().find(|r| eh_avma >= r.0 && eh_avma < r.1) else {
            return 0;
        };
        let eh_len = seg.1 - eh_avma;
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            core::ffi::CStr::from_ptr(info.dlpi_name)
                .to_string_lossy()
                .into_owned()
        };
        let section_info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: Some(text.0 - base..text.1 - base),
            text: Some(core::slice::from_raw_parts(
                text.0 as *const u8,
                (text.1 - text.0) as usize,
            )),
            eh_frame_svma: Some(eh_avma - base..eh_avma - base + eh_len),
            eh_frame: Some(core::slice::from_raw_parts(
                eh_avma as *const u8,
                eh_len as usize,
            )),
            eh_frame_hdr_svma: Some(hdr_avma - base..hdr_avma - base + hdr_len),
            eh_frame_hdr: Some(core::slice::from_raw_parts(
                hdr_avma as *const u8,
                hdr_len as usize,
            )),
            ..Default::default()
        };
        c.modules
            .push(Module::new(name, text.0..text.1, base, section_info));
        0
    }
}

/// Builds and publishes a fresh unwinder (caller holds the re-entrancy guard).
fn rebuild() {
    if BUILDING.swap(true, Ordering::Acquire) {
        return; // someone else is building; use what is published
    }
    let generation = loader_generation();
    let mut c = Collect {
        modules: Vec::new(),
        ranges: Vec::new(),
        self_addr: rebuild as *const () as u64,
    };
    // SAFETY: the callback matches the signature and data outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(collect_cb), (&mut c as *mut Collect).cast()) };
    let mut unwinder = Unw::new();
    for m in c.modules {
        unwinder.add_module(m);
    }
    c.ranges.sort_unstable();
    let p = Box::into_raw(Box::new(Published {
        unwinder,
        ranges: c.ranges,
        generation,
    }));
    CURRENT.store(p, Ordering::Release);
    BUILDING.store(false, Ordering::Release);
}

/// Builds the unwinder now (called once at agent start).
pub fn init() {
    if CURRENT.load(Ordering::Acquire).is_null() {
        rebuild();
    }
}

fn known(ranges: &[(u64, u64)], a: u64) -> bool {
    let i = ranges.partition_point(|r| r.0 <= a);
    i > 0 && a < ranges[i - 1].1
}

extern "C" {
    /// Top of the main thread's stack, exported by the dynamic loader.
    static __libc_stack_end: *mut c_void;
}

/// The highest address of the calling thread's stack that may be read, or 0.
///
/// No library call here: `pthread_getattr_np` takes the thread's lock and allocates, and
/// the program may be inside it when it calls `malloc`. glibc puts a thread's control block
/// (where the thread pointer points) right above its stack; the main thread's stack ends
/// at `__libc_stack_end`.
fn stack_top(sp: u64) -> u64 {
    let tp: u64;
    // SAFETY: on x86-64 Linux, fs:0 holds the thread pointer itself (TCB self-pointer).
    unsafe {
        core::arch::asm!("mov {0}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    if tp > sp && tp - sp < (1 << 30) {
        return tp;
    }
    // SAFETY: reading a pointer-sized variable the loader defines for every process.
    let end = unsafe { __libc_stack_end } as u64;
    if end > sp && end - sp < (1 << 30) {
        // The loader's value sits a little below the real top: allow the rest of its page.
        return (end + 4095) & !4095;
    }
    0
}

/// Registers of the allocation function's caller, where unwinding starts.
#[derive(Clone, Copy)]
pub struct Regs {
    /// Return address into the caller.
    pub pc: u64,
    /// Stack pointer of the caller (just above the return address).
    pub sp: u64,
    /// Frame pointer register.
    pub bp: u64,
}

/// Slots in the per-thread recent-stack cache.
const RECENT: usize = 256;

/// A stack seen recently by this thread, with where each return address sat.
#[derive(Clone, Copy)]
#[repr(C)]
struct Recent {
    /// Return address into the allocation's caller (0: empty entry).
    ra: u64,
    /// Distance of the caller's stack pointer below the stack top.
    depth: u64,
    /// Frames recorded.
    n: u32,
    /// Stack-table id of `frames`.
    id: u32,
    /// Offset from the stack pointer of the slot holding `frames[i]` (i ≥ 1).
    slots: [u32; MAX_FRAMES],
    /// Return addresses, innermost first.
    frames: [u64; MAX_FRAMES],
}

/// One thread's unwinding state: framehop's rule cache and the recent-stack cache.
pub struct ThreadState {
    rules: Cache,
    recent: *mut Recent,
}

#[inline(always)]
fn state(me: &crate::hooks::tls::PerThread) -> *mut ThreadState {
    let c = me.unwind.get();
    if !c.is_null() {
        return c;
    }
    let c = crate::hooks::pool::take_cache();
    me.unwind.set(c);
    c
}

/// Creates the state for a thread that finds none in the pool.
pub fn new_cache() -> *mut ThreadState {
    let layout = core::alloc::Layout::array::<Recent>(RECENT).expect("small layout");
    // SAFETY: Recent is plain data, all-zero is a valid (empty) value; the layout is non-zero.
    let recent = unsafe { std::alloc::alloc_zeroed(layout) } as *mut Recent;
    Box::into_raw(Box::new(ThreadState {
        rules: Cache::new_in(),
        recent,
    }))
}

/// The calling thread's state, or null if it has none yet.
pub fn current_cache() -> *mut ThreadState {
    crate::hooks::tls::with(|t| t.unwind.get())
}

/// The stack-table id of the stack of the allocation function's caller at `at`.
/// The caller holds the re-entrancy guard.
///
/// A stack seen before by this thread at the same depth is recognised by re-reading each of
/// its return-address slots (a few loads); only a new stack is unwound with the CFI.
#[inline(always)]
pub fn stack_id(at: Regs, tables: &crate::table::Tables, me: &crate::hooks::tls::PerThread) -> u32 {
    let top = stack_top(at.sp);
    // SAFETY: the state belongs to this thread alone; `recent` has RECENT entries.
    let st = unsafe { &mut *state(me) };
    let depth = top.wrapping_sub(at.sp);
    let h = (at.pc ^ depth.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
    // SAFETY: h < 256 = RECENT.
    let e = unsafe { &mut *st.recent.add(h as usize % RECENT) };
    if e.ra == at.pc && e.depth == depth && e.n > 0 && top != 0 {
        let n = e.n as usize;
        // No bound to check per slot: a slot was recorded only from a read that lay below
        // the stack top (`walk`'s `read_stack`), at the same distance `depth` of the stack
        // pointer below the top as now, so `sp + slot + 8 <= sp + depth = top` again.
        let same = (1..n).all(|i| {
            let a = at.sp + e.slots[i] as u64;
            // SAFETY: the slot lies between sp and this thread's stack top (see above).
            unsafe { *(a as *const u64) == e.frames[i] }
        });
        if same {
            return e.id;
        }
    }
    unwind_new(at, top, depth, tables, st, e)
}

/// [`stack_id`] for a stack its thread has not seen lately: unwound with the CFI, interned,
/// and remembered in the recent-stack entry `e`. Kept out of line, so that the common
/// case (a recent stack) builds no frame arrays.
#[cold]
#[inline(never)]
fn unwind_new(
    at: Regs,
    top: u64,
    depth: u64,
    tables: &crate::table::Tables,
    st: &mut ThreadState,
    e: &mut Recent,
) -> u32 {
    let mut frames = [0u64; MAX_FRAMES];
    let mut slots = [u32::MAX; MAX_FRAMES];
    let n = capture(at, top, &mut st.rules, &mut frames, &mut slots);
    if n == 0 {
        return STACK_UNKNOWN;
    }
    let id = tables.intern_stack(&frames[..n]);
    if slots[1..n].iter().all(|&s| s != u32::MAX) {
        *e = Recent {
            ra: at.pc,
            depth,
            n: n as u32,
            id,
            slots,
            frames,
        };
    } else {
        e.ra = 0;
    }
    id
}

/// Unwinds from `at`; fills frames and, where known, the stack offset of each one's slot.
fn capture(
    at: Regs,
    top: u64,
    rules: &mut Cache,
    out: &mut [u64; MAX_FRAMES],
    slots: &mut [u32; MAX_FRAMES],
) -> usize {
    let mut published = CURRENT.load(Ordering::Acquire);
    if published.is_null() {
        rebuild();
        published = CURRENT.load(Ordering::Acquire);
    }
    let (n, unknown) = walk(published, at, top, rules, out, slots);
    // SAFETY: published unwinders are never freed.
    let p = unsafe { &*published };
    if unknown && loader_generation() != p.generation {
        rebuild();
        return walk(CURRENT.load(Ordering::Acquire), at, top, rules, out, slots).0;
    }
    n
}

/// Walks the stack; returns (frames written, stopped at an address no module knows).
fn walk(
    published: *mut Published,
    at: Regs,
    hi: u64,
    rules: &mut Cache,
    out: &mut [u64; MAX_FRAMES],
    slots: &mut [u32; MAX_FRAMES],
) -> (usize, bool) {
    // SAFETY: published unwinders are never freed.
    let p = unsafe { &*published };
    let Regs { pc, sp, bp } = at;
    let (agent_lo, agent_hi) = agent_text();
    // The last few stack reads, to learn where each return address was found.
    let log: [Cell<(u64, u64)>; 4] = Default::default();
    let logged = Cell::new(0usize);
    let mut read_stack = |addr: u64| {
        if addr >= sp && addr + 8 <= hi && addr.is_multiple_of(8) {
            // SAFETY: addr is an aligned word inside this thread's own mapped stack.
            let v = unsafe { *(addr as *const u64) };
            log[logged.get() % 4].set((addr, v));
            logged.set(logged.get() + 1);
            Ok(v)
        } else {
            Err(())
        }
    };
    // `pc` is a return address: unwind from the call instruction before it.
    let call = pc.wrapping_sub(1);
    let mut it = p.unwinder.iter_frames(
        call,
        UnwindRegsX86_64::new(call, sp, bp),
        rules,
        &mut read_stack,
    );
    let mut n = 0;
    let mut last = 0;
    while let Ok(Some(frame)) = it.next() {
        let a = match frame {
            framehop::FrameAddress::InstructionPointer(_) => pc,
            _ => frame.address(),
        };
        last = a;
        if a >= agent_lo && a < agent_hi {
            continue;
        }
        if n > 0 {
            slots[n] = log
                .iter()
                .map(Cell::get)
                .filter(|e| e.1 == a && e.0 >= sp)
                .last()
                .map_or(u32::MAX, |e| (e.0 - sp) as u32);
        }
        out[n] = a;
        n += 1;
        if n == MAX_FRAMES {
            return (n, false);
        }
    }
    (n, last != 0 && !known(&p.ranges, last))
}
