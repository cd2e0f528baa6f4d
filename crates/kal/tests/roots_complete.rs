//! Roots are complete, or the capture says what it missed (issue 8, section 1): pointers
//! kept only in memory a fork copy does not show as the process has it, in shared or
//! read-only memory, or only by the kernel (epoll, POSIX timers) keep their blocks alive;
//! a capture with gaps says so and reclaims nothing; suppressed leaks are roots.

mod common;
use common::*;
use serde_json::Value;

/// Every place `hidden_roots.c` can hide its one pointer.
const MODES: [&str; 7] = [
    "dontfork",
    "wipeonfork",
    "shared",
    "readonly",
    "memfd",
    "epoll",
    "timer",
];

/// The real leak next to the hidden block: `(bytes, blocks)` at `@hidden_leak`.
fn assert_only_the_real_leak(j: &Value, what: &str) {
    assert_eq!(totals(j, "direct"), (777, 1), "{what}: {}", j["leaks"]);
    assert_eq!(totals(j, "indirect"), (0, 0), "{what}");
    assert_eq!(totals(j, "possible"), (0, 0), "{what}");
    let line = line_of("hidden_roots.c", "hidden_leak");
    assert_eq!(
        sum(&records_at(j, "direct", "hidden_roots.c", line)),
        (777, 1),
        "{what}: the real leak is named by file:line"
    );
}

