//! Types shared by the kal agent (`libkal_agent.so`, injected into the target) and the kal CLI.
//!
//! The agent keeps its live-allocation table in the target's own private memory. The CLI
//! reads it from a frozen process (or from a copy-on-write snapshot of one), so that the
//! table is always consistent with the heap it describes. Everything the CLI needs to find
//! the table is in one [`Header`], whose address the agent sends in its [`Hello`] message.
//!
//! The layout is versioned: a CLI refuses a header whose [`Header::magic`] or
//! [`Header::version`] it does not know.
//!
//! ```
//! use kal_proto::{AllocSlot, SLOT_EMPTY, slot_state};
//! let slot = AllocSlot { addr: SLOT_EMPTY, seq: 0, meta: 0 };
//! assert_eq!(slot_state(slot.addr), kal_proto::SlotState::Empty);
//! ```
#![no_std]

#[cfg(test)]
extern crate std;

pub mod ctl;

/// Magic number at the start of the agent header ("KALAGENT" in little-endian ASCII).
pub const MAGIC: u64 = u64::from_le_bytes(*b"KALAGENT");
/// Version of the header and table layout. Bump on any incompatible change.
pub const VERSION: u32 = 5;

/// Maximum number of frames stored for one allocation stack.
pub const MAX_FRAMES: usize = 24;

/// Name of the environment variable holding the path of the CLI's unix socket.
pub const ENV_SOCKET: &str = "KAL_SOCKET";

/// Environment variable capping the agent's allocation table at this many slots (24 bytes
/// each), to bound the agent's memory. Allocations that do not fit are not recorded: they
/// are counted, reports say tracking is incomplete, and nothing is reclaimed.
pub const ENV_TABLE_MAX_SLOTS: &str = "KAL_TABLE_MAX_SLOTS";

/// Environment variable kal sets (to `1`) in the program when `--no-freeres` is given: the
/// agent then does not run `__libc_freeres`/`__gnu_cxx::__freeres` at exit.
pub const ENV_NO_FREERES: &str = "KAL_NO_FREERES";

/// Environment variable `kal run` sets (to `1`) when it traces the program's processes: the
/// agent then waits (at most [`HELLO_ACK_WAIT_MS`]) for one byte after its hello, so that kal
/// traces the process before it runs on, and a fatal signal soon after start is seen.
pub const ENV_HELLO_ACK: &str = "KAL_HELLO_ACK";

/// How long the agent waits for kal's answer to its hello, in milliseconds, when
/// [`ENV_HELLO_ACK`] asks it to.
pub const HELLO_ACK_WAIT_MS: u64 = 2000;

/// `AllocSlot::addr` value of a slot that never held an allocation.
pub const SLOT_EMPTY: u64 = 0;
/// `AllocSlot::addr` value of a slot whose allocation was freed (or moved to a newer table).
pub const SLOT_TOMBSTONE: u64 = 1;
/// `AllocSlot::addr` value of a slot being written by the agent right now.
pub const SLOT_BUSY: u64 = 2;
/// Low bit set on a live block's address while the agent copies the slot to a newer table
/// (the block is live; the copy may be present too).
pub const SLOT_MOVING: u64 = 1;
/// Bit set on a live block's address while a reclaim request checks its sequence number
/// (the block is live).
pub const SLOT_CLAIMING: u64 = 2;
/// Block addresses are at least 8-aligned: the low three bits of the address word are the
/// `SLOT_MOVING` / `SLOT_CLAIMING` flags.
pub const SLOT_FLAGS: u64 = 7;

/// Stack id meaning "no stack was recorded" (stack table full or unwinding failed).
pub const STACK_UNKNOWN: u32 = u32::MAX;

/// Where the glibc chunk flags sit in [`Meta::api`].
pub const CHUNK_FLAGS_SHIFT: u32 = 8;
/// glibc chunk flag: the chunk is its own `mmap`.
pub const CHUNK_IS_MMAPPED: u32 = 2;
/// glibc chunk flag: the chunk lives in a secondary arena's heap.
pub const CHUNK_NON_MAIN_ARENA: u32 = 4;

/// State of a table slot, decoded from its address word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Never used.
    Empty,
    /// Freed.
    Tombstone,
    /// Being written; treat as absent.
    Busy,
    /// Holds a live allocation at this address.
    Live(u64),
}

