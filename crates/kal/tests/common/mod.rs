//! Helpers for the integration tests: compile target programs, run them under kal, read
//! the JSON report, and ask valgrind's memcheck for its counts.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Once;

/// Directory of the test programs' sources.
pub fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs")
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kal-programs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

static AGENT: Once = Once::new();

/// Makes sure `libkal_agent.so` sits next to the kal binary under test.
pub fn ensure_agent() {
    AGENT.call_once(|| {
        let kal = Path::new(env!("CARGO_BIN_EXE_kal"));
        let profile = kal
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "kal-agent", "--lib"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo build of the agent");
        assert!(st.success(), "building the agent failed");
        assert!(kal.with_file_name("libkal_agent.so").is_file());
    });
}

/// Compiles `name` (C, C++ or Rust, by extension) with debug info; returns the binary.
/// Each program is compiled once per test binary: a test's running program must never
/// have its file replaced under it (its mappings would then say `(deleted)`).
pub fn build(name: &str, extra: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{name} {}", extra.join(" "));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(k, _)| *k == key) {
        return p.clone();
    }
    let p = compile(name, extra);
    built.push((key, p.clone()));
    p
}

fn compile(name: &str, extra: &[&str]) -> PathBuf {
    let src = src_dir().join(name);
    let stem = Path::new(name).file_stem().unwrap().to_str().unwrap();
    let tag = extra.join("_").replace(['/', '-', '.'], "");
    let out = out_dir().join(format!(
        "{stem}{tag}{}",
        if extra.contains(&"-shared") {
            ".so"
        } else {
            ""
        }
    ));
    let ext = Path::new(name).extension().unwrap().to_str().unwrap();
    // Tests run in parallel and may build the same program: compile to a private name, then
    // rename into place (atomic, and fine while another test runs the old file).
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let final_out = out;
    let out = PathBuf::from(format!(
        "{}.tmp{}-{n}",
        final_out.display(),
        std::process::id()
    ));
    let mut cmd = match ext {
        "c" => {
            let mut c = Command::new("gcc");
            c.args(["-g", "-O1", "-pthread", "-fno-omit-frame-pointer", "-o"])
                .arg(&out)
                .arg(&src);
            c
        }
        "cpp" => {
            let mut c = Command::new("g++");
            c.args(["-g", "-O1", "-o"]).arg(&out).arg(&src);
            c
        }
        "rs" => {
            let mut c = Command::new("rustc");
            c.args(["-g", "-C", "opt-level=1", "-o"])
                .arg(&out)
                .arg(&src);
            c
        }
        _ => panic!("unknown source kind {name}"),
    };
    cmd.args(extra);
    let o = cmd.output().expect("compiler runs");
    assert!(
        o.status.success(),
        "compiling {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&out, &final_out).unwrap();
    final_out
}

/// Line of the `@marker` comment in a test program's source.
pub fn line_of(name: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(src_dir().join(name)).unwrap();
    let tag = format!("@{marker}");
    let i = text
        .lines()
        .position(|l| {
            l.split(|c: char| c.is_whitespace() || c == '*' || c == '/')
                .any(|w| w == tag)
        })
        .unwrap_or_else(|| panic!("no {tag} in {name}"));
    i as u32 + 1
}

/// Runs `kal ARGS` with no stdin.
pub fn kal(args: &[&str]) -> Output {
    kal_env(args, &[])
}

/// Result of `kal run --json` on a program.
pub struct Run {
    /// kal's output.
    pub out: Output,
    /// The parsed JSON report.
    pub json: Value,
    /// stderr as text.
    pub stderr: String,
}

/// Runs `kal run --json FILE [flags] -- prog args` and parses the report.
pub fn run_json(flags: &[&str], prog: &Path, args: &[&str]) -> Run {
    run_json_env(flags, prog, args, &[])
}

/// `(bytes, blocks)` of one summary class.
pub fn totals(json: &Value, kind: &str) -> (u64, u64) {
    let t = &json["summary"][kind];
    (t["bytes"].as_u64().unwrap(), t["blocks"].as_u64().unwrap())
}

/// Records of one kind whose stack has a frame in `file` at `line`.
pub fn records_at<'a>(json: &'a Value, kind: &str, file: &str, line: u32) -> Vec<&'a Value> {
    json["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == kind)
        .filter(|r| {
            r["stack"].as_array().unwrap().iter().any(|f| {
                f["file"].as_str().unwrap_or("").ends_with(file)
                    && f["line"].as_u64() == Some(line as u64)
            })
        })
        .collect()
}

/// Sum of `(bytes, blocks)` over records.
pub fn sum(records: &[&Value]) -> (u64, u64) {
    records.iter().fold((0, 0), |(b, n), r| {
        (
            b + r["bytes"].as_u64().unwrap(),
            n + r["blocks"].as_u64().unwrap(),
        )
    })
}

