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
        /// The program and its arguments (put them after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROGRAM"
        )]
        command: Vec<OsString>,
    },
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
            })
        })(),
    };
    match result {
        Ok(code) => kal::run::exit_like(code),
        Err(e) => {
            eprintln!("kal: error: {e:#}");
            std::process::exit(125);
        }
    }
}
