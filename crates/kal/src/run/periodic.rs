//! `kal run --check-every D`: periodic live checks, each telling what is new since the last.

use crate::act::forecast::{human_bytes, Forecast, Tracker};
use crate::act::metrics::Metrics;
use crate::act::reclaim::{self, Policy};
use crate::act::report::{self, Report, Totals};
use crate::act::sink::{Context, Outputs, Point};
use crate::blocks::Block;
use crate::capture::fatal::Crashing;
use crate::check::{check_with_header, Check};
use crate::reach::Kind;
use crate::run::pace::{self, Pacer, Round};
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A check line says when the process reaches its memory limit only when that is nearer
/// than this (30 days), in seconds.
pub const FORECAST_LINE_WITHIN: f64 = 30.0 * 86400.0;

/// The longest duration accepted (a year): longer ones overflow clock arithmetic.
const MAX_DURATION_SECS: f64 = 8760.0 * 3600.0;

/// Parses `10s`, `500ms`, `2m`, `1h` (a number alone is seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration {s:?} (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("invalid duration {s:?} (try 10s, 500ms, 2m)"),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("invalid duration {s:?}: must be positive");
    }
    if secs > MAX_DURATION_SECS {
        bail!("invalid duration {s:?}: at most 8760h (a year)");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// RFC 3339 UTC timestamp of `t`, to the millisecond.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// What was new in one check.
#[derive(Debug, Default, Clone, Serialize)]
pub struct New {
    /// Newly definitely lost.
    pub direct: Totals,
    /// Newly indirectly lost.
    pub indirect: Totals,
}

/// One periodic check, as written to the JSON lines file.
#[derive(Serialize)]
struct Line<'a> {
    check: u64,
    time: String,
    new: &'a New,
    new_leaks: &'a [report::Record],
    /// Freed after this check.
    reclaimed_now: Totals,
    /// Parked after this check.
    parked_now: Totals,
    /// `--reclaim=dry-run`: what would have been parked (or freed) after this check.
    #[serde(skip_serializing_if = "Option::is_none")]
    would_reclaim: Option<Totals>,
    /// Why nothing is parked in this process, said once.
    #[serde(skip_serializing_if = "Option::is_none")]
    parking_unavailable: Option<&'a str>,
    /// Why nothing is reclaimed in this process (with `--reclaim`), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    reclaim_refused: Option<&'a str>,
    /// Stacks of sites contradicted since the previous check.
    new_contradictions: Vec<&'a [crate::attribute::symbolize::Frame]>,
    /// Due checks skipped since the previous one because a check was still running.
    skipped: u64,
    /// How long this check was held back to keep kal under `--max-cpu`.
    delayed_ms: f64,
    /// kal's own CPU time (user + system) for this check.
    cpu_ms: f64,
    /// Wall time of this check, start to end.
    wall_ms: f64,
    /// Growth over the recent checks of this process and when it reaches its memory limit.
    forecast: &'a Forecast,
    #[serde(flatten)]
    report: &'a Report,
}

/// One check's totals, `at` after the process's first check.
fn point(at: Duration, r: &Report) -> Point {
    Point {
        secs: at.as_secs_f64(),
        rss: r.memory.rss_bytes,
        live: r.memory.live_bytes,
        lost: r.summary.direct.bytes + r.summary.indirect.bytes,
    }
}

/// What tells a lost block from one check to the next: its sequence number, or for a
/// block from before an attach (which has none) its address, marked apart.
fn seen_key(b: &Block) -> u64 {
    if crate::blocks::before_attach::is_before(b) {
        b.addr | 1 << 63
    } else {
        b.seq
    }
}

/// State of periodic checking across processes.
pub struct Periodic {
    /// When checks run.
    pub pacer: Pacer,
    opts: report::Options,
    json: Option<PathBuf>,
    seen: HashMap<i32, HashSet<u64>>,
    count: u64,
    policy: Option<Policy>,
    /// Per process: contradicted sites (symbolized stacks) already reported.
    contradicted: HashMap<i32, Vec<Vec<crate::attribute::symbolize::Frame>>>,
    /// Processes found dying: never checked again.
    dying: HashSet<i32>,
    /// Per process: when it was first checked, and each check's totals since.
    history: HashMap<i32, (Instant, Vec<Point>)>,
    /// The file outputs rewritten after every check (pprof, flame graph, HTML), named for
    /// process `main_pid` (others get `FILE.PID`).
    files: Option<(Outputs, i32)>,
    /// Growth of each process, check by check.
    growth: Tracker,
    /// Prometheus metrics to update (`--prometheus`).
    metrics: Option<Arc<Metrics>>,
}

