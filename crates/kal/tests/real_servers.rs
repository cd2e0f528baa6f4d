//! Real programs from Debian under kal: redis-server (linked to jemalloc, millions of small
//! blocks) with a million keys and verified traffic, and CPython with every object a
//! malloc block (`PYTHONMALLOC=malloc`), nginx with a master and two workers that switch
//! to `nobody`, compared with memcheck. `.ci/run` installs redis-server, redis-tools,
//! python3 and nginx.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";

fn redis_prerequisites() {
    require_command("redis-server", "redis-server");
    require_command("redis-cli", "redis-tools");
}

/// `redis-cli -p PORT ARGS`, trimmed stdout.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A redis-server on a private port, started by `kal run`.
struct Redis {
    kal: Option<Child>,
    pid: i32,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// `kal run --json DIR/report.json FLAGS -- redis-server --port P ...`, once the
    /// server answers PING.
    fn start(flags: &[&str]) -> Redis {
        redis_prerequisites();
        ensure_agent();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let json = dir.path().join("report.json");
        let kal_err = std::fs::File::create(dir.path().join("kal.stderr")).unwrap();
        let mut args: Vec<String> = vec!["run".into(), "--json".into(), path_str(&json)];
        args.extend(flags.iter().map(|s| s.to_string()));
        args.push("--".into());
        args.push("redis-server".into());
        for a in [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &path_str(dir.path()),
            "--logfile",
            &path_str(&dir.path().join("redis.log")),
        ] {
            args.push(a.to_string());
        }
        let kal = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(kal_err)
            .spawn()
            .unwrap();
        let kal_pid = kal.id();
        let mut r = Redis {
            kal: Some(kal),
            pid: 0,
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "redis-server under kal never answered PING: {}",
                r.kal_stderr()
            );
            if r.pid == 0 {
                let kids =
                    std::fs::read_to_string(format!("/proc/{kal_pid}/task/{kal_pid}/children"))
                        .unwrap_or_default();
                r.pid = kids
                    .split_whitespace()
                    .next()
                    .and_then(|k| k.parse().ok())
                    .unwrap_or(0);
            }
            if r.pid != 0 && redis_cli(port, &["ping"]) == "PONG" {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kal_stderr(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("kal.stderr")).unwrap_or_default();
        // The last lines tell; a full report of a million blocks does not fit a message.
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs the verifying client: load `n` keys, then `seconds` of mixed traffic.
    fn client(&self, n: u64, seconds: u64) -> Output {
        let prog = build("redis_client.c", &["-O2"]);
        Command::new(prog)
            .args([
                self.port.to_string(),
                n.to_string(),
                seconds.to_string(),
                "7".into(),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `SHUTDOWN NOSAVE`, then waits for kal: its exit status and the JSON Lines written.
    fn shutdown(mut self) -> (std::process::ExitStatus, Vec<serde_json::Value>, String) {
        redis_cli(self.port, &["shutdown", "nosave"]);
        let status = self.kal.take().unwrap().wait().unwrap();
        let text = std::fs::read_to_string(self.dir.path().join("report.json")).unwrap_or_default();
        // One document (exit report only), or JSON Lines with --check-every.
        let lines = match serde_json::from_str(&text) {
            Ok(v) => vec![v],
            Err(_) => read_json_lines(&self.dir.path().join("report.json")),
        };
        (status, lines, self.kal_stderr())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut kal) = self.kal.take() {
            if self.pid != 0 {
                // SAFETY: signalling the server this test started.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
            let _ = kal.wait();
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn client_ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: the verifying client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn redis_with_a_million_keys_has_nothing_definitely_lost_live_or_at_shutdown() {
    let redis = Redis::start(&[]);
    let stdout = client_ok(&redis.client(1_000_000, 0), "loading 1M keys");
    assert!(stdout.contains("loaded 1000000"), "{stdout}");
    assert_eq!(redis_cli(redis.port, &["dbsize"]), "1000000");
    for i in 0..10 {
        let (out, j) = check_pid_json(redis.pid, &["-q"]);
        assert_eq!(
            (totals(&j, "direct"), untracked(&j)),
            ((0, 0), 0),
            "live check {i} of redis with 1M keys: definitely lost (bytes, blocks), untracked allocations; {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0));
    }
    let (status, lines, stderr) = redis.shutdown();
    let exit = lines.last().expect("an exit report");
    assert_eq!(
        (totals(exit, "direct"), untracked(exit)),
        ((0, 0), 0),
        "redis exit report: definitely lost, untracked allocations; {stderr}"
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn redis_under_reclaim_serves_verified_traffic_and_reclaims_nothing() {
    let redis = Redis::start(&[
        "-q",
        "--error-exitcode",
        "0",
        "--reclaim=free",
        "--free-sites",
        "*",
        "--free-after",
        "0s",
        "--check-every",
        "1s",
    ]);
    // 500k keys, then 15 s of SET/GET/DEL, every reply checked against the model.
    let traffic = redis.client(500_000, 15);
    let (status, lines, stderr) = redis.shutdown();
    let stdout = String::from_utf8_lossy(&traffic.stdout).into_owned();
    let client_err = String::from_utf8_lossy(&traffic.stderr).into_owned();
    let exit = lines.last().expect("an exit report");
    assert_eq!(exit["at_exit"], true, "{stderr}");
    assert_eq!(
        exit["reclaimed"]["blocks"],
        0,
        "reclaimed from a healthy redis: {}; client: {stdout}{client_err}",
        reclaimed_summary(exit)
    );
    assert_eq!(
        traffic.status.code(),
        Some(0),
        "no value mismatch, no lost connection: {stdout}{client_err}"
    );
    assert!(stdout.contains("mismatches 0"), "{stdout}");
    assert_eq!(status.code(), Some(0), "redis exited cleanly: {stderr}");
    let checks = lines.iter().filter(|l| l.get("check").is_some()).count();
    assert!(
        checks >= 3,
        "{checks} checks: reclaim needs two snapshots in a row"
    );
    for l in &lines {
        assert_eq!(totals(l, "direct"), (0, 0), "check {}", l["check"]);
        assert_eq!(untracked(l), 0, "check {}", l["check"]);
    }
}

/// "N blocks, B bytes; sites: f <- g <- h (N blocks); …; never again: K sites" from a report.
fn reclaimed_summary(report: &serde_json::Value) -> String {
    let r = &report["reclaimed"];
    let sites: Vec<String> = r["sites"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let frames: Vec<&str> = s["stack"]
                .as_array()
                .unwrap()
                .iter()
                .take(4)
                .map(|f| f["function"].as_str().unwrap_or("??"))
                .collect();
            format!("{} ({} blocks)", frames.join(" <- "), s["blocks"])
        })
        .collect();
    format!(
        "{} blocks, {} bytes; sites: {}; never again (the program freed a reclaimed block): {} sites",
        r["blocks"],
        r["bytes"],
        sites.join("; "),
        r["never_again"].as_array().map_or(0, |a| a.len())
    )
}

fn python_prerequisites() -> PathBuf {
    require_file(PYTHON, "python3");
    src_dir().join("py_objects.py")
}

#[test]
fn python_with_two_million_objects_has_nothing_definitely_lost_live() {
    let script = python_prerequisites();
    let live = Live::start_with(
        Path::new(PYTHON),
        &[script.to_str().unwrap(), "2000000", "wait"],
        &[("PYTHONMALLOC", "malloc")],
    );
    for i in 0..3 {
        let (out, j) = check_pid_json(live.pid, &["-q"]);
        assert_eq!(
            (totals(&j, "direct"), untracked(&j)),
            ((0, 0), 0),
            "live check {i} of python with 2M tuples: definitely lost (bytes, blocks), untracked allocations"
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn python_exit_report_loses_no_more_than_memcheck_says() {
    let script = python_prerequisites();
    let s = script.to_str().unwrap();
    let env = [("PYTHONMALLOC", "malloc")];
    // memcheck is ~80× slower: it gets the same script with fewer objects (Debian's
    // python 3.11 frees everything at exit under PYTHONMALLOC=malloc: 0 bytes in use).
    let memcheck_lost = memcheck_definitely_env(Path::new(PYTHON), &[s, "20000"], &env);
    for n in ["20000", "2000000"] {
        let r = run_json_env(&["--error-exitcode", "0"], Path::new(PYTHON), &[s, n], &env);
        assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr);
        assert!(String::from_utf8_lossy(&r.out.stdout).contains("kept"));
        let lost = totals(&r.json, "direct");
        assert!(
            lost.1 <= memcheck_lost.1 && lost.0 <= memcheck_lost.0,
            "python {n} objects: kal says definitely lost {lost:?}, memcheck {memcheck_lost:?}"
        );
        assert_eq!(untracked(&r.json), 0, "python {n}: every object recorded");
    }
}

const NGINX: &str = "/usr/sbin/nginx";

/// Four counts of one process: definitely, indirectly, possibly lost and still reachable,
/// `(bytes, blocks)` each.
type Counts = [(u64, u64); 4];

/// An nginx master with two workers on a private port, its files in a private
/// directory: started under `kal run --json DIR/r.json` or under memcheck.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(memcheck: bool) -> Nginx {
        require_file(NGINX, "nginx");
        let dir = tempfile::tempdir().unwrap();
        let d = path_str(dir.path());
        let port = free_port();
        let conf = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hi\\n\"; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx_args = [
            "-p",
            &d,
            "-c",
            &format!("{d}/nginx.conf"),
            "-g",
            "daemon off; master_process on;",
        ]
        .map(String::from);
        let mut cmd = if memcheck {
            let mut c = Command::new("valgrind");
            c.args([
                "--leak-check=full",
                "--trace-children=yes",
                &format!("--log-file={d}/vg.%p"),
                NGINX,
            ]);
            c
        } else {
            ensure_agent();
            let mut c = Command::new(env!("CARGO_BIN_EXE_kal"));
            c.args(["run", "--json", &format!("{d}/r.json"), "--", NGINX]);
            c
        };
        let child = cmd
            .args(&nginx_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let n = Nginx { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while n.get().is_none() {
            assert!(
                Instant::now() < deadline,
                "nginx never answered: {}",
                n.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        n
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// One `GET /` on a new connection: the response, if any.
    fn get(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        (!r.is_empty()).then_some(r)
    }

    /// `n` requests from 4 clients at once, every answer checked.
    fn load(&self, n: usize) {
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..n / 4 {
                        let r = self.get().expect("an answer");
                        assert!(
                            r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nhi\n"),
                            "{r}"
                        );
                    }
                });
            }
        });
    }

    /// The master's pid and its workers'.
    fn pids(&self) -> (i32, Vec<i32>) {
        let master: i32 = std::fs::read_to_string(self.dir.path().join("nginx.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let workers = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        (master, workers)
    }

    /// Sends `sig` to the master and waits for the whole run to end (at most a minute).
    fn stop(&mut self, sig: i32) -> std::process::ExitStatus {
        let (master, _) = self.pids();
        // SAFETY: signalling the nginx master this test started.
        unsafe { libc::kill(master, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not stop: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if let Ok((master, _)) = std::panic::catch_unwind(|| self.pids()) {
                // SAFETY: signalling the nginx master this test started.
                unsafe { libc::kill(master, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// memcheck's LEAK SUMMARY of one process's log file.
fn memcheck_counts(log: &str) -> Counts {
    let count = |what: &str| {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("{what}: ")))
            .unwrap_or_else(|| panic!("no '{what}' in {log}"));
        let nums: Vec<u64> = line
            .split(&format!("{what}: "))
            .nth(1)
            .unwrap()
            .replace(',', "")
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    [
        count("definitely lost"),
        count("indirectly lost"),
        count("possibly lost"),
        count("still reachable"),
    ]
}

fn kal_counts(r: &serde_json::Value) -> Counts {
    ["direct", "indirect", "possible", "reachable"].map(|k| totals(r, k))
}

/// Runs nginx under kal or memcheck, 2,000 requests, stopped by `sig`: the master's
/// counts, each worker's, and the run's stderr.
fn nginx_run(memcheck: bool, sig: i32) -> (Counts, Vec<Counts>, String) {
    let mut n = Nginx::start(memcheck);
    n.load(2000);
    let (master, workers) = n.pids();
    assert_eq!(workers.len(), 2, "{}", n.stderr());
    if !memcheck {
        // Checked live too, workers included (they listen as nobody now): nothing lost.
        for &p in workers.iter().chain([&master]) {
            let (out, j) = check_pid_json(p, &["-q"]);
            assert_eq!(
                (out.status.code(), totals(&j, "direct")),
                (Some(0), (0, 0)),
                "live check of nginx process {p}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let status = n.stop(sig);
    let stderr = n.stderr();
    let read = |p: i32| -> Counts {
        let dir = n.dir.path();
        if memcheck {
            memcheck_counts(&std::fs::read_to_string(dir.join(format!("vg.{p}"))).unwrap())
        } else {
            let file = if p == master {
                dir.join("r.json")
            } else {
                dir.join(format!("r.json.{p}"))
            };
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|_| panic!("no report of process {p}: {stderr}"));
            kal_counts(&serde_json::from_str(&text).unwrap())
        }
    };
    if !memcheck {
        // A worker leaked (ngx_set_environment's 8 bytes): kal says 23.
        assert_eq!(status.code(), Some(23), "{stderr}");
        for unread in ["no leak report", "dying of", "cannot reach kal"] {
            assert!(!stderr.contains(unread), "{stderr}");
        }
        assert_eq!(stderr.matches("SUMMARY: kal:").count(), 3, "{stderr}");
    }
    (
        read(master),
        workers.iter().map(|&w| read(w)).collect(),
        stderr,
    )
}

#[test]
fn nginx_master_and_workers_each_get_memchecks_lost_counts_when_stopped() {
    // nginx's workers switch to nobody right after fork: they could not reach kal's
    // private directory at exit and got no report. Stopped gracefully (SIGQUIT) and fast
    // (SIGTERM), every process is reported with memcheck's definitely and indirectly lost
    // counts (each worker: ngx_set_environment's 8 bytes), and as many blocks possibly
    // lost or still reachable. Bytes there differ by the environment's size, the same in
    // every process (nginx keeps a copy; kal and valgrind each add their own variables);
    // which of the two classes a block falls in differs where only an interior pointer
    // leads to it in one run and not in the other (ngx_crc32_table_init aligns its table
    // inside its block) or where the kernel holds the pointer (epoll registrations are
    // roots for kal, not for memcheck).
    require_command("valgrind", "valgrind");
    for sig in [libc::SIGQUIT, libc::SIGTERM] {
        let (km, kw, kerr) = nginx_run(false, sig);
        let (vm, vw, _) = nginx_run(true, sig);
        let what = format!("signal {sig}: kal {km:?} {kw:?}, memcheck {vm:?} {vw:?}; {kerr}");
        // Possibly lost and still reachable together: (bytes, blocks).
        let rest = |c: &Counts| (c[2].0 + c[3].0, c[2].1 + c[3].1);
        let env_diff = rest(&km).0 as i64 - rest(&vm).0 as i64;
        assert_eq!(km[..2], [(0, 0), (0, 0)], "{what}");
        assert_eq!(km[..2], vm[..2], "{what}");
        assert_eq!(rest(&km).1, rest(&vm).1, "{what}");
        assert!(env_diff.abs() < 4096, "{what}");
        for (k, v) in kw.iter().zip(&vw) {
            assert_eq!(k[..2], [(8, 1), (0, 0)], "{what}");
            assert_eq!(k[..2], v[..2], "{what}");
            assert_eq!(rest(k).1, rest(v).1, "{what}");
            // The workers' environment copy is the master's.
            assert_eq!(rest(k).0 as i64 - rest(v).0 as i64, env_diff, "{what}");
        }
        assert!(
            kerr.lines()
                .filter(|l| l.contains("Direct leak of 8 bytes"))
                .count()
                == 2
                && kerr.matches("in ngx_set_environment (nginx+").count() == 2,
            "{what}"
        );
    }
}
