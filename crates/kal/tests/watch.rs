//! `kal watch`, the growth forecast and Prometheus metrics, on real processes: a program
//! leaking at a known steady rate under a memory limit the test sets (a cgroup v2 or v1
//! child when the machine allows it, else `RLIMIT_AS`), checked with and without the
//! agent, and scraped by a real Prometheus server.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The leak rate of the grower in these tests: 4 MiB a second, in 64 KiB blocks.
const RATE: u64 = 4 << 20;

/// A memory limit the test put on a process.
struct Limited {
    /// The kind kal must name: `cgroup_v2`, `cgroup_v1` or `rlimit_as`.
    kind: &'static str,
    /// The limit in bytes.
    bytes: u64,
    /// The cgroup made for it (removed on drop, once the process is gone).
    dir: Option<PathBuf>,
}

impl Drop for Limited {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Mount points of the cgroup v2 hierarchy and of the v1 memory controller.
fn cgroup_mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (mut v2, mut v1) = (None, None);
    for l in info.lines() {
        let (left, right) = l.split_once(" - ").unwrap();
        let dir = PathBuf::from(left.split_whitespace().nth(4).unwrap());
        let r: Vec<&str> = right.split_whitespace().collect();
        if r[0] == "cgroup2" {
            v2 = Some(dir);
        } else if r[0] == "cgroup" && r[2].split(',').any(|o| o == "memory") {
            v1 = Some(dir);
        }
    }
    (v2, v1)
}

/// Puts process `pid` under a memory limit of `bytes`: a new cgroup v2 child of the root
/// with `memory.max`, else a new v1 memory cgroup under the process's own with
/// `memory.limit_in_bytes`, else `RLIMIT_AS` at its virtual size plus `bytes`.
fn limit_memory(pid: i32, bytes: u64) -> Limited {
    let name = format!("kal-test-{}-{pid}", std::process::id());
    let (v2, v1) = cgroup_mounts();
    if let Some(root) = v2 {
        let dir = root.join(&name);
        let ok = std::fs::create_dir(&dir).is_ok();
        let limited = Limited {
            kind: "cgroup_v2",
            bytes,
            dir: ok.then(|| dir.clone()),
        };
        if ok
            && std::fs::read_to_string(dir.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
            && std::fs::write(dir.join("memory.max"), bytes.to_string()).is_ok()
            && std::fs::write(dir.join("cgroup.procs"), pid.to_string()).is_ok()
        {
            return limited;
        }
    }
    if let Some(mount) = v1 {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let path = own
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, c, p) = (f.next()?, f.next()?, f.next()?);
                c.split(',').any(|c| c == "memory").then(|| p.to_string())
            })
            .unwrap_or_default();
        let dir = mount.join(path.trim_start_matches('/')).join(&name);
        let ok = std::fs::create_dir(&dir).is_ok();
        let limited = Limited {
            kind: "cgroup_v1",
            bytes,
            dir: ok.then(|| dir.clone()),
        };
        if ok
            && std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).is_ok()
            && std::fs::write(dir.join("cgroup.procs"), pid.to_string()).is_ok()
        {
            return limited;
        }
    }
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let vm: u64 = statm.split_whitespace().next().unwrap().parse().unwrap();
    let lim = libc::rlimit {
        rlim_cur: vm * 4096 + bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit with a valid new limit and no old-limit pointer.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_AS, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    Limited {
        kind: "rlimit_as",
        bytes: lim.rlim_cur,
        dir: None,
    }
}

/// A `kal` process a test started: killed with the processes it started (by their ids)
/// when the test ends, even by a failed assertion.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        for pid in all_children(self.0.id() as i32).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                // SAFETY: signalling a process this test's kal started.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The complete documents of a JSON Lines file kal may still be appending to.
fn complete_json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let end = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    text[..end]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `kal ARGS` with stdout and stderr captured, no stdin.
fn kal_out(args: &[&str]) -> std::process::Output {
    kal(args)
}

