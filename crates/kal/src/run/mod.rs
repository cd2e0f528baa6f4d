//! `kal run`: launch a program with the agent preloaded and report its leaks when it exits
//! (and those of every process it forks), keeping its stdio, exit status and signals.

pub mod attached;
pub mod ended;
pub mod pace;
pub mod periodic;
pub mod trace;
pub mod without_agent;

use crate::act::report;
use crate::capture::capture;
use crate::capture::freeze::Frozen;
use anyhow::{bail, Context, Result};
use kal_proto::{Hello, MsgKind, HELLO_SIZE};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// What `kal run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Program to run (a path, or a name looked up in `PATH`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The outputs of the launched process's report (forked children's files get
    /// `FILE.PID`; with `check_every` the JSON file is a JSON Lines file).
    pub outputs: crate::act::sink::Outputs,
    /// Report options.
    pub report: report::Options,
    /// Exit status when something is definitely lost (0: keep the program's status).
    pub error_exitcode: i32,
    /// Check every live process this often (`--check-every`); JSON becomes JSON lines.
    pub check_every: Option<Duration>,
    /// Reclaim after periodic checks (`--reclaim[=MODE]` and its options), if asked.
    pub reclaim: Option<crate::act::reclaim::Config>,
    /// Cap on kal's own CPU time for periodic checks, in percent of one core
    /// (`--max-cpu`).
    pub max_cpu_percent: f64,
    /// Run glibc's `__libc_freeres` and libstdc++'s `__gnu_cxx::__freeres` at exit, as
    /// memcheck does (`--no-freeres` turns this off).
    pub freeres: bool,
    /// Trace every process that says hello ([`crate::run::trace`]), so that one dying of a
    /// signal is reported (`--no-trace` turns this off).
    pub trace: bool,
    /// Metrics to update after each periodic check (`--prometheus`, served elsewhere).
    pub metrics: Option<std::sync::Arc<crate::act::metrics::Metrics>>,
}

/// Finds `libkal_agent.so`: `$KAL_AGENT`, next to the kal executable, in `../lib/kal`, or
/// else the agent embedded in kal, written out once (see [`crate::agent::embedded`]).
pub fn find_agent() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KAL_AGENT") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("KAL_AGENT names {}, which does not exist", p.display());
    }
    let exe = std::env::current_exe().context("cannot find the kal executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [
        dir.join("libkal_agent.so"),
        dir.join("../libkal_agent.so"),
        dir.join("../lib/kal/libkal_agent.so"),
    ] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    crate::agent::embedded::path().with_context(|| {
        format!(
            "cannot write kal's embedded agent, and there is no libkal_agent.so next to {} (set KAL_AGENT to one)",
            exe.display()
        )
    })
}

/// Resolves a program name like `execvp` does.
pub fn resolve_program(p: &OsString) -> Result<PathBuf> {
    let path = Path::new(p);
    let found = if path.as_os_str().as_encoded_bytes().contains(&b'/') {
        path.is_file().then(|| path.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(path))
                .find(|c| c.is_file())
        })
    };
    let Some(found) = found else {
        bail!("program not found: {}", path.display());
    };
    let meta = std::fs::metadata(&found)?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
        bail!("program is not executable: {}", found.display());
    }
    Ok(found)
}

static FORWARD: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(sig: i32) {
    FORWARD.store(sig, Ordering::Relaxed);
}

/// Lets the program alone receive terminal signals; forwards termination requests to it.
fn setup_signals() {
    // SAFETY: installing dispositions for this process; the handler only stores an atomic.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        for s in [libc::SIGTERM, libc::SIGHUP] {
            libc::signal(s, remember_signal as *const () as libc::sighandler_t);
        }
    }
}

static CHLD_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: i32) {
    let fd = CHLD_PIPE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; one byte from a static buffer to our own pipe
    // (non-blocking: a full pipe already wakes the loop). errno is saved and restored.
    unsafe {
        let e = *libc::__errno_location();
        libc::write(fd, b"c".as_ptr().cast(), 1);
        *libc::__errno_location() = e;
    }
}

