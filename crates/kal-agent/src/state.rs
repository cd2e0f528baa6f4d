//! The agent's process-wide state: its [`Header`] (what the CLI reads) and the tables.

use crate::table::{blocks, Tables};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use kal_proto::{Header, MAGIC, VERSION};

/// The header the CLI reads. Exported under this name so that `kal check PID` can find it
/// in the agent's symbol table.
#[no_mangle]
pub static mut KAL_HEADER: Header = Header {
    magic: 0,
    version: 0,
    header_size: 0,
    table_descs: 0,
    table_window: 0,
    stacks_addr: 0,
    stack_slots: 0,
    static_tls_size: 0,
    glibc_malloc: 0,
    dropped: 0,
    agent_text_start: 0,
    agent_text_end: 0,
    side_addr: 0,
    side_len: 0,
    side_slot: 0,
    reclaimed_blocks: 0,
    reclaimed_bytes: 0,
    banned_addr: 0,
    banned_len: 0,
    reclaimed_set_addr: 0,
    reclaimed_set_len: 0,
    no_side_stack: 0,
    server_tid: 0,
    server_stack_addr: 0,
    server_stack_len: 0,
    freeres: 0,
    freeres_threads: 0,
    park_runs: 0,
    park_runs_high: 0,
};
static mut TABLES: Option<Tables> = None;
static STATE: AtomicU8 = AtomicU8::new(0);

/// Address of the header, sent to the CLI.
pub fn header_addr() -> u64 {
    core::ptr::addr_of!(KAL_HEADER) as u64
}

/// Counts an allocation the table could not record.
pub fn note_dropped() {
    // SAFETY: `dropped` is an aligned u64 inside a static; only updated atomically.
    let d = unsafe { &*(core::ptr::addr_of_mut!(KAL_HEADER.dropped) as *const AtomicU64) };
    d.fetch_add(1, Ordering::Relaxed);
}

/// Counts an allocation hook that ran without a side stack.
pub fn note_no_side_stack() {
    // SAFETY: `no_side_stack` is an aligned u64 inside a static; only updated atomically.
    let d = unsafe { &*(core::ptr::addr_of_mut!(KAL_HEADER.no_side_stack) as *const AtomicU64) };
    d.fetch_add(1, Ordering::Relaxed);
}

/// Records what became of the freeres functions at exit (a `kal_proto::FREERES_*` value
/// and, when skipped for them, how many other program threads ran).
pub fn set_freeres(state: u64, threads: u64) {
    // SAFETY: aligned u64 fields inside a static; only written atomically.
    unsafe {
        (*(core::ptr::addr_of_mut!(KAL_HEADER.freeres_threads) as *const AtomicU64))
            .store(threads, Ordering::Release);
        (*(core::ptr::addr_of_mut!(KAL_HEADER.freeres) as *const AtomicU64))
            .store(state, Ordering::Release);
    }
}

/// Publishes where the control-server thread's stack is (the CLI never scans it).
pub fn set_server_stack(addr: u64, len: u64) {
    // SAFETY: aligned u64 fields inside a static; only written atomically.
    unsafe {
        (*(core::ptr::addr_of_mut!(KAL_HEADER.server_stack_addr) as *const AtomicU64))
            .store(addr, Ordering::Release);
        (*(core::ptr::addr_of_mut!(KAL_HEADER.server_stack_len) as *const AtomicU64))
            .store(len, Ordering::Release);
    }
}

/// Publishes where the parking table is (0: none) and how many of its slots may be in use.
pub fn set_park_runs(addr: u64, high: u64) {
    // SAFETY: aligned u64 fields inside a static; only written atomically.
    unsafe {
        (*(core::ptr::addr_of_mut!(KAL_HEADER.park_runs_high) as *const AtomicU64))
            .store(high, Ordering::Release);
        (*(core::ptr::addr_of_mut!(KAL_HEADER.park_runs) as *const AtomicU64))
            .store(addr, Ordering::Release);
    }
}

/// The thread id of the control-server thread (0: none).
pub fn server_tid() -> u64 {
    // SAFETY: `server_tid` is an aligned u64 inside a static; only accessed atomically.
    let d = unsafe { &*(core::ptr::addr_of!(KAL_HEADER.server_tid) as *const AtomicU64) };
    d.load(Ordering::Acquire)
}

