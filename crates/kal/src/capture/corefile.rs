//! `kal check --core FILE`: an ELF core file (`gcore` from gdb, a kernel core dump, what
//! `systemd-coredump` keeps) as a capture [`Source`], on this host or another.
//!
//! - **Memory**: the `PT_LOAD` segments. Bytes past a segment's file size (pages the
//!   dumper left out) and past the end of a truncated file are unreadable, never zeros
//!   taken as data ([`Memory::read`]'s contract); a truncated segment is a capture gap.
//! - **Mappings**: `NT_FILE` names each file mapping (path, offset); the other segments
//!   are anonymous memory. `[heap]`, `[vdso]` and `[vsyscall]` are recognised (the core
//!   does not name them); the executable is the file holding the entry point (`NT_AUXV`).
//! - **Threads**: one `NT_PRSTATUS` per thread (x86-64 `user_regs_struct`, `fs_base`
//!   included).
//! - **Files**: symbols come from the files `NT_FILE` names, read on this host, or from
//!   `--exe` for the executable. A file that is not here, or whose GNU build id differs
//!   from the one in the core's copy of its first page, is never read: its frames show
//!   module+offset, and one line says so.
//!
//! With kal's agent in the core (a program run under `kal run`), blocks and stacks come
//! from its table, as in a live check; otherwise from glibc's heap, walked in the core.

use crate::act::report;
use crate::capture::freeze::ThreadRegs;
use crate::capture::freeze_copy::Extras;
use crate::capture::memory::{Memory, Unreadable};
use crate::capture::procfs::{Mapping, SmapsEntry};
use crate::capture::source::Source;
use crate::capture::{Capture, Gap};
use crate::check::Check;
use anyhow::{anyhow, bail, Context, Result};
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, Object};
use std::path::Path;
use std::sync::Arc;

/// `NT_PRSTATUS`: offset of `pr_pid` (the thread id) and of `pr_reg`.
const PRSTATUS_PID: usize = 32;
const PRSTATUS_REGS: usize = 112;
/// Words of x86-64's `user_regs_struct`.
const REG_WORDS: usize = 27;
/// `NT_PRPSINFO`: offset of `pr_pid`.
const PRPSINFO_PID: usize = 24;
/// Auxiliary vector keys.
const AT_ENTRY: u64 = 9;
const AT_SYSINFO_EHDR: u64 = 33;
/// The fixed address of x86-64's legacy vsyscall page.
const VSYSCALL: u64 = 0xffff_ffff_ff60_0000;

/// A file mapped read-only into kal's memory.
struct Mapped {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value, like a Box<[u8]>.
unsafe impl Send for Mapped {}
// SAFETY: shared access only reads.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps all of `file`. (A file cut shorter while mapped would fault: cores are not
    /// written while kal reads them.)
    fn new(file: &std::fs::File) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(Mapped {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of an open file, of the file's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping the mapping this value owns.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

/// One `PT_LOAD`: `[start, end)` in the process, of which the first `avail` bytes are in
/// the file at `off`.
#[derive(Debug, Clone, Copy)]
struct Seg {
    start: u64,
    end: u64,
    off: u64,
    avail: u64,
}

/// The memory of a core file.
struct CoreMemory {
    map: Mapped,
    /// Sorted by address, disjoint.
    segs: Vec<Seg>,
    /// Runs of whole pages the file holds as zeros (untouched or reserved memory that the
    /// dumper wrote out), sorted and disjoint.
    zero: Vec<(u64, u64)>,
}

impl CoreMemory {
    fn new(map: Mapped, segs: Vec<Seg>) -> CoreMemory {
        let mut zero: Vec<(u64, u64)> = Vec::new();
        let data = map.bytes();
        for s in &segs {
            let held = data
                .get(s.off as usize..(s.off + s.avail) as usize)
                .unwrap_or(&[]);
            for (i, page) in held.chunks(4096).enumerate() {
                if page.len() == 4096 && page.iter().fold(0u8, |a, &b| a | b) == 0 {
                    let at = s.start + i as u64 * 4096;
                    match zero.last_mut() {
                        Some(last) if last.1 == at => last.1 = at + 4096,
                        _ => zero.push((at, at + 4096)),
                    }
                }
            }
        }
        CoreMemory { map, segs, zero }
    }

    /// Bytes of `[start, end)` the file holds as zeros.
    fn zero_in(&self, start: u64, end: u64) -> u64 {
        let first = self.zero.partition_point(|z| z.1 <= start);
        self.zero[first..]
            .iter()
            .take_while(|z| z.0 < end)
            .map(|z| z.1.min(end) - z.0.max(start))
            .sum()
    }
}

impl Memory for CoreMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
        buf.fill(0);
        let end = addr.saturating_add(buf.len() as u64);
        let data = self.map.bytes();
        let mut read = 0usize;
        let first = self.segs.partition_point(|s| s.end <= addr);
        for s in self.segs[first..].iter().take_while(|s| s.start < end) {
            let (a, b) = (addr.max(s.start), end.min(s.start + s.avail));
            if b > a {
                let from = (s.off + (a - s.start)) as usize;
                buf[(a - addr) as usize..(b - addr) as usize]
                    .copy_from_slice(&data[from..from + (b - a) as usize]);
                read += (b - a) as usize;
            }
        }
        if read == buf.len() {
            Ok(())
        } else {
            Err(Unreadable { read })
        }
    }

    /// All but the pages held as zeros: what is not in the file may hold anything (reading
    /// it fails, and the caller records the gap).
    fn present(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self.zero.partition_point(|z| z.1 <= start);
        let zeros: Vec<(u64, u64)> = self.zero[first..]
            .iter()
            .take_while(|z| z.0 < end)
            .copied()
            .collect();
        crate::reach::ranges::subtract(&[(start, end)], &zeros)
    }
}

/// A shared handle on a core's memory.
struct Shared(Arc<CoreMemory>);

impl Memory for Shared {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
        self.0.read(addr, buf)
    }

