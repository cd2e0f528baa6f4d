//! The live-allocation table and the stack table, in private anonymous memory of the target.
//!
//! Both are open-addressing hash tables updated with atomics only, so any number of threads
//! record allocations at once without locks, and a frozen copy of the process (at exit or in
//! a fork snapshot) holds a consistent table: an entry is published with a release store of
//! its address after its fields are written, and retired (tombstone) before the block is
//! given back to the real allocator.

use core::sync::atomic::{AtomicU64, Ordering};
use kal_proto::{
    AllocSlot, StackSlot, MAX_FRAMES, SLOT_BUSY, SLOT_EMPTY, SLOT_TOMBSTONE, STACK_SLOT_BUSY,
    STACK_SLOT_EMPTY, STACK_UNKNOWN,
};

/// Longest probe sequence in the allocation table before an insert gives up.
const MAX_PROBE: usize = 512;
/// Longest probe sequence in the stack table.
const MAX_STACK_PROBE: usize = 64;

/// Default number of allocation slots (4 Mi slots × 32 bytes = 128 MiB of address space,
/// reserved without backing; only touched pages use memory).
pub const DEFAULT_SLOTS: u64 = 1 << 22;
/// Number of stack slots.
pub const STACK_SLOTS: u64 = 1 << 16;

/// The two tables of one process.
pub struct Tables {
    slots: *mut AllocSlot,
    mask: u64,
    stacks: *mut StackSlot,
    stack_mask: u64,
}

// SAFETY: all shared mutation goes through atomics on the slots' key words; the raw
// pointers refer to a process-lifetime mapping.
unsafe impl Sync for Tables {}

/// What the table knew about a block that was removed.
#[derive(Clone, Copy)]
pub struct Removed {
    /// Requested size.
    pub size: u64,
    /// Sequence number.
    pub seq: u64,
    /// Stack id.
    pub stack: u32,
    /// Allocation API.
    pub api: u32,
}

/// Home slot of a block address: blocks close in memory get slots close in the table (the
/// heap's working set touches few table pages), and each 64 MiB region of the address
/// space starts at its own offset so that arenas do not pile onto the same slots.
#[inline(always)]
fn home(addr: u64) -> u64 {
    (addr >> 4).wrapping_add(mix(addr >> 26))
}

#[inline(always)]
fn mix(x: u64) -> u64 {
    let x = x ^ (x >> 29);
    let x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 32)
}

/// `lock cmpxchg16b`: if the 16 bytes at `p` equal `old`, store `new`; returns success.
///
/// # Safety
/// `p` must be 16-byte aligned and valid for reads and writes of 16 bytes.
unsafe fn cas128(p: *mut u64, old: [u64; 2], new: [u64; 2]) -> bool {
    let ok: u8;
    // SAFETY: per the contract; rbx (reserved by LLVM) is swapped in and restored around
    // the instruction.
    unsafe {
        core::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "sete {ok}",
            "mov rbx, {tmp}",
            p = in(reg) p,
            tmp = inout(reg) new[0] => _,
            ok = out(reg_byte) ok,
            inout("rax") old[0] => _,
            inout("rdx") old[1] => _,
            in("rcx") new[1],
            options(nostack),
        );
    }
    ok != 0
}

/// Maps `len` bytes of zero-filled private memory with no swap reservation.
pub fn map(len: usize) -> *mut u8 {
    // SAFETY: anonymous private mapping, no file involved.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        crate::diag::fatal(b"kal agent: cannot map the allocation table\n");
    }
    p.cast()
}

impl Tables {
    /// Maps both tables; `slots` must be a power of two.
    pub fn new(slots: u64) -> Tables {
        let table = map(slots as usize * core::mem::size_of::<AllocSlot>());
        let stacks = map(STACK_SLOTS as usize * core::mem::size_of::<StackSlot>());
        Tables {
            slots: table.cast(),
            mask: slots - 1,
            stacks: stacks.cast(),
            stack_mask: STACK_SLOTS - 1,
        }
    }

    /// Address and slot count of the allocation table.
    pub fn table_range(&self) -> (u64, u64) {
        (self.slots as u64, self.mask + 1)
    }

    /// Address and slot count of the stack table.
    pub fn stack_range(&self) -> (u64, u64) {
        (self.stacks as u64, self.stack_mask + 1)
    }

    #[inline(always)]
    fn key(&self, i: u64) -> &AtomicU64 {
        // SAFETY: i is masked into the table; addr is the first u64 of a 32-byte slot and
        // the mapping is 8-aligned, so viewing it as an AtomicU64 is sound.
        unsafe {
            &*(core::ptr::addr_of_mut!((*self.slots.add(i as usize)).addr) as *const AtomicU64)
        }
    }

    /// Records a live block.
    #[inline]
    pub fn insert(&self, addr: u64, size: u64, seq: u64, stack: u32, api: u32) {
        let mut i = home(addr) & self.mask;
        let mut probes = 0;
        while probes < MAX_PROBE {
            let key = self.key(i);
            let cur = key.load(Ordering::Relaxed);
            if (cur == SLOT_EMPTY || cur == SLOT_TOMBSTONE)
                && key
                    .compare_exchange(cur, SLOT_BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // SAFETY: this thread owns the slot while it is BUSY.
                unsafe {
                    let s = self.slots.add(i as usize);
                    (*s).seq = seq;
                    (*s).size = size;
                    (*s).stack = stack;
                    (*s).api = api;
                }
                key.store(addr, Ordering::Release);
                return;
            }
            if cur == SLOT_EMPTY || cur == SLOT_TOMBSTONE {
                continue; // lost a race for this slot: look at it again
            }
            i = (i + 1) & self.mask;
            probes += 1;
        }
        crate::state::note_dropped();
    }

