//! The report's other formats, read by the tools their users read them with: pprof
//! (`go tool pprof`), flame graphs (SVG), HTML (headless Chromium), and `kal diff`.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// `kal run -q --json DIR/r.json EXTRA -- outputs` (no input: the program exits at once);
/// the JSON report.
fn run_outputs(dir: &Path, extra: &[&str]) -> Value {
    let prog = build("outputs.c", &[]);
    let json = dir.join("r.json");
    let mut args = vec!["run", "-q", "--json", json.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(["--", prog.to_str().unwrap()]);
    let out = kal(&args);
    assert_eq!(
        out.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The program's two known leaks, largest first.
    let big = line_of("outputs.c", "big");
    assert_eq!(sum(&records_at(&j, "direct", "outputs.c", big)), (24576, 6));
    assert_eq!(j["leaks"][0]["bytes"], 24576);
    j
}

/// `go tool pprof ARGS`: its stdout.
fn pprof(args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The first entry of `pprof -top` output: (flat, the rest of the line) and the total line.
fn top_entry(top: &str) -> (String, String, String) {
    let mut lines = top.lines();
    let total = lines
        .find(|l| l.starts_with("Showing nodes accounting for"))
        .unwrap_or_else(|| panic!("no total in {top}"))
        .to_string();
    lines.find(|l| l.trim_start().starts_with("flat"));
    let first = lines.next().unwrap_or_else(|| panic!("no entry in {top}"));
    let f: Vec<&str> = first.split_whitespace().collect();
    (f[0].to_string(), f[5..].join(" "), total)
}

#[test]
fn pprof_profile_reads_in_go_tool_pprof_with_kals_numbers() {
    if !have_command("go", "golang-go", "pprof_profile_reads_in_go_tool_pprof") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("lost.pb.gz");
    let j = run_outputs(dir.path(), &["--pprof", pb.to_str().unwrap()]);
    let pb = pb.to_str().unwrap();
    let top_leak = &j["leaks"][0];
    let function = top_leak["stack"][0]["function"].as_str().unwrap();
    assert_eq!(function, "leak_big");

    // Lost space is the default sample type: the top entry is kal's top record.
    let (flat, name, total) = top_entry(&pprof(&["-top", "-unit=B", pb]));
    assert_eq!(flat, format!("{}B", top_leak["bytes"]), "{name}");
    assert_eq!(name, function);
    let lost = totals(&j, "direct").0 + totals(&j, "indirect").0;
    assert!(total.contains(&format!("of {lost}B total")), "{total}");

    // With lines: the file and line kal names.
    let (_, name, _) = top_entry(&pprof(&["-top", "-lines", pb]));
    let line = line_of("outputs.c", "big");
    assert!(name.ends_with(&format!("outputs.c:{line}")), "{name}");

    // Objects, and every live block in use (the reachable ones too).
    let (flat, _, _) = top_entry(&pprof(&["-top", "-sample_index=lost_objects", pb]));
    assert_eq!(flat, top_leak["blocks"].to_string());
    let (_, _, total) = top_entry(&pprof(&[
        "-top",
        "-unit=B",
        "-sample_index=inuse_space",
        pb,
    ]));
    let inuse: u64 = ["direct", "indirect", "possible", "reachable"]
        .iter()
        .map(|k| totals(&j, k).0)
        .sum();
    assert!(totals(&j, "reachable").0 >= 128);
    assert!(total.contains(&format!("of {inuse}B total")), "{total}");

    // The mapping carries the program's build id.
    let raw = pprof(&["-raw", pb]);
    let prog = build("outputs.c", &[]);
    let notes = Command::new("readelf")
        .arg("-n")
        .arg(&prog)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&notes.stdout);
    let id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the test program has a build id");
    assert!(
        raw.lines()
            .any(|l| l.contains(prog.to_str().unwrap()) && l.contains(id)),
        "{raw}"
    );
}

/// `n` with thousands separators, as inferno writes counts (`24,876`).
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn flame_graph_shows_the_leaking_functions_and_the_lost_total() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("lost.svg");
    let j = run_outputs(dir.path(), &["--flamegraph", svg.to_str().unwrap()]);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    let lost = totals(&j, "direct").0 + totals(&j, "indirect").0;
    assert!(
        svg.contains(&format!(
            "<title>all ({} bytes, 100%)</title>",
            grouped(lost)
        )),
        "{svg}"
    );
    for rec in j["leaks"].as_array().unwrap() {
        let function = rec["stack"][0]["function"].as_str().unwrap();
        let bytes = grouped(rec["bytes"].as_u64().unwrap());
        assert!(
            svg.contains(&format!("<title>{function} ({bytes} bytes,")),
            "{function} {bytes}"
        );
    }
    assert!(svg.contains("leak_big") && svg.contains("leak_small"));
}

/// `outputs` running under `kal run`, fed lines on its stdin.
struct Grower {
    kal: std::process::Child,
    input: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
    pid: i32,
}

impl Grower {
    fn start() -> Grower {
        ensure_agent();
        let prog = build("outputs.c", &[]);
        let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
            .args(["run", "-q", "--error-exitcode", "0", "--"])
            .arg(&prog)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let input = kal.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(kal.stdout.take().unwrap());
        let pid = ready_pid(&mut out);
        Grower {
            kal,
            input,
            out,
            pid,
        }
    }

    /// Makes the program lose `n` more blocks of 1000 bytes at grow(), and waits for it.
    fn grow(&mut self, n: u32) {
        use std::io::{BufRead, Write};
        writeln!(self.input, "{n}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("grew {n}"));
    }

    /// `kal check PID --show-reachable --json FILE`.
    fn check(&self, file: &Path) -> Value {
        let out = kal(&[
            "check",
            &self.pid.to_string(),
            "-q",
            "--show-reachable",
            "--json",
            file.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(23),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
    }
}

impl Drop for Grower {
    fn drop(&mut self) {
        let _ = self.kal.kill();
        let _ = self.kal.wait();
        // SAFETY: ending the test's own program, by its pid.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

#[test]
fn diff_of_two_checks_names_the_growing_site_with_its_exact_growth() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let mut g = Grower::start();
    g.grow(2);
    let ja = g.check(&a);
    g.grow(3);
    let jb = g.check(&b);
    let line = line_of("outputs.c", "grow");
    let before = sum(&records_at(&ja, "direct", "outputs.c", line));
    let after = sum(&records_at(&jb, "direct", "outputs.c", line));
    assert_eq!((before, after), ((2000, 2), (5000, 5)));

    let d = dir.path().join("d.json");
    let svg = dir.path().join("d.svg");
    let out = kal(&[
        "diff",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
        d.to_str().unwrap(),
        "--flamegraph",
        svg.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dj: Value = serde_json::from_str(&std::fs::read_to_string(&d).unwrap()).unwrap();
    let top = &dj["grew"][0];
    let site = top["site"].as_str().unwrap();
    assert!(site.starts_with("grow ") && site.ends_with(&format!("outputs.c:{line}")));
    let grew = |what: &str| {
        (
            top[what]["grew"]["bytes"].as_i64().unwrap(),
            top[what]["grew"]["blocks"].as_i64().unwrap(),
        )
    };
    // The growth is exactly the difference of the two reports' records at that line.
    let exact = ((after.0 - before.0) as i64, (after.1 - before.1) as i64);
    assert_eq!(exact, (3000, 3));
    assert_eq!(grew("lost"), exact);
    assert_eq!(grew("live"), exact);
    assert_eq!(top["lost"]["after"]["bytes"], after.0);
    // Nothing else grew: the other sites leaked once, before the first check.
    assert_eq!(dj["grew"].as_array().unwrap().len(), 1, "{text}");
    let direct = &dj["summary"]["direct"];
    assert_eq!(direct["grew"]["bytes"], 3000);
    assert_eq!(
        direct["after"]["bytes"].as_u64(),
        Some(totals(&jb, "direct").0)
    );
    // The text says the same, the site's line first.
    let first = text
        .lines()
        .find(|l| l.trim_start().starts_with("lost +"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        first.starts_with("  lost +3000 bytes in +3 blocks (now 5000 bytes), live +3000 bytes")
            && first.ends_with(&format!("outputs.c:{line}")),
        "{text}"
    );
    // The differential flame graph has the growing function, the later total as width.
    let svg = std::fs::read_to_string(&svg).unwrap();
    let lost_after = totals(&jb, "direct").0 + totals(&jb, "indirect").0;
    assert!(svg.contains(&format!("<title>all ({} bytes", grouped(lost_after))));
    assert!(svg.contains("<title>grow ("), "{svg}");
}

/// The text a headless Chromium renders for the page at `path` (its DOM after scripts ran,
/// tags stripped).
fn chromium_text(path: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", path.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[test]
fn html_report_renders_in_chromium_with_the_top_leaks_file_and_line() {
    if !have_command("chromium", "chromium", "html_report_renders_in_chromium") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let j = run_outputs(dir.path(), &["--html", html.to_str().unwrap()]);
    let page = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing is fetched.
    for fetch in ["src=\"http", "href=\"http", "<link", "<script src"] {
        assert!(!page.contains(fetch), "{fetch}");
    }
    let text = chromium_text(&html);
    let top = &j["leaks"][0]["stack"][0];
    let at = format!("{}:{}", top["file"].as_str().unwrap(), top["line"]);
    assert!(at.ends_with(&format!("outputs.c:{}", line_of("outputs.c", "big"))));
    assert!(text.contains(&format!("leak_big {at}")), "{text}");
    // The summary's numbers, and the source line read from the file.
    let (bytes, blocks) = totals(&j, "direct");
    assert!(
        text.contains(&format!("definitely lost{bytes}{blocks}")),
        "{text}"
    );
    assert!(text.contains("sink = malloc(4096); /* @big */"), "{text}");
    assert!(text.contains("Lost bytes by allocation stack"));
    // One report, no periodic checks: no growth chart.
    assert!(!text.contains("Growth over"), "{text}");
}

#[test]
fn html_report_of_periodic_checks_has_the_growth_chart() {
    use std::io::Write;
    ensure_agent();
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let mut kal = Command::new(env!("CARGO_BIN_EXE_kal"))
        .args([
            "run",
            "-q",
            "--error-exitcode",
            "0",
            "--check-every",
            "100ms",
        ])
        .arg("--html")
        .arg(&html)
        .arg("--")
        .arg(build("outputs.c", &[]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = kal.stdin.take().unwrap();
    for _ in 0..5 {
        writeln!(input, "2").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    drop(input);
    let out = kal.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    let checks: usize = page
        .split("Growth over ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no growth chart: {page}"));
    // Checks every 100 ms for about 1.5 s, and the exit report.
    assert!(checks >= 4, "{checks}");
    // The chart ends at the exit report's lost bytes: 24876 before input, 10 × 1000 after.
    assert!(page.contains("lost: 34.1 KiB"), "{page}");
}

#[test]
fn without_the_agent_outputs_name_records_by_what_their_blocks_are() {
    // Started without kal: checked from glibc's heap, no allocation stacks.
    let mut prog = Command::new(build("outputs.c", &[]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = ready_pid(&mut std::io::BufReader::new(prog.stdout.take().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let (svg, pb) = (dir.path().join("l.svg"), dir.path().join("l.pb.gz"));
    let (out, j) = check_pid_json(
        pid,
        &[
            "-q",
            "--flamegraph",
            svg.to_str().unwrap(),
            "--pprof",
            pb.to_str().unwrap(),
        ],
    );
    let _ = prog.kill();
    let _ = prog.wait();
    assert_eq!(
        out.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The biggest record: leak_big's six blocks, by their usable size.
    let top = &j["leaks"][0];
    let size = top["contents"]["block_size"].as_u64().unwrap();
    assert_eq!(top["blocks"], 6);
    assert!((4096..4096 + 16).contains(&size), "{size}");
    let name = format!("(no stack: {size}-byte blocks)");
    let bytes = top["bytes"].as_u64().unwrap();
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.contains(&format!("<title>{name} ({} bytes,", grouped(bytes))),
        "{svg}"
    );
    if have_command("go", "golang-go", "without_the_agent_outputs (pprof part)") {
        let (flat, entry, _) = top_entry(&pprof(&["-top", "-unit=B", pb.to_str().unwrap()]));
        assert_eq!((flat, entry), (format!("{bytes}B"), name));
    }
}
