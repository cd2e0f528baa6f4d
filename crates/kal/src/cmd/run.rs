//! `kal run -- PROGRAM` (and `kal run --attach PID`): the program under kal, its reports.

use super::args::ReportArgs;
use anyhow::{anyhow, Result};
use std::ffi::OsString;
/// Runs `kal run`; exit status as README says.
#[allow(clippy::too_many_arguments)]
pub fn run(
    report: &ReportArgs,
    check_every: Option<std::time::Duration>,
    max_cpu: f64,
    reclaim: Option<kal::act::reclaim::Config>,
    freeres: bool,
    trace: bool,
    prometheus: Option<&str>,
    target: (Option<i32>, Vec<OsString>),
) -> Result<i32> {
    let metrics = super::watch::metrics(prometheus)?;
    let outputs = report.outputs(check_every.is_some())?;
    let opts = report.options()?;
    let (attach, command) = target;
    let mut command = command.into_iter();
    let program = match attach {
        Some(_) => OsString::new(),
        None => command.next().ok_or_else(|| anyhow!("no program to run"))?,
    };
    let run_opts = kal::run::RunOptions {
        program,
        args: command.collect(),
        outputs,
        report: opts,
        error_exitcode: report.error_exitcode,
        check_every,
        reclaim,
        max_cpu_percent: max_cpu,
        freeres,
        trace,
        metrics,
    };
    match attach {
        Some(pid) => kal::run::attached::run(&run_opts, pid),
        None => kal::run::run(&run_opts),
    }
}
