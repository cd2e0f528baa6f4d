//! A report for every way a process ends (issue 10): return, exit (from main or from a
//! second thread), _exit, abort, and deaths by signal (SIGSEGV, a fatal SIGTERM from the
//! process itself or from outside, raise(SIGABRT)), read at the exit event by kal run's
//! tracer; with `--no-trace`, one line saying there is no report. The same in a forked
//! child. Each way is run [`RUNS`] times: no hang, no missing report, exact counts, kal's
//! exit status as README says. A traced program that stops itself and handles signals
//! behaves as without kal, and is checked while traced.

mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;

/// What one `kal run` of `ends.c` gave.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// The launched process's report, if any.
    main: Option<Value>,
    /// Forked children's reports.
    children: Vec<Value>,
}

/// Runs `kal run --json FILE FLAGS -- ends ARGS`, failing the test if it takes more
/// than a minute (a hang).
fn run_ends(flags: &[&str], args: &[&str]) -> Outcome {
    run_ends_then(flags, args, |_| {})
}

/// [`run_ends`]; with the `wait` way, `on_ready` gets the program's pid once it printed
/// its ready line (its output then starts after that line).
fn run_ends_then(flags: &[&str], args: &[&str], on_ready: impl FnOnce(i32)) -> Outcome {
    run_program("ends.c", flags, args, on_ready)
}

/// Runs `kal run --json FILE FLAGS -- PROGRAM ARGS` (`PROGRAM` built from the source
/// `src`), as [`run_ends_then`] does.
fn run_program(src: &str, flags: &[&str], args: &[&str], on_ready: impl FnOnce(i32)) -> Outcome {
    ensure_agent();
    let prog = build(src, &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--json", json.to_str().unwrap()])
        .args(flags)
        .arg("--")
        .arg(&prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    if args.last() == Some(&"wait") {
        on_ready(ready_pid(&mut out));
    }
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }),
        err_reader,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kal run {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = readers.0.join().unwrap();
    let stderr = readers.1.join().unwrap();
    let parse = |p: &std::path::Path| -> Option<Value> {
        let text = std::fs::read_to_string(p).ok()?;
        (!text.is_empty()).then(|| {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("bad JSON ({e}): {text}\nstderr: {stderr}"))
        })
    };
    let main = parse(&json);
    let children = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &json)
        .map(|p| parse(&p).expect("a child's report"))
        .collect();
    Outcome {
        status,
        stdout,
        stderr,
        main,
        children,
    }
}

/// The four classes of a report, `(bytes, blocks)` each.
fn four(r: &Value) -> [(u64, u64); 4] {
    ["direct", "indirect", "possible", "reachable"].map(|k| totals(r, k))
}

fn leak_at(r: &Value, marker: &str) -> (u64, u64) {
    sum(&records_at(
        r,
        "direct",
        "ends.c",
        line_of("ends.c", marker),
    ))
}

/// The launched process leaked its 55 bytes and nothing else is lost.
fn assert_main_report(o: &Outcome, reachable: Option<(u64, u64)>) {
    let r = o
        .main
        .as_ref()
        .unwrap_or_else(|| panic!("no report: {}", o.stderr));
    let got = four(r);
    assert_eq!(got[..3], [(55, 1), (0, 0), (0, 0)], "{}", o.stderr);
    if let Some(reach) = reachable {
        assert_eq!(got[3], reach, "reachable: {}", o.stderr);
    }
    assert_eq!(leak_at(r, "main_leak"), (55, 1), "{}", o.stderr);
    assert_eq!(
        o.stderr.matches("SUMMARY: kal:").count(),
        1 + o.children.len()
    );
}

