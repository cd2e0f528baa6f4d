//! The table of parked runs and registered spans, and the small lock the parker and the
//! fault handler share.
//!
//! Only agent threads (the parker, the handler, and a program thread at `fork` or exit)
//! take the lock, never around anything that could fault on a parked page or allocate.
//! Addresses are kept bit-inverted (`!addr`): the table lives in an ordinary mapping that
//! kal's scanner reads as a root, and a plain address of a parked block there would make
//! that block look reachable.

use crate::mem;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Most runs parked at once.
pub const MAX_RUNS: usize = 1 << 16;
/// Most registered spans (each may split a mapping in two, against `vm.max_map_count`).
pub const MAX_SPANS: usize = 4096;

/// A run slot holds nothing.
pub const FREE: u32 = kal_proto::park_state::FREE;
/// The parker is copying the run; its pages are still present (write-protected).
pub const PARKING: u32 = kal_proto::park_state::PARKING;
/// The run's pages are dropped; its bytes are in the store.
pub const PARKED: u32 = kal_proto::park_state::PARKED;

/// Pages parked and restored together: part of one block, at most [`crate::park::RUN_PAGES`]
/// (the layout the CLI reads through [`kal_proto::Header::park_runs`]).
pub type Run = kal_proto::ParkRun;

static LOCK: AtomicBool = AtomicBool::new(false);
static RUNS: AtomicUsize = AtomicUsize::new(0);
static SPANS: AtomicUsize = AtomicUsize::new(0);
/// One past the highest run slot ever used.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Registered spans in use.
static NSPANS: AtomicUsize = AtomicUsize::new(0);

/// Maps the tables; false when the kernel gives no memory.
pub fn init() -> bool {
    if RUNS.load(Ordering::Acquire) == 0 {
        let r = mem::map(MAX_RUNS * core::mem::size_of::<Run>(), b"kal-park-runs\0");
        let s = mem::map(MAX_SPANS * 16, b"kal-park-spans\0");
        if r.is_null() || s.is_null() {
            return false;
        }
        RUNS.store(r as usize, Ordering::Release);
        SPANS.store(s as usize, Ordering::Release);
        crate::state::set_park_runs(r as u64, HIGH.load(Ordering::Relaxed) as u64);
    }
    true
}

/// Forgets every run and span (a fork child: the parent's parking is not its own).
pub fn reset() {
    let r = RUNS.load(Ordering::Acquire);
    if r != 0 {
        mem::release(r as *mut u8, MAX_RUNS * core::mem::size_of::<Run>());
        mem::release(SPANS.load(Ordering::Acquire) as *mut u8, MAX_SPANS * 16);
    }
    HIGH.store(0, Ordering::Release);
    crate::state::set_park_runs(r as u64, 0);
    NSPANS.store(0, Ordering::Release);
    LOCK.store(false, Ordering::Release);
}

/// The table, held through the lock.
pub struct Locked(());

/// Takes the lock (spinning, then yielding: it is held for at most one run's restore).
pub fn lock() -> Locked {
    let mut spins = 0u32;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 100 {
            core::hint::spin_loop();
        } else {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    Locked(())
}

impl Drop for Locked {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

impl Locked {
    /// Run slot `i`.
    pub fn run(&mut self, i: usize) -> &mut Run {
        let base = RUNS.load(Ordering::Acquire) as *mut Run;
        // SAFETY: init mapped MAX_RUNS slots before any lock was taken with runs in use;
        // i < MAX_RUNS; the lock makes this the only reference.
        unsafe { &mut *base.add(i.min(MAX_RUNS - 1)) }
    }

    /// Slots that may be in use.
    pub fn high(&self) -> usize {
        HIGH.load(Ordering::Relaxed)
    }

    /// The run (parking or parked) containing `addr`.
    pub fn find(&mut self, addr: u64) -> Option<usize> {
        (0..self.high()).find(|&i| {
            let r = self.run(i);
            r.state != FREE && r.start() <= addr && addr < r.end()
        })
    }

    /// Whether any run (parking or parked) overlaps `[a, b)`.
    pub fn overlaps(&mut self, a: u64, b: u64) -> bool {
        (0..self.high()).any(|i| {
            let r = self.run(i);
            r.state != FREE && r.start() < b && a < r.end()
        })
    }

    /// A free slot, marked [`PARKING`] with `run`'s fields; `None` when the table is full.
    pub fn add(&mut self, run: Run) -> Option<usize> {
        let high = self.high();
        let i = (0..high)
            .find(|&i| self.run(i).state == FREE)
            .or((high < MAX_RUNS).then_some(high))?;
        if i == high {
            HIGH.store(high + 1, Ordering::Relaxed);
            crate::state::set_park_runs(RUNS.load(Ordering::Acquire) as u64, (high + 1) as u64);
        }
        *self.run(i) = Run {
            state: PARKING,
            abandoned: 0,
            ..run
        };
        Some(i)
    }

    fn span(&mut self, i: usize) -> &mut [u64; 2] {
        let base = SPANS.load(Ordering::Acquire) as *mut [u64; 2];
        // SAFETY: as for runs: mapped by init, index bounded, exclusive under the lock.
        unsafe { &mut *base.add(i.min(MAX_SPANS - 1)) }
    }

    /// Registered spans, as `(start, end)`.
    pub fn spans(&mut self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let n = NSPANS.load(Ordering::Relaxed);
        (0..n).map(move |i| {
            let s = self.span(i);
            (!s[0], !s[1])
        })
    }

    /// Notes `[a, b)` as registered, merged with a span it touches; false when a new span
    /// would exceed [`MAX_SPANS`] (the caller then does not register it).
    pub fn note_span(&mut self, a: u64, b: u64) -> bool {
        let n = NSPANS.load(Ordering::Relaxed);
        for i in 0..n {
            let s = self.span(i);
            let (sa, sb) = (!s[0], !s[1]);
            if a <= sb && sa <= b {
                s[0] = !sa.min(a);
                s[1] = !sb.max(b);
                return true;
            }
        }
        if n >= MAX_SPANS {
            return false;
        }
        *self.span(n) = [!a, !b];
        NSPANS.store(n + 1, Ordering::Relaxed);
        true
    }

    /// Forgets every span overlapping `[a, b)` (unmapped or moved: the kernel dropped the
    /// registration there). Forgetting too much is harmless: registering again is.
    pub fn forget_spans(&mut self, a: u64, b: u64) {
        let mut i = 0;
        while i < NSPANS.load(Ordering::Relaxed) {
            let s = *self.span(i);
            if !s[0] < b && a < !s[1] {
                let last = NSPANS.load(Ordering::Relaxed) - 1;
                *self.span(i) = *self.span(last);
                NSPANS.store(last, Ordering::Relaxed);
            } else {
                i += 1;
            }
        }
    }

    /// Whether `[a, b)` lies inside a span already registered.
    pub fn registered(&mut self, a: u64, b: u64) -> bool {
        self.spans().any(|(sa, sb)| sa <= a && b <= sb)
    }

    /// Number of spans.
    pub fn nspans(&self) -> usize {
        NSPANS.load(Ordering::Relaxed)
    }

    /// Forgets every span (after unregistering them).
    pub fn clear_spans(&mut self) {
        NSPANS.store(0, Ordering::Relaxed);
    }
}