/// The JSON documents of kal's stdout.
fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn watch_forecasts_a_steady_leak_under_a_memory_limit_and_names_its_line() {
    let prog = build("grower.c", &[]);
    let line = line_of("grower.c", "grow");
    let live = Live::start_flags(&[], &prog, &[&RATE.to_string()], &[]);
    // 400 MiB of headroom at 4 MiB/s: about 100 s, far less than the machine's memory.
    let limit = limit_memory(live.pid, 400 << 20);
    let pid = live.pid.to_string();
    let out = kal_out(&["watch", &pid, "--every", "400ms", "--count", "8", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 8, "{stderr}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["check"], i as u64 + 1);
        assert_eq!(l["pid"], live.pid);
        assert_eq!(
            l["lost_bytes"].as_u64().unwrap(),
            l["direct"]["bytes"].as_u64().unwrap() + l["indirect"]["bytes"].as_u64().unwrap()
        );
        // Every block lost is one 64 KiB block of the grower.
        assert_eq!(
            l["direct"]["bytes"].as_u64().unwrap(),
            l["direct"]["blocks"].as_u64().unwrap() * (64 << 10)
        );
    }
    // Before three checks, no forecast.
    assert!(lines[1]["forecast"]["seconds_to_limit"].is_null());
    let f = &lines[7]["forecast"];
    assert_eq!(f["points"], 8);
    assert_eq!(f["limit"]["kind"], limit.kind, "{f}");
    assert_eq!(f["limit"]["limit_bytes"].as_u64().unwrap(), limit.bytes);
    // The true time: the headroom kal saw at the last check, at the known rate.
    let headroom = limit.bytes - f["limit"]["usage_bytes"].as_u64().unwrap();
    let truth = headroom as f64 / RATE as f64;
    let got = f["seconds_to_limit"].as_f64().unwrap();
    println!(
        "{}: forecast {got:.1} s, true {truth:.1} s; RSS growth {} B/s (leak rate {RATE})",
        limit.kind, f["rss_bytes_per_second"]
    );
    assert!(
        (got - truth).abs() <= 0.2 * truth,
        "forecast {got:.1} s, true {truth:.1} s: {f}"
    );
    let rate = f["rss_bytes_per_second"].as_f64().unwrap();
    assert!(
        (rate - RATE as f64).abs() <= 0.2 * RATE as f64,
        "RSS growth {rate}"
    );
    // The site most responsible is the grower's malloc line, with the lost bytes the same
    // check reported.
    let site = &f["site"];
    assert!(
        site["site"]
            .as_str()
            .unwrap()
            .ends_with(&format!("grower.c:{line}")),
        "{site}"
    );
    assert_eq!(site["lost_bytes"], lines[7]["direct"]["bytes"]);
    assert!(site["lost_bytes_per_second"].as_f64().unwrap() > 0.0);

    // --warn-before: below 1 h, so the third check (the first with a forecast) ends it
    // with status 24, one line a check on a pipe, and a warning naming the site.
    let out = kal_out(&["watch", &pid, "--every", "300ms", "--warn-before", "1h"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(24), "{stdout}\n{stderr}");
    let text: Vec<&str> = stdout.lines().collect();
    assert_eq!(text.len(), 3, "{stdout}");
    for (i, l) in text.iter().enumerate() {
        assert!(
            l.contains(&format!("=={pid}== kal watch {}: RSS ", i + 1)),
            "{l}"
        );
    }
    assert!(text[2].contains(&format!("{} ", limit.kind)), "{stdout}");
    assert!(text[2].contains(" reached in "), "{stdout}");
    assert!(text[2].contains(&format!("grower.c:{line}")), "{stdout}");
    assert!(
        stderr.contains("WARNING:")
            && stderr.contains("below --warn-before 1h00m")
            && stderr.contains(&format!("grower.c:{line}")),
        "{stderr}"
    );
    drop(live);
}

#[test]
fn run_check_every_keeps_a_forecast_with_the_leaking_line() {
    let prog = build("grower.c", &[]);
    let line = line_of("grower.c", "grow");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    ensure_agent();
    let mut child = Guard(
        Command::new(env!("CARGO_BIN_EXE_kal"))
            .args([
                "run",
                "--error-exitcode",
                "0",
                "--check-every",
                "300ms",
                "--json",
            ])
            .arg(&json)
            .arg("--")
            .arg(&prog)
            .arg(RATE.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = stderr_lines(&mut child.0);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, |l| l.contains("kal check 5: "));
    let pid: i32 = seen
        .last()
        .unwrap()
        .split("==")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: ending the program this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    child.0.wait().unwrap();
    seen.extend(rx.iter());
    let lines = read_json_lines(&json);
    let stderr = seen.join("\n");
    let checks: Vec<&Value> = lines.iter().filter(|l| l.get("check").is_some()).collect();
    assert!(checks.len() >= 5, "{stderr}");
    let last = checks[checks.len() - 1];
    let f = &last["forecast"];
    assert_eq!(f["points"].as_u64().unwrap(), checks.len() as u64);
    assert!(f["seconds_to_limit"].as_f64().unwrap().is_finite(), "{f}");
    assert!(f["rss_bytes_per_second"].as_f64().unwrap() > 0.0, "{f}");
    let site = &f["site"];
    assert!(
        site["site"]
            .as_str()
            .unwrap()
            .ends_with(&format!("grower.c:{line}")),
        "{site}"
    );
    let at_line = records_at(last, "direct", "grower.c", line);
    assert_eq!(site["lost_bytes"].as_u64().unwrap(), sum(&at_line).0);
    assert!(
        stderr.contains(" forecast: ") && stderr.contains(&format!("grower.c:{line}")),
        "{stderr}"
    );
}

/// `GET path` on `addr`: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the one sample of `name{labels…}` in a metrics text whose labels contain
/// each of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits for kal's "Prometheus metrics at http://ADDR/metrics" line; returns ADDR.
fn metrics_addr(rx: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
    wait_for(rx, seen, |l| l.contains("Prometheus metrics at http://"));
    let l = seen.last().unwrap();
    l.split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string()
}

#[test]
fn watch_without_the_agent_exports_what_its_json_says_and_ends_with_the_process() {
    let prog = build("grower.c", &[]);
    // 10 blocks of 4096 bytes, then nothing more: the counts settle.
    let mut target = Guard(
        Command::new(&prog)
            .args(["1048576", "4096", "40960"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(target.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let pid = target.0.id().to_string();
    ensure_agent();
    let mut watch = Guard(
        Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["watch", &pid, "--every", "300ms", "--json"])
            .args(["--prometheus", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = stderr_lines(&mut watch.0);
    let mut seen = Vec::new();
    let addr = metrics_addr(&rx, &mut seen);
    let mut out = BufReader::new(watch.0.stdout.take().unwrap());
    // Watch until two checks in a row see all 10 blocks lost.
    let mut last: Option<Value> = None;
    let mut settled = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while settled < 2 && Instant::now() < deadline {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "kal watch ended");
        let v: Value = serde_json::from_str(&l).unwrap();
        settled = if v["direct"]["blocks"] == 10 {
            settled + 1
        } else {
            0
        };
        last = Some(v);
    }
    let last = last.unwrap();
    assert_eq!(last["direct"]["blocks"], 10, "{last}");
    // No agent: usable sizes, 10 blocks of one size at least 4096.
    let direct = last["direct"]["bytes"].as_u64().unwrap();
    assert!(direct >= 40960 && direct.is_multiple_of(10), "{last}");
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let p = format!("pid=\"{pid}\"");
    assert_eq!(
        sample(&body, "kal_lost_bytes", &[&p, "class=\"direct\""]),
        Some(direct as f64),
        "{body}"
    );
    assert_eq!(
        sample(&body, "kal_lost_blocks", &[&p, "class=\"direct\""]),
        Some(10.0)
    );
    assert!(
        sample(&body, "kal_rss_bytes", &[&p]).is_some_and(|v| v > 0.0),
        "{body}"
    );
    // Without stacks, the site is what the blocks are; the top site holds them all.
    let top = body
        .lines()
        .find(|l| l.starts_with("kal_site_lost_bytes{") && !l.contains("site=\"other\""))
        .unwrap_or_else(|| panic!("{body}"));
    assert!(top.contains("-byte blocks"), "{top}");
    assert!(top.ends_with(&format!(" {direct}")), "{top}");
    for name in [
        "kal_rss_bytes",
        "kal_live_bytes",
        "kal_lost_bytes",
        "kal_retained_bytes",
        "kal_reclaimed_bytes",
        "kal_pause_seconds",
        "kal_scan_seconds",
        "kal_forecast_seconds",
        "kal_site_lost_bytes",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "{name}: {body}");
        assert!(body.contains(&format!("# TYPE {name} ")), "{name}: {body}");
    }
    assert!(http_get(&addr, "/nothing").0.contains("404"));
    // The process ends: so does kal watch, with status 0.
    target.0.kill().unwrap();
    target.0.wait().unwrap();
    let st = watch.0.wait().unwrap();
    seen.extend(rx.iter());
    let stderr = seen.join("\n");
    assert_eq!(st.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ended"), "{stderr}");
}

/// Percent-encodes a PromQL query for a URL.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server this test started.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second.
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kal\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    /// The value of the first result of an instant PromQL query, if any.
    fn query(&self, q: &str) -> Option<(Value, f64)> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(
            s,
            "GET /api/v1/query?query={} HTTP/1.0\r\nHost: {}\r\n\r\n",
            urlencode(q),
            self.addr
        )
        .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        let body = r.split_once("\r\n\r\n")?.1;
        let v: Value = serde_json::from_str(body).ok()?;
        let first = v["data"]["result"].as_array()?.first()?.clone();
        let value = first["value"][1].as_str()?.parse().ok()?;
        Some((first["metric"].clone(), value))
    }

    /// Waits (up to 90 s) for `q` to give a value.
    fn wait_query(&self, q: &str) -> (Value, f64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(r) = self.query(q) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no answer to {q}; prometheus log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_the_lost_bytes_kal_run_reports() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "SKIPPED: `prometheus` is not installed (apt-get install prometheus; .ci/run installs it)"
        );
        return;
    }
    let prog = build("grower.c", &[]);
    let line = line_of("grower.c", "grow");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.jsonl");
    ensure_agent();
    let mut child = Guard(
        Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "--error-exitcode", "0", "--check-every", "300ms"])
            .args(["--prometheus", "127.0.0.1:0", "--json"])
            .arg(&json)
            .arg("--")
            .arg(&prog)
            .args(["1048576", "4096", "40960"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = stderr_lines(&mut child.0);
    let mut seen = Vec::new();
    let addr = metrics_addr(&rx, &mut seen);
    // Until a check sees all 10 blocks of 4096 bytes lost.
    wait_for(&rx, &mut seen, |l| {
        l.contains("total: definitely lost 40960 bytes in 10 blocks")
    });
    // Its JSON line is appended right after the text line.
    let deadline = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = complete_json_lines(&json);
        if lines
            .last()
            .is_some_and(|l| l["summary"]["direct"]["blocks"] == 10)
        {
            break lines;
        }
        assert!(Instant::now() < deadline, "{lines:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let last = lines.last().unwrap();
    let pid = last["pid"].as_i64().unwrap();
    let (kal_bytes, kal_blocks) = totals(last, "direct");
    assert_eq!((kal_bytes, kal_blocks), (40960, 10));
    let prom = Prometheus::start(&addr);
    let sel = format!("{{job=\"kal\",pid=\"{pid}\"");
    let (_, lost) = prom.wait_query(&format!("kal_lost_bytes{sel},class=\"direct\"}}"));
    assert_eq!(lost, kal_bytes as f64);
    let (_, blocks) = prom.wait_query(&format!("kal_lost_blocks{sel},class=\"direct\"}}"));
    assert_eq!(blocks, kal_blocks as f64);
    // The top site by lost bytes, by its file:line, as kal's JSON names it.
    let (metric, site_bytes) = prom.wait_query(&format!(
        "topk(1, kal_site_lost_bytes{sel},site!=\"other\"}})"
    ));
    assert!(
        metric["site"]
            .as_str()
            .unwrap()
            .ends_with(&format!("grower.c:{line}")),
        "{metric}"
    );
    assert_eq!(
        site_bytes,
        sum(&records_at(last, "direct", "grower.c", line)).0 as f64
    );
    let (_, checks) = prom.wait_query(&format!("kal_checks_total{sel}}}"));
    assert!(checks >= lines.len() as f64 - 1.0);
    let (_, pauses) = prom.wait_query(&format!("kal_pause_seconds_count{sel}}}"));
    assert!(pauses >= 1.0);
    let (metric, _) = prom.wait_query(&format!("kal_forecast_seconds{sel}}}"));
    assert!(metric["limit"].is_string(), "{metric}");
    // SAFETY: ending the program this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    child.0.wait().unwrap();
}

#[test]
fn on_a_terminal_the_view_is_redrawn() {
    if Command::new("script").arg("--version").output().is_err() {
        println!("SKIPPED: `script` (util-linux) is not installed: no terminal to run kal in");
        return;
    }
    let prog = build("grower.c", &[]);
    let line = line_of("grower.c", "grow");
    let live = Live::start_flags(&[], &prog, &[&RATE.to_string()], &[]);
    let cmd = format!(
        "{} watch {} --every 200ms --count 3",
        env!("CARGO_BIN_EXE_kal"),
        live.pid
    );
    // `script` runs kal on a pseudo-terminal and copies what it draws.
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let frames: Vec<&str> = text.split("\x1b[H\x1b[2J").skip(1).collect();
    assert_eq!(frames.len(), 3, "{text}");
    for (i, f) in frames.iter().enumerate() {
        assert!(
            f.starts_with(&format!("kal watch {} (", live.pid))
                && f.contains(&format!("check {} at", i + 1))
                && f.contains("time to OOM: "),
            "{f}"
        );
    }
    assert!(
        frames[0].contains("no forecast yet (1 of 3 checks)"),
        "{}",
        frames[0]
    );
    assert!(frames[2].contains(" reached in "), "{}", frames[2]);
    assert!(
        frames[2].contains(&format!("grower.c:{line}")),
        "{}",
        frames[2]
    );
}

#[test]
fn watch_an_attached_process_names_the_line_allocating_after_the_attach() {
    let prog = build("grower.c", &[]);
    let line = line_of("grower.c", "grow");
    // The grower starts leaking only once attached (a line on its stdin): every block it
    // leaks is then one the agent saw, with its stack.
    let mut target = Guard(
        Command::new(&prog)
            .args([&RATE.to_string(), "65536", "1e300", "wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(target.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let pid = target.0.id().to_string();
    let out = kal_out(&["attach", &pid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = kal_out(&["watch", &pid, "--every", "300ms", "--count", "4", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 4, "{stderr}");
    let last = &lines[3];
    // Only blocks allocated since the attach are known: all the grower's 64 KiB blocks.
    assert_eq!(
        last["direct"]["bytes"].as_u64().unwrap(),
        last["direct"]["blocks"].as_u64().unwrap() * (64 << 10)
    );
    let f = &last["forecast"];
    assert!(f["seconds_to_limit"].as_f64().unwrap().is_finite(), "{f}");
    assert!(
        f["site"]["site"]
            .as_str()
            .unwrap()
            .ends_with(&format!("grower.c:{line}")),
        "{f}"
    );
    assert_eq!(f["site"]["lost_bytes"], last["direct"]["bytes"]);
    let _ = kal_out(&["detach", &pid]);
}

#[test]
fn bad_input_gets_one_line() {
    one_line_error(
        &kal_out(&["watch", "99999999", "--count", "1"]),
        "no process",
    );
    one_line_error(
        &kal_out(&["watch", "1", "--prometheus", "not-an-address"]),
        "cannot serve metrics on not-an-address",
    );
    let out = kal_out(&["watch", "1", "--every", "0s"]);
    assert_eq!(out.status.code(), Some(2));
}
