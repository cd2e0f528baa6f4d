//! Step 2 of the pipeline: which heap blocks are live. Two sources: the agent's allocation
//! tables, with a stack for every block ([`agent_table`]), and the walk of glibc's own heap
//! ([`ptmalloc`], a [`BlockSource`]), which needs no agent; [`before_attach`] merges the
//! two for a process the agent was attached to.

pub mod agent_table;
pub mod before_attach;
pub mod ptmalloc;
pub mod sided;

/// A live heap block as the agent recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Address returned to the program.
    pub addr: u64,
    /// Requested size.
    pub size: u64,
    /// Allocation sequence number.
    pub seq: u64,
    /// Stack id (key into [`crate::capture::Capture::stacks`]).
    pub stack: u32,
    /// The allocation API (`kal_proto::Api`, low 8 bits) and glibc's chunk flags shifted
    /// by [`kal_proto::CHUNK_FLAGS_SHIFT`].
    pub api: u16,
    /// Bytes at the end of the block that pointers do not refer to (see [`Block::span`]):
    /// at most 8. Kept this small so that a block takes 32 bytes: a check of a big heap
    /// sorts and looks up millions of them.
    pub tail: u16,
}

// A check of a big heap sorts and looks up millions of blocks: keep them at 32 bytes.
const _: () = assert!(std::mem::size_of::<Block>() == 32);

impl Block {
    /// Pointers into `[addr, addr + span)` refer to this block. Usually `size`; with
    /// glibc's allocator it stops where the next chunk's header begins (the allocator's own
    /// pointers to that header are not pointers into this block).
    #[inline]
    pub fn span(&self) -> u64 {
        self.size.saturating_sub(u64::from(self.tail))
    }

    /// glibc's chunk flag bits recorded with the block (`kal_proto::CHUNK_*`; 0 for
    /// other allocators).
    #[inline]
    pub fn chunk_flags(&self) -> u32 {
        u32::from(self.api) >> kal_proto::CHUNK_FLAGS_SHIFT
    }
}

/// A live heap block as a block source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapBlock {
    /// Address returned to the program.
    pub addr: u64,
    /// Bytes the program may use (glibc's `malloc_usable_size`). A heap walk cannot know
    /// the size that was requested: this is at least that, and at most the chunk's
    /// rounding (and, for `memalign` and a shrinking `realloc`, a remainder too small to
    /// split off) above it.
    pub usable: u64,
    /// The chunk's size, header included, without flag bits.
    pub chunk: u64,
    /// The chunk's flag bits (glibc: `PREV_INUSE` 1, `IS_MMAPPED` 2, `NON_MAIN_ARENA` 4).
    pub flags: u64,
}

/// Memory a block source could not walk, or a fact that makes its list less than sure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwalked {
    /// First address (0 with `end` 0: not a range).
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Why.
    pub why: String,
    /// A state that lasts only a moment (a thread was inside the allocator): another
    /// capture a little later is likely to be complete.
    pub transient: bool,
}

/// What a block source found.
#[derive(Debug, Default, Clone)]
pub struct BlockList {
    /// Live blocks, sorted by address, each once.
    pub blocks: Vec<HeapBlock>,
    /// What could not be walked (never silently dropped: blocks there are unknown).
    pub unwalked: Vec<Unwalked>,
    /// The allocator's arenas that were walked (glibc: the main arena first).
    pub arenas: Vec<u64>,
}

/// A source of the live heap blocks of one captured moment.
pub trait BlockSource {
    /// The live blocks, and what could not be seen.
    fn live_blocks(&self) -> Result<BlockList, BlockError>;
}

/// Why a block source gave no list at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The allocator's state was not found where the source looks for it (another
    /// allocator, a static binary, or a layout this kal does not know).
    NotFound(String),
}

impl std::fmt::Display for BlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockError::NotFound(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for BlockError {}
