//! `dlopen` and `dlmopen` of an attached program, hooked through the GOT like the malloc
//! family, so that modules loaded after `kal attach` get their slots redirected too.
//!
//! glibc's `dlopen` looks at its own return address to know its caller: the caller's
//! namespace, `RUNPATH` and `$ORIGIN` decide where the library is searched. A wrapper that
//! called it would make the agent the caller. So the hook never calls it: it jumps to it,
//! with the caller's return address replaced by the address of the caller module's own PLT
//! entry for the function (`jmp *slot(%rip)`, found in the module's code when the slot is
//! redirected). To `dlopen` the caller is that module. When `dlopen` returns there, the
//! PLT entry jumps through the slot — to the hook again, which recognises the return by
//! the thread and stack pointer it registered, redirects the slots of every module now
//! loaded ([`crate::attach::patch`]) and jumps back to the real return address with the
//! result untouched.
//!
//! A module whose slot has no PLT entry (code built with `-fno-plt`, or the function's
//! address taken) keeps its slot: its `dlopen`s are not seen, and modules it opens are
//! redirected at the next one that is. So are calls from a module other than the slot's
//! (a pointer passed around), which the hook forwards untouched. The constructors of a
//! module run inside `dlopen`, before its slots are redirected: what they allocate is not
//! in the table (a check finds it in glibc's heap, as from before the attach).
//!
//! Nothing here allocates; the registrations of calls in flight live in a static array.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Which function a hook stands for.
pub const DLOPEN: usize = 0;
/// See [`DLOPEN`].
pub const DLMOPEN: usize = 1;

/// The hooked names, by index.
pub const NAMES: [&[u8]; 2] = [b"dlopen", b"dlmopen"];

/// The real functions (the global scope's definitions), by index.
static REAL: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];

/// Modules whose slots point at the hooks: code range and PLT entry address, by index.
const MAX_MODULES: usize = 256;
struct Module {
    lo: AtomicUsize,
    hi: AtomicUsize,
    plt: [AtomicUsize; 2],
}
static MODULES: [Module; MAX_MODULES] = [const {
    Module {
        lo: AtomicUsize::new(0),
        hi: AtomicUsize::new(0),
        plt: [const { AtomicUsize::new(0) }; 2],
    }
}; MAX_MODULES];
static MODULES_LEN: AtomicUsize = AtomicUsize::new(0);

/// Calls in flight: (thread pointer, stack pointer at entry, real return address).
const MAX_PENDING: usize = 128;
struct Pending {
    tp: AtomicUsize,
    sp: AtomicUsize,
    ret: AtomicUsize,
}
static PENDING: [Pending; MAX_PENDING] = [const {
    Pending {
        tp: AtomicUsize::new(0),
        sp: AtomicUsize::new(0),
        ret: AtomicUsize::new(0),
    }
}; MAX_PENDING];
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Resolves the real functions (once, from the constructor or an attach).
pub fn resolve() {
    for (i, name) in [c"dlopen", c"dlmopen"].iter().enumerate() {
        // SAFETY: dlsym with a valid NUL-terminated name.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        REAL[i].store(f as usize, Ordering::Release);
    }
}

/// The hook standing for `name`, if it is hooked and its real function is known.
pub fn hook_for(name: &[u8]) -> Option<(usize, usize)> {
    let i = NAMES.iter().position(|n| *n == name)?;
    if REAL[i].load(Ordering::Acquire) == 0 {
        return None;
    }
    let h = if i == DLOPEN {
        kal_dlopen_hook as *const () as usize
    } else {
        kal_dlmopen_hook as *const () as usize
    };
    Some((i, h))
}

/// The address of the PLT entry (`jmp *slot(%rip)`, or `bnd jmp`) that jumps through GOT
/// slot `slot`, in the executable ranges `code`, if there is one.
pub fn plt_entry(code: &[(usize, usize)], slot: usize) -> Option<usize> {
    for &(lo, hi) in code {
        // PLT sections come first in a module's code: look at its first MiB.
        let hi = hi.min(lo + (1 << 20));
        let mut a = lo;
        while a + 6 <= hi {
            // SAFETY: [lo, hi) is a readable, executable segment of a loaded module.
            let b = unsafe { core::slice::from_raw_parts(a as *const u8, 7.min(hi - a)) };
            let (op, len) = if b[0] == 0xff && b[1] == 0x25 {
                (2, 6)
            } else if b.len() == 7 && b[0] == 0xf2 && b[1] == 0xff && b[2] == 0x25 {
                (3, 7)
            } else {
                a += 1;
                continue;
            };
            let rel = i32::from_le_bytes([b[op], b[op + 1], b[op + 2], b[op + 3]]);
            if (a + len).wrapping_add(rel as isize as usize) == slot {
                return Some(a);
            }
            a += 1;
        }
    }
    None
}

