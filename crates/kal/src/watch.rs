//! `kal watch PID`: checks a process every so often (the same check as `kal check`, so it
//! works under `kal run`, attached, or without the agent), keeps its growth
//! ([`crate::act::forecast`]), shows it, exports it ([`crate::act::metrics`]), and says
//! when the process will reach its memory limit.
//!
//! On a terminal the view is redrawn after each check; otherwise one line a check, or one
//! JSON document a line with `json`.

use crate::act::forecast::{human_bytes, human_seconds, Forecast, Tracker};
use crate::act::metrics::Metrics;
use crate::act::report::{self, Report, Totals};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The exit status of `kal watch` when the forecast falls below `--warn-before`.
pub const WARN_STATUS: i32 = 24;

/// What `kal watch` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Time between checks.
    pub every: Duration,
    /// Stop after this many checks.
    pub count: Option<u64>,
    /// Stop, with [`WARN_STATUS`], once the limit is forecast nearer than this.
    pub warn_before: Option<Duration>,
    /// JSON Lines on stdout instead of text.
    pub json: bool,
    /// How checks are reported (still-reachable records are always listed: live bytes
    /// per site need them).
    pub report: report::Options,
    /// Metrics to update after each check (`--prometheus`).
    pub metrics: Option<Arc<Metrics>>,
}

/// Why watching stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// `count` checks were done.
    Count,
    /// The process ended (or is dying of a signal): why.
    Gone(String),
    /// The limit is forecast sooner than `warn_before`.
    Warned {
        /// Seconds to the limit.
        seconds: f64,
    },
}

/// One check, as a JSON line.
#[derive(Serialize)]
struct Line<'a> {
    check: u64,
    time: String,
    pid: i32,
    program: &'a str,
    rss_bytes: u64,
    vm_bytes: u64,
    live_bytes: u64,
    lost_bytes: u64,
    direct: Totals,
    indirect: Totals,
    possible: Totals,
    retained_bytes: u64,
    reclaimed: Reclaimed,
    lost_reliable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scan_ms: Option<f64>,
    forecast: &'a Forecast,
}

/// Reclaimed memory, by how.
#[derive(Serialize)]
struct Reclaimed {
    parked_bytes: u64,
    freed_bytes: u64,
    restored_bytes: u64,
}

/// Watches process `pid` until `opts.count` checks, its end, or a warning. Views and lines
/// go to stdout; a failed check after the first is said on stderr and watching goes on.
pub fn watch(pid: i32, opts: &Options) -> Result<End> {
    let report_opts = report::Options {
        show_reachable: true,
        ..opts.report.clone()
    };
    let tty = !opts.json && std::io::stdout().is_terminal();
    let mut tracker = Tracker::new();
    let start = Instant::now();
    let mut n = 0u64;
    let mut due = 0u64;
    loop {
        let at = Instant::now();
        let c = match crate::check::check(pid, &report_opts) {
            Ok(c) => c,
            Err(e) => {
                // A PID that is wrong from the start is an error, as for `kal check`.
                if n == 0 {
                    return Err(e);
                }
                if let Some(why) = gone(pid, &e) {
                    return Ok(End::Gone(why));
                }
                crate::say!("kal watch {pid}: check failed: {e:#}");
                due += 1;
                sleep_until(start, opts.every, &mut due);
                continue;
            }
        };
        n += 1;
        let r = &c.report;
        let f = tracker.observe(pid, r, at);
        if let Some(m) = &opts.metrics {
            m.observe(pid, r, Some(&f));
        }
        let time = crate::run::periodic::timestamp(SystemTime::now());
        let vm = tracker
            .growth(pid)
            .and_then(|g| g.last())
            .map(|p| p.vm_bytes)
            .unwrap_or(0);
        let out = if opts.json {
            json_line(n, &time, r, vm, &f)?
        } else if tty {
            view(n, &time, r, &f, opts.every)
        } else {
            line(n, &time, r, &f)
        };
        let mut so = std::io::stdout().lock();
        // A closed stdout (`| head`) ends watching quietly.
        if so
            .write_all(out.as_bytes())
            .and_then(|_| so.flush())
            .is_err()
        {
            return Ok(End::Count);
        }
        drop(so);
        if let (Some(wb), Some(s)) = (opts.warn_before, f.seconds_to_limit) {
            if s < wb.as_secs_f64() {
                crate::say!(
                    "kal watch {pid}: WARNING: {} reached in {} (below --warn-before {}){}",
                    f.limit
                        .as_ref()
                        .map(|l| format!("{} {}", l.kind, human_bytes(l.limit_bytes as f64)))
                        .unwrap_or_default(),
                    human_seconds(Some(s)),
                    human_seconds(Some(wb.as_secs_f64())),
                    f.site
                        .as_ref()
                        .map(|s| format!("; most responsible: {}", s.site))
                        .unwrap_or_default()
                );
                return Ok(End::Warned { seconds: s });
            }
        }
        if opts.count.is_some_and(|c| n >= c) {
            return Ok(End::Count);
        }
        due += 1;
        sleep_until(start, opts.every, &mut due);
    }
}