/// The one line for a process that died of `sig`, and no report for it.
fn assert_died_unread(o: &Outcome, sig: &str) {
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.contains("before kal could read it"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", o.stderr);
    assert!(
        lines[0].contains(&format!(
            " died of {sig} before kal could read it: no leak report"
        )) && lines[0].starts_with("==")
            && lines[0].contains("kal: process "),
        "{}",
        o.stderr
    );
}

/// How many times the report said the freeres functions were skipped because of
/// `others` other running threads: in its text (one line) and in its JSON.
fn freeres_skipped(o: &Outcome, r: &Value, others: u64) -> (usize, Option<u64>) {
    let who = if others == 1 {
        "1 other thread of the program was still running".to_string()
    } else {
        format!("{others} other threads of the program were still running")
    };
    let lines = o
        .stderr
        .lines()
        .filter(|l| {
            l.starts_with(&format!(
                "=={}== note: __libc_freeres and __gnu_cxx::__freeres did not run at exit: {who}",
                r["pid"]
            )) && l.ends_with("counts as still reachable here, where memcheck frees it")
        })
        .count();
    (
        lines,
        r.get("freeres_skipped_threads").and_then(Value::as_u64),
    )
}

#[test]
fn return_and_exit_from_main_are_reported() {
    for way in ["return", "exit"] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &[way]);
            assert_eq!(o.status.code(), Some(23), "{way}: {}", o.stderr);
            // __libc_freeres ran: nothing of glibc's is left reachable, and no line says
            // it was skipped.
            assert_main_report(&o, Some((0, 0)));
            assert!(!o.stderr.contains("did not run at exit"), "{}", o.stderr);
            assert_eq!(
                o.main.as_ref().unwrap().get("freeres_skipped_threads"),
                None
            );
        }
        let o = run_ends(&["--error-exitcode", "0"], &[way]);
        assert_eq!(o.status.code(), Some(4), "{way}: {}", o.stderr);
        assert_main_report(&o, Some((0, 0)));
    }
}

#[test]
fn exit_from_a_second_thread_is_reported() {
    for _ in 0..RUNS {
        let o = run_ends(&[], &["thread_exit"]);
        assert_eq!(o.status.code(), Some(23), "{}", o.stderr);
        assert_main_report(&o, None);
        // The main thread still waits in pthread_join: the freeres functions are skipped
        // (it could be using what they free), and the report says so, once.
        assert_eq!(
            freeres_skipped(&o, o.main.as_ref().unwrap(), 1),
            (1, Some(1)),
            "{}",
            o.stderr
        );
    }
    let o = run_ends(&["--error-exitcode", "0"], &["thread_exit"]);
    assert_eq!(o.status.code(), Some(3), "{}", o.stderr);
}

#[test]
fn underscore_exit_is_reported_without_flushing_stdio() {
    for _ in 0..RUNS {
        let o = run_ends(&[], &["_exit"]);
        assert_eq!(o.status.code(), Some(23), "{}", o.stderr);
        // _exit skips stdio: the buffered text is never written, and its buffer (one
        // block of a pipe's 4096 bytes) is still reachable (freeres does not run).
        assert_eq!(o.stdout, "");
        assert_main_report(&o, Some((4096, 1)));
    }
    let o = run_ends(&["--error-exitcode", "0"], &["_exit"]);
    assert_eq!(o.status.code(), Some(5), "{}", o.stderr);
}

#[test]
fn a_vfork_child_calling_underscore_exit_does_not_speak_for_its_parent() {
    for _ in 0..RUNS {
        let o = run_ends(&[], &["vfork"]);
        // One report, the parent's, at its own exit; no line about the child.
        assert_eq!(o.status.code(), Some(23), "{}", o.stderr);
        assert!(o.children.is_empty(), "{}", o.stderr);
        assert_main_report(&o, Some((0, 0)));
        assert!(
            !o.stderr.contains("before kal could read it"),
            "{}",
            o.stderr
        );
    }
}

#[test]
fn abort_is_reported_and_kal_dies_of_sigabrt() {
    for _ in 0..RUNS {
        let o = run_ends(&[], &["abort"]);
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{}", o.stderr);
        assert_main_report(&o, Some((0, 0)));
    }
}

/// The line kal prints for a process it reads at its death by `sig`, once, and no line
/// saying a process went unread.
fn assert_read_dying(o: &Outcome, sig: &str) {
    assert_eq!(
        o.stderr
            .lines()
            .filter(|l| l.starts_with("==")
                && l.ends_with(&format!(" is dying of {sig}: leak report at its death")))
            .count(),
        1,
        "{}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("before kal could read it"),
        "{}",
        o.stderr
    );
}

#[test]
fn death_by_a_signal_is_reported_and_kal_dies_of_it() {
    for (way, sig, signo) in [
        ("segv", "SIGSEGV", libc::SIGSEGV),
        ("sigterm", "SIGTERM", libc::SIGTERM),
        ("raise_abrt", "SIGABRT", libc::SIGABRT),
    ] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &[way]);
            assert_eq!(o.status.signal(), Some(signo), "{way}: {}", o.stderr);
            assert_main_report(&o, Some((0, 0)));
            assert_read_dying(&o, sig);
        }
    }
}

