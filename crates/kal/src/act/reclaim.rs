//! Leak tolerance on the CLI side: one [`Policy`] decides, after each check, what to park
//! or free, for `kal run --reclaim` and `kal reclaim PID` alike.
//!
//! Only blocks *definitely lost* (memcheck's "direct": nothing points to them) in
//! consecutive checks are candidates, matched by address *and* allocation sequence number;
//! never possibly lost, indirectly lost (they become direct once their owner is parked or
//! freed) or reachable blocks, never blocks from a site the program contradicted, never
//! anything on the strength of a check [`refusal`] rejects. By default a candidate lost in
//! two checks in a row is *parked* (its pages dropped, their bytes kept compressed by the
//! agent and restored on any touch: nothing the program does can read a wrong byte). With
//! `--reclaim=free`, blocks from the sites the user names are *freed* instead once lost in
//! at least three checks spanning `--free-after`. The agent checks each block's sequence
//! number again before it acts.

use crate::act::report::{Report, Totals};
use crate::act::suppress::Suppressions;
use crate::agent::control::Agent;
use crate::blocks::Block;
use crate::check::Check;
use crate::reach::Kind;
use anyhow::{bail, Result};
use kal_proto::ctl::ParkStats;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Why nothing may be reclaimed on the strength of check `c`, if so: a block the agent's
/// table did not record is never scanned, and a capture with gaps (memory, registers or
/// kernel-held pointers it could not read) may have missed the only pointer to a block;
/// either way whatever only they point to looks lost.
pub fn refusal(c: &crate::check::Check) -> Option<String> {
    let n = c.capture.header.dropped;
    if n > 0 {
        return Some(format!(
            "tracking is incomplete ({n} allocations were not recorded), so blocks that look lost may be live"
        ));
    }
    let g = &c.capture.gaps;
    (!g.is_empty()).then(|| {
        format!(
            "the capture is incomplete ({}), so blocks that look lost may be live",
            g.line()
        )
    })
}

/// What reclaim does with blocks found lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Park their pages (restored exactly on any touch).
    #[default]
    Park,
    /// free() blocks from the sites named with `--free-sites`, after stricter gates.
    Free,
    /// Say what would be parked (with `--free-sites`: freed), do nothing.
    DryRun,
}

/// How reclaim is configured (parsed once from the command line).
#[derive(Debug, Clone)]
pub struct Config {
    /// Park, free or dry run.
    pub mode: Mode,
    /// `--free-sites` patterns (suppression syntax), matched against allocation stacks.
    pub free_sites: Suppressions,
    /// `--free-after`: a freed block was lost in checks spanning at least this long.
    pub free_after: Duration,
    /// The park request's store limit argument (see [`kal_proto::ctl::Op::Park`]).
    pub park_limit: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Park,
            free_sites: Suppressions::default(),
            free_after: Duration::from_secs(60),
            park_limit: 0,
        }
    }
}

/// Parses `--park-limit`: `25%` (of the bytes parked, 16 MiB at least), or a size such as
/// `64M`, `1G`, `512K` or plain bytes (rounded up to MiB).
pub fn parse_park_limit(s: &str) -> Result<u32> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        let v: u32 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid --park-limit {s:?} (try 25% or 256M)"))?;
        if v == 0 {
            bail!("invalid --park-limit {s:?}: must be positive");
        }
        return Ok(kal_proto::ctl::park_limit_percent(v));
    }
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => bail!("invalid --park-limit {s:?} (try 25% or 256M)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --park-limit {s:?} (try 25% or 256M)"))?;
    let mib = (n * mult).div_ceil(1 << 20);
    if mib == 0 {
        bail!("invalid --park-limit {s:?}: must be positive");
    }
    Ok(kal_proto::ctl::park_limit_mib(
        mib.min(u32::MAX as u64 >> 1) as u32,
    ))
}

/// Parked and freed figures of one site.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SiteFigures {
    /// Parked (bytes of pages dropped; blocks with at least one page parked).
    pub parked: Totals,
    /// Freed.
    pub freed: Totals,
}

