//! `kal watch PID`: a check every D, the process's growth and when it reaches its memory
//! limit; and the Prometheus endpoint that `watch` and `run --check-every` share.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Options of `kal watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// Process id.
    pub pid: i32,
    /// Time between checks (e.g. 30s, 500ms, 5m).
    #[arg(long, value_name = "D", default_value = "30s",
          value_parser = kal::run::periodic::parse_duration)]
    pub every: std::time::Duration,
    /// One JSON document per check on stdout (JSON Lines; README documents the shape).
    #[arg(long)]
    pub json: bool,
    /// Exit with status 24 as soon as the process is forecast to reach its memory
    /// limit in less than D (e.g. 1h, 30m).
    #[arg(long, value_name = "D", value_parser = kal::run::periodic::parse_duration)]
    pub warn_before: Option<std::time::Duration>,
    /// Stop after N checks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub prometheus: Option<String>,
    /// Suppressions file (as for `kal check`).
    #[arg(long, value_name = "FILE")]
    pub suppressions: Option<PathBuf>,
    /// Leave running the threads blocked in epoll_wait and the like (as for `kal check`).
    #[arg(long)]
    pub no_interrupt: bool,
}

/// Starts the Prometheus endpoint asked for, if any.
pub fn metrics(addr: Option<&str>) -> Result<Option<Arc<kal::act::metrics::Metrics>>> {
    let Some(addr) = addr else { return Ok(None) };
    let m = Arc::new(kal::act::metrics::Metrics::default());
    let bound = kal::act::metrics::serve(addr, m.clone())?;
    kal::say!("kal: Prometheus metrics at http://{bound}/metrics");
    Ok(Some(m))
}

/// Runs `kal watch`; exit status 0, or 24 (`kal::watch::WARN_STATUS`) when warned.
pub fn run(args: &WatchArgs) -> Result<i32> {
    let suppressions = match &args.suppressions {
        Some(p) => kal::act::suppress::Suppressions::load(p)?,
        None => Default::default(),
    };
    let opts = kal::watch::Options {
        every: args.every,
        count: args.count,
        warn_before: args.warn_before,
        json: args.json,
        report: kal::act::report::Options {
            show_reachable: true,
            suppressions,
            no_interrupt: args.no_interrupt,
            keep_reachable: false,
        },
        metrics: metrics(args.prometheus.as_deref())?,
    };
    let pid = args.pid;
    Ok(match kal::watch::watch(pid, &opts)? {
        kal::watch::End::Count => 0,
        kal::watch::End::Gone(why) => {
            kal::say!("kal watch {pid}: {why}");
            0
        }
        kal::watch::End::Warned { .. } => kal::watch::WARN_STATUS,
    })
}
