//! `kal run` leaves the program alone: stdio, exit status, signals, forks, execs; and it
//! fails clearly on bad input.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn forked_child_is_reported_on_its_own() {
    let prog = build("fork.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = kal(&[
        "run",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parent: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(totals(&parent, "direct"), (55, 1), "{stderr}");
    assert_eq!(
        sum(&records_at(
            &parent,
            "direct",
            "fork.c",
            line_of("fork.c", "parent")
        )),
        (55, 1)
    );
    let child_file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p != &json)
        .expect("a JSON report for the child");
    let child: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&child_file).unwrap()).unwrap();
    // The child leaks its own 77 bytes, and its copy of the parent's 55 is lost too.
    assert_eq!(totals(&child, "direct"), (132, 2), "{stderr}");
    assert_eq!(
        sum(&records_at(
            &child,
            "direct",
            "fork.c",
            line_of("fork.c", "child")
        )),
        (77, 1)
    );
    assert_eq!(
        sum(&records_at(
            &child,
            "direct",
            "fork.c",
            line_of("fork.c", "parent")
        )),
        (55, 1)
    );
    assert_ne!(child["pid"], parent["pid"]);
    assert_eq!(stderr.matches("SUMMARY").count(), 2, "{stderr}");
}

#[test]
fn exec_is_tracked_in_the_new_image() {
    let prog = build("exec.c", &[]);
    let r = run_json(&[], &prog, &[]);
    // The 33 bytes leaked before exec vanished with the old image; the new one leaks 44.
    assert_eq!(totals(&r.json, "direct"), (44, 1), "{}", r.stderr);
    assert_eq!(
        sum(&records_at(
            &r.json,
            "direct",
            "exec.c",
            line_of("exec.c", "after_exec")
        )),
        (44, 1)
    );
}

#[test]
fn exit_status_is_the_programs_unless_something_is_lost() {
    let prog = build("status.c", &[]);
    let p = prog.to_str().unwrap();
    assert_eq!(kal(&["run", "--", p, "3"]).status.code(), Some(3));
    assert_eq!(kal(&["run", "--", p, "3", "leak"]).status.code(), Some(23));
    assert_eq!(
        kal(&["run", "--error-exitcode", "0", "--", p, "3", "leak"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        kal(&["run", "--error-exitcode", "7", "--", p, "0", "leak"])
            .status
            .code(),
        Some(7)
    );
}

#[test]
fn death_by_signal_is_passed_on() {
    use std::os::unix::process::ExitStatusExt;
    let prog = build("status.c", &[]);
    let out = kal(&["run", "--", prog.to_str().unwrap(), "kill"]);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{:?}", out.status);
}

#[test]
fn stdio_passes_through_untouched() {
    ensure_agent();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello through kal\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"hello through kal\n");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SUMMARY: kal: definitely lost 0 bytes"),
        "{stderr}"
    );
}

