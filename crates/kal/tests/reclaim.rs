//! Leak tolerance: reclaiming lost blocks inside the live program, learning from
//! contradictions, telling retention from leaks, trimming, and the control socket.

mod common;
use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn reclaim_keeps_the_classic_leak_loop_small() {
    let prog = build("leak_loop.c", &[]);
    let p = prog.to_str().unwrap();
    let (plain, peak_plain) =
        run_sampling_rss(&["run", "-q", "--error-exitcode", "0", "--", p, "6"]);
    assert!(plain.status.success());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let (out, peak) = run_sampling_rss(&[
        "run",
        "-q",
        "--error-exitcode",
        "0",
        "--reclaim=free",
        "--free-sites",
        "*",
        "--free-after",
        "0s",
        "--check-every",
        "500ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        p,
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 6 s at 40 MB/s: about 240 MB without reclaim.
    assert!(
        peak_plain > 200 * 1024,
        "without reclaim the loop grows: {peak_plain} KiB"
    );
    assert!(
        peak < 120 * 1024,
        "with reclaim RSS stays low: {peak} KiB (without: {peak_plain} KiB)"
    );
    let last = read_json_lines(&json).pop().unwrap();
    assert_eq!(last["at_exit"], true);
    let blocks = last["reclaimed"]["blocks"].as_u64().unwrap();
    assert!(blocks >= 30, "reclaimed {blocks} blocks");
    assert_eq!(
        last["reclaimed"]["bytes"].as_u64().unwrap(),
        blocks * 4_096_000
    );
    let line = line_of("leak_loop.c", "loop_leak");
    let site = &last["reclaimed"]["sites"][0];
    assert!(
        site["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["line"] == line),
        "{site}"
    );
}

#[test]
fn reclaim_never_corrupts_reachable_data() {
    let prog = build("checksums.c", &["-O1"]);
    let (out, lines) = run_reclaiming(&["-q"], &prog, &["4"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checksums ok"));
    let last = lines.last().unwrap();
    assert!(
        last["reclaimed"]["blocks"].as_u64().unwrap() > 100,
        "{}",
        last["reclaimed"]
    );
    // Blocks reached through +8 and +16 pointers are possibly lost: never reclaimed.
    assert!(last["reclaimed"]["sites"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| {
            s["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["line"] == line_of("checksums.c", "cs_leak"))
        }));
}

#[test]
fn a_contradicted_site_is_never_reclaimed_again() {
    let prog = build("hidden.c", &[]);
    let (out, lines) = run_reclaiming(&[], &prog, &["3"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no double free, no crash: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hidden ok"));
    let last = lines.last().unwrap();
    assert_eq!(
        last["reclaimed"]["blocks"], 1,
        "only the first hidden block: {}",
        last["reclaimed"]
    );
    let never = last["reclaimed"]["never_again"].as_array().unwrap();
    assert_eq!(never.len(), 1);
    let site = line_of("hidden.c", "hidden_site");
    assert!(
        never[0]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["line"] == site),
        "{never:?}"
    );
    assert!(
        stderr.contains("that site is never reclaimed again"),
        "{stderr}"
    );
    // The periodic text line tells, with the site, at the first check after it happened.
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with('[') && l.contains("kal check "))
        .filter(|l| l.contains("contradiction: the program freed a block kal had reclaimed"))
        .collect();
    assert_eq!(said.len(), 1, "once: {stderr}");
    assert!(
        said[0].contains("hide_me ") && said[0].contains(&format!("hidden.c:{site}")),
        "{}",
        said[0]
    );
    let told: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["new_contradictions"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .collect();
    assert_eq!(told.len(), 1, "one JSON line tells of it");
}

#[test]
fn retention_is_reported_as_such_and_trim_returns_it() {
    let live = Live::start(&build("retention.c", &[]));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("now.json");
    let out = kal(&[
        "check",
        &live.pid.to_string(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(totals(&j, "direct"), (0, 0), "{stderr}");
    let m = &j["memory"];
    let retained = m["retained_bytes"].as_u64().unwrap();
    assert!(
        (270 << 20..=320 << 20).contains(&retained),
        "retained {retained}: {stderr}"
    );
    assert!(m["live_bytes"].as_u64().unwrap() < 3 << 20);
    assert!(m["rss_bytes"].as_u64().unwrap() > 280 << 20);
    assert_eq!(m["arenas"], 1);
    assert!(stderr.contains("not a leak"), "{stderr}");
    let trim = kal(&["trim", &live.pid.to_string()]);
    let text = String::from_utf8_lossy(&trim.stdout);
    assert!(
        trim.status.success(),
        "{}",
        String::from_utf8_lossy(&trim.stderr)
    );
    let after: f64 = text
        .split("-> ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after < 16.0, "RSS after trim: {text}");
}

#[test]
fn the_control_socket_is_private_and_refuses_garbage() {
    let live = Live::start(&build("live_leaker.c", &[]));
    let uid = 0; // the tests run as root
    let dir = format!("/tmp/kal-{uid}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{dir}");
    let sock = format!("{dir}/agent-{}.sock", live.pid);
    // Another user cannot even reach it.
    let connect = "use Socket; socket(S, PF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
                   connect(S, pack_sockaddr_un($ARGV[0])) or die \"connect: $!\\n\"; print \"connected\\n\";";
    let other = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/perl",
            "-e",
            connect,
            &sock,
        ])
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("connect: Permission denied"),
        "{other:?}"
    );
    // The same client as root gets through: the refusal above is the directory's doing.
    let root = Command::new("/usr/bin/perl")
        .args(["-e", connect, &sock])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&root.stdout).contains("connected"),
        "{root:?}"
    );
    // A malformed request is refused and changes nothing.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GARBAGE!GARBAGE!").unwrap();
    let mut resp = [0u8; kal_proto::ctl::RESPONSE_SIZE];
    std::io::Read::read_exact(&mut s, &mut resp).unwrap();
    let r = kal_proto::ctl::Response::decode(&resp).unwrap();
    assert_eq!(r.status, kal_proto::ctl::Status::BadRequest as u32);
    assert_eq!(r.freed_blocks, 0);
    let out = kal(&["check", &live.pid.to_string(), "-q"]);
    assert_eq!(
        out.status.code(),
        Some(23),
        "the program still runs and still leaks"
    );
}

#[test]
fn a_slow_client_cannot_hold_the_agents_control_socket() {
    let live = Live::start(&build("live_leaker.c", &[]));
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let path = format!("/tmp/kal-{uid}/agent-{}.sock", live.pid);
    let mut slow = std::os::unix::net::UnixStream::connect(&path).expect("agent socket");
    // A well-formed reclaim request for a million entries, then one byte every 1.5 s:
    // every single read is quick enough, the request never ends.
    let header = kal_proto::ctl::ReqHeader {
        op: kal_proto::ctl::Op::Reclaim,
        count: kal_proto::ctl::MAX_RECLAIM,
        arg: 0,
    };
    slow.write_all(&header.encode()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let trickle = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if slow.write_all(&[0]).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
    });
    // kal waits 30 s for an answer: the agent must have cut the slow client by then.
    let out = kal(&["trim", &live.pid.to_string()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    trickle.join().unwrap();
}

#[test]
fn blocks_too_small_to_park_are_said_to_be_left_in_place() {
    // Five lost blocks of 700 bytes, next to each other: together less than a page, so
    // parking (which moves whole pages) leaves them. The dry run and the real run say so
    // rather than promising or reporting nothing.
    let live = Live::start(&build("live_leaker.c", &[]));
    let pid = live.pid.to_string();
    let dry = kal(&["reclaim", &pid, "--mode", "dry-run", "-q"]);
    let text = String::from_utf8_lossy(&dry.stderr);
    assert!(
        text.contains("would park the pages of 3500 bytes in 5 blocks")
            && text.contains("(3500 bytes in 5 of them hold no whole page of their own"),
        "{text}"
    );
    let real = kal(&["reclaim", &pid, "-q"]);
    let text = String::from_utf8_lossy(&real.stderr);
    assert!(text.contains("parked 0 bytes of 0 blocks"), "{text}");
    assert!(
        text.contains("left in place: 3500 bytes in 5 lost blocks that hold no whole page"),
        "{text}"
    );
}
