//! Parking: leaked pages dropped from memory and restored exactly on any touch
//! (`kal run --reclaim`, `--reclaim=dry-run`, `kal reclaim PID`).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn checks(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["check"].is_u64()).collect()
}

/// `kal run --reclaim --check-every 300ms --json JSON -- PROG ARGS` (stdout and stderr
/// piped), past the program's ready line: kal, its stdout, and the program's pid.
fn run_parking(
    json: &Path,
    prog: &Path,
    args: &[&str],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    i32,
) {
    ensure_agent();
    let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "--error-exitcode",
            "0",
            "--reclaim",
            "--check-every",
            "300ms",
            "--json",
        ])
        .arg(json)
        .arg("--")
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(kal.stdout.take().unwrap());
    let pid = ready_pid(&mut stdout);
    (kal, stdout, pid)
}

/// Pages of a glibc mmapped chunk holding a block of `size` bytes, in bytes.
fn mmapped_chunk(size: u64) -> u64 {
    (size + 16).div_ceil(4096) * 4096
}

#[test]
fn parking_keeps_the_classic_loop_small_and_it_runs_on() {
    let prog = build("leak_loop.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let (out, peak) = run_sampling_rss(&[
        "run",
        "-q",
        "--error-exitcode",
        "0",
        "--reclaim",
        "--check-every",
        "1s",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "20",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines = read_json_lines(&json);
    let cs = checks(&lines);
    assert!(cs.len() >= 10, "{} checks", cs.len());
    // 20 s at 40 MB/s: about 800 MB without reclaim. RSS as measured at every check (the
    // peak of the whole run includes the exit, where the agent restores every parked
    // page before kal reads the process).
    // The last check may race the exit (and its restore): not counted.
    let rss: Vec<u64> = cs
        .iter()
        .map(|c| c["memory"]["rss_bytes"].as_u64().unwrap() >> 20)
        .collect();
    let worst = rss[..rss.len() - 1].iter().copied().max().unwrap();
    assert!(
        worst < 300,
        "RSS stays under 300 MiB while it runs: {worst} MiB at worst (MiB at each check: {rss:?}; peak with the exit: {} MiB)",
        peak >> 10
    );
    // Every block parked is one whole mmapped chunk of the loop's 4,096,000 bytes.
    let chunk = mmapped_chunk(4_096_000);
    let mut last = 0;
    for (i, c) in cs.iter().enumerate() {
        let p = c["reclaimed"]["parked_bytes"].as_u64().unwrap();
        assert!(p >= last, "parked bytes only grow");
        last = p;
        let now = &c["parked_now"];
        let (bytes, blocks) = (
            now["bytes"].as_u64().unwrap(),
            now["blocks"].as_u64().unwrap(),
        );
        if i + 1 < cs.len() {
            assert_eq!(bytes, blocks * chunk, "check {i}");
        } else {
            // The last check may race the exit, where parking stops mid-request.
            assert!(bytes <= blocks * chunk && bytes % 4096 == 0);
        }
        assert_eq!(c["reclaimed_now"]["blocks"], 0, "nothing freed");
    }
    assert!(
        last >= 100 * chunk,
        "parked {last} bytes ({} blocks)",
        last / chunk
    );
    let exit = lines.last().unwrap();
    assert_eq!(exit["at_exit"], true);
    assert_eq!(exit["reclaimed"]["parked_bytes"].as_u64().unwrap(), last);
    assert_eq!(exit["reclaimed"]["restored_bytes"], 0, "nothing touched");
    assert_eq!(exit["reclaimed"]["freed_bytes"], 0);
    let site = &exit["reclaimed"]["sites"][0];
    assert_eq!(site["parked_bytes"].as_u64().unwrap(), last);
    let line = line_of("leak_loop.c", "loop_leak");
    assert!(
        site["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["line"] == line),
        "{}",
        exit["reclaimed"]
    );
}

/// Waits until `pred` holds for the JSON lines of `path` (or panics after `secs`).
fn wait_for_line(path: &Path, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for l in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                if pred(&v) {
                    return v;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no such line in {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_touched_parked_block_gets_its_exact_bytes_back_and_its_site_banned() {
    let prog = build("park_touch.c", &["-O1"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let flag = dir.path().join("touch-now");
    let (kal, mut stdout, pid) = run_parking(&json, &prog, &[flag.to_str().unwrap()]);
    let _guard = KillOnDrop(pid);
    // Both 1 MiB blocks parked, whole chunks (header page included).
    let both = 2 * mmapped_chunk(1 << 20);
    let parked = wait_for_line(&json, 30, |l| {
        l["reclaimed"]["parked_bytes"].as_u64() == Some(both)
    });
    assert_eq!(parked["reclaimed"]["restored_bytes"], 0);
    assert_eq!(parked["reclaimed"]["parked_now_bytes"].as_u64(), Some(both));
    std::fs::write(&flag, b"").unwrap();
    let out = kal.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!rest.contains("CORRUPT"), "{rest}");
    assert!(rest.contains("touch ok"), "{rest}\n{stderr}");
    assert!(out.status.success(), "{stderr}");
    let lines = read_json_lines(&json);
    let last_check = checks(&lines).pop().unwrap().clone();
    let r = &last_check["reclaimed"];
    // Every parked byte came back (block 0 read by the program, block 1 by write(2)).
    assert_eq!(r["restored_bytes"].as_u64(), Some(both), "{r}");
    assert_eq!(r["parked_now_bytes"], 0, "{r}");
    assert!(r["touched"].as_u64().unwrap() >= 2, "{r}");
    let site = line_of("park_touch.c", "park_site");
    let never = r["never_again"].as_array().unwrap();
    assert_eq!(never.len(), 1, "one site, named once: {never:?}");
    assert!(never[0]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"] == site));
    let said = stderr
        .lines()
        .filter(|l| l.starts_with('[') && l.contains("touched one kal had parked"))
        .count();
    assert_eq!(said, 1, "the check line tells once: {stderr}");
}

#[test]
fn pointers_only_the_kernel_holds_survive_parking() {
    let prog = build("park_hidden.c", &["-O1"]);
    let (out, lines) = {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("r.jsonl");
        let out = kal(&[
            "run",
            "--error-exitcode",
            "0",
            "--reclaim",
            "--check-every",
            "300ms",
            "--json",
            json.to_str().unwrap(),
            "--",
            prog.to_str().unwrap(),
            "7",
        ]);
        (out, read_json_lines(&json))
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("CORRUPT"), "{stdout}");
    assert!(stdout.contains("hidden ok"), "{stdout}{stderr}");
    assert!(
        checks(&lines).len() >= 20,
        "{} checks",
        checks(&lines).len()
    );
    let r = &lines.last().unwrap()["reclaimed"];
    // Both were parked (they look lost), and both came back when the program (the pipe's
    // reader) or the kernel (a signal frame on the alternate stack) touched them.
    let piped = line_of("park_hidden.c", "piped_site");
    let alt = line_of("park_hidden.c", "alt_site");
    let sites = r["sites"].as_array().unwrap();
    let parked_at = |line: u32| {
        sites
            .iter()
            .find(|s| {
                s["stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["line"] == line)
            })
            .map(|s| s["parked_bytes"].as_u64().unwrap())
    };
    assert_eq!(parked_at(alt), Some(mmapped_chunk(256 * 1024)), "{r}");
    assert!(parked_at(piped).is_some_and(|b| b > 0), "{r}");
    assert_eq!(r["restored_bytes"], r["parked_bytes"], "{r}");
    assert_eq!(r["never_again"].as_array().unwrap().len(), 2, "{r}");
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_park() {
    let prog = build("leak_loop.c", &["-DDRY_RUN"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let (out, peak) = run_sampling_rss(&[
        "run",
        "--error-exitcode",
        "0",
        "--reclaim=dry-run",
        "--check-every",
        "500ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 5 s at 40 MB/s: nothing taken back.
    assert!(peak > 150 * 1024, "RSS not reduced: peak {peak} KiB");
    let lines = read_json_lines(&json);
    let mut would = 0;
    for c in checks(&lines) {
        assert_eq!(c["parked_now"]["blocks"], 0);
        assert_eq!(c["reclaimed_now"]["blocks"], 0);
        assert_eq!(c["reclaimed"]["parked_bytes"], 0);
        would += c["would_reclaim"]["blocks"].as_u64().unwrap();
    }
    assert!(would >= 20, "would park {would} blocks");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("dry run: would park the pages of"))
        .collect();
    assert!(!said.is_empty(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "would park 4096000 bytes in 1 blocks at main {}",
            src_dir().join("leak_loop.c").display()
        )) || stderr.contains("would park"),
        "{stderr}"
    );
    let exit = lines.last().unwrap();
    assert_eq!(exit["reclaimed"]["parked_bytes"], 0);
    assert_eq!(exit["reclaimed"]["bytes"], 0);
}

#[test]
fn kal_reclaim_parks_and_names_each_site_once() {
    let prog = build("park_touch.c", &["-O1", "-DRECLAIM"]);
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never");
    ensure_agent();
    let mut run = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(&prog)
        .arg(&never)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
    let pid = ready_pid(&mut stdout);
    let _guard = KillOnDrop(pid);
    let json = dir.path().join("r.json");
    let out = kal(&[
        "reclaim",
        &pid.to_string(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let both = 2 * mmapped_chunk(1 << 20);
    let site = format!("park_touch.c:{}", line_of("park_touch.c", "park_site"));
    let named: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("    parked ") && l.contains(&site))
        .collect();
    assert_eq!(named.len(), 1, "each site once: {stderr}");
    assert!(
        named[0].starts_with(&format!("    parked {both} bytes of 2 blocks at ")),
        "{}",
        named[0]
    );
    assert!(
        stderr.contains(&format!(
            "kal: parked {both} bytes of 2 blocks and freed 0 bytes"
        )),
        "{stderr}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["reclaimed"]["parked_bytes"].as_u64(), Some(both));
    assert_eq!(report["reclaimed"]["sites"].as_array().unwrap().len(), 1);
    // The program runs on; a second reclaim parks nothing new (they are parked).
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let again = kal(&["reclaim", &pid.to_string(), "-q"]);
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert!(
        again_err.contains("kal: parked 0 bytes of 0 blocks"),
        "{again_err}"
    );
    // SAFETY: signalling the process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = run.wait();
}

#[test]
fn parking_never_loses_a_write_racing_it() {
    let prog = build("park_race.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let out = kal(&[
        "run",
        "--error-exitcode",
        "0",
        "--reclaim",
        "--check-every",
        "200ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "6",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("CORRUPT"), "{stdout}");
    assert!(stdout.contains("race ok"), "{stdout}{stderr}");
    let lines = read_json_lines(&json);
    let r = &lines.last().unwrap()["reclaimed"];
    // Whatever was parked while the thread wrote came back when it wrote again: every
    // run but the chunk's last page (the block's last 16 bytes, which it never writes).
    let parked = r["parked_bytes"].as_u64().unwrap();
    let restored = r["restored_bytes"].as_u64().unwrap();
    assert!(restored <= parked && parked - restored <= 4096, "{r}");
}

#[test]
fn a_write_while_a_run_is_being_parked_keeps_the_run_in_place() {
    // The parker waits 300 ms between copying a run and dropping it: the program's thread,
    // stamping every page each millisecond, writes into that window every time.
    let prog = build("park_race.c", &["-DPAUSE"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let out = kal_env(
        &[
            "run",
            "--error-exitcode",
            "0",
            "--reclaim",
            "--check-every",
            "200ms",
            "--json",
            json.to_str().unwrap(),
            "--",
            prog.to_str().unwrap(),
            "5",
        ],
        &[("KAL_TEST_PARK_PAUSE_MS", "300")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("CORRUPT"), "{stdout}");
    assert!(stdout.contains("race ok"), "{stdout}{stderr}");
    let lines = read_json_lines(&json);
    let r = &lines.last().unwrap()["reclaimed"];
    assert!(r["parking_raced"].as_u64().unwrap() >= 1, "{r}");
    // Runs the thread wrote to were never dropped; the only page it never writes (the
    // chunk's last, holding the block's last 16 bytes) may be parked.
    assert!(r["parked_bytes"].as_u64().unwrap() <= 4096, "{r}");
    assert_eq!(r["restored_bytes"], 0, "{r}");
}

#[test]
fn a_parked_block_the_program_frees_is_restored_first_then_forgotten() {
    let prog = build("park_reuse.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let (f1, f2) = (dir.path().join("1"), dir.path().join("2"));
    let (kal, mut stdout, pid) =
        run_parking(&json, &prog, &[f1.to_str().unwrap(), f2.to_str().unwrap()]);
    let _guard = KillOnDrop(pid);
    let chunk = mmapped_chunk(1 << 20);
    wait_for_line(&json, 30, |l| {
        l["reclaimed"]["parked_bytes"].as_u64() == Some(chunk)
    });
    std::fs::write(&f1, b"").unwrap();
    // The freed block's first run was restored (free read its header), the rest went
    // with munmap; the new block (from the heap now: glibc raised its mmap threshold) is
    // parked in turn.
    let both = wait_for_line(&json, 30, |l| {
        l["reclaimed"]["parked_blocks"].as_u64() == Some(2)
            && l["reclaimed"]["parked_now_bytes"].as_u64() > Some(0)
    });
    let second_parked = both["reclaimed"]["parked_bytes"].as_u64().unwrap() - chunk;
    assert_eq!(
        both["reclaimed"]["parked_now_bytes"].as_u64(),
        Some(second_parked)
    );
    assert_eq!(
        both["reclaimed"]["restored_bytes"].as_u64(),
        Some(256 * 4096)
    );
    std::fs::write(&f2, b"").unwrap();
    let out = kal.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(rest.contains("reuse ok"), "{rest}\n{stderr}");
    assert!(out.status.success(), "{stderr}");
    let lines = read_json_lines(&json);
    let r = &checks(&lines).pop().unwrap()["reclaimed"];
    // The second block came back whole when the program read it.
    assert_eq!(
        r["restored_bytes"].as_u64(),
        Some(256 * 4096 + second_parked),
        "{r}"
    );
    assert_eq!(r["parked_now_bytes"], 0, "{r}");
    // Each site is named, the freed block's too (its stack kept from when it was parked).
    for s in r["sites"].as_array().unwrap() {
        assert!(!s["stack"].as_array().unwrap().is_empty(), "{s}");
    }
    // Reading the second block is a contradiction; free() of the first touched only its
    // header (allocator metadata), which is not.
    let never = r["never_again"].as_array().unwrap();
    assert_eq!(never.len(), 1, "{never:?}");
    let second = line_of("park_reuse.c", "second_site");
    assert!(never[0]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"] == second));
}

#[test]
fn without_userfaultfd_kal_says_so_once_and_parks_nothing() {
    // As an unprivileged user (vm.unprivileged_userfaultfd = 0 here), neither the target
    // nor kal can get a userfaultfd.
    require_command("setpriv", "util-linux");
    let prog = build("leak_loop.c", &["-DNO_UFFD"]);
    ensure_agent();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "--error-exitcode",
            "0",
            "--reclaim",
            "--check-every",
            "300ms",
            "--",
        ])
        .arg(&prog)
        .arg("3")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not parking in this process: userfaultfd is not available"))
        .collect();
    assert_eq!(said.len(), 1, "once: {stderr}");
    assert!(!stderr.lines().any(|l| l.contains(": parked ")), "{stderr}");
    assert!(!stderr.contains("reclaimed so far"), "{stderr}");
}

#[test]
fn a_forked_child_reads_the_exact_bytes_of_parked_blocks() {
    let prog = build("park_touch.c", &["-O1", "-DFORK"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let flag = dir.path().join("touch-now");
    let (kal, mut stdout, pid) = run_parking(&json, &prog, &[flag.to_str().unwrap(), "fork"]);
    let _guard = KillOnDrop(pid);
    let both = 2 * mmapped_chunk(1 << 20);
    wait_for_line(&json, 30, |l| {
        l["pid"] == pid as i64 && l["reclaimed"]["parked_now_bytes"].as_u64() == Some(both)
    });
    std::fs::write(&flag, b"").unwrap();
    let out = kal.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!rest.contains("CORRUPT"), "{rest}");
    assert!(
        rest.contains("touch ok (in a forked child)"),
        "{rest}\n{stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    // The parent put everything back before it forked: nothing was touched in it, no
    // site is banned.
    let lines = read_json_lines(&json);
    let last = lines
        .iter()
        .rfind(|l| l["pid"] == pid as i64 && l["check"].is_u64())
        .unwrap();
    let r = &last["reclaimed"];
    assert_eq!(r["parked_now_bytes"], 0, "{r}");
    assert_eq!(r["restored_bytes"], 0, "{r}");
    assert_eq!(r["never_again"].as_array().unwrap().len(), 0, "{r}");
}

#[test]
fn kal_reclaim_dry_run_with_free_sites_says_what_it_would_free() {
    let prog = build("park_touch.c", &["-O1", "-DDRY_FREE"]);
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never");
    ensure_agent();
    let mut run = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(&prog)
        .arg(&never)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
    let pid = ready_pid(&mut stdout);
    let _guard = KillOnDrop(pid);
    let rss = || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let p = pid.to_string();
    let out = kal(&[
        "reclaim",
        &p,
        "-q",
        "--mode",
        "dry-run",
        "--free-sites",
        "leak_one",
        "--free-after",
        "0s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "kal: dry run: would free {} bytes in 2 blocks in process {pid}; nothing done",
            2 << 20
        )),
        "{stderr}"
    );
    assert!(
        rss() >= before,
        "nothing given back: {} -> {} KiB",
        before,
        rss()
    );
    // Free mode needs sites: one clear line.
    let refused = kal(&["reclaim", &p, "--mode", "free"]);
    one_line_error(&refused, "free mode needs --free-sites PATTERN");
    // SAFETY: signalling the process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = run.wait();
}
