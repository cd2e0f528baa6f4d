//! What a fork copy cannot show, read from the target itself while its threads are frozen.
//!
//! - `MADV_DONTFORK` memory (smaps `VmFlags: dc`) is absent from the copy and
//!   `MADV_WIPEONFORK` memory (`wf`) is zeros there; shared mappings (`MAP_SHARED`: shared
//!   anonymous memory shown as `/dev/zero (deleted)`, memfd, SysV shm, shared files) are not
//!   copied at all, so the copy shows them as they are *later*, not at the instant of the
//!   snapshot. All three are read from the frozen target, up to [`limit`] bytes in all;
//!   whatever does not fit becomes a gap.
//! - Pointers the kernel holds for the process: the `data` of every epoll registration
//!   (`/proc/PID/fdinfo/N`) and the `sigev_value` of every POSIX timer (`/proc/PID/timers`),
//!   as labelled root values.
//!
//! Reading smaps is slow for a big process, so the dc/wf mappings are found *before* the
//! freeze ([`plan`]); during the freeze only `/proc/PID/maps` is read again ([`Plan::read`]).
//! A mapping marked dc/wf between the two reads is found afterwards by comparing the parent's
//! maps with the copy's smaps ([`unseen`]) and becomes a gap.

use crate::capture::memory::{Image, ProcessMemory};
use crate::capture::procfs::{self, Mapping, SmapsEntry};
use crate::capture::{may_hold_roots, Gap, KernelValue};
use crate::reach::ranges::{normalize, subtract};

/// Address ranges, sorted and disjoint.
type Ranges = Vec<(u64, u64)>;

/// Default for [`limit`]: 64 MiB.
pub const DEFAULT_LIMIT: u64 = 64 << 20;

/// Most bytes read from the frozen target per snapshot (environment
/// `KAL_FREEZE_COPY_LIMIT`, in bytes; default [`DEFAULT_LIMIT`]).
pub fn limit() -> u64 {
    std::env::var("KAL_FREEZE_COPY_LIMIT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_LIMIT)
}

/// What was learnt before the freeze.
#[derive(Debug, Default)]
pub struct Plan {
    /// dc/wf mappings that may hold roots.
    forkless: Vec<(u64, u64)>,
    /// Descriptors open before the freeze, and which of them are epoll instances.
    fds: Vec<i32>,
    epolls: Vec<i32>,
    /// How many mappings the target had before the freeze.
    mappings: usize,
}

/// What was read during the freeze.
#[derive(Debug, Default)]
pub struct Extras {
    /// Bytes read from the frozen target (dc, wf and shared mappings).
    pub image: Image,
    /// The ranges `image` covers, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Pointers the kernel holds for the process.
    pub values: Vec<KernelValue>,
    /// What could not be seen.
    pub gaps: Vec<Gap>,
    /// The target's mappings during the freeze (empty when the target itself is read).
    pub parent_maps: Vec<Mapping>,
    /// Threads whose registers could not be read.
    pub threads_without_registers: u64,
    /// The agent was loaded by `kal attach`: blocks allocated before it are not in its
    /// table (see [`crate::blocks::before_attach`]).
    pub before_attach: bool,
}

/// Before the freeze: finds the dc/wf mappings and the epoll descriptors of `pid`.
pub fn plan(pid: i32) -> Plan {
    let smaps = procfs::smaps(pid).unwrap_or_default();
    let forkless = smaps
        .iter()
        .filter(|e| (e.dontfork || e.wipeonfork) && may_hold_roots(&e.mapping, e.anonymous))
        .map(|e| (e.mapping.start, e.mapping.end))
        .collect();
    let fds = procfs::fds(pid).unwrap_or_default();
    let epolls = fds
        .iter()
        .copied()
        .filter(|&fd| procfs::is_epoll(pid, fd))
        .collect();
    Plan {
        forkless,
        fds,
        epolls,
        mappings: smaps.len(),
    }
}

impl Plan {
    /// Whether [`Plan::read`] is slow enough (thousands of mappings to list) to be worth
    /// a thread of its own during the freeze.
    pub fn slow_to_read(&self) -> bool {
        self.mappings >= 1000
    }

    /// During the freeze: copies what the fork copy will not show as it is now, and reads
    /// the kernel-held pointers.
    pub fn read(&self, pid: i32) -> Extras {
        let mut x = Extras::default();
        let maps = match procfs::maps(pid) {
            Ok(m) => m,
            Err(_) => {
                x.gaps
                    .push(Gap::whole("the target's mappings could not be read"));
                return x;
            }
        };
        let candidates: Vec<(u64, u64)> = maps
            .iter()
            .filter(|m| may_hold_roots(m, 0))
            .map(|m| (m.start, m.end))
            .collect();
        let mut want: Vec<(u64, u64)> = maps
            .iter()
            .filter(|m| m.shared && may_hold_roots(m, 0))
            .map(|m| (m.start, m.end))
            .collect();
        // Known dc/wf ranges, as far as they are still mapped.
        want.extend(subtract(
            &normalize(self.forkless.clone()),
            &subtract(&[(0, u64::MAX)], &normalize(candidates)),
        ));
        let want = normalize(want);
        let (fit, over) = within_budget(&want, limit());
        for (s, e) in over {
            x.gaps.push(Gap::range(s, e, "over the freeze copy limit"));
        }
        // Copied whole, untouched pages too: shared mappings among them may hold pages
        // another process wrote (see `Image::copy`).
        let (image, unread) = Image::copy(&ProcessMemory::new(pid), &fit, &fit);
        for (s, e) in unread {
            x.gaps.push(Gap::range(s, e, "unreadable"));
        }
        x.image = image;
        x.ranges = fit;
        x.parent_maps = maps;
        self.read_kernel_values(pid, &mut x);
        x
    }

    /// Epoll registrations and POSIX timers of `pid`, into `x`.
    fn read_kernel_values(&self, pid: i32, x: &mut Extras) {
        let now = procfs::fds(pid).unwrap_or_default();
        for fd in now {
            let known = self.epolls.contains(&fd);
            if !known && (self.fds.binary_search(&fd).is_ok() || !procfs::is_epoll(pid, fd)) {
                continue;
            }
            match std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) {
                Ok(text) => {
                    x.values
                        .extend(procfs::parse_epoll_data(&text).into_iter().map(|value| {
                            KernelValue {
                                value,
                                label: format!("epoll registration (fd {fd})"),
                            }
                        }))
                }
                // Closed since: nothing registered there any more.
                Err(_) if !procfs::is_epoll(pid, fd) => {}
                Err(_) => x.gaps.push(Gap::whole(&format!(
                    "the registrations of epoll fd {fd} could not be read"
                ))),
            }
        }
        x.values.extend(timer_values(pid, &mut x.gaps));
    }
}

