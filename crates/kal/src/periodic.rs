//! `kal run --check-every D`: periodic live checks, each telling what is new since the last.

use crate::capture::Block;
use crate::check::{check_with_header, Check};
use crate::reach::Kind;
use crate::report::{self, Report, Totals};
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `10s`, `500ms`, `2m`, `1h` or a plain number of seconds.
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
    reclaimed_now: Totals,
    #[serde(flatten)]
    report: &'a Report,
}

/// Appends a process's exit report to the JSON lines file, marked `"at_exit": true`.
pub fn append_exit_line(path: &std::path::Path, r: &Report) -> Result<()> {
    #[derive(Serialize)]
    struct Exit<'a> {
        at_exit: bool,
        time: String,
        #[serde(flatten)]
        report: &'a Report,
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    serde_json::to_writer(
        &mut f,
        &Exit {
            at_exit: true,
            time: timestamp(SystemTime::now()),
            report: r,
        },
    )?;
    f.write_all(b"\n")?;
    Ok(())
}

/// State of periodic checking across processes.
pub struct Periodic {
    /// Interval.
    pub every: Duration,
    opts: report::Options,
    json: Option<PathBuf>,
    seen: HashMap<i32, HashSet<u64>>,
    count: u64,
    reclaim: bool,
    /// Per process: definitely lost blocks of the previous check, by address → seq.
    prev_direct: HashMap<i32, HashMap<u64, u64>>,
    reclaimed: HashMap<i32, HashMap<u32, Totals>>,
}

impl Periodic {
    /// Periodic checks every `every`; JSON lines appended to `json` if given.
    pub fn new(every: Duration, opts: report::Options, json: Option<PathBuf>) -> Periodic {
        Periodic {
            every,
            opts,
            json,
            seen: HashMap::new(),
            count: 0,
            reclaim: false,
            prev_direct: HashMap::new(),
            reclaimed: HashMap::new(),
        }
    }

    /// Also reclaim, after each check, the blocks definitely lost in it and in the previous
    /// check of the same process.
    pub fn with_reclaim(mut self, on: bool) -> Periodic {
        self.reclaim = on;
        self
    }

    /// What this kal reclaimed in process `pid`, by stack id.
    pub fn sites(&self, pid: i32) -> HashMap<u32, Totals> {
        self.reclaimed.get(&pid).cloned().unwrap_or_default()
    }

    /// Checks one process now and prints what is new.
    pub fn check(&mut self, pid: i32, header: u64, quiet: bool) -> Result<()> {
        let sites = self.sites(pid);
        let c = check_with_header(pid, header, &self.opts, &sites)?;
        self.count += 1;
        let seen = self.seen.entry(pid).or_default();
        let fresh: Vec<(Block, Kind)> = c
            .lost
            .iter()
            .filter(|(b, _)| !seen.contains(&b.seq))
            .copied()
            .collect();
        *seen = c.lost.iter().map(|(b, _)| b.seq).collect();
        let (new, new_leaks) = self.new_records(&c, &fresh);
        let mut reclaimed_now = Totals::default();
        if self.reclaim {
            let direct = crate::reclaim::direct_map(&c.lost);
            let prev = self.prev_direct.remove(&pid).unwrap_or_default();
            let cands = crate::reclaim::candidates(&prev, &c);
            let mut now = direct;
            if !cands.is_empty() {
                match crate::reclaim::send(pid, &cands) {
                    Ok(done) => {
                        let sites = self.reclaimed.entry(pid).or_default();
                        for (site, t) in done.by_site {
                            let e = sites.entry(site).or_default();
                            e.bytes += t.bytes;
                            e.blocks += t.blocks;
                        }
                        reclaimed_now = done.total;
                        for b in &done.freed {
                            now.remove(b);
                        }
                    }
                    Err(e) => eprintln!("kal: reclaim in process {pid} failed: {e:#}"),
                }
            }
            self.prev_direct.insert(pid, now);
        }
        let time = timestamp(SystemTime::now());
        if !quiet {
            eprint!("{}", self.text(&c.report, &time, &new, &new_leaks));
            if reclaimed_now.blocks > 0 {
                eprintln!(
                    "[{time}] =={pid}== kal reclaimed {} bytes in {} blocks definitely lost in two checks in a row (RSS now {:.1} MiB)",
                    reclaimed_now.bytes,
                    reclaimed_now.blocks,
                    crate::control::rss(pid).unwrap_or(0) as f64 / (1 << 20) as f64
                );
            }
        }
        if let Some(j) = &self.json {
            let line = Line {
                check: self.count,
                time,
                new: &new,
                new_leaks: &new_leaks,
                reclaimed_now,
                report: &c.report,
            };
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(j)?;
            serde_json::to_writer(&mut f, &line)?;
            f.write_all(b"\n")?;
        }
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

    fn text(&self, r: &Report, time: &str, new: &New, records: &[report::Record]) -> String {
        let mut s = String::new();
        let sm = &r.summary;
        let _ = writeln!(
            s,
            "[{time}] =={}== kal check {}: new: definitely lost {} bytes in {} blocks, indirectly lost {} bytes in {} blocks; total: definitely lost {} bytes in {} blocks, indirectly lost {} bytes in {} blocks, possibly lost {} bytes in {} blocks (paused {:.2} ms)",
            r.pid,
            self.count,
            new.direct.bytes,
            new.direct.blocks,
            new.indirect.bytes,
            new.indirect.blocks,
            sm.direct.bytes,
            sm.direct.blocks,
            sm.indirect.bytes,
            sm.indirect.blocks,
            sm.possible.bytes,
            sm.possible.blocks,
            r.pause_ms.unwrap_or(0.0)
        );
        for rec in records {
            let at = rec
                .stack
                .iter()
                .find(|f| f.line > 0)
                .or(rec.stack.first())
                .map(|f| format!("{} {}:{}", f.function, f.file, f.line))
                .unwrap_or_else(|| "(no stack)".into());
            let _ = writeln!(
                s,
                "    +{} bytes in {} blocks ({}) at {at}",
                rec.bytes,
                rec.blocks,
                rec.kind.name()
            );
        }
        s
    }
}
