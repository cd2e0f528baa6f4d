//! `--no-interrupt`: a live check leaves running the threads blocked in calls that a
//! ptrace stop would end early with EINTR (`epoll_wait`, `sigtimedwait`), and says that
//! their registers and stacks are a gap; without it, each check makes those calls return
//! EINTR once (kernel semantics of a stop, documented in README).

mod common;
use common::*;
use std::io::BufRead;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// The program's "eintr …" lines, as they come (read through a duplicate of its stdout:
/// it prints nothing after its ready line until a call ends early).
fn eintr_lines(live: &Live) -> Receiver<String> {
    use std::os::fd::AsFd;
    let (tx, rx) = std::sync::mpsc::channel();
    let fd = live.out.get_ref().as_fd().try_clone_to_owned().unwrap();
    let mut out = std::io::BufReader::new(std::fs::File::from(fd));
    std::thread::spawn(move || {
        let mut line = String::new();
        while out.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            let _ = tx.send(line.trim().to_string());
            line.clear();
        }
    });
    rx
}

#[test]
fn checks_leave_threads_blocked_in_epoll_wait_and_sigtimedwait_alone() {
    let prog = build("blocked_waits.c", &[]);
    let live = Live::start(&prog);
    let _kill = KillOnDrop(live.pid);
    let said = eintr_lines(&live);
    let line = line_of("blocked_waits.c", "blocked_leak");
    for _ in 0..3 {
        let (out, v) = check_pid_json(live.pid, &["--no-interrupt"]);
        assert_eq!(out.status.code(), Some(23), "{out:?}");
        assert_eq!(totals(&v, "direct"), (123, 1));
        assert_eq!(
            sum(&records_at(&v, "direct", "blocked_waits.c", line)),
            (123, 1)
        );
        let whys: Vec<&str> = v["gaps"]["unread"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["why"].as_str().unwrap())
            .collect();
        assert_eq!(
            whys,
            ["registers and stack of 2 thread(s) left running in epoll_wait, rt_sigtimedwait (--no-interrupt)"],
            "{v}"
        );
        assert_eq!(v["lost_reliable"], false);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("capture incomplete: registers and stack of 2 thread(s) left running"),
            "{text}"
        );
    }
    // Nothing is reclaimed from such a capture.
    let out = kal(&["reclaim", &live.pid.to_string(), "--no-interrupt", "-q"]);
    one_line_error(
        &out,
        "the capture is incomplete (registers and stack of 2 thread(s)",
    );
    std::thread::sleep(Duration::from_millis(300));
    let early: Vec<String> = said.try_iter().collect();
    assert!(early.is_empty(), "calls ended early: {early:?}");
    // Without the mode, a check stops those threads too, and each call returns EINTR once.
    let (out, v) = check_pid_json(live.pid, &[]);
    assert_eq!(out.status.code(), Some(23), "{out:?}");
    assert_eq!(totals(&v, "direct"), (123, 1));
    assert_eq!(v["lost_reliable"], true);
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 2 {
        match said.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["eintr epoll_wait", "eintr sigtimedwait"]);
}
