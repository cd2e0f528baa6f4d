//! The live-block table: exact at any size, resized while the program runs.
//!
//! Blocks are kept in open-addressing tables of 24-byte [`AllocSlot`]s keyed by a strong
//! hash of the address (so an allocator's spacing, 8-byte blocks included, never piles
//! blocks onto the same slots), updated with atomics only. The *newest* table receives new
//! blocks. To resize, a new table is made the newest and every block of the older ones is
//! moved into it ([`move_slot`], by the agent's resizer thread) while other threads keep
//! allocating; an insert that finds its table being drained simply goes to the newest.
//! Nothing is ever dropped: an insert that finds its table too full makes a bigger one
//! itself, and only when the kernel gives no memory is an allocation counted in
//! `Header::dropped` (the CLI then says tracking is incomplete and refuses to reclaim).
//!
//! Invariants a snapshot relies on (a frozen copy of the process reads the tables as they
//! are):
//! * a block is given back to the real allocator only after its slot stopped saying it is
//!   live (tombstone);
//! * a block being moved is live in its old slot (`addr | SLOT_MOVING`) until its copy is
//!   published in the newer table, so it is never missing; the CLI merges duplicates;
//! * a thread freeing a block that is being moved (or checked by a reclaim request) waits
//!   for that one slot, which only the agent's own threads hold, briefly;
//! * a table's memory is given back only once it is empty, and its address range stays
//!   reserved, so a thread still looking at it reads zeros and looks elsewhere.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kal_proto::{
    home_slot, table_state, TableWord, Window, MAX_TABLES, SLOT_BUSY, SLOT_CLAIMING, SLOT_EMPTY,
    SLOT_FLAGS, SLOT_MOVING, SLOT_TOMBSTONE, TABLE_GRAIN,
};

/// Size of a slot in bytes (`AllocSlot`).
pub const SLOT_BYTES: u64 = 24;
/// Slots of the first table (96 KiB: small programs keep it in cache).
pub const MIN_SLOTS: u64 = 1 << 12;
/// Probe length at which an insert asks the resizer to look at the table now.
const HINT_PROBES: u64 = 24;
/// Probe length at which an insert does not wait for the resizer and makes a table twice
/// as big itself.
const GROW_PROBES: u64 = 512;

/// A value alone on its cache lines: what every hook reads must not share a line with what
/// the agent's threads write often.
#[repr(C, align(128))]
pub struct Line<T>(pub T);

impl<T> core::ops::Deref for Line<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One descriptor of the ring (layout of `kal_proto::TableDesc`).
#[repr(C)]
pub struct Desc {
    /// A `TableWord`, or 0 when never used.
    pub word: AtomicU64,
    /// Longest probe distance of any insert into this table.
    pub max_probe: AtomicU64,
}

/// The descriptor ring (the header points the CLI here).
pub static DESCS: Line<[Desc; MAX_TABLES]> = Line(
    [const {
        Desc {
            word: AtomicU64::new(0),
            max_probe: AtomicU64::new(0),
        }
    }; MAX_TABLES],
);

/// The window word (`kal_proto::Window`): which descriptors hold blocks.
pub static WINDOW: Line<AtomicU64> = Line(AtomicU64::new(0));

/// Held (try-lock only, never waited for) while a table is installed.
static INSTALLING: Line<AtomicBool> = Line(AtomicBool::new(false));

