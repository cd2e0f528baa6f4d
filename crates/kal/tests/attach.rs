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
    start_env(prog, &[])
}

/// [`start`] with `envs` added to the program's environment.
fn start_env(
    prog: &std::path::Path,
    envs: &[(&str, &str)],
) -> (Child, ChildStdin, Receiver<String>, KillOnDrop) {
    let mut child = Command::new(prog)
        .envs(envs.iter().copied())
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

/// Records of class `kind` labelled "allocated before kal attached".
fn before_attach_records<'a>(j: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    j["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == kind && r["contents"]["origin"] == "allocated before kal attached")
        .collect()
}

/// The output of a `kal check` that found leaks (exit code 23) or none.
fn ok_or_leaks(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(matches!(out.status.code(), Some(0) | Some(23)), "{text}");
    text
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
        out.contains("blocks allocated before the attach come from glibc's heap"),
        "{out}"
    );
    // Attached twice: one line.
    one_line_error(&kal(&["attach", &pid]), "already attached");
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "after");
    let (out, j) = check_pid_json(child.id() as i32, &["--show-reachable"]);
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
    // The leak from before the attach comes from the heap walk: counted, labelled, no
    // stack, its usable size (1000 bytes asked: 1000 usable).
    let old = before_attach_records(&j, "direct");
    assert_eq!(old.len(), 1, "{j:#}");
    assert_eq!(old[0]["bytes"], 1000, "{j:#}");
    assert_eq!(old[0]["blocks"], 1, "{j:#}");
    assert_eq!(old[0]["contents"]["block_size"], 1000, "{j:#}");
    assert!(old[0]["stack"].as_array().unwrap().is_empty(), "{j:#}");
    assert_eq!(totals(&j, "direct"), (5321, 2), "{j:#}");
    // Nothing else from before the attach (the agent's own threads, the loader's data
    // for it) looks lost.
    for kind in ["indirect", "possible"] {
        assert_eq!(totals(&j, kind), (0, 0), "{kind}: {j:#}");
    }
    // The block from before that the program freed after the attach is gone; the one it
    // reallocated is the agent's (with its stack), not a block from before.
    let reachable_old: Vec<u64> = before_attach_records(&j, "reachable")
        .iter()
        .map(|r| r["contents"]["block_size"].as_u64().unwrap())
        .collect();
    assert!(!reachable_old.contains(&200), "{reachable_old:?}");
    assert!(!reachable_old.contains(&312), "{reachable_old:?}");
    assert!(
        j["note"]
            .as_str()
            .unwrap()
            .contains("allocated before kal attached"),
        "{j:#}"
    );
    assert_eq!(j["lost_reliable"], true, "{j:#}");
    let text = ok_or_leaks(&kal(&["check", &pid]));
    assert!(
        text.contains(
            "Direct leak of 1000 bytes in 1 block of 1000 bytes, allocated before kal attached:"
        ),
        "{text}"
    );
    assert!(text.contains(&format!("attach_leaker.c:{at}")), "{text}");
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
fn eight_threads_churning_across_threads_survive_fifty_attach_detach_cycles() {
    ensure_agent();
    let prog = build("attach_churn.c", &["-O2"]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    let mut worst = 0.0f64;
    for i in 0..50 {
        let out = ok(&kal(&["attach", &pid]));
        let want = if i == 0 {
            "agent loaded"
        } else {
            "agent attached again"
        };
        assert!(out.contains(want), "cycle {i}: {out}");
        worst = worst.max(pause_ms(&out));
        if i % 10 == 0 {
            // A check while attached: the blocks from before are walked, not harmed.
            let (o, j) = check_pid_json(child.id() as i32, &[]);
            assert_ne!(o.status.code(), Some(125), "cycle {i}: {j}");
        }
        std::thread::sleep(Duration::from_millis(50));
        ok(&kal(&["detach", &pid]));
        std::thread::sleep(Duration::from_millis(20));
    }
    writeln!(stdin, "stop").unwrap();
    assert_eq!(line(&rx), "ok 1");
    assert!(child.wait().unwrap().success());
    eprintln!("50 attach cycles of 8 churning threads: worst pause {worst:.2} ms");
}

/// The pause `kal attach` reports, in milliseconds.
fn pause_ms(out: &str) -> f64 {
    let at = out.find("program paused ").expect("a pause") + "program paused ".len();
    out[at..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn kal_killed_mid_attach_leaves_the_program_running_unharmed() {
    ensure_agent();
    let prog = build("attach_churn.c", &["-O2"]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    let mut k = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["attach", &pid])
        .env("KAL_TEST_HOLD", "attach")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(k.stderr.take().unwrap());
    let mut l = String::new();
    while !l.contains("test hold: attach") {
        l.clear();
        assert!(
            err.read_line(&mut l).unwrap() > 0,
            "kal ended before the hold"
        );
    }
    k.kill().unwrap();
    k.wait().unwrap();
    // The stub finishes the load by itself; the threads run on.
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(!status.contains("State:\tT"), "{status}");
    // Attached (by the stub that completed), so it can be detached and attached again.
    ok(&kal(&["detach", &pid]));
    ok(&kal(&["attach", &pid]));
    ok(&kal(&["detach", &pid]));
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
    // Traced by someone else (gdb holds it for a while).
    require_command("gdb", "gdb");
    let (mut traced, _t, _trx, _kt) = start(&build("attach_leaker.c", &[]));
    let tpid = traced.id().to_string();
    let mut gdb = Command::new("gdb")
        .args(["-p", &tpid, "-batch", "-ex", "shell sleep 4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{tpid}/status"))
        .unwrap()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l != "TracerPid:\t0")
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "gdb did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = kal(&["attach", &tpid]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    gdb.wait().unwrap();
    traced.kill().unwrap();
    traced.wait().unwrap();
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

#[test]
fn a_jemalloc_program_attaches_and_its_blocks_from_before_are_a_gap() {
    ensure_agent();
    require_file(JEMALLOC, "libjemalloc2");
    let prog = build("attach_leaker.c", &[]);
    let mut child = Command::new(&prog)
        .env("LD_PRELOAD", JEMALLOC)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id() as i32);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    ready_pid(&mut out);
    let pid = child.id().to_string();
    let att = ok(&kal(&["attach", &pid]));
    let lines: Vec<&str> = att.lines().filter(|l| l.contains("jemalloc")).collect();
    assert_eq!(lines.len(), 1, "{att}");
    assert!(
        lines[0].contains("blocks allocated before the attach are unknown"),
        "{att}"
    );
    writeln!(stdin, "go").unwrap();
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "after");
    let (_, j) = check_pid_json(child.id() as i32, &[]);
    let at = line_of("attach_leaker.c", "after_leak");
    assert_eq!(
        sum(&records_at(&j, "direct", "attach_leaker.c", at)),
        (4321, 1),
        "{j:#}"
    );
    // Only what was allocated since the attach is known: the leak from before is not
    // counted, and the report says its lost counts are incomplete.
    assert_eq!(totals(&j, "direct"), (4321, 1), "{j:#}");
    assert_eq!(j["lost_reliable"], false, "{j:#}");
    let gaps = j["gaps"]["unread"].to_string();
    assert!(
        gaps.contains("blocks allocated before kal attached are unknown"),
        "{gaps}"
    );
    // Nothing is reclaimed from such a capture.
    one_line_error(&kal(&["reclaim", &pid]), "refusing to reclaim");
    ok(&kal(&["detach", &pid]));
    writeln!(stdin, "go").unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "done 2100");
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_library_dlopened_after_attach_is_redirected_and_its_leaks_have_stacks() {
    ensure_agent();
    let lib = build("libplugin.c", &["-shared", "-fPIC"]);
    let dir = lib.parent().unwrap().to_str().unwrap().to_string();
    // Found through the executable's RUNPATH only: dlopen must still see the program as
    // its caller once its slot leads to the agent.
    let rpath = format!("-Wl,-rpath,{dir},--enable-new-dtags");
    let prog = build("attach_dlopen.c", &[&rpath]);
    let name = lib.file_name().unwrap().to_str().unwrap();
    let mut child = Command::new(&prog)
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id() as i32);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    ready_pid(&mut out);
    let pid = child.id().to_string();
    let att = ok(&kal(&["attach", &pid]));
    assert!(att.contains("agent loaded"), "{att}");
    writeln!(stdin, "go").unwrap();
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "loaded");
    let (_, j) = check_pid_json(child.id() as i32, &[]);
    let at = line_of("libplugin.c", "plugin");
    assert_eq!(
        sum(&records_at(&j, "direct", "libplugin.c", at)),
        (3 * 321, 3),
        "{j:#}"
    );
    assert_eq!(totals(&j, "direct"), (3 * 321, 3), "{j:#}");
    ok(&kal(&["detach", &pid]));
    // Detached: the program's dlopen slot is its own again, and its calls work.
    writeln!(stdin, "go").unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "done");
    assert!(child.wait().unwrap().success());
}

