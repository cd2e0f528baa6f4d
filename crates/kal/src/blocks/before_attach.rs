//! Blocks allocated before `kal attach` loaded the agent: its table never saw them, so a
//! check of an attached process takes them from the walk of glibc's heap
//! ([`crate::blocks::ptmalloc`]) in the same captured moment and merges them with the
//! table. A block the table knows is the table's (with its stack); a block only the walk
//! knows was allocated before the attach — or since by a caller the agent does not see:
//! the dynamic loader (it calls malloc through a pointer of its own, not a GOT: the data
//! of modules opened later), the constructors of a module opened later (they run before
//! its slots are redirected); or, for a moment, it is being allocated or freed by a thread
//! stopped inside a hook (its pointer is then in that thread's registers or side stack, a
//! root). Such blocks are scanned and classified like every other block and
//! reported without stacks, grouped by what they are ([`crate::attribute::contents`]), labelled
//! "allocated before kal attached"; their sizes are usable sizes. They are never reclaimed:
//! without the agent's sequence number nothing proves that a block at that address in two
//! checks is the same allocation.
//!
//! With another allocator (jemalloc: Debian's redis-server) there is no heap walk: blocks
//! from before the attach are unknown, which is a gap of the capture ([`JEMALLOC_GAP`]):
//! lost counts cover only blocks allocated since the attach, and nothing is reclaimed.

use crate::act::report::{Record, Report};
use crate::blocks::ptmalloc::Ptmalloc;
use crate::blocks::Block;
use crate::blocks::BlockSource;
use crate::capture::freeze::ThreadRegs;
use crate::capture::memory::Memory;
use crate::capture::procfs::Mapping;
use crate::capture::{Capture, Gap};
use crate::reach::Kind;
use kal_proto::{park_state, Header, ParkRun, PARK_RUN_SIZE};

/// The stack id of a block allocated before the attach (no stack: the agent's ids are
/// 16-bit, and [`kal_proto::STACK_UNKNOWN`] is a block the agent saw without its stack).
pub const STACK: u32 = u32::MAX - 1;

/// How a record of blocks from before the attach is labelled.
pub const LABEL: &str = "allocated before kal attached";

/// The gap of an attached process whose allocator kal cannot walk.
pub const JEMALLOC_GAP: &str = "blocks allocated before kal attached are unknown (the \
     allocator is not glibc's, so its heap cannot be walked): lost counts cover only blocks \
     allocated since the attach";

/// What the report says when blocks from before the attach were merged.
pub fn note(blocks: u64, bytes: u64) -> String {
    format!(
        "{blocks} live block(s) ({bytes} bytes) were {LABEL}: they come from glibc's heap, \
         without allocation stacks, grouped by C++ type, else by size and what they point \
         into, with a sample of their contents; their sizes are usable sizes; they are never \
         reclaimed"
    )
}

/// Most slots of the agent's parking table (its `park::runs::MAX_RUNS`).
const MAX_PARK_RUNS: u64 = 1 << 16;

/// The runs of pages the agent (header `h`) has parked, sorted by start, from the captured
/// memory `mem`. Pages being parked are still present, and pages put back are present
/// again: only [`park_state::PARKED`] runs read as zeros in a copy.
pub fn parked_runs(mem: &dyn Memory, h: &Header) -> Result<Vec<ParkRun>, String> {
    if h.park_runs == 0 || h.park_runs_high == 0 {
        return Ok(Vec::new());
    }
    if h.park_runs_high > MAX_PARK_RUNS {
        return Err(format!(
            "the agent's table of parked pages claims {} runs",
            h.park_runs_high
        ));
    }
    let mut bytes = vec![0u8; h.park_runs_high as usize * PARK_RUN_SIZE];
    mem.read(h.park_runs, &mut bytes)
        .map_err(|_| "the agent's table of parked pages cannot be read".to_string())?;
    let mut runs: Vec<ParkRun> = bytes
        .chunks_exact(PARK_RUN_SIZE)
        .filter_map(|c| c.try_into().ok().map(ParkRun::decode))
        .filter(|r| r.state == park_state::PARKED && r.pages > 0)
        .collect();
    runs.sort_unstable_by_key(|r| r.start());
    Ok(runs)
}