thread_local! {
    /// This thread holds [`INSTALLING`].
    static INSTALLING_HERE: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Key word of the slot being moved right now, or 0 (repaired in a fork child).
pub static MOVING_KEY: Line<AtomicU64> = Line(AtomicU64::new(0));
/// Key word of the slot a reclaim request holds right now, or 0.
pub static CLAIMING_KEY: Line<AtomicU64> = Line(AtomicU64::new(0));

/// What the table knew about a block.
#[derive(Clone, Copy)]
pub struct Entry {
    /// Sequence number.
    pub seq: u64,
    /// The packed `kal_proto::Meta` word.
    pub meta: u64,
}

/// Why an insert into one table did not happen.
enum Miss {
    /// The table stopped receiving blocks, or a newer one was made: look again.
    Retry,
    /// Full and no bigger table could be made.
    Full,
}

/// A table as one thread saw it.
#[derive(Clone, Copy)]
struct View {
    word: u64,
    t: TableWord,
    desc: &'static Desc,
}

impl View {
    #[inline(always)]
    fn of(index: usize) -> View {
        let desc = &DESCS[index % MAX_TABLES];
        let word = desc.word.load(Ordering::Acquire);
        View {
            word,
            t: TableWord::decode(word),
            desc,
        }
    }

    /// The three words of slot `i`.
    #[inline(always)]
    fn slot(&self, i: u64) -> &'static [AtomicU64; 3] {
        debug_assert!(i < self.t.slots);
        // SAFETY: the table's mapping is never unmapped (retired tables stay reserved and
        // read as zeros) and i < slots; slots are 8-aligned triples of u64.
        unsafe { &*((self.t.addr + i * SLOT_BYTES) as *const [AtomicU64; 3]) }
    }

    #[inline(always)]
    fn next(&self, i: u64) -> u64 {
        if i + 1 == self.t.slots {
            0
        } else {
            i + 1
        }
    }
}

/// The current window.
#[inline(always)]
pub fn window() -> Window {
    Window::decode(WINDOW.load(Ordering::Acquire))
}

/// Most slots any table may have (`KAL_TABLE_MAX_SLOTS`), or 0 for no limit.
static MAX_SLOTS: AtomicU64 = AtomicU64::new(0);

/// `KAL_TABLE_MAX_SLOTS` as a number of slots (at least one table grain), or 0.
fn max_slots_from_env() -> u64 {
    let name = b"KAL_TABLE_MAX_SLOTS\0";
    debug_assert_eq!(
        &name[..name.len() - 1],
        kal_proto::ENV_TABLE_MAX_SLOTS.as_bytes()
    );
    // SAFETY: getenv with a NUL-terminated name; the result is only read.
    let v = unsafe { libc::getenv(name.as_ptr().cast()) };
    if v.is_null() {
        return 0;
    }
    // SAFETY: getenv returns a NUL-terminated string.
    let s = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
    let mut n: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return 0;
        }
        n = n.saturating_mul(10).saturating_add((c - b'0') as u64);
    }
    if n == 0 {
        0
    } else {
        n.div_ceil(TABLE_GRAIN) * TABLE_GRAIN
    }
}

/// Maps the first table. Called once, before any other function here.
pub fn init() -> bool {
    let cap = max_slots_from_env();
    MAX_SLOTS.store(cap, Ordering::Relaxed);
    let first = if cap == 0 {
        MIN_SLOTS
    } else {
        MIN_SLOTS.min(cap)
    };
    let Some(word) = new_table(first) else {
        return false;
    };
    DESCS[0].word.store(word, Ordering::Release);
    WINDOW.store(
        Window {
            oldest: 0,
            newest: 0,
            generation: 1,
        }
        .encode(),
        Ordering::Release,
    );
    true
}

fn new_table(slots: u64) -> Option<u64> {
    let slots = slots.div_ceil(TABLE_GRAIN) * TABLE_GRAIN;
    let p = crate::mem::map((slots * SLOT_BYTES) as usize, b"kal-blocks\0");
    if p.is_null() {
        return None;
    }
    let word = TableWord {
        addr: p as u64,
        slots,
        state: table_state::LIVE,
    }
    .encode();
    if word.is_none() {
        crate::mem::release(p, (slots * SLOT_BYTES) as usize);
    }
    word
}

/// Probes the fast path of [`insert`] tries before handing over to the general one.
const FAST_PROBES: u64 = 8;

