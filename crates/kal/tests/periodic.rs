//! `kal run --check-every`: checks never pile up and keep kal under its CPU cap, lines name
//! the program's own code without debug info, and a crashing process is left alone.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Milliseconds since the epoch of a `"time"` field (`2026-11-21T15:18:49.657Z`); only
/// differences are used.
fn millis(t: &str) -> f64 {
    let (date, clock) = t.trim_end_matches('Z').split_once('T').unwrap();
    let day: f64 = date.rsplit('-').next().unwrap().parse().unwrap();
    let hms: Vec<f64> = clock.split(':').map(|x| x.parse().unwrap()).collect();
    ((day * 24.0 + hms[0]) * 60.0 + hms[1]) * 60_000.0 + hms[2] * 1000.0
}

#[test]
fn checks_of_a_large_heap_are_skipped_and_paced_never_queued() {
    let prog = build("big_heap.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    ensure_agent();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "--error-exitcode",
            "0",
            "--check-every",
            "100ms",
            "--json",
        ])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .arg("1500000")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    let mut seen = Vec::new();
    for n in 1..=3 {
        wait_for(&rx, &mut seen, |l| l.contains(&format!("kal check {n}: ")));
    }
    child.stdin.take().unwrap().write_all(b"x").unwrap(); // the program ends
    let status = child.wait().unwrap();
    seen.extend(rx.iter());
    let stderr = seen.join("\n");
    assert_eq!(status.code(), Some(0), "{stderr}");
    let lines = read_json_lines(&json);
    let checks: Vec<&Value> = lines.iter().filter(|l| l.get("check").is_some()).collect();
    assert!(checks.len() >= 3, "{stderr}");
    let skipped: u64 = checks.iter().map(|c| c["skipped"].as_u64().unwrap()).sum();
    let delayed = checks
        .iter()
        .filter(|c| c["delayed_ms"].as_f64().unwrap() > 0.0)
        .count();
    assert!(
        skipped > 0,
        "a check of 1500000 blocks outlasts 100 ms: {stderr}"
    );
    assert!(
        stderr.contains("due checks while the previous one ran")
            || stderr.contains("due check while the previous one ran"),
        "{stderr}"
    );
    // A check that cost c of CPU must be followed by c / 25 % before the next one starts;
    // when that lies beyond the next due time (at most 100 ms after the check ended), the
    // next check is held back, and kal says so. (On a machine so loaded that a check's own
    // wall time exceeds c / 25 %, no holding back is needed: the gaps are checked below.)
    let must_wait = checks[..checks.len() - 1].iter().any(|c| {
        c["cpu_ms"].as_f64().unwrap() / 0.25 > c["wall_ms"].as_f64().unwrap() + 100.0 + 3.0
    });
    if must_wait {
        assert!(
            delayed > 0,
            "a check costs more than 25 ms of CPU: {stderr}"
        );
        assert!(
            stderr.contains("to keep kal under 25% of a CPU (--max-cpu)"),
            "{stderr}"
        );
    }
    // The pacing rule, from kal's own figures: a check that cost c of kal's CPU is followed
    // by at least c / 25 % before the next starts (timestamps are to the millisecond).
    // Running slower only makes the gaps longer.
    let start = |c: &Value| millis(c["time"].as_str().unwrap()) - c["wall_ms"].as_f64().unwrap();
    let mut needed = 0.0;
    for w in checks.windows(2) {
        let cpu = w[0]["cpu_ms"].as_f64().unwrap();
        assert!(cpu > 0.0);
        let gap = start(w[1]) - start(w[0]);
        assert!(
            gap >= cpu / 0.25 - 3.0,
            "check {} cost {cpu} ms of CPU, the next started {gap} ms later",
            w[0]["check"]
        );
        needed += cpu / 0.25;
    }
    // Hence the number of checks is bounded by kal's CPU budget over the time they span.
    let span = start(checks[checks.len() - 1]) - start(checks[0]);
    assert!(
        needed <= span + 3.0 * checks.len() as f64,
        "{needed} > {span}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["at_exit"], true);
}

