//! The memory limits of a process, for the forecast ([`crate::act::forecast`]): its
//! cgroups' `memory.max` (v2) or `memory.limit_in_bytes` (v1), each with the cgroup's
//! usage; its soft `RLIMIT_AS` with its virtual size; and the machine's available memory
//! plus its RSS.

use serde::Serialize;
use std::path::{Path, PathBuf};

/// What a limit is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Resident memory (the cgroup's usage and the machine's memory grow with it).
    Rss,
    /// Virtual size.
    Vm,
}

/// One memory limit of a process, with what it is compared with now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limit {
    /// `cgroup_v2`, `cgroup_v1`, `rlimit_as` or `memory_available`.
    pub kind: &'static str,
    /// Where it was read (`/sys/fs/cgroup/…/memory.max`, `/proc/PID/limits`, …).
    pub source: String,
    /// The limit.
    pub limit_bytes: u64,
    /// What counts against it now (the cgroup's usage, the virtual size, the RSS).
    pub usage_bytes: u64,
    /// Which of the process's series grows toward it.
    pub measure: Measure,
}

/// A cgroup hierarchy mounted on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupMount {
    /// Version 2 (unified) or 1 (the memory controller).
    pub v2: bool,
    /// Mount point.
    pub dir: PathBuf,
    /// The cgroup mounted there (`/` unless inside a container).
    pub root: String,
}

/// The cgroup v2 and v1-memory mounts of a `/proc/self/mountinfo` text.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split_whitespace().collect();
        let r: Vec<&str> = right.split_whitespace().collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let v2 = r[0] == "cgroup2";
        if !(v2 || (r[0] == "cgroup" && r[2].split(',').any(|o| o == "memory"))) {
            continue;
        }
        out.push(CgroupMount {
            v2,
            dir: PathBuf::from(l[4]),
            root: l[3].to_string(),
        });
    }
    out
}

/// Reads a limit or usage file: a number, or `max`/a v1 "unlimited" huge value as `None`.
fn read_bytes(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    let n: u64 = s.trim().parse().ok()?;
    // cgroup v1 says "unlimited" with PAGE_COUNTER_MAX pages (about 2^63).
    (n < 1 << 62).then_some(n)
}

/// The memory limits of the cgroups of a process whose `/proc/PID/cgroup` says
/// `proc_cgroup`, under `mounts`: every ancestor with a limit counts (the tightest
/// headroom wins later).
pub fn cgroup_limits(proc_cgroup: &str, mounts: &[CgroupMount]) -> Vec<Limit> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v2 = id == "0" && ctrls.is_empty();
        if !v2 && !ctrls.split(',').any(|c| c == "memory") {
            continue;
        }
        for m in mounts.iter().filter(|m| m.v2 == v2) {
            let rel = path
                .strip_prefix(m.root.trim_end_matches('/'))
                .unwrap_or(path)
                .trim_start_matches('/');
            let mut dir = m.dir.join(rel);
            if !dir.is_dir() {
                continue;
            }
            let (limit_file, usage_file) = if v2 {
                ("memory.max", "memory.current")
            } else {
                ("memory.limit_in_bytes", "memory.usage_in_bytes")
            };
            loop {
                let lf = dir.join(limit_file);
                if let (Some(limit), Some(usage)) =
                    (read_bytes(&lf), read_bytes(&dir.join(usage_file)))
                {
                    out.push(Limit {
                        kind: if v2 { "cgroup_v2" } else { "cgroup_v1" },
                        source: lf.display().to_string(),
                        limit_bytes: limit,
                        usage_bytes: usage,
                        measure: Measure::Rss,
                    });
                }
                if dir == m.dir || !dir.pop() || !dir.starts_with(&m.dir) {
                    break;
                }
            }
            break;
        }
    }
    out
}

/// The soft `Max address space` of a `/proc/PID/limits` text, if limited.
pub fn rlimit_as(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A field of `/proc/meminfo` (kB) in bytes.
fn meminfo(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The virtual size of process `pid` (`/proc/PID/statm`), 0 if unknown.
pub fn vm_bytes(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

/// Every memory limit of process `pid` now: its cgroups' (v2 and v1), `RLIMIT_AS`, and
/// the machine's available memory plus its RSS `rss_bytes`.
pub fn limits(pid: i32, rss_bytes: u64) -> Vec<Limit> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mounts = cgroup_mounts(&read("/proc/self/mountinfo"));
    let mut out = cgroup_limits(&read(&format!("/proc/{pid}/cgroup")), &mounts);
    if let Some(n) = rlimit_as(&read(&format!("/proc/{pid}/limits"))) {
        out.push(Limit {
            kind: "rlimit_as",
            source: format!("/proc/{pid}/limits"),
            limit_bytes: n,
            usage_bytes: vm_bytes(pid),
            measure: Measure::Vm,
        });
    }
    if let Some(avail) = meminfo(&read("/proc/meminfo"), "MemAvailable") {
        out.push(Limit {
            kind: "memory_available",
            source: "/proc/meminfo".into(),
            limit_bytes: avail + rss_bytes,
            usage_bytes: rss_bytes,
            measure: Measure::Rss,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_are_read_from_both_versions() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("unified");
        let v1 = root.path().join("memory");
        let leaf2 = v2.join("svc/app");
        let leaf1 = v1.join("job");
        std::fs::create_dir_all(&leaf2).unwrap();
        std::fs::create_dir_all(&leaf1).unwrap();
        let w = |p: PathBuf, s: &str| std::fs::write(p, s).unwrap();
        w(leaf2.join("memory.max"), "max\n");
        w(leaf2.join("memory.current"), "100\n");
        w(v2.join("svc/memory.max"), "4096\n");
        w(v2.join("svc/memory.current"), "1000\n");
        w(leaf1.join("memory.limit_in_bytes"), "8192\n");
        w(leaf1.join("memory.usage_in_bytes"), "2000\n");
        w(v1.join("memory.limit_in_bytes"), "9223372036854771712\n");
        w(v1.join("memory.usage_in_bytes"), "5000\n");
        let mountinfo = format!(
            "30 25 0:26 / {} rw,relatime shared:4 - cgroup2 cgroup2 rw\n\
             31 25 0:27 / {} rw,relatime - cgroup cgroup rw,memory\n\
             32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n",
            v2.display(),
            v1.display()
        );
        let mounts = cgroup_mounts(&mountinfo);
        assert_eq!(mounts.len(), 2);
        let got = cgroup_limits("4:memory:/job\n2:cpu:/\n0::/svc/app\n", &mounts);
        let brief: Vec<(&str, u64, u64)> = got
            .iter()
            .map(|l| (l.kind, l.limit_bytes, l.usage_bytes))
            .collect();
        assert_eq!(
            brief,
            [("cgroup_v1", 8192, 2000), ("cgroup_v2", 4096, 1000)]
        );
        assert!(got[1].source.ends_with("svc/memory.max"));
    }

    #[test]
    fn rlimit_as_and_meminfo_are_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max stack size            8388608              unlimited            bytes\n\
                      Max address space         1073741824           unlimited            bytes\n";
        assert_eq!(rlimit_as(limits), Some(1 << 30));
        assert_eq!(
            rlimit_as(
                "Max address space         unlimited            unlimited            bytes\n"
            ),
            None
        );
        assert_eq!(
            meminfo(
                "MemTotal: 100 kB\nMemAvailable:   22432364 kB\n",
                "MemAvailable"
            ),
            Some(22432364 * 1024)
        );
    }
}
