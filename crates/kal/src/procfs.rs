//! Small readers for `/proc/PID/maps` and `/proc/PID/task`.

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
    let path = it.next().unwrap_or("").trim_start().to_string();
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

/// Reads the mappings of a process.
pub fn maps(pid: i32) -> Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read the memory map of process {pid}"))?;
    Ok(parse_maps(&text))
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
}
