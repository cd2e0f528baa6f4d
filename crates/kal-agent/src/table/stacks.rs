//! The stack table: every distinct allocation stack once, keyed by a hash of its frames.
//! Open addressing with atomics only; a published slot is never written again.

use core::sync::atomic::{AtomicU64, Ordering};
use kal_proto::{
    mix64, StackSlot, MAX_FRAMES, STACK_SLOTS, STACK_SLOT_BUSY, STACK_SLOT_EMPTY, STACK_UNKNOWN,
};

/// Longest probe sequence in the stack table.
const MAX_STACK_PROBE: usize = 64;

/// The stack table of one process.
pub struct Stacks {
    slots: *mut StackSlot,
}

// SAFETY: all shared mutation goes through atomics on the slots' hash words; the pointer
// refers to a process-lifetime mapping.
unsafe impl Sync for Stacks {}

impl Stacks {
    /// Maps the table; `None` when the kernel gives no memory.
    pub fn new() -> Option<Stacks> {
        let p = crate::mem::map(
            STACK_SLOTS as usize * core::mem::size_of::<StackSlot>(),
            b"kal-stacks\0",
        );
        (!p.is_null()).then_some(Stacks { slots: p.cast() })
    }

    /// Address and slot count of the table.
    pub fn range(&self) -> (u64, u64) {
        (self.slots as u64, STACK_SLOTS)
    }

    fn hash_word(&self, i: u64) -> &AtomicU64 {
        // SAFETY: i < STACK_SLOTS; the hash is the first, 8-aligned u64 of a slot.
        unsafe {
            &*(core::ptr::addr_of_mut!((*self.slots.add(i as usize)).hash) as *const AtomicU64)
        }
    }

    /// The innermost frame (the allocation's call site) of stack `id`, or 0.
    pub fn call_site(&self, id: u32) -> u64 {
        if id as u64 >= STACK_SLOTS {
            return 0;
        }
        let h = self.hash_word(id as u64).load(Ordering::Acquire);
        // SAFETY: id is inside the table; a published slot is never written again.
        let slot = unsafe { &*self.slots.add(id as usize) };
        if h == STACK_SLOT_EMPTY || h == STACK_SLOT_BUSY || slot.depth == 0 {
            return 0;
        }
        slot.frames[0]
    }

    /// Returns the id of `frames` in the table, adding it if new, or [`STACK_UNKNOWN`]
    /// when the table has no room near its home.
    pub fn intern(&self, frames: &[u64]) -> u32 {
        let n = frames.len().min(MAX_FRAMES);
        let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ n as u64;
        for &f in &frames[..n] {
            h = mix64(h ^ f);
        }
        let h = h | 1; // never EMPTY (0) or BUSY (2)
        let mask = STACK_SLOTS - 1;
        let mut i = h & mask;
        let mut probes = 0;
        while probes < MAX_STACK_PROBE {
            if i == mask {
                // The last id is reserved: slots store 0xffff as "unknown".
                i = 0;
                continue;
            }
            let key = self.hash_word(i);
            let cur = key.load(Ordering::Acquire);
            // SAFETY: i < STACK_SLOTS.
            let slot = unsafe { self.slots.add(i as usize) };
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
            i = (i + 1) & mask;
            probes += 1;
        }
        STACK_UNKNOWN
    }
}