/// A pipe that becomes readable whenever a child or tracee of kal changes state
/// (`SIGCHLD`, which the kernel also sends to a tracer at each ptrace stop): the loop wakes
/// at once to resume a stopped tracee. Its read end, or `None`.
fn sigchld_pipe() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    CHLD_PIPE.store(fds[1], Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; the handler only writes to a pipe. SA_RESTART
    // keeps kal's own calls going; no SA_NOCLDSTOP (ptrace stops must be notified).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
    // SAFETY: the read end was just created and is owned by nobody else.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) })
}

struct Conn {
    stream: UnixStream,
    /// A loan of this process to another kal ([`crate::run::trace::borrow`]), open while this
    /// connection is.
    lend: Option<i32>,
    pid: Option<i32>,
    header: u64,
    /// A pidfd of the process that said hello: how it ended, should it end unreported.
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Conn {
    /// A connection just accepted on kal's socket: blocking reads, each within 2 s.
    fn accepted(stream: UnixStream) -> Result<Conn> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn {
            stream,
            lend: None,
            pid: None,
            header: 0,
            pidfd: None,
        })
    }
}

/// Runs the program and reports; returns the exit status kal should exit with
/// (a negative value `-SIG` means "die of signal SIG").
pub fn run(opts: &RunOptions) -> Result<i32> {
    let program = resolve_program(&opts.program)?;
    crate::agent::elf::check_preloadable(&program)?;
    let own = crate::agent::elf::own_allocator(&program);
    if !own.is_empty() {
        crate::say!(
            "kal: {} defines its own {}: allocations made through it never reach the C library and are not tracked (only those that do are)",
            program.display(),
            own.join("/")
        );
    }
    let agent = find_agent()?;

    // Private whatever the umask: only kal and the program's processes may say hello.
    let dir = tempfile::Builder::new()
        .prefix("kal-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("cannot create a private directory")?;
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).context("cannot create the agent socket")?;
    crate::run::trace::set_own_socket(&sock);
    listener.set_nonblocking(true)?;

    // LD_PRELOAD splits on spaces and colons: an agent whose path holds one is loaded
    // through a link in kal's private directory.
    let agent = if agent
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .any(|&c| c == b' ' || c == b':' || c == b'\t')
    {
        let link = dir.path().join("libkal_agent.so");
        std::os::unix::fs::symlink(&agent, &link)
            .context("cannot link the agent into kal's private directory")?;
        link
    } else {
        agent
    };
    let mut without_agent = crate::run::without_agent::WithoutAgent::new(&agent);
    let mut preload = agent.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    // Orphans of the program (a daemon whose parent exited) are adopted by kal rather than
    // by init: they stay descendants kal accepts, reports and reaps.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args)
        .env("LD_PRELOAD", preload)
        .env(kal_proto::ENV_SOCKET, &sock);
    if !opts.freeres {
        cmd.env(kal_proto::ENV_NO_FREERES, "1");
    }
    if opts.trace {
        cmd.env(kal_proto::ENV_HELLO_ACK, "1");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let main_pid = child.id() as i32;
    setup_signals();
    // kal traces from this thread only; it also reaps every child then (`Child::try_wait`
    // would take a ptrace stop for an exit).
    let mut tracer = opts.trace.then(crate::run::trace::Tracer::new);
    let chld = if opts.trace { sigchld_pipe() } else { None };
    if opts.trace {
        crate::agent::control::set_wait_hook(crate::run::trace::service_stops);
    }
    // How the program ended, should its status be collected by a wait for one thread.
    let main_end = crate::run::ended::Pending::new(main_pid, crate::run::ended::open(main_pid));

    let mut conns: Vec<Conn> = Vec::new();
    let mut status: Option<ExitStatus> = None;
    let mut lost = false;
    let mut hellos = 0usize;
    // Processes that said they exit (their hello connection then closes), and those whose
    // connection closed without that: ended unread, or exec'd.
    let mut reported: Vec<i32> = Vec::new();
    let mut pending: Vec<crate::run::ended::Pending> = Vec::new();
    // One symbolizer for every exit report: it keeps each module's debug info, which
    // takes most of a report's time to read again (libc's is compressed), so a program
    // whose children exit by the hundred does not wait for it each time.
    let symbols = crate::attribute::symbolize::Symbols::new();
    // Exit captures on worker threads, unless kal traces the program's processes: a
    // tracer is one thread, which must make every ptrace request (see `crate::run::trace`).
    let workers = (opts.check_every.is_none() && !opts.trace)
        .then(|| ExitWorkers::start(exit_threads(), main_pid, opts));
    let mut periodic = opts.check_every.map(|every| {
        let pacer = crate::run::pace::Pacer::new(every, opts.max_cpu_percent);
        crate::run::periodic::Periodic::new(pacer, opts.report.clone(), opts.outputs.json.clone())
            .with_reclaim(opts.reclaim.clone())
            .with_files(&opts.outputs, main_pid)
            .with_metrics(opts.metrics.clone())
    });
    loop {
        let mut wait_ms = 50;
        if let Some(p) = periodic.as_mut() {
            if p.pacer.due(Instant::now()) {
                // One round: every live process once. Rounds never overlap; those that
                // came due meanwhile are skipped, and counted, by the pacer.
                let round = p.pacer.begin();
                for c in conns.iter().filter(|c| c.pid.is_some()) {
                    let pid = c.pid.unwrap_or(0);
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        continue; // exited since its last message: nothing to check
                    }
                    if tracer.as_ref().is_some_and(|t| t.is_lent(pid)) {
                        continue; // lent to another kal, which checks it now
                    }
                    if let Err(e) = p.check(pid, c.header, !opts.outputs.text, &round) {
                        crate::say!("kal: check of process {pid} failed: {e:#}");
                    }
                }
                // Processes gone since: their growth and metrics go too.
                p.keep_only(&conns.iter().filter_map(|c| c.pid).collect::<Vec<_>>());
                p.pacer.end(round);
            }
            let until = p.pacer.until_due(Instant::now());
            wait_ms = wait_ms.min(until.as_millis() as i32 + 1);
        }
        let sig = FORWARD.swap(0, Ordering::Relaxed);
        if sig != 0 && status.is_none() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(main_pid, sig) };
        }
        let polled = conns.len();
        let mut fds: Vec<libc::pollfd> = std::iter::once(&listener as &dyn std::os::fd::AsRawFd)
            .chain(conns.iter().map(|c| &c.stream as &dyn std::os::fd::AsRawFd))
            .chain(chld.iter().map(|f| f as &dyn std::os::fd::AsRawFd))
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if fds[0].revents & libc::POLLIN != 0 {
            while let Ok((s, _)) = listener.accept() {
                conns.push(Conn::accepted(s)?);
            }
        }
        if let Some(f) = &chld {
            let mut buf = [0u8; 64];
            // SAFETY: draining our own non-blocking pipe into a local buffer.
            while unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(f),
                    buf.as_mut_ptr().cast(),
                    64,
                )
            } > 0
            {}
        }
        let ready: Vec<bool> = fds[1..1 + polled].iter().map(|f| f.revents != 0).collect();
        let mut keep = Vec::with_capacity(conns.len());
        for (c, r) in conns
            .drain(..)
            .zip(ready.into_iter().chain(std::iter::repeat(false)))
        {
            if !r {
                keep.push(c);
                continue;
            }
            if let Some(pid) = c.lend {
                // A loan ends when the other kal closes its connection.
                if let Some(t) = tracer.as_mut() {
                    t.unlend(pid);
                }
                continue;
            }
            match handle(
                c,
                main_pid,
                opts,
                periodic.as_ref(),
                &mut reported,
                &symbols,
                workers.as_ref(),
            ) {
                Ok(Handled::Keep(mut c)) => {
                    hellos += 1;
                    if let Some(pid) = c.pid {
                        without_agent.hello(pid);
                        if let Some(t) = tracer.as_mut() {
                            if Path::new(&format!("/proc/{pid}")).exists() {
                                if let Err(e) = t.attach(pid, c.header) {
                                    crate::say!("kal: cannot trace process {pid} ({e:#}): if it dies of a signal, it gets one line, not a leak report");
                                }
                            }
                            // The agent waits for this byte: it runs on traced.
                            let _ = c.stream.write_all(&[1]);
                        }
                    }
                    keep.push(c)
                }
                Ok(Handled::Lend(mut c, pid, leave_blocked)) => {
                    let lent = match tracer.as_mut() {
                        Some(t) if t.traces(pid) => t.lend(pid, leave_blocked),
                        _ => Err(anyhow::anyhow!("process {pid} is not traced by this kal")),
                    };
                    match lent {
                        Ok(()) => {
                            if c.stream.write_all(&[1]).is_ok() {
                                c.lend = Some(pid);
                                keep.push(c);
                            } else if let Some(t) = tracer.as_mut() {
                                t.unlend(pid);
                            }
                        }
                        Err(e) => {
                            crate::say!("kal: cannot lend process {pid} to another kal: {e:#}");
                            let _ = c.stream.write_all(&[0]);
                        }
                    }
                }
                Ok(Handled::Done(l)) => lost |= l,
                Ok(Handled::Closed(Some(c))) => {
                    let pid = c.pid.unwrap_or(0);
                    if let Some(i) = reported.iter().position(|&p| p == pid) {
                        reported.swap_remove(i);
                        if let Some(t) = tracer.as_mut() {
                            t.forget(pid);
                        }
                    } else {
                        if let Some(t) = tracer.as_mut() {
                            // Alive: it exec'd (a new image says hello again, if it
                            // carries the agent); let go of it meanwhile.
                            t.release(pid);
                        }
                        // Ended unread (said once its end is known), or went on without
                        // the agent (exec: said by `without_agent`).
                        pending.push(crate::run::ended::Pending::new(pid, c.pidfd));
                        without_agent.closed(pid);
                    }
                }
                Ok(Handled::Closed(None)) => {}
                Err(e) => crate::say!("kal: {e:#}"),
            }
        }
        conns = keep;
        if let Some(t) = tracer.as_mut() {
            // Until no process is found dying: each is captured before the next events.
            loop {
                let mut dying = None;
                for ev in t.pump() {
                    match ev {
                        crate::run::trace::Event::Reaped(p, st) if p == main_pid => {
                            status = Some(ExitStatus::from_raw(st));
                        }
                        crate::run::trace::Event::Reaped(..) => {}
                        crate::run::trace::Event::Dying { pid, tid, sig } => {
                            dying = Some((pid, tid, sig))
                        }
                    }
                }
                let Some((pid, tid, sig)) = dying else { break };
                // Its hello connection closes once it is gone: not an unread end.
                reported.push(pid);
                match report_dying(
                    t,
                    pid,
                    tid,
                    sig,
                    main_pid,
                    opts,
                    periodic.as_ref(),
                    &symbols,
                ) {
                    Ok(l) => lost |= l,
                    Err(e) => crate::say!(
                        "{} ({e:#})",
                        crate::run::ended::line(pid, crate::run::ended::End::Signal(sig))
                    ),
                }
            }
        }
        without_agent.poll(false);
        if status.is_none() && tracer.is_none() {
            status = child.try_wait()?;
        }
        if status.is_none() && tracer.is_some() && !crate::run::trace::has_children() {
            // Reaped by a wait kal made for one of its threads: the pidfd tells how.
            status = Some(ExitStatus::from_raw(match main_end.decide() {
                Some(Some(crate::run::ended::End::Signal(sig))) => sig,
                Some(Some(crate::run::ended::End::Code(c))) => (c & 0xff) << 8,
                _ => 1 << 8,
            }));
        }
        pending.retain(|p| {
            let decided = if p.pid == main_pid {
                // kal reaps the program itself: its status is the authority.
                status.map(|s| {
                    Some(match s.signal() {
                        Some(sig) => crate::run::ended::End::Signal(sig),
                        None => crate::run::ended::End::Code(s.code().unwrap_or(0)),
                    })
                })
            } else {
                p.decide()
            };
            match decided {
                None => true,
                Some(None) => false,
                // Reported at its death by signal (its connection closed late).
                Some(Some(_)) if reported.contains(&p.pid) => false,
                Some(Some(end)) => {
                    crate::say!("{}", crate::run::ended::line(p.pid, end));
                    false
                }
            }
        });
        let adopted = if tracer.is_some() {
            crate::run::trace::has_children()
        } else {
            reap_adopted(main_pid, status.is_some())
        };
        if status.is_some() && !adopted && pending.is_empty() && conns.is_empty() {
            // Every process is gone: a hello still queued (a process that ended at once)
            // is read before kal ends.
            match listener.accept() {
                Ok((s, _)) => conns.push(Conn::accepted(s)?),
                Err(_) => break,
            }
        }
    }
    if let Some(w) = workers {
        lost |= w.finish();
    }
    without_agent.poll(true);
    let status = status.expect("loop ends after the child exited");
    if hellos == 0 {
        crate::say!("kal: the agent never started in {} (is it setuid, or does it reset LD_PRELOAD?): no leak report", program.display());
    }
    if let Some(sig) = status.signal() {
        return Ok(-sig);
    }
    let code = status.code().unwrap_or(1);
    Ok(if lost && opts.error_exitcode != 0 {
        opts.error_exitcode
    } else {
        code
    })
}