/// What one check produced, for its text line and JSON line.
struct Outcome<'a> {
    c: &'a Check,
    time: String,
    new: New,
    new_leaks: Vec<report::Record>,
    done: Option<reclaim::Done>,
    refused: Option<(String, bool)>,
    contradictions: Vec<&'a [crate::attribute::symbolize::Frame]>,
    round: Round,
    cpu: Duration,
    wall: Duration,
    forecast: Forecast,
}

impl Periodic {
    /// Periodic checks as `pacer` schedules them; JSON lines appended to `json` if given.
    pub fn new(pacer: Pacer, opts: report::Options, json: Option<PathBuf>) -> Periodic {
        Periodic {
            pacer,
            opts,
            json,
            seen: HashMap::new(),
            count: 0,
            policy: None,
            contradicted: HashMap::new(),
            dying: HashSet::new(),
            history: HashMap::new(),
            files: None,
            growth: Tracker::new(),
            metrics: None,
        }
    }

    /// Also update `metrics` after each check.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Periodic {
        self.metrics = metrics;
        self
    }

    /// Forgets the processes not in `pids` (they ended): their growth and their metrics.
    pub fn keep_only(&mut self, pids: &[i32]) {
        for pid in self.growth.pids() {
            if !pids.contains(&pid) {
                self.growth.forget(pid);
                if let Some(m) = &self.metrics {
                    m.forget(pid);
                }
            }
        }
    }

    /// Also rewrite the file outputs of `outputs` but text and JSON (pprof, flame graph,
    /// HTML) after every check, named for process `main_pid` (others get `FILE.PID`).
    pub fn with_files(mut self, outputs: &Outputs, main_pid: i32) -> Periodic {
        let files = Outputs {
            text: false,
            json: None,
            ..outputs.clone()
        };
        self.files = files.any().then_some((files, main_pid));
        self
    }

    /// Process `pid`'s totals at each check so far, then at `now` as `report` says.
    pub fn history_with(&self, pid: i32, report: &Report) -> Vec<Point> {
        let mut v = self
            .history
            .get(&pid)
            .map(|(_, h)| h.clone())
            .unwrap_or_default();
        if let Some((first, _)) = self.history.get(&pid) {
            v.push(point(first.elapsed(), report));
        }
        v
    }

    /// Also reclaim after each check, as `config` says (see [`reclaim::Policy`]).
    pub fn with_reclaim(mut self, config: Option<reclaim::Config>) -> Periodic {
        self.policy = config.map(Policy::new);
        self
    }

    /// What this kal reclaimed in process `pid`, by stack id.
    pub fn sites(&self, pid: i32) -> HashMap<u32, Totals> {
        self.policy
            .as_ref()
            .map(|r| r.sites(pid))
            .unwrap_or_default()
    }

    /// Adds what this kal parked in process `pid` to its report.
    pub fn annotate(&self, pid: i32, report: &mut Report) {
        if let Some(p) = &self.policy {
            p.annotate(pid, report);
        }
    }

    /// Checks one process now, in round `round`, and prints what is new. A process found
    /// dying of a signal is announced once and never checked (nor reclaimed in) again.
    /// Returns whether the check found something definitely lost.
    pub fn check(&mut self, pid: i32, header: u64, quiet: bool, round: &Round) -> Result<bool> {
        if self.dying.contains(&pid) {
            return Ok(false);
        }
        let (t0, cpu0) = (Instant::now(), pace::cpu_time());
        let sites = self.sites(pid);
        let mut c = match check_with_header(pid, header, &self.opts, &sites) {
            Ok(c) => c,
            Err(e) => return self.dying_or(pid, quiet, e).map(|()| false),
        };
        self.count += 1;
        let seen = self.seen.entry(pid).or_default();
        let fresh: Vec<(Block, Kind)> = c
            .lost
            .iter()
            .filter(|(b, _)| !seen.contains(&seen_key(b)))
            .copied()
            .collect();
        *seen = c.lost.iter().map(|(b, _)| seen_key(b)).collect();
        let (new, new_leaks) = self.new_records(&c, &fresh);
        let mut done = None;
        let mut refused = None;
        let agent = crate::agent::control::Agent::at(pid, header);
        let outcome = match (self.policy.as_mut(), agent) {
            (None, _) => None,
            (Some(p), Ok(a)) => Some(p.after_check(&a, &c)),
            (Some(_), Err(e)) => Some(reclaim::Outcome::Failed(e)),
        };
        match outcome {
            None => {}
            Some(reclaim::Outcome::Acted(d)) => done = Some(d),
            Some(reclaim::Outcome::Refused { reason, first }) => refused = Some((reason, first)),
            Some(reclaim::Outcome::Failed(e)) => {
                if let Err(e) = self.dying_or(pid, quiet, e) {
                    crate::say!("kal: reclaim in process {pid} failed: {e:#}");
                }
            }
        }
        self.annotate(pid, &mut c.report);
        let forecast = self.growth.observe(pid, &c.report, t0);
        if let Some(m) = &self.metrics {
            m.observe(pid, &c.report, Some(&forecast));
        }
        let contradictions = self.new_contradictions(pid, &c);
        let out = Outcome {
            c: &c,
            time: timestamp(SystemTime::now()),
            new,
            new_leaks,
            done,
            refused,
            contradictions,
            round: *round,
            cpu: pace::cpu_time().saturating_sub(cpu0),
            wall: t0.elapsed(),
            forecast,
        };
        if !quiet {
            crate::say_raw!("{}", self.text(&out));
        }
        if let Some(j) = &self.json {
            self.append_line(j, &out)?;
        }
        let (first, points) = self.history.entry(pid).or_insert_with(|| (t0, Vec::new()));
        points.push(point(t0.duration_since(*first), &c.report));
        if let Some((files, main_pid)) = &self.files {
            let files = if pid == *main_pid {
                files.clone()
            } else {
                files.for_process(pid)
            };
            let history = &self.history[&pid].1;
            if let Err(e) = files.write(&c.report, &Context { history }) {
                crate::say!("kal: {e:#}");
            }
        }
        Ok(c.report.summary.direct.blocks > 0)
    }

    /// Handles a failed check: a process that died meanwhile is let go quietly, a dying
    /// one is announced once and left alone; any other failure is returned.
    fn dying_or(&mut self, pid: i32, quiet: bool, e: anyhow::Error) -> Result<()> {
        let found = crate::capture::fatal::dying(pid).map(|why| Crashing { pid, why });
        let Some(crash) = e.downcast_ref::<Crashing>().copied().or(found) else {
            if crate::capture::fatal::ended(pid) {
                self.dying.insert(pid);
                return Ok(());
            }
            return Err(e);
        };
        if self.dying.insert(pid) && !quiet {
            crate::say!("[{}] =={pid}== kal: {crash}", timestamp(SystemTime::now()));
        }
        Ok(())
    }

    /// Symbolized stacks of the sites contradicted in `c` that were not reported before.
    fn new_contradictions<'a>(
        &mut self,
        pid: i32,
        c: &'a Check,
    ) -> Vec<&'a [crate::attribute::symbolize::Frame]> {
        let known = self.contradicted.entry(pid).or_default();
        let mut new = Vec::new();
        for st in &c.report.reclaimed.never_again {
            if !known.contains(st) {
                known.push(st.clone());
                new.push(st.as_slice());
            }
        }
        new
    }

    fn append_line(&self, path: &std::path::Path, o: &Outcome<'_>) -> Result<()> {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let line = Line {
            check: self.count,
            time: o.time.clone(),
            new: &o.new,
            new_leaks: &o.new_leaks,
            reclaimed_now: o.done.as_ref().map(|d| d.freed).unwrap_or_default(),
            parked_now: o.done.as_ref().map(|d| d.parked).unwrap_or_default(),
            would_reclaim: o.done.as_ref().filter(|_| self.dry_run()).map(|d| Totals {
                bytes: d.would.iter().map(|b| b.size).sum(),
                blocks: d.would.len() as u64,
            }),
            parking_unavailable: o.done.as_ref().and_then(|d| d.unavailable.as_deref()),
            reclaim_refused: o.refused.as_ref().map(|r| r.0.as_str()),
            new_contradictions: o.contradictions.clone(),
            skipped: o.round.skipped,
            delayed_ms: ms(o.round.delayed),
            cpu_ms: ms(o.cpu),
            wall_ms: ms(o.wall),
            forecast: &o.forecast,
            report: &o.c.report,
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?;
        serde_json::to_writer(&mut f, &line)?;
        f.write_all(b"\n")?;
        Ok(())
    }

    /// Totals and per-site records of the newly lost blocks.
    fn new_records(&self, c: &Check, fresh: &[(Block, Kind)]) -> (New, Vec<report::Record>) {
        let mut new = New::default();
        let mut by_site: BTreeMap<(Kind, u32), Totals> = BTreeMap::new();
        for (b, k) in fresh {
            let t = if *k == Kind::Direct {
                &mut new.direct
            } else {
                &mut new.indirect
            };
            t.bytes += b.size;
            t.blocks += 1;
            let s = by_site.entry((*k, b.stack)).or_default();
            s.bytes += b.size;
            s.blocks += 1;
        }
        let mut records: Vec<report::Record> = by_site
            .into_iter()
            .filter_map(|((kind, site), t)| {
                let r = c
                    .report
                    .leaks
                    .iter()
                    .find(|r| r.kind == kind && r.site == site)?;
                Some(report::Record {
                    bytes: t.bytes,
                    blocks: t.blocks,
                    ..r.clone()
                })
            })
            .collect();
        records.sort_by(|a, b| a.kind.cmp(&b.kind).then(b.bytes.cmp(&a.bytes)));
        (new, records)
    }

    /// The text of one check: its line, then one line per new leak site, reclaim and
    /// contradiction.
    fn text(&self, o: &Outcome<'_>) -> String {
        let mut s = String::new();
        let r = &o.c.report;
        let sm = &r.summary;
        let head = format!("[{}] =={}== kal check {}:", o.time, r.pid, self.count);
        let mut warning = if r.tracking_complete {
            String::new()
        } else {
            format!(
                " WARNING: tracking incomplete: {} allocations were not recorded; lost counts are unreliable;",
                r.untracked_allocations
            )
        };
        if let Some(g) = crate::act::text::gaps_line(r) {
            warning.push_str(&format!(
                " WARNING: {g}; lost counts may include false positives;"
            ));
        }
        let _ = writeln!(
            s,
            "{head}{warning} new: definitely lost {} bytes in {} blocks, indirectly lost {} bytes in {} blocks; total: definitely lost {} bytes in {} blocks, indirectly lost {} bytes in {} blocks, possibly lost {} bytes in {} blocks (paused {:.2} ms{})",
            o.new.direct.bytes,
            o.new.direct.blocks,
            o.new.indirect.bytes,
            o.new.indirect.blocks,
            sm.direct.bytes,
            sm.direct.blocks,
            sm.indirect.bytes,
            sm.indirect.blocks,
            sm.possible.bytes,
            sm.possible.blocks,
            r.pause_ms.unwrap_or(0.0),
            self.pacing_note(&o.round)
        );
        for rec in &o.new_leaks {
            let _ = writeln!(
                s,
                "    +{} bytes in {} blocks ({}) at {}",
                rec.bytes,
                rec.blocks,
                rec.kind.name(),
                crate::attribute::site::where_(&rec.stack)
            );
        }
        if let Some((why, true)) = &o.refused {
            let _ = writeln!(s, "{head} not reclaiming in this process: {why}");
        }
        if let Some(d) = &o.done {
            let rss = || crate::agent::control::rss(r.pid).unwrap_or(0) as f64 / (1 << 20) as f64;
            if let Some(why) = &d.unavailable {
                let _ = writeln!(s, "{head} not parking in this process: {why}");
            }
            if d.parked.blocks > 0 {
                let _ = writeln!(
                    s,
                    "{head} parked {} bytes of {} blocks definitely lost in two checks in a row (RSS now {:.1} MiB; parked in all {} bytes, restored on touch {} bytes, compressed store {} bytes{})",
                    d.parked.bytes,
                    d.parked.blocks,
                    rss(),
                    r.reclaimed.parked_now_bytes,
                    r.reclaimed.restored_bytes,
                    r.reclaimed.store_bytes,
                    if d.skipped > 0 { "; store limit reached (--park-limit): parking stopped for now" } else { "" }
                );
            } else if d.skipped > 0 {
                let _ = writeln!(
                    s,
                    "{head} store limit reached (--park-limit, compressed store {} bytes): nothing more parked",
                    r.reclaimed.store_bytes
                );
            }
            if d.no_whole_page.blocks > 0 {
                let _ = writeln!(
                    s,
                    "{head} left in place: {} bytes in {} lost blocks that hold no whole page of their own (parking moves whole pages)",
                    d.no_whole_page.bytes, d.no_whole_page.blocks
                );
            }
            if d.freed.blocks > 0 {
                let _ = writeln!(
                    s,
                    "{head} reclaimed {} bytes in {} blocks with free(): definitely lost in 3 checks or more over {:.0} s or more, from sites named by --free-sites (RSS now {:.1} MiB)",
                    d.freed.bytes,
                    d.freed.blocks,
                    self.policy.as_ref().map(|p| p.config().free_after.as_secs_f64()).unwrap_or_default(),
                    rss()
                );
            }
            if self.dry_run() && !d.would.is_empty() {
                let (verb, what) = if d.would_free {
                    (
                        "free",
                        "definitely lost in 3 checks or more over --free-after, from sites named by --free-sites",
                    )
                } else {
                    ("park", "definitely lost in two checks in a row")
                };
                let _ = writeln!(
                    s,
                    "{head} dry run: would {verb}{} {} bytes in {} blocks {what} (nothing done):",
                    if d.would_free { "" } else { " the pages of" },
                    d.would.iter().map(|b| b.size).sum::<u64>(),
                    d.would.len()
                );
                let mut by: BTreeMap<u32, Totals> = BTreeMap::new();
                for b in &d.would {
                    let t = by.entry(b.stack).or_default();
                    t.bytes += b.size;
                    t.blocks += 1;
                }
                for (site, t) in by {
                    let stack = r
                        .leaks
                        .iter()
                        .find(|l| l.site == site)
                        .map(|l| l.stack.as_slice())
                        .unwrap_or(&[]);
                    let _ = writeln!(
                        s,
                        "    would {verb} {} bytes in {} blocks at {}",
                        t.bytes,
                        t.blocks,
                        crate::attribute::site::where_(stack)
                    );
                }
            }
        }
        // A limit months away is noise on a check line (the JSON line has it anyway).
        if let (Some(_), Some(g)) = (
            o.forecast
                .seconds_to_limit
                .filter(|s| *s < FORECAST_LINE_WITHIN),
            o.forecast.rss_bytes_per_second,
        ) {
            let _ = writeln!(
                s,
                "{head} forecast: {} (RSS {}{}/s over {} checks){}",
                crate::watch::limit_phrase(&o.forecast),
                if g >= 0.0 { "+" } else { "-" },
                human_bytes(g.abs()),
                o.forecast.points,
                o.forecast
                    .site
                    .as_ref()
                    .map(|s| format!("; fastest-growing site {}", s.site))
                    .unwrap_or_default()
            );
        }
        for st in &o.contradictions {
            let _ = writeln!(
                s,
                "{head} contradiction: the program freed a block kal had reclaimed, or touched one kal had parked, allocated at {}; that site is never reclaimed again",
                crate::attribute::site::where_(st)
            );
        }
        s
    }

    fn dry_run(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.config().mode == reclaim::Mode::DryRun)
    }

    /// "; 3 due checks skipped …; delayed … ms …" for a check line, or nothing.
    fn pacing_note(&self, round: &Round) -> String {
        let mut s = String::new();
        if round.skipped > 0 {
            let _ = write!(
                s,
                "; skipped {} due check{} while the previous one ran",
                round.skipped,
                if round.skipped == 1 { "" } else { "s" }
            );
        }
        if !round.delayed.is_zero() {
            let _ = write!(
                s,
                "; delayed {:.0} ms to keep kal under {}% of a CPU (--max-cpu)",
                round.delayed.as_secs_f64() * 1e3,
                self.pacer.max_cpu * 100.0
            );
        }
        s
    }
}
