//! kal finds memory leaks in unmodified, running Linux programs.
//!
//! The pipeline is the same for every way of using kal, one folder a step:
//!
//! 1. **capture** ([`capture`]): freeze every thread ([`capture::freeze`]), read registers,
//!    mappings, the agent's live-block table and a copy of writable memory
//!    ([`capture::memory::Image`]), all through one [`capture::source::Source`]: a live
//!    process, a copy-on-write snapshot ([`capture::snapshot`]), or an ELF core file
//!    ([`capture::corefile`]);
//! 2. **blocks** ([`blocks`]): live heap blocks — the agent's table with allocation stacks,
//!    or glibc's own heap walked without the agent ([`blocks::ptmalloc`]);
//! 3. **reach** ([`reach`]): conservative marking from the [`reach::roots`], classified as
//!    valgrind's memcheck does (direct, indirect, possible, reachable);
//! 4. **attribute** ([`attribute`]): stacks to function, file and line, or, without
//!    stacks, what a block is from its contents;
//! 5. **act** ([`act`]): text and JSON reports with suppressions, reclaim, growth and
//!    forecast, Prometheus metrics.
//!
//! Around them: [`agent`] finds and talks to the agent in a process (and loads it with
//! `kal attach`), [`run`] supervises a program started under `kal run`, and [`check`] is
//! one live check, repeated by [`watch`]. The `kal` binary is a thin CLI over this library.
//!
//! ```no_run
//! use kal::{act::report, capture, capture::freeze::Frozen};
//! # fn main() -> anyhow::Result<()> {
//! // A process started under `kal run`, whose agent header address the agent reported:
//! let (pid, header_addr) = (4242, 0x7f00_0000_1000);
//! let cap = {
//!     let frozen = Frozen::freeze(pid)?; // all threads stopped…
//!     capture::capture(&frozen, header_addr)?
//! }; // …and running again here
//! let report = kal::analyze(&cap, &report::Options::default());
//! print!("{}", kal::act::text::render(&report, 8));
//! # Ok(()) }
//! ```

/// `eprintln!` that never panics: kal's stderr may be closed, a broken pipe or full
/// (`2>/dev/full`), and kal must still pass the program's exit status on.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see [`say!`]).
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// The result of a scoped thread, its panic passed on (kal's helper threads never panic
/// by design; if one did, the caller fails the same way).
pub(crate) fn join<T>(t: std::thread::ScopedJoinHandle<'_, T>) -> T {
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

pub mod act;
pub mod agent;
pub mod attribute;
pub mod blocks;
pub mod capture;
pub mod check;
pub mod debug;
pub mod reach;
pub mod run;
pub mod watch;

use act::{report, suppress};
use attribute::symbolize;
use reach::{heuristics, roots};

/// Step 3 on a capture: the class of every block (in `cap.blocks` order).
pub fn classify(cap: &capture::Capture) -> Vec<reach::Kind> {
    debug_roots(cap);
    let (t0, c0) = (std::time::Instant::now(), thread_cpu_ms());
    let roots = roots::roots(cap);
    let t1 = std::time::Instant::now();
    let heuristics = heuristics::Heuristics::new(cap.heap.as_ref(), &cap.maps)
        .with_usable_sizes(cap.usable_sizes);
    let kinds = reach::classify(
        &cap.blocks,
        &cap.image,
        &roots,
        cap.heap.as_ref(),
        Some(&heuristics),
    );
    if crate::debug::timing() {
        crate::say!(
            "timing: roots {:.1} ms, mark {:.1} ms ({} blocks; roots and mark on-CPU {:.1} ms)",
            (t1 - t0).as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3,
            cap.blocks.len(),
            thread_cpu_ms() - c0
        );
    }
    kinds
}

/// CPU time of the calling thread, in milliseconds (user and system).
pub(crate) fn thread_cpu_ms() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// Step 3 with suppressions, as LeakSanitizer does it: blocks of suppressed lost records
/// become roots and the classification runs again, so what only they point to is not
/// reported as lost. The suppressed blocks keep their first class (the report counts them
/// as suppressed); what they reach becomes reachable.
pub fn classify_with(cap: &capture::Capture, supp: &suppress::Suppressions) -> Vec<reach::Kind> {
    let kinds = classify(cap);
    if supp.is_empty() {
        return kinds;
    }
    let chosen = suppress::suppressed_blocks(cap, &kinds, supp, &symbolize::Symbols::new());
    if chosen.is_empty() {
        return kinds;
    }
    let mut roots = roots::roots(cap);
    roots
        .values
        .extend(chosen.iter().map(|&i| cap.blocks[i].addr));
    let heuristics = heuristics::Heuristics::new(cap.heap.as_ref(), &cap.maps)
        .with_usable_sizes(cap.usable_sizes);
    let mut again = reach::classify(
        &cap.blocks,
        &cap.image,
        &roots,
        cap.heap.as_ref(),
        Some(&heuristics),
    );
    for i in chosen {
        again[i] = kinds[i];
    }
    again
}

/// Steps 3 to 5 on a capture: roots, classification, symbolized records.
pub fn analyze(cap: &capture::Capture, opts: &report::Options) -> report::Report {
    let kinds = classify_with(cap, &opts.suppressions);
    report::build(
        cap,
        &kinds,
        &symbolize::Symbols::new(),
        opts,
        &Default::default(),
    )
}

/// Debug aid: prints roots (set `KAL_DEBUG_ROOTS=1`).
pub fn debug_roots(cap: &capture::Capture) {
    if !crate::debug::roots() {
        return;
    }
    let r = roots::roots(cap);
    for (s, e) in &r.ranges {
        let m = cap
            .maps
            .iter()
            .find(|m| m.contains(*s))
            .map(|m| m.path.as_str())
            .unwrap_or("?");
        crate::say!(
            "root {s:#x}-{e:#x} {m} copied={}",
            cap.image.words(*s, e - s).is_some()
        );
    }
    for k in &cap.kernel_values {
        crate::say!("root value {:#x} ({})", k.value, k.label);
    }
    for m in &cap.maps {
        crate::say!(
            "map {:#x}-{:#x} {}{} {}",
            m.start,
            m.end,
            if m.read { "r" } else { "-" },
            if m.write { "w" } else { "-" },
            m.path
        );
    }
    for b in cap.blocks.iter().filter(|b| b.size == 4096) {
        crate::say!("block {:#x} size {}", b.addr, b.size);
    }
}