#[test]
fn suppressed_records_are_counted_not_reported() {
    let prog = build("tree.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let supp = dir.path().join("kal.supp");
    std::fs::write(&supp, "# the tree is third-party code\nleak:mk\n").unwrap();
    let r = run_json(&["--suppressions", supp.to_str().unwrap()], &prog, &[]);
    assert_eq!(totals(&r.json, "direct"), (0, 0), "{}", r.stderr);
    assert_eq!(totals(&r.json, "indirect"), (0, 0));
    assert_eq!(r.json["suppressed"]["blocks"], 3);
    assert_eq!(r.json["suppressed"]["bytes"], 144);
    assert!(
        r.stderr
            .contains("suppressed 3 records (144 bytes in 3 blocks)"),
        "{}",
        r.stderr
    );
    assert_eq!(r.out.status.code(), Some(0));
}

#[test]
fn json_has_the_documented_shape() {
    let prog = build("tree.c", &[]);
    let r = run_json(&["--show-reachable"], &prog, &[]);
    for k in ["direct", "indirect", "possible", "reachable"] {
        assert!(r.json["summary"][k]["bytes"].is_u64() && r.json["summary"][k]["blocks"].is_u64());
    }
    let leaks = r.json["leaks"].as_array().unwrap();
    assert!(leaks.iter().any(|l| l["kind"] == "reachable"));
    for l in leaks {
        assert!(
            ["direct", "indirect", "possible", "reachable"].contains(&l["kind"].as_str().unwrap())
        );
        let f = &l["stack"][0];
        assert!(f["function"].is_string() && f["file"].is_string() && f["module"].is_string());
        assert!(f["line"].is_u64() && f["address"].is_u64());
    }
    // Without --show-reachable, reachable blocks are counted but not listed.
    let r = run_json(&[], &prog, &[]);
    assert!(r.json["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["kind"] != "reachable"));
    assert_eq!(totals(&r.json, "reachable"), (12 * 48, 12));
}

#[test]
fn bad_input_gets_one_clear_line() {
    one_line_error(
        &kal(&["run", "--", "/nonexistent/prog"]),
        "program not found: /nonexistent/prog",
    );
    one_line_error(
        &kal(&["run", "--", "no-such-program-kal-test"]),
        "program not found",
    );
    let prog = build("status.c", &["-static"]);
    one_line_error(
        &kal(&["run", "--", prog.to_str().unwrap(), "0"]),
        "statically linked",
    );
    let tree = build("tree.c", &[]);
    one_line_error(
        &kal(&[
            "run",
            "--json",
            "/proc/nope/r.json",
            "--",
            tree.to_str().unwrap(),
        ]),
        "cannot write JSON report to /proc/nope/r.json",
    );
    one_line_error(
        &kal(&["run", "--suppressions", "/nonexistent.supp", "--", "true"]),
        "cannot read suppressions file",
    );
}

#[test]
fn a_daemon_adopted_after_its_parent_exits_is_still_reported() {
    let prog = build("daemon.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = kal(&[
        "run",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("did not start"), "{stderr}");
    let line = line_of("daemon.c", "daemon_leak");
    let found: Vec<serde_json::Value> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            serde_json::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap()).unwrap()
        })
        .collect();
    let daemon = found
        .iter()
        .find(|r| !records_at(r, "direct", "daemon.c", line).is_empty())
        .unwrap_or_else(|| panic!("no report from the daemon: {stderr}"));
    assert_eq!(totals(daemon, "direct"), (99, 1), "{stderr}");
}

#[test]
fn a_blocked_sigterm_read_from_a_signalfd_never_kills_the_program() {
    let prog = build("signalfd.c", &[]);
    ensure_agent();
    for _ in 0..5 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "-q", "--"])
            .arg(&prog)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let pid: i32 = line.trim().parse().expect("the program's pid");
        // SAFETY: signalling the program this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(rest.trim(), "got TERM");
        assert_eq!(status.code(), Some(0));
    }
}

#[test]
fn under_an_address_space_limit_the_agent_fits_and_the_report_is_complete() {
    let prog = build("tree.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    ensure_agent();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 100000; exec {} run --json {} -- {}",
            env!("CARGO_BIN_EXE_kal"),
            json.display(),
            prog.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["lost_reliable"], true, "{stderr}");
    assert_eq!(r["gaps"]["hooks_without_side_stack"], 0, "{stderr}");
    assert_eq!(totals(&r, "direct"), (48, 1), "{stderr}");
}

#[test]
fn a_main_thread_that_calls_pthread_exit_ends_and_is_reported() {
    let prog = build("ends.c", &[]);
    for _ in 0..5 {
        let r = run_json(&["--error-exitcode", "0"], &prog, &["pthread_exit"]);
        assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr);
        let late = line_of("ends.c", "late_leak");
        let main = line_of("ends.c", "main_leak");
        assert_eq!(
            sum(&records_at(&r.json, "direct", "ends.c", late)),
            (66, 1),
            "{}",
            r.stderr
        );
        assert_eq!(
            sum(&records_at(&r.json, "direct", "ends.c", main)),
            (55, 1),
            "{}",
            r.stderr
        );
        assert_eq!(totals(&r.json, "direct"), (121, 2), "{}", r.stderr);
    }
}

#[test]
fn exit_from_a_second_thread_is_reported_with_its_status() {
    let prog = build("ends.c", &[]);
    for _ in 0..5 {
        let r = run_json(&["--error-exitcode", "0"], &prog, &["thread_exit"]);
        assert_eq!(r.out.status.code(), Some(3), "{}", r.stderr);
        let main = line_of("ends.c", "main_leak");
        assert_eq!(
            sum(&records_at(&r.json, "direct", "ends.c", main)),
            (55, 1),
            "{}",
            r.stderr
        );
        assert_eq!(totals(&r.json, "direct"), (55, 1), "{}", r.stderr);
    }
}

#[test]
fn kal_survives_a_full_or_closed_stderr_and_says_when_json_cannot_be_written() {
    let prog = build("tree.c", &[]);
    ensure_agent();
    // stderr on /dev/full: every write fails; the exit status still tells.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--"])
        .arg(&prog)
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(23));
    // stderr a pipe nobody reads any more.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--"])
        .arg(&prog)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(23));
    // A JSON file that cannot be written: one line, and the status still tells.
    let out = kal(&[
        "run",
        "-q",
        "--json",
        "/dev/full",
        "--",
        prog.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot write JSON report to /dev/full"),
        "{stderr}"
    );
}