/// Decodes the address word of an [`AllocSlot`]. A block being moved to a newer table or
/// checked by a reclaim request is live.
pub fn slot_state(addr: u64) -> SlotState {
    match addr {
        SLOT_EMPTY => SlotState::Empty,
        SLOT_TOMBSTONE => SlotState::Tombstone,
        a if a < 4096 => SlotState::Busy,
        a => SlotState::Live(a & !SLOT_FLAGS),
    }
}

/// Which allocation function created a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Api {
    /// `malloc`
    Malloc = 0,
    /// `calloc`
    Calloc = 1,
    /// `realloc` or `reallocarray`
    Realloc = 2,
    /// `memalign`, `posix_memalign`, `aligned_alloc`, `valloc` or `pvalloc`
    Memalign = 3,
}

impl Api {
    /// Decodes the `api` field of a [`Meta`] (its low 8 bits).
    pub fn from_u32(v: u32) -> Api {
        match v & 0xff {
            1 => Api::Calloc,
            2 => Api::Realloc,
            3 => Api::Memalign,
            _ => Api::Malloc,
        }
    }

    /// The C name of the function family.
    pub fn name(self) -> &'static str {
        match self {
            Api::Malloc => "malloc",
            Api::Calloc => "calloc",
            Api::Realloc => "realloc",
            Api::Memalign => "memalign",
        }
    }
}

/// One entry of a live-allocation table (open addressing, keyed by address): 24 bytes.
///
/// The agent writes `seq` and `meta` while `addr` is [`SLOT_BUSY`], then publishes the
/// address with a release store; it frees by turning `addr` into [`SLOT_TOMBSTONE`]
/// *before* calling the real `free`. So a reader never sees a freed block as live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AllocSlot {
    /// Block address (possibly with [`SLOT_MOVING`] or [`SLOT_CLAIMING`] set), or one of
    /// the `SLOT_*` markers.
    pub addr: u64,
    /// Allocation sequence number, unique per process lifetime.
    pub seq: u64,
    /// Requested size, allocation API, chunk flags and stack id: see [`Meta`].
    pub meta: u64,
}

/// Largest requested size a slot can hold (16 TiB − 1); a larger block is not recorded
/// and counted in [`Header::dropped`].
pub const MAX_SIZE: u64 = (1 << 44) - 1;

/// The decoded `meta` word of an [`AllocSlot`]: size in bits 0–43, the [`Api`] in bits
/// 44–45, glibc's `IS_MMAPPED` and `NON_MAIN_ARENA` chunk flags in bits 46–47, the stack id
/// in bits 48–63 (`0xffff` = [`STACK_UNKNOWN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Requested size in bytes.
    pub size: u64,
    /// Index into the stack table, or [`STACK_UNKNOWN`].
    pub stack: u32,
    /// The [`Api`] (low 8 bits) and glibc's chunk flags shifted by [`CHUNK_FLAGS_SHIFT`].
    pub api: u32,
}

impl Meta {
    /// Packs into a slot's `meta` word; `None` if the size exceeds [`MAX_SIZE`].
    #[inline]
    pub fn pack(self) -> Option<u64> {
        if self.size > MAX_SIZE {
            return None;
        }
        let api = (self.api & 3) as u64;
        let flags = ((self.api >> CHUNK_FLAGS_SHIFT) as u64 >> 1) & 3;
        let stack = if self.stack >= STACK_SLOTS as u32 - 1 {
            0xffff
        } else {
            self.stack as u64
        };
        Some(self.size | api << 44 | flags << 46 | stack << 48)
    }

    /// Unpacks a slot's `meta` word.
    #[inline]
    pub fn unpack(w: u64) -> Meta {
        let stack = (w >> 48) as u32;
        Meta {
            size: w & MAX_SIZE,
            stack: if stack == 0xffff {
                STACK_UNKNOWN
            } else {
                stack
            },
            api: ((w >> 44) & 3) as u32 | ((((w >> 46) & 3) as u32) << 1) << CHUNK_FLAGS_SHIFT,
        }
    }
}

/// Number of slots of the stack table (stack ids are below `STACK_SLOTS - 1`).
pub const STACK_SLOTS: u64 = 1 << 16;

/// Number of table descriptors (a ring: a resize takes the next one).
pub const MAX_TABLES: usize = 64;

/// State of an allocation table, in [`TableWord::state`].
pub mod table_state {
    /// Receives new blocks (only the newest table).
    pub const LIVE: u64 = 1;
    /// Being emptied into the newest table: holds live blocks, receives none.
    pub const DRAINING: u64 = 2;
    /// Empty; its memory was given back (the address range stays reserved).
    pub const RETIRED: u64 = 3;
}

