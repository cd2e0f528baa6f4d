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
    /// Exit status when something is definitely lost (0 to 255); 0 turns this off.
    #[arg(long, value_name = "N", default_value_t = 23,
          value_parser = clap::value_parser!(i32).range(0..=255))]
    error_exitcode: i32,
    /// Frames shown per record in the text report.
    #[arg(long, value_name = "N", default_value_t = 8)]
    frames: usize,
    /// Print no text report (the JSON file and exit status still tell).
    #[arg(long, short)]
    quiet: bool,
    /// Live checks leave running the threads blocked in epoll_wait, epoll_pwait(2),
    /// sigtimedwait/sigwaitinfo, semop or semtimedop, which a stop would make return EINTR
    /// early. Their registers and stacks are then a capture gap: the report says so and
    /// nothing is reclaimed from such a check.
    #[arg(long)]
    no_interrupt: bool,
}

impl ReportArgs {
    /// The report options, with the suppressions file read; fails early on a JSON path
    /// that cannot be written.
    fn options(&self) -> Result<kal::act::report::Options> {
        if let Some(j) = &self.json {
            std::fs::File::create(j)
                .map_err(|e| anyhow!("cannot write JSON report to {}: {e}", j.display()))?;
        }
        let suppressions = match &self.suppressions {
            Some(p) => kal::act::suppress::Suppressions::load(p)?,
            None => Default::default(),
        };
        Ok(kal::act::report::Options {
            show_reachable: self.show_reachable,
            suppressions,
            no_interrupt: self.no_interrupt,
        })
    }
}

/// How lost blocks are reclaimed (shared by `run --reclaim` and `reclaim`).
#[derive(Args)]
struct ReclaimArgs {
    /// With free mode: free only blocks allocated from a stack with a frame whose function,
    /// source file or module matches PATTERN (`*`, `?`; suppression syntax). Repeatable.
    /// Needed by free mode: a pointer only a pipe, an alternate signal stack or an io_uring
    /// request holds is invisible to any scan, and a freed block cannot be brought back.
    #[arg(long = "free-sites", value_name = "PATTERN")]
    free_sites: Vec<String>,
    /// With free mode: free a block only once it was definitely lost in at least 3 checks
    /// spanning at least D (e.g. 60s, 10m; 0s for no age).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_age)]
    free_after: std::time::Duration,
    /// Bound on the agent's compressed store of parked pages: a share of the bytes parked
    /// (`25%`, with 16 MiB at least) or a size (`256M`, `1G`). When it is full, parking
    /// stops and the check line says so.
    #[arg(long, value_name = "LIMIT", default_value = "25%", value_parser = kal::act::reclaim::parse_park_limit)]
    park_limit: u32,
}

fn parse_age(s: &str) -> Result<std::time::Duration> {
    if s.trim().trim_end_matches('s').trim_end_matches("m").trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    kal::run::periodic::parse_duration(s)
}

impl ReclaimArgs {
    fn config(&self, mode: kal::act::reclaim::Mode) -> Result<kal::act::reclaim::Config> {
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
        /// The program and its arguments (put them after `--`).
        #[arg(
            required = true,
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
    Watch {
        /// Process id.
        pid: i32,
        /// Time between checks (e.g. 30s, 500ms, 5m).
        #[arg(long, value_name = "D", default_value = "30s",
              value_parser = kal::run::periodic::parse_duration)]
        every: std::time::Duration,
        /// One JSON document per check on stdout (JSON Lines; README documents the shape).
        #[arg(long)]
        json: bool,
        /// Exit with status 24 as soon as the process is forecast to reach its memory
        /// limit in less than D (e.g. 1h, 30m).
        #[arg(long, value_name = "D", value_parser = kal::run::periodic::parse_duration)]
        warn_before: Option<std::time::Duration>,
        /// Stop after N checks.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        prometheus: Option<String>,
        /// Suppressions file (as for `kal check`).
        #[arg(long, value_name = "FILE")]
        suppressions: Option<PathBuf>,
        /// Leave running the threads blocked in epoll_wait and the like (as for `kal check`).
        #[arg(long)]
        no_interrupt: bool,
    },
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
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// What `kal check` looks at.
enum Target {
    Pid(i32),
    Core(PathBuf, Option<PathBuf>),
}

fn check(target: Target, args: &ReportArgs) -> Result<i32> {
    let opts = args.options()?;
    let c = match target {
        Target::Pid(pid) => kal::check::check(pid, &opts)?,
        Target::Core(core, exe) => kal::capture::corefile::check(&core, exe.as_deref(), &opts)?,
    };
    if !args.quiet {
        kal::say_raw!("{}", kal::act::report::text(&c.report, args.frames));
    }
    if let Some(j) = &args.json {
        kal::act::report::write_json(&c.report, j)?;
    }
    Ok(if c.report.summary.direct.blocks > 0 {
        args.error_exitcode
    } else {
        0
    })
}