#[test]
fn run_check_every_attach_checks_and_parks_in_a_running_process() {
    ensure_agent();
    let prog = build("attach_periodic.c", &[]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("checks.jsonl");
    let k = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "--check-every",
            "300ms",
            "--reclaim",
            "--attach",
            &pid,
        ])
        .args(["--json", lines.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _kk = KillOnDrop(k.id() as i32);
    // Four checks (the third and fourth after a park), however loaded the machine is.
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lines).map_or(0, |s| s.lines().count()) < 4 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no fourth check");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: interrupting the kal this test started.
    unsafe { libc::kill(k.id() as i32, libc::SIGINT) };
    let out = k.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Stopped by the interrupt, not killed by it; leaks found: the leak status.
    assert_eq!(out.status.code(), Some(23), "{err}");
    assert!(
        err.contains(&format!("kal: attached to process {pid}")),
        "{err}"
    );
    assert!(err.contains("its agent stays attached"), "{err}");
    let checks = read_json_lines(&lines);
    assert!(checks.len() >= 4, "{err}");
    let at = line_of("attach_periodic.c", "periodic_leak");
    let mut parked = 0;
    for (i, c) in checks.iter().enumerate() {
        // Leaks made since the attach, with their line; the ones from before, labelled.
        assert!(
            !records_at(c, "direct", "attach_periodic.c", at).is_empty(),
            "check {i}: {c:#}"
        );
        assert!(
            !before_attach_records(c, "direct").is_empty(),
            "check {i}: {c:#}"
        );
        assert!(c["pause_ms"].as_f64().unwrap() > 0.0);
        // Checks after a park walk the heap past the parked pages: complete, so parking
        // goes on round after round.
        assert_eq!(c["lost_reliable"], true, "check {i}: {c:#}");
        // Only blocks from after the attach are parked: the 4096-byte ones (never the
        // 1000-byte block from before, whose sequence number nothing knows).
        let p = &c["parked_now"];
        assert_eq!(
            p["bytes"].as_u64().unwrap(),
            4096 * p["blocks"].as_u64().unwrap(),
            "{c:#}"
        );
        parked += p["blocks"].as_u64().unwrap();
    }
    assert!(parked > 0, "{err}");
    let rounds = checks
        .iter()
        .filter(|c| c["parked_now"]["blocks"].as_u64() > Some(0))
        .count();
    assert!(rounds >= 2, "parked in {rounds} checks: {err}");
    // The program runs on: its parked blocks never touched, its loop unharmed.
    ok(&kal(&["detach", &pid]));
    writeln!(stdin, "stop").unwrap();
    assert!(line(&rx).starts_with("done "));
    assert!(child.wait().unwrap().success());
}