#[test]
fn a_fatal_sigterm_from_outside_is_reported() {
    for _ in 0..RUNS {
        let o = run_ends_then(&[], &["wait"], |pid| {
            // SAFETY: signalling the program kal runs.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        });
        assert_eq!(o.status.signal(), Some(libc::SIGTERM), "{}", o.stderr);
        // stdout's buffer (a pipe's 4096 bytes) is still held: no freeres at a death.
        assert_main_report(&o, Some((4096, 1)));
        assert_read_dying(&o, "SIGTERM");
    }
}

#[test]
fn without_tracing_a_death_by_signal_is_said_in_one_line() {
    for (way, sig, signo) in [
        ("segv", "SIGSEGV", libc::SIGSEGV),
        ("sigterm", "SIGTERM", libc::SIGTERM),
        ("raise_abrt", "SIGABRT", libc::SIGABRT),
    ] {
        for _ in 0..5 {
            let o = run_ends(&["--no-trace"], &[way]);
            assert_eq!(o.status.signal(), Some(signo), "{way}: {}", o.stderr);
            assert!(o.main.is_none(), "{way}: {}", o.stderr);
            assert_died_unread(&o, sig);
        }
    }
    let o = run_ends(&["--no-trace"], &["child", "segv"]);
    assert_eq!(o.status.code(), Some(23), "{}", o.stderr);
    assert!(o.children.is_empty(), "{}", o.stderr);
    assert_died_unread(&o, "SIGSEGV");
}

#[test]
fn a_forked_child_is_reported_whichever_way_it_ends() {
    for way in ["return", "exit", "_exit", "abort", "thread_exit"] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &["child", way]);
            assert_eq!(o.status.code(), Some(23), "{way}: {}", o.stderr);
            assert_eq!(o.children.len(), 1, "{way}: {}", o.stderr);
            assert_main_report(&o, Some((0, 0)));
            let c = &o.children[0];
            // Its own 77 bytes, and its copy of the parent's 55.
            assert_eq!(
                four(c)[..3],
                [(132, 2), (0, 0), (0, 0)],
                "{way}: {}",
                o.stderr
            );
            assert_eq!(leak_at(c, "child_leak"), (77, 1), "{way}");
            assert_eq!(leak_at(c, "main_leak"), (55, 1), "{way}");
            assert_ne!(c["pid"], o.main.as_ref().unwrap()["pid"]);
            assert_eq!(o.stdout, "", "{way}");
            // Only a child exiting beside its other thread skips the freeres functions.
            let skipped = if way == "thread_exit" {
                (1, Some(1))
            } else {
                (0, None)
            };
            assert_eq!(freeres_skipped(&o, c, 1), skipped, "{way}: {}", o.stderr);
            assert_eq!(
                freeres_skipped(&o, o.main.as_ref().unwrap(), 1),
                (0, None),
                "{way}: {}",
                o.stderr
            );
        }
    }
}

#[test]
fn a_forked_child_killed_by_a_signal_is_reported() {
    for (way, sig) in [
        ("segv", "SIGSEGV"),
        ("sigterm", "SIGTERM"),
        ("raise_abrt", "SIGABRT"),
    ] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &["child", way]);
            // The parent's report and status (it leaked) are kal's.
            assert_eq!(o.status.code(), Some(23), "{way}: {}", o.stderr);
            assert_main_report(&o, Some((0, 0)));
            assert_eq!(o.children.len(), 1, "{way}: {}", o.stderr);
            let c = &o.children[0];
            assert_eq!(
                four(c)[..3],
                [(132, 2), (0, 0), (0, 0)],
                "{way}: {}",
                o.stderr
            );
            assert_eq!(leak_at(c, "child_leak"), (77, 1), "{way}");
            assert_read_dying(&o, sig);
        }
    }
}

/// What `prefork 4 SIG` prints, with or without kal: every worker ended by its own exit(0).
const PREFORK_OUT: &str =
    "worker 0 exited 0\nworker 1 exited 0\nworker 2 exited 0\nworker 3 exited 0\n";

