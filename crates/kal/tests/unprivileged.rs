//! kal as a normal user on the user's own programs: `kal run --check-every`, `kal check`,
//! `kal trim` and `kal reclaim` work without privileges (nothing kal reads needs
//! CAP_SYS_ADMIN), and what only root can do (parking: userfaultfd) is said in one line.

mod common;
use common::*;
use serde_json::Value;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The user these tests run kal and the programs as (no passwd entry needed).
const USER: u32 = 64303;

/// A directory the user can read and run everything from: kal, its agent and the test
/// programs copied there (mode 755), and `out/`, owned by the user, for reports.
struct Kit {
    dir: tempfile::TempDir,
}

impl Kit {
    fn new(programs: &[&str]) -> Kit {
        require_command("setpriv", "util-linux");
        ensure_agent();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let kal = Path::new(env!("CARGO_BIN_EXE_kal"));
        std::fs::copy(kal, p.join("kal")).unwrap();
        std::fs::copy(
            kal.with_file_name("libkal_agent.so"),
            p.join("libkal_agent.so"),
        )
        .unwrap();
        for name in programs {
            let built = build(name, &[]);
            std::fs::copy(&built, p.join(built.file_name().unwrap())).unwrap();
        }
        let out = p.join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::chown(&out, Some(USER), Some(USER)).unwrap();
        Kit { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kal ARGS` as the user.
    fn kal(&self) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={USER}"))
            .arg(format!("--regid={USER}"))
            .arg("--clear-groups")
            .arg(self.path("kal"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.kal().args(args).output().unwrap()
    }

    /// `kal check PID --json` as the user: kal's output and the report.
    fn check(&self, pid: i32) -> (Output, Value) {
        let json = self.path("out/check.json");
        let _ = std::fs::remove_file(&json);
        let out = self.run(&["check", &pid.to_string(), "--json", json.to_str().unwrap()]);
        let text = std::fs::read_to_string(&json).unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "bad JSON ({e}): {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out, v)
    }
}

#[test]
fn check_every_as_a_normal_user_reports_exactly() {
    let kit = Kit::new(&["trickle.c"]);
    let json = kit.path("out/checks.jsonl");
    let out = kit.run(&[
        "run",
        "-q",
        "--check-every",
        "250ms",
        "--json",
        json.to_str().unwrap(),
        "--",
        kit.path("trickle").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(23), "{out:?}");
    let lines = read_json_lines(&json);
    assert!(
        lines.iter().filter(|l| l.get("check").is_some()).count() >= 2,
        "{lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["at_exit"], true);
    assert_eq!(totals(last, "direct"), (6000, 60));
}

#[test]
fn check_trim_and_reclaim_as_a_normal_user() {
    let kit = Kit::new(&["live_leaker.c"]);
    let mut run = kit
        .kal()
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(kit.path("live_leaker"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let pid = ready_pid(&mut out);
    let _kill = KillOnDrop(pid);
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let line = line_of("live_leaker.c", "live_leak");

    let (o, v) = kit.check(pid);
    assert_eq!(o.status.code(), Some(23), "leaks found: {o:?}");
    assert_eq!(totals(&v, "direct"), (3500, 5));
    assert_eq!(
        sum(&records_at(&v, "direct", "live_leaker.c", line)),
        (3500, 5)
    );
    assert_eq!(totals(&v, "reachable").1, 4, "{v}");
    assert_eq!(v["tracking_complete"], true);

    let o = kit.run(&["trim", &pid.to_string()]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&format!("kal trim {pid}: RSS")));

    // Parking needs a userfaultfd, which only root gets here: one line says so and what
    // to do instead; nothing is parked.
    let o = kit.run(&["reclaim", &pid.to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("userfaultfd is not available"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("--free-sites"), "{err}");
    assert!(err.contains("parked 0 bytes of 0 blocks"), "{err}");

    // Freeing works as the user.
    let o = kit.run(&[
        "reclaim",
        &pid.to_string(),
        "--mode",
        "free",
        "--free-sites",
        "*",
        "--free-after",
        "500ms",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("freed 3500 bytes in 5 blocks"), "{err}");
    let (_, v) = kit.check(pid);
    assert_eq!(totals(&v, "direct"), (0, 0));
    assert_eq!(totals(&v, "reachable").1, 4, "{v}");
    // SAFETY: ending the program this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    run.wait().unwrap();
}