/// Records a live block; false if it could not be recorded (counted by the caller).
#[inline(always)]
pub fn insert(addr: u64, seq: u64, meta: u64) -> bool {
    // Fast path: a free slot near home in the newest table, which is still receiving
    // blocks after the slot was taken (the same steps as `insert_into`).
    let v = View::of(window().newest);
    if v.t.state == table_state::LIVE {
        let mut i = home_slot(addr, v.t.slots);
        for probes in 0..FAST_PROBES {
            let s = v.slot(i);
            let k = s[0].load(Ordering::Relaxed);
            if k == SLOT_EMPTY || k == SLOT_TOMBSTONE {
                if s[0]
                    .compare_exchange(k, SLOT_BUSY, Ordering::SeqCst, Ordering::Relaxed)
                    .is_err()
                {
                    break;
                }
                if v.desc.word.load(Ordering::SeqCst) != v.word {
                    s[0].store(SLOT_TOMBSTONE, Ordering::Release);
                    break;
                }
                s[1].store(seq, Ordering::Relaxed);
                s[2].store(meta, Ordering::Relaxed);
                s[0].store(addr, Ordering::Release);
                if probes > 0 && probes > v.desc.max_probe.load(Ordering::Relaxed) {
                    v.desc.max_probe.fetch_max(probes, Ordering::Relaxed);
                }
                return true;
            }
            i = v.next(i);
        }
    }
    insert_slow(addr, seq, meta)
}

/// [`insert`] in every case: long probes, a table being replaced, a full table.
#[cold]
#[inline(never)]
fn insert_slow(addr: u64, seq: u64, meta: u64) -> bool {
    if INSTALLING_HERE.with(|f| f.get()) {
        // A signal handler's hook interrupted this thread while it installs a table: the
        // window may name a table that no longer takes blocks until the install goes on,
        // so waiting here would never end. Counted as dropped by the caller.
        return false;
    }
    loop {
        let w = window();
        match insert_into(View::of(w.newest), w, addr, seq, meta) {
            Ok(()) => return true,
            Err(Miss::Retry) => continue,
            Err(Miss::Full) => return false,
        }
    }
}

#[inline]
fn insert_into(v: View, w: Window, addr: u64, seq: u64, meta: u64) -> Result<(), Miss> {
    if v.t.state != table_state::LIVE {
        return Err(Miss::Retry);
    }
    let mut i = home_slot(addr, v.t.slots);
    let mut probes = 0;
    loop {
        let s = v.slot(i);
        let k = s[0].load(Ordering::Relaxed);
        if k == SLOT_EMPTY || k == SLOT_TOMBSTONE {
            if s[0]
                .compare_exchange(k, SLOT_BUSY, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                continue; // lost a race for this slot: look at it again
            }
            // The table may have stopped receiving blocks since we looked (a resize): the
            // resizer only drains it after marking it, so if it is still this LIVE table
            // now, the resizer will see this slot busy and wait for the block.
            if v.desc.word.load(Ordering::SeqCst) != v.word {
                s[0].store(SLOT_TOMBSTONE, Ordering::Release);
                return Err(Miss::Retry);
            }
            s[1].store(seq, Ordering::Relaxed);
            s[2].store(meta, Ordering::Relaxed);
            s[0].store(addr, Ordering::Release);
            if probes > v.desc.max_probe.load(Ordering::Relaxed) {
                v.desc.max_probe.fetch_max(probes, Ordering::Relaxed);
            }
            if probes >= HINT_PROBES {
                super::resize::hint();
            }
            return Ok(());
        }
        probes += 1;
        i = v.next(i);
        if probes == GROW_PROBES || probes >= v.t.slots {
            if install(w, v.t.slots * 2) {
                return Err(Miss::Retry);
            }
            if probes >= v.t.slots {
                if INSTALLING.load(Ordering::Acquire) || window() != w {
                    // Another thread is making (or just made) the bigger table (never
                    // this one: hooks do not re-enter): let it finish, then look again.
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                    return Err(Miss::Retry);
                }
                return Err(Miss::Full);
            }
        }
    }
}

