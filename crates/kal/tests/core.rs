//! `kal check --core FILE`: ELF core files made by gdb's `gcore` from test programs
//! stopped at a known point, checked against a live check of the same stopped process.

mod common;
use common::*;
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Starts `prog` without kal and waits for its "ready PID" line.
fn start_bare(prog: &Path) -> (Child, KillOnDrop) {
    let mut child = Command::new(prog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    assert_eq!(pid, child.id() as i32);
    std::thread::spawn(move || for _ in out.lines() {});
    (child, KillOnDrop(pid))
}

/// `gcore` of process `pid` into `dir`: the core file's path.
fn gcore(pid: i32, dir: &Path) -> PathBuf {
    require_command("gcore", "gdb");
    let prefix = dir.join("core");
    let out = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
        .unwrap();
    let core = dir.join(format!("core.{pid}"));
    assert!(
        out.status.success() && core.is_file(),
        "gcore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    core
}

/// `kal check --core CORE --json F [extra]`: kal's output and the parsed report.
fn check_core(core: &Path, extra: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("core.json");
    let mut args = vec![
        "check",
        "--core",
        core.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kal(&args);
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

/// `(bytes, blocks)` of each class: direct, indirect, possible, reachable.
fn counts(j: &Value) -> [(u64, u64); 4] {
    ["direct", "indirect", "possible", "reachable"].map(|k| totals(j, k))
}

#[test]
fn a_core_of_a_process_without_kal_has_the_live_checks_counts() {
    let prog = build("core_target.c", &[]);
    let (mut bare, _kill) = start_bare(&prog);
    let pid = bare.id() as i32;
    let dir = tempfile::tempdir().unwrap();
    let core = gcore(pid, dir.path());
    let (out, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    // 4 heads of 100 bytes and 3 of 64 lost (usable sizes 104 and 72), 4 tails of 40
    // (usable 40) only they point to.
    assert_eq!(totals(&j, "direct"), (4 * 104 + 3 * 72, 7), "{stderr}");
    assert_eq!(totals(&j, "indirect"), (4 * 40, 4), "{stderr}");
    assert_eq!(totals(&j, "possible"), (0, 0), "{stderr}");
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    assert_eq!(j["pid"], pid, "{j}");
    assert_eq!(j["program"], prog.to_str().unwrap(), "{j}");
    let note = j["note"].as_str().unwrap();
    assert!(
        note.contains("allocation stacks need kal's agent") && note.contains("no kernel state"),
        "{note}"
    );
    // The live agentless check of the same stopped process: the same four counts.
    let (live_out, live) = check_pid_json(pid, &[]);
    assert_eq!(
        counts(&j),
        counts(&live),
        "{stderr}\n{}",
        String::from_utf8_lossy(&live_out.stderr)
    );
    bare.kill().unwrap();
    bare.wait().unwrap();
}

#[test]
fn a_core_of_a_process_under_kal_run_has_its_counts_and_leak_lines() {
    let prog = build("core_target.c", &[]);
    // gcore attaches with ptrace: kal run must not be the program's tracer.
    let live = Live::start_untraced(&prog);
    let dir = tempfile::tempdir().unwrap();
    let core = gcore(live.pid, dir.path());
    let (out, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    assert_eq!(totals(&j, "direct"), (4 * 100 + 3 * 64, 7), "{stderr}");
    assert_eq!(totals(&j, "indirect"), (4 * 40, 4), "{stderr}");
    // The agent's stacks, symbolized from the files the core names.
    let at = |marker: &str| {
        sum(&records_at(
            &j,
            "direct",
            "core_target.c",
            line_of("core_target.c", marker),
        ))
    };
    assert_eq!(at("core_leak"), (400, 4), "{stderr}");
    assert_eq!(at("core_thread_leak"), (192, 3), "{stderr}");
    assert!(stderr.contains("core_target.c:"), "{stderr}");
    // A live check of the same stopped process: the same four counts.
    let (_, now) = check_pid_json(live.pid, &[]);
    assert_eq!(counts(&j), counts(&now), "{stderr}");
}

#[test]
fn an_executable_missing_here_gives_module_offsets_and_exe_gives_lines_back() {
    let built = build("core_target.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("core_target");
    std::fs::copy(&built, &prog).unwrap();
    // gcore attaches with ptrace: kal run must not be the program's tracer.
    let live = Live::start_untraced(&prog);
    let core = gcore(live.pid, dir.path());
    std::fs::remove_file(&prog).unwrap();
    let line = line_of("core_target.c", "core_leak");
    let (out, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not on this host"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains(prog.to_str().unwrap()) && said[0].contains("--exe"),
        "{stderr}"
    );
    assert!(records_at(&j, "direct", "core_target.c", line).is_empty());
    assert!(stderr.contains("core_target+0x"), "{stderr}");
    assert_eq!(totals(&j, "direct"), (4 * 100 + 3 * 64, 7), "{stderr}");
    // The same build given with --exe: lines again.
    let (out, j) = check_core(&core, &["--exe", built.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("not on this host"), "{stderr}");
    assert_eq!(
        sum(&records_at(&j, "direct", "core_target.c", line)),
        (400, 4)
    );
    // Another build (another build id) is refused for symbols, in one line.
    let other = build("core_target.c", &["-O0"]);
    let (out, j) = check_core(&core, &["--exe", other.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("build id differs"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(said[0].contains(other.to_str().unwrap()), "{stderr}");
    assert!(records_at(&j, "direct", "core_target.c", line).is_empty());
    assert_eq!(totals(&j, "direct"), (4 * 100 + 3 * 64, 7), "{stderr}");
}

/// The core rewritten with its notes before its memory, as the kernel writes cores (gdb
/// writes them last): the same ELF, program headers and offsets updated.
fn notes_first(src: &[u8]) -> Vec<u8> {
    let u16_at = |o: usize| u16::from_le_bytes([src[o], src[o + 1]]) as usize;
    let u64_at = |d: &[u8], o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
    let (phoff, phnum) = (u64_at(src, 0x20) as usize, u16_at(0x38));
    let mut out = src[..64].to_vec();
    out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    // No section headers.
    out[0x28..0x30].fill(0);
    out[0x3c..0x40].fill(0);
    out.extend_from_slice(&src[phoff..phoff + phnum * 56]);
    let kind = |i: usize| u32::from_le_bytes(src[phoff + i * 56..][..4].try_into().unwrap());
    let mut order: Vec<usize> = (0..phnum).filter(|&i| kind(i) == 4).collect();
    order.extend((0..phnum).filter(|&i| kind(i) != 4));
    for i in order {
        let ph = phoff + i * 56;
        let (off, size) = (u64_at(src, ph + 8) as usize, u64_at(src, ph + 32) as usize);
        let at = out.len() as u64;
        out[64 + i * 56 + 8..64 + i * 56 + 16].copy_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&src[off..off + size]);
    }
    out
}

#[test]
fn a_truncated_core_says_what_is_missing() {
    let prog = build("core_target.c", &[]);
    let (mut bare, _kill) = start_bare(&prog);
    let dir = tempfile::tempdir().unwrap();
    let core = gcore(bare.id() as i32, dir.path());
    bare.kill().unwrap();
    bare.wait().unwrap();
    let whole = std::fs::read(&core).unwrap();
    // gdb writes the notes last: a cut core has no registers and no file list.
    let cut = dir.path().join("cut");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let out = kal(&["check", "--core", cut.to_str().unwrap()]);
    one_line_error(&out, "is truncated");
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes"));
    // Notes first (as the kernel writes them), cut inside the main thread's stack (the
    // last segment below the vsyscall page): a gap, lost counts unreliable.
    let moved = notes_first(&whole);
    let ok = dir.path().join("moved");
    std::fs::write(&ok, &moved).unwrap();
    let (out, j) = check_core(&ok, &[]);
    assert_eq!(
        j["lost_reliable"],
        true,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let phnum = u16::from_le_bytes([moved[0x38], moved[0x39]]) as usize;
    let stack_off = (0..phnum)
        .map(|i| &moved[64 + i * 56..64 + (i + 1) * 56])
        .filter(|p| p[..4] == 1u32.to_le_bytes())
        .filter(|p| u64::from_le_bytes(p[16..24].try_into().unwrap()) < 0xffff_ffff_ff60_0000)
        .map(|p| u64::from_le_bytes(p[8..16].try_into().unwrap()))
        .max()
        .unwrap() as usize;
    std::fs::write(&cut, &moved[..stack_off + 4096]).unwrap();
    let (out, j) = check_core(&cut, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("is truncated ("))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains("bytes of the process's memory"),
        "{stderr}"
    );
    assert_eq!(j["lost_reliable"], false, "{stderr}");
    assert!(stderr.contains("WARNING") || stderr.contains("capture incomplete"));
    let gaps = j["gaps"]["unread"].as_array().unwrap();
    assert!(
        gaps.iter()
            .any(|g| g["why"].as_str().unwrap().contains("truncated")),
        "{j}"
    );
}

#[test]
fn what_is_not_a_core_file_gets_one_line() {
    let prog = build("core_target.c", &[]);
    let out = kal(&["check", "--core", prog.to_str().unwrap()]);
    one_line_error(&out, "not a core file");
    let out = kal(&["check", "--core", "/nonexistent/core.1"]);
    one_line_error(&out, "cannot open core file");
}

#[test]
fn a_kernel_core_dump_has_the_live_checks_counts() {
    // The kernel writes notes first and leaves out pages it does not dump (segments whose
    // file size is below their memory size: code, the ELF header page's rest).
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    assert!(
        !pattern.starts_with('|') && !pattern.contains('/'),
        "prerequisite: kernel.core_pattern must write a file in the process's directory (it is {pattern:?})"
    );
    let prog = build("core_target.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&prog);
    cmd.current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; it only raises this child's core size limit.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &unlimited) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let _kill = KillOnDrop(child.id() as i32);
    let pid = ready_pid(&mut std::io::BufReader::new(child.stdout.take().unwrap()));
    let (_, live) = check_pid_json(pid, &[]);
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pid, libc::SIGSEGV) };
    child.wait().unwrap();
    let core = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("core"))
        .expect("a core file");
    let (out, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    assert_eq!(totals(&j, "direct"), (4 * 104 + 3 * 72, 7), "{stderr}");
    assert_eq!(counts(&j), counts(&live), "{stderr}");
}

#[test]
fn a_core_of_an_attached_process_has_the_blocks_from_before_the_attach() {
    use std::io::Write;
    let prog = build("attach_leaker.c", &[]);
    let mut child = Command::new(&prog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id() as i32);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    let attached = kal(&["attach", &pid.to_string()]);
    assert!(
        attached.status.success(),
        "{}",
        String::from_utf8_lossy(&attached.stderr)
    );
    writeln!(stdin, "go").unwrap();
    let mut after = String::new();
    out.read_line(&mut after).unwrap();
    assert_eq!(after.trim(), "after");
    let dir = tempfile::tempdir().unwrap();
    let core = gcore(pid, dir.path());
    let (out1, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out1.stderr);
    // The leak made after the attach, with its line; the one from before, from the
    // core's heap, labelled, without a stack.
    let line = line_of("attach_leaker.c", "after_leak");
    assert_eq!(
        sum(&records_at(&j, "direct", "attach_leaker.c", line)),
        (4321, 1),
        "{stderr}"
    );
    assert_eq!(totals(&j, "direct"), (4321 + 1000, 2), "{stderr}");
    let old: Vec<&serde_json::Value> = j["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["contents"]["origin"] == "allocated before kal attached")
        .collect();
    assert_eq!(old.len(), 1, "{j:#}");
    assert_eq!(
        (&old[0]["kind"], &old[0]["bytes"]),
        (&"direct".into(), &1000.into()),
        "{j:#}"
    );
    assert_eq!(j["lost_reliable"], true, "{stderr}");
    let (_, live) = check_pid_json(pid, &[]);
    assert_eq!(counts(&j), counts(&live), "{stderr}");
    // Detached: the agent's table is stale; the core's heap is walked instead.
    let detached = kal(&["detach", &pid.to_string()]);
    assert!(detached.status.success());
    std::fs::remove_file(&core).unwrap();
    let core = gcore(pid, dir.path());
    let (out2, j) = check_core(&core, &[]);
    let stderr = String::from_utf8_lossy(&out2.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("was detached"))
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        j["note"]
            .as_str()
            .unwrap()
            .contains("allocation stacks need kal's agent"),
        "{j}"
    );
    // Before and after the attach: 1000 and 4321 bytes lost (usable 1000 and 4328).
    assert_eq!(totals(&j, "direct"), (1000 + 4328, 2), "{stderr}");
    child.kill().unwrap();
    child.wait().unwrap();
}
