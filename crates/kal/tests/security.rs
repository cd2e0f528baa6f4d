//! Who kal talks to and who may command an agent: kal believes only the agent of the
//! process it names (the socket's directory is that user's own, the peer is that process),
//! and an agent obeys reclaim, park, trim and snapshot requests only from a peer that could
//! ptrace it.

mod common;
use common::*;
use kal_proto::ctl::{Response, Status};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The user the targets of these tests run as (no passwd entry needed).
const TARGET_UID: u32 = 64301;
/// Another user, the attacker.
const OTHER_UID: u32 = 64302;
/// The user of the ptrace-rule test's programs (its own `/tmp/kal-UID`: tests run in
/// parallel, and the directory test removes its user's directory).
const PTRACE_UID: u32 = 64304;

/// `setpriv` to `uid` (group the same number, no supplementary groups).
fn as_user(uid: u32) -> Command {
    require_command("setpriv", "util-linux");
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    c
}

/// A forged agent answer: "done, one block freed".
fn forged_hex() -> String {
    Response {
        status: Status::Ok as u32,
        freed_blocks: 1,
        freed_bytes: 4096,
        ..Default::default()
    }
    .encode()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect()
}

/// A forged agent as a perl one-liner: listens at ARGV[0], says "listening", and answers
/// every request with the bytes ARGV[1] (hex), saying "answered" each time.
const FORGER: &str = "use Socket; my ($p, $h) = @ARGV; unlink $p; \
    socket(L, PF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
    bind(L, pack_sockaddr_un($p)) or die \"bind: $!\\n\"; chmod 0777, $p; \
    listen(L, 8) or die; $| = 1; print \"listening\\n\"; \
    while (accept(C, L)) { my $b; if (sysread(C, $b, 16) > 0) { \
    syswrite(C, pack('H*', $h) . (\"\\xff\" x 64)); print \"answered\\n\"; } close C; }";

