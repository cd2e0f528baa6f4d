//! Checks that a program can take the agent: a 64-bit dynamically linked ELF (or a script).

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

const PT_INTERP: u32 = 3;

/// Fails with a one-line reason when `path` is an ELF the agent cannot be preloaded into.
pub fn check_preloadable(path: &Path) -> Result<()> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut data = Vec::new();
    f.by_ref().take(64 * 1024).read_to_end(&mut data)?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Ok(()); // a script: its interpreter gets the agent
    }
    if data[4] != 2 {
        bail!(
            "{} is a 32-bit program; kal supports x86-64 programs",
            path.display()
        );
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            break;
        }
        if u32::from_le_bytes(data[o..o + 4].try_into()?) == PT_INTERP {
            return Ok(());
        }
    }
    bail!(
        "{} is statically linked: kal loads its agent with LD_PRELOAD, which needs a dynamically linked program",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dynamic_elf_and_scripts_rejects_garbage_path() {
        assert!(check_preloadable(Path::new("/bin/ls")).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert!(check_preloadable(&script).is_ok());
        assert!(check_preloadable(&dir.path().join("missing")).is_err());
    }
}