#[test]
fn live_lines_name_the_programs_own_code_without_debug_info() {
    let built = build("stripped.c", &["-g0"]);
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("nodebug");
    std::fs::copy(&built, &prog).unwrap();
    assert!(Command::new("strip").arg(&prog).status().unwrap().success());
    // Where make_record lies, from the unstripped copy (same code, same addresses).
    let nm = Command::new("nm").arg("-S").arg(&built).output().unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let (lo, size) = nm
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == "make_record").then(|| {
                (
                    u64::from_str_radix(f[0], 16).unwrap(),
                    u64::from_str_radix(f[1], 16).unwrap(),
                )
            })
        })
        .unwrap_or_else(|| panic!("make_record in nm output: {nm}"));
    let out = kal(&[
        "run",
        "--error-exitcode",
        "0",
        "--check-every",
        "200ms",
        "--",
        prog.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let sites: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("    +"))
        .map(|l| l.rsplit(" at ").next().unwrap())
        .collect();
    assert!(!sites.is_empty(), "checks saw the leaks: {stderr}");
    for site in sites {
        let off = site
            .strip_prefix("nodebug+0x")
            .unwrap_or_else(|| panic!("site {site:?} is not nodebug+0x…: {stderr}"));
        let off = u64::from_str_radix(off, 16).unwrap();
        assert!(
            off > lo && off < lo + size,
            "{site}: the return address inside make_record [{lo:#x}, {:#x})",
            lo + size
        );
    }
    assert!(!stderr.contains("__libc_start_call_main ("), "{stderr}");
}

#[test]
fn a_process_with_a_fatal_signal_pending_is_neither_checked_nor_reclaimed() {
    let prog = build("crash.c", &[]);
    ensure_agent();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "--trace",
            "--reclaim=free",
            "--free-sites",
            "*",
            "--free-after",
            "0s",
            "--check-every",
            "100ms",
            "--",
        ])
        .arg(&prog)
        .arg("vfork")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    let _guard = KillOnDrop(pid);
    let stdout = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        rest
    });
    let rx = stderr_lines(&mut child);
    let mut seen = Vec::new();
    // Leaks seen twice get reclaimed: kal is checking and reclaiming.
    wait_for(&rx, &mut seen, |l| {
        l.contains("kal check ") && l.contains(": reclaimed ")
    });
    // The program sends itself SIGSEGV, which stays pending while it waits for its vfork
    // child.
    stdin.write_all(b"1").unwrap();
    wait_for(&rx, &mut seen, |l| l.contains("is left alone"));
    let crash_line = seen.len() - 1;
    assert!(
        seen[crash_line].contains(&format!(
            "process {pid} is left alone: it is dying of SIGSEGV"
        )),
        "{}",
        seen[crash_line]
    );
    // Give kal time for many more checks before letting the signal through.
    std::thread::sleep(Duration::from_millis(600));
    stdin.write_all(b"2").unwrap();
    let status = child.wait().unwrap();
    seen.extend(rx.iter());
    // Then the process dies of it and gets its report (kal run traces it): nothing is
    // checked or reclaimed between the crash and that report.
    let death = seen
        .iter()
        .position(|l| {
            l.ends_with(&format!(
                "kal: process {pid} is dying of SIGSEGV: leak report at its death"
            ))
        })
        .unwrap_or_else(|| panic!("no report at its death: {seen:#?}"));
    let after = &seen[crash_line + 1..death];
    assert!(
        after
            .iter()
            .all(|l| !l.contains("kal check") && !l.contains("reclaimed")),
        "nothing after the crash was seen: {after:#?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.contains("is left alone")).count(),
        1,
        "said once"
    );
    assert!(
        seen.iter().all(|l| !l.contains("failed")),
        "{}",
        seen.join("\n")
    );
    assert!(!stdout.join().unwrap().contains("survived"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "kal dies of the program's signal"
    );
}

#[test]
fn a_program_that_aborts_under_checks_and_reclaim_passes_its_signal_on() {
    let prog = build("crash.c", &[]);
    let out = kal(&[
        "run",
        "--reclaim",
        "--check-every",
        "100ms",
        "--",
        prog.to_str().unwrap(),
        "abort",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(stderr.contains("kal check 1:"), "{stderr}");
    assert!(!stderr.contains("failed"), "{stderr}");
}