/// How many exiting processes kal captures at once: one per core, 2 to 4.
fn exit_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Reaps adopted orphans that exited (never the program itself while its status is still
/// to be collected, by `Child::try_wait`); true while kal still has a child. Once the
/// program is reaped, any child left is an adopted one kal waits for.
fn reap_adopted(main_pid: i32, main_reaped: bool) -> bool {
    loop {
        // SAFETY: a zeroed siginfo is a valid value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid peeks (WNOWAIT) at our own children into our own siginfo.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            return false; // ECHILD: no children at all
        }
        // SAFETY: waitid filled the siginfo (si_pid is 0 when no child has exited).
        let pid = unsafe { info.si_pid() };
        if pid == 0 || (pid == main_pid && !main_reaped) {
            return true; // children, none to reap here
        }
        // A ptrace stop of an adopted process an exit worker is capturing (waits see the
        // stops of every thread's tracees): its tracer's to take, not an end.
        if !matches!(
            info.si_code,
            libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED
        ) {
            return true;
        }
        let mut st = 0;
        // SAFETY: reaping a child of ours that has exited.
        unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
    }
}

enum Handled {
    Keep(Conn),
    /// Another kal asks for a loan of this process (`crate::run::trace::borrow`).
    Lend(Conn, i32, bool),
    Done(bool),
    /// The connection closed; a hello connection is handed back.
    Closed(Option<Conn>),
}

