//! Options shared by several subcommands: how reports are written, how lost blocks are
//! reclaimed.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
/// How reports are written (shared by `run`, `check` and `reclaim`).
#[derive(Args)]
pub struct ReportArgs {
    /// Also write the report as JSON to FILE (README documents the shape; under `run`, a
    /// forked child's report goes to FILE.PID, and with --check-every FILE holds one JSON
    /// document per line).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the report as a gzip'd pprof profile to FILE (sample types lost_objects,
    /// lost_space, inuse_objects, inuse_space; lost_space by default), for
    /// `go tool pprof -top FILE`, Pyroscope or Parca.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
    /// Also write a flame graph of the lost bytes by allocation stack to FILE (SVG; open
    /// it in a browser: click to zoom, Ctrl-F to search).
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
    /// Also write the report as one self-contained HTML page to FILE: the summary, the
    /// growth over periodic checks (kal run --check-every, which rewrites it, like the pprof
    /// and flame graph files, after every check), the flame graph, and the top leaks with
    /// their stacks and source lines.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// List still-reachable blocks too (they are always counted in the summary).
    #[arg(long)]
    pub show_reachable: bool,
    /// Suppressions file: one pattern a line (`*`, `?`), matched against the function,
    /// source file and module of every frame; `leak:` prefixes are accepted.
    #[arg(long, value_name = "FILE")]
    pub suppressions: Option<PathBuf>,
    /// Exit status when something is definitely lost (0 to 255); 0 turns this off.
    #[arg(long, value_name = "N", default_value_t = 23,
          value_parser = clap::value_parser!(i32).range(0..=255))]
    pub error_exitcode: i32,
    /// Frames shown per record in the text and HTML reports.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub frames: usize,
    /// Print no text report (the JSON file and exit status still tell).
    #[arg(long, short)]
    pub quiet: bool,
    /// Live checks leave running the threads blocked in epoll_wait, epoll_pwait(2),
    /// sigtimedwait/sigwaitinfo, semop or semtimedop, which a stop would make return EINTR
    /// early. Their registers and stacks are then a capture gap: the report says so and
    /// nothing is reclaimed from such a check.
    #[arg(long)]
    pub no_interrupt: bool,
}

impl ReportArgs {
    /// The outputs asked for (`json_lines`: the JSON file gets one document per line);
    /// fails early on an output file that cannot be written.
    pub fn outputs(&self, json_lines: bool) -> Result<kal::act::sink::Outputs> {
        let o = kal::act::sink::Outputs {
            text: !self.quiet,
            frames: self.frames,
            json: self.json.clone(),
            json_lines,
            pprof: self.pprof.clone(),
            flamegraph: self.flamegraph.clone(),
            html: self.html.clone(),
        };
        o.check_files()?;
        Ok(o)
    }

    /// The report options, with the suppressions file read.
    pub fn options(&self) -> Result<kal::act::report::Options> {
        let suppressions = match &self.suppressions {
            Some(p) => kal::act::suppress::Suppressions::load(p)?,
            None => Default::default(),
        };
        Ok(kal::act::report::Options {
            show_reachable: self.show_reachable,
            suppressions,
            no_interrupt: self.no_interrupt,
            // pprof's in-use samples count every live block.
            keep_reachable: self.pprof.is_some(),
        })
    }
}

/// How lost blocks are reclaimed (shared by `run --reclaim` and `reclaim`).
#[derive(Args)]
pub struct ReclaimArgs {
    /// With free mode: free only blocks allocated from a stack with a frame whose function,
    /// source file or module matches PATTERN (`*`, `?`; suppression syntax). Repeatable.
    /// Needed by free mode: a pointer only a pipe, an alternate signal stack or an io_uring
    /// request holds is invisible to any scan, and a freed block cannot be brought back.
    #[arg(long = "free-sites", value_name = "PATTERN")]
    pub free_sites: Vec<String>,
    /// With free mode: free a block only once it was definitely lost in at least 3 checks
    /// spanning at least D (e.g. 60s, 10m; 0s for no age).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_age)]
    pub free_after: std::time::Duration,
    /// Bound on the agent's compressed store of parked pages: a share of the bytes parked
    /// (`25%`, with 16 MiB at least) or a size (`256M`, `1G`). When it is full, parking
    /// stops and the check line says so.
    #[arg(long, value_name = "LIMIT", default_value = "25%", value_parser = kal::act::reclaim::parse_park_limit)]
    pub park_limit: u32,
}

/// A minimum age for free mode: a duration, or 0 for none.
pub fn parse_age(s: &str) -> Result<std::time::Duration> {
    if s.trim().trim_end_matches('s').trim_end_matches("m").trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    kal::run::periodic::parse_duration(s)
}

impl ReclaimArgs {
    pub fn config(&self, mode: kal::act::reclaim::Mode) -> Result<kal::act::reclaim::Config> {
        if mode == kal::act::reclaim::Mode::Free && self.free_sites.is_empty() {
            bail!("free mode needs --free-sites PATTERN (e.g. --free-sites 'my_cache_*'): only the sites you name are freed; everything else is parked by the default mode");
        }
        Ok(kal::act::reclaim::Config {
            mode,
            free_sites: kal::act::suppress::Suppressions::parse(&self.free_sites.join("\n")),
            free_after: self.free_after,
            park_limit: self.park_limit,
        })
    }
}

/// Bytes as MiB, for messages.
pub fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