/// The master's report and one per worker, with exact counts: the master its 100 bytes,
/// each worker its 77 and its copy of the master's 100; no line saying a process went
/// unread or died.
fn assert_prefork_reports(o: &Outcome, what: &str) {
    let leak = |r: &Value, marker: &str| {
        sum(&records_at(
            r,
            "direct",
            "prefork.c",
            line_of("prefork.c", marker),
        ))
    };
    assert_eq!(o.stdout, PREFORK_OUT, "{what}: {}", o.stderr);
    let main = o
        .main
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no report of the master: {}", o.stderr));
    assert_eq!(
        four(main)[..3],
        [(100, 1), (0, 0), (0, 0)],
        "{what}: {}",
        o.stderr
    );
    assert_eq!(leak(main, "master_leak"), (100, 1), "{what}");
    assert_eq!(o.children.len(), 4, "{what}: {}", o.stderr);
    for c in &o.children {
        assert_eq!(
            four(c)[..3],
            [(177, 2), (0, 0), (0, 0)],
            "{what}: {}",
            o.stderr
        );
        assert_eq!(leak(c, "worker_leak"), (77, 1), "{what}");
        assert_eq!(leak(c, "master_leak"), (100, 1), "{what}");
    }
    assert_eq!(
        o.stderr.matches("SUMMARY: kal:").count(),
        5,
        "{what}: {}",
        o.stderr
    );
    for unread in ["no leak report", "dying of", "cannot reach kal"] {
        assert!(!o.stderr.contains(unread), "{what}: {}", o.stderr);
    }
}

#[test]
fn prefork_workers_that_gave_up_root_are_each_reported_when_stopped() {
    // nginx's workers switch to an unprivileged user first thing, so they may no longer
    // enter kal's private directory to say they exit: each got "ended without calling
    // exit" instead of a report. They say it on a connection opened with their hello.
    // Stopped gracefully (SIGQUIT) or fast (SIGTERM) by their master, which SIGKILLs a
    // worker still there after 1.5 s, as nginx's does.
    let prog = build("prefork.c", &[]);
    for sig in ["term", "quit"] {
        let plain = Command::new(&prog).args(["4", sig]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&plain.stdout), PREFORK_OUT);
        for run in 0..RUNS / 2 {
            let o = run_program("prefork.c", &[], &["4", sig], |_| {});
            assert_eq!(o.status.code(), Some(23), "{sig} run {run}: {}", o.stderr);
            assert_prefork_reports(&o, &format!("{sig} run {run}"));
        }
    }
}

#[test]
fn prefork_workers_dropping_root_right_after_fork_run_as_without_kal() {
    // Untraced, a fork child's hello waits for no answer, so the worker calls setgid
    // while the agent threads its fork handler started have not run yet. The agent took
    // the parent's thread ids, left over in the child's memory, for its own: it found
    // those threads gone at once, made the call beside the child's and started a second
    // server on the server's own stack, where the first one ran on. Workers died of
    // SIGSEGV, or hung in glibc's setxid (nginx: in initgroups) until their master
    // killed them, in most runs.
    for sig in ["term", "quit"] {
        for run in 0..RUNS / 2 {
            let o = run_program("prefork.c", &["--no-trace"], &["4", sig], |_| {});
            assert_eq!(o.status.code(), Some(23), "{sig} run {run}: {}", o.stderr);
            assert_prefork_reports(&o, &format!("untraced {sig} run {run}"));
        }
    }
}

#[test]
fn prefork_workers_that_gave_up_root_are_checked_live() {
    // `kal check` looks for the agent's socket in /tmp/kal-UID of the process's user and
    // believes only a socket that user listens on. A worker that became nobody kept the
    // socket it made as root: every live check of it failed ("cannot reach the kal agent
    // of process P at .../tmp/kal-65534/agent-P.sock"), so did `kal run --check-every`'s.
    // Its agent now makes a new socket as the worker's new user, and removes the old one.
    ensure_agent();
    let prog = build("prefork.c", &[]);
    let worker_line = line_of("prefork.c", "worker_leak");
    let master_line = line_of("prefork.c", "master_leak");
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for flags in [&[][..], &["--no-trace"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "-q", "--error-exitcode", "0"])
            .args(flags)
            .arg("--")
            .arg(&prog)
            .args(["2", "term", "wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let master = ready_pid(&mut out);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let workers: Vec<i32> = line
            .trim()
            .strip_prefix("workers ")
            .unwrap_or_else(|| panic!("no workers line: {line:?}"))
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(workers.len(), 2);
        for &w in &workers {
            assert_eq!(status_field(w, "Uid:"), "65534\t65534\t65534\t65534");
            let (o, now) = check_pid_json(w, &[]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() || o.status.code() == Some(23),
                "{flags:?}: {err}"
            );
            assert_eq!(totals(&now, "direct"), (177, 2), "{flags:?}: {err}");
            assert_eq!(
                sum(&records_at(&now, "direct", "prefork.c", worker_line)),
                (77, 1),
                "{flags:?}"
            );
            assert!(
                !std::path::Path::new(&format!("/tmp/kal-{me}/agent-{w}.sock")).exists(),
                "{flags:?}: the socket the worker made as root is left behind"
            );
        }
        let (o, now) = check_pid_json(master, &[]);
        assert_eq!(
            sum(&records_at(&now, "direct", "prefork.c", master_line)),
            (100, 1),
            "{flags:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "worker 0 exited 0\nworker 1 exited 0\n", "{flags:?}");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0), "{flags:?}: {err}");
        assert!(!err.contains("failed"), "{flags:?}: {err}");
    }
}

/// The state letter of every thread of `pid`.
fn thread_states(pid: i32) -> Vec<char> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.ok()?.path().join("stat")).ok()?;
            stat.rsplit_once(") ")?.1.chars().next()
        })
        .collect()
}