/// Waits until something accepts connections on `port` (60 s at most).
fn connect(port: u16) -> std::net::TcpStream {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "nothing on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn memcached_under_load_is_attached_without_a_failed_request() {
    ensure_agent();
    require_command("memcached", "memcached");
    let port = free_port();
    let mut mc = Command::new("memcached")
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-t",
            "4",
            "-u",
            "root",
            "-l",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(mc.id() as i32);
    drop(connect(port));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients set and get their own keys without a pause, checking every answer.
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let s = connect(port);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                let (mut done, mut failed) = (0u64, 0u64);
                let mut l = String::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("c{c}k{}", done % 1000);
                    let val = format!("{:016}", done);
                    let ok = write!(w, "set {key} 0 0 16\r\n{val}\r\nget {key}\r\n").is_ok() && {
                        let mut lines = Vec::new();
                        for _ in 0..4 {
                            l.clear();
                            if r.read_line(&mut l).unwrap_or(0) == 0 {
                                break;
                            }
                            lines.push(l.trim_end().to_string());
                        }
                        lines
                            == [
                                "STORED".to_string(),
                                format!("VALUE {key} 0 16"),
                                val.clone(),
                                "END".to_string(),
                            ]
                    };
                    if ok {
                        done += 1;
                    } else {
                        failed += 1;
                        break;
                    }
                }
                (done, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let pid = mc.id().to_string();
    let att = ok(&kal(&["attach", &pid]));
    let pause = pause_ms(&att);
    std::thread::sleep(Duration::from_millis(500));
    let (o, j) = check_pid_json(mc.id() as i32, &[]);
    assert_ne!(o.status.code(), Some(125), "{j}");
    assert!(j["pause_ms"].as_f64().unwrap() > 0.0, "{j}");
    ok(&kal(&["detach", &pid]));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut done, mut failed) = (0, 0);
    for c in clients {
        let (d, f) = c.join().unwrap();
        done += d;
        failed += f;
    }
    eprintln!("memcached: {done} set+get pairs, {failed} failed; attach pause {pause:.2} ms");
    assert_eq!(failed, 0);
    assert!(done > 1000, "{done}");
    mc.kill().unwrap();
    mc.wait().unwrap();
}

