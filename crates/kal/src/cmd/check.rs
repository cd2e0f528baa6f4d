//! `kal check PID` and `kal check --core FILE`: one leak check, its report written.

use super::args::ReportArgs;
use anyhow::Result;
use std::path::PathBuf;
/// What `kal check` looks at.
pub enum Target {
    /// A live process.
    Pid(i32),
    /// A core file, and the executable when it is not where the core says.
    Core(PathBuf, Option<PathBuf>),
}

/// Runs `kal check`; exit status as README says.
pub fn run(target: Target, args: &ReportArgs) -> Result<i32> {
    let outputs = args.outputs(false)?;
    let opts = args.options()?;
    let c = match target {
        Target::Pid(pid) => kal::check::check(pid, &opts)?,
        Target::Core(core, exe) => kal::capture::corefile::check(&core, exe.as_deref(), &opts)?,
    };
    outputs.write(&c.report, &Default::default())?;
    Ok(if c.report.summary.direct.blocks > 0 {
        args.error_exitcode
    } else {
        0
    })
}