/// memcheck's `(definitely, indirectly, possibly)` lost `(bytes, blocks)`.
pub fn memcheck(prog: &Path, args: &[&str]) -> [(u64, u64); 3] {
    let [d, i, p, _] = memcheck_all(prog, args);
    [d, i, p]
}

/// memcheck's four counts: definitely, indirectly, possibly lost and still reachable
/// `(bytes, blocks)`.
pub fn memcheck_all(prog: &Path, args: &[&str]) -> [(u64, u64); 4] {
    let o = Command::new("valgrind")
        .args(["--leak-check=full", "--error-exitcode=0"])
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("valgrind is installed");
    let text = String::from_utf8_lossy(&o.stderr);
    let grab = |label: &str| -> (u64, u64) {
        let Some(line) = text.lines().find(|l| l.contains(label)) else {
            return (0, 0);
        };
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit() && c != ',')
            .filter_map(|w| w.replace(',', "").parse().ok())
            .collect();
        // "==PID==    definitely lost: 1,234 bytes in 5 blocks"
        (nums[nums.len() - 2], nums[nums.len() - 1])
    };
    [
        grab("definitely lost:"),
        grab("indirectly lost:"),
        grab("possibly lost:"),
        grab("still reachable:"),
    ]
}

/// A program running under `kal run`, past its "ready PID" line.
pub struct Live {
    /// The `kal run` process.
    pub kal: Child,
    /// The program.
    pub pid: i32,
    /// The program's stdout after the ready line.
    pub out: BufReader<ChildStdout>,
}

impl Live {
    /// Starts `prog` under `kal run` and waits for its ready line.
    pub fn start(prog: &std::path::Path) -> Live {
        ensure_agent();
        let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "-q", "--error-exitcode", "0", "--"])
            .arg(prog)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(kal.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .expect("ready line")
            .parse()
            .unwrap();
        Live { kal, pid, out }
    }

    /// Starts `prog` under `kal run --no-trace` (a debugger may attach to it) and waits for
    /// its ready line.
    pub fn start_untraced(prog: &std::path::Path) -> Live {
        Live::start_flags(&["--no-trace"], prog, &[], &[])
    }

    /// Asserts that the program is traced by its `kal run` alone, as before any check (a
    /// check borrows it and gives it back within moments).
    pub fn assert_traced_by_kal_run(&self) {
        let want = self.kal.id().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.status("TracerPid:") != want && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(self.status("TracerPid:"), want);
    }

    /// A field of /proc/PID/status.
    pub fn status(&self, field: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        s.lines()
            .find(|l| l.starts_with(field))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    }

    /// Children of the program (of any of its threads) that are not zombies.
    pub fn live_children(&self) -> Vec<String> {
        let kids = all_children(self.pid);
        kids.split_whitespace()
            .filter(|c| {
                let st = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
                !st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
                    && !st.is_empty()
            })
            .map(String::from)
            .collect()
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test started.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.kal.wait();
    }
}

/// The children of every thread of process `pid`, space-separated (zombies included).
pub fn all_children(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    tasks
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("children")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// Asserts that kal failed with exit status 125 and one line naming the problem.
pub fn one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("kal: error: ") && stderr.contains(needle),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

/// Panics with a clear message unless `path` exists (a test's prerequisite, installed by
/// `.ci/run`).
pub fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "prerequisite missing: {path} (apt-get install {package}; .ci/run installs it)"
    );
}

/// Panics with a clear message unless `cmd` is on PATH.
pub fn require_command(cmd: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "prerequisite missing: `{cmd}` is not on PATH (apt-get install {package}; .ci/run installs it)"
    );
}

/// Whether `cmd` is on PATH; when not, says on stderr that the test `test` is skipped and
/// why (for tools a test only checks against, e.g. `go tool pprof`, Chromium).
pub fn have_command(cmd: &str, package: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!(
            "SKIPPED {test}: `{cmd}` is not on PATH (apt-get install {package}; .ci/run installs it)"
        );
    }
    found
}

/// Debian's jemalloc, for runs under `LD_PRELOAD`.
pub const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// Runs `kal ARGS` with no stdin and extra environment variables (`kal run` passes them on
/// to the program; an `LD_PRELOAD` given here is loaded after the agent).
pub fn kal_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    ensure_agent();
    Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("kal runs")
}

/// [`run_json`] with extra environment variables for kal and the program.
pub fn run_json_env(flags: &[&str], prog: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut a = vec!["run", "--json", json.to_str().unwrap()];
    a.extend_from_slice(flags);
    a.push("--");
    a.push(prog.to_str().unwrap());
    a.extend_from_slice(args);
    let out = kal_env(&a, envs);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {text}\nstderr: {stderr}"));
    Run { out, json, stderr }
}