/// Sends one redis command (RESP) and returns the first line of the answer.
fn redis(r: &mut BufReader<std::net::TcpStream>, args: &[&str]) -> String {
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    r.get_mut().write_all(cmd.as_bytes()).unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l.trim_end().to_string()
}

#[test]
fn redis_server_from_debian_gets_stacks_after_attach() {
    ensure_agent();
    require_command("redis-server", "redis-server");
    let port = free_port();
    let mut rs = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(rs.id() as i32);
    let mut r = BufReader::new(connect(port));
    assert_eq!(redis(&mut r, &["PING"]), "+PONG");
    let pid = rs.id().to_string();
    let att = ok(&kal(&["attach", &pid]));
    assert!(att.contains("jemalloc"), "{att}");
    for i in 0..500 {
        assert_eq!(
            redis(&mut r, &["SET", &format!("key:{i}"), &"v".repeat(100)]),
            "+OK"
        );
    }
    let (_, j) = check_pid_json(rs.id() as i32, &["--show-reachable"]);
    // Blocks allocated since the attach, with stacks into redis-server's own code (its
    // executable: Debian's redis-server is a link to redis-check-rdb).
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_str().unwrap();
    let in_redis = j["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|rec| {
            rec["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["module"] == exe && !f["function"].as_str().unwrap_or("").is_empty())
        })
        .count();
    assert!(in_redis > 0, "{j:#}");
    assert!(
        j["gaps"]["unread"]
            .to_string()
            .contains("blocks allocated before kal attached are unknown"),
        "{j:#}"
    );
    ok(&kal(&["detach", &pid]));
    assert_eq!(redis(&mut r, &["GET", "key:7"]), "$100");
    rs.kill().unwrap();
    rs.wait().unwrap();
}

/// Bytes and blocks of the leak records of `kind` labelled "allocated before kal attached".
fn before_attach_totals(j: &serde_json::Value, kind: &str) -> (u64, u64) {
    sum(&before_attach_records(j, kind))
}