/// Why a failed check means the process is gone, if it does.
fn gone(pid: i32, e: &anyhow::Error) -> Option<String> {
    if let Some(c) = e.downcast_ref::<crate::capture::fatal::Crashing>() {
        return Some(c.to_string());
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() || crate::capture::fatal::ended(pid)
    {
        return Some(format!("process {pid} ended"));
    }
    crate::capture::fatal::dying(pid)
        .map(|why| crate::capture::fatal::Crashing { pid, why }.to_string())
}

/// Sleeps until check number `due` is due (`start + due * every`); checks whose time has
/// passed are skipped, never queued.
fn sleep_until(start: Instant, every: Duration, due: &mut u64) {
    let now = start.elapsed();
    let at = |k: u64| every.saturating_mul(k.min(u32::MAX as u64) as u32);
    while at(*due) < now {
        *due += 1;
    }
    std::thread::sleep(at(*due) - now);
}

fn lost(r: &Report) -> u64 {
    r.summary.direct.bytes + r.summary.indirect.bytes
}

fn json_line(n: u64, time: &str, r: &Report, vm: u64, f: &Forecast) -> Result<String> {
    let rc = &r.reclaimed;
    let mut s = serde_json::to_string(&Line {
        check: n,
        time: time.to_string(),
        pid: r.pid,
        program: &r.program,
        rss_bytes: r.memory.rss_bytes,
        vm_bytes: vm,
        live_bytes: r.memory.live_bytes,
        lost_bytes: lost(r),
        direct: r.summary.direct,
        indirect: r.summary.indirect,
        possible: r.summary.possible,
        retained_bytes: r.memory.retained_bytes,
        reclaimed: Reclaimed {
            parked_bytes: rc.parked_now_bytes,
            freed_bytes: rc.freed_bytes,
            restored_bytes: rc.restored_bytes,
        },
        lost_reliable: r.lost_reliable,
        pause_ms: r.pause_ms,
        scan_ms: r.scan_ms,
        forecast: f,
    })?;
    s.push('\n');
    Ok(s)
}

/// "cgroup_v1 512.0 MiB reached in 1m40s" or "no limit in sight".
pub fn limit_phrase(f: &Forecast) -> String {
    match (&f.limit, f.seconds_to_limit) {
        (Some(l), Some(s)) => format!(
            "{} {} reached in {}",
            l.kind,
            human_bytes(l.limit_bytes as f64),
            human_seconds(Some(s))
        ),
        (Some(l), None) if f.rss_bytes_per_second.is_some() => format!(
            "{} {} ({} left): not growing toward it",
            l.kind,
            human_bytes(l.limit_bytes as f64),
            human_bytes(l.limit_bytes.saturating_sub(l.usage_bytes) as f64)
        ),
        _ => format!(
            "no forecast yet ({} of {} checks)",
            f.points,
            crate::act::forecast::MIN_POINTS
        ),
    }
}

fn rate(b: Option<f64>) -> String {
    match b {
        Some(v) => format!(
            "{}{}/s",
            if v >= 0.0 { "+" } else { "-" },
            human_bytes(v.abs())
        ),
        None => "?".into(),
    }
}

/// One line a check (stdout not a terminal).
fn line(n: u64, time: &str, r: &Report, f: &Forecast) -> String {
    let s = &r.summary;
    let mut o = format!(
        "[{time}] =={}== kal watch {n}: RSS {}, live {}, lost {} (direct {}, indirect {}){}, retained {}, reclaimed {}; growth RSS {} lost {}; {}",
        r.pid,
        human_bytes(r.memory.rss_bytes as f64),
        human_bytes(r.memory.live_bytes as f64),
        human_bytes(lost(r) as f64),
        human_bytes(s.direct.bytes as f64),
        human_bytes(s.indirect.bytes as f64),
        if r.lost_reliable { "" } else { " (unreliable: see kal check)" },
        human_bytes(r.memory.retained_bytes as f64),
        human_bytes((r.reclaimed.freed_bytes + r.reclaimed.parked_now_bytes) as f64),
        rate(f.rss_bytes_per_second),
        rate(f.lost_bytes_per_second),
        limit_phrase(f),
    );
    if let Some(site) = &f.site {
        let _ = write!(
            o,
            "; top site {} ({} live, {} lost)",
            site.site,
            rate(Some(site.live_bytes_per_second)),
            rate(Some(site.lost_bytes_per_second))
        );
    }
    o.push('\n');
    o
}

/// The compact view redrawn on a terminal.
fn view(n: u64, time: &str, r: &Report, f: &Forecast, every: Duration) -> String {
    let s = &r.summary;
    let rc = &r.reclaimed;
    let mut o = String::from("\x1b[H\x1b[2J");
    let _ = writeln!(
        o,
        "kal watch {} ({})  check {n} at {time}, every {every:?}  (Ctrl-C stops)",
        r.pid, r.program,
    );
    let _ = writeln!(
        o,
        "RSS {:>10}   live {:>10}   lost {:>10} (direct {}, indirect {}, possibly {}){}",
        human_bytes(r.memory.rss_bytes as f64),
        human_bytes(r.memory.live_bytes as f64),
        human_bytes(lost(r) as f64),
        human_bytes(s.direct.bytes as f64),
        human_bytes(s.indirect.bytes as f64),
        human_bytes(s.possible.bytes as f64),
        if r.lost_reliable {
            ""
        } else {
            "  UNRELIABLE (see kal check)"
        }
    );
    let _ = writeln!(
        o,
        "retained {} (free memory the allocator keeps)   reclaimed: parked {}, freed {}, restored {}   paused {:.2} ms",
        human_bytes(r.memory.retained_bytes as f64),
        human_bytes(rc.parked_now_bytes as f64),
        human_bytes(rc.freed_bytes as f64),
        human_bytes(rc.restored_bytes as f64),
        r.pause_ms.unwrap_or(0.0)
    );
    let _ = writeln!(
        o,
        "growth: RSS {}, lost {} ({} checks over {})",
        rate(f.rss_bytes_per_second),
        rate(f.lost_bytes_per_second),
        f.points,
        human_seconds(Some(f.window_seconds))
    );
    let _ = writeln!(o, "time to OOM: {}", limit_phrase(f));
    if f.sites.is_empty() {
        let _ = writeln!(o, "no growing site");
    } else {
        let _ = writeln!(
            o,
            "top growing sites:\n  {:>12} {:>12} {:>10}  site",
            "live/s", "lost/s", "live now"
        );
        for site in &f.sites {
            let _ = writeln!(
                o,
                "  {:>12} {:>12} {:>10}  {}",
                rate(Some(site.live_bytes_per_second)),
                rate(Some(site.lost_bytes_per_second)),
                human_bytes(site.live_bytes as f64),
                site.site
            );
        }
    }
    o
}