fn handle(
    mut c: Conn,
    main_pid: i32,
    opts: &RunOptions,
    periodic: Option<&crate::run::periodic::Periodic>,
    reported: &mut Vec<i32>,
    symbols: &crate::attribute::symbolize::Symbols,
    workers: Option<&ExitWorkers>,
) -> Result<Handled> {
    let me = std::process::id() as i32;
    let mut buf = [0u8; HELLO_SIZE];
    if c.stream.read_exact(&mut buf).is_err() {
        // EOF: that process is gone (or exec'd)
        return Ok(Handled::Closed(c.pid.is_some().then_some(c)));
    }
    let Some(msg) = Hello::decode(&buf) else {
        bail!("ignoring a malformed message from an agent");
    };
    // The process as the kernel names it in kal's namespace (see `crate::agent::peer`): the
    // program kal started or one of its descendants (adopted orphans included: kal is
    // their subreaper), or nobody kal will touch.
    if msg.kind == MsgKind::Lend as u32 {
        // Only kal run's user (or root) can reach its private socket.
        return Ok(Handled::Lend(c, msg.pid as i32, msg.tid & 1 != 0));
    }
    let peer = crate::agent::peer::peer_pid(&c.stream);
    let Some(pid) = peer.filter(|&p| p != me && crate::agent::peer::descends_from(p, me)) else {
        // A process that said hello and ended at once (a forked child that crashed, and
        // was reaped before kal read its hello): no ancestry to check and nothing to read,
        // but how it ended is still said, if a pidfd of it tells.
        if let Some(p) = peer.filter(|&p| {
            msg.kind == MsgKind::Hello as u32 && !Path::new(&format!("/proc/{p}")).exists()
        }) {
            if let Some(fd) = crate::run::ended::peer_pidfd(&c.stream) {
                c.pid = Some(p);
                c.pidfd = Some(fd);
                return Ok(Handled::Keep(c));
            }
        }
        bail!("ignoring a message from a process kal did not start");
    };
    if msg.kind == MsgKind::Hello as u32 {
        c.pid = Some(pid);
        c.header = msg.header_addr;
        c.pidfd = crate::run::ended::open(pid);
        return Ok(Handled::Keep(c));
    }
    reported.push(pid);
    let tid = crate::agent::peer::host_tid(pid, msg.tid as i32).unwrap_or(pid);
    let exit = ExitJob {
        conn: c,
        pid,
        tid,
        header: msg.header_addr,
    };
    // Forked processes are captured on the exit workers, several at once (the program
    // itself in this thread: `Child::try_wait` here could take its ptrace stops for its
    // end). With periodic checks, everything here, as their sites are kept here.
    if let (Some(w), None, false) = (workers, periodic, pid == main_pid) {
        w.send(exit);
        return Ok(Handled::Done(false));
    }
    let (cap, kinds) = capture_exit(exit, opts)?;
    Ok(Handled::Done(write_report(
        pid, main_pid, &cap, &kinds, opts, periodic, symbols,
    )))
}