    fn present(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.0.present(start, end)
    }
}

/// One `NT_FILE` entry.
#[derive(Debug, Clone)]
struct FileMap {
    start: u64,
    end: u64,
    offset: u64,
    path: String,
}

/// What the notes of a core say.
#[derive(Default)]
struct Notes {
    threads: Vec<ThreadRegs>,
    pid: Option<i32>,
    auxv: Vec<(u64, u64)>,
    files: Vec<FileMap>,
    has_files: bool,
    /// `NT_PRSTATUS` notes too short to hold the registers.
    bad_threads: u64,
}

fn u64_at(d: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(o..o + 8)?.try_into().ok()?))
}

fn i32_at(d: &[u8], o: usize) -> Option<i32> {
    Some(i32::from_le_bytes(d.get(o..o + 4)?.try_into().ok()?))
}

impl Notes {
    fn take(&mut self, kind: elf::NoteType, name: &[u8], d: &[u8]) {
        if name != elf::ELF_NOTE_CORE {
            return;
        }
        if kind == elf::NT_PRSTATUS {
            let (Some(tid), Some(words)) = (
                i32_at(d, PRSTATUS_PID),
                d.get(PRSTATUS_REGS..PRSTATUS_REGS + REG_WORDS * 8),
            ) else {
                self.bad_threads += 1;
                return;
            };
            let mut w = [0u64; REG_WORDS];
            for (v, c) in w.iter_mut().zip(words.chunks_exact(8)) {
                *v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            }
            // SAFETY: x86-64's user_regs_struct is 27 u64 fields in the order the kernel
            // writes pr_reg (r15 … gs); transmute checks that the sizes are equal.
            let regs: libc::user_regs_struct = unsafe { std::mem::transmute(w) };
            self.threads.push(ThreadRegs { tid, regs });
        } else if kind == elf::NT_PRPSINFO {
            self.pid = i32_at(d, PRPSINFO_PID);
        } else if kind == elf::NT_AUXV {
            self.auxv = d
                .chunks_exact(16)
                .filter_map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
                .collect();
        } else if kind == elf::NT_FILE {
            self.has_files = true;
            let (Some(count), Some(page)) = (u64_at(d, 0), u64_at(d, 8)) else {
                return;
            };
            let names_at = 16 + count as usize * 24;
            let names = d.get(names_at..).unwrap_or(&[]).split(|&b| b == 0);
            for (i, name) in (0..count as usize).zip(names) {
                let o = 16 + i * 24;
                if let (Some(start), Some(end), Some(pgoff)) =
                    (u64_at(d, o), u64_at(d, o + 8), u64_at(d, o + 16))
                {
                    self.files.push(FileMap {
                        start,
                        end,
                        offset: pgoff * page,
                        path: String::from_utf8_lossy(name).into_owned(),
                    });
                }
            }
        }
    }

