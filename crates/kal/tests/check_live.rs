//! `kal check PID` and `kal run --check-every`: live checks by copy-on-write snapshot.

mod common;
use common::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn check_reports_exact_leaks_of_a_running_program_and_leaves_no_trace() {
    let live = Live::start(&build("live_leaker.c", &[]));
    let line = line_of("live_leaker.c", "live_leak");
    for _ in 0..2 {
        let (out, j) = check_pid_json(live.pid, &[]);
        assert_eq!(
            out.status.code(),
            Some(23),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(totals(&j, "direct"), (3500, 5));
        assert_eq!(
            sum(&records_at(&j, "direct", "live_leaker.c", line)),
            (3500, 5)
        );
        assert!(totals(&j, "reachable").1 >= 3);
        let pause = j["pause_ms"].as_f64().unwrap();
        assert!(pause > 0.0 && j["scan_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(j["pid"], live.pid);
    }
    // Traced by kal run alone again, not stopped, no snapshot copy left alive.
    live.assert_traced_by_kal_run();
    assert_ne!(live.status("State:"), "t");
    // The agent reaps each copy once kal is done with it; on a loaded machine the last
    // copy may still be tearing down its address space for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live.live_children().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        live.live_children().is_empty(),
        "{:?}",
        live.live_children()
    );
}

#[test]
fn pointers_in_flight_between_threads_are_never_reported() {
    let live = Live::start(&build("inflight.c", &["-O2"]));
    for i in 0..20 {
        let (out, j) = check_pid_json(live.pid, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for kind in ["direct", "indirect", "possible"] {
            assert_eq!(totals(&j, kind), (0, 0), "check {i}, {kind}: {stderr}");
        }
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn killing_kal_mid_check_leaves_the_target_running() {
    let mut live = Live::start(&build("live_leaker.c", &[]));
    for stage in ["frozen", "snapshot"] {
        ensure_agent();
        let mut check = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["check", &live.pid.to_string(), "-q"])
            .env("KAL_TEST_HOLD", stage)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill kal only once it says it is held at that stage.
        let mut err = std::io::BufReader::new(check.stderr.take().unwrap());
        let mut said = String::new();
        err.read_line(&mut said).unwrap();
        assert_eq!(said.trim(), format!("kal: test hold: {stage}"));
        check.kill().unwrap();
        check.wait().unwrap();
        // The program goes on ticking: read a few fresh lines within a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut line = String::new();
        let mut ticks = 0;
        while ticks < 5 && Instant::now() < deadline {
            line.clear();
            live.out.read_line(&mut line).unwrap();
            ticks += line.starts_with("tick") as i32;
        }
        assert_eq!(
            ticks, 5,
            "after kal was killed at stage {stage}, the program must keep running"
        );
        live.assert_traced_by_kal_run();
        // A killed copy needs a moment to tear down its address space.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !live.live_children().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let kids = live.live_children();
        let states: Vec<String> = kids
            .iter()
            .map(|c| std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default())
            .collect();
        assert!(
            kids.is_empty(),
            "{stage}: snapshot copy left running: {states:?}"
        );
    }
}

#[test]
fn check_bad_input_gets_one_clear_line() {
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    one_line_error(&kal(&["check", &gone_pid.to_string()]), "no process");
    // A process started without kal is checked from glibc's heap (tests/agentless.rs).
    let mut foreign = Command::new("sleep").arg("30").spawn().unwrap();
    // Checked once its loader has mapped libc (right after exec it has not yet).
    let maps = format!("/proc/{}/maps", foreign.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("libc.so"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = kal(&["check", &foreign.id().to_string()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("note: allocation stacks need kal's agent"),
        "{said}"
    );
    foreign.kill().unwrap();
    foreign.wait().unwrap();
    // As an unprivileged user, a root-owned process under kal is off limits.
    let live = Live::start(&build("live_leaker.c", &[]));
    // A copy of kal that the other user can execute wherever this checkout lives.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let kal_copy = dir.path().join("kal");
    std::fs::copy(env!("CARGO_BIN_EXE_kal"), &kal_copy).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&kal_copy)
        .arg("check")
        .arg(live.pid.to_string())
        .output()
        .unwrap();
    one_line_error(&out, "no permission");
}

#[test]
fn check_every_reports_what_is_new_as_json_lines() {
    let prog = build("trickle.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("checks.jsonl");
    let out = kal(&[
        "run",
        "-q",
        "--check-every",
        "250ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read_json_lines(&json);
    let checks: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("check").is_some()).collect();
    assert!(checks.len() >= 3, "{} checks", checks.len());
    let line = line_of("trickle.c", "trickle");
    let mut total_prev = 0;
    let mut new_sum = 0;
    for c in &checks {
        assert!(c["time"].as_str().unwrap().ends_with('Z'));
        let total = c["summary"]["direct"]["blocks"].as_u64().unwrap();
        let new = c["new"]["direct"]["blocks"].as_u64().unwrap();
        assert!(total >= total_prev, "totals never shrink");
        assert_eq!(total, new_sum + new, "new = total - previous total");
        for l in c["new_leaks"].as_array().unwrap() {
            assert!(l["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["line"] == line));
        }
        total_prev = total;
        new_sum += new;
    }
    assert!(new_sum > 10, "checks saw leaks as they happened");
    let last = lines.last().unwrap();
    assert_eq!(last["at_exit"], true);
    assert_eq!(totals(last, "direct"), (6000, 60));
}

#[test]
fn killing_kal_at_any_instant_of_a_check_never_harms_the_target() {
    // A 512 MiB target: each snapshot's fork takes a few milliseconds, a window that the
    // kills below land in, before and after it.
    let mut live = Live::start_with(&build("verifier.c", &[]), &["512"], &[]);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..40 {
        let mut check = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["check", &live.pid.to_string(), "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % 40_000));
        check.kill().unwrap();
        check.wait().unwrap();
    }
    // The program goes on verifying its data; nothing kal made is left in it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    let mut rounds = 0;
    while rounds < 3 && Instant::now() < deadline {
        line.clear();
        live.out.read_line(&mut line).unwrap();
        assert!(!line.contains("CORRUPT"), "the target's data changed");
        rounds += line.starts_with("ok") as i32;
    }
    assert_eq!(rounds, 3, "the target must keep running");
    live.assert_traced_by_kal_run();
    let deadline = Instant::now() + Duration::from_secs(5);
    let kids = || all_children(live.pid);
    while !kids().trim().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kids().trim(), "", "copies or zombies left in the target");
}

#[test]
fn a_process_under_a_seccomp_filter_is_refused_and_unharmed() {
    let mut live = Live::start(&build("seccomp.c", &[]));
    let out = kal(&["check", &live.pid.to_string()]);
    one_line_error(&out, "seccomp");
    // The filter kills the process on a fork: it is still running, so none happened.
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        live.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "tick");
    }
    live.assert_traced_by_kal_run();
}

#[test]
fn a_process_already_traced_is_refused_with_the_real_reason() {
    require_command("gdb", "gdb");
    // A debugger needs kal run's --no-trace (kal run is otherwise the program's tracer).
    let mut live = Live::start_untraced(&build("live_leaker.c", &[]));
    // A debugger holds the program for a few seconds, then lets it go.
    let mut gdb = Command::new("gdb")
        .args([
            "-q",
            "-batch",
            "-p",
            &live.pid.to_string(),
            "-ex",
            "shell sleep 3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while live.status("TracerPid:") == "0" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = kal(&["check", &live.pid.to_string()]);
    one_line_error(&out, &format!("already traced by process {}", gdb.id()));
    gdb.wait().unwrap();
    // The program runs on once the debugger has gone.
    let mut line = String::new();
    live.out.read_line(&mut line).unwrap();
    assert_eq!(live.status("TracerPid:"), "0");
}
