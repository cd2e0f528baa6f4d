//! The `kal` command line.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// kal finds memory leaks in unmodified, running Linux programs.
///
/// It preloads a small agent that records every live heap block and where it was
/// allocated, then scans the program's memory the way a conservative garbage collector
/// would: a block nothing points to is lost.
#[derive(Parser)]
#[command(name = "kal", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    /// Example: kal run --json report.json -- ./server --port 8080
    #[command(arg_required_else_help = true)]
    Run {
        /// Also write the report as JSON to FILE (a forked child's goes to FILE.PID).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// List still-reachable blocks too (they are always counted in the summary).
        #[arg(long)]
        show_reachable: bool,
        /// Suppressions file: one pattern a line (`*`, `?`), matched against the function,
        /// source file and module of every frame; `leak:` prefixes are accepted.
        #[arg(long, value_name = "FILE")]
        suppressions: Option<PathBuf>,
        /// Exit status when something is definitely lost; 0 keeps the program's own.
        #[arg(long, value_name = "N", default_value_t = 23)]
        error_exitcode: i32,
        /// Frames shown per record in the text report.
        #[arg(long, value_name = "N", default_value_t = 8)]
        frames: usize,
        /// Print no text report (the JSON file and exit status still tell).
        #[arg(long, short)]
        quiet: bool,
        /// Also check the running program every D (e.g. 10s, 500ms, 1m): each check prints,
        /// with a timestamp, what was lost since the previous one and the running totals.
        /// With --json, FILE then gets one JSON document per line: one per check, and the
        /// exit report last (with "at_exit": true).
        #[arg(long, value_name = "D", value_parser = kal::periodic::parse_duration)]
        check_every: Option<std::time::Duration>,
        /// Leak tolerance: after each periodic check, free the blocks that were definitely
        /// lost in it and in the previous one (needs --check-every).
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
    /// is definitely lost.
    ///
    /// Example: kal check 4242 --json now.json
    Check {
        /// Process id.
        pid: i32,
        /// Also write the report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// List still-reachable blocks too.
        #[arg(long)]
        show_reachable: bool,
        /// Suppressions file (see `kal run --help`).
        #[arg(long, value_name = "FILE")]
        suppressions: Option<PathBuf>,
        /// Exit status when something is definitely lost; 0 means always 0.
        #[arg(long, value_name = "N", default_value_t = 23)]
        error_exitcode: i32,
        /// Frames shown per record in the text report.
        #[arg(long, value_name = "N", default_value_t = 8)]
        frames: usize,
        /// Print no text report.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Free what a running process (started under `kal run`) has definitely lost.
    ///
    /// Takes two snapshots in a row and asks the agent to free, with the program's own
    /// `free`, every block definitely lost in both (the agent checks each block's
    /// allocation sequence number first), then returns free pages to the OS. Never touches
    /// possibly lost or reachable blocks.
    ///
    /// Example: kal reclaim 4242
    Reclaim {
        /// Process id.
        pid: i32,
        /// Also write the report (with "reclaimed") as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Suppressions file (for the report).
        #[arg(long, value_name = "FILE")]
        suppressions: Option<PathBuf>,
        /// Frames shown per record in the text report.
        #[arg(long, value_name = "N", default_value_t = 8)]
        frames: usize,
        /// Print only the one-line result.
        #[arg(long, short)]
        quiet: bool,
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

fn load_suppressions(p: Option<PathBuf>) -> anyhow::Result<kal::suppress::Suppressions> {
    match p {
        Some(p) => kal::suppress::Suppressions::load(&p),
        None => Ok(Default::default()),
    }
}

fn check(
    pid: i32,
    json: Option<PathBuf>,
    report: kal::report::Options,
    error_exitcode: i32,
    frames: usize,
    quiet: bool,
) -> anyhow::Result<i32> {
    if let Some(j) = &json {
        std::fs::File::create(j)
            .map_err(|e| anyhow::anyhow!("cannot write JSON report to {}: {e}", j.display()))?;
    }
    let c = kal::check::check(pid, &report)?;
    if !quiet {
        eprint!("{}", kal::report::text(&c.report, frames));
    }
    if let Some(j) = &json {
        kal::report::write_json(&c.report, j)?;
    }
    Ok(if c.report.summary.direct.blocks > 0 {
        error_exitcode
    } else {
        0
    })
}

fn reclaim(
    pid: i32,
    json: Option<PathBuf>,
    report: kal::report::Options,
    frames: usize,
    quiet: bool,
) -> anyhow::Result<i32> {
    if let Some(j) = &json {
        std::fs::File::create(j)
            .map_err(|e| anyhow::anyhow!("cannot write JSON report to {}: {e}", j.display()))?;
    }
    let (r, done, before, after) = kal::reclaim::reclaim_now(pid, &report)?;
    if !quiet {
        eprint!("{}", kal::report::text(&r, frames));
        for s in &r.reclaimed.sites {
            eprintln!(
                "    reclaimed {} bytes in {} blocks at {}",
                s.bytes,
                s.blocks,
                kal::report::where_(&s.stack)
            );
        }
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "kal: reclaimed {} bytes in {} blocks in process {pid} in {:.1} ms (refused: {} no longer the same allocation, {} from contradicted sites); RSS {:.1} MiB -> {:.1} MiB",
        done.total.bytes, done.total.blocks,
        done.took.as_secs_f64() * 1e3,
        done.stale, done.banned, mib(before), mib(after)
    );
    if let Some(j) = &json {
        kal::report::write_json(&r, j)?;
    }
    Ok(0)
}

fn trim(pid: i32) -> anyhow::Result<i32> {
    kal::agent::find_header(pid)?;
    let before = kal::control::rss(pid)?;
    if !kal::control::trim(pid)? {
        anyhow::bail!("the allocator of process {pid} is not glibc's: kal cannot trim it yet");
    }
    let after = kal::control::rss(pid)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "kal trim {pid}: RSS {:.1} MiB -> {:.1} MiB (returned {:.1} MiB to the OS)",
        mib(before),
        mib(after),
        mib(before.saturating_sub(after))
    );
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run {
            json,
            show_reachable,
            suppressions,
            error_exitcode,
            frames,
            quiet,
            check_every,
            reclaim,
            command,
        } => (|| {
            let suppressions = match suppressions {
                Some(p) => kal::suppress::Suppressions::load(&p)?,
                None => Default::default(),
            };
            let mut command = command.into_iter();
            let program = command.next().expect("clap requires a program");
            kal::run::run(&kal::run::RunOptions {
                program,
                args: command.collect(),
                json,
                report: kal::report::Options {
                    show_reachable,
                    suppressions,
                },
                error_exitcode,
                frames,
                quiet,
                check_every,
                reclaim,
            })
        })(),
        Cmd::Check {
            pid,
            json,
            show_reachable,
            suppressions,
            error_exitcode,
            frames,
            quiet,
        } => load_suppressions(suppressions).and_then(|suppressions| {
            check(
                pid,
                json,
                kal::report::Options {
                    show_reachable,
                    suppressions,
                },
                error_exitcode,
                frames,
                quiet,
            )
        }),
        Cmd::Reclaim {
            pid,
            json,
            suppressions,
            frames,
            quiet,
        } => load_suppressions(suppressions).and_then(|suppressions| {
            reclaim(
                pid,
                json,
                kal::report::Options {
                    show_reachable: false,
                    suppressions,
                },
                frames,
                quiet,
            )
        }),
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