/// A process that said it exits: its hello-less exit connection (kal's byte lets it go
/// on to `exit_group`), pid, the thread that exits and its agent header.
struct ExitJob {
    conn: Conn,
    pid: i32,
    tid: i32,
    header: u64,
}

/// Traces the exit, lets the process run to exit_group, copies it there (as memcheck does,
/// so the exit path's frames are below the stack pointer), classifies, lets it go. The
/// report is made at leisure from what is returned.
fn capture_exit(
    mut job: ExitJob,
    opts: &RunOptions,
) -> Result<(crate::capture::Capture, Vec<crate::reach::Kind>)> {
    let timing = crate::debug::timing();
    let t0 = Instant::now();
    let frozen = Frozen::at_exit(job.pid, job.tid, || {
        let _ = job.conn.stream.write_all(&[1]);
    })?;
    let t1 = Instant::now();
    let cap = capture(&frozen, job.header)?;
    let t2 = Instant::now();
    // Blocks are read from the process itself: scan before letting it go.
    let kinds = crate::classify_with(&cap, &opts.report.suppressions);
    drop(frozen);
    if timing {
        crate::say!(
            "timing: exit of {}: stopped at exit_group after {:?}, capture {:?}, classify {:?}, held {:?}",
            job.pid,
            t1 - t0,
            t2 - t1,
            t2.elapsed(),
            t1.elapsed()
        );
    }
    Ok((cap, kinds))
}