/// Publishes the thread id of the control-server thread (0: none).
pub fn set_server_tid(tid: u64) {
    // SAFETY: `server_tid` is an aligned u64 inside a static; only written atomically.
    let d = unsafe { &*(core::ptr::addr_of_mut!(KAL_HEADER.server_tid) as *const AtomicU64) };
    d.store(tid, Ordering::Release);
}

/// The tables, mapped on first use (from any thread, even before the agent's constructor).
#[inline(always)]
pub fn tables() -> Option<&'static Tables> {
    if STATE.load(Ordering::Acquire) == 2 {
        // SAFETY: TABLES is written once before STATE becomes 2.
        return unsafe { (*core::ptr::addr_of!(TABLES)).as_ref() };
    }
    init_tables()
}

/// The tables if they are mapped already (never maps them nor waits for another thread
/// that does): for a hook that interrupted another one, which may be the one mapping them.
#[inline(always)]
pub fn tables_if_ready() -> Option<&'static Tables> {
    if STATE.load(Ordering::Acquire) == 2 {
        // SAFETY: TABLES is written once before STATE becomes 2.
        return unsafe { (*core::ptr::addr_of!(TABLES)).as_ref() };
    }
    None
}

#[cold]
fn init_tables() -> Option<&'static Tables> {
    if STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let Some(t) = Tables::new() else {
            STATE.store(3, Ordering::Release);
            return None;
        };
        let (sa, sn) = t.stack_range();
        // SAFETY: only this thread writes TABLES/HEADER fields until STATE is 2.
        unsafe {
            *core::ptr::addr_of_mut!(TABLES) = Some(t);
            let h = &mut *core::ptr::addr_of_mut!(KAL_HEADER);
            h.table_descs = blocks::DESCS.as_ptr() as u64;
            h.table_window = blocks::WINDOW.as_ptr() as u64;
            h.stacks_addr = sa;
            h.stack_slots = sn;
            h.header_size = core::mem::size_of::<Header>() as u32;
            h.version = VERSION;
            h.magic = MAGIC;
        }
        STATE.store(2, Ordering::Release);
        // SAFETY: just published.
        return unsafe { (*core::ptr::addr_of!(TABLES)).as_ref() };
    }
    // Another thread maps the tables right now (a few system calls): wait for it, so that
    // no allocation goes unrecorded.
    loop {
        match STATE.load(Ordering::Acquire) {
            1 => core::hint::spin_loop(),
            2 => {
                // SAFETY: TABLES is written once before STATE becomes 2.
                return unsafe { (*core::ptr::addr_of!(TABLES)).as_ref() };
            }
            _ => {
                note_dropped();
                return None;
            }
        }
    }
}

/// Fills the header fields known once the agent has started.
pub fn describe(static_tls: u64, glibc: bool, text: (u64, u64), side: (u64, u64, u64)) {
    // SAFETY: called once from the agent's constructor, before the CLI reads the header.
    unsafe {
        let h = &mut *core::ptr::addr_of_mut!(KAL_HEADER);
        h.static_tls_size = static_tls;
        h.glibc_malloc = glibc as u64;
        h.agent_text_start = text.0;
        h.agent_text_end = text.1;
        h.side_addr = side.0;
        h.side_len = side.1;
        h.side_slot = side.2;
    }
}

/// Copies the reclaim counters and the banned-sites list's length into the header.
pub fn publish_reclaim() {
    // SAFETY: u64 fields of a static, written only by the control thread; the CLI reads
    // them from a frozen process or a snapshot.
    unsafe {
        let h = &mut *core::ptr::addr_of_mut!(KAL_HEADER);
        h.reclaimed_blocks = crate::server::reclaim::RECLAIMED[0].load(Ordering::Relaxed);
        h.reclaimed_bytes = crate::server::reclaim::RECLAIMED[1].load(Ordering::Relaxed);
        h.banned_addr = crate::server::reclaim::BANNED.as_ptr() as u64;
        h.banned_len = crate::server::reclaim::BANNED_LEN.load(Ordering::Relaxed);
        let (a, l) = crate::server::reclaim::region();
        h.reclaimed_set_addr = a;
        h.reclaimed_set_len = l;
    }
}
