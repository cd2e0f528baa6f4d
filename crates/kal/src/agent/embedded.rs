//! The agent inside the `kal` binary: written out at first use to a directory of the user's
//! own, so that a kal installed alone (`cargo install --path crates/kal`) works.
//!
//! The directory is `/var/tmp/kal-agent-UID`: made by kal with mode 0711 (only its owner
//! can write or list it; processes of other users — a program under `kal run` that gives
//! up root, a process `kal attach` loads the agent into — can still open the file they
//! are told about), refused if it is a symbolic link, someone else's, or writable by
//! others. The file is named by a hash of the agent's bytes, written under a temporary
//! name and renamed; an existing one is used only if its bytes are exactly the embedded
//! ones.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The agent built with this kal.
static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libkal_agent.so"));

/// FNV-1a of the agent's bytes, for its file name.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where the embedded agent is written for user `uid`.
fn dir_for(uid: u32) -> PathBuf {
    PathBuf::from(format!("/var/tmp/kal-agent-{uid}"))
}

/// Makes (or checks) the directory: a real directory of `uid`'s, not writable by others.
fn own_dir(dir: &Path, uid: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let md = std::fs::symlink_metadata(dir)?;
    if md.file_type().is_symlink() || !md.is_dir() {
        bail!(
            "refusing {}: not a directory of its own (a link?)",
            dir.display()
        );
    }
    if md.uid() != uid {
        bail!(
            "refusing {}: it belongs to uid {}, not to {uid} (someone else created it)",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o022 != 0 {
        bail!(
            "refusing {}: mode {:o} lets others write in it",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

/// The path of the embedded agent, written out if it is not there yet (or not intact).
pub fn path() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = dir_for(uid);
    own_dir(&dir, uid)?;
    let file = dir.join(format!("libkal_agent-{:016x}.so", hash(AGENT)));
    if let Ok(md) = std::fs::symlink_metadata(&file) {
        if md.is_file() && md.uid() == uid && std::fs::read(&file).is_ok_and(|b| b == AGENT) {
            return Ok(file);
        }
        std::fs::remove_file(&file)
            .with_context(|| format!("cannot replace {}", file.display()))?;
    }
    let tmp = dir.join(format!(".agent-{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let written = f.write_all(AGENT).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot create {}", file.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_an_elf_shared_object() {
        assert_eq!(&AGENT[..4], b"\x7fELF");
        assert_eq!(AGENT[16], 3, "ET_DYN");
    }
}
