//! The agentless block source: glibc's heap walked in a process's memory gives the same
//! blocks as the agent's table of the same moment.

mod common;
use common::*;
use kal::blocks::ptmalloc::Ptmalloc;
use kal::blocks::Block;
use kal::blocks::{BlockSource, HeapBlock};

/// glibc's chunk size for a request (`request2size`).
fn request2size(n: u64) -> u64 {
    ((n + 8 + 15) & !15).max(32)
}

/// Whether the walk's chunk is the size class of the agent's request: a heap chunk is the
/// request rounded (`request2size`), plus less than MINSIZE (32) that `memalign` or a
/// shrinking `realloc` could not split off; an mmapped chunk is whole pages, plus for
/// `memalign` up to the alignment.
fn same_class(a: &Block, w: &HeapBlock) -> bool {
    let mmapped = w.flags & 2 != 0;
    let agent_flags = u64::from(a.chunk_flags());
    if agent_flags & 6 != w.flags & 6 {
        return false;
    }
    if mmapped {
        w.usable >= a.size && w.usable - a.size < 65536 + 2 * 4096
    } else {
        w.chunk >= request2size(a.size) && w.chunk - request2size(a.size) <= 32
    }
}

/// The blocks of `extra` that the agent's own memory does not reach: roots are the
/// writable data of `libkal_agent.so`, the thread-local words below each thread pointer
/// (the program under test has no thread-locals of its own; glibc's point at its tcache and
/// arena, which are not blocks) and the TCB's DTV pointer (the agent's threads' DTVs are
/// allocated untracked), and the agent's boot-time blocks (below); marking goes through
/// `extra` blocks only (interior pointers count). The agent's allocation tables and side
/// stacks are not roots: a freed block's address may linger in them.
fn not_the_agents(
    cap: &kal::capture::Capture,
    tps: &[u64],
    extra: &[&HeapBlock],
) -> Vec<HeapBlock> {
    let words = |start: u64, end: u64| -> Vec<u64> {
        let mut b = vec![0u8; (end - start) as usize];
        let _ = cap.heap.read(start, &mut b);
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let find = |v: u64| {
        let i = extra.partition_point(|b| b.addr + b.usable <= v);
        extra.get(i).filter(|b| b.addr <= v).map(|_| i)
    };
    let mut roots: Vec<u64> = Vec::new();
    for m in &cap.maps {
        if m.write && m.path.ends_with("/libkal_agent.so") {
            roots.extend(words(m.start, m.end));
        }
    }
    for &tp in tps {
        // Thread-locals below the thread pointer, and the DTV pointer of the TCB.
        roots.extend(words(tp - 8192, tp + 16));
    }
    // The agent's first unwinder, built under its re-entrancy guard by the first
    // allocation it saw, before it recorded anything: the blocks in [heap] below the first
    // block of the table there. Only stale words of the agent's side stacks point to it
    // once it has been replaced (they are not roots: freed program blocks linger there).
    let heap = cap.maps.iter().find(|m| m.path == "[heap]").unwrap();
    let first = cap
        .blocks
        .iter()
        .find(|b| heap.contains(b.addr))
        .unwrap()
        .addr;
    roots.extend(
        extra
            .iter()
            .filter(|b| heap.contains(b.addr) && b.addr < first)
            .map(|b| b.addr),
    );
    let mut marked = vec![false; extra.len()];
    let mut stack: Vec<usize> = roots.into_iter().filter_map(find).collect();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut marked[i], true) {
            continue;
        }
        let b = extra[i];
        stack.extend(
            words(b.addr, b.addr + b.usable)
                .into_iter()
                .filter_map(find),
        );
    }
    extra
        .iter()
        .zip(&marked)
        .filter(|(_, &m)| !m)
        .map(|(b, _)| **b)
        .collect()
}

