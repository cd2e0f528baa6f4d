//! Checks that a program can take the agent: a 64-bit dynamically linked ELF (or a script).

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

const PT_INTERP: u32 = 3;
const PT_LOAD: u32 = 1;

/// One loadable segment: where it is in the file and at which virtual address it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// File offset.
    pub offset: u64,
    /// Virtual address (as `nm` and `objdump` show addresses).
    pub vaddr: u64,
    /// Bytes of the file in it.
    pub filesz: u64,
}

/// The `PT_LOAD` segments of a 64-bit ELF file; empty when it cannot be read as one.
pub fn load_segments(path: &Path) -> Vec<Segment> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut data = Vec::new();
    if f.by_ref().take(64 * 1024).read_to_end(&mut data).is_err()
        || data.len() < 64
        || &data[..4] != b"\x7fELF"
        || data[4] != 2
    {
        return Vec::new();
    }
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64_at(0x20).unwrap_or(0) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .filter_map(|i| {
            let o = phoff + i * phentsize;
            let kind = u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?);
            (kind == PT_LOAD).then_some(())?;
            Some(Segment {
                offset: u64_at(o + 8)?,
                vaddr: u64_at(o + 16)?,
                filesz: u64_at(o + 32)?,
            })
        })
        .collect()
}

/// The virtual address of file offset `off` in a file with these segments (the offset
/// itself when no segment holds it).
pub fn vaddr_of(segments: &[Segment], off: u64) -> u64 {
    segments
        .iter()
        .find(|s| off >= s.offset && off < s.offset + s.filesz.max(1))
        .map(|s| off - s.offset + s.vaddr)
        .unwrap_or(off)
}

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

/// The functions of the C allocator (`malloc`, `free`, `calloc`, `realloc`) that the
/// program at `path` defines itself: its calls to them never reach the agent.
pub fn own_allocator(path: &Path) -> Vec<&'static str> {
    use blazesym::inspect::{source::Elf, source::Source, Inspector};
    const NAMES: [&str; 4] = ["malloc", "free", "calloc", "realloc"];
    let src = Source::Elf(Elf::new(path));
    let inspector = Inspector::new();
    let Ok(found) = inspector.lookup(&src, &NAMES) else {
        return Vec::new();
    };
    NAMES
        .iter()
        .zip(found)
        .filter(|(_, syms)| syms.iter().any(|s| s.addr != 0))
        .map(|(n, _)| *n)
        .collect()
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

    #[test]
    fn programs_using_the_c_librarys_malloc_define_none() {
        assert!(own_allocator(Path::new("/bin/ls")).is_empty());
        assert!(own_allocator(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn segments_map_file_offsets_to_addresses() {
        let segs = load_segments(Path::new("/bin/ls"));
        assert!(!segs.is_empty());
        let s = segs[segs.len() - 1];
        assert_eq!(vaddr_of(&segs, s.offset + 5), s.vaddr + 5);
        assert!(load_segments(Path::new("/nonexistent")).is_empty());
    }
}
