//! `cargo install --path crates/kal` gives a `kal` binary and nothing else: its agent is
//! embedded and written out at first use to `/var/tmp/kal-agent-UID` (0711, the user's
//! own), checked byte for byte on later uses, and never taken from a directory someone
//! else made.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The user that runs the lone kal (its own agent directory).
const UID: u32 = 64310;
/// A user whose agent directory someone else created first.
const SQUATTED_UID: u32 = 64311;

/// `kal` copied alone into a fresh directory that any user may read.
fn lone_kal() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kal = dir.path().join("kal");
    std::fs::copy(env!("CARGO_BIN_EXE_kal"), &kal).unwrap();
    assert!(!dir.path().join("libkal_agent.so").exists());
    (dir, kal)
}

/// `kal ARGS` run as `uid` (group the same number, no supplementary groups).
fn kal_as(uid: u32, kal: &Path, args: &[&str]) -> Output {
    require_command("setpriv", "util-linux");
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(kal)
        .args(args)
        .env_remove("KAL_AGENT")
        .output()
        .unwrap()
}

fn agent_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect()
}

#[test]
fn a_kal_binary_alone_writes_out_its_agent_once_and_reports_exactly() {
    let prog = build("alone.c", &[]);
    let (_keep, kal) = lone_kal();
    let agents = PathBuf::from(format!("/var/tmp/kal-agent-{UID}"));
    let _ = std::fs::remove_dir_all(&agents);
    let out_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let json = out_dir.path().join("r.json");
    let line = line_of("alone.c", "alone_leak");
    let mut written: Option<Vec<u8>> = None;
    for round in 0..3 {
        let out = kal_as(
            UID,
            &kal,
            &[
                "run",
                "-q",
                "--json",
                json.to_str().unwrap(),
                "--",
                prog.to_str().unwrap(),
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(23),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(totals(&report, "direct"), (300, 3), "round {round}");
        assert_eq!(
            sum(&records_at(&report, "direct", "alone.c", line)),
            (300, 3)
        );
        // The directory is the user's, 0711; one agent file in it, readable by all.
        let md = std::fs::symlink_metadata(&agents).unwrap();
        assert!(md.is_dir());
        assert_eq!((md.uid(), md.mode() & 0o7777), (UID, 0o711));
        let files = agent_files(&agents);
        assert_eq!(files.len(), 1, "{files:?}");
        let f = std::fs::metadata(&files[0]).unwrap();
        assert_eq!((f.uid(), f.mode() & 0o777), (UID, 0o644));
        let bytes = std::fs::read(&files[0]).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        // The same bytes every round (after round 1's damage too).
        assert!(
            written.get_or_insert_with(|| bytes.clone()) == &bytes,
            "round {round}"
        );
        if round == 1 {
            // Damaged since: replaced by the embedded bytes at the next use.
            let mut bytes = std::fs::read(&files[0]).unwrap();
            bytes[1000] ^= 0xff;
            std::fs::write(&files[0], &bytes).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&agents);
}

#[test]
fn an_agent_directory_made_by_someone_else_is_refused_in_one_line() {
    let prog = build("alone.c", &[]);
    let (_keep, kal) = lone_kal();
    let agents = PathBuf::from(format!("/var/tmp/kal-agent-{SQUATTED_UID}"));
    let _ = std::fs::remove_dir_all(&agents);
    // Made first by root (another user than the one running kal), open to all.
    std::fs::create_dir(&agents).unwrap();
    std::fs::set_permissions(&agents, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = kal_as(SQUATTED_UID, &kal, &["run", "--", prog.to_str().unwrap()]);
    one_line_error(&out, &format!("kal-agent-{SQUATTED_UID}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to uid 0"), "{err}");
    assert!(agent_files(&agents).is_empty());
    std::fs::remove_dir_all(&agents).unwrap();
}

/// The program's ready line, read from `out`.
fn ready(out: &mut std::io::BufReader<std::process::ChildStdout>) -> i32 {
    use std::io::BufRead;
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("ready ")
        .expect("ready line")
        .parse()
        .unwrap()
}

/// `KAL check PID --json`: the report, after asserting kal succeeded.
fn lone_check(kal: &Path, pid: i32) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("now.json");
    let out = Command::new(kal)
        .args([
            "check",
            &pid.to_string(),
            "-q",
            "--error-exitcode",
            "0",
            "--json",
        ])
        .arg(&json)
        .env_remove("KAL_AGENT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kal check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn a_kal_binary_alone_and_renamed_checks_and_attaches_with_its_written_out_agent() {
    // The agent written out is `libkal_agent-HASH.so`: checks and attach must know it by
    // that name too, and a kal installed under another name must still lend the processes
    // it traces to a check.
    let prog = build("live_leaker.c", &[]);
    let (_keep, kal) = lone_kal();
    let renamed = kal.with_file_name("kal-installed");
    std::fs::rename(&kal, &renamed).unwrap();
    let line = line_of("live_leaker.c", "live_leak");

    let mut run = Command::new(&renamed)
        .args(["run", "-q", "--error-exitcode", "0", "--"])
        .arg(&prog)
        .env_remove("KAL_AGENT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(run.stdout.take().unwrap());
    let pid = ready(&mut out);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/libkal_agent-"), "{maps}");
    let report = lone_check(&renamed, pid);
    assert_eq!(totals(&report, "direct"), (3500, 5));
    assert_eq!(
        sum(&records_at(&report, "direct", "live_leaker.c", line)),
        (3500, 5)
    );
    // SAFETY: ending our own test program.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = run.wait();

    // A program started without kal, attached by the lone kal.
    let mut plain = Command::new(&prog)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(plain.stdout.take().unwrap());
    let pid = ready(&mut out);
    let attached = Command::new(&renamed)
        .args(["attach", &pid.to_string()])
        .env_remove("KAL_AGENT")
        .output()
        .unwrap();
    assert!(
        attached.status.success(),
        "kal attach: {}",
        String::from_utf8_lossy(&attached.stderr)
    );
    let report = lone_check(&renamed, pid);
    // Its five leaks came before the attach: found by the heap walk, at usable size.
    assert_eq!(totals(&report, "direct").1, 5, "{report}");
    let _ = plain.kill();
    let _ = plain.wait();
}