/// Makes a new table of `slots` slots the newest, if the window is still `w`; the tables
/// before it then drain into it. Never waits: false if another thread is installing, the
/// ring is full, or the kernel gives no memory.
pub fn install(w: Window, slots: u64) -> bool {
    if INSTALLING.swap(true, Ordering::Acquire) {
        return false;
    }
    INSTALLING_HERE.with(|f| f.set(true));
    let cap = MAX_SLOTS.load(Ordering::Relaxed);
    let slots = if cap == 0 {
        slots.max(MIN_SLOTS)
    } else {
        slots.max(MIN_SLOTS).min(cap)
    };
    let ok = install_locked(w, slots);
    INSTALLING_HERE.with(|f| f.set(false));
    INSTALLING.store(false, Ordering::Release);
    ok
}

fn install_locked(w: Window, slots: u64) -> bool {
    if window() != w {
        return true; // someone else changed it: the caller looks again
    }
    let cap = MAX_SLOTS.load(Ordering::Relaxed);
    let now = TableWord::decode(DESCS[w.newest % MAX_TABLES].word.load(Ordering::Acquire));
    if cap != 0 && slots <= now.slots && slots == cap {
        return false; // at the cap already: no bigger table
    }
    let next = (w.newest + 1) % MAX_TABLES;
    if next == w.oldest % MAX_TABLES {
        return false; // every descriptor holds blocks
    }
    let Some(word) = new_table(slots) else {
        return false;
    };
    DESCS[next].max_probe.store(0, Ordering::Relaxed);
    DESCS[next].word.store(word, Ordering::Release);
    // First the old table stops receiving blocks (inserts that still look at it give up:
    // its word changed), then the window names the new one; the resizer drains a table
    // only once the window shows it is not the newest, so after this store.
    let old = &DESCS[w.newest % MAX_TABLES];
    let t = TableWord::decode(old.word.load(Ordering::Acquire));
    let draining = TableWord {
        state: table_state::DRAINING,
        ..t
    };
    if let Some(dw) = draining.encode() {
        old.word.store(dw, Ordering::SeqCst);
    }
    update_window(|cur| Window {
        newest: next,
        ..cur
    });
    super::resize::hint();
    true
}

