//! Leak tolerance on the CLI side: which blocks to reclaim, and asking the agent to.
//!
//! Only blocks *definitely lost* (memcheck's "direct": nothing points to them) in two
//! snapshots in a row are candidates, matched by address *and* allocation sequence number;
//! never possibly lost, indirectly lost (they become direct once their owner is freed) or
//! reachable blocks, and never blocks from a site the program contradicted. The agent checks
//! each block's sequence number again before freeing it.

use crate::capture::Block;
use crate::reach::Kind;
use crate::report::Totals;
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};

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

/// Definitely lost blocks of a check: address → sequence number.
pub fn direct_map(lost: &[(Block, Kind)]) -> HashMap<u64, u64> {
    lost.iter()
        .filter(|(_, k)| *k == Kind::Direct)
        .map(|(b, _)| (b.addr, b.seq))
        .collect()
}

/// Blocks definitely lost now that were definitely lost, as the same allocation, before.
pub fn candidates(prev: &HashMap<u64, u64>, c: &crate::check::Check) -> Vec<Block> {
    let site = |id: &u32| c.capture.stacks.get(id).and_then(|s| s.first().copied());
    let banned: Vec<u64> = c.capture.banned.iter().filter_map(site).collect();
    c.lost
        .iter()
        .filter(|(b, k)| *k == Kind::Direct && prev.get(&b.addr) == Some(&b.seq))
        .filter(|(b, _)| site(&b.stack).is_none_or(|s| !banned.contains(&s)))
        .map(|(b, _)| *b)
        .collect()
}

/// What a reclaim request achieved.
#[derive(Debug, Default)]
pub struct Done {
    /// Freed in all.
    pub total: Totals,
    /// Freed, by stack id.
    pub by_site: HashMap<u32, Totals>,
    /// Addresses freed.
    pub freed: Vec<u64>,
    /// Refused: no longer the same allocation.
    pub stale: u64,
    /// Refused: the site is banned.
    pub banned: u64,
    /// How long the agent took (request sent to answer received).
    pub took: std::time::Duration,
}

/// Asks the agent of `pid` to free `blocks`.
pub fn send(pid: i32, blocks: &[Block]) -> Result<Done> {
    let entries: Vec<(u64, u64)> = blocks.iter().map(|b| (b.addr, b.seq)).collect();
    let t0 = std::time::Instant::now();
    let (resp, freed) = crate::control::reclaim(pid, &entries)?;
    let took = t0.elapsed();
    let mut done = Done {
        took,
        stale: resp.stale,
        banned: resp.banned,
        ..Default::default()
    };
    for (b, ok) in blocks.iter().zip(freed) {
        if ok {
            done.total.bytes += b.size;
            done.total.blocks += 1;
            let t = done.by_site.entry(b.stack).or_default();
            t.bytes += b.size;
            t.blocks += 1;
            done.freed.push(b.addr);
        }
    }
    Ok(done)
}

/// What reclaiming after one periodic check did.
pub enum Outcome {
    /// Freed what was definitely lost in this check and the previous one (maybe nothing).
    Freed(Done),
    /// Refused ([`refusal`]); `first` for the first refusal in this process.
    Refused {
        /// Why.
        reason: String,
        /// Whether this is the first refusal for this process.
        first: bool,
    },
    /// Asking the agent failed (a dying process fails with [`crate::fatal::Crashing`]).
    Failed(anyhow::Error),
}

/// The two-checks-in-a-row reclaim policy of `kal run --reclaim`, across processes.
#[derive(Default)]
pub struct Reclaimer {
    /// Per process: definitely lost blocks of the previous check, by address → seq.
    prev_direct: HashMap<i32, HashMap<u64, u64>>,
    /// Per process: what was reclaimed so far, by stack id.
    reclaimed: HashMap<i32, HashMap<u32, Totals>>,
    /// Processes whose tracking is incomplete: never reclaimed from again.
    refused: HashSet<i32>,
}

impl Reclaimer {
    /// What was reclaimed in process `pid` so far, by stack id.
    pub fn sites(&self, pid: i32) -> HashMap<u32, Totals> {
        self.reclaimed.get(&pid).cloned().unwrap_or_default()
    }

    /// After check `c` of process `pid`: frees the blocks definitely lost in it and, as the
    /// same allocations, in the previous check — unless the capture is incomplete or the
    /// process is dying.
    pub fn after_check(&mut self, pid: i32, c: &crate::check::Check) -> Outcome {
        if let Some(reason) = refusal(c) {
            self.prev_direct.remove(&pid);
            let first = self.refused.insert(pid);
            return Outcome::Refused { reason, first };
        }
        let prev = self.prev_direct.remove(&pid).unwrap_or_default();
        let cands = candidates(&prev, c);
        let mut now = direct_map(&c.lost);
        let mut done = Done::default();
        if !cands.is_empty() {
            let sent = crate::fatal::ensure_not_dying(pid).and_then(|()| send(pid, &cands));
            match sent {
                Ok(d) => done = d,
                Err(e) => {
                    self.prev_direct.insert(pid, now);
                    return Outcome::Failed(e);
                }
            }
        }
        let sites = self.reclaimed.entry(pid).or_default();
        for (site, t) in &done.by_site {
            let e = sites.entry(*site).or_default();
            e.bytes += t.bytes;
            e.blocks += t.blocks;
        }
        for b in &done.freed {
            now.remove(b);
        }
        self.prev_direct.insert(pid, now);
        Outcome::Freed(done)
    }
}

/// `kal reclaim PID`: two snapshots in a row, then free what was definitely lost in both.
/// Returns the report of the second snapshot, completed with what was reclaimed, and the
/// RSS before and after.
pub fn reclaim_now(
    pid: i32,
    opts: &crate::report::Options,
) -> Result<(crate::report::Report, Done, u64, u64)> {
    let header = crate::agent::find_header(pid)?;
    let none = HashMap::new();
    let refuse = |c: &crate::check::Check| match refusal(c) {
        Some(why) => bail!("refusing to reclaim in process {pid}: {why}"),
        None => Ok(()),
    };
    let dropped =
        crate::capture::read_header(&crate::memory::ProcessMemory::new(pid), header)?.dropped;
    if dropped > 0 {
        bail!("refusing to reclaim in process {pid}: tracking is incomplete ({dropped} allocations were not recorded), so blocks that look lost may be live");
    }
    let first = crate::check::check_with_header(pid, header, opts, &none)?;
    refuse(&first)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let second = crate::check::check_with_header(pid, header, opts, &none)?;
    refuse(&second)?;
    let cands = candidates(&direct_map(&first.lost), &second);
    let before = crate::control::rss(pid)?;
    let done = if cands.is_empty() {
        Done::default()
    } else {
        crate::fatal::ensure_not_dying(pid)?;
        send(pid, &cands)?
    };
    let after = crate::control::rss(pid)?;
    let mut report = second.report;
    report.reclaimed.bytes += done.total.bytes;
    report.reclaimed.blocks += done.total.blocks;
    let mut sites: Vec<crate::report::Site> = done
        .by_site
        .iter()
        .map(|(id, t)| crate::report::Site {
            bytes: t.bytes,
            blocks: t.blocks,
            stack: report
                .leaks
                .iter()
                .find(|r| r.site == *id)
                .map(|r| r.stack.clone())
                .unwrap_or_default(),
        })
        .collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    report.reclaimed.sites = sites;
    Ok((report, done, before, after))
}
