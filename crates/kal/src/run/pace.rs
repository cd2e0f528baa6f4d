//! When periodic checks run (`--check-every D`, `--max-cpu PERCENT`).
//!
//! Checks are due on a fixed grid, every `D`. A round of checks still running when the next
//! is due makes that one **skipped**, never queued: the next round runs at the first grid
//! point after it ends, and the number skipped is reported with it. And kal paces itself:
//! a round that cost `c` seconds of kal's CPU time (user + system) is followed by at least
//! `c / cap` seconds between its start and the next round's, so kal's CPU time over wall
//! time stays under the cap (a fraction of one core) on average; a round delayed for that
//! says by how much.

use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// The default `--max-cpu`: a quarter of one core.
pub const DEFAULT_MAX_CPU_PERCENT: f64 = 25.0;

/// Parses `--max-cpu PERCENT` (`25`, `12.5`, `25%`): a percentage of one core, above 0.
pub fn parse_percent(s: &str) -> Result<f64> {
    let t = s.trim().trim_end_matches('%');
    match t.parse::<f64>() {
        Ok(p) if p > 0.0 && p.is_finite() => Ok(p),
        _ => bail!("invalid CPU percentage {s:?}: give a number above 0, e.g. 25 or 12.5"),
    }
}

/// CPU time this process has used so far (user + system, all threads).
pub fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What a round of checks reports about its own scheduling.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Round {
    /// Due checks skipped since the previous round because a round was still running.
    pub skipped: u64,
    /// How long this round was held back to keep kal under its CPU cap.
    pub delayed: Duration,
    started: Option<(Instant, Duration)>,
}

/// The schedule of periodic checks.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Interval between checks.
    pub every: Duration,
    /// CPU cap, as a fraction of one core (0.25 for `--max-cpu 25`).
    pub max_cpu: f64,
    next: Instant,
    grid: Instant,
    skipped: u64,
    delayed: Duration,
}

impl Pacer {
    /// Checks every `every`, the first one `every` from now, kal's CPU kept under
    /// `max_cpu_percent` % of one core.
    pub fn new(every: Duration, max_cpu_percent: f64) -> Pacer {
        let first = Instant::now() + every;
        Pacer {
            every,
            max_cpu: max_cpu_percent / 100.0,
            next: first,
            grid: first,
            skipped: 0,
            delayed: Duration::ZERO,
        }
    }

    /// Whether a round is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// How long until the next round is due (zero if it is).
    pub fn until_due(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// Starts a round: what it should report about the checks before it.
    pub fn begin(&mut self) -> Round {
        Round {
            skipped: std::mem::take(&mut self.skipped),
            delayed: std::mem::take(&mut self.delayed),
            started: Some((Instant::now(), cpu_time())),
        }
    }

    /// Ends a round: counts the grid points that passed while it ran (skipped) and sets
    /// when the next one runs.
    pub fn end(&mut self, round: Round) {
        let (t0, cpu0) = round.started.unwrap_or((Instant::now(), cpu_time()));
        self.schedule(t0, Instant::now(), cpu_time().saturating_sub(cpu0));
    }

    /// The scheduling rule, given the round's start, end and CPU cost.
    fn schedule(&mut self, t0: Instant, t1: Instant, cpu: Duration) {
        // Grid points after the one that started this round, up to its end, came due while
        // it ran (or while kal was busy before it): skipped.
        let every = self.every.as_nanos().max(1);
        let behind = t1.saturating_duration_since(self.grid).as_nanos() / every;
        self.skipped += behind as u64;
        let tick = self.grid + Duration::from_nanos(((behind + 1) * every) as u64);
        let earliest = t0.checked_add(cpu.div_f64(self.max_cpu)).unwrap_or(tick);
        if earliest > tick {
            self.delayed = earliest - tick;
            self.next = earliest;
            self.grid = earliest;
        } else {
            self.next = tick;
            self.grid = tick;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_long_round_skips_the_checks_due_meanwhile() {
        let mut p = Pacer::new(100 * MS, 100.0);
        let g = p.grid;
        // 350 ms with little CPU: the points at +100, +200 and +300 ms passed meanwhile.
        p.schedule(g, g + 350 * MS, 10 * MS);
        assert_eq!(p.skipped, 3);
        assert_eq!(p.next, g + 400 * MS);
        assert_eq!(p.delayed, Duration::ZERO);
        let r = p.begin();
        assert_eq!((r.skipped, r.delayed), (3, Duration::ZERO));
        assert_eq!(p.skipped, 0, "reported once");
    }

    #[test]
    fn cpu_heavy_rounds_are_delayed_to_the_cap() {
        let mut p = Pacer::new(100 * MS, 25.0);
        let g = p.grid;
        // 50 ms of CPU at 25 %: the next round starts 200 ms after this one started.
        p.schedule(g, g + 50 * MS, 50 * MS);
        assert_eq!(p.skipped, 0);
        assert_eq!(p.next, g + 200 * MS);
        assert_eq!(p.delayed, 100 * MS);
        // A cheap round right after runs on the grid again.
        let g = p.grid;
        p.schedule(g, g + 5 * MS, MS);
        assert_eq!(p.next, g + 100 * MS);
    }

    #[test]
    fn percent_parsing() {
        assert_eq!(parse_percent("25").unwrap(), 25.0);
        assert_eq!(parse_percent("12.5%").unwrap(), 12.5);
        for bad in ["0", "-3", "x", "", "inf"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }
}
