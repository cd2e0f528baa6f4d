//! `kal attach PID` / `kal detach PID` on programs started without kal.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// Starts `prog` without kal, stdin and stdout piped; returns it, its stdin, the lines it
/// prints after "ready PID", and a guard that kills it.
fn start(prog: &std::path::Path) -> (Child, ChildStdin, Receiver<String>, KillOnDrop) {
    let mut child = Command::new(prog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    assert_eq!(pid, child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, stdin, rx, KillOnDrop(pid))
}

fn line(rx: &Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("a line from the program")
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn attach_reports_leaks_made_after_it_and_detach_leaves_the_program_unchanged() {
    ensure_agent();
    let prog = build("attach_leaker.c", &[]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    let out = ok(&kal(&["attach", &pid]));
    assert!(
        out.contains(&format!("kal attach {pid}: agent loaded")),
        "{out}"
    );
    assert!(out.contains("program paused"), "{out}");
    assert!(
        out.contains("before the attach are not in the agent's table"),
        "{out}"
    );
    // Attached twice: one line.
    one_line_error(&kal(&["attach", &pid]), "already attached");
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "after");
    let (out, j) = check_pid_json(child.id() as i32, &[]);
    // Leaks found: not an error (125).
    assert_ne!(
        out.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = line_of("attach_leaker.c", "after_leak");
    let recs = records_at(&j, "direct", "attach_leaker.c", at);
    assert_eq!(sum(&recs), (4321, 1), "{j:#}");
    // Only the leak made after the attach is known: the one from before is not counted.
    assert_eq!(totals(&j, "direct"), (4321, 1), "{j:#}");
    let before = line_of("attach_leaker.c", "before_leak");
    assert!(records_at(&j, "direct", "attach_leaker.c", before).is_empty());
    let detach = ok(&kal(&["detach", &pid]));
    assert!(detach.contains("GOT slots restored"), "{detach}");
    one_line_error(&kal(&["check", &pid]), "attached and then detached");
    one_line_error(&kal(&["detach", &pid]), "not attached");
    writeln!(stdin, "go").unwrap();
    // 7 * 300 bytes of the block from before, reallocated after the attach.
    assert_eq!(line(&rx), "done 2100");
    assert!(child.wait().unwrap().success());
}

#[test]
fn four_threads_churning_survive_ten_attach_detach_cycles() {
    ensure_agent();
    let prog = build("attach_churn.c", &["-O2"]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    for i in 0..10 {
        let out = ok(&kal(&["attach", &pid]));
        let want = if i == 0 {
            "agent loaded"
        } else {
            "agent attached again"
        };
        assert!(out.contains(want), "cycle {i}: {out}");
        std::thread::sleep(Duration::from_millis(50));
        ok(&kal(&["detach", &pid]));
        std::thread::sleep(Duration::from_millis(20));
    }
    writeln!(stdin, "stop").unwrap();
    assert_eq!(line(&rx), "ok 1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn bad_input_gets_one_line() {
    ensure_agent();
    // Gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id().to_string();
    gone.wait().unwrap();
    one_line_error(&kal(&["attach", &gone_pid]), "no process");
    // Statically linked.
    let (mut stat, _s, _rx, _k) = start(&build("attach_leaker.c", &["-static"]));
    one_line_error(
        &kal(&["attach", &stat.id().to_string()]),
        "statically linked",
    );
    stat.kill().unwrap();
    stat.wait().unwrap();
    // jemalloc.
    require_file(JEMALLOC, "libjemalloc2");
    let mut je = Command::new(build("attach_leaker.c", &[]))
        .env("LD_PRELOAD", JEMALLOC)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _kj = KillOnDrop(je.id() as i32);
    ready_pid(&mut BufReader::new(je.stdout.take().unwrap()));
    one_line_error(&kal(&["attach", &je.id().to_string()]), "uses jemalloc");
    je.kill().unwrap();
    je.wait().unwrap();
    // Started under kal run: its agent is there already.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut run = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "--json", json.to_str().unwrap(), "--"])
        .arg(build("attach_leaker.c", &[]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_pid = ready_pid(&mut BufReader::new(run.stdout.take().unwrap()));
    let _kr = KillOnDrop(run_pid);
    one_line_error(
        &kal(&["attach", &run_pid.to_string()]),
        "started under kal run",
    );
    one_line_error(
        &kal(&["detach", &run_pid.to_string()]),
        "cannot be detached",
    );
    // SAFETY: ending the program this test started.
    unsafe { libc::kill(run_pid, libc::SIGKILL) };
    let _ = run.wait();
}