/// Every document of a JSON Lines file.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `kal check PID --json F [extra]`: kal's output and the parsed report.
pub fn check_pid_json(pid: i32, extra: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("now.json");
    let pid = pid.to_string();
    let mut args = vec!["check", &pid, "--json", json.to_str().unwrap()];
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

/// `untracked_allocations` of a report.
pub fn untracked(json: &Value) -> u64 {
    json["untracked_allocations"].as_u64().unwrap()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Live {
    /// Starts `prog ARGS` under `kal run` with extra environment variables and waits for
    /// its "ready PID" line.
    pub fn start_with(prog: &Path, args: &[&str], envs: &[(&str, &str)]) -> Live {
        Live::start_flags(&[], prog, args, envs)
    }

    /// [`Live::start_with`] with extra `kal run` flags.
    pub fn start_flags(flags: &[&str], prog: &Path, args: &[&str], envs: &[(&str, &str)]) -> Live {
        ensure_agent();
        let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "-q", "--error-exitcode", "0"])
            .args(flags)
            .arg("--")
            .arg(prog)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(kal.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("ready ") {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("{} ended before its ready line", prog.display());
            }
        }
        let pid = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
        Live { kal, pid, out }
    }
}

/// memcheck's definitely lost `(bytes, blocks)` for `prog ARGS` run with extra environment
/// variables (for the program only: valgrind itself gets them too, which is harmless for
/// the ones used here).
pub fn memcheck_definitely_env(prog: &Path, args: &[&str], envs: &[(&str, &str)]) -> (u64, u64) {
    let o = Command::new("valgrind")
        .args(["--leak-check=full", "--error-exitcode=0"])
        .arg(prog)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("valgrind is installed");
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("HEAP SUMMARY"),
        "valgrind gave no heap summary: {text}"
    );
    let Some(line) = text.lines().find(|l| l.contains("definitely lost:")) else {
        return (0, 0); // "All heap blocks were freed -- no leaks are possible"
    };
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit() && c != ',')
        .filter_map(|w| w.replace(',', "").parse().ok())
        .collect();
    (nums[nums.len() - 2], nums[nums.len() - 1])
}

/// Runs `kal run --error-exitcode 0 --reclaim=free --free-sites '*' --free-after 0s
/// --check-every 300ms --json F [flags] -- prog args` (blocks freed, not parked) with extra
/// environment variables; returns kal's output and the JSON lines it wrote.
pub fn run_reclaiming(
    flags: &[&str],
    prog: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Output, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    let mut a = vec![
        "run",
        "--error-exitcode",
        "0",
        "--reclaim=free",
        "--free-sites",
        "*",
        "--free-after",
        "0s",
        "--check-every",
        "300ms",
        "--json",
        json.to_str().unwrap(),
    ];
    a.extend_from_slice(flags);
    a.push("--");
    a.push(prog.to_str().unwrap());
    a.extend_from_slice(args);
    let out = kal_env(&a, envs);
    let lines = read_json_lines(&json);
    (out, lines)
}

/// kal's stderr, line by line, as it comes.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects lines until one satisfies `want` (panics, with what came, after a minute in
/// all, however many other lines arrive meanwhile).
pub fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = want(&l);
                seen.push(l);
                if done {
                    return;
                }
            }
            Err(e) => panic!("{e}; kal said:\n{}", seen.join("\n")),
        }
    }
}

/// Runs `kal ARGS` and samples the launched program's peak RSS (KiB) until it ends.
pub fn run_sampling_rss(args: &[&str]) -> (std::process::Output, u64) {
    ensure_agent();
    let child = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let kal_pid = child.id();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        loop {
            let kids = std::fs::read_to_string(format!("/proc/{kal_pid}/task/{kal_pid}/children"))
                .unwrap_or_default();
            if std::fs::metadata(format!("/proc/{kal_pid}")).is_err() {
                return peak;
            }
            for k in kids.split_whitespace() {
                let st = std::fs::read_to_string(format!("/proc/{k}/status")).unwrap_or_default();
                if let Some(kb) = st
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                {
                    peak = peak.max(kb.parse().unwrap_or(0));
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let out = child.wait_with_output().unwrap();
    (out, sampler.join().unwrap())
}

/// Kills the program a test started when the test ends, even by a panic (a program left
/// waiting for a flag file would otherwise run on forever, and its kal with it).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling the program this test started (ESRCH once it is gone).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// The program's pid from its "ready PID" line.
pub fn ready_pid(stdout: &mut impl BufRead) -> i32 {
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    ready
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("no ready line: {ready:?}"))
        .parse()
        .unwrap()
}