#[test]
fn a_pointer_only_in_a_hard_to_see_place_is_not_lost() {
    let prog = build("hidden_roots.c", &["-O0"]);
    for mode in MODES {
        let live = Live::start_with(&prog, &[mode, "0", "leak"], &[]);
        let (out, j) = check_pid_json(live.pid, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 23: leaks found (the real one).
        assert_eq!(out.status.code(), Some(23), "{mode}: {stderr}");
        assert_only_the_real_leak(&j, mode);
        // The hidden 1000-byte block and stdout's 4096-byte buffer.
        assert_eq!(totals(&j, "reachable"), (5096, 2), "{mode}");
        assert_eq!(j["lost_reliable"], true, "{mode}: {}", j["gaps"]);
        assert!(j["gaps"]["unread"].as_array().unwrap().is_empty(), "{mode}");
        assert!(!stderr.contains("WARNING"), "{mode}: {stderr}");
    }
}

/// `kal run --reclaim=free --free-sites '*' --free-after 0s --check-every 200ms --json F
/// -- prog ARGS` with `envs` (or, with `park`, the default `--reclaim`).
fn reclaiming(
    prog: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
    park: bool,
) -> (String, String, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let mode: &[&str] = if park {
        &["--reclaim"]
    } else {
        &["--reclaim=free", "--free-sites", "*", "--free-after", "0s"]
    };
    let mut a = vec!["run", "--error-exitcode", "0"];
    a.extend_from_slice(mode);
    a.extend_from_slice(&[
        "--check-every",
        "200ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
    ]);
    a.extend_from_slice(args);
    let out = kal_env(&a, envs);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    (stdout, stderr, read_json_lines(&json))
}

#[test]
fn reclaim_frees_the_real_leak_and_never_a_hidden_block() {
    let prog = build("hidden_roots.c", &["-O0"]);
    for (mode, park) in MODES.iter().flat_map(|m| [(*m, false), (*m, true)]) {
        let (stdout, stderr, lines) = reclaiming(&prog, &[mode, "2", "leak"], &[], park);
        assert!(!stdout.contains("CORRUPT"), "{mode}: {stdout}{stderr}");
        assert!(stdout.contains("hidden ok"), "{mode}: {stdout}{stderr}");
        let checks: Vec<&Value> = lines.iter().filter(|l| l["check"].is_u64()).collect();
        assert!(
            checks.len() >= 3,
            "{mode}: several checks ran: {}",
            lines.len()
        );
        for l in &checks {
            assert!(l.get("reclaim_refused").is_none(), "{mode}: {l}");
            assert!(l["gaps"]["unread"].as_array().unwrap().is_empty(), "{mode}");
        }
        let last = lines.last().unwrap();
        if park {
            // Parking frees nothing (and the 777-byte leak covers no whole page).
            assert_eq!(
                last["reclaimed"]["blocks"], 0,
                "{mode}: {}",
                last["reclaimed"]
            );
            assert_eq!(
                last["reclaimed"]["never_again"].as_array().unwrap().len(),
                0
            );
            continue;
        }
        // Only the real leak was freed: exactly its one block.
        assert_eq!(
            last["reclaimed"]["blocks"], 1,
            "{mode}: {}",
            last["reclaimed"]
        );
        assert_eq!(last["reclaimed"]["bytes"], 777, "{mode}");
    }
}

#[test]
fn a_capture_with_a_gap_reclaims_nothing_and_says_why() {
    let prog = build("hidden_roots.c", &["-O0"]);
    // The 1 MiB DONTFORK region does not fit under a 64 KiB freeze copy limit.
    let envs = [("KAL_FREEZE_COPY_LIMIT", "65536")];
    let live = Live::start_with(&prog, &["bigdontfork", "0", "leak"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let pid = live.pid.to_string();
    let out = kal_env(&["check", &pid, "--json", json.to_str().unwrap()], &envs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let gaps = j["gaps"]["unread"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{}", j["gaps"]);
    assert_eq!(
        gaps[0]["end"].as_u64().unwrap() - gaps[0]["start"].as_u64().unwrap(),
        1 << 20
    );
    assert_eq!(gaps[0]["why"], "over the freeze copy limit");
    assert_eq!(j["lost_reliable"], false);
    // The hidden block now looks lost, and the report says that may be false.
    assert_eq!(totals(&j, "direct"), (1777, 2));
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains("capture incomplete") && first.contains("false positives"),
        "one line at the top: {stderr}"
    );
    drop(live);

    let (stdout, stderr, lines) = reclaiming(&prog, &["bigdontfork", "2", "leak"], &envs, true);
    assert!(!stdout.contains("CORRUPT"), "{stdout}{stderr}");
    assert!(stdout.contains("hidden ok"), "{stdout}");
    assert!(
        stderr.contains("not reclaiming in this process: the capture is incomplete")
            && stderr.contains("over the freeze copy limit"),
        "{stderr}"
    );
    let checks: Vec<&Value> = lines.iter().filter(|l| l["check"].is_u64()).collect();
    assert!(checks.len() >= 3, "{}", lines.len());
    for l in &checks {
        assert!(l["reclaim_refused"].is_string(), "{l}");
    }
    assert_eq!(lines.last().unwrap()["reclaimed"]["blocks"], 0);
}

#[test]
fn hooks_without_a_side_stack_are_a_gap() {
    let prog = build("hidden_roots.c", &["-O0"]);
    let live = Live::start_with(
        &prog,
        &["shared", "0", "leak"],
        &[("KAL_TEST_NO_SIDE_STACKS", "1")],
    );
    let (out, j) = check_pid_json(live.pid, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // malloc(1000), malloc(777) and stdout's buffer, all after the agent started.
    assert_eq!(j["gaps"]["hooks_without_side_stack"], 3, "{}", j["gaps"]);
    assert_eq!(j["lost_reliable"], false);
    assert!(
        stderr
            .lines()
            .next()
            .unwrap_or("")
            .contains("3 allocation hook(s) ran without a side stack"),
        "{stderr}"
    );
    assert_only_the_real_leak(&j, "no side stacks");
}

#[test]
fn blocks_owned_by_a_suppressed_leak_are_not_indirect_leaks() {
    let prog = build("suppressed_owner.c", &["-O0"]);
    let dir = tempfile::tempdir().unwrap();
    let supp = dir.path().join("supp.txt");
    std::fs::write(&supp, "leak:vendor_make_owner\n").unwrap();
    let r = run_json(&["--suppressions", supp.to_str().unwrap()], &prog, &[]);
    assert_eq!(totals(&r.json, "direct"), (500, 1), "{}", r.stderr);
    assert_eq!(totals(&r.json, "indirect"), (0, 0), "{}", r.json["leaks"]);
    assert_eq!(r.json["suppressed"]["blocks"], 1);
    assert_eq!(r.json["suppressed"]["bytes"], 64);
    let line = line_of("suppressed_owner.c", "other_leak");
    assert_eq!(
        sum(&records_at(&r.json, "direct", "suppressed_owner.c", line)),
        (500, 1)
    );
    // Without the suppression the child is the owner's indirect leak.
    let plain = run_json(&[], &prog, &[]);
    assert_eq!(totals(&plain.json, "direct"), (564, 2));
    assert_eq!(totals(&plain.json, "indirect"), (32, 1));
}