/// One allocation table descriptor. The agent resizes by creating a new table and moving
/// every block into it while the program runs; blocks live in the tables
/// `oldest..=newest` (modulo [`MAX_TABLES`]) of the [`Window`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TableDesc {
    /// A [`TableWord`]: address, size and state in one atomically updated word, so that
    /// a thread never pairs one table's address with another's size.
    pub word: u64,
    /// Longest probe distance any insert used (a lookup never needs to go further).
    pub max_probe: u64,
}

/// Where a table is, how many slots it has, and its [`table_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableWord {
    /// Address of the `AllocSlot` array (page-aligned, below 2^47).
    pub addr: u64,
    /// Number of slots (a multiple of [`TABLE_GRAIN`]).
    pub slots: u64,
    /// One of [`table_state`].
    pub state: u64,
}

/// Table sizes are multiples of this many slots.
pub const TABLE_GRAIN: u64 = 512;

impl TableWord {
    /// Encodes; `None` if the address or size does not fit.
    #[inline(always)]
    pub fn encode(self) -> Option<u64> {
        let (a, n) = (self.addr >> 12, self.slots / TABLE_GRAIN);
        let fits = self.addr & 0xfff == 0
            && a < 1 << 35
            && n < 1 << 27
            && self.slots.is_multiple_of(TABLE_GRAIN)
            && self.state < 4;
        fits.then_some(a << 29 | n << 2 | self.state)
    }

    /// Decodes a descriptor word.
    #[inline(always)]
    pub fn decode(w: u64) -> TableWord {
        TableWord {
            addr: (w >> 29) << 12,
            slots: ((w >> 2) & ((1 << 27) - 1)) * TABLE_GRAIN,
            state: w & 3,
        }
    }
}

/// The table window word: `(generation << 32) | (oldest << 16) | newest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Index of the oldest table holding blocks.
    pub oldest: usize,
    /// Index of the table receiving new blocks.
    pub newest: usize,
    /// Bumped on every change.
    pub generation: u32,
}

impl Window {
    /// Decodes a window word.
    #[inline(always)]
    pub fn decode(w: u64) -> Window {
        Window {
            oldest: ((w >> 16) & 0xffff) as usize,
            newest: (w & 0xffff) as usize,
            generation: (w >> 32) as u32,
        }
    }

    /// Encodes a window word.
    #[inline(always)]
    pub fn encode(self) -> u64 {
        (self.generation as u64) << 32 | (self.oldest as u64) << 16 | self.newest as u64
    }
}

/// Home slot of a block address in a table of `slots` slots: Fibonacci hashing of the
/// address (consecutive and evenly spaced addresses land far apart, so an allocator's
/// 8-byte spacing never piles blocks onto the same slots), reduced to the range by
/// multiplication (any table size works).
#[inline(always)]
pub fn home_slot(addr: u64, slots: u64) -> u64 {
    let h = (addr >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h as u128 * slots as u128) >> 64) as u64
}

