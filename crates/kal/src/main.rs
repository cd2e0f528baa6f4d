//! The `kal` command line.

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

mod cmd;

use cmd::args::{ReclaimArgs, ReportArgs};
use cmd::check::Target;

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
    ///   kal run --check-every 10s --prometheus 127.0.0.1:9464 -- ./server
    ///   kal run --check-every 10s --attach 4242
    ///   kal run --check-every 30s --html report.html --pprof lost.pb.gz -- ./server
    ///   kal run --reclaim --check-every 1s -- ./server
    ///   kal run --reclaim=dry-run --check-every 10s -- ./server
    ///   kal run --reclaim=free --free-sites 'cache_*' --check-every 10s -- ./server
    #[command(arg_required_else_help = true, verbatim_doc_comment)]
    Run {
        #[command(flatten)]
        report: ReportArgs,
        /// Also check the running program every D (e.g. 10s, 500ms, 1m): each check prints,
        /// with a timestamp, what was lost since the previous one and the running totals.
        /// A check still running when the next is due makes that one skipped, never queued
        /// (see --max-cpu). A process dying of a signal is no longer checked. Each check
        /// also updates the process's growth and the forecast of when it reaches its memory
        /// limit (a `forecast:` line once one is in sight; see `kal watch --help`).
        #[arg(long, value_name = "D", value_parser = kal::run::periodic::parse_duration)]
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
            value_parser = kal::run::pace::parse_percent,
            default_value_t = kal::run::pace::DEFAULT_MAX_CPU_PERCENT
        )]
        max_cpu: f64,
        /// Leak tolerance (needs --check-every). `--reclaim` or `--reclaim=park` parks the
        /// blocks definitely lost in two checks in a row: their whole pages are copied,
        /// compressed and dropped from memory, and put back, byte for byte, the moment
        /// anything touches them (userfaultfd; the allocator never sees a thing). A touch of
        /// a parked block's own bytes bans its site. `--reclaim=free` frees, with the
        /// program's free(), blocks from the sites named with --free-sites once lost in 3
        /// checks spanning --free-after. `--reclaim=dry-run` says what would be parked (with
        /// --free-sites: freed) and does nothing. Refused, with a note, for a process whose
        /// allocations were not all recorded, and never done in a process dying of a signal.
        #[arg(
            long,
            value_name = "MODE",
            requires = "check_every",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "park"
        )]
        reclaim: Option<kal::act::reclaim::Mode>,
        #[command(flatten)]
        reclaim_args: ReclaimArgs,
        /// Serve Prometheus metrics of every checked process at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9464; needs --check-every): see `kal watch --help` and README.
        #[arg(long, value_name = "ADDR", requires = "check_every")]
        prometheus: Option<String>,
        /// Do not run glibc's __libc_freeres and libstdc++'s __gnu_cxx::__freeres when a
        /// process exits. By default they run, as under memcheck, after the atexit handlers,
        /// destructors and stdio flush, when the exiting thread is the program's last: what
        /// they free (the C++ exception pool, stdio buffers, cached thread stacks, loader
        /// data) is then not counted as still reachable, and the four counts equal memcheck's.
        #[arg(long)]
        no_freeres: bool,
        /// Do not trace the program's processes. Without --check-every and --reclaim, kal
        /// run is by default their ptrace tracer (as their parent), so that a process dying
        /// of a signal (SIGSEGV, an unhandled SIGTERM, raise(SIGABRT)…) is read at its
        /// death and reported; meanwhile gdb or strace cannot attach to them. With this
        /// flag they can, and such a death gets one line instead of a report.
        #[arg(long, conflicts_with = "trace")]
        no_trace: bool,
        /// Trace the program's processes also with --check-every or --reclaim (not done by
        /// default there: while kal scans a check, a traced process's signals and new
        /// threads wait for kal, which would pause the program longer than the snapshot).
        #[arg(long)]
        trace: bool,
        /// Check (and with --reclaim, reclaim in) this running process, started without
        /// kal, instead of running a program: the agent is loaded into it first if it is
        /// not there (as `kal attach` does) and stays when kal stops. Needs --check-every.
        #[arg(
            long,
            value_name = "PID",
            requires = "check_every",
            conflicts_with_all = ["command", "trace"]
        )]
        attach: Option<i32>,
        /// The program and its arguments (put them after `--`).
        #[arg(
            required_unless_present = "attach",
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROGRAM"
        )]
        command: Vec<OsString>,
    },
    /// Check a running process for leaks, now.
    ///
    /// The process is paused only while a copy-on-write snapshot is made (milliseconds);
    /// the snapshot is scanned while the program runs on. Exit status 23 when something
    /// is definitely lost. A process dying of a signal is left alone (a one-line error).
    /// A process not started under `kal run` is checked from glibc's own heap: the same
    /// classes and counts, without allocation stacks.
    ///
    /// With --core FILE, checks an ELF core file instead (gcore, a kernel core dump),
    /// on this host or another: blocks from the agent's table when the process ran under
    /// `kal run`, else from glibc's heap in the core; symbols from the files the core
    /// names, or --exe for the executable.
    ///
    /// Examples:
    ///   kal check 4242 --json now.json
    ///   kal check 4242 --pprof lost.pb.gz --flamegraph lost.svg --html report.html
    ///   kal check --core core.4242 --exe /usr/sbin/server
    #[command(verbatim_doc_comment)]
    Check {
        /// Process id.
        #[arg(required_unless_present = "core", conflicts_with = "core")]
        pid: Option<i32>,
        /// Check this ELF core file instead of a running process.
        #[arg(long, value_name = "FILE")]
        core: Option<PathBuf>,
        /// With --core: the executable the core's process ran, when it is not at the path
        /// the core names (its build id must match the core's).
        #[arg(long, value_name = "FILE", requires = "core")]
        exe: Option<PathBuf>,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Park (or free) what a running process (started under `kal run`) has definitely lost.
    ///
    /// Takes two snapshots in a row and asks the agent to park every block definitely
    /// lost in both (the agent checks each block's allocation sequence number first): its
    /// whole pages are dropped from memory and restored exactly if anything touches them.
    /// With `--mode free --free-sites PATTERN`, takes three snapshots spanning
    /// --free-after and frees, with the program's own `free`, the blocks lost in all three
    /// from the sites named. Never touches possibly lost or reachable blocks. Refuses, with
    /// a one-line error, a process whose allocations the agent did not all record, or that
    /// is dying of a signal.
    ///
    /// Examples:
    ///   kal reclaim 4242
    ///   kal reclaim 4242 --mode dry-run
    ///   kal reclaim 4242 --mode free --free-sites 'cache_*' --free-after 10s
    #[command(verbatim_doc_comment)]
    Reclaim {
        /// Process id.
        pid: i32,
        /// park (the default), free (with --free-sites) or dry-run.
        #[arg(long, value_name = "MODE", default_value = "park")]
        mode: kal::act::reclaim::Mode,
        #[command(flatten)]
        reclaim_args: ReclaimArgs,
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
    /// Watch a running process: check it every D, show its memory, its growth, and when
    /// it will reach its memory limit.
    ///
    /// Works on any process `kal check` can check (started under `kal run`, attached, or
    /// without the agent). Each check adds a point: RSS, live, lost, retained, reclaimed
    /// bytes, and per allocation site its lost and live bytes. The growth rates are a
    /// robust (Theil-Sen) fit over the last 60 checks, so one odd check does not swing
    /// them. The forecast is the time until the process reaches the first of its limits:
    /// its cgroup's memory.max (v2) or memory.limit_in_bytes (v1), RLIMIT_AS, or the
    /// machine's available memory, with the allocation site growing fastest.
    ///
    /// On a terminal the view is redrawn after each check; otherwise one line a check
    /// (--json: one JSON document a line). Exit status: 0 after --count checks or when the
    /// process ends; 24 when the forecast falls below --warn-before; 125 on an error.
    ///
    /// Examples:
    ///   kal watch 4242
    ///   kal watch 4242 --every 30s --prometheus 127.0.0.1:9464
    ///   kal watch 4242 --every 1m --warn-before 1h --count 1 || page-someone
    ///   kal watch 4242 --every 10s --json >> growth.jsonl
    #[command(verbatim_doc_comment)]
    Watch(cmd::watch::WatchArgs),
    /// Load the agent into a running process started without kal (glibc malloc, dynamically
    /// linked): allocation stacks from now on, for `kal check`.
    ///
    /// Example: kal attach 4242
    Attach {
        /// Process id.
        pid: i32,
    },
    /// Stop recording in a process `kal attach` loaded the agent into: the program runs on.
    ///
    /// Example: kal detach 4242
    Detach {
        /// Process id.
        pid: i32,
    },
    /// Compare two JSON reports: the sites whose lost or live bytes grew, by growth.
    ///
    /// A site is an allocation stack without addresses, so reports of two runs of one
    /// program compare too. Per site: lost (definitely and indirectly) and live bytes and
    /// blocks before, after and the growth; live counts include still-reachable blocks
    /// when the reports were written with --show-reachable.
    ///
    /// Examples:
    ///   kal check 4242 --json before.json --show-reachable
    ///   kal check 4242 --json after.json --show-reachable    # a while later
    ///   kal diff before.json after.json
    ///   kal diff before.json after.json --json growth.json --flamegraph growth.svg
    #[command(verbatim_doc_comment)]
    Diff(cmd::diff::DiffArgs),
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Run {
            report,
            check_every,
            max_cpu,
            reclaim: mode,
            reclaim_args,
            prometheus,
            no_freeres,
            no_trace,
            trace,
            attach,
            command,
        } => mode
            .map(|m| reclaim_args.config(m))
            .transpose()
            .and_then(|cfg| {
                cmd::run::run(
                    &report,
                    check_every,
                    max_cpu,
                    cfg,
                    !no_freeres,
                    // Periodic checks and reclaim keep kal's thread busy scanning, while a
                    // traced process's stops would wait for it.
                    trace || !(no_trace || check_every.is_some() || mode.is_some()),
                    prometheus.as_deref(),
                    (attach, command),
                )
            }),
        Cmd::Check {
            pid,
            core,
            exe,
            report,
        } => match (pid, core) {
            (_, Some(core)) => cmd::check::run(Target::Core(core, exe), &report),
            (Some(pid), None) => cmd::check::run(Target::Pid(pid), &report),
            (None, None) => Err(anyhow!("kal check needs a PID or --core FILE")),
        },
        Cmd::Reclaim {
            pid,
            mode,
            reclaim_args,
            report,
        } => cmd::reclaim::run(pid, mode, &reclaim_args, &report),
        Cmd::Watch(args) => cmd::watch::run(&args),
        Cmd::Trim { pid } => cmd::trim::run(pid),
        Cmd::Attach { pid } => cmd::attach::attach(pid),
        Cmd::Detach { pid } => cmd::attach::detach(pid),
        Cmd::Diff(args) => cmd::diff::run(&args),
    };
    match result {
        Ok(code) => kal::run::exit_like(code),
        Err(e) => {
            kal::say!("kal: error: {e:#}");
            std::process::exit(125);
        }
    }
}