#[test]
fn park_reclaim_of_an_attached_process_works_round_after_round() {
    ensure_agent();
    let prog = build("attach_park.c", &[]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    ok(&kal(&["attach", &pid]));
    let at = line_of("attach_park.c", "after_leak");
    let dir = tempfile::tempdir().unwrap();
    // The two blocks from before the attach (usable sizes: 1000 and 40008 asked).
    let before = (1000 + 40008, 2);
    let mut parked_blocks = 0;
    for round in 1..=4u64 {
        writeln!(stdin, "leak").unwrap();
        assert_eq!(line(&rx), format!("leaked {}", 12 * round));
        let json = dir.path().join(format!("r{round}.json"));
        let out = kal(&["reclaim", &pid, "--json", json.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: {err}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(
            r["gaps"]["unread"].as_array().is_none_or(|g| g.is_empty()),
            "round {round}: {err}\n{r:#}"
        );
        assert_eq!(r["lost_reliable"], true, "round {round}: {r:#}");
        // Each round parks the twelve blocks leaked since the last one (and, now and
        // then, a block of an earlier round again whose first page the program's free()
        // brought back by reading the chunk header there); never a block from before.
        let said = err
            .lines()
            .find(|l| l.starts_with("kal: parked "))
            .unwrap_or_else(|| panic!("round {round}: {err}"));
        let blocks: u64 = said
            .split(" bytes of ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{said}"));
        assert!((12..=12 * round).contains(&blocks), "round {round}: {err}");
        parked_blocks += blocks;
        let rc = &r["reclaimed"];
        for s in rc["sites"].as_array().unwrap() {
            assert!(
                s["stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["line"] == at),
                "round {round}: only the leak made after the attach is parked: {rc:#}"
            );
        }
        assert_eq!(rc["touched"], 0, "round {round}: {rc:#}");
        // The program checks its live data (and reads the block from before that only it
        // knows about) and frees and allocates next to parked pages.
        writeln!(stdin, "verify").unwrap();
        assert_eq!(line(&rx), format!("ok {}", 4 + 4 * round));
        let (out, j) = check_pid_json(child.id() as i32, &[]);
        assert_ne!(out.status.code(), Some(125), "round {round}: {j:#}");
        assert_eq!(j["lost_reliable"], true, "round {round}: {j:#}");
        assert_eq!(
            sum(&records_at(&j, "direct", "attach_park.c", at)),
            (40000 * 12 * round, 12 * round),
            "round {round}: {j:#}"
        );
        assert_eq!(
            before_attach_totals(&j, "direct"),
            before,
            "round {round}: {j:#}"
        );
        assert_eq!(
            totals(&j, "direct"),
            (40000 * 12 * round + before.0, 12 * round + before.1),
            "round {round}: {j:#}"
        );
        assert_eq!(totals(&j, "indirect"), (0, 0), "round {round}: {j:#}");
        // Parking makes nothing look possibly lost, nor does what the loader made when
        // it opened the agent (`_dl_find_object`'s segment, held by an interior pointer
        // in the loader's data).
        assert_eq!(totals(&j, "possible"), (0, 0), "round {round}: {j:#}");
    }
    assert!(parked_blocks >= 48, "{parked_blocks}");
    // The free mode, with every site named: it frees the 48 blocks leaked since the
    // attach (parked or not), never a block from before (the hidden one the program
    // still reads looks lost too).
    let out = kal(&[
        "reclaim",
        &pid,
        "-q",
        "--mode",
        "free",
        "--free-sites",
        "*",
        "--free-after",
        "0s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("freed {} bytes in 48 blocks", 40000 * 48)),
        "{err}"
    );
    writeln!(stdin, "verify").unwrap();
    assert_eq!(line(&rx), "ok 20");
    let (_, j) = check_pid_json(child.id() as i32, &[]);
    assert_eq!(totals(&j, "direct"), before, "{j:#}");
    assert_eq!(before_attach_totals(&j, "direct"), before, "{j:#}");
    writeln!(stdin, "stop").unwrap();
    assert_eq!(line(&rx), "done 6");
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_agent_without_static_tls_stays_inert_and_the_program_is_checked_without_it() {
    // glibc gives an agent opened by dlopen static TLS from its spare room, here none:
    // its per-thread state would be allocated on first use, through the malloc it
    // redirects. kal says so in one line, redirects nothing, and the program goes on
    // unharmed; a check then reads glibc's heap without the agent.
    ensure_agent();
    let prog = build("attach_leaker.c", &[]);
    let (mut child, mut stdin, rx, _kill) = start_env(
        &prog,
        &[("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")],
    );
    let pid = child.id().to_string();
    one_line_error(&kal(&["attach", &pid]), "no spare static TLS");
    one_line_error(&kal(&["attach", &pid]), "no spare static TLS");
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "after");
    let (out, j) = check_pid_json(child.id() as i32, &[]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(23)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both leaks, found in glibc's heap (usable sizes: 1000 and 4328 bytes).
    assert_eq!(totals(&j, "direct"), (5328, 2), "{j:#}");
    one_line_error(&kal(&["detach", &pid]), "no spare static TLS");
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "done 2100");
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_non_pie_program_taking_mallocs_address_is_attached_without_recursing() {
    // dlsym(RTLD_DEFAULT, "malloc") gives such an executable's canonical PLT entry, which
    // jumps through the GOT slot kal attach redirects: forwarding there recursed until
    // the stack overflowed (python3.11 from Debian is built so, and died at each attach).
    ensure_agent();
    let prog = build("attach_nopie.c", &["-fno-pic", "-no-pie"]);
    let (mut child, mut stdin, rx, _kill) = start(&prog);
    let pid = child.id().to_string();
    ok(&kal(&["attach", &pid]));
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "after");
    let (out, j) = check_pid_json(child.id() as i32, &[]);
    assert_ne!(
        out.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = line_of("attach_nopie.c", "nopie_leak");
    assert_eq!(
        sum(&records_at(&j, "direct", "attach_nopie.c", at)),
        (777, 1),
        "{j:#}"
    );
    // glibc's allocator was recognised (the heap walk ran): the blocks from before count.
    assert_eq!(j["lost_reliable"], true, "{j:#}");
    writeln!(stdin, "go").unwrap();
    assert_eq!(line(&rx), "done");
    assert!(child.wait().unwrap().success());
}
