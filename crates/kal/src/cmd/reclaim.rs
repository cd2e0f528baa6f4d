//! `kal reclaim PID`: one check, then park or free what it found lost.

use super::args::{mib, ReclaimArgs, ReportArgs};
use anyhow::Result;
/// Runs `kal reclaim`; exit status 0.
pub fn run(
    pid: i32,
    mode: kal::act::reclaim::Mode,
    reclaim_args: &ReclaimArgs,
    args: &ReportArgs,
) -> Result<i32> {
    let outputs = args.outputs(false)?;
    let opts = args.options()?;
    let config = reclaim_args.config(mode)?;
    let (r, done, before, after) = kal::act::reclaim::reclaim_now(pid, &opts, config)?;
    // The report lists each reclaimed site once, under "reclaimed so far".
    let written = outputs.write(&r, &Default::default());
    if let Some(why) = &done.unavailable {
        kal::say!("kal: not parking in process {pid}: {why}");
    }
    if mode == kal::act::reclaim::Mode::DryRun {
        let small: Vec<_> = done
            .would
            .iter()
            .filter(|b| !done.would_free && !kal::act::reclaim::holds_whole_page(b))
            .collect();
        kal::say!(
            "kal: dry run: would {} {} bytes in {} blocks in process {pid}{}; nothing done",
            if done.would_free {
                "free"
            } else {
                "park the pages of"
            },
            done.would.iter().map(|b| b.size).sum::<u64>(),
            done.would.len(),
            if small.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} bytes in {} of them hold no whole page of their own: parked only with lost neighbours)",
                    small.iter().map(|b| b.size).sum::<u64>(),
                    small.len()
                )
            }
        );
    } else {
        kal::say!(
            "kal: parked {} bytes of {} blocks and freed {} bytes in {} blocks in process {pid} in {:.1} ms (refused: {} no longer the same allocation, {} from contradicted sites{}); RSS {:.1} MiB -> {:.1} MiB",
            done.parked.bytes,
            done.parked.blocks,
            done.freed.bytes,
            done.freed.blocks,
            done.took.as_secs_f64() * 1e3,
            done.stale,
            done.banned,
            if done.skipped > 0 { "; store limit reached (--park-limit)" } else { "" },
            mib(before),
            mib(after)
        );
        if done.no_whole_page.blocks > 0 {
            kal::say!(
                "kal: left in place: {} bytes in {} lost blocks that hold no whole page of their own (parking moves whole pages; `--mode free --free-sites` frees them)",
                done.no_whole_page.bytes,
                done.no_whole_page.blocks
            );
        }
    }
    written?;
    Ok(0)
}
