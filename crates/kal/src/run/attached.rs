//! `kal run --check-every D --attach PID`: periodic checks (and `--reclaim`) of a process
//! that was started without kal. The agent is loaded first if it is not there
//! ([`crate::agent::attach`]); then the process is checked as `kal run` checks its own
//! processes ([`crate::run::periodic`]), until it ends or kal is interrupted. The agent stays
//! attached when kal stops (`kal detach PID` takes it out): parked pages stay parked, and
//! restored on touch, only while it is there.

use crate::run::periodic::Periodic;
use crate::run::RunOptions;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Whether process `pid` still runs (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Checks process `pid` every `opts.check_every` (attaching the agent first if needed)
/// until it ends or kal gets SIGINT or SIGTERM. Returns kal's exit status: 0, or
/// `opts.error_exitcode` when the last check found something definitely lost.
pub fn run(opts: &RunOptions, pid: i32) -> Result<i32> {
    let Some(every) = opts.check_every else {
        bail!("--attach needs --check-every");
    };
    match crate::agent::attach::agent_state(pid) {
        Err(_) | Ok(None) | Ok(Some(2)) => {
            let a = crate::agent::attach::attach(pid, &crate::run::find_agent()?)?;
            crate::say!(
                "kal: attached to process {pid}: {} GOT slots redirected, program paused {:.2} ms",
                a.slots,
                a.pause.as_secs_f64() * 1e3
            );
            if a.jemalloc {
                crate::say!(
                    "kal: process {pid} allocates with jemalloc: {}; nothing is reclaimed",
                    crate::blocks::before_attach::JEMALLOC_GAP
                );
            }
        }
        Ok(Some(0)) => bail!(
            "process {pid} runs under kal run already (its agent was preloaded): that kal checks it"
        ),
        Ok(Some(crate::agent::attach::NO_STATIC_TLS)) => {
            bail!("{}", crate::agent::attach::no_static_tls(pid))
        }
        Ok(Some(_)) => crate::say!("kal: process {pid} is attached already"),
    }
    let header = crate::agent::find_header(pid)?;
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let pacer = crate::run::pace::Pacer::new(every, opts.max_cpu_percent);
    let mut periodic = Periodic::new(pacer, opts.report.clone(), opts.outputs.json.clone())
        .with_reclaim(opts.reclaim.clone())
        .with_files(&opts.outputs, pid);
    let mut lost = false;
    while !STOP.load(Ordering::Relaxed) && alive(pid) {
        if periodic.pacer.due(Instant::now()) {
            let round = periodic.pacer.begin();
            match periodic.check(pid, header, !opts.outputs.text, &round) {
                Ok(direct) => lost = direct,
                Err(e) if alive(pid) => crate::say!("kal: check of process {pid} failed: {e:#}"),
                Err(_) => {}
            }
            periodic.pacer.end(round);
        }
        let until = periodic.pacer.until_due(Instant::now());
        std::thread::sleep(until.min(Duration::from_millis(50)));
    }
    if alive(pid) {
        crate::say!("kal: stopped checking process {pid}; its agent stays attached (kal detach {pid} takes it out)");
    } else {
        crate::say!("kal: process {pid} ended");
    }
    Ok(if lost { opts.error_exitcode } else { 0 })
}