/// What acting after one check did.
#[derive(Debug, Default)]
pub struct Done {
    /// Parked now.
    pub parked: Totals,
    /// Freed now.
    pub freed: Totals,
    /// By stack id.
    pub by_site: HashMap<u32, SiteFigures>,
    /// Refused: no longer the same allocation.
    pub stale: u64,
    /// Refused: the site is banned.
    pub banned: u64,
    /// Runs not parked: the store limit (`--park-limit`) or the range limit was reached.
    pub skipped: u64,
    /// Lost blocks left in place because they hold no whole page of their own (parking
    /// moves whole pages; such a block is parked only within a run of lost neighbours).
    pub no_whole_page: Totals,
    /// Dry run: blocks that would be parked (or, with `--free-sites`, freed) now.
    pub would: Vec<Block>,
    /// Dry run: `would` lists blocks that would be freed, not parked.
    pub would_free: bool,
    /// Why parking is not available in this process, if it is not.
    pub unavailable: Option<String>,
    /// How long the agent took (requests sent to answers received).
    pub took: Duration,
}

/// What reclaiming after one check did.
pub enum Outcome {
    /// Acted on what passed the gates (maybe nothing).
    Acted(Done),
    /// Refused ([`refusal`]); `first` for the first refusal in this process.
    Refused {
        /// Why.
        reason: String,
        /// Whether this is the first refusal for this process.
        first: bool,
    },
    /// Asking the agent failed (a dying process fails with [`crate::capture::fatal::Crashing`]).
    Failed(anyhow::Error),
}

/// A definitely lost block as seen in consecutive checks.
#[derive(Clone, Copy)]
struct Seen {
    seq: u64,
    first: Instant,
    checks: u32,
}

/// Per process.
#[derive(Default)]
struct Process {
    /// Definitely lost blocks of the previous check, by address.
    seen: HashMap<u64, Seen>,
    /// Blocks already sent to be parked (or shown in a dry run): never sent again.
    sent: HashSet<(u64, u64)>,
    /// Figures by stack id.
    sites: HashMap<u32, SiteFigures>,
    /// Totals.
    parked: Totals,
    freed: Totals,
    /// The agent's last parking counters.
    stats: Option<ParkStats>,
    /// Whether "parking unavailable" was said.
    told_unavailable: bool,
    /// Symbolized stacks of the sites acted on, kept for reports made after their blocks
    /// are gone (a capture reads only the stacks of live blocks).
    stacks: HashMap<u32, Vec<crate::attribute::symbolize::Frame>>,
}

/// The reclaim policy, across processes: the one owner of the decision.
pub struct Policy {
    config: Config,
    procs: HashMap<i32, Process>,
    /// Processes whose captures were refused: never reclaimed from again.
    refused: HashSet<i32>,
}

