//! `kal trim PID`: give the memory glibc keeps free back to the operating system.

use super::args::mib;
use anyhow::{bail, Result};
/// Runs `kal trim`; exit status 0.
pub fn run(pid: i32) -> Result<i32> {
    let agent = kal::agent::control::Agent::find(pid)?;
    let before = kal::agent::control::rss(pid)?;
    if !agent.trim()? {
        bail!("the allocator of process {pid} is not glibc's: kal cannot trim it yet");
    }
    let after = kal::agent::control::rss(pid)?;
    println!(
        "kal trim {pid}: RSS {:.1} MiB -> {:.1} MiB (returned {:.1} MiB to the OS)",
        mib(before),
        mib(after),
        mib(before.saturating_sub(after))
    );
    Ok(0)
}
