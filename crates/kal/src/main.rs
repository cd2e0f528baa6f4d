//! The `kal` command line.

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// kal finds memory leaks in unmodified, running Linux programs.
///
/// It preloads a small agent that records every live heap block and where it was
/// allocated, then scans the program's memory the way a conservative garbage collector
/// would: a block nothing points to is lost. It can check a running program from a
/// copy-on-write snapshot, free what it lost, and tell leaks from memory the allocator
/// merely keeps.
#[derive(Parser)]
#[command(name = "kal", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How reports are written (shared by `run` and `check`).
#[derive(Args)]
struct ReportArgs {
    /// Also write the report as JSON to FILE (README documents the shape; under `run`, a
    /// forked child's report goes to FILE.PID, and with --check-every FILE holds one JSON
    /// document per line).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// List still-reachable blocks too (they are always counted in the summary).
    #[arg(long)]
    show_reachable: bool,
    /// Suppressions file: one pattern a line (`*`, `?`), matched against the function,
    /// source file and module of every frame; `leak:` prefixes are accepted.
    #[arg(long, value_name = "FILE")]
    suppressions: Option<PathBuf>,
    /// Exit status when something is definitely lost; 0 turns this off.
    #[arg(long, value_name = "N", default_value_t = 23)]
    error_exitcode: i32,
    /// Frames shown per record in the text report.
    #[arg(long, value_name = "N", default_value_t = 8)]
    frames: usize,
    /// Print no text report (the JSON file and exit status still tell).
    #[arg(long, short)]
    quiet: bool,
}