fn reclaim(
    pid: i32,
    mode: kal::act::reclaim::Mode,
    reclaim_args: &ReclaimArgs,
    args: &ReportArgs,
) -> Result<i32> {
    let opts = args.options()?;
    let config = reclaim_args.config(mode)?;
    let (r, done, before, after) = kal::act::reclaim::reclaim_now(pid, &opts, config)?;
    if !args.quiet {
        // The report lists each reclaimed site once, under "reclaimed so far".
        kal::say_raw!("{}", kal::act::report::text(&r, args.frames));
    }
    if let Some(why) = &done.unavailable {
        kal::say!("kal: not parking in process {pid}: {why}");
    }
    if mode == kal::act::reclaim::Mode::DryRun {
        kal::say!(
            "kal: dry run: would {} {} bytes in {} blocks in process {pid}; nothing done",
            if done.would_free {
                "free"
            } else {
                "park the pages of"
            },
            done.would.iter().map(|b| b.size).sum::<u64>(),
            done.would.len()
        );
    } else {
        kal::say!(
            "kal: parked {} bytes of {} blocks and freed {} bytes in {} blocks in process {pid} in {:.1} ms (refused: {} no longer the same allocation, {} from contradicted sites{}); RSS {:.1} MiB -> {:.1} MiB",
            done.parked.bytes,
            done.parked.blocks,
            done.freed.bytes,
            done.freed.blocks,
            done.took.as_secs_f64() * 1e3,
            done.stale,
            done.banned,
            if done.skipped > 0 { "; store limit reached (--park-limit)" } else { "" },
            mib(before),
            mib(after)
        );
    }
    if let Some(j) = &args.json {
        kal::act::report::write_json(&r, j)?;
    }
    Ok(0)
}

fn attach(pid: i32) -> Result<i32> {
    let agent = kal::run::find_agent()?;
    let a = kal::agent::attach::attach(pid, &agent)?;
    println!(
        "kal attach {pid}: agent {}, {} GOT slots redirected, program paused {:.2} ms ({} freeze{})",
        if a.again { "attached again" } else { "loaded" },
        a.slots,
        a.pause.as_secs_f64() * 1e3,
        a.tries,
        if a.tries == 1 { "" } else { "s" }
    );
    println!(
        "kal attach {pid}: blocks allocated before the attach are not in the agent's table: kal check neither scans nor counts them"
    );
    Ok(0)
}

fn detach(pid: i32) -> Result<i32> {
    kal::agent::attach::detach(pid)?;
    println!("kal detach {pid}: GOT slots restored, agent threads stopped; the program runs on");
    Ok(0)
}

fn trim(pid: i32) -> Result<i32> {
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

/// Starts the Prometheus endpoint asked for, if any.
fn metrics(addr: Option<&str>) -> Result<Option<std::sync::Arc<kal::act::metrics::Metrics>>> {
    let Some(addr) = addr else { return Ok(None) };
    let m = std::sync::Arc::new(kal::act::metrics::Metrics::default());
    let bound = kal::act::metrics::serve(addr, m.clone())?;
    kal::say!("kal: Prometheus metrics at http://{bound}/metrics");
    Ok(Some(m))
}

#[allow(clippy::too_many_arguments)]
fn watch(
    pid: i32,
    every: std::time::Duration,
    json: bool,
    warn_before: Option<std::time::Duration>,
    count: Option<u64>,
    prometheus: Option<&str>,
    suppressions: Option<&std::path::Path>,
    no_interrupt: bool,
) -> Result<i32> {
    let suppressions = match suppressions {
        Some(p) => kal::act::suppress::Suppressions::load(p)?,
        None => Default::default(),
    };
    let opts = kal::watch::Options {
        every,
        count,
        warn_before,
        json,
        report: kal::act::report::Options {
            show_reachable: true,
            suppressions,
            no_interrupt,
        },
        metrics: metrics(prometheus)?,
    };
    Ok(match kal::watch::watch(pid, &opts)? {
        kal::watch::End::Count => 0,
        kal::watch::End::Gone(why) => {
            kal::say!("kal watch {pid}: {why}");
            0
        }
        kal::watch::End::Warned { .. } => kal::watch::WARN_STATUS,
    })
}

#[allow(clippy::too_many_arguments)]
fn run(
    report: &ReportArgs,
    check_every: Option<std::time::Duration>,
    max_cpu: f64,
    reclaim: Option<kal::act::reclaim::Config>,
    freeres: bool,
    trace: bool,
    prometheus: Option<&str>,
    command: Vec<OsString>,
) -> Result<i32> {
    let opts = report.options()?;
    let metrics = metrics(prometheus)?;
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
        freeres,
        trace,
        metrics,
    })
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
            command,
        } => mode
            .map(|m| reclaim_args.config(m))
            .transpose()
            .and_then(|cfg| {
                run(
                    &report,
                    check_every,
                    max_cpu,
                    cfg,
                    !no_freeres,
                    // Periodic checks and reclaim keep kal's thread busy scanning, while a
                    // traced process's stops would wait for it.
                    trace || !(no_trace || check_every.is_some() || mode.is_some()),
                    prometheus.as_deref(),
                    command,
                )
            }),
        Cmd::Check {
            pid,
            core,
            exe,
            report,
        } => match (pid, core) {
            (_, Some(core)) => check(Target::Core(core, exe), &report),
            (Some(pid), None) => check(Target::Pid(pid), &report),
            (None, None) => Err(anyhow!("kal check needs a PID or --core FILE")),
        },
        Cmd::Reclaim {
            pid,
            mode,
            reclaim_args,
            report,
        } => reclaim(pid, mode, &reclaim_args, &report),
        Cmd::Watch {
            pid,
            every,
            json,
            warn_before,
            count,
            prometheus,
            suppressions,
            no_interrupt,
        } => watch(
            pid,
            every,
            json,
            warn_before,
            count,
            prometheus.as_deref(),
            suppressions.as_deref(),
            no_interrupt,
        ),
        Cmd::Trim { pid } => trim(pid),
        Cmd::Attach { pid } => attach(pid),
        Cmd::Detach { pid } => detach(pid),
    };
    match result {
        Ok(code) => kal::run::exit_like(code),
        Err(e) => {
            kal::say!("kal: error: {e:#}");
            std::process::exit(125);
        }
    }
}
