//! Small readers for `/proc/PID/maps`, `smaps`, `task`, `fd`, `fdinfo` and `timers`.

use anyhow::{Context, Result};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Inode of the mapped file, 0 for anonymous memory.
    pub inode: u64,
    /// File path or pseudo-name (`[heap]`, `[stack]`), empty when anonymous.
    pub path: String,
}

impl Mapping {
    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }

    /// The mapped file's name (last path component), without the ` (deleted)` the kernel
    /// appends once the file was removed or replaced (a kal upgraded while a program it
    /// started runs on the old agent).
    pub fn file_name(&self) -> &str {
        let name = self.path.rsplit('/').next().unwrap_or("");
        name.strip_suffix(" (deleted)").unwrap_or(name)
    }

    /// Whether this mapping is backed by a regular file (a loaded module).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
}

/// Parses the text of a maps file.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    // The kernel writes a newline in a path as `\012` (the only character it escapes).
    let path = it.next().unwrap_or("").trim_start().replace("\\012", "\n");
    let (s, e) = range.split_once('-')?;
    if perms.len() < 4 {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        inode,
        path,
    })
}

/// Field `n` of a `/proc/…/stat` line, counting from the state (0) after the command name
/// (which may hold spaces and parentheses: the fields follow its last `)`).
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(n)
}

/// Reads the mappings of a process.
pub fn maps(pid: i32) -> Result<Vec<Mapping>> {
    let raw = std::fs::read(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read the memory map of process {pid}"))?;
    // Paths need not be UTF-8: such a path is shown lossily, the mapping is kept.
    Ok(parse_maps(&String::from_utf8_lossy(&raw)))
}

/// One mapping of `/proc/PID/smaps` with the figures kal uses.
#[derive(Debug, Clone)]
pub struct SmapsEntry {
    /// The maps line.
    pub mapping: Mapping,
    /// Resident bytes.
    pub rss: u64,
    /// Bytes of anonymous pages (for a file mapping: pages written, copied on write).
    pub anonymous: u64,
    /// `VmFlags: dc` (`MADV_DONTFORK`): absent from a fork copy.
    pub dontfork: bool,
    /// `VmFlags: wf` (`MADV_WIPEONFORK`): zeros in a fork copy.
    pub wipeonfork: bool,
}

/// Parses the text of an smaps file.
pub fn parse_smaps(text: &str) -> Vec<SmapsEntry> {
    let kb = |v: &str| {
        v.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            * 1024
    };
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        if let Some(mapping) = parse_line(line) {
            out.push(SmapsEntry {
                mapping,
                rss: 0,
                anonymous: 0,
                dontfork: false,
                wipeonfork: false,
            });
            continue;
        }
        let Some(e) = out.last_mut() else { continue };
        if let Some(v) = line.strip_prefix("Rss:") {
            e.rss = kb(v);
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            e.anonymous = kb(v);
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            e.dontfork = v.split_whitespace().any(|f| f == "dc");
            e.wipeonfork = v.split_whitespace().any(|f| f == "wf");
        }
    }
    out
}

/// Reads the smaps of a process.
pub fn smaps(pid: i32) -> Result<Vec<SmapsEntry>> {
    let raw = std::fs::read(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read the memory map of process {pid}"))?;
    Ok(parse_smaps(&String::from_utf8_lossy(&raw)))
}

/// The open file descriptors of a process, sorted.
pub fn fds(pid: i32) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list the files of process {pid}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Whether descriptor `fd` of process `pid` is an epoll instance.
pub fn is_epoll(pid: i32, fd: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]")
}

/// The `data` of every registration of an epoll descriptor, from its fdinfo text
/// (`tfd: 5 events: 19 data: 7f0012345678 pos:0 …`).
pub fn parse_epoll_data(fdinfo: &str) -> Vec<u64> {
    fdinfo
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let rest = &l[l.find("data:")? + 5..];
            u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
        })
        .collect()
}

/// The `sigev_value` of every POSIX timer, from the text of `/proc/PID/timers`
/// (`signal: 14/00007f0012345678`).
pub fn parse_timer_values(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            let v = l.strip_prefix("signal:")?.split('/').nth(1)?.trim();
            u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

/// Thread ids of a process, sorted.
pub fn tasks(pid: i32) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The executable path of a process (best effort).
pub fn exe(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_deleted_files_name_is_its_name() {
        let m = |path: &str| Mapping {
            start: 0,
            end: 4096,
            read: true,
            write: false,
            exec: true,
            shared: false,
            offset: 0,
            inode: 1,
            path: path.into(),
        };
        assert_eq!(
            m("/opt/kal/libkal_agent.so (deleted)").file_name(),
            "libkal_agent.so"
        );
        assert_eq!(m("/opt/kal/libkal_agent.so").file_name(), "libkal_agent.so");
        assert_eq!(m("").file_name(), "");
    }

    use super::*;

    #[test]
    fn parses_file_anonymous_and_pseudo_lines() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a01000 r--p 00001000 fe:01 1234   /usr/bin/true\n\
             7ffd1000-7ffd2000 rw-p 00000000 00:00 0 \n\
             7ffd3000-7ffd4000 rw-p 00000000 00:00 0                          [stack]\n\
             bad line\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/true");
        assert_eq!(m[0].offset, 0x1000);
        assert!(m[0].is_file() && m[0].read && !m[0].write);
        assert_eq!(m[1].path, "");
        assert!(m[1].write && !m[1].is_file());
        assert_eq!(m[2].path, "[stack]");
        assert!(m[2].contains(0x7ffd3fff) && !m[2].contains(0x7ffd4000));
    }

    #[test]
    fn stat_fields_follow_the_last_parenthesis() {
        let s = "42 (a (b) c) S 1 42 42 0 -1";
        assert_eq!(stat_field(s, 0), Some("S"));
        assert_eq!(stat_field(s, 1), Some("1"));
        assert_eq!(stat_field("garbage", 0), None);
    }

    #[test]
    fn a_newline_in_a_path_is_unescaped() {
        let m = parse_maps("1000-2000 r-xp 00000000 fe:01 9   /tmp/a\\012b/prog\n");
        assert_eq!(m[0].path, "/tmp/a\nb/prog");
    }

    #[test]
    fn parses_smaps_flags_epoll_data_and_timers() {
        let s = parse_smaps(
            "7f00-8f00 rw-p 00000000 00:00 0 \n\
             Rss:                   8 kB\n\
             Anonymous:             4 kB\n\
             VmFlags: rd wr mr mw me dc ac \n\
             9f00-af00 rw-s 00000000 00:01 7  /dev/zero (deleted)\n\
             VmFlags: rd wr sh mr mw me ms wf \n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].rss, s[0].anonymous), (8192, 4096));
        assert!(s[0].dontfork && !s[0].wipeonfork);
        assert!(!s[1].dontfork && s[1].wipeonfork && s[1].mapping.shared);
        let e = parse_epoll_data(
            "pos:\t0\nflags:\t02\ntfd:        4 events:       19 data:     7f0012345678  pos:0 ino:30f72 sdev:f\n",
        );
        assert_eq!(e, vec![0x7f00_1234_5678]);
        let t = parse_timer_values(
            "ID: 0\nsignal: 14/00007f0012345678\nnotify: signal/pid.12\nClockID: 1\n",
        );
        assert_eq!(t, vec![0x7f00_1234_5678]);
    }
}
