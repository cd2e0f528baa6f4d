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
//! let slot = AllocSlot { addr: SLOT_EMPTY, seq: 0, size: 0, stack: 0, api: 0 };
//! assert_eq!(slot_state(slot.addr), kal_proto::SlotState::Empty);
//! ```
#![no_std]

#[cfg(test)]
extern crate std;

pub mod ctl;

/// Magic number at the start of the agent header ("KALAGENT" in little-endian ASCII).
pub const MAGIC: u64 = u64::from_le_bytes(*b"KALAGENT");
/// Version of the header and table layout. Bump on any incompatible change.
pub const VERSION: u32 = 1;

/// Maximum number of frames stored for one allocation stack.
pub const MAX_FRAMES: usize = 24;

/// Name of the environment variable holding the path of the CLI's unix socket.
pub const ENV_SOCKET: &str = "KAL_SOCKET";
/// Environment variable that overrides the number of allocation-table slots (a power of two).
pub const ENV_TABLE_SLOTS: &str = "KAL_TABLE_SLOTS";

/// `AllocSlot::addr` value of a slot that never held an allocation.
pub const SLOT_EMPTY: u64 = 0;
/// `AllocSlot::addr` value of a slot whose allocation was freed.
pub const SLOT_TOMBSTONE: u64 = 1;
/// `AllocSlot::addr` value of a slot being written by the agent right now.
pub const SLOT_BUSY: u64 = 2;

/// Stack id meaning "no stack was recorded" (stack table full or unwinding failed).
pub const STACK_UNKNOWN: u32 = u32::MAX;

/// Where the glibc chunk flags sit in [`AllocSlot::api`].
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

/// Decodes the address word of an [`AllocSlot`].
pub fn slot_state(addr: u64) -> SlotState {
    match addr {
        SLOT_EMPTY => SlotState::Empty,
        SLOT_TOMBSTONE => SlotState::Tombstone,
        SLOT_BUSY => SlotState::Busy,
        a => SlotState::Live(a),
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
    /// Decodes the `api` field of an [`AllocSlot`] (its low 8 bits).
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

/// One entry of the live-allocation table (open addressing, keyed by address).
///
/// The agent writes `size`, `seq`, `stack` and `api` while `addr` is [`SLOT_BUSY`], then
/// publishes the address with a release store; it frees by turning `addr` into
/// [`SLOT_TOMBSTONE`] *before* calling the real `free`. So a reader never sees a freed
/// block as live.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct AllocSlot {
    /// Block address, or one of the `SLOT_*` markers.
    pub addr: u64,
    /// Allocation sequence number, unique per process lifetime. Next to `addr` so that a
    /// reclaim can check and claim both with one 16-byte compare-and-swap.
    pub seq: u64,
    /// Requested size in bytes.
    pub size: u64,
    /// Index into the stack table, or [`STACK_UNKNOWN`].
    pub stack: u32,
    /// The [`Api`] that allocated the block (low 8 bits) and, with glibc's allocator, the
    /// chunk's flag bits (`IS_MMAPPED` = 2, `NON_MAIN_ARENA` = 4) shifted left by 8; see
    /// [`CHUNK_FLAGS_SHIFT`].
    pub api: u32,
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
    /// Address of the `AllocSlot` array.
    pub table_addr: u64,
    /// Number of slots in the `AllocSlot` array (a power of two).
    pub table_slots: u64,
    /// Address of the `StackSlot` array.
    pub stacks_addr: u64,
    /// Number of slots in the `StackSlot` array (a power of two).
    pub stack_slots: u64,
    /// Size of the static TLS block of each thread (below the thread pointer), 0 if unknown.
    pub static_tls_size: u64,
    /// 1 when the next allocator is glibc's ptmalloc (chunk headers can be read), else 0.
    pub glibc_malloc: u64,
    /// Allocations not recorded because the table was full (they are never reported).
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
}

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
        let known = msg.kind == MsgKind::Hello as u32 || msg.kind == MsgKind::Exit as u32;
        (msg.magic == MAGIC && msg.version == VERSION && known).then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(core::mem::size_of::<AllocSlot>(), 32);
        assert_eq!(core::mem::size_of::<StackSlot>(), 16 + 8 * MAX_FRAMES);
        assert_eq!(HELLO_SIZE, 32);
    }
}
