//! Step 2 of the pipeline: which heap blocks are live. A [`BlockSource`] gives the list;
//! today's sources are the agent's allocation table (read by [`crate::capture`]) and the
//! walk of glibc's own heap in [`ptmalloc`], which needs no agent.

pub mod before_attach;
pub mod ptmalloc;

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
