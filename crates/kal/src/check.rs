//! `kal check PID`: one live leak check of a process started under `kal run`, from a
//! copy-on-write snapshot; the program is paused only while the copy is made.

use crate::act::report::{self, Report};
use crate::blocks::Block;
use crate::capture::{capture_from, Capture};
use crate::reach::Kind;
use anyhow::Result;
use std::time::Instant;

/// The outcome of one check.
pub struct Check {
    /// The report (with `pause_ms` and `scan_ms`).
    pub report: Report,
    /// Definitely and indirectly lost blocks with their class (for "what is new").
    pub lost: Vec<(Block, Kind)>,
    /// The capture the report came from.
    pub capture: Capture,
}

impl Check {
    /// The check of `capture`, classified as `kinds`, reported as `report`.
    pub fn new(report: Report, kinds: &[Kind], capture: Capture) -> Check {
        let lost = capture
            .blocks
            .iter()
            .zip(kinds)
            .filter(|(_, k)| matches!(k, Kind::Direct | Kind::Indirect))
            .map(|(b, k)| (*b, *k))
            .collect();
        Check {
            report,
            lost,
            capture,
        }
    }
}

/// Checks process `pid` once (without an agent in it, from glibc's own heap: see
/// [`crate::capture::agentless`]).
pub fn check(pid: i32, opts: &report::Options) -> Result<Check> {
    let header = match crate::agent::find_header(pid) {
        Ok(h) => h,
        Err(_) if crate::capture::agentless::has_no_agent(pid) => {
            return crate::capture::agentless::check(pid, opts)
        }
        Err(e) => return Err(e),
    };
    check_with_header(pid, header, opts, &Default::default())
}

/// Checks process `pid` whose agent header address is already known. A dying process
/// (see [`crate::capture::fatal`]) is not checked: the error is a [`crate::capture::fatal::Crashing`].
/// `reclaimed_sites`: what this kal reclaimed in the process so far, by stack id.
pub fn check_with_header(
    pid: i32,
    header: u64,
    opts: &report::Options,
    reclaimed_sites: &std::collections::HashMap<u32, report::Totals>,
) -> Result<Check> {
    crate::capture::fatal::ensure_not_dying(pid)?;
    // An attached process's blocks from before the attach come from a heap walk: a copy
    // taken while a thread was inside the allocator is taken again a moment later.
    let mut attempt = 0;
    let (snap, pause, started, scanned) = loop {
        let mut snap = crate::capture::snapshot::take(pid, header, opts.no_interrupt)?;
        let pause = snap.pause;
        crate::capture::snapshot::test_hold("snapshot");
        let started = Instant::now();
        // Blocks are read from the snapshot copy as they are reached: scan before
        // releasing it.
        let extras = std::mem::take(&mut snap.extras);
        let captured = capture_from(pid, snap.child, snap.threads.clone(), header, extras);
        let transient = captured
            .as_ref()
            .is_ok_and(|c| c.gaps.unread.iter().any(|g| g.transient));
        if transient && attempt < crate::capture::agentless::TRANSIENT_RETRIES {
            snap.release()?;
            attempt += 1;
            std::thread::sleep(std::time::Duration::from_millis(2 * u64::from(attempt)));
            continue;
        }
        let scanned = captured.map(|cap| {
            let kinds = crate::classify_with(&cap, &opts.suppressions);
            // What the blocks from before an attach are, read while the copy is there.
            let described =
                crate::blocks::before_attach::describe(&cap, &kinds, opts.show_reachable);
            (cap, kinds, described)
        });
        break (snap, pause, started, scanned);
    };
    let scan = started.elapsed();
    let released = snap.release();
    let (cap, kinds, described) = scanned?;
    released?;
    let built = Instant::now();
    let mut report = report::build(
        &cap,
        &kinds,
        &crate::attribute::symbolize::Symbols::new(),
        opts,
        reclaimed_sites,
    );
    if crate::debug::timing() {
        crate::say!(
            "timing: report built in {:.1} ms (grouping, symbols)",
            built.elapsed().as_secs_f64() * 1e3
        );
    }
    report.pause_ms = Some(pause.as_secs_f64() * 1e3);
    report.scan_ms = Some(scan.as_secs_f64() * 1e3);
    crate::blocks::before_attach::relabel(&mut report, &cap, described);
    Ok(Check::new(report, &kinds, cap))
}