    fn aux(&self, key: u64) -> Option<u64> {
        self.auxv.iter().find(|a| a.0 == key).map(|a| a.1)
    }
}

/// The GNU build id in the ELF headers at the start of `bytes` (an ELF file's first bytes).
fn build_id_in(bytes: &[u8]) -> Option<Vec<u8>> {
    let h = elf::FileHeader64::<Endianness>::parse(bytes).ok()?;
    let endian = h.endian().ok()?;
    for ph in h.program_headers(endian, bytes).ok()? {
        let Ok(Some(mut notes)) = ph.notes(endian, bytes) else {
            continue;
        };
        while let Ok(Some(n)) = notes.next() {
            if n.name() == elf::ELF_NOTE_GNU && n.n_type(endian) == elf::NT_GNU_BUILD_ID {
                return Some(n.desc().to_vec());
            }
        }
    }
    None
}

/// The GNU build id of the ELF file at `path` on this host.
pub fn build_id_of(path: &str) -> Option<Vec<u8>> {
    let f = std::fs::File::open(path).ok()?;
    let m = Mapped::new(&f).ok()?;
    let file = object::read::elf::ElfFile64::<Endianness>::parse(m.bytes()).ok()?;
    file.build_id().ok()?.map(<[u8]>::to_vec)
}

/// An ELF core file opened as a capture source.
pub struct CoreFile {
    mem: Arc<CoreMemory>,
    smaps: Vec<SmapsEntry>,
    threads: Vec<ThreadRegs>,
    pid: i32,
    exe: String,
    rss: u64,
    unusable: Vec<String>,
    gaps: Vec<Gap>,
    bad_threads: u64,
    /// The header of a detached agent, whose stale tables are never roots.
    detached: Option<u64>,
    /// The agent was attached: blocks from before come from the heap walk.
    before_attach: bool,
    /// What kal could not use or see, one line each, to tell the user.
    pub lines: Vec<String>,
}