/// Process `pid`, traced, is dying of signal `sig` (thread `tid` is held at its exit
/// event): it is captured there, as at `exit_group`, then let die (its death reaches kal
/// unchanged), and reported. True when something was definitely lost.
#[allow(clippy::too_many_arguments)]
fn report_dying(
    tracer: &mut crate::run::trace::Tracer,
    pid: i32,
    tid: i32,
    sig: i32,
    main_pid: i32,
    opts: &RunOptions,
    periodic: Option<&crate::run::periodic::Periodic>,
    symbols: &crate::attribute::symbolize::Symbols,
) -> Result<bool> {
    let (cap, kinds) = {
        let (frozen, header) = tracer.dying(pid, tid)?;
        let cap = capture(&frozen, header)?;
        let kinds = crate::classify_with(&cap, &opts.report.suppressions);
        (cap, kinds)
    };
    crate::say!(
        "=={pid}== kal: process {pid} is dying of {}: leak report at its death",
        crate::capture::fatal::signal_name(sig)
    );
    Ok(write_report(
        pid, main_pid, &cap, &kinds, opts, periodic, symbols,
    ))
}

/// Builds, prints and writes the report of process `pid` captured at its end; true when
/// something was definitely lost.
fn write_report(
    pid: i32,
    main_pid: i32,
    cap: &crate::capture::Capture,
    kinds: &[crate::reach::Kind],
    opts: &RunOptions,
    periodic: Option<&crate::run::periodic::Periodic>,
    symbols: &crate::attribute::symbolize::Symbols,
) -> bool {
    let mut report = report::build(
        cap,
        kinds,
        symbols,
        &opts.report,
        &periodic.map(|p| p.sites(pid)).unwrap_or_default(),
    );
    if let Some(p) = periodic {
        p.annotate(pid, &mut report);
    }
    let outputs = if pid == main_pid {
        opts.outputs.clone()
    } else {
        opts.outputs.for_process(pid)
    };
    // Said in one line; the exit status still tells what was lost.
    let history = periodic
        .map(|p| p.history_with(pid, &report))
        .unwrap_or_default();
    let cx = crate::act::sink::Context { history: &history };
    if let Err(e) = outputs.write(&report, &cx) {
        crate::say!("kal: {e:#}");
    }
    report.summary.direct.blocks > 0
}