/// Remembers that module code `[lo, hi)` calls hook `which` through its PLT entry `plt`.
pub fn add_module(lo: usize, hi: usize, which: usize, plt: usize) {
    let n = MODULES_LEN.load(Ordering::Acquire);
    for m in &MODULES[..n] {
        if m.lo.load(Ordering::Relaxed) == lo {
            m.plt[which].store(plt, Ordering::Release);
            return;
        }
    }
    if n >= MAX_MODULES {
        return;
    }
    let m = &MODULES[n];
    m.lo.store(lo, Ordering::Relaxed);
    m.hi.store(hi, Ordering::Relaxed);
    m.plt[which].store(plt, Ordering::Release);
    MODULES_LEN.store(n + 1, Ordering::Release);
}

fn plt_of(caller: usize, which: usize) -> usize {
    let n = MODULES_LEN.load(Ordering::Acquire);
    MODULES[..n]
        .iter()
        .find(|m| caller >= m.lo.load(Ordering::Relaxed) && caller < m.hi.load(Ordering::Relaxed))
        .map_or(0, |m| m.plt[which].load(Ordering::Acquire))
}

/// Calls of the hooks still to come back.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads the thread pointer (fs:0 holds the TCB's own address on x86-64 glibc).
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly))
    };
    tp
}

/// What the hook does next: jump to `out[0]` as is (0), jump to `out[0]` with the return
/// address replaced by `out[1]` (1), or return to `out[0]` (2).
const PLAIN: u64 = 0;
const CALL: u64 = 1;
const RETURN: u64 = 2;

/// The hooks' decision. `frame`: the hook's saved registers, then two words out; `entry`:
/// the stack pointer at the hook's entry (the caller's return address, for a call).
extern "C" fn kal_dl_enter(frame: *mut usize, entry: usize, which: usize) -> u64 {
    // SAFETY: the hook passes its own frame of 9 words, the last two out.
    let out = unsafe { frame.add(7) };
    let tp = thread_pointer();
    // Coming back from the real function (its `ret` popped the address at `entry - 8`)?
    if IN_FLIGHT.load(Ordering::Acquire) > 0 {
        for p in &PENDING {
            if p.tp.load(Ordering::Acquire) == tp && p.sp.load(Ordering::Acquire) == entry - 8 {
                let ret = p.ret.load(Ordering::Acquire);
                p.sp.store(0, Ordering::Release);
                p.tp.store(0, Ordering::Release);
                IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
                if !crate::attach::detached() {
                    crate::attach::patch_new();
                }
                // SAFETY: `out` is the frame's first out word.
                unsafe { *out = ret };
                return RETURN;
            }
        }
    }
    let real = REAL[which].load(Ordering::Acquire);
    // SAFETY: out words of the frame.
    unsafe { *out = real };
    if crate::attach::detached() {
        return PLAIN;
    }
    // SAFETY: the caller's return address, pushed by its call.
    let ret = unsafe { *(entry as *const usize) };
    let plt = plt_of(ret, which);
    if plt == 0 {
        return PLAIN;
    }
    for p in &PENDING {
        if p.tp
            .compare_exchange(0, tp, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            p.ret.store(ret, Ordering::Release);
            p.sp.store(entry, Ordering::Release);
            IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
            // SAFETY: second out word.
            unsafe { *out.add(1) = plt };
            return CALL;
        }
    }
    PLAIN
}

/// Defines a naked hook that saves the argument registers and `rax`, asks
/// [`kal_dl_enter`] what to do, restores them and does it. It is entered by a call (stack
/// pointer 8 mod 16) or, coming back, by a jump from a PLT entry (0 mod 16): it aligns.
macro_rules! dl_hook {
    ($(#[$doc:meta])* $name:ident, $which:expr) => {
        $(#[$doc])*
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                "push rbp",
                "mov rbp, rsp",
                "and rsp, -16",
                // Frame: rax, rdi, rsi, rdx, rcx, r8, r9, 2 out, 1 spare.
                "sub rsp, 80",
                "mov [rsp], rax",
                "mov [rsp + 8], rdi",
                "mov [rsp + 16], rsi",
                "mov [rsp + 24], rdx",
                "mov [rsp + 32], rcx",
                "mov [rsp + 40], r8",
                "mov [rsp + 48], r9",
                "mov rdi, rsp",
                "lea rsi, [rbp + 8]",
                "mov edx, {which}",
                "call {enter}",
                "mov r11, rax",
                "mov rax, [rsp]",
                "mov rdi, [rsp + 8]",
                "mov rsi, [rsp + 16]",
                "mov rdx, [rsp + 24]",
                "mov rcx, [rsp + 32]",
                "mov r8, [rsp + 40]",
                "mov r9, [rsp + 48]",
                "cmp r11, 1",
                "jne 2f",
                // A call: the caller module's PLT entry becomes the return address.
                "mov r10, [rsp + 64]",
                "mov [rbp + 8], r10",
                "2:",
                // Jump to the real function, or back to the caller (a return).
                "mov r11, [rsp + 56]",
                "mov rsp, rbp",
                "pop rbp",
                "jmp r11",
                which = const $which,
                enter = sym kal_dl_enter,
            )
        }
    };
}

dl_hook!(
    /// Stands for `dlopen` in a module's GOT.
    kal_dlopen_hook,
    DLOPEN
);
dl_hook!(
    /// Stands for `dlmopen` in a module's GOT.
    kal_dlmopen_hook,
    DLMOPEN
);

const _: () = assert!(PLAIN == 0 && CALL == 1 && RETURN == 2);
