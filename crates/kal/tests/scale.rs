//! The allocation table at scale: every block recorded, whatever the allocator packs
//! together, however many there are and however far apart.
//!
//! `fifty_million_blocks_from_four_threads_are_all_tracked` is the heavy one: about 8 s of
//! allocating plus the scan, and 2 to 4 GiB of RAM (1.6 GiB of heap, 400 MiB of pointer
//! arrays, the table and kal's copy). It runs in the normal test run; run it alone with
//! `cargo test -p kal --release --test scale fifty`.

mod common;
use common::*;

/// Exact `(bytes, blocks)` of the records of `kind` whose stack passes `file:line`.
fn at(json: &serde_json::Value, kind: &str, file: &str, marker: &str) -> (u64, u64) {
    sum(&records_at(json, kind, file, line_of(file, marker)))
}

fn assert_no_loss(json: &serde_json::Value, what: &str) {
    for kind in ["direct", "indirect", "possible"] {
        assert_eq!(
            totals(json, kind),
            (0, 0),
            "{what}: {kind} (untracked_allocations {})",
            untracked(json)
        );
    }
}

#[test]
fn jemalloc_list_of_8_byte_nodes_is_all_reachable_at_exit() {
    require_file(JEMALLOC, "libjemalloc2");
    let prog = build("jemalloc_list.c", &[]);
    let r = run_json_env(
        &["--show-reachable"],
        &prog,
        &[],
        &[("LD_PRELOAD", JEMALLOC)],
    );
    assert_eq!(
        (
            untracked(&r.json),
            totals(&r.json, "direct"),
            totals(&r.json, "indirect"),
            totals(&r.json, "possible"),
            at(&r.json, "reachable", "jemalloc_list.c", "jl_node"),
        ),
        (0, (0, 0), (0, 0), (0, 0), (80_000, 10_000)),
        "10,000 nodes of 8 bytes under jemalloc: (untracked allocations, direct, indirect, \
         possible, reachable at the malloc line)"
    );
    assert_eq!(
        r.out.status.code(),
        Some(0),
        "the program ran on jemalloc and kal found nothing lost: {}",
        r.stderr
    );
}

#[test]
fn jemalloc_list_survives_reclaim_and_nothing_is_reclaimed() {
    require_file(JEMALLOC, "libjemalloc2");
    let prog = build("jemalloc_list.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let out = kal_env(
        &[
            "run",
            "-q",
            "--reclaim=free",
            "--free-sites",
            "*",
            "--free-after",
            "0s",
            "--check-every",
            "200ms",
            "--json",
            json.to_str().unwrap(),
            "--",
            prog.to_str().unwrap(),
            "4",
        ],
        &[("LD_PRELOAD", JEMALLOC)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = read_json_lines(&json);
    // Cumulative: the last document written says how much was reclaimed, exit report or not.
    let last = lines.last().expect("at least one report");
    assert_eq!(
        last["reclaimed"]["blocks"], 0,
        "nothing of a fully reachable list may be reclaimed: {} (kal's status {:?})\nstdout: {stdout}",
        last["reclaimed"],
        out.status
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the list's checksum held every round (kal's status {:?}): {stdout}{stderr}",
        out.status
    );
    assert_eq!(last["at_exit"], true);
    assert!(stdout.contains("checksum held"), "{stdout}");
    let checks = lines.iter().filter(|l| l.get("check").is_some()).count();
    assert!(checks >= 5, "only {checks} checks in 4 s");
    for l in &lines {
        assert_eq!(untracked(l), 0, "check {}", l["check"]);
        assert_no_loss(l, &format!("check {}", l["check"]));
    }
}

/// HEAVY: 2 to 4 GiB of RAM; about 100 s in a debug build on 2 cores (8 s of that is the
/// program itself, at -O2). The slowest test of the suite: keep it the only one this size.
#[test]
fn fifty_million_blocks_from_four_threads_are_all_tracked() {
    let prog = build("fifty_million.c", &["-O2"]);
    let r = run_json(&["--show-reachable", "--error-exitcode", "0"], &prog, &[]);
    // One assertion, so that a failure shows every figure at once.
    assert_eq!(
        (
            untracked(&r.json),
            totals(&r.json, "direct"),
            at(&r.json, "direct", "fifty_million.c", "fm_block"),
            totals(&r.json, "indirect"),
            totals(&r.json, "possible"),
            at(&r.json, "reachable", "fifty_million.c", "fm_block"),
        ),
        (
            0,
            (16_000, 1_000),
            (16_000, 1_000),
            (0, 0),
            (0, 0),
            (49_999_000 * 16, 49_999_000)
        ),
        "(untracked allocations, direct, direct at the malloc line, indirect, possible, \
         reachable at the malloc line)"
    );
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr);
}

/// The totals the program printed: direct, indirect and kept `(bytes, blocks)`.
fn arena_tallies(stdout: &str) -> [(u64, u64); 3] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("leaks "))
        .unwrap_or_else(|| panic!("no tally line in {stdout:?}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    [(n[0], n[1]), (n[2], n[3]), (n[4], n[5])]
}

#[test]
fn heap_over_many_thread_arenas_has_exact_counts_at_exit() {
    let prog = build("arenas.c", &[]);
    let r = run_json(&["--show-reachable", "--error-exitcode", "0"], &prog, &[]);
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr);
    let [direct, indirect, kept] = arena_tallies(&String::from_utf8_lossy(&r.out.stdout));
    assert_eq!((direct.1, indirect.1), (480, 160));
    assert!(
        r.json["memory"]["arenas"].as_u64().unwrap() >= 8,
        "thread arenas: {}",
        r.json["memory"]
    );
    assert_eq!(untracked(&r.json), 0);
    assert_eq!(totals(&r.json, "direct"), direct);
    assert_eq!(at(&r.json, "direct", "arenas.c", "ar_block"), direct);
    assert_eq!(totals(&r.json, "indirect"), indirect);
    assert_eq!(totals(&r.json, "possible"), (0, 0));
    let blocks = at(&r.json, "reachable", "arenas.c", "ar_block");
    let arrays = at(&r.json, "reachable", "arenas.c", "ar_array");
    assert_eq!((blocks.0 + arrays.0, blocks.1 + arrays.1), kept);
    assert_eq!(arrays.1, 8);
}

#[test]
fn heap_over_many_thread_arenas_has_exact_counts_live() {
    let prog = build("arenas.c", &[]);
    let mut live = Live::start_with(&prog, &["wait"], &[]);
    let mut tally = String::new();
    std::io::BufRead::read_line(&mut live.out, &mut tally).unwrap();
    let [direct, indirect, kept] = arena_tallies(&tally);
    for i in 0..2 {
        let (out, j) = check_pid_json(live.pid, &["--show-reachable"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(23), "check {i}: {stderr}");
        assert_eq!(untracked(&j), 0, "check {i}");
        assert_eq!(totals(&j, "direct"), direct, "check {i}");
        assert_eq!(at(&j, "direct", "arenas.c", "ar_block"), direct);
        assert_eq!(totals(&j, "indirect"), indirect, "check {i}");
        assert_eq!(totals(&j, "possible"), (0, 0), "check {i}");
        let blocks = at(&j, "reachable", "arenas.c", "ar_block");
        let arrays = at(&j, "reachable", "arenas.c", "ar_array");
        assert_eq!(
            (blocks.0 + arrays.0, blocks.1 + arrays.1),
            kept,
            "check {i}"
        );
    }
    live.assert_traced_by_kal_run();
}
