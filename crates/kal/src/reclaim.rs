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
use anyhow::Result;
use std::collections::HashMap;

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

/// `kal reclaim PID`: two snapshots in a row, then free what was definitely lost in both.
/// Returns the report of the second snapshot, completed with what was reclaimed, and the
/// RSS before and after.
pub fn reclaim_now(
    pid: i32,
    opts: &crate::report::Options,
) -> Result<(crate::report::Report, Done, u64, u64)> {
    let header = crate::agent::find_header(pid)?;
    let none = HashMap::new();
    let first = crate::check::check_with_header(pid, header, opts, &none)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let second = crate::check::check_with_header(pid, header, opts, &none)?;
    let cands = candidates(&direct_map(&first.lost), &second);
    let before = crate::control::rss(pid)?;
    let done = if cands.is_empty() {
        Done::default()
    } else {
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
