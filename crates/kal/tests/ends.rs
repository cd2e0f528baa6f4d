//! A report for every way a process ends (issue 10): return, exit (from main or from a
//! second thread), _exit, abort, and, for deaths by signal (SIGSEGV, a fatal SIGTERM),
//! one line saying there is no report; the same in a forked child. Each way is run
//! [`RUNS`] times: no hang, no missing report, exact counts, kal's exit status as README
//! says.

mod common;
use common::*;
use serde_json::Value;
use std::io::Read;
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
    ensure_agent();
    let prog = build("ends.c", &[]);
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
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }),
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

#[test]
fn return_and_exit_from_main_are_reported() {
    for way in ["return", "exit"] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &[way]);
            assert_eq!(o.status.code(), Some(23), "{way}: {}", o.stderr);
            // __libc_freeres ran: nothing of glibc's is left reachable.
            assert_main_report(&o, Some((0, 0)));
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

#[test]
fn death_by_sigsegv_or_sigterm_is_said_in_one_line() {
    for (way, sig, signo) in [
        ("segv", "SIGSEGV", libc::SIGSEGV),
        ("sigterm", "SIGTERM", libc::SIGTERM),
    ] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &[way]);
            assert_eq!(o.status.signal(), Some(signo), "{way}: {}", o.stderr);
            assert!(o.main.is_none(), "{way}: {}", o.stderr);
            assert_died_unread(&o, sig);
        }
    }
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
        }
    }
}

#[test]
fn a_forked_child_killed_by_a_signal_is_said_in_one_line() {
    for (way, sig) in [("segv", "SIGSEGV"), ("sigterm", "SIGTERM")] {
        for _ in 0..RUNS {
            let o = run_ends(&[], &["child", way]);
            // The parent's report and status (it leaked) are kal's.
            assert_eq!(o.status.code(), Some(23), "{way}: {}", o.stderr);
            assert!(o.children.is_empty(), "{way}: {}", o.stderr);
            assert_main_report(&o, Some((0, 0)));
            assert_died_unread(&o, sig);
        }
    }
}