/// Merges the blocks of glibc's heap walk (of the captured memory `mem`, its mappings
/// `maps` and threads `threads`; `exclude`: the agent's own mappings; the pages the agent
/// parked are read from its header `h` and stepped over) into the agent's `table` blocks
/// (sorted by address). Blocks only the walk knows get [`STACK`]. Returns the merged list,
/// sorted, and what the walk could not see.
pub fn merge(
    table: Vec<Block>,
    mem: &dyn Memory,
    h: &Header,
    maps: &[Mapping],
    threads: &[ThreadRegs],
    exclude: &[(u64, u64)],
) -> (Vec<Block>, Vec<Gap>) {
    let tps: Vec<u64> = threads.iter().map(|t| t.thread_pointer()).collect();
    let parked = match parked_runs(mem, h) {
        Ok(p) => p,
        Err(e) => {
            return (
                table,
                vec![Gap::whole(&format!(
                    "blocks allocated before kal attached are unknown: {e}"
                ))],
            )
        }
    };
    let walk = match (Ptmalloc {
        mem,
        maps,
        thread_pointers: &tps,
        exclude,
        parked: &parked,
    })
    .live_blocks()
    {
        Ok(w) => w,
        Err(e) => {
            return (
                table,
                vec![Gap::whole(&format!(
                    "blocks allocated before kal attached are unknown: glibc's heap could not be walked ({e})"
                ))],
            )
        }
    };
    let gaps = walk
        .unwalked
        .into_iter()
        .map(crate::capture::agentless::gap_of)
        .collect();
    let mut old = crate::capture::agentless::blocks_of(&walk.blocks);
    for b in &mut old {
        b.stack = STACK;
    }
    (merge_sorted(table, old), gaps)
}

/// Merges two address-sorted lists; where both hold an address, `table`'s block wins.
fn merge_sorted(table: Vec<Block>, walk: Vec<Block>) -> Vec<Block> {
    let mut out = Vec::with_capacity(table.len() + walk.len());
    let mut w = walk.into_iter().peekable();
    for b in table {
        while let Some(o) = w.next_if(|o| o.addr <= b.addr) {
            if o.addr != b.addr {
                out.push(o);
            }
        }
        out.push(b);
    }
    out.extend(w);
    out
}

/// Whether block `b` was allocated before the attach.
pub fn is_before(b: &Block) -> bool {
    b.stack == STACK
}

/// Records for the blocks from before the attach (of the classes the report shows),
/// grouped by what they are. Reads the blocks: the capture's heap must still be readable.
pub fn describe(c: &Capture, kinds: &[Kind], show_reachable: bool) -> Vec<Record> {
    if !c.blocks.iter().any(is_before) {
        return Vec::new();
    }
    let mut recs = crate::attribute::contents::describe_where(c, kinds, |b, k| {
        is_before(b) && (k != Kind::Reachable || show_reachable)
    });
    for r in &mut recs {
        r.site = STACK;
        if let Some(ct) = &mut r.contents {
            ct.origin = Some(LABEL);
        }
    }
    recs
}

/// Puts `described` (from [`describe`]) in place of the report's one record per class of
/// blocks from before the attach, and says how many there were.
pub fn relabel(report: &mut Report, c: &Capture, described: Vec<Record>) {
    let (n, bytes) = c
        .blocks
        .iter()
        .filter(|b| is_before(b))
        .fold((0u64, 0u64), |(n, s), b| (n + 1, s + b.size));
    if n == 0 {
        return;
    }
    report.leaks.retain(|r| r.site != STACK);
    report.leaks.extend(described);
    report.leaks.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(b.bytes.cmp(&a.bytes))
            .then(b.blocks.cmp(&a.blocks))
    });
    let line = note(n, bytes);
    report.note = Some(match report.note.take() {
        Some(old) => format!("{old}; {line}"),
        None => line,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(addr: u64, stack: u32) -> Block {
        Block {
            addr,
            size: 8,
            seq: 0,
            stack,
            api: 0,
            tail: 0,
        }
    }

    #[test]
    fn the_table_wins_and_every_address_is_once() {
        let table = vec![b(16, 1), b(48, 2), b(96, 3)];
        let walk = vec![
            b(0, STACK),
            b(16, STACK),
            b(32, STACK),
            b(96, STACK),
            b(200, STACK),
        ];
        let m: Vec<(u64, u32)> = merge_sorted(table, walk)
            .iter()
            .map(|x| (x.addr, x.stack))
            .collect();
        assert_eq!(
            m,
            vec![
                (0, STACK),
                (16, 1),
                (32, STACK),
                (48, 2),
                (96, 3),
                (200, STACK)
            ]
        );
    }
}
