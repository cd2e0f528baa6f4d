//! Who may talk to `kal run`: the socket directory is private whatever the umask, a
//! stranger's hello is ignored, and a program in its own PID namespace is checked as the
//! process it is in kal's namespace (never PID 1 of the host).

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// Starts `kal run ARGS -- CMD…` with piped stdin, stdout and stderr.
fn spawn_kal(args: &[&str], cmd: &[&str]) -> std::process::Child {
    ensure_agent();
    Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(args)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kal starts")
}

/// The program's `sockdir MODE PATH` line.
fn sockdir_line(child: &mut std::process::Child) -> (String, String) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut f = line.split_whitespace().skip(1);
    let mode = f.next().unwrap_or_default().to_string();
    let path = f.next().unwrap_or_default().to_string();
    (mode, path)
}

/// Lets the program end and returns kal's whole stderr.
fn finish(
    mut child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    mut seen: Vec<String>,
) -> String {
    child.stdin.take().unwrap().write_all(b"x\n").unwrap();
    let status = child.wait().unwrap();
    seen.extend(rx.iter());
    let stderr = seen.join("\n");
    assert_eq!(status.code(), Some(0), "{stderr}");
    stderr
}

/// The exit report of the process that leaked at peers.c's `peer_leak` line.
fn leak_report(lines: &[Value]) -> &Value {
    let line = line_of("peers.c", "peer_leak");
    lines
        .iter()
        .find(|l| l.get("check").is_none() && !records_at(l, "direct", "peers.c", line).is_empty())
        .unwrap_or_else(|| panic!("no exit report with the leak: {lines:?}"))
}

#[test]
fn socket_directory_is_private_whatever_the_umask() {
    let prog = build("peers.c", &[]);
    ensure_agent();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} run --error-exitcode 0 -- {}",
            env!("CARGO_BIN_EXE_kal"),
            prog.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mode, path) = sockdir_line(&mut child);
    let rx = stderr_lines(&mut child);
    let stderr = finish(child, rx, Vec::new());
    assert_eq!(mode, "700", "socket {path}: {stderr}");
}

#[test]
fn a_strangers_hello_is_ignored() {
    let prog = build("peers.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let j = json.to_str().unwrap();
    let mut child = spawn_kal(
        &[
            "run",
            "--error-exitcode",
            "0",
            "--check-every",
            "100ms",
            "--json",
            j,
        ],
        &[prog.to_str().unwrap()],
    );
    let (_, path) = sockdir_line(&mut child);
    let rx = stderr_lines(&mut child);
    // This test process did not come from kal's program: its well-formed hello, naming
    // process 1, must be refused.
    let hello = kal_proto::Hello {
        magic: kal_proto::MAGIC,
        kind: kal_proto::MsgKind::Hello as u32,
        pid: 1,
        tid: 1,
        version: kal_proto::VERSION,
        header_addr: 0x1000,
    }
    .encode();
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    s.write_all(&hello).unwrap();
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, |l| l.contains("did not start"));
    for n in 1..=3 {
        wait_for(&rx, &mut seen, |l| l.contains(&format!("kal check {n}: ")));
    }
    drop(s);
    let stderr = finish(child, rx, seen);
    let lines = read_json_lines(&json);
    assert!(lines.iter().all(|l| l["pid"] != 1), "{stderr}");
    assert_eq!(totals(leak_report(&lines), "direct"), (231, 3), "{stderr}");
}

#[test]
fn a_program_in_its_own_pid_namespace_is_checked_as_itself() {
    require_command("unshare", "util-linux");
    let prog = build("peers.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let j = json.to_str().unwrap();
    let mut child = spawn_kal(
        &[
            "run",
            "--error-exitcode",
            "0",
            "--check-every",
            "100ms",
            "--json",
            j,
        ],
        &["unshare", "-p", "-f", prog.to_str().unwrap()],
    );
    let _ = sockdir_line(&mut child);
    let rx = stderr_lines(&mut child);
    let mut seen = Vec::new();
    for n in 1..=3 {
        wait_for(&rx, &mut seen, |l| l.contains(&format!("kal check {n}: ")));
    }
    let stderr = finish(child, rx, seen);
    let lines = read_json_lines(&json);
    assert!(
        lines.iter().all(|l| l["pid"] != 1),
        "host PID 1 was checked: {stderr}"
    );
    let leak = leak_report(&lines);
    assert_eq!(totals(leak, "direct"), (231, 3), "{stderr}");
    assert!(leak["pid"].as_i64().unwrap() > 1, "{stderr}");
}
