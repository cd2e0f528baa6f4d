//! `kal diff BEFORE.json AFTER.json`: what grew between two reports, by site.

use anyhow::{anyhow, Result};
use clap::Args;
use kal::act::diff;
use std::path::PathBuf;

/// Options of `kal diff`.
#[derive(Args)]
pub struct DiffArgs {
    /// The earlier JSON report (`kal check PID --json FILE`, `kal run --json FILE`).
    pub before: PathBuf,
    /// The later JSON report.
    pub after: PathBuf,
    /// Also write the comparison as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write a differential flame graph of the lost bytes to FILE (SVG): widths are
    /// the later report's, red grew, blue shrank.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
    /// Print no text (the files still tell).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs `kal diff`; exit status 0.
pub fn run(args: &DiffArgs) -> Result<i32> {
    let (a, b) = (diff::load(&args.before)?, diff::load(&args.after)?);
    let d = diff::diff(
        &a,
        &args.before.display().to_string(),
        &b,
        &args.after.display().to_string(),
    );
    if !args.quiet {
        // Never a panic on a closed stdout (`kal diff … | head`).
        let _ = std::io::Write::write_all(&mut std::io::stdout(), diff::text(&d).as_bytes());
    }
    if let Some(j) = &args.json {
        let text = serde_json::to_string_pretty(&d)? + "\n";
        std::fs::write(j, text)
            .map_err(|e| anyhow!("cannot write JSON to {}: {e}", j.display()))?;
    }
    if let Some(f) = &args.flamegraph {
        std::fs::write(f, diff::flamegraph(&a, &b)?)
            .map_err(|e| anyhow!("cannot write flame graph to {}: {e}", f.display()))?;
    }
    Ok(0)
}
