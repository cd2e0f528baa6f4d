//! `kal check PID` on processes started without kal: blocks from glibc's own heap.

mod common;
use common::*;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// Starts `prog ARGS` without kal and waits for its "ready PID" line.
fn start_bare(prog: &std::path::Path, args: &[&str]) -> (Child, KillOnDrop) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    assert_eq!(pid, child.id() as i32);
    // Keep reading what it prints so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    (child, KillOnDrop(pid))
}

/// `(blocks)` of each class, in the order direct, indirect, possible, reachable.
fn block_counts(j: &serde_json::Value) -> [u64; 4] {
    ["direct", "indirect", "possible", "reachable"].map(|k| totals(j, k).1)
}

#[test]
fn a_process_started_without_kal_is_checked_from_its_heap_with_the_agents_counts() {
    let prog = build("live_leaker.c", &[]);
    let (mut bare, _kill) = start_bare(&prog, &[]);
    let (out, j) = check_pid_json(bare.id() as i32, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    // 5 blocks of 700 bytes: chunks of 720, 712 usable bytes each.
    assert_eq!(totals(&j, "direct"), (5 * 712, 5), "{stderr}");
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    assert!(
        j["note"]
            .as_str()
            .unwrap()
            .contains("allocation stacks need kal's agent"),
        "{j}"
    );
    assert!(stderr.contains("note: allocation stacks need kal's agent"));
    // The same program under kal run: the same blocks in every class.
    let live = Live::start(&prog);
    let (_, with_agent) = check_pid_json(live.pid, &[]);
    assert_eq!(block_counts(&j), block_counts(&with_agent));
    // Left running, untraced, with no copy behind.
    let status = std::fs::read_to_string(format!("/proc/{}/status", bare.id())).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert_eq!(all_children(bare.id() as i32), "");
    assert!(bare.try_wait().unwrap().is_none());
    bare.kill().unwrap();
    bare.wait().unwrap();
}

#[test]
fn arenas_grown_past_one_heap_are_walked_exactly() {
    // 8 threads, each arena grown over several 64 MiB heaps (old heaps end in fenceposts).
    let prog = build("arenas.c", &[]);
    let mut child = Command::new(&prog)
        .arg("wait")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id() as i32);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    let n: Vec<u64> = tally
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (direct, indirect, kept) = (n[1], n[3], n[5]);
    let (out, j) = check_pid_json(pid, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(totals(&j, "direct").1, direct, "{stderr}");
    assert_eq!(totals(&j, "indirect").1, indirect, "{stderr}");
    assert_eq!(totals(&j, "possible").1, 0, "{stderr}");
    // The kept blocks, their 8 arrays, and the few blocks of the C library (stdout's
    // buffer).
    let reachable = totals(&j, "reachable").1;
    assert!(
        reachable >= kept && reachable <= kept + 16,
        "{reachable} {kept}"
    );
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn other_allocators_and_static_binaries_get_one_line() {
    require_file(JEMALLOC, "libjemalloc2");
    let mut je = Command::new("sleep")
        .arg("30")
        .env("LD_PRELOAD", JEMALLOC)
        .spawn()
        .unwrap();
    let _k1 = KillOnDrop(je.id() as i32);
    // Wait until jemalloc is mapped.
    for _ in 0..200 {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", je.id())).unwrap();
        if maps.contains("libjemalloc") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = kal(&["check", &je.id().to_string()]);
    one_line_error(&out, "allocates with jemalloc");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kal run"));
    let prog = build("live_leaker.c", &["-static"]);
    let (mut bare, _kill) = start_bare(&prog, &[]);
    one_line_error(
        &kal(&["check", &bare.id().to_string()]),
        "statically linked",
    );
    bare.kill().unwrap();
    bare.wait().unwrap();
    je.kill().unwrap();
    je.wait().unwrap();
}

#[test]
fn pointers_in_flight_are_never_reported_without_the_agent() {
    // Threads allocating and freeing all the time: a check may stop one inside malloc or
    // free (a locked arena, a tcache half changed: said as a gap), and never reports a
    // block in flight as lost.
    let (mut bare, _kill) = start_bare(&build("inflight.c", &["-O2"]), &[]);
    for i in 0..15 {
        let (out, j) = check_pid_json(bare.id() as i32, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for kind in ["direct", "indirect", "possible"] {
            assert_eq!(totals(&j, kind), (0, 0), "check {i}, {kind}: {stderr}");
        }
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
    bare.kill().unwrap();
    bare.wait().unwrap();
}

#[test]
fn a_finished_threads_cached_stack_hides_no_leak() {
    // A thread leaked 10 blocks and left a pointer to one on its stack, which glibc keeps
    // in its cache of stacks: memcheck says 10 definitely lost, and so must kal, at exit
    // and in a check of the running program, with and without the agent.
    let prog = build("dead_thread.c", &[]);
    let vg = memcheck(&prog, &[]);
    assert_eq!(vg, [(720, 10), (0, 0), (0, 0)]);
    let at_exit = run_json(&[], &prog, &[]);
    let lost = |j: &serde_json::Value| ["direct", "indirect", "possible"].map(|k| totals(j, k));
    assert_eq!(lost(&at_exit.json), vg, "{}", at_exit.stderr);
    let live = Live::start_with(&prog, &["wait"], &[]);
    let (out, with_agent) = check_pid_json(live.pid, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(lost(&with_agent), vg, "{stderr}");
    assert_eq!(with_agent["lost_reliable"], true, "{stderr}");
    let (mut bare, _kill) = start_bare(&prog, &["wait"]);
    let (out, without) = check_pid_json(bare.id() as i32, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Usable sizes: 72 bytes asked, 72 usable.
    assert_eq!(lost(&without), vg, "{stderr}");
    assert_eq!(without["lost_reliable"], true, "{stderr}");
    bare.kill().unwrap();
    bare.wait().unwrap();
}
