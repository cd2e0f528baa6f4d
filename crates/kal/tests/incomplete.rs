//! Incomplete tracking is never silent: when the agent could not record every allocation,
//! every report says so first, JSON marks the lost counts unreliable, and nothing is
//! reclaimed (`kal reclaim`, `kal run --reclaim`).

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};

/// The one way these tests make the agent drop allocations: its table capped far below the
/// program's live blocks (`KAL_TABLE_MAX_SLOTS`, as a user bounding the agent's memory).
fn force_dropped_allocations(cmd: &mut Command) -> &mut Command {
    cmd.env(DROPPING.0, DROPPING.1)
}

/// The environment that makes the agent drop allocations.
const DROPPING: (&str, &str) = ("KAL_TABLE_MAX_SLOTS", "1024");

/// Live blocks of `many_live.c` in the tests: far more than 1024 table slots, small enough
/// that its pointer array stays in the heap (not an mmap, which would be scanned as a root).
const LIVE_BLOCKS: &str = "12000";

/// `kal ARGS` with allocations dropped.
fn kal_dropping(args: &[&str]) -> std::process::Output {
    kal_env(args, &[DROPPING])
}

/// `many_live` running (forever) under `kal run` with allocations dropped.
fn start_dropping(prog: &std::path::Path) -> Live {
    ensure_agent();
    let mut kal = force_dropped_allocations(&mut Command::new(env!("CARGO_BIN_EXE_kal")))
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(prog)
        .args([LIVE_BLOCKS, "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(kal.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    Live { kal, pid, out }
}

fn assert_flagged(j: &Value) {
    assert!(j["untracked_allocations"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["tracking_complete"], false);
    assert_eq!(j["lost_reliable"], false);
}

fn assert_warning_first(stderr: &str) {
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains("kal: WARNING: tracking incomplete: ")
            && first.contains("allocations were not recorded; lost counts below are unreliable"),
        "first line: {first}\n{stderr}"
    );
}

#[test]
fn the_exit_report_says_so_first_and_json_marks_it() {
    let prog = build("many_live.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let p = prog.to_str().unwrap();
    let j = json.to_str().unwrap();
    let out = kal_dropping(&["run", "--json", j, "--", p, LIVE_BLOCKS, "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(String::from_utf8_lossy(&out.stdout).contains("many ok"));
    assert_warning_first(&stderr);
    assert_flagged(&serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap());
    // The same program with a table large enough: complete, and no warning.
    let out = kal(&["run", "--json", j, "--", p, LIVE_BLOCKS, "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("WARNING"), "{stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["untracked_allocations"], 0);
    assert_eq!(r["tracking_complete"], true);
    assert_eq!(r["lost_reliable"], true);
}

#[test]
fn kal_check_warns_and_kal_reclaim_refuses() {
    let live = start_dropping(&build("many_live.c", &[]));
    let pid = live.pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("now.json");
    let check = |json: &std::path::Path| {
        let out = kal(&["check", &pid, "--json", json.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let j: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        (stderr, j)
    };
    let (stderr, j) = check(&json);
    assert_warning_first(&stderr);
    assert_flagged(&j);
    // The unrecorded pointer array hides the blocks it holds: they look lost.
    assert!(totals(&j, "direct").1 >= 1000, "{}", j["summary"]);
    let out = kal(&["reclaim", &pid]);
    one_line_error(&out, "refusing to reclaim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tracking is incomplete"), "{stderr}");
    let (_, after) = check(&json);
    assert_eq!(after["reclaimed"]["blocks"], 0, "nothing was freed");
    assert_eq!(totals(&after, "direct"), totals(&j, "direct"));
}

#[test]
fn periodic_checks_warn_on_every_line_and_reclaim_refuses_once() {
    let prog = build("many_live.c", &[]);
    let (out, lines) = run_reclaiming(&[], &prog, &[LIVE_BLOCKS, "2"], &[DROPPING]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("many ok"),
        "blocks that only looked lost were not freed: {stdout}"
    );
    let check_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kal check ") && l.contains(" new: "))
        .collect();
    assert!(check_lines.len() >= 2, "{stderr}");
    for l in &check_lines {
        let (head, rest) = l.split_once(" new: ").unwrap();
        assert!(
            head.contains("WARNING: tracking incomplete: ") && !rest.contains("WARNING"),
            "the warning comes first: {l}"
        );
    }
    assert_eq!(
        stderr.matches("not reclaiming in this process").count(),
        1,
        "said once: {stderr}"
    );
    let checks: Vec<&Value> = lines.iter().filter(|l| l.get("check").is_some()).collect();
    assert!(checks.len() >= 2);
    for c in &checks {
        assert_flagged(c);
        assert_eq!(c["reclaimed_now"]["blocks"], 0);
        assert!(c["reclaim_refused"]
            .as_str()
            .unwrap()
            .contains("tracking is incomplete"));
    }
    // Lost blocks seen in two checks in a row were there to reclaim, had kal not refused.
    assert!(totals(checks[1], "direct").1 >= 1000);
    let last = lines.last().unwrap();
    assert_eq!(last["at_exit"], true);
    assert_eq!(last["reclaimed"]["blocks"], 0);
}