/// The `sigev_value` of every POSIX timer of `pid`; a gap when the list cannot be read.
pub fn timer_values(pid: i32, gaps: &mut Vec<Gap>) -> Vec<KernelValue> {
    match std::fs::read_to_string(format!("/proc/{pid}/timers")) {
        Ok(text) => procfs::parse_timer_values(&text)
            .into_iter()
            .map(|value| KernelValue {
                value,
                label: "POSIX timer sigev_value".into(),
            })
            .collect(),
        Err(_) => {
            gaps.push(Gap::whole("the POSIX timers could not be read"));
            Vec::new()
        }
    }
}

/// Kernel-held pointers of a process read in place (at exit): no plan, no copies.
pub fn in_place(pid: i32) -> Extras {
    let plan = Plan {
        fds: Vec::new(),
        epolls: Vec::new(),
        forkless: Vec::new(),
        mappings: 0,
    };
    let mut x = Extras::default();
    plan.read_kernel_values(pid, &mut x);
    x
}

/// Splits `ranges` into what fits in `budget` bytes (in order) and what does not.
fn within_budget(ranges: &[(u64, u64)], budget: u64) -> (Ranges, Ranges) {
    let (mut fit, mut over) = (Vec::new(), Vec::new());
    let mut left = budget;
    for &(s, e) in ranges {
        if e - s <= left {
            left -= e - s;
            fit.push((s, e));
        } else {
            over.push((s, e));
        }
    }
    (fit, over)
}

/// After the copy: memory the copy lacks or wiped that was not read during the freeze
/// (marked dc/wf between [`plan`] and the freeze), as gaps. `child` is the copy's smaps;
/// `agent`: kal's own ranges (never scanned). Heap blocks are read from the copy, so heap
/// memory the copy lacks or wiped is a gap even when it was read from the target.
pub fn unseen(
    x: &Extras,
    child: &[SmapsEntry],
    agent: &[(u64, u64)],
    heap: &[(u64, u64)],
) -> Vec<Gap> {
    if x.parent_maps.is_empty() {
        return Vec::new();
    }
    let mut seen = subtract(&x.ranges, heap);
    seen.extend(x.gaps.iter().filter_map(|g| g.range_of()));
    seen.extend_from_slice(agent);
    let seen = normalize(seen);
    let in_child = normalize(
        child
            .iter()
            .map(|e| (e.mapping.start, e.mapping.end))
            .collect(),
    );
    let missing = x
        .parent_maps
        .iter()
        .filter(|m| may_hold_roots(m, 0))
        .flat_map(|m| subtract(&subtract(&[(m.start, m.end)], &in_child), &seen));
    let wiped = child
        .iter()
        .filter(|e| e.wipeonfork && may_hold_roots(&e.mapping, e.anonymous))
        .flat_map(|e| subtract(&[(e.mapping.start, e.mapping.end)], &seen));
    let mut gaps: Vec<Gap> = missing
        .map(|(s, e)| Gap::range(s, e, "absent from the snapshot copy (MADV_DONTFORK)"))
        .collect();
    gaps.extend(
        wiped.map(|(s, e)| Gap::range(s, e, "wiped in the snapshot copy (MADV_WIPEONFORK)")),
    );
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_order_and_skips_what_does_not_fit() {
        let (fit, over) = within_budget(&[(0, 10), (20, 40), (50, 55)], 16);
        assert_eq!(fit, vec![(0, 10), (50, 55)]);
        assert_eq!(over, vec![(20, 40)]);
    }
}