/// A 64-bit finaliser (splitmix64's).
#[inline(always)]
pub fn mix64(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One entry of the stack table (open addressing, keyed by a hash of the frames).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct StackSlot {
    /// Hash of the frames with the low bit set, 0 when empty, 2 while being written.
    pub hash: u64,
    /// Number of valid entries in `frames`.
    pub depth: u32,
    /// Padding.
    pub _pad: u32,
    /// Return addresses, innermost first (the caller of the allocation function first).
    pub frames: [u64; MAX_FRAMES],
}

/// `StackSlot::hash` of an empty stack slot.
pub const STACK_SLOT_EMPTY: u64 = 0;
/// `StackSlot::hash` of a stack slot being written.
pub const STACK_SLOT_BUSY: u64 = 2;

/// The agent's header, at a fixed address inside the target for its whole life.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: u64,
    /// Always [`VERSION`] for this layout.
    pub version: u32,
    /// `size_of::<Header>()`, so that a reader can check it.
    pub header_size: u32,
    /// Address of the `[TableDesc; MAX_TABLES]` ring describing the allocation tables.
    pub table_descs: u64,
    /// Address of the [`Window`] word: which tables hold blocks now.
    pub table_window: u64,
    /// Address of the `StackSlot` array.
    pub stacks_addr: u64,
    /// Number of slots in the `StackSlot` array (a power of two).
    pub stack_slots: u64,
    /// Size of the static TLS block of each thread (below the thread pointer), 0 if unknown.
    pub static_tls_size: u64,
    /// 1 when the next allocator is glibc's ptmalloc (chunk headers can be read), else 0.
    pub glibc_malloc: u64,
    /// Allocations not recorded (the agent could not get memory for a bigger table, or a
    /// size above [`MAX_SIZE`]). Non-zero means tracking is incomplete: blocks only such
    /// an allocation points to look lost.
    pub dropped: u64,
    /// Start of the agent's own code (its frames are dropped from stacks).
    pub agent_text_start: u64,
    /// End of the agent's own code.
    pub agent_text_end: u64,
    /// Start of the region holding the agent's side stacks (never scanned).
    pub side_addr: u64,
    /// Length of that region.
    pub side_len: u64,
    /// Size of one side-stack slot in that region. A thread whose stack pointer is inside
    /// a slot is running a hook: its program stack pointer is the word at the slot's top − 8.
    pub side_slot: u64,
    /// Blocks freed by reclaim requests so far.
    pub reclaimed_blocks: u64,
    /// Bytes freed by reclaim requests so far.
    pub reclaimed_bytes: u64,
    /// Address of an array of [`MAX_BANNED`] u32 stack ids whose blocks are never reclaimed
    /// again: the program freed or reallocated a block kal had reclaimed from that site.
    pub banned_addr: u64,
    /// Number of valid entries in that array.
    pub banned_len: u64,
    /// Start of the agent's set of reclaimed addresses (never scanned: it names blocks).
    pub reclaimed_set_addr: u64,
    /// Length of that set's mapping.
    pub reclaimed_set_len: u64,
    /// Allocation hooks that ran on the program's own stack because no side stack was
    /// available (the region ran out or could not be mapped). Non-zero is a gap: stale
    /// heap addresses those hooks left on program stacks may hide leaks.
    pub no_side_stack: u64,
    /// Thread id of the agent's control-server thread (0 while it has none): it makes
    /// snapshots on request, so the CLI stops every other thread but not this one.
    pub server_tid: u64,
    /// Start of the server thread's stack (the agent maps it; never scanned).
    pub server_stack_addr: u64,
    /// Length of that stack's mapping.
    pub server_stack_len: u64,
    /// What became of `__libc_freeres`/`__gnu_cxx::__freeres` at exit: one of the
    /// `FREERES_*` values ([`FREERES_NOT_ASKED`] until the process exits through `exit`).
    pub freeres: u64,
    /// With [`FREERES_SKIPPED_THREADS`]: how many other threads of the program were still
    /// running (0: the count could not be read).
    pub freeres_threads: u64,
    /// Address of the agent's array of [`ParkRun`] slots (0 until kal first asks it to
    /// park): which pages are parked now, so that a walk of glibc's heap steps over them.
    pub park_runs: u64,
    /// Slots of that array that may be in use (the others are [`park_state::FREE`]).
    pub park_runs_high: u64,
}

/// States of a [`ParkRun`] slot.
pub mod park_state {
    /// The slot holds nothing.
    pub const FREE: u32 = 0;
    /// The run is being parked: its pages are still present (write-protected).
    pub const PARKING: u32 = 1;
    /// The run's pages are dropped (a copy of the process reads zeros there); their bytes
    /// are in the agent's store.
    pub const PARKED: u32 = 2;
}

/// Pages of one leaked block parked and restored together, as the agent's parking table
/// holds them ([`Header::park_runs`]). Addresses are kept bit-inverted (`!addr`, 0 for
/// none): the table lives in memory kal scans as a root, and a plain heap address there
/// would make a parked block look reachable.
///
/// For a walk of glibc's heap, which cannot read the chunk headers inside a parked run,
/// the agent notes the first chunk whose size word lies in the run (with that word as it
/// was when the run was parked: any write to the run since would have restored it) and
/// where the first chunk after the run starts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParkRun {
    /// A [`park_state`] value.
    pub state: u32,
    /// Set by the agent's fault handler when the program touched the run while it was
    /// being parked.
    pub abandoned: u32,
    /// `!start` of the run (page-aligned).
    pub start_inv: u64,
    /// Pages in the run.
    pub pages: u64,
    /// `!addr` of the lost block the run belongs to.
    pub block_inv: u64,
    /// The block's requested size.
    pub block_len: u64,
    /// The block's stack id.
    pub stack: u32,
    /// Compressed length in the agent's store.
    pub store_len: u32,
    /// Offset of the run's extent in the store.
    pub store_off: u64,
    /// Length of the extent (whole pages).
    pub store_alloc: u64,
    /// `!chunk` of the first glibc chunk whose size word lies in the run, or 0 (none, or
    /// not glibc's allocator).
    pub first_inv: u64,
    /// That chunk's size word (flags included) when the run was parked.
    pub first_word: u64,
    /// `!chunk` of the first glibc chunk that starts at or after the run's end, or 0
    /// (unknown).
    pub resume_inv: u64,
}

