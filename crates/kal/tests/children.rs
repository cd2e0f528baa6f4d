//! Scale of `kal run` (issue 9, "Scale"): many processes exiting at once are captured
//! several at a time and each report stays exact; the agent adds no mapping per thread
//! (every mapping costs each snapshot fork).

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;

#[test]
fn forty_children_exiting_at_once_each_get_their_exact_report() {
    let prog = build("many_children.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = kal(&[
        "run",
        "-q",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "40",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Leaks in the children: kal's exit status says so (the program's own is 0).
    assert_eq!(out.status.code(), Some(23), "stderr: {stderr}");
    let leaks: HashMap<String, u64> = stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("child ")?.split(" leaks ");
            Some((w.next()?.to_string(), w.next()?.trim().parse().ok()?))
        })
        .collect();
    assert_eq!(leaks.len(), 40, "every child said what it leaks: {stdout}");
    let line = line_of("many_children.c", "mc_leak");
    for (pid, k) in &leaks {
        let path = dir.path().join(format!("r.json.{pid}"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no report of child {pid} ({e}); stderr: {stderr}"));
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (
                totals(&r, "direct"),
                sum(&records_at(&r, "direct", "many_children.c", line)),
                totals(&r, "indirect"),
                totals(&r, "possible"),
            ),
            ((k * 1000, *k), (k * 1000, *k), (0, 0), (0, 0)),
            "child {pid}: (direct, direct at the malloc line, indirect, possible)"
        );
    }
    // The parent leaked nothing.
    let parent: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(totals(&parent, "direct"), (0, 0));
}

/// `maps M` of `thread_maps N`, plain or under `kal run`.
fn maps_with_threads(prog: &std::path::Path, n: u32, under_kal: bool) -> i64 {
    let out = if under_kal {
        kal(&["run", "-q", "--", prog.to_str().unwrap(), &n.to_string()])
    } else {
        Command::new(prog).arg(n.to_string()).output().unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("maps ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maps line: {stdout}"))
}

#[test]
fn the_agent_adds_no_mapping_per_thread() {
    let prog = build("thread_maps.c", &[]);
    // Each thread has its stack and guard: two mappings, with or without kal. The agent's
    // side stack of each thread (and its guard page) must not split its reservation.
    let plain = maps_with_threads(&prog, 64, false) - maps_with_threads(&prog, 8, false);
    let kal = maps_with_threads(&prog, 64, true) - maps_with_threads(&prog, 8, true);
    assert_eq!(plain, 2 * 56, "two mappings per thread without kal");
    assert_eq!(
        kal, plain,
        "mappings added by 56 more threads, under kal and without"
    );
}