impl CoreFile {
    /// Opens and reads the core file at `path`; `exe`, when given, is the executable the
    /// core's process ran (its build id must match the core's, when the core has it).
    pub fn open(path: &Path, exe: Option<&Path>) -> Result<CoreFile> {
        let shown = path.display().to_string();
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open core file {shown}"))?;
        let map = Mapped::new(&file).with_context(|| format!("cannot read core file {shown}"))?;
        let data = map.bytes();
        let len = data.len() as u64;
        let h = elf::FileHeader64::<Endianness>::parse(data)
            .map_err(|_| anyhow!("{shown} is not a 64-bit ELF core file"))?;
        let endian = h.endian().map_err(|e| anyhow!("{shown}: {e}"))?;
        if h.e_type(endian) != elf::ET_CORE {
            bail!("{shown} is an ELF file but not a core file");
        }
        if h.e_machine(endian) != elf::EM_X86_64 {
            bail!("{shown} is the core of a program for another machine than x86-64: kal reads only x86-64 cores");
        }
        let phdrs = h.program_headers(endian, data).map_err(|_| {
            anyhow!("{shown} is truncated ({len} bytes): its program headers are cut off; kal cannot check it")
        })?;
        let mut segs = Vec::new();
        let mut flags = Vec::new();
        let mut notes = Notes::default();
        let mut gaps = Vec::new();
        let mut cut_bytes = 0;
        for ph in phdrs {
            let p_type = ph.p_type(endian);
            if p_type == elf::PT_LOAD {
                let (start, memsz) = (ph.p_vaddr(endian), ph.p_memsz(endian));
                let (off, filesz) = (ph.p_offset(endian), ph.p_filesz(endian).min(memsz));
                let avail = filesz.min(len.saturating_sub(off));
                if avail < filesz {
                    cut_bytes += filesz - avail;
                    gaps.push(Gap::range(
                        start + avail,
                        start + filesz,
                        "cut off: the core file is truncated",
                    ));
                }
                segs.push(Seg {
                    start,
                    end: start + memsz,
                    off,
                    avail,
                });
                flags.push(ph.p_flags(endian).0);
            } else if p_type == elf::PT_NOTE {
                let cut = || {
                    anyhow!(
                        "{shown} is truncated ({len} bytes): its notes (threads' registers, mapped files) at offset {:#x} are cut off; kal cannot check it",
                        ph.p_offset(endian)
                    )
                };
                let mut it = ph.notes(endian, data).ok().flatten().ok_or_else(cut)?;
                while let Some(n) = it.next().map_err(|_| cut())? {
                    notes.take(n.n_type(endian), n.name(), n.desc());
                }
            }
        }
        if notes.threads.is_empty() {
            bail!("{shown} holds no thread registers (NT_PRSTATUS): kal cannot check it");
        }
        if !notes.has_files {
            bail!("{shown} has no list of mapped files (NT_FILE): kal cannot tell the program's modules apart");
        }
        let mut order: Vec<usize> = (0..segs.len()).collect();
        order.sort_by_key(|&i| segs[i].start);
        let segs: Vec<Seg> = order.iter().map(|&i| segs[i]).collect();
        let flags: Vec<u32> = order.iter().map(|&i| flags[i]).collect();
        let mem = Arc::new(CoreMemory::new(map, segs));
        let mut lines = Vec::new();
        if cut_bytes > 0 {
            lines.push(format!(
                "{shown} is truncated ({len} bytes): {cut_bytes} bytes of the process's memory in {} segment(s) are missing; lost counts are unreliable",
                gaps.len()
            ));
        }
        // The executable: the file holding the entry point.
        let entry = notes.aux(AT_ENTRY).unwrap_or(0);
        let exe_core = notes
            .files
            .iter()
            .find(|f| f.start <= entry && entry < f.end)
            .map(|f| f.path.clone())
            .unwrap_or_default();
        // Each file's path on this host, and whether it may be read.
        let mut host: Vec<(String, String)> = Vec::new(); // (path in core, path here)
        let (mut missing, mut other) = (Vec::new(), Vec::new());
        for f in notes.files.iter().filter(|f| f.offset == 0) {
            if host.iter().any(|h| h.0 == f.path) {
                continue;
            }
            let here = match exe {
                Some(e) if f.path == exe_core => e.display().to_string(),
                _ => f.path.clone(),
            };
            if !Path::new(&here).is_file() {
                missing.push(here.clone());
            } else {
                let mut page = vec![0u8; 4096.min(f.end - f.start) as usize];
                let in_core = mem
                    .read(f.start, &mut page)
                    .ok()
                    .and_then(|()| build_id_in(&page));
                if in_core.is_some_and(|id| build_id_of(&here) != Some(id)) {
                    other.push(here.clone());
                }
            }
            host.push((f.path.clone(), here));
        }
        if !missing.is_empty() {
            lines.push(format!(
                "not on this host, so their frames show module+offset{}: {}",
                if missing.iter().any(|m| exe.is_none() && *m == exe_core) {
                    " (give the executable with --exe)"
                } else {
                    ""
                },
                missing.join(", ")
            ));
        }
        if !other.is_empty() {
            lines.push(format!(
                "not the build the core was made with (GNU build id differs), so their frames show module+offset: {}",
                other.join(", ")
            ));
        }
        let here_of = |p: &str| {
            host.iter()
                .find(|h| h.0 == p)
                .map(|h| h.1.clone())
                .unwrap_or_else(|| p.to_string())
        };
        let exe_here = if exe_core.is_empty() {
            String::new()
        } else {
            here_of(&exe_core)
        };
        let mut unusable = missing;
        unusable.extend(other);
        let smaps = mappings(&mem, &flags, &notes, &here_of, &exe_here);
        let rss = smaps.iter().map(|e| e.rss).sum();
        let pid = notes
            .pid
            .or_else(|| notes.threads.first().map(|t| t.tid))
            .unwrap_or(0);
        // The thread whose id is the process's first (the main thread), as in /proc.
        if let (Some(e), true) = (exe, exe_core.is_empty()) {
            lines.push(format!(
                "--exe {} is not used: the core does not say which mapped file is the executable (no entry point in NT_AUXV)",
                e.display()
            ));
        }
        let mut threads = notes.threads;
        threads.sort_by_key(|t| t.tid != pid);
        Ok(CoreFile {
            mem,
            smaps,
            threads,
            pid,
            exe: exe_here,
            rss,
            unusable,
            gaps,
            bad_threads: notes.bad_threads,
            detached: None,
            before_attach: false,
            lines,
        })
    }