impl ParkRun {
    /// First address.
    pub fn start(&self) -> u64 {
        !self.start_inv
    }
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start() + self.pages * 4096
    }
    /// The lost block's own bytes, `[addr, addr + len)`.
    pub fn block(&self) -> (u64, u64) {
        (!self.block_inv, !self.block_inv + self.block_len)
    }
    /// The first chunk whose size word lies in the run, and that word.
    pub fn first_chunk(&self) -> Option<(u64, u64)> {
        (self.first_inv != 0).then_some((!self.first_inv, self.first_word))
    }
    /// Where the first chunk after the run starts.
    pub fn resume(&self) -> Option<u64> {
        (self.resume_inv != 0).then_some(!self.resume_inv)
    }

    /// Decodes a slot from its little-endian bytes.
    pub fn decode(b: &[u8; PARK_RUN_SIZE]) -> ParkRun {
        let w = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let h = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        ParkRun {
            state: h(0),
            abandoned: h(4),
            start_inv: w(8),
            pages: w(16),
            block_inv: w(24),
            block_len: w(32),
            stack: h(40),
            store_len: h(44),
            store_off: w(48),
            store_alloc: w(56),
            first_inv: w(64),
            first_word: w(72),
            resume_inv: w(80),
        }
    }
}

/// Size of a [`ParkRun`] slot.
pub const PARK_RUN_SIZE: usize = core::mem::size_of::<ParkRun>();
const _: () = assert!(PARK_RUN_SIZE == 88);

/// [`Header::freeres`]: not asked to run (the process has not called `exit`; `_exit`,
/// `_Exit` and `abort` never run them).
pub const FREERES_NOT_ASKED: u64 = 0;
/// [`Header::freeres`]: they ran at exit.
pub const FREERES_RAN: u64 = 1;
/// [`Header::freeres`]: turned off (`kal run --no-freeres`).
pub const FREERES_OFF: u64 = 2;
/// [`Header::freeres`]: not run because other threads of the program were still running
/// (they could be using what would be freed); [`Header::freeres_threads`] says how many.
pub const FREERES_SKIPPED_THREADS: u64 = 3;

/// Capacity of the banned-sites array.
pub const MAX_BANNED: usize = 1024;

/// Kind of a message from the agent to the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgKind {
    /// A process loaded the agent (or a fork child re-connected).
    Hello = 1,
    /// The process is exiting: capture it now, then send one byte back.
    Exit = 2,
    /// Sent to `kal run` by another kal (`kal check`, `kal reclaim`) about a process `kal run`
    /// traces (`pid`): stop tracing it until this connection closes; one byte answers once it
    /// is let go.
    Lend = 3,
}

/// Fixed-size message sent by the agent over the CLI's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: u64,
    /// A [`MsgKind`] value.
    pub kind: u32,
    /// Process id of the sender.
    pub pid: u32,
    /// Thread id of the sending thread.
    pub tid: u32,
    /// Layout version ([`VERSION`]).
    pub version: u32,
    /// Address of the [`Header`] in the sender.
    pub header_addr: u64,
}

/// Size of a [`Hello`] on the wire.
pub const HELLO_SIZE: usize = core::mem::size_of::<Hello>();

impl Hello {
    /// Encodes the message as little-endian bytes.
    pub fn encode(&self) -> [u8; HELLO_SIZE] {
        let mut out = [0u8; HELLO_SIZE];
        out[0..8].copy_from_slice(&self.magic.to_le_bytes());
        out[8..12].copy_from_slice(&self.kind.to_le_bytes());
        out[12..16].copy_from_slice(&self.pid.to_le_bytes());
        out[16..20].copy_from_slice(&self.tid.to_le_bytes());
        out[20..24].copy_from_slice(&self.version.to_le_bytes());
        out[24..32].copy_from_slice(&self.header_addr.to_le_bytes());
        out
    }