    /// Index of the slot holding live block `addr`, if recorded.
    #[inline]
    fn find(&self, addr: u64) -> Option<u64> {
        let mut i = home(addr) & self.mask;
        for _ in 0..MAX_PROBE {
            match self.key(i).load(Ordering::Acquire) {
                cur if cur == addr => return Some(i),
                SLOT_EMPTY => return None,
                _ => i = (i + 1) & self.mask,
            }
        }
        None
    }

    /// What slot `i` records. Only trusted while its key still holds the block's address.
    #[inline]
    fn read(&self, i: u64) -> Removed {
        // SAFETY: i is inside the table; the fields are plain data.
        unsafe {
            let s = self.slots.add(i as usize);
            Removed {
                size: (*s).size,
                seq: (*s).seq,
                stack: (*s).stack,
                api: (*s).api,
            }
        }
    }

    /// Retires the block at `addr`, returning what was recorded, or `None` if it was not
    /// recorded (allocated before the agent, or dropped).
    #[inline]
    pub fn remove(&self, addr: u64) -> Option<Removed> {
        let i = self.find(addr)?;
        // Only the thread freeing the block touches its slot now.
        let r = self.read(i);
        self.key(i)
            .compare_exchange(addr, SLOT_TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            .then_some(r)
    }

    /// Claims the block at `addr` for freeing if its slot still holds allocation `seq`:
    /// one 16-byte compare-and-swap of (address, sequence number) to (tombstone, seq), so a
    /// block the program freed — and whose address it may have been handed again — is never
    /// claimed. Returns what was recorded, or `None`.
    pub fn claim(&self, addr: u64, seq: u64) -> Option<Removed> {
        let i = self.find(addr)?;
        let r = self.read(i);
        // SAFETY: slots are 32-byte aligned inside our mapping; (addr, seq) are its first
        // 16 bytes. The fields read above are trusted only if the claim succeeds.
        let ok = unsafe {
            cas128(
                self.slots.add(i as usize).cast::<u64>(),
                [addr, seq],
                [SLOT_TOMBSTONE, seq],
            )
        };
        (ok && r.seq == seq).then_some(r)
    }

    /// What is recorded for `addr` if it holds allocation `seq` now.
    pub fn peek(&self, addr: u64, seq: u64) -> Option<Removed> {
        let r = self.read(self.find(addr)?);
        (r.seq == seq).then_some(r)
    }

    /// The innermost frame (the allocation's call site) of stack `id`, or 0.
    pub fn call_site(&self, id: u32) -> u64 {
        if id as u64 > self.stack_mask {
            return 0;
        }
        // SAFETY: id is inside the stack table; a published slot is never written again.
        unsafe {
            let slot = self.stacks.add(id as usize);
            let key = &*(core::ptr::addr_of_mut!((*slot).hash) as *const AtomicU64);
            let h = key.load(Ordering::Acquire);
            if h == STACK_SLOT_EMPTY || h == STACK_SLOT_BUSY || (*slot).depth == 0 {
                return 0;
            }
            (*slot).frames[0]
        }
    }

    /// Returns the id of `frames` in the stack table, adding it if new.
    pub fn intern_stack(&self, frames: &[u64]) -> u32 {
        let n = frames.len().min(MAX_FRAMES);
        let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ n as u64;
        for &f in &frames[..n] {
            h = mix(h ^ f);
        }
        let h = h | 1; // never EMPTY (0) or BUSY (2)
        let mut i = h & self.stack_mask;
        let mut probes = 0;
        while probes < MAX_STACK_PROBE {
            // SAFETY: i is masked into the stack table; hash is its first u64.
            let slot = unsafe { self.stacks.add(i as usize) };
            // SAFETY: as above, the hash word is 8-aligned.
            let key = unsafe { &*(core::ptr::addr_of_mut!((*slot).hash) as *const AtomicU64) };
            let cur = key.load(Ordering::Acquire);
            if cur == h {
                // SAFETY: a published slot is never written again.
                let same =
                    unsafe { (*slot).depth as usize == n && (&(*slot).frames)[..n] == frames[..n] };
                if same {
                    return i as u32;
                }
            } else if cur == STACK_SLOT_EMPTY {
                if key
                    .compare_exchange(
                        STACK_SLOT_EMPTY,
                        STACK_SLOT_BUSY,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    // SAFETY: this thread owns the slot while it is BUSY.
                    unsafe {
                        (*slot).depth = n as u32;
                        (&mut (*slot).frames)[..n].copy_from_slice(&frames[..n]);
                    }
                    key.store(h, Ordering::Release);
                    return i as u32;
                }
                continue;
            }
            i = (i + 1) & self.stack_mask;
            probes += 1;
        }
        STACK_UNKNOWN
    }
}