fn update_window(f: impl Fn(Window) -> Window) {
    let mut cur = WINDOW.load(Ordering::Acquire);
    loop {
        let w = Window::decode(cur);
        let new = Window {
            generation: w.generation.wrapping_add(1),
            ..f(w)
        };
        match WINDOW.compare_exchange(cur, new.encode(), Ordering::SeqCst, Ordering::Acquire) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Waits while a slot's key is `k` (a block being moved or checked by the agent's own
/// threads, which hold it for a few instructions).
#[cold]
fn wait_while(s: &AtomicU64, k: u64) {
    let mut spins = 0u32;
    while s.load(Ordering::Acquire) == k {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        } else {
            core::hint::spin_loop();
        }
        if spins.is_multiple_of(4096) {
            // In a fork child the agent thread that held the slot does not exist.
            super::resize::repair_after_fork();
        }
    }
}

/// The slot holding live block `addr` in table `v` (waiting out a move or claim of it),
/// with its key word as seen, or `None` if the table does not hold it.
#[inline]
fn find(v: View, addr: u64) -> Option<(&'static [AtomicU64; 3], u64)> {
    if v.t.state == table_state::RETIRED || v.t.slots == 0 {
        return None;
    }
    let limit = v.desc.max_probe.load(Ordering::Relaxed);
    let mut i = home_slot(addr, v.t.slots);
    let mut probes = 0;
    loop {
        let s = v.slot(i);
        let mut k = s[0].load(Ordering::Acquire);
        while k != addr && k & !SLOT_FLAGS == addr && k & SLOT_FLAGS != 0 {
            wait_while(&s[0], k);
            k = s[0].load(Ordering::Acquire);
        }
        if k == addr {
            return Some((s, k));
        }
        if k == SLOT_EMPTY || probes >= limit {
            return None;
        }
        probes += 1;
        i = v.next(i);
    }
}

/// Runs `f` on the slot holding live block `addr`, searching the tables oldest first (a
/// block moves only from older to newer tables, so a search in that order cannot miss
/// it), and again if the tables changed meanwhile. `f` returns `None` to go on looking.
#[inline]
fn locate<R>(addr: u64, mut f: impl FnMut(&'static [AtomicU64; 3]) -> Option<R>) -> Option<R> {
    loop {
        let w = window();
        let mut t = w.oldest;
        loop {
            if let Some((s, _)) = find(View::of(t), addr) {
                if let Some(r) = f(s) {
                    return Some(r);
                }
                continue; // the slot changed under us: search this table again
            }
            if t % MAX_TABLES == w.newest % MAX_TABLES {
                break;
            }
            t += 1;
        }
        if window().generation == w.generation {
            return None;
        }
    }
}

/// Retires block `addr` (the program frees it), returning what was recorded, or `None` if
/// it was not recorded (allocated before the agent, or reclaimed).
#[inline(always)]
pub fn remove(addr: u64) -> Option<Entry> {
    // Fast path: one table, and the block's key found within the table's probe bound. A
    // slot whose key is exactly `addr` is the block's only live record (a copy being
    // moved has its old key flagged), so retiring it here is what the general path does.
    let w = window();
    if w.oldest == w.newest {
        let v = View::of(w.newest);
        if v.t.state == table_state::LIVE {
            let mut i = home_slot(addr, v.t.slots);
            let mut left = v.desc.max_probe.load(Ordering::Relaxed);
            loop {
                let s = v.slot(i);
                let k = s[0].load(Ordering::Acquire);
                if k == addr {
                    let e = Entry {
                        seq: s[1].load(Ordering::Relaxed),
                        meta: s[2].load(Ordering::Relaxed),
                    };
                    if s[0]
                        .compare_exchange(addr, SLOT_TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Some(e);
                    }
                    break;
                }
                if k == SLOT_EMPTY || left == 0 {
                    break;
                }
                left -= 1;
                i = v.next(i);
            }
        }
    }
    remove_slow(addr)
}

/// [`remove`] in every case: several tables, a slot held by an agent thread, a block the
/// table does not know.
#[cold]
#[inline(never)]
fn remove_slow(addr: u64) -> Option<Entry> {
    locate(addr, |s| {
        let e = Entry {
            seq: s[1].load(Ordering::Relaxed),
            meta: s[2].load(Ordering::Relaxed),
        };
        s[0].compare_exchange(addr, SLOT_TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            .then_some(e)
    })
}

/// What is recorded for live block `addr` now.
pub fn peek(addr: u64) -> Option<Entry> {
    locate(addr, |s| {
        Some(Entry {
            seq: s[1].load(Ordering::Relaxed),
            meta: s[2].load(Ordering::Relaxed),
        })
    })
}

/// Takes block `addr` out of the table for a reclaim if its slot still holds allocation
/// `seq` (the address may have been freed and handed out again). The slot is held
/// (`SLOT_CLAIMING`) while its sequence number is compared, so no free can slip between.
pub fn claim(addr: u64, seq: u64) -> Option<Entry> {
    let mut verdict = None;
    locate(addr, |s| {
        if s[0]
            .compare_exchange(
                addr,
                addr | SLOT_CLAIMING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return None;
        }
        CLAIMING_KEY.store(s.as_ptr() as u64, Ordering::Relaxed);
        let e = Entry {
            seq: s[1].load(Ordering::Relaxed),
            meta: s[2].load(Ordering::Relaxed),
        };
        let mine = e.seq == seq;
        s[0].store(if mine { SLOT_TOMBSTONE } else { addr }, Ordering::Release);
        CLAIMING_KEY.store(0, Ordering::Relaxed);
        verdict = mine.then_some(e);
        Some(())
    });
    verdict
}

/// Moves the live block of slot `i` of draining table `index` into the newest table.
/// Returns false if the slot must be looked at again later (busy, or no room anywhere).
pub fn move_slot(index: usize, i: u64) -> bool {
    let v = View::of(index);
    let s = v.slot(i);
    let k = s[0].load(Ordering::Acquire);
    match k {
        SLOT_EMPTY | SLOT_TOMBSTONE => return true,
        k if k < 4096 || k & SLOT_FLAGS != 0 => return false, // being written or claimed
        _ => {}
    }
    if s[0]
        .compare_exchange(k, k | SLOT_MOVING, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    MOVING_KEY.store(s.as_ptr() as u64, Ordering::Relaxed);
    let (seq, meta) = (s[1].load(Ordering::Relaxed), s[2].load(Ordering::Relaxed));
    let moved = insert(k, seq, meta);
    s[0].store(if moved { SLOT_TOMBSTONE } else { k }, Ordering::Release);
    MOVING_KEY.store(0, Ordering::Relaxed);
    moved
}

/// In a fork child: the agent threads that held a slot do not exist; put the slot in
/// the state it has to be in. `key_ptr` is `MOVING_KEY` or `CLAIMING_KEY`'s value.
pub fn repair_slot(key_ptr: u64) {
    if key_ptr == 0 {
        return;
    }
    // SAFETY: the pointer was a live slot's key word of a table that is never unmapped.
    let key = unsafe { &*(key_ptr as *const AtomicU64) };
    let k = key.load(Ordering::Acquire);
    if k < 4096 || k & SLOT_FLAGS == 0 {
        return;
    }
    let addr = k & !SLOT_FLAGS;
    let published = k & SLOT_MOVING != 0 && {
        let w = window();
        find(View::of(w.newest), addr).is_some_and(|(s, _)| s.as_ptr() as u64 != key_ptr)
    };
    key.store(
        if published { SLOT_TOMBSTONE } else { addr },
        Ordering::Release,
    );
}

/// Live and tombstone slots among a sample of table `index` (all of it when small):
/// `(sampled, live, tombstones)`.
pub fn sample(index: usize, seed: &mut u64) -> (u64, u64, u64) {
    let v = View::of(index);
    let n = v.t.slots;
    const RUN: u64 = 64;
    let runs = if n <= 16384 { 1 } else { 256 };
    let len = if runs == 1 { n } else { RUN };
    let (mut seen, mut live, mut tomb) = (0, 0, 0);
    for _ in 0..runs {
        *seed = kal_proto::mix64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
        let start = if runs == 1 { 0 } else { *seed % (n - RUN) };
        for i in start..start + len {
            match v.slot(i)[0].load(Ordering::Relaxed) {
                SLOT_EMPTY => {}
                SLOT_TOMBSTONE => tomb += 1,
                _ => live += 1,
            }
            seen += 1;
        }
    }
    (seen, live, tomb)
}

/// Slots of table `index`.
pub fn slots(index: usize) -> u64 {
    View::of(index).t.slots
}

/// Marks the drained table `index` retired, drops it from the window and gives its
/// memory back. Called by the resizer once every slot of it was moved.
pub fn retire(index: usize) {
    let d = &DESCS[index % MAX_TABLES];
    let t = TableWord::decode(d.word.load(Ordering::Acquire));
    if let Some(w) = (TableWord {
        state: table_state::RETIRED,
        ..t
    })
    .encode()
    {
        d.word.store(w, Ordering::SeqCst);
    }
    update_window(|cur| Window {
        oldest: (cur.oldest + 1) % MAX_TABLES,
        ..cur
    });
    crate::mem::release(t.addr as *mut u8, (t.slots * SLOT_BYTES) as usize);
}

/// Lets a fork child install tables again if the fork happened during an install.
pub fn reset_after_fork() {
    INSTALLING.store(false, Ordering::Release);
}

/// Tombstones every recorded block of every table (`kal attach` after a detach: blocks
/// freed while detached must not look live). Only while nothing else touches the table:
/// every program thread stopped outside the hooks, the agent's threads ended.
pub fn clear_all() {
    let w = window();
    let mut index = w.oldest;
    loop {
        let v = View::of(index);
        if v.t.state != table_state::RETIRED && v.t.addr != 0 {
            for i in 0..v.t.slots {
                let s = v.slot(i);
                let k = s[0].load(Ordering::Acquire);
                if k != SLOT_EMPTY && k != SLOT_TOMBSTONE {
                    s[0].store(SLOT_TOMBSTONE, Ordering::Release);
                }
            }
        }
        if index % MAX_TABLES == w.newest % MAX_TABLES {
            break;
        }
        index = (index + 1) % MAX_TABLES;
    }
}
