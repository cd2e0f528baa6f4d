//! Reclaiming definitely-lost blocks, and learning from contradictions.
//!
//! A block is freed only if its table slot still holds the same allocation (address and
//! sequence number, claimed with one atomic operation). Before it is freed its address is
//! entered in the *reclaimed* set: if the program later frees or reallocates that address
//! (proof that the conservative scan was wrong, e.g. a hidden pointer), the agent does not
//! free it twice, and bans the allocation site (the call site of the allocation, whatever
//! path led to it) from ever being reclaimed again.

use crate::mem;
use crate::table::Tables;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use kal_proto::MAX_BANNED;

const SET_SLOTS: usize = 1 << 18;
const SET_PROBE: usize = 64;
const EMPTY: u64 = 0;
const GONE: u64 = 1;

static SET: AtomicUsize = AtomicUsize::new(0);
/// Stack ids never to reclaim again (read by the CLI through the header).
pub static BANNED: [AtomicU32; MAX_BANNED] = [const { AtomicU32::new(0) }; MAX_BANNED];
/// Number of valid entries in [`BANNED`].
pub static BANNED_LEN: AtomicU64 = AtomicU64::new(0);
/// Blocks and bytes reclaimed so far.
pub static RECLAIMED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The set, mapped on first use; `None` if the kernel gives no memory (nothing is then
/// reclaimed: a block that cannot be remembered is never freed).
fn set() -> Option<*mut [AtomicU64; 2]> {
    let p = SET.load(Ordering::Acquire);
    if p != 0 {
        return Some(p as *mut [AtomicU64; 2]);
    }
    let m = mem::map(SET_SLOTS * 16, b"kal-reclaimed\0") as usize;
    if m == 0 {
        return None;
    }
    match SET.compare_exchange(0, m, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(m as *mut [AtomicU64; 2]),
        Err(other) => Some(other as *mut [AtomicU64; 2]),
    }
}

fn slot(set: *mut [AtomicU64; 2], i: usize) -> &'static [AtomicU64; 2] {
    // SAFETY: i is masked into the set, which is never unmapped.
    unsafe { &*set.add(i & (SET_SLOTS - 1)) }
}

/// Home slot: nearby addresses get nearby slots (few pages touched), each 64 MiB region of
/// the address space at its own offset.
fn home(addr: u64) -> usize {
    ((addr >> 5).wrapping_add((addr >> 26).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40)) as usize
}

/// The set's mapping `(start, length)` (mapped now if it was not yet).
pub fn region() -> (u64, u64) {
    set().map_or((0, 0), |p| (p as u64, (SET_SLOTS * 16) as u64))
}

/// Records `addr` (from site `stack`) as reclaimed; false if the set has no room.
fn remember(addr: u64, stack: u32) -> bool {
    let Some(set) = set() else { return false };
    let h = home(addr);
    for k in 0..SET_PROBE {
        let s = slot(set, h + k);
        let cur = s[0].load(Ordering::Acquire);
        if cur == addr || cur == EMPTY || cur == GONE {
            s[1].store(stack as u64, Ordering::Relaxed);
            s[0].store(addr, Ordering::Release);
            return true;
        }
    }
    false
}

fn forget(addr: u64) {
    let Some(set) = set() else { return };
    let h = home(addr);
    for k in 0..SET_PROBE {
        let s = slot(set, h + k);
        match s[0].load(Ordering::Acquire) {
            a if a == addr => {
                s[0].store(GONE, Ordering::Release);
                return;
            }
            EMPTY => return,
            _ => {}
        }
    }
}

/// The site a reclaimed address came from, if `addr` was reclaimed.
fn reclaimed_site(addr: u64) -> Option<u32> {
    let set = SET.load(Ordering::Acquire) as *mut [AtomicU64; 2];
    if set.is_null() {
        return None;
    }
    let h = home(addr);
    for k in 0..SET_PROBE {
        let s = slot(set, h + k);
        match s[0].load(Ordering::Acquire) {
            a if a == addr => return Some(s[1].load(Ordering::Relaxed) as u32),
            EMPTY => return None,
            _ => {}
        }
    }
    None
}

/// Whether stack `stack` allocates at a banned call site (same innermost frame as a
/// banned stack: the site, whatever path led to it).
pub(crate) fn is_banned(t: &Tables, stack: u32) -> bool {
    let n = (BANNED_LEN.load(Ordering::Acquire) as usize).min(MAX_BANNED);
    if n == 0 {
        return false;
    }
    let site = t.call_site(stack);
    BANNED[..n].iter().any(|b| {
        let b = b.load(Ordering::Relaxed);
        b == stack || (site != 0 && t.call_site(b) == site)
    })
}

/// Bans the call site of stack `stack` from reclaim and parking (a contradiction).
pub(crate) fn ban(stack: u32) {
    let n = (BANNED_LEN.load(Ordering::Acquire) as usize).min(MAX_BANNED);
    if BANNED[..n]
        .iter()
        .any(|b| b.load(Ordering::Relaxed) == stack)
    {
        return;
    }
    let i = BANNED_LEN.load(Ordering::Acquire) as usize;
    if i < MAX_BANNED {
        BANNED[i].store(stack, Ordering::Relaxed);
        BANNED_LEN.store(i as u64 + 1, Ordering::Release);
    }
}

/// Called when the program frees or reallocates `addr` and the table does not know it:
/// true if kal had reclaimed it (then it must not be freed again, and its site is banned).
#[inline]
pub fn contradicts(addr: u64) -> bool {
    match reclaimed_site(addr) {
        Some(site) => {
            ban(site);
            forget(addr);
            true
        }
        None => false,
    }
}

/// What happened to one reclaim entry.
pub enum Outcome {
    /// Freed this many bytes.
    Freed(u64),
    /// No longer that allocation (freed, or reused by the program).
    Stale,
    /// Its site is banned.
    Banned,
}

/// Frees block `addr` if it is still allocation `seq` and its site is not banned.
pub fn reclaim_one(
    t: &Tables,
    addr: u64,
    seq: u64,
    free: unsafe extern "C" fn(*mut core::ffi::c_void),
) -> Outcome {
    let Some(now) = t.peek(addr, seq) else {
        return Outcome::Stale;
    };
    if is_banned(t, now.stack) {
        return Outcome::Banned;
    }
    if !remember(addr, now.stack) {
        return Outcome::Stale;
    }
    match t.claim(addr, seq) {
        Some(r) => {
            // SAFETY: the block was live, unreachable in two snapshots, and is now out of
            // the table: nobody else frees it through the agent.
            unsafe { free(addr as *mut core::ffi::c_void) };
            RECLAIMED[0].fetch_add(1, Ordering::Relaxed);
            RECLAIMED[1].fetch_add(r.size, Ordering::Relaxed);
            Outcome::Freed(r.size)
        }
        None => {
            forget(addr);
            Outcome::Stale
        }
    }
}