    /// The address of kal's agent header, when the core's process ran under `kal run`
    /// and the agent library is readable here (else a line says why it is not used).
    fn agent_header(&mut self) -> Result<Option<u64>> {
        let Some(m) = self.smaps.iter().map(|e| &e.mapping).find(|m| {
            m.offset == 0
                && m.path
                    .rsplit('/')
                    .next()
                    .is_some_and(crate::agent::is_agent_file)
        }) else {
            return Ok(None);
        };
        if self.unusable.contains(&m.path) {
            self.lines.push(format!(
                "kal's agent library {} cannot be read here: blocks come from glibc's heap, without allocation stacks",
                m.path
            ));
            return Ok(None);
        }
        let Some(offset) = crate::agent::header_offset(&m.path, &m.path)? else {
            bail!(
                "the kal agent in the core has no {} symbol (an older agent?)",
                crate::agent::HEADER_SYMBOL
            );
        };
        // An agent loaded by `kal attach` (state 1) never saw the blocks allocated before;
        // a detached one (2) records nothing.
        let state =
            crate::agent::symbol_offset(&m.path, &m.path, "KAL_ATTACH_STATE")?.and_then(|o| {
                let mut b = [0u8; 8];
                self.mem.read(m.start + o, &mut b).ok()?;
                Some(u64::from_le_bytes(b))
            });
        match state {
            Some(1) => self.before_attach = true,
            Some(2) => {
                self.lines.push(
                    "kal's agent in the core was detached (it records nothing): blocks come from glibc's heap, without allocation stacks".to_string(),
                );
                self.detached = Some(m.start + offset);
                return Ok(None);
            }
            _ => {}
        }
        Ok(Some(m.start + offset))
    }
}

/// The core's mappings as smaps entries: one per `PT_LOAD` (its flags; path and offset
/// from `NT_FILE`), and one per file mapping the core holds no segment for. A file
/// mapping's "anonymous" bytes (what makes a read-only one a root, as smaps says for a
/// live process) are the bytes the core holds of it, unless it starts the file (ELF
/// headers, which dumpers keep whether written or not).
fn mappings(
    mem: &CoreMemory,
    flags: &[u32],
    notes: &Notes,
    here_of: &dyn Fn(&str) -> String,
    exe: &str,
) -> Vec<SmapsEntry> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    let file_of = |a: u64| notes.files.iter().find(|f| f.start <= a && a < f.end);
    for (s, &fl) in mem.segs.iter().zip(flags) {
        let f = file_of(s.start);
        let mapping = Mapping {
            start: s.start,
            end: s.end,
            read: fl & elf::PF_R.0 != 0,
            write: fl & elf::PF_W.0 != 0,
            exec: fl & elf::PF_X.0 != 0,
            shared: false,
            offset: f.map_or(0, |f| f.offset + (s.start - f.start)),
            inode: u64::from(f.is_some()),
            path: f.map(|f| here_of(&f.path)).unwrap_or_default(),
        };
        let anonymous = if f.is_some() && mapping.offset == 0 && !mapping.write {
            0
        } else {
            s.avail
        };
        out.push(SmapsEntry {
            mapping,
            rss: s.avail - mem.zero_in(s.start, s.start + s.avail),
            anonymous,
            dontfork: false,
            wipeonfork: false,
        });
    }
    for f in &notes.files {
        if !mem.segs.iter().any(|s| s.start < f.end && f.start < s.end) {
            out.push(SmapsEntry {
                mapping: Mapping {
                    start: f.start,
                    end: f.end,
                    read: true,
                    write: false,
                    exec: true,
                    shared: false,
                    offset: f.offset,
                    inode: 1,
                    path: here_of(&f.path),
                },
                rss: 0,
                anonymous: 0,
                dontfork: false,
                wipeonfork: false,
            });
        }
    }
    out.sort_by_key(|e| e.mapping.start);
    name_special(&mut out, mem, notes, exe);
    out
}