impl Policy {
    /// A policy configured by `config`.
    pub fn new(config: Config) -> Policy {
        Policy {
            config,
            procs: HashMap::new(),
            refused: HashSet::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Freed so far in process `pid`, by stack id, with every parked site too (zero freed):
    /// the sites a report lists under "reclaimed".
    pub fn sites(&self, pid: i32) -> HashMap<u32, Totals> {
        self.procs
            .get(&pid)
            .map(|p| p.sites.iter().map(|(id, f)| (*id, f.freed)).collect())
            .unwrap_or_default()
    }

    /// Adds what this kal parked in process `pid` (and the agent's counters) to `report`.
    pub fn annotate(&self, pid: i32, report: &mut Report) {
        let Some(p) = self.procs.get(&pid) else {
            return;
        };
        let r = &mut report.reclaimed;
        r.parked_bytes = p.parked.bytes;
        r.parked_blocks = p.parked.blocks;
        if let Some(st) = &p.stats {
            r.restored_bytes = st.restored_bytes;
            r.parked_now_bytes = st.parked_bytes;
            r.store_bytes = st.store_bytes;
            r.touched = st.contradictions;
            r.parking_raced = st.raced;
        }
        r.freed_bytes = r.bytes;
        for (id, f) in &p.sites {
            let i = match r.sites.iter().position(|s| s.site == *id) {
                Some(i) => i,
                None => {
                    // Acted on after this report was built: its stack is a leak record's.
                    let stack = report
                        .leaks
                        .iter()
                        .find(|l| l.site == *id)
                        .map(|l| l.stack.clone())
                        .unwrap_or_default();
                    r.sites.push(crate::act::report::Site {
                        site: *id,
                        stack,
                        ..Default::default()
                    });
                    r.sites.len() - 1
                }
            };
            let site = &mut r.sites[i];
            if site.stack.is_empty() {
                if let Some(st) = p.stacks.get(id) {
                    site.stack = st.clone();
                }
            }
            site.parked_bytes = f.parked.bytes;
            site.parked_blocks = f.parked.blocks;
            site.bytes = site.bytes.max(f.freed.bytes);
            site.blocks = site.blocks.max(f.freed.blocks);
            site.freed_bytes = site.bytes;
        }
        // Several stack ids can symbolize to one stack: list each stack once.
        let mut merged: Vec<crate::act::report::Site> = Vec::new();
        for s in r.sites.drain(..) {
            match merged.iter_mut().find(|m| m.stack == s.stack) {
                Some(m) => {
                    m.bytes += s.bytes;
                    m.blocks += s.blocks;
                    m.freed_bytes += s.freed_bytes;
                    m.parked_bytes += s.parked_bytes;
                    m.parked_blocks += s.parked_blocks;
                }
                None => merged.push(s),
            }
        }
        merged.sort_by_key(|s| std::cmp::Reverse(s.bytes + s.parked_bytes));
        r.sites = merged;
    }

    /// After check `c` of the process `agent` serves: parks (or frees, or shows) what
    /// passed the gates — unless the capture is refused or the process is dying.
    pub fn after_check(&mut self, agent: &Agent, c: &Check) -> Outcome {
        let pid = agent.pid();
        let now = Instant::now();
        if let Some(reason) = refusal(c) {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.seen.clear();
            }
            let first = self.refused.insert(pid);
            return Outcome::Refused { reason, first };
        }
        let config = self.config.clone();
        let p = self.procs.entry(pid).or_default();
        // Definitely lost now, with how many checks in a row and since when.
        let mut seen = HashMap::new();
        for (b, k) in &c.lost {
            if *k != Kind::Direct {
                continue;
            }
            let s = match p.seen.get(&b.addr) {
                Some(s) if s.seq == b.seq => Seen {
                    checks: s.checks + 1,
                    ..*s
                },
                _ => Seen {
                    seq: b.seq,
                    first: now,
                    checks: 1,
                },
            };
            seen.insert(b.addr, s);
        }
        p.seen = seen;
        let banned = banned_sites(c);
        let site_of = |b: &Block| {
            c.capture
                .stacks
                .get(&b.stack)
                .and_then(|s| s.first().copied())
        };
        // Blocks from before an attach have no sequence number to check: never.
        let eligible = |b: &Block| {
            !crate::blocks::before_attach::is_before(b)
                && site_of(b).is_none_or(|s| !banned.contains(&s))
        };
        let free_match = |b: &Block| {
            c.report
                .leaks
                .iter()
                .find(|r| r.site == b.stack)
                .is_some_and(|r| config.free_sites.matches(&r.stack))
        };
        // A dry run with --free-sites shows what the free mode would free.
        let free_gates = config.mode == Mode::Free
            || (config.mode == Mode::DryRun && !config.free_sites.is_empty());
        let cands: Vec<Block> = c
            .lost
            .iter()
            .filter(|(b, k)| *k == Kind::Direct && eligible(b))
            .filter(|(b, _)| {
                let s = p.seen[&b.addr];
                if free_gates {
                    s.checks >= 3
                        && now.duration_since(s.first) >= config.free_after
                        && free_match(b)
                        && (config.mode == Mode::Free || !p.sent.contains(&(b.addr, b.seq)))
                } else {
                    s.checks >= 2 && !p.sent.contains(&(b.addr, b.seq))
                }
            })
            .map(|(b, _)| *b)
            .collect();
        let mut done = Done::default();
        if config.mode == Mode::DryRun {
            for b in &cands {
                p.sent.insert((b.addr, b.seq));
            }
            done.would = cands;
            done.would_free = free_gates;
            return Outcome::Acted(done);
        }
        if !cands.is_empty() {
            let t0 = Instant::now();
            let acted =
                crate::capture::fatal::ensure_not_dying(pid).and_then(|()| match config.mode {
                    Mode::Free => free(agent, &cands, &mut done),
                    _ => park(agent, &cands, config.park_limit, &mut done),
                });
            done.took = t0.elapsed();
            if let Err(e) = acted {
                return Outcome::Failed(e);
            }
        }
        if config.mode == Mode::Park {
            for b in &cands {
                p.sent.insert((b.addr, b.seq));
            }
            // Forget what is no longer lost (freed by the program, or reused).
            let live: HashSet<(u64, u64)> = p.seen.iter().map(|(a, s)| (*a, s.seq)).collect();
            p.sent.retain(|k| live.contains(k));
            match agent.stats() {
                Ok(st) => {
                    // (At exit the agent restores everything and stops: nothing to say.)
                    if done.unavailable.is_none() && st.state >= 2 && st.note & 0xff != 5 {
                        done.unavailable = Some(crate::agent::control::describe_note(st.note));
                    }
                    p.stats = Some(st);
                }
                Err(e) => return Outcome::Failed(e),
            }
            if done.unavailable.is_some() {
                if p.told_unavailable {
                    done.unavailable = None;
                }
                p.told_unavailable = true;
            }
        }
        for site in done.by_site.keys() {
            if let Some(r) = c.report.leaks.iter().find(|r| r.site == *site) {
                p.stacks.entry(*site).or_insert_with(|| r.stack.clone());
            }
        }
        for (site, f) in &done.by_site {
            let e = p.sites.entry(*site).or_default();
            e.parked.bytes += f.parked.bytes;
            e.parked.blocks += f.parked.blocks;
            e.freed.bytes += f.freed.bytes;
            e.freed.blocks += f.freed.blocks;
        }
        p.parked.bytes += done.parked.bytes;
        p.parked.blocks += done.parked.blocks;
        p.freed.bytes += done.freed.bytes;
        p.freed.blocks += done.freed.blocks;
        Outcome::Acted(done)
    }
}

/// Call sites (innermost frames) the program contradicted.
fn banned_sites(c: &Check) -> Vec<u64> {
    c.capture
        .banned
        .iter()
        .filter_map(|id| c.capture.stacks.get(id).and_then(|s| s.first().copied()))
        .collect()
}

/// Whether block `b` spans at least one whole page of its own.
pub fn holds_whole_page(b: &Block) -> bool {
    let first = (b.addr + 4095) & !4095;
    first + 4096 <= b.addr + b.size
}

fn park(agent: &Agent, blocks: &[Block], limit: u32, done: &mut Done) -> Result<()> {
    let entries: Vec<(u64, u64)> = blocks.iter().map(|b| (b.addr, b.seq)).collect();
    let (resp, pages) = agent.park(&entries, limit)?;
    if resp.status != kal_proto::ctl::Status::Ok as u32 {
        if resp.note & 0xff != 5 {
            done.unavailable = Some(crate::agent::control::describe_note(resp.note));
        }
        return Ok(());
    }
    done.stale = resp.stale;
    done.banned = resp.banned;
    done.skipped = resp.skipped;
    // The answer may list fewer counts than blocks sent (none when nothing was parked).
    for (i, b) in blocks.iter().enumerate() {
        let n = pages.get(i).copied().unwrap_or(0);
        if n == 0 && !holds_whole_page(b) {
            done.no_whole_page.bytes += b.size;
            done.no_whole_page.blocks += 1;
        }
        if n > 0 {
            let bytes = n as u64 * 4096;
            done.parked.bytes += bytes;
            done.parked.blocks += 1;
            let f = done.by_site.entry(b.stack).or_default();
            f.parked.bytes += bytes;
            f.parked.blocks += 1;
        }
    }
    Ok(())
}

fn free(agent: &Agent, blocks: &[Block], done: &mut Done) -> Result<()> {
    let entries: Vec<(u64, u64)> = blocks.iter().map(|b| (b.addr, b.seq)).collect();
    let (resp, freed) = agent.reclaim(&entries)?;
    done.stale = resp.stale;
    done.banned = resp.banned;
    for (b, ok) in blocks.iter().zip(freed) {
        if ok {
            done.freed.bytes += b.size;
            done.freed.blocks += 1;
            let f = done.by_site.entry(b.stack).or_default();
            f.freed.bytes += b.size;
            f.freed.blocks += 1;
        }
    }
    Ok(())
}

/// `kal reclaim PID`: checks in a row (two to park; to free, three spanning
/// `--free-after`), the policy acting after each. Returns the last check's report with
/// what was reclaimed, what was done in all, and the RSS before and after.
pub fn reclaim_now(
    pid: i32,
    opts: &crate::act::report::Options,
    config: Config,
) -> Result<(Report, Done, u64, u64)> {
    let agent = Agent::find(pid)?;
    let dropped = crate::blocks::agent_table::read_header(
        &crate::capture::memory::ProcessMemory::new(pid),
        agent.header(),
    )?
    .dropped;
    if dropped > 0 {
        bail!("refusing to reclaim in process {pid}: tracking is incomplete ({dropped} allocations were not recorded), so blocks that look lost may be live");
    }
    let free_gates =
        config.mode == Mode::Free || (config.mode == Mode::DryRun && !config.free_sites.is_empty());
    let (checks, gap) = if free_gates {
        (3, (config.free_after / 2).max(Duration::from_millis(200)))
    } else {
        (2, Duration::from_millis(200))
    };
    let mut policy = Policy::new(config);
    let before = crate::agent::control::rss(pid)?;
    let mut total = Done::default();
    let mut last = None;
    for i in 0..checks {
        if i > 0 {
            std::thread::sleep(gap);
        }
        let c = crate::check::check_with_header(pid, agent.header(), opts, &policy.sites(pid))?;
        match policy.after_check(&agent, &c) {
            Outcome::Acted(d) => total.absorb(d),
            Outcome::Refused { reason, .. } => {
                bail!("refusing to reclaim in process {pid}: {reason}")
            }
            Outcome::Failed(e) => return Err(e),
        }
        last = Some(c);
    }
    let after = crate::agent::control::rss(pid)?;
    let c = last.expect("at least two checks");
    // The report of the last check, with what that check's reclaim did added.
    let mut report = c.report;
    report.reclaimed.bytes += total.freed.bytes;
    report.reclaimed.blocks += total.freed.blocks;
    policy.annotate(pid, &mut report);
    Ok((report, total, before, after))
}

impl Done {
    /// Adds `d` to these figures.
    fn absorb(&mut self, d: Done) {
        self.parked.bytes += d.parked.bytes;
        self.parked.blocks += d.parked.blocks;
        self.freed.bytes += d.freed.bytes;
        self.freed.blocks += d.freed.blocks;
        for (k, f) in d.by_site {
            let e = self.by_site.entry(k).or_default();
            e.parked.bytes += f.parked.bytes;
            e.parked.blocks += f.parked.blocks;
            e.freed.bytes += f.freed.bytes;
            e.freed.blocks += f.freed.blocks;
        }
        self.stale += d.stale;
        self.banned += d.banned;
        self.skipped += d.skipped;
        self.no_whole_page.bytes += d.no_whole_page.bytes;
        self.no_whole_page.blocks += d.no_whole_page.blocks;
        self.would.extend(d.would);
        self.would_free |= d.would_free;
        self.unavailable = self.unavailable.take().or(d.unavailable);
        self.took += d.took;
    }
}