/// A field of `/proc/PID/status`.
fn status_field(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs `stops.c` (under `kal run` with `kal_args`, or alone): once it is ready, waits
/// until every thread is stopped, checks that they stay stopped, calls `while_stopped`
/// with its pid, wakes it with SIGCONT; returns its output after the ready line and the
/// exit status.
fn run_stops(kal_args: Option<&[&str]>, while_stopped: impl FnOnce(i32)) -> (String, ExitStatus) {
    ensure_agent();
    let prog = build("stops.c", &[]);
    let mut cmd = match kal_args {
        Some(a) => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_kal"));
            c.args(["run"]).args(a).arg("--").arg(&prog);
            c
        }
        None => Command::new(&prog),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !thread_states(pid).iter().all(|&c| c == 'T' || c == 't') {
        assert!(Instant::now() < deadline, "never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let states = thread_states(pid);
    assert!(states.len() >= 2, "{states:?}");
    assert!(
        states.iter().all(|&c| c == 'T' || c == 't'),
        "stays stopped: {states:?}"
    );
    while_stopped(pid);
    // SAFETY: waking the stopped test program.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    (rest, child.wait().unwrap())
}

#[test]
fn a_traced_program_stops_continues_and_handles_signals_as_without_kal() {
    let (alone, alone_status) = run_stops(None, |_| {});
    assert_eq!(alone, "continued\nhandled 1000 SIGUSR1\n");
    assert_eq!(alone_status.code(), Some(0));
    for _ in 0..5 {
        let mut kal_pid = 0;
        let (out, status) = run_stops(Some(&["-q"]), |pid| {
            kal_pid = status_field(pid, "PPid:").parse().unwrap();
            assert_eq!(status_field(pid, "TracerPid:"), kal_pid.to_string());
        });
        assert_eq!(out, alone);
        assert_eq!(status.code(), alone_status.code());
    }
    // Not traced with --no-trace: gdb or strace could attach.
    run_stops(Some(&["-q", "--no-trace"]), |pid| {
        assert_eq!(status_field(pid, "TracerPid:"), "0");
    });
}

#[test]
fn a_traced_program_is_checked_with_exact_counts() {
    ensure_agent();
    let prog = build("stops.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("checks.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--trace", "--check-every", "200ms", "--json"])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .args(["leak", "3", "hold", "1500", "nostop", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    assert_eq!(status_field(pid, "TracerPid:"), child.id().to_string());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "continued\nhandled 1000 SIGUSR1\n", "{err}");
    assert_eq!(status.code(), Some(23), "{err}");
    assert!(!err.contains("failed"), "{err}");
    let lines = read_json_lines(&json);
    let checks: Vec<&Value> = lines.iter().filter(|l| l.get("check").is_some()).collect();
    assert!(checks.len() >= 3, "{} checks: {err}", checks.len());
    // The first check may come before the three leaks (the agent says hello before main).
    for c in &checks[1..] {
        assert_eq!(totals(c, "direct"), (300, 3), "{c}");
        assert_eq!(totals(c, "possible"), (0, 0), "{c}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["at_exit"], true);
    assert_eq!(totals(last, "direct"), (300, 3));
    let at = line_of("stops.c", "stops_leak");
    assert_eq!(sum(&records_at(last, "direct", "stops.c", at)), (300, 3));
}

#[test]
fn when_kal_dies_the_traced_program_runs_on() {
    ensure_agent();
    let prog = build("stops.c", &[]);
    let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--"])
        .arg(&prog)
        .args(["hold", "1000", "nostop", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(kal.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    assert_eq!(status_field(pid, "TracerPid:"), kal.id().to_string());
    kal.kill().unwrap();
    kal.wait().unwrap();
    assert_eq!(status_field(pid, "TracerPid:"), "0");
    // It handles its 1,000 signals and ends on its own (its stdout is still this pipe).
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "continued\nhandled 1000 SIGUSR1\n");
}