/// Walks the heap in `cap`'s memory and compares it with the agent's table in `cap`.
fn compare(cap: &kal::capture::Capture, tps: &[u64]) -> kal::blocks::BlockList {
    let walk = Ptmalloc {
        mem: cap.heap.as_ref(),
        maps: &cap.maps,
        thread_pointers: tps,
        exclude: &cap.agent,
        parked: &[],
    }
    .live_blocks()
    .unwrap();
    let table = &cap.blocks;
    let mut i = 0;
    let mut extra: Vec<&HeapBlock> = Vec::new();
    let mut missing: Vec<&Block> = Vec::new();
    let mut wrong = Vec::new();
    for a in table {
        while i < walk.blocks.len() && walk.blocks[i].addr < a.addr {
            extra.push(&walk.blocks[i]);
            i += 1;
        }
        match walk.blocks.get(i) {
            Some(w) if w.addr == a.addr => {
                if !same_class(a, w) {
                    wrong.push((a, *w));
                }
                i += 1;
            }
            _ => missing.push(a),
        }
    }
    extra.extend(&walk.blocks[i..]);
    let unexplained = not_the_agents(cap, tps, &extra);
    assert!(
        missing.is_empty(),
        "{} table blocks not walked: {missing:#x?}",
        missing.len()
    );
    assert!(wrong.is_empty(), "size classes differ: {wrong:#x?}");
    // What the program made: blocks in many arenas (some shared by several threads),
    // mmapped ones, and everything it freed (tcache, fastbins, bins) absent from both.
    assert!(table.len() > 3000, "{}", table.len());
    let mut arenas: Vec<u64> = table
        .iter()
        .filter(|b| b.chunk_flags() & kal_proto::CHUNK_NON_MAIN_ARENA != 0)
        .map(|b| b.addr >> 26)
        .collect();
    arenas.sort_unstable();
    arenas.dedup();
    assert!(arenas.len() >= 8, "{} thread arenas", arenas.len());
    let mmapped = table
        .iter()
        .filter(|b| b.chunk_flags() & kal_proto::CHUNK_IS_MMAPPED != 0)
        .count();
    assert!(mmapped >= 31 * 3, "{mmapped} mmapped blocks");
    // The walk finds more blocks than the table: the agent's own (its per-thread unwinder
    // caches and state, its registry of threads, module lists…), which it allocates
    // through the real malloc untracked, by design. Every one of them must be the agent's:
    // reached from its own memory alone.
    assert!(!extra.is_empty());
    assert!(
        unexplained.is_empty(),
        "{} walked blocks neither in the table nor the agent's: {unexplained:#x?}",
        unexplained.len()
    );
    walk
}

#[test]
fn heap_walk_of_a_frozen_process_equals_the_agents_table_block_for_block() {
    let live = Live::start_with(&build("heapwalk.c", &[]), &[], &[]);
    let header = kal::agent::find_header(live.pid).unwrap();
    // Every thread stopped, the agent's own included: the thread pointers of all of them
    // name every tcache.
    let frozen = kal::capture::freeze::Frozen::freeze(live.pid).unwrap();
    let cap = kal::capture::capture(&frozen, header).unwrap();
    let tps: Vec<u64> = cap.threads.iter().map(|t| t.thread_pointer()).collect();
    let walk = compare(&cap, &tps);
    assert!(walk.unwalked.is_empty(), "{:#?}", walk.unwalked);
    // Found without symbols; libc6-dbg's symbols agree.
    require_file("/usr/share/doc/libc6-dbg", "libc6-dbg");
    let main = kal::blocks::ptmalloc::main_arena_from_symbols(&cap.maps);
    assert_eq!(main, walk.arenas.first().copied());
    // The program's 33 threads that allocate each make an arena while glibc's limit
    // (8 per core) allows.
    let limit = 8 * std::thread::available_parallelism().unwrap().get();
    if limit <= 33 {
        assert_eq!(walk.arenas.len(), limit);
    } else {
        assert!(walk.arenas.len() >= 33, "{}", walk.arenas.len());
    }
    // Without any registers: the threads' control blocks, found in memory, name the
    // tcaches all the same.
    let blind = compare(&cap, &[]);
    assert!(blind.unwalked.is_empty(), "{:#?}", blind.unwalked);
    assert_eq!(blind.blocks, walk.blocks);
    drop(frozen);
}

#[test]
fn heap_walk_of_a_snapshot_copy_equals_the_agents_table_block_for_block() {
    let live = Live::start_with(&build("heapwalk.c", &[]), &[], &[]);
    let header = kal::agent::find_header(live.pid).unwrap();
    let mut snap = kal::capture::snapshot::take(live.pid, header, false).unwrap();
    let extras = std::mem::take(&mut snap.extras);
    let cap =
        kal::capture::capture_from(live.pid, snap.child, snap.threads.clone(), header, extras)
            .unwrap();
    let tps: Vec<u64> = cap.threads.iter().map(|t| t.thread_pointer()).collect();
    let walk = compare(&cap, &tps);
    drop(cap);
    snap.release().unwrap();
    // The agent's server thread made the copy and was not stopped: its registers are
    // unknown, its control block names its tcache.
    assert!(walk.unwalked.is_empty(), "{:#?}", walk.unwalked);
}
