//! The agent's tables, in private anonymous memory of the target: the live-block table
//! ([`blocks`], resized by [`resize`]) and the stack table ([`stacks`]). A frozen copy of
//! the process (at exit or in a fork snapshot) holds them consistent with its heap.

pub mod blocks;
pub mod resize;
pub mod stacks;

use kal_proto::Meta;

/// Forgets every recorded block (see [`blocks::clear_all`]).
pub fn clear_all() {
    blocks::clear_all();
}

/// What the table knew about a block.
#[derive(Clone, Copy)]
pub struct Removed {
    /// Requested size.
    pub size: u64,
    /// Sequence number.
    pub seq: u64,
    /// Stack id.
    pub stack: u32,
    /// Allocation API and chunk flags.
    pub api: u32,
}

impl From<blocks::Entry> for Removed {
    fn from(e: blocks::Entry) -> Removed {
        let m = Meta::unpack(e.meta);
        Removed {
            size: m.size,
            seq: e.seq,
            stack: m.stack,
            api: m.api,
        }
    }
}

/// Both tables of one process.
pub struct Tables {
    stacks: stacks::Stacks,
}

impl Tables {
    /// Maps both tables; `None` when the kernel gives no memory.
    pub fn new() -> Option<Tables> {
        let stacks = stacks::Stacks::new()?;
        blocks::init().then_some(Tables { stacks })
    }

    /// Address and slot count of the stack table.
    pub fn stack_range(&self) -> (u64, u64) {
        self.stacks.range()
    }

    /// Records a live block; an allocation that cannot be recorded is counted in the
    /// header (tracking is then incomplete, and the CLI says so).
    #[inline]
    pub fn insert(&self, addr: u64, size: u64, seq: u64, stack: u32, api: u32) {
        let recorded = Meta { size, stack, api }
            .pack()
            .is_some_and(|meta| blocks::insert(addr, seq, meta));
        if !recorded {
            crate::state::note_dropped();
        }
    }

    /// Retires the block at `addr`, returning what was recorded, or `None` if it was not
    /// recorded (allocated before the agent, or reclaimed).
    #[inline]
    pub fn remove(&self, addr: u64) -> Option<Removed> {
        blocks::remove(addr).map(Removed::from)
    }

    /// Retires the block at `addr` like [`Tables::remove`]; false if it was not recorded.
    #[inline(always)]
    pub fn forget(&self, addr: u64) -> bool {
        blocks::remove(addr).is_some()
    }

    /// Claims the block at `addr` for freeing if its slot still holds allocation `seq`.
    pub fn claim(&self, addr: u64, seq: u64) -> Option<Removed> {
        blocks::claim(addr, seq).map(Removed::from)
    }

    /// What is recorded for `addr` if it holds allocation `seq` now.
    pub fn peek(&self, addr: u64, seq: u64) -> Option<Removed> {
        blocks::peek(addr)
            .filter(|e| e.seq == seq)
            .map(Removed::from)
    }

    /// The innermost frame (the allocation's call site) of stack `id`, or 0.
    pub fn call_site(&self, id: u32) -> u64 {
        self.stacks.call_site(id)
    }

    /// Returns the id of `frames` in the stack table, adding it if new.
    pub fn intern_stack(&self, frames: &[u64]) -> u32 {
        self.stacks.intern(frames)
    }
}
