//! `kal check PID` on processes started without kal: blocks from glibc's own heap.

mod common;
use common::*;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// Starts `prog ARGS` without kal and waits for its "ready PID" line.
fn start_bare(prog: &std::path::Path, args: &[&str]) -> (Child, KillOnDrop) {
    start_bare_env(prog, args, &[])
}

/// [`start_bare`] with extra environment variables.
fn start_bare_env(
    prog: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Child, KillOnDrop) {
    let mut child = Command::new(prog)
        .args(args)
        .envs(envs.iter().copied())
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
    // and in a check of the running program, with and without the agent. Another thread
    // ended without being joined: the block it returned, which glibc keeps in its thread
    // control block, stays reachable.
    let prog = build("dead_thread.c", &[]);
    let vg = memcheck(&prog, &[]);
    assert_eq!(vg[0], (720, 10));
    let lost = |j: &serde_json::Value| ["direct", "indirect"].map(|k| totals(j, k));
    // The reachable records of `bytes` bytes each (`block_size` without the agent).
    let reachable = |j: &serde_json::Value, bytes: u64| -> u64 {
        j["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "reachable")
            .filter(|r| {
                r["contents"]["block_size"] == bytes
                    || (r["contents"].is_null()
                        && r["bytes"] == bytes * r["blocks"].as_u64().unwrap())
            })
            .map(|r| r["blocks"].as_u64().unwrap())
            .sum()
    };
    let at_exit = run_json(&["--show-reachable"], &prog, &[]);
    assert_eq!(lost(&at_exit.json), [vg[0], vg[1]], "{}", at_exit.stderr);
    assert_eq!(reachable(&at_exit.json, 100), 1, "{}", at_exit.stderr);
    let live = Live::start_with(&prog, &["wait"], &[]);
    let (out, with_agent) = check_pid_json(live.pid, &["--show-reachable"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(lost(&with_agent), [vg[0], vg[1]], "{stderr}");
    assert_eq!(reachable(&with_agent, 100), 1, "{stderr}");
    assert_eq!(with_agent["lost_reliable"], true, "{stderr}");
    let (mut bare, _kill) = start_bare(&prog, &["wait"]);
    let (out, without) = check_pid_json(bare.id() as i32, &["--show-reachable"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Usable sizes: 72 bytes asked, 72 usable; 100 asked, 104 usable.
    assert_eq!(lost(&without), [vg[0], vg[1]], "{stderr}");
    assert_eq!(reachable(&without, 104), 1, "{stderr}");
    assert_eq!(without["lost_reliable"], true, "{stderr}");
    bare.kill().unwrap();
    bare.wait().unwrap();
}

#[test]
fn lost_blocks_without_stacks_are_grouped_by_cpp_type_size_and_targets() {
    // 3 Widget, 5 toys::Gadget (virtual classes), 4 C strings, 2 structs pointing at a
    // function and a variable of the program: grouped by type, else by size and targets,
    // with usable sizes (32 -> 40, 48 -> 56, 30 -> 40, 24 -> 24).
    let prog = build("typed_leaks.cpp", &[]);
    let (mut bare, _kill) = start_bare(&prog, &["wait"]);
    let (out, j) = check_pid_json(bare.id() as i32, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        totals(&j, "direct"),
        (3 * 40 + 5 * 56 + 4 * 40 + 2 * 24, 14),
        "{stderr}"
    );
    assert_eq!(memcheck(&prog, &[])[0].1, 14);
    let direct: Vec<&serde_json::Value> = j["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "direct")
        .collect();
    let of_type = |t: &str| -> Vec<(u64, u64)> {
        direct
            .iter()
            .filter(|r| r["contents"]["type"] == t)
            .map(|r| (r["bytes"].as_u64().unwrap(), r["blocks"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(of_type("Widget"), vec![(120, 3)], "{j}");
    assert_eq!(of_type("toys::Gadget"), vec![(280, 5)], "{j}");
    let strings: Vec<&&serde_json::Value> = direct
        .iter()
        .filter(|r| r["contents"]["block_size"] == 40)
        .collect();
    assert_eq!(strings.len(), 1, "{j}");
    assert_eq!(
        (strings[0]["bytes"].as_u64(), strings[0]["blocks"].as_u64()),
        (Some(160), Some(4))
    );
    assert_eq!(strings[0]["contents"]["points_into"], serde_json::json!([]));
    let sample = strings[0]["contents"]["sample"].as_str().unwrap();
    assert!(sample.starts_with("\"kal leaked string "), "{sample}");
    let callbacks: Vec<&&serde_json::Value> = direct
        .iter()
        .filter(|r| r["contents"]["block_size"] == 24)
        .collect();
    assert_eq!(callbacks.len(), 1, "{j}");
    assert_eq!(callbacks[0]["blocks"], 2);
    assert_eq!(
        callbacks[0]["contents"]["points_into"],
        serde_json::json!(["counter (typed_leaks)", "on_event (typed_leaks)"])
    );
    assert!(j["note"]
        .as_str()
        .unwrap()
        .contains("allocation stacks need kal's agent"));
    // The text says the same.
    let text = String::from_utf8_lossy(&kal(&["check", &bare.id().to_string()]).stderr).to_string();
    for line in [
        "Direct leak of 120 bytes in 3 blocks of type Widget:",
        "Direct leak of 280 bytes in 5 blocks of type toys::Gadget:",
        "Direct leak of 160 bytes in 4 blocks of 40 bytes:",
        "    contents: \"kal leaked string ",
        "Direct leak of 48 bytes in 2 blocks of 24 bytes:",
        "    pointing into: counter (typed_leaks), on_event (typed_leaks)",
        "note: allocation stacks need kal's agent",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    bare.kill().unwrap();
    bare.wait().unwrap();
}

/// `(bytes, blocks)` of each lost class: direct, indirect, possible.
fn lost_totals(j: &serde_json::Value) -> [(u64, u64); 3] {
    ["direct", "indirect", "possible"].map(|k| totals(j, k))
}

#[test]
fn the_suites_programs_stopped_without_kal_have_the_agents_lost_counts() {
    // Each program, with KAL_STOP set, stops where its leaks are made ("ready PID", then
    // waits; programs/stop_point.h). Started without kal, `kal check PID` must find the
    // lost blocks that `kal run`'s agent finds in the same program at the same point, and
    // the counts memcheck gives at exit (run_report.rs). Bytes are usable sizes without
    // the agent: compared where glibc's usable size is plain (chunk - 8), blocks always.
    // (program, [direct, indirect, possible] blocks, the same in usable bytes if known)
    type Case = (&'static str, [u64; 3], Option<[u64; 3]>);
    let cases: [Case; 7] = [
        // 1 detached node and its 2 children, 48 bytes each (56 usable).
        ("tree.c", [1, 2, 0], Some([56, 2 * 56, 0])),
        // A ring of 5 nodes of 40 bytes (40 usable): 1 leader, 4 indirect.
        ("ring.c", [1, 4, 0], Some([40, 4 * 40, 0])),
        // 200 bytes held only 40 bytes in (200 usable).
        ("interior.c", [0, 0, 1], Some([0, 0, 200])),
        // 10 APIs leak 1 block each at exit, but at the stop point main's frame still holds
        // posix_memalign's result (gcc -O1 passes a stack slot, -8(%rbp), and copies it to
        // `out`): that block is reachable here, with and without the agent. Usable sizes:
        // 5 x 24 (11, 21, 13, 15 bytes, 19 aligned to 64), 56 (aligned_alloc 48), 40
        // (valloc 29), 4008 (realloc 4000), 4104 (pvalloc: a page).
        (
            "apis.c",
            [9, 0, 0],
            Some([5 * 24 + 56 + 40 + 4008 + 4104, 0, 0]),
        ),
        // 4 threads x 10 blocks of 100..103 bytes (104 usable each).
        ("threads.c", [40, 0, 0], Some([40 * 104, 0, 0])),
        // One shop::Widget of 48 bytes (56 usable).
        ("widget.cpp", [1, 0, 0], Some([56, 0, 0])),
        // Interior pointers of common layouts are reachable (the heuristics take usable
        // sizes without the agent); 1 block of 77 bytes (88 usable) is lost.
        ("heuristics.cpp", [1, 0, 0], Some([88, 0, 0])),
    ];
    let stop = [("KAL_STOP", "1")];
    let mut mismatches = Vec::new();
    for (name, blocks, bytes) in cases {
        let prog = build(name, &[]);
        let (mut bare, _kill) = start_bare_env(&prog, &[], &stop);
        let (out, without) = check_pid_json(bare.id() as i32, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(without["lost_reliable"], true, "{name}: {stderr}");
        let live = Live::start_with(&prog, &[], &stop);
        let (out, with_agent) = check_pid_json(live.pid, &[]);
        let agent_stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let got = lost_totals(&without);
        let agent = lost_totals(&with_agent);
        if got.map(|t| t.1) != agent.map(|t| t.1) || got.map(|t| t.1) != blocks {
            mismatches.push(format!(
                "{name}: without kal {got:?}, with the agent {agent:?}, expected blocks \
                 {blocks:?}\n--- without:\n{stderr}\n--- with the agent:\n{agent_stderr}"
            ));
            continue;
        }
        if let Some(bytes) = bytes {
            assert_eq!(got.map(|t| t.0), bytes, "{name}: {stderr}");
        }
        if name == "widget.cpp" {
            // The lost object is grouped under its class's name, in the JSON and the text.
            let typed: Vec<&serde_json::Value> = without["leaks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["kind"] == "direct")
                .collect();
            assert_eq!(typed.len(), 1, "{without}");
            assert_eq!(typed[0]["contents"]["type"], "shop::Widget", "{without}");
            assert_eq!(typed[0]["blocks"], 1, "{without}");
            assert!(
                stderr.contains("Direct leak of 56 bytes in 1 block of type shop::Widget:"),
                "{stderr}"
            );
        }
        bare.kill().unwrap();
        bare.wait().unwrap();
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}