    /// Decodes a message; `None` when the magic, kind or version is not one we know.
    pub fn decode(b: &[u8; HELLO_SIZE]) -> Option<Hello> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[0..8]);
        let magic = u64::from_le_bytes(w);
        w.copy_from_slice(&b[24..32]);
        let msg = Hello {
            magic,
            kind: u32_at(8),
            pid: u32_at(12),
            tid: u32_at(16),
            version: u32_at(20),
            header_addr: u64::from_le_bytes(w),
        };
        let known = msg.kind == MsgKind::Hello as u32
            || msg.kind == MsgKind::Exit as u32
            || msg.kind == MsgKind::Lend as u32;
        (msg.magic == MAGIC && msg.version == VERSION && known).then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        for &(size, stack, api) in &[
            (0u64, 0u32, 0u32),
            (MAX_SIZE, STACK_UNKNOWN, 3 | (6 << CHUNK_FLAGS_SHIFT)),
            (4096, 1234, 1 | (2 << CHUNK_FLAGS_SHIFT)),
            (17, 65534, 2 | (4 << CHUNK_FLAGS_SHIFT)),
        ] {
            let m = Meta { size, stack, api };
            let stack = if stack >= 65535 { STACK_UNKNOWN } else { stack };
            assert_eq!(Meta::unpack(m.pack().unwrap()), Meta { size, stack, api });
        }
        assert_eq!(
            Meta {
                size: MAX_SIZE + 1,
                stack: 0,
                api: 0
            }
            .pack(),
            None
        );
    }

    #[test]
    fn moving_and_claiming_blocks_are_live() {
        assert_eq!(slot_state(0x5000 | SLOT_MOVING), SlotState::Live(0x5000));
        assert_eq!(slot_state(0x5000 | SLOT_CLAIMING), SlotState::Live(0x5000));
        assert_eq!(slot_state(SLOT_BUSY), SlotState::Busy);
        let w = Window {
            oldest: 3,
            newest: 5,
            generation: 9,
        };
        assert_eq!(Window::decode(w.encode()), w);
        for n in [1u64, 7, 1 << 20, 123_456_789] {
            assert!(home_slot(0x7f00_1234_5678, n) < n);
        }
    }

    #[test]
    fn a_park_run_decodes_from_its_own_bytes() {
        let r = ParkRun {
            state: park_state::PARKED,
            abandoned: 0,
            start_inv: !0x5555_0000_1000,
            pages: 3,
            block_inv: !0x5555_0000_0ff0,
            block_len: 40000,
            stack: 7,
            store_len: 99,
            store_off: 4096,
            store_alloc: 8192,
            first_inv: !0x5555_0000_1a40,
            first_word: 0x9c51,
            resume_inv: !0x5555_0000_4a60,
        };
        // SAFETY: ParkRun is repr(C) plain data of PARK_RUN_SIZE bytes without padding.
        let bytes: [u8; PARK_RUN_SIZE] = unsafe { core::mem::transmute(r) };
        let d = ParkRun::decode(&bytes);
        assert_eq!(d, r);
        assert_eq!(d.first_chunk(), Some((0x5555_0000_1a40, 0x9c51)));
        assert_eq!(d.resume(), Some(0x5555_0000_4a60));
        assert_eq!(d.end(), 0x5555_0000_4000);
        assert_eq!(ParkRun::default().first_chunk(), None);
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            magic: MAGIC,
            kind: MsgKind::Exit as u32,
            pid: 42,
            tid: 43,
            version: VERSION,
            header_addr: 0x7f00_0000_1000,
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert_eq!(Hello::decode(&bad), None);
        let mut bad_kind = h.encode();
        bad_kind[8] = 9;
        assert_eq!(Hello::decode(&bad_kind), None);
    }

    #[test]
    fn layout_sizes_are_stable() {
        assert_eq!(core::mem::size_of::<AllocSlot>(), 24);
        assert_eq!(core::mem::size_of::<TableDesc>(), 16);
        let t = TableWord {
            addr: 0x7f12_3456_7000,
            slots: 512 * 1000,
            state: 2,
        };
        assert_eq!(TableWord::decode(t.encode().unwrap()), t);
        assert_eq!(TableWord { slots: 100, ..t }.encode(), None);
        assert_eq!(core::mem::size_of::<StackSlot>(), 16 + 8 * MAX_FRAMES);
        assert_eq!(HELLO_SIZE, 32);
    }
}