impl ReportArgs {
    /// The report options, with the suppressions file read; fails early on a JSON path
    /// that cannot be written.
    fn options(&self) -> Result<kal::report::Options> {
        if let Some(j) = &self.json {
            std::fs::File::create(j)
                .map_err(|e| anyhow!("cannot write JSON report to {}: {e}", j.display()))?;
        }
        let suppressions = match &self.suppressions {
            Some(p) => kal::suppress::Suppressions::load(p)?,
            None => Default::default(),
        };
        Ok(kal::report::Options {
            show_reachable: self.show_reachable,
            suppressions,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a program and report its leaks when it exits.
    ///
    /// The program keeps its stdin, stdout, stderr, signals and children. When it exits
    /// (after its atexit handlers and static destructors) kal prints a leak report on
    /// stderr and exits with the program's status — or with 23 if anything was
    /// definitely lost. Forked children are reported on their own.
    ///
    /// Examples:
    ///   kal run --json report.json -- ./server --port 8080
    ///   kal run --check-every 10s -- ./server
    ///   kal run --reclaim --check-every 1s -- ./server
    #[command(arg_required_else_help = true, verbatim_doc_comment)]
    Run {
        #[command(flatten)]
        report: ReportArgs,
        /// Also check the running program every D (e.g. 10s, 500ms, 1m): each check prints,
        /// with a timestamp, what was lost since the previous one and the running totals.
        /// A check still running when the next is due makes that one skipped, never queued
        /// (see --max-cpu). A process dying of a signal is no longer checked.
        #[arg(long, value_name = "D", value_parser = kal::periodic::parse_duration)]
        check_every: Option<std::time::Duration>,
        /// Cap on kal's own CPU time for periodic checks, in percent of one core, averaged:
        /// a check that cost kal C seconds of CPU is followed by at least
        /// C / (PERCENT/100) seconds before the next one starts; the line of a check held
        /// back this way says by how long. Independently, a check is never queued behind a
        /// running one: checks that come due while one runs are skipped, and the next
        /// check's line says how many.
        #[arg(
            long,
            value_name = "PERCENT",
            requires = "check_every",
            value_parser = kal::pace::parse_percent,
            default_value_t = kal::pace::DEFAULT_MAX_CPU_PERCENT
        )]
        max_cpu: f64,
        /// Leak tolerance: after each periodic check, free the blocks that were definitely
        /// lost in it and in the previous one (needs --check-every). Refused, with a note,
        /// for a process whose allocations were not all recorded, and never done in a
        /// process dying of a signal.
        #[arg(long, requires = "check_every")]
        reclaim: bool,
        /// The program and its arguments (put them after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROGRAM"
        )]
        command: Vec<OsString>,
    },
    /// Check a running process (started under `kal run`) for leaks, now.
    ///
    /// The process is paused only while a copy-on-write snapshot is made (milliseconds);
    /// the snapshot is scanned while the program runs on. Exit status 23 when something
    /// is definitely lost. A process dying of a signal is left alone (a one-line error).
    ///
    /// Example: kal check 4242 --json now.json
    Check {
        /// Process id.
        pid: i32,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Free what a running process (started under `kal run`) has definitely lost.
    ///
    /// Takes two snapshots in a row and asks the agent to free, with the program's own
    /// `free`, every block definitely lost in both (the agent checks each block's
    /// allocation sequence number first), then returns free pages to the OS. Never touches
    /// possibly lost or reachable blocks. Refuses, with a one-line error, a process whose
    /// allocations the agent did not all record, or that is dying of a signal.
    ///
    /// Example: kal reclaim 4242
    Reclaim {
        /// Process id.
        pid: i32,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Make a running process (started under `kal run`) give free memory back to the OS.
    ///
    /// Runs malloc_trim(0) inside it (glibc) and prints its RSS before and after. Use it
    /// when a report says the allocator keeps a lot of freed memory.
    ///
    /// Example: kal trim 4242
    Trim {
        /// Process id.
        pid: i32,
    },
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn check(pid: i32, args: &ReportArgs) -> Result<i32> {
    let opts = args.options()?;
    let c = kal::check::check(pid, &opts)?;
    if !args.quiet {
        eprint!("{}", kal::report::text(&c.report, args.frames));
    }
    if let Some(j) = &args.json {
        kal::report::write_json(&c.report, j)?;
    }
    Ok(if c.report.summary.direct.blocks > 0 {
        args.error_exitcode
    } else {
        0
    })
}

fn reclaim(pid: i32, args: &ReportArgs) -> Result<i32> {
    let opts = args.options()?;
    let (r, done, before, after) = kal::reclaim::reclaim_now(pid, &opts)?;
    if !args.quiet {
        eprint!("{}", kal::report::text(&r, args.frames));
        for s in &r.reclaimed.sites {
            eprintln!(
                "    reclaimed {} bytes in {} blocks at {}",
                s.bytes,
                s.blocks,
                kal::report::where_(&s.stack)
            );
        }
    }
    eprintln!(
        "kal: reclaimed {} bytes in {} blocks in process {pid} in {:.1} ms (refused: {} no longer the same allocation, {} from contradicted sites); RSS {:.1} MiB -> {:.1} MiB",
        done.total.bytes,
        done.total.blocks,
        done.took.as_secs_f64() * 1e3,
        done.stale,
        done.banned,
        mib(before),
        mib(after)
    );
    if let Some(j) = &args.json {
        kal::report::write_json(&r, j)?;
    }
    Ok(0)
}

fn trim(pid: i32) -> Result<i32> {
    kal::agent::find_header(pid)?;
    let before = kal::control::rss(pid)?;
    if !kal::control::trim(pid)? {
        bail!("the allocator of process {pid} is not glibc's: kal cannot trim it yet");
    }
    let after = kal::control::rss(pid)?;
    println!(
        "kal trim {pid}: RSS {:.1} MiB -> {:.1} MiB (returned {:.1} MiB to the OS)",
        mib(before),
        mib(after),
        mib(before.saturating_sub(after))
    );
    Ok(0)
}

fn run(
    report: &ReportArgs,
    check_every: Option<std::time::Duration>,
    max_cpu: f64,
    reclaim: bool,
    command: Vec<OsString>,
) -> Result<i32> {
    let opts = report.options()?;
    let mut command = command.into_iter();
    let program = command.next().ok_or_else(|| anyhow!("no program to run"))?;
    kal::run::run(&kal::run::RunOptions {
        program,
        args: command.collect(),
        json: report.json.clone(),
        report: opts,
        error_exitcode: report.error_exitcode,
        frames: report.frames,
        quiet: report.quiet,
        check_every,
        reclaim,
        max_cpu_percent: max_cpu,
    })
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Run {
            report,
            check_every,
            max_cpu,
            reclaim,
            command,
        } => run(&report, check_every, max_cpu, reclaim, command),
        Cmd::Check { pid, report } => check(pid, &report),
        Cmd::Reclaim { pid, report } => reclaim(pid, &report),
        Cmd::Trim { pid } => trim(pid),
    };
    match result {
        Ok(code) => kal::run::exit_like(code),
        Err(e) => {
            eprintln!("kal: error: {e:#}");
            std::process::exit(125);
        }
    }
}
