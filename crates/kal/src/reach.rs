//! Step 3b: conservative marking from the roots, classified as valgrind's memcheck does.
//!
//! * **reachable** — a chain of start pointers leads to the block from a root;
//! * **possible** — reached from a root, but some link is an interior pointer;
//! * **direct** — nothing points to it (for a cycle with no way in, one leader: the
//!   lowest-addressed block of the first clique found);
//! * **indirect** — reached only from lost blocks.

use crate::capture::Block;
use crate::heuristics::Heuristics;
use crate::memory::{BatchReader, Image, Memory};
use crate::roots::Roots;

/// Class of a block after the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Definitely lost.
    Direct,
    /// Indirectly lost.
    Indirect,
    /// Possibly lost.
    Possible,
    /// Still reachable.
    Reachable,
}

impl Kind {
    /// All kinds, in report order.
    pub const ALL: [Kind; 4] = [
        Kind::Direct,
        Kind::Indirect,
        Kind::Possible,
        Kind::Reachable,
    ];

    /// The JSON / summary name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Indirect => "indirect",
            Kind::Possible => "possible",
            Kind::Reachable => "reachable",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Unreached,
    Possible,
    Reachable,
    Indirect,
}

/// Sorted blocks with fast "which block holds this address" lookup.
pub struct BlockIndex<'a> {
    blocks: &'a [Block],
    lo: u64,
    hi: u64,
}

impl<'a> BlockIndex<'a> {
    /// Indexes blocks sorted by address.
    pub fn new(blocks: &'a [Block]) -> BlockIndex<'a> {
        let lo = blocks.first().map_or(u64::MAX, |b| b.addr);
        let hi = blocks
            .iter()
            .map(|b| b.addr + b.span.max(1))
            .max()
            .unwrap_or(0);
        BlockIndex { blocks, lo, hi }
    }

    /// The block containing `v`, and whether `v` is its start.
    #[inline]
    pub fn find(&self, v: u64) -> Option<(usize, bool)> {
        if v < self.lo || v >= self.hi {
            return None;
        }
        let i = self
            .blocks
            .partition_point(|b| b.addr <= v)
            .checked_sub(1)?;
        let b = &self.blocks[i];
        (v < b.addr + b.span.max(1)).then_some((i, v == b.addr))
    }
}

/// Classifies every block. `blocks` must be sorted by address; their contents are read
/// from `heap` in address-ordered batches as the marking reaches them.
pub fn classify(
    blocks: &[Block],
    image: &Image,
    roots: &Roots,
    heap: &dyn Memory,
    heuristics: Option<&Heuristics<'_>>,
) -> Vec<Kind> {
    let idx = BlockIndex::new(blocks);
    let mut state = vec![State::Unreached; blocks.len()];
    let mut stack: Vec<usize> = Vec::new();
    let mut reader = BatchReader::new(heap);

    // Marks a pointer found in definitely-reachable memory (`definite`) or in a possibly
    // reachable block.
    let push = |v: u64, definite: bool, state: &mut [State], stack: &mut Vec<usize>| {
        let Some((i, start)) = idx.find(v) else {
            return;
        };
        match state[i] {
            State::Reachable => {}
            // A start pointer, or an interior one that a known layout makes as good, from
            // definitely reachable memory: reachable.
            _ if definite && (start || heuristics.is_some_and(|h| h.reaches(&blocks[i], v))) => {
                state[i] = State::Reachable;
                stack.push(i);
            }
            State::Unreached => {
                state[i] = State::Possible;
                stack.push(i);
            }
            _ => {}
        }
    };

    for &v in &roots.values {
        push(v, true, &mut state, &mut stack);
    }
    let why = std::env::var_os("KAL_DEBUG_ROOTS").is_some();
    // glibc's thread control block: [tcb] = tcb, [tcb+8] = &dtv[1], [tcb+16] = tcb. The dtv
    // field points 16 bytes into the dtv block; it is that block's owning pointer.
    let dtv_field = |at: u64| {
        at >= 8 && image.word(at - 8) == Some(at - 8) && image.word(at + 8) == Some(at - 8)
    };
    for &(s, e) in &roots.ranges {
        let mut at = s & !7;
        image.for_each_piece(s, e, |words| {
            for &w in words {
                let w = match idx.find(w) {
                    Some((_, false)) if dtv_field(at) => w.wrapping_sub(16),
                    _ => w,
                };
                if why
                    && idx
                        .find(w)
                        .is_some_and(|(i, _)| state[i] == State::Unreached)
                {
                    let (bi, st) = idx.find(w).unwrap_or_default();
                    eprintln!(
                        "root word at {at:#x} -> {w:#x} block {:#x}+{} start={st}",
                        blocks[bi].addr, blocks[bi].size
                    );
                }
                push(w, true, &mut state, &mut stack);
                at += 8;
            }
        });
    }
    // Scan reached blocks, a batch (everything pending) at a time, in address order.
    let mut batch: Vec<(usize, u64, u64)> = Vec::new();
    while !stack.is_empty() {
        stack.sort_unstable();
        stack.dedup();
        batch.clear();
        batch.extend(stack.drain(..).map(|i| (i, blocks[i].addr, blocks[i].size)));
        reader.for_each(&mut batch, |i, words| {
            let definite = state[i] == State::Reachable;
            for &w in words {
                push(w, definite, &mut state, &mut stack);
            }
        });
    }

    // Lost blocks: first the pointers between them, then cliques. Each unreached block not
    // yet claimed (in address order) leads the blocks it reaches, which become indirect.
    let unreached: Vec<usize> = (0..blocks.len())
        .filter(|&i| state[i] == State::Unreached)
        .collect();
    let pos: std::collections::HashMap<usize, usize> =
        unreached.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    let mut edges: Vec<Vec<u32>> = vec![Vec::new(); unreached.len()];
    batch.clear();
    batch.extend(
        unreached
            .iter()
            .map(|&i| (i, blocks[i].addr, blocks[i].size)),
    );
    reader.for_each(&mut batch, |i, words| {
        let from = pos[&i];
        for &w in words {
            if let Some((j, _)) = idx.find(w) {
                if j != i && state[j] == State::Unreached {
                    edges[from].push(j as u32);
                }
            }
        }
    });
    for &leader in &unreached {
        if state[leader] != State::Unreached {
            continue;
        }
        stack.push(leader);
        while let Some(i) = stack.pop() {
            for &j in &edges[pos[&i]] {
                let j = j as usize;
                // An unreached block here is fresh, or an earlier leader now absorbed.
                if j != leader && state[j] == State::Unreached {
                    state[j] = State::Indirect;
                    stack.push(j);
                }
            }
        }
    }

    state
        .into_iter()
        .map(|s| match s {
            State::Unreached => Kind::Direct,
            State::Indirect => Kind::Indirect,
            State::Possible => Kind::Possible,
            State::Reachable => Kind::Reachable,
        })
        .collect()
}