/// Names the anonymous mappings a core does not name: `[vsyscall]`, `[vdso]` (from the
/// auxiliary vector) and the `[vvar]` pages below it when not dumped, `[stack]` (the main
/// thread's), and `[heap]`: the anonymous read-write mapping between the executable and
/// the next file above it that starts with glibc's first heap chunk (the 0x290-byte
/// tcache of the main thread), else the only one there not adjoining the executable
/// (which would be its `.bss`).
fn name_special(out: &mut [SmapsEntry], mem: &CoreMemory, notes: &Notes, exe: &str) {
    let anon = |e: &SmapsEntry| e.mapping.inode == 0 && e.mapping.path.is_empty();
    let vdso = notes.aux(AT_SYSINFO_EHDR).unwrap_or(u64::MAX);
    let sp = notes
        .threads
        .iter()
        .find(|t| Some(t.tid) == notes.pid)
        .or(notes.threads.first())
        .map_or(0, |t| t.sp());
    let mut below_vdso = vdso;
    for i in (0..out.len()).rev() {
        let m = &out[i].mapping;
        if !anon(&out[i]) {
            continue;
        }
        let name = if m.start == VSYSCALL {
            "[vsyscall]"
        } else if m.start == vdso {
            "[vdso]"
        } else if m.end == below_vdso && mem.segs.iter().all(|s| s.start != m.start || s.avail == 0)
        {
            below_vdso = m.start;
            "[vvar]"
        } else if m.contains(sp) {
            "[stack]"
        } else {
            continue;
        };
        out[i].mapping.path = name.to_string();
    }
    if exe.is_empty() {
        return;
    }
    let exe_end = out
        .iter()
        .filter(|e| e.mapping.path == exe)
        .map(|e| e.mapping.end)
        .max()
        .unwrap_or(0);
    let next_file = out
        .iter()
        .filter(|e| e.mapping.inode != 0 && e.mapping.start >= exe_end)
        .map(|e| e.mapping.start)
        .min()
        .unwrap_or(u64::MAX);
    let candidates: Vec<usize> = (0..out.len())
        .filter(|&i| {
            let m = &out[i].mapping;
            anon(&out[i]) && m.write && m.start >= exe_end && m.end <= next_file
        })
        .collect();
    let starts_heap = |i: &usize| {
        let mut w = [0u8; 16];
        mem.read(out[*i].mapping.start, &mut w).is_ok()
            && u64::from_le_bytes(w[8..].try_into().unwrap_or([0; 8])) == 0x291
    };
    let heap = candidates.iter().copied().find(starts_heap).or_else(|| {
        let apart: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| out[i].mapping.start != exe_end)
            .collect();
        (apart.len() == 1).then(|| apart[0])
    });
    if let Some(i) = heap {
        out[i].mapping.path = "[heap]".to_string();
    }
}

impl Source for CoreFile {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn exe(&self) -> String {
        self.exe.clone()
    }

    fn smaps(&self) -> Result<Vec<SmapsEntry>> {
        Ok(self.smaps.clone())
    }

    fn threads(&self) -> Vec<ThreadRegs> {
        self.threads.clone()
    }

    fn memory(&self) -> Box<dyn Memory + Send + Sync> {
        Box::new(Shared(self.mem.clone()))
    }

    fn rss(&self) -> u64 {
        self.rss
    }

    fn unusable_files(&self) -> Vec<String> {
        self.unusable.clone()
    }

    fn take_extras(&mut self) -> Extras {
        Extras {
            gaps: std::mem::take(&mut self.gaps),
            threads_without_registers: self.bad_threads,
            before_attach: self.before_attach,
            ..Default::default()
        }
    }
}

/// What the report of a core check says about what a core cannot hold.
pub const NO_KERNEL_STATE: &str = "a core file holds no kernel state: pointers that only \
     the kernel held (epoll registrations, POSIX timers) were not roots";