#[test]
fn out_of_range_options_are_refused_before_anything_runs() {
    for args in [
        [
            "run",
            "--check-every",
            "99999999999999999999h",
            "--",
            "/bin/true",
        ],
        ["run", "--error-exitcode", "-9", "--", "/bin/true"],
        ["run", "--error-exitcode", "256", "--", "/bin/true"],
    ] {
        let out = kal(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: invalid value"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn kal_installed_under_a_path_with_a_space_and_a_colon_still_loads_its_agent() {
    let prog = build("tree.c", &[]);
    ensure_agent();
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("my tools:v2");
    std::fs::create_dir(&odd).unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_kal"));
    std::fs::copy(exe, odd.join("kal")).unwrap();
    std::fs::copy(
        exe.with_file_name("libkal_agent.so"),
        odd.join("libkal_agent.so"),
    )
    .unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(odd.join("kal"))
        .args(["run", "--json"])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("never started"), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(totals(&r, "direct"), (48, 1), "{stderr}");
}

#[test]
fn the_agent_never_touches_a_descriptor_number_the_program_reused() {
    // bash puts its own file at fd 3 (where the agent's first socket would be), then a
    // subshell (a fork: the agent's fork handler runs) writes through it.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("out");
    let script = format!(
        "exec 3>{0}; ( echo hi >&3 ); exec 3>&-; cat {0}",
        f.display()
    );
    let out = kal(&["run", "-q", "--", "bash", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn signal_handlers_that_allocate_on_an_alternate_stack_run_as_without_kal() {
    // Handlers on a sigaltstack (SIGALRM) and on the current stack (SIGPROF) malloc and
    // free at a high rate while the main loop does too, so they often interrupt a hook
    // (issue 9 item 6): same output as without kal, every time, and an exact report.
    let prog = build("altstack.c", &[]);
    let expected = plain_output(&prog);
    assert_eq!(expected, "blocks intact\nhandlers ran\n");
    let leak = line_of("altstack.c", "leak");
    for run in 0..10 {
        let r = run_json(&["-q", "--error-exitcode", "0"], &prog, &[]);
        assert_eq!(r.out.status.code(), Some(0), "run {run}: {}", r.stderr);
        assert_eq!(
            String::from_utf8_lossy(&r.out.stdout),
            expected,
            "run {run}"
        );
        assert_eq!(r.json["lost_reliable"], true, "run {run}: {}", r.stderr);
        assert_eq!(r.json["tracking_complete"], true, "run {run}: {}", r.stderr);
        assert_eq!(
            totals(&r.json, "direct"),
            (3000, 3),
            "run {run}: {}",
            r.stderr
        );
        assert_eq!(totals(&r.json, "indirect"), (0, 0), "run {run}");
        assert_eq!(totals(&r.json, "possible"), (0, 0), "run {run}");
        // The five blocks the handler kept with their 64-byte ones (stdout's buffer is
        // given back by __libc_freeres at exit).
        assert_eq!(totals(&r.json, "reachable"), (5 * 364, 10), "run {run}");
        assert_eq!(
            sum(&records_at(&r.json, "direct", "altstack.c", leak)),
            (3000, 3),
            "run {run}"
        );
    }
}

#[test]
fn real_time_signals_during_checks_are_neither_lost_nor_fail_the_check() {
    // 20,000 queued SIGRTMIN while kal checks every 20 ms: a real-time signal stop during a
    // freeze made nix's waitpid fail (EINVAL: it cannot name SIGRTMIN+n), the check failed
    // and the signal was lost when kal let the thread go ("delivered 19999").
    let prog = build("rtstorm.c", &["-pthread"]);
    for run in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("checks.jsonl");
        let out = kal(&[
            "run",
            "--error-exitcode",
            "0",
            "--check-every",
            "20ms",
            "--json",
            json.to_str().unwrap(),
            "--",
            prog.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "run {run}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "delivered 20000\n",
            "run {run}: {stderr}"
        );
        assert!(!stderr.contains("failed"), "run {run}: {stderr}");
        let lines = read_json_lines(&json);
        let last = lines.last().unwrap();
        assert_eq!(last["at_exit"], true);
        let line = line_of("rtstorm.c", "leak");
        assert_eq!(
            sum(&records_at(last, "direct", "rtstorm.c", line)),
            (64, 1),
            "run {run}"
        );
    }
}

#[test]
fn real_time_signals_reach_a_traced_program() {
    // kal run traces the program: a real-time signal (a program's SIGRTMIN, glibc's
    // SIGSETXID behind initgroups) must be delivered as any other; resumed without it, the
    // handler never ran and initgroups waited forever for the agent's threads.
    let prog = build("rtsig.c", &[]);
    let expected = plain_output(&prog);
    assert_eq!(expected, "rt 100 initgroups 0\n");
    for run in 0..3 {
        let r = run_json(&["-q", "--error-exitcode", "0", "--trace"], &prog, &[]);
        assert_eq!(r.out.status.code(), Some(0), "run {run}: {}", r.stderr);
        assert_eq!(
            String::from_utf8_lossy(&r.out.stdout),
            expected,
            "run {run}"
        );
        let line = line_of("rtsig.c", "leak");
        assert_eq!(
            sum(&records_at(&r.json, "direct", "rtsig.c", line)),
            (77, 1),
            "run {run}"
        );
    }
}

#[test]
fn dropping_privileges_with_kept_capabilities_works_as_without_kal() {
    // setresuid with PR_SET_KEEPCAPS (per thread), capset, then setresgid: glibc applies the
    // set*id calls to every thread and aborts the process if the agent's threads (which lost
    // their capabilities) fail where the program's succeeded. The agent's threads stop for
    // these calls and start again with the caller's credentials.
    let prog = build("dropcaps.c", &[]);
    let expected = plain_output(&prog);
    assert_eq!(
        expected,
        "keepcaps: ok\nsetresuid: ok\ncapset: ok\nsetgroups: ok\nsetresgid: ok\nids 65534 65534\n"
    );
    for run in 0..5 {
        let r = run_json(&["-q", "--error-exitcode", "0"], &prog, &[]);
        assert_eq!(r.out.status.code(), Some(0), "run {run}: {}", r.stderr);
        assert_eq!(
            String::from_utf8_lossy(&r.out.stdout),
            expected,
            "run {run}"
        );
        assert_eq!(
            totals(&r.json, "direct"),
            (303, 2),
            "run {run}: {}",
            r.stderr
        );
        for (marker, bytes) in [("before", 101), ("after", 202)] {
            let line = line_of("dropcaps.c", marker);
            assert_eq!(
                sum(&records_at(&r.json, "direct", "dropcaps.c", line)),
                (bytes, 1),
                "run {run}: {marker}"
            );
        }
    }
}

#[test]
fn unshare_and_setns_that_need_a_single_thread_succeed_and_the_agent_serves_after() {
    // unshare(CLONE_NEWUSER) and setns(CLONE_NEWNS) are refused (EINVAL) to a process with
    // more than one thread: the agent's threads stop for the call (issue 9 item 7).
    let prog = build("unshare.c", &[]);
    let expected = plain_output(&prog);
    assert_eq!(expected, "setns: ok\nunshare: ok\nuid now 65534\n");
    for run in 0..5 {
        let r = run_json(&["-q", "--error-exitcode", "0"], &prog, &[]);
        assert_eq!(r.out.status.code(), Some(0), "run {run}: {}", r.stderr);
        assert_eq!(
            String::from_utf8_lossy(&r.out.stdout),
            expected,
            "run {run}"
        );
        assert_eq!(r.json["lost_reliable"], true, "run {run}: {}", r.stderr);
        assert_eq!(
            totals(&r.json, "direct"),
            (333, 2),
            "run {run}: {}",
            r.stderr
        );
        for (marker, bytes) in [("before", 111), ("after", 222)] {
            let line = line_of("unshare.c", marker);
            assert_eq!(
                sum(&records_at(&r.json, "direct", "unshare.c", line)),
                (bytes, 1),
                "run {run}: {marker}"
            );
        }
    }
    // The agent's server runs again after the call: a live check is answered.
    ensure_agent();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(&prog)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first, "setns: ok\n");
    let pid = ready_pid(&mut stdout);
    let (out, now) = check_pid_json(pid, &[]);
    assert!(
        out.status.success() || out.status.code() == Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(totals(&now, "direct"), (111, 1));
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "unshare: ok\nuid now 65534\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn a_fork_child_calling_unshare_first_thing_succeeds_and_keeps_one_set_of_agent_threads() {
    // In a fork child the agent's threads are started by its fork handler, and may not
    // have run yet when the child calls unshare (untraced, its hello waits for no
    // answer). The agent took the parent's thread ids, left in the child's memory, for
    // its own threads': it found them gone at once, made the call beside them (EINVAL)
    // and started a second server and resizer (the second server on the first one's
    // stack: nginx workers crashed). Each child now stops its own threads first.
    let prog = build("fork_unshare.c", &[]);
    let expected = plain_output(&prog);
    assert_eq!(
        expected,
        (0..4)
            .map(|i| format!("child {i}: unshare ok, as many threads as its parent\n"))
            .collect::<String>()
    );
    for flags in [&["--no-trace"][..], &[]] {
        for run in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let json = dir.path().join("r.json");
            let out = kal(&[
                &["run", "-q", "--json", json.to_str().unwrap()][..],
                flags,
                &["--", prog.to_str().unwrap()],
            ]
            .concat());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(23), "{flags:?} run {run}: {stderr}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "{flags:?} run {run}: {stderr}"
            );
            let line = line_of("fork_unshare.c", "child_leak");
            let children: Vec<serde_json::Value> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p != &json)
                .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
                .collect();
            assert_eq!(children.len(), 4, "{flags:?} run {run}: {stderr}");
            for c in &children {
                assert_eq!(totals(c, "direct"), (44, 1), "{flags:?} run {run}");
                assert_eq!(
                    sum(&records_at(c, "direct", "fork_unshare.c", line)),
                    (44, 1),
                    "{flags:?} run {run}"
                );
            }
        }
    }
}

#[test]
fn a_daemon_that_calls_closefrom_and_listens_serves_every_client() {
    // closefrom(3) closes the agent's descriptors; the daemon's TCP listeners then take the
    // numbers the agent's own socket had (3 before it moved high, 512 now). The agent must
    // never accept on them (issue 9 item 5).
    let prog = build("closefrom_server.c", &[]);
    ensure_agent();
    let ports = [free_port(), free_port()];
    let clients = 20;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(&prog)
        .args([
            ports[0].to_string(),
            ports[1].to_string(),
            clients.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut stdout);
    let _program = KillOnDrop(pid);
    // A connection to the agent's socket first: an agent serving loop that goes back to a
    // number it no longer owns would now accept the daemon's clients. (Whether this check
    // succeeds is not the point here: the agent's socket was closed under it.)
    let _ = kal(&["check", &pid.to_string()]);
    for i in 0..clients {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", ports[i % 2]))
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        c.write_all(format!("c{i}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut c, &mut reply)
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(reply, format!("served c{i}\n"), "client {i}");
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, format!("served {clients}\n"));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // closefrom closed the agent's connection to kal too: no report, said in one line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("closed its connection to kal"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].starts_with(&format!("kal: process {pid} (")),
        "{stderr}"
    );
}

#[test]
fn a_process_that_execs_without_the_agent_is_named_in_one_line() {
    // The program re-execs itself with an empty environment: the new image runs without
    // the agent and gets no report; kal says which process that is (issue 9 item 16).
    let prog = build("exec_noenv.c", &[]);
    ensure_agent();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--"])
        .arg(&prog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut again = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut again).unwrap();
    let pid: i32 = again
        .trim()
        .strip_prefix("again ")
        .unwrap_or_else(|| panic!("no 'again' line: {again:?}"))
        .parse()
        .unwrap();
    let _program = KillOnDrop(pid);
    // The new image waits until kal has said it, then ends.
    let lines = stderr_lines(&mut child);
    let want = format!(
        "kal: process {pid} ({}) exec'd without kal's agent in LD_PRELOAD: it runs untracked and gets no leak report",
        prog.canonicalize().unwrap().display()
    );
    let mut seen = Vec::new();
    loop {
        let l = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("kal never named process {pid}: {seen:?}"));
        if l == want {
            break;
        }
        seen.push(l);
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(status.code(), Some(0), "{seen:?} {rest:?}");
    // One line, and no report for either image (the first one exec'd, the second one ran
    // without the agent).
    assert!(
        !seen
            .iter()
            .chain(&rest)
            .any(|l| l.contains("exec'd without")),
        "{seen:?} {rest:?}"
    );
    assert!(
        !seen.iter().chain(&rest).any(|l| l.contains("SUMMARY")),
        "{seen:?} {rest:?}"
    );
}

/// What `prog` prints on stdout without kal (it must succeed): what it must print under kal.
fn plain_output(prog: &std::path::Path) -> String {
    let plain = Command::new(prog).stdin(Stdio::null()).output().unwrap();
    assert!(plain.status.success(), "{plain:?}");
    String::from_utf8_lossy(&plain.stdout).to_string()
}