/// Exit captures of forked processes, several at once: each of `n` capture threads
/// traces, copies and classifies one exiting process at a time (ptrace requests come
/// from the thread that seized), and one report thread, which keeps the symbolizer,
/// writes every report. A program whose children exit by the hundred then waits for
/// `n` captures at a time rather than one (issue 9, scale).
struct ExitWorkers {
    jobs: Option<std::sync::mpsc::SyncSender<ExitJob>>,
    captures: Vec<std::thread::JoinHandle<()>>,
    reports: Option<std::thread::JoinHandle<bool>>,
}

impl ExitWorkers {
    fn start(n: usize, main_pid: i32, opts: &RunOptions) -> ExitWorkers {
        type Done = (crate::capture::Capture, Vec<crate::reach::Kind>);
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<ExitJob>(n * 2);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Done>(n * 2);
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let captures = (0..n)
            .map(|_| {
                let (rx, tx, opts) = (job_rx.clone(), done_tx.clone(), opts.clone());
                std::thread::spawn(move || loop {
                    let job = match rx.lock().map(|r| r.recv()) {
                        Ok(Ok(job)) => job,
                        _ => return,
                    };
                    match capture_exit(job, &opts) {
                        Ok(done) => {
                            let _ = tx.send(done);
                        }
                        Err(e) => crate::say!("kal: {e:#}"),
                    }
                })
            })
            .collect();
        let opts = opts.clone();
        let reports = std::thread::spawn(move || {
            let symbols = crate::attribute::symbolize::Symbols::new();
            let mut lost = false;
            for (cap, kinds) in done_rx {
                lost |= write_report(cap.pid, main_pid, &cap, &kinds, &opts, None, &symbols);
            }
            lost
        });
        ExitWorkers {
            jobs: Some(jobs),
            captures,
            reports: Some(reports),
        }
    }

    fn send(&self, job: ExitJob) {
        if let Some(j) = &self.jobs {
            let _ = j.send(job);
        }
    }

    /// Waits for every capture and report; true when a report found something
    /// definitely lost.
    fn finish(mut self) -> bool {
        self.jobs = None;
        for h in self.captures.drain(..) {
            let _ = h.join();
        }
        self.reports
            .take()
            .is_some_and(|h| h.join().unwrap_or(false))
    }
}

/// Exits kal the way the program ended: with its code, or by the same signal.
pub fn exit_like(code: i32) -> ! {
    if code < 0 {
        let sig = -code;
        // SAFETY: restoring the default action and re-raising the program's fatal signal.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(code)
}