/// Checks the core file at `path` (`exe`: the executable, when not where the core says).
/// Lines about what could not be used are printed first.
pub fn check(path: &Path, exe: Option<&Path>, opts: &report::Options) -> Result<Check> {
    let mut core = CoreFile::open(path, exe)?;
    let started = std::time::Instant::now();
    let header = core.agent_header()?;
    for l in &core.lines {
        crate::say!("kal: {l}");
    }
    let cap: Capture = match header {
        Some(h) => crate::capture::capture_table(&mut core, h)?,
        None => {
            let maps: Vec<Mapping> = core.smaps.iter().map(|e| e.mapping.clone()).collect();
            crate::capture::agentless::ensure_glibc_heap(
                &maps,
                &format!("the process of core file {}", path.display()),
            )?;
            let mut cap = crate::capture::agentless::capture_source(&mut core)?;
            // A detached agent's tables still name blocks: they are not the program's
            // pointers.
            if let Some(h) = core.detached {
                if let Ok(header) = crate::blocks::agent_table::read_header(cap.heap.as_ref(), h) {
                    cap.agent = crate::capture::agent_ranges(cap.heap.as_ref(), &header);
                }
            }
            cap
        }
    };
    let kinds = crate::classify_with(&cap, &opts.suppressions);
    let scan = started.elapsed();
    let symbols = crate::attribute::symbolize::Symbols::new().without(core.unusable.clone());
    let mut report = report::build(&cap, &kinds, &symbols, opts, &Default::default());
    report.scan_ms = Some(scan.as_secs_f64() * 1e3);
    report.note = Some(match header {
        Some(_) => NO_KERNEL_STATE.to_string(),
        None => format!(
            "{}; {NO_KERNEL_STATE}",
            crate::capture::agentless::NO_STACKS
        ),
    });
    if header.is_none() {
        // No stacks to group by: blocks are grouped by what they are, as live.
        report.leaks = crate::attribute::contents::describe(&cap, &kinds, |k| {
            k != crate::reach::Kind::Reachable || opts.show_reachable
        });
    } else {
        let described = crate::blocks::before_attach::describe(&cap, &kinds, opts.show_reachable);
        crate::blocks::before_attach::relabel(&mut report, &cap, described);
    }
    Ok(Check::new(report, &kinds, cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bytes");
        std::fs::write(&p, (0..=255u8).collect::<Vec<u8>>()).unwrap();
        let map = Mapped::new(&std::fs::File::open(&p).unwrap()).unwrap();
        // 0x1000..0x1100 holds 16 bytes from offset 32 (filesz < memsz); 0x2000..0x2010
        // all of its 16 bytes.
        let mem = CoreMemory::new(
            map,
            vec![
                Seg {
                    start: 0x1000,
                    end: 0x1100,
                    off: 32,
                    avail: 16,
                },
                Seg {
                    start: 0x2000,
                    end: 0x2010,
                    off: 64,
                    avail: 16,
                },
            ],
        );
        let mut b = [0xffu8; 8];
        assert_eq!(mem.read(0x1008, &mut b), Ok(()));
        assert_eq!(b, [40, 41, 42, 43, 44, 45, 46, 47]);
        let mut b = [0xffu8; 16];
        assert_eq!(mem.read(0x1008, &mut b), Err(Unreadable { read: 8 }));
        assert_eq!(&b[8..], &[0; 8], "what was not read is zeros");
        assert_eq!(mem.read(0x1800, &mut b), Err(Unreadable { read: 0 }));
        let mut b = [0u8; 4];
        assert_eq!(mem.read(0x200c, &mut b), Ok(()));
        assert_eq!(b, [76, 77, 78, 79]);
    }

    #[test]
    fn pages_held_as_zeros_are_not_present_and_pages_not_held_are() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pages");
        let mut bytes = vec![0u8; 3 * 4096];
        bytes[4096 + 5] = 1;
        std::fs::write(&p, bytes).unwrap();
        let map = Mapped::new(&std::fs::File::open(&p).unwrap()).unwrap();
        // Four pages at 0x10000, the file holds three: zeros, data, zeros.
        let mem = CoreMemory::new(
            map,
            vec![Seg {
                start: 0x10000,
                end: 0x14000,
                off: 0,
                avail: 3 * 4096,
            }],
        );
        assert_eq!(
            mem.present(0x10000, 0x14000),
            vec![(0x11000, 0x12000), (0x13000, 0x14000)]
        );
        assert_eq!(mem.zero_in(0x10000, 0x14000), 2 * 4096);
        let mut b = [0u8; 8];
        assert_eq!(mem.read(0x13000, &mut b), Err(Unreadable { read: 0 }));
    }
}