/// Starts the forged agent as user `uid` at `sock`, past its "listening" line.
fn forger(mut cmd: Command, sock: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut c = cmd
        .args(["/usr/bin/perl", "-e", FORGER, sock, &forged_hex()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    if line.trim() != "listening" {
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("the forged agent did not start: {line:?} {err}");
    }
    (c, out)
}

/// Starts `prog` as user `uid` with the agent preloaded (no `kal run`: the agent serves
/// its control socket all the same), past its "ready PID" line.
fn start_as(uid: u32, prog: &Path) -> (Child, i32) {
    ensure_agent();
    let agent = Path::new(env!("CARGO_BIN_EXE_kal")).with_file_name("libkal_agent.so");
    // The preload reaches the program only (through env): setpriv itself is not to run
    // with the agent.
    let mut c = as_user(uid)
        .arg("env")
        .arg(format!("LD_PRELOAD={}", agent.display()))
        .arg(prog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    // Keep reading its ticks so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut line = String::new();
        while out.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
    });
    (c, pid)
}

#[test]
fn a_socket_directory_made_by_another_user_is_refused() {
    let dir = format!("/tmp/kal-{TARGET_UID}");
    let _ = std::fs::remove_dir_all(&dir);
    // The attacker creates the target user's directory first (anyone may, in /tmp).
    let made = as_user(OTHER_UID)
        .args(["mkdir", "-m", "0777", &dir])
        .status()
        .unwrap();
    assert!(made.success());
    let prog = build("live_leaker.c", &[]);
    let (mut target, pid) = start_as(TARGET_UID, &prog);
    let _kill = KillOnDrop(pid);
    // The agent refused the directory; the attacker serves the socket in its place.
    let sock = format!("{dir}/agent-{pid}.sock");
    let (mut forged, mut said) = forger(as_user(OTHER_UID), &sock);
    let out = kal(&["trim", &pid.to_string()]);
    one_line_error(
        &out,
        &format!("/tmp/kal-{TARGET_UID} belongs to uid {OTHER_UID}, not to the process's uid {TARGET_UID}"),
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = kal(&["reclaim", &pid.to_string()]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("freed"),
        "{out:?}"
    );
    forged.kill().unwrap();
    forged.wait().unwrap();
    let mut rest = String::new();
    said.read_to_string(&mut rest).unwrap();
    assert!(
        !rest.contains("answered"),
        "kal talked to the forger: {rest}"
    );
    target.kill().unwrap();
    target.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_socket_served_by_another_process_is_refused() {
    // The directory is right (the agent's own), but another process of the same user
    // replaced the agent's socket with its own.
    let live = Live::start(&build("live_leaker.c", &[]));
    let _kill = KillOnDrop(live.pid);
    let sock = format!("/tmp/kal-0/agent-{}.sock", live.pid);
    assert!(Path::new(&sock).exists());
    let (mut forged, mut said) = forger(Command::new("env"), &sock);
    let out = kal(&["trim", &live.pid.to_string()]);
    one_line_error(
        &out,
        &format!(
            "it is served by process {} (uid 0), not by process {}",
            forged.id(),
            live.pid
        ),
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    forged.kill().unwrap();
    forged.wait().unwrap();
    let mut rest = String::new();
    said.read_to_string(&mut rest).unwrap();
    assert!(
        !rest.contains("answered"),
        "kal talked to the forger: {rest}"
    );
    let _ = std::io::stdout().flush();
}

/// Sends one request header (op `op`, no entries) to the agent socket `sock` as `cmd`
/// (`setpriv …` or plain) and returns the agent's answer.
fn ask(mut cmd: Command, sock: &str, op: kal_proto::ctl::Op) -> Response {
    let header: String = kal_proto::ctl::ReqHeader {
        op,
        count: 0,
        arg: 0,
    }
    .encode()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect();
    let client = "use Socket; socket(S, PF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
        connect(S, pack_sockaddr_un($ARGV[0])) or die \"connect: $!\\n\"; \
        syswrite(S, pack('H*', $ARGV[1])); my $b = ''; \
        while (length($b) < 64) { sysread(S, my $c, 64 - length($b)) or last; $b .= $c; } \
        print unpack('H*', $b), \"\\n\";";
    let out = cmd
        .args(["/usr/bin/perl", "-e", client, sock, &header])
        .output()
        .unwrap();
    let hex = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(hex.len(), 128, "no whole answer: {out:?}");
    let mut b = [0u8; kal_proto::ctl::RESPONSE_SIZE];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Response::decode(&b).expect("a response")
}

#[test]
fn only_a_peer_that_could_ptrace_the_process_may_make_it_act() {
    use kal_proto::ctl::Op;
    let dir = format!("/tmp/kal-{PTRACE_UID}");
    let _ = std::fs::remove_dir_all(&dir);
    // A program of the target user that made itself non-dumpable: its own user cannot
    // ptrace it, so its agent must not trim, reclaim, park or snapshot for that user.
    let (mut locked, pid) = start_as(PTRACE_UID, &build("live_leaker.c", &["-DNONDUMPABLE"]));
    let _kill = KillOnDrop(pid);
    let sock = format!("{dir}/agent-{pid}.sock");
    for op in [Op::Trim, Op::Reclaim, Op::Park, Op::Snapshot] {
        let r = ask(as_user(PTRACE_UID), &sock, op);
        assert_eq!(r.status, Status::Denied as u32, "{op:?}: {r:?}");
    }
    // Its counters are no secret to its user.
    assert_eq!(
        ask(as_user(PTRACE_UID), &sock, Op::Stats).status,
        Status::Ok as u32
    );
    // Root could ptrace it: served.
    assert_eq!(
        ask(Command::new("env"), &sock, Op::Trim).status,
        Status::Ok as u32
    );
    locked.kill().unwrap();
    locked.wait().unwrap();
    // The same program, dumpable: its user is served.
    let (mut open, pid) = start_as(PTRACE_UID, &build("live_leaker.c", &[]));
    let _kill = KillOnDrop(pid);
    let sock = format!("{dir}/agent-{pid}.sock");
    assert_eq!(
        ask(as_user(PTRACE_UID), &sock, Op::Trim).status,
        Status::Ok as u32
    );
    open.kill().unwrap();
    open.wait().unwrap();
}
