//! Finding the agent in a process from its PID alone: the `KAL_HEADER` symbol of the
//! `libkal_agent.so` mapped into it.

pub mod attach;
pub mod control;
pub mod elf;
pub mod embedded;
pub mod peer;

use crate::capture::memory::ProcessMemory;
use crate::capture::procfs::{self, Mapping};
use anyhow::{bail, Context, Result};
use blazesym::inspect::source::{Elf, Source};
use blazesym::inspect::Inspector;

/// File name of the agent library (next to kal, or where `KAL_AGENT` points).
pub const AGENT_FILE: &str = "libkal_agent.so";

/// Whether a mapped file's name is kal's agent: `libkal_agent.so`, or the embedded agent
/// as kal writes it out, `libkal_agent-HASH.so` (see [`crate::agent::embedded`]).
pub fn is_agent_file(name: &str) -> bool {
    name == AGENT_FILE
        || name
            .strip_prefix("libkal_agent-")
            .and_then(|r| r.strip_suffix(".so"))
            .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
/// Name of the exported header symbol.
pub const HEADER_SYMBOL: &str = "KAL_HEADER";

/// Address of the agent header in process `pid`, with a clear error when the process is
/// gone, not ours to trace, or was not started under `kal run`.
pub fn find_header(pid: i32) -> Result<u64> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid} (it has exited, or never existed)");
    }
    let maps = match procfs::maps(pid) {
        Ok(m) => m,
        Err(e) => {
            let denied = e
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .map(|io| io.kind())
                == Some(std::io::ErrorKind::PermissionDenied);
            if denied {
                bail!("no permission to inspect process {pid} (run kal as its user or as root)");
            }
            return Err(e);
        }
    };
    if maps.is_empty() {
        bail!("no permission to inspect process {pid}, or it is a kernel thread");
    }
    let addr = header_in(pid, &maps)?;
    match crate::agent::attach::agent_state(pid) {
        Ok(Some(2)) => bail!("process {pid} was attached and then detached: its agent records nothing (kal attach {pid} first)"),
        Ok(Some(crate::agent::attach::NO_STATIC_TLS)) => {
            bail!("{}", crate::agent::attach::no_static_tls(pid))
        }
        _ => {}
    }
    Ok(addr)
}

fn header_in(pid: i32, maps: &[Mapping]) -> Result<u64> {
    let agent: Vec<&Mapping> = maps
        .iter()
        .filter(|m| is_agent_file(m.file_name()))
        .collect();
    let Some(first) = agent.iter().find(|m| m.offset == 0) else {
        bail!(
            "process {pid} was not started under `kal run` (no kal agent in it); load it with `kal attach {pid}`, or check it without the agent"
        );
    };
    let path = mapped_file(pid, first)?;
    let Some(offset) = header_offset(&path, &first.path)? else {
        bail!("the kal agent in process {pid} has no {HEADER_SYMBOL} symbol (an older agent?)");
    };
    let addr = first.start + offset;
    crate::blocks::agent_table::read_header(&ProcessMemory::new(pid), addr)?;
    Ok(addr)
}

/// The address of the agent header inside the agent library at `path` (`shown`: its name
/// for messages), relative to where its first page is mapped; `None` without the symbol.
pub fn header_offset(path: &str, shown: &str) -> Result<Option<u64>> {
    symbol_offset(path, shown, HEADER_SYMBOL)
}

/// The address of symbol `name` inside the agent library at `path` (`shown`: its name for
/// messages), relative to where its first page is mapped; `None` without the symbol.
pub fn symbol_offset(path: &str, shown: &str, name: &str) -> Result<Option<u64>> {
    let inspector = Inspector::new();
    let src = Source::Elf(Elf::new(path));
    let found = inspector
        .lookup(&src, &[name])
        .with_context(|| format!("cannot read the agent library {shown}"))?;
    Ok(found.first().and_then(|v| v.first()).map(|sym| sym.addr))
}

/// A path that opens the very file `m` maps in process `pid`: `/proc/PID/map_files/…`
/// (works across mount namespaces and after the file was replaced on disk, but needs
/// CAP_SYS_ADMIN), else the file's path through the process's root (what a normal user
/// may open) if its inode is still the mapped one.
pub(crate) fn mapped_file(pid: i32, m: &Mapping) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let direct = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    if std::fs::File::open(&direct).is_ok() {
        return Ok(direct);
    }
    let rooted = format!("/proc/{pid}/root{}", m.path);
    match std::fs::metadata(&rooted) {
        Ok(md) if md.ino() == m.inode => Ok(rooted),
        Ok(_) => bail!(
            "the kal agent library of process {pid} ({}) was replaced on disk since it was loaded; only root can read the mapped copy",
            m.path
        ),
        Err(e) => bail!(
            "cannot read the kal agent library of process {pid} ({}): {e}",
            m.path
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::is_agent_file;

    #[test]
    fn the_agent_is_known_by_both_its_names() {
        assert!(is_agent_file("libkal_agent.so"));
        assert!(is_agent_file("libkal_agent-00261909c5764d7a.so"));
        assert!(!is_agent_file("libkal_agent-.so"));
        assert!(!is_agent_file("libkal_agent-plugin.so"));
        assert!(!is_agent_file("libkal_agent.so.1"));
        assert!(!is_agent_file("libc.so.6"));
    }
}
