//! `kal attach PID` / `kal detach PID`: the agent loaded into a process started without kal.
//!
//! Attach freezes every thread, checks that no thread holds a lock `dlopen` or malloc needs
//! (each arena's mutex, found by the heap walker, and the loader's `_dl_load_lock`,
//! `_dl_load_write_lock`, `_dl_load_tls_lock` in `_rtld_global`, from ld.so's dynamic
//! symbols; glibc 2.36's layout, checked by the mutex kinds) and picks a thread that is not
//! inside libc or the loader (or is blocked in a system call). If a lock is held it lets
//! the process run a moment and tries again, a bounded number of times.
//!
//! The call itself is **self-completing**: kal writes a small stub into one page of the
//! target (mapped once by an injected `mmap`, remembered by the agent for the next attach)
//! with the thread's registers, sets the thread to run it and lets it go. The stub saves
//! the extended state (`xsave`), calls `dlopen(agent, RTLD_NOW)` (later attaches: the
//! agent's `kal_agent_attach`), restores the extended state and every register, and jumps
//! back where the thread was, the interrupted system call restarted as the kernel would
//! have (`-ERESTART*`: `rip - 2`, `rax = orig_rax`). So if kal is killed at any instant,
//! the thread finishes the call and runs on (ptrace detaches with kal). The agent's
//! constructor sees it was not preloaded and redirects the GOT of every module while the
//! other threads are still stopped.

use crate::capture::freeze::{Frozen, ThreadRegs};
use crate::capture::memory::{Memory, ProcessMemory};
use crate::capture::procfs::{self, Mapping};
use crate::capture::tracee::ptrace;
use crate::capture::tracee::waitpid;
use anyhow::{bail, Context, Result};
use blazesym::inspect::source::{Elf, Source};
use blazesym::inspect::Inspector;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

core::arch::global_asm!(
    ".pushsection .text.kal_attach_stub,\"ax\",@progbits",
    ".balign 64",
    ".globl kal_attach_stub_start",
    "kal_attach_stub_start:",
    "mov eax, -1",
    "mov edx, -1",
    "xsave64 [rip + kal_attach_stub_start + 4096]",
    "cld",
    "mov rdi, qword ptr [rip + kal_attach_stub_start + 2056]",
    "mov rsi, qword ptr [rip + kal_attach_stub_start + 2064]",
    "call qword ptr [rip + kal_attach_stub_start + 2048]",
    "mov qword ptr [rip + kal_attach_stub_start + 2072], rax",
    "mov eax, -1",
    "mov edx, -1",
    "xrstor64 [rip + kal_attach_stub_start + 4096]",
    "lea rsp, [rip + kal_attach_stub_start + 2112]",
    "pop rax",
    "pop rbx",
    "pop rcx",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "pop rbp",
    "pop r8",
    "pop r9",
    "pop r10",
    "pop r11",
    "pop r12",
    "pop r13",
    "pop r14",
    "pop r15",
    "popfq",
    "mov rsp, qword ptr [rip + kal_attach_stub_start + 2088]",
    "mov qword ptr [rip + kal_attach_stub_start + 2080], 1",
    "jmp qword ptr [rip + kal_attach_stub_start + 2096]",
    ".globl kal_attach_stub_end",
    "kal_attach_stub_end:",
    ".popsection",
);

extern "C" {
    static kal_attach_stub_start: u8;
    static kal_attach_stub_end: u8;
}

/// Offsets in the stub page.
mod at {
    pub const FUNC: u64 = 2048;
    pub const ARG0: u64 = 2056;
    pub const ARG1: u64 = 2064;
    pub const RESULT: u64 = 2072;
    pub const DONE: u64 = 2080;
    pub const RSP: u64 = 2088;
    pub const RIP: u64 = 2096;
    pub const REGS: u64 = 2112;
    pub const PATH: u64 = 2560;
    pub const XSAVE: u64 = 4096;
}

/// Size of the page: the code and data page, then the `xsave` area.
fn stub_len() -> u64 {
    // cpuid leaf 0xD: the xsave area's size for the features enabled in XCR0.
    let xsave = core::arch::x86_64::__cpuid_count(0xd, 0).ebx as u64;
    at::XSAVE + xsave.max(4096).next_multiple_of(4096)
}

fn stub_code() -> &'static [u8] {
    // SAFETY: both labels delimit the stub in kal's own text, start before end.
    unsafe {
        let s = core::ptr::addr_of!(kal_attach_stub_start);
        let e = core::ptr::addr_of!(kal_attach_stub_end);
        std::slice::from_raw_parts(s, e as usize - s as usize)
    }
}

/// What an attach did.
#[derive(Debug)]
pub struct Attached {
    /// How long the program's threads were stopped (freeze to release).
    pub pause: Duration,
    /// GOT slots redirected to the agent.
    pub slots: u64,
    /// Freezes needed before no thread held a lock.
    pub tries: u32,
    /// Whether the agent was loaded before (a second attach).
    pub again: bool,
    /// Whether the program allocates with jemalloc (no heap walk: blocks from before the
    /// attach are unknown).
    pub jemalloc: bool,
}

/// The agent's attach state, from its exported symbols (0 preloaded, 1 attached, 2
/// detached), with the addresses of `kal_agent_attach`, `KAL_ATTACH_SLOTS` and
/// `KAL_ATTACH_STUB`.
struct AgentSyms {
    state_addr: u64,
    slots_addr: u64,
    attach_fn: u64,
    stub_addr: u64,
}

fn lookup(pid: i32, m: &Mapping, names: &[&str]) -> Result<Vec<u64>> {
    let path = crate::agent::mapped_file(pid, m)?;
    let inspector = Inspector::new();
    let src = Source::Elf(Elf::new(&path));
    let found = inspector
        .lookup(&src, names)
        .with_context(|| format!("cannot read the symbols of {}", m.path))?;
    names
        .iter()
        .zip(found)
        .map(|(n, v)| match v.first() {
            Some(s) => Ok(m.start + s.addr),
            None => bail!("{} has no symbol {n}", m.path),
        })
        .collect()
}

/// Value of dynamic symbol `name` in ELF file `path` (versioned names match their base
/// name), read from `.dynsym`.
fn dynsym(path: &str, name: &str) -> Option<u64> {
    let data = std::fs::read(path).ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    if data.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    for i in 0..shnum {
        if u32_at(sh(i) + 4)? != 11 {
            continue; // SHT_DYNSYM
        }
        let off = u64_at(sh(i) + 0x18)? as usize;
        let size = u64_at(sh(i) + 0x20)? as usize;
        let link = u32_at(sh(i) + 0x28)? as usize;
        let stroff = u64_at(sh(link) + 0x18)? as usize;
        for k in 0..size / 24 {
            let e = off + k * 24;
            let n = stroff + u32_at(e)? as usize;
            let end = n + data.get(n..)?.iter().position(|&b| b == 0)?;
            let shndx = u16_at(e + 6)?;
            if &data[n..end] == name.as_bytes() && shndx != 0 {
                return u64_at(e + 8);
            }
        }
    }
    None
}

fn dyn_lookup(pid: i32, m: &Mapping, name: &str) -> Result<u64> {
    let path = crate::agent::mapped_file(pid, m)?;
    match dynsym(&path, name) {
        Some(v) => Ok(m.start + v),
        None => bail!("{} has no dynamic symbol {name}", m.path),
    }
}

fn first_map(maps: &[Mapping], pred: impl Fn(&str) -> bool) -> Option<&Mapping> {
    maps.iter().find(|m| m.offset == 0 && pred(m.file_name()))
}

fn agent_syms(pid: i32, maps: &[Mapping]) -> Result<Option<AgentSyms>> {
    let Some(m) = first_map(maps, crate::agent::is_agent_file) else {
        return Ok(None);
    };
    let v = lookup(
        pid,
        m,
        &[
            "KAL_ATTACH_STATE",
            "KAL_ATTACH_SLOTS",
            "kal_agent_attach",
            "KAL_ATTACH_STUB",
        ],
    )
    .context("the kal agent in this process is too old to attach or detach")?;
    Ok(Some(AgentSyms {
        state_addr: v[0],
        slots_addr: v[1],
        attach_fn: v[2],
        stub_addr: v[3],
    }))
}

fn read_u64(mem: &ProcessMemory, addr: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)
        .map_err(|_| anyhow::anyhow!("cannot read address {addr:#x}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Attach state of an agent that `dlopen` gave no static TLS: it stays loaded and inert.
pub const NO_STATIC_TLS: u64 = 3;

/// Why an agent in state [`NO_STATIC_TLS`] does nothing in process `pid`, and what to do.
pub fn no_static_tls(pid: i32) -> String {
    format!(
        "kal cannot attach to process {pid}: its loader has no spare static TLS left for the agent's per-thread state (libraries it opened with dlopen used it up); the agent stays loaded there but records nothing. Start the program under `kal run`, or with GLIBC_TUNABLES=glibc.rtld.optional_static_tls=4096 so that kal attach finds room"
    )
}

/// The agent's attach state in process `pid` (0 preloaded, 1 attached, 2 detached, 3
/// loaded without static TLS), or `None` without an agent.
pub fn agent_state(pid: i32) -> Result<Option<u64>> {
    let maps = procfs::maps(pid)?;
    match agent_syms(pid, &maps)? {
        Some(s) => Ok(Some(read_u64(&ProcessMemory::new(pid), s.state_addr)?)),
        None => Ok(None),
    }
}

/// Allocators kal attach does not support (no lock check).
const OTHER_ALLOCATORS: &[(&str, &str)] =
    &[("libtcmalloc", "tcmalloc"), ("libmimalloc", "mimalloc")];

/// The file name jemalloc's library starts with: kal attach supports it without a heap
/// walk (blocks from before the attach are unknown).
const JEMALLOC: &str = "libjemalloc";

/// Bytes above a stopped thread's stack pointer searched for a return address into
/// jemalloc (a thread inside a system call jemalloc made may hold one of its locks).
const JEMALLOC_STACK_WINDOW: u64 = 1024;

/// How many times the process is frozen before kal gives up on a held lock.
const TRIES: u32 = 50;
/// How long the agent may take to load (the stub completes by itself after that).
const LOAD_DEADLINE: Duration = Duration::from_secs(10);

/// Loads the agent into process `pid` (or attaches a detached one again).
pub fn attach(pid: i32, agent_path: &std::path::Path) -> Result<Attached> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid} (it has exited, or never existed)");
    }
    let maps =
        procfs::maps(pid).with_context(|| format!("cannot read the mappings of process {pid}"))?;
    if maps.is_empty() {
        bail!("no permission to inspect process {pid}, or it is a kernel thread");
    }
    let Some(ld) = first_map(&maps, |f| f.starts_with("ld-linux")) else {
        bail!("process {pid} is statically linked (no dynamic loader): kal attach cannot load its agent into it");
    };
    if let Some((_, name)) = OTHER_ALLOCATORS
        .iter()
        .find(|(lib, _)| maps.iter().any(|m| m.file_name().starts_with(lib)))
    {
        bail!("process {pid} uses {name}: kal attach supports glibc's malloc and jemalloc only for now");
    }
    let jemalloc = maps.iter().any(|m| m.file_name().starts_with(JEMALLOC));
    let Some(libc) = first_map(&maps, |f| f.starts_with("libc.so")) else {
        bail!("process {pid} has no glibc libc.so mapped: kal attach needs glibc");
    };
    let mem = ProcessMemory::new(pid);
    let agent = agent_syms(pid, &maps)?;
    let (func, arg0, again) = match &agent {
        Some(s) => match read_u64(&mem, s.state_addr)? {
            0 => bail!("process {pid} already has the kal agent (started under kal run): nothing to attach"),
            1 => bail!("process {pid} is already attached (kal detach {pid} first)"),
            NO_STATIC_TLS => bail!("{}", no_static_tls(pid)),
            _ => (s.attach_fn, 0, true),
        },
        None => (dyn_lookup(pid, libc, "dlopen")?, 0, false),
    };
    let rtld = dyn_lookup(pid, ld, "_rtld_global")?;
    let path = agent_path
        .canonicalize()
        .with_context(|| format!("cannot find {}", agent_path.display()))?;
    let path_bytes = path.as_os_str().as_encoded_bytes();
    if path_bytes.len() >= 1024 {
        bail!("the agent's path is too long: {}", path.display());
    }
    let stub_known = match &agent {
        Some(s) => read_u64(&mem, s.stub_addr)?,
        None => 0,
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let frozen = Frozen::freeze(pid)?;
        frozen.ensure_not_crashing()?;
        let threads = frozen.regs()?;
        let maps = procfs::maps(pid)?;
        match ready(pid, &maps, &threads, rtld, jemalloc)? {
            Ok(tid) => {
                let t = *threads
                    .iter()
                    .find(|t| t.tid == tid)
                    .expect("chosen thread");
                return run_stub(
                    frozen,
                    t,
                    Call {
                        func,
                        arg0,
                        arg1: libc::RTLD_NOW as u64,
                        path: (!again).then_some(path_bytes),
                        page: stub_known,
                    },
                    agent,
                )
                .map(|(pause, slots)| Attached {
                    pause,
                    slots,
                    tries,
                    again,
                    jemalloc,
                });
            }
            Err(why) if tries >= TRIES => {
                bail!("kal could not attach to process {pid}: {why} in each of {TRIES} tries")
            }
            Err(_) => {
                drop(frozen);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Whether the frozen process may run `dlopen` now: the thread to run it in, or why not.
fn ready(
    pid: i32,
    maps: &[Mapping],
    threads: &[ThreadRegs],
    rtld: u64,
    jemalloc: bool,
) -> Result<std::result::Result<i32, String>> {
    let mem = ProcessMemory::new(pid);
    // The loader's locks (glibc 2.36 layout of `struct rtld_global`).
    for (name, off) in [
        ("_dl_load_lock", 2568u64),
        ("_dl_load_write_lock", 2608),
        ("_dl_load_tls_lock", 2648),
    ] {
        let mut w = [0u8; 24];
        mem.read(rtld + off, &mut w)
            .map_err(|_| anyhow::anyhow!("cannot read the loader's state"))?;
        let word = |i: usize| u32::from_le_bytes(w[i..i + 4].try_into().expect("4 bytes"));
        // pthread_mutex_t: __lock, __count, __owner, __nusers, __kind.
        if word(16) != 1 {
            bail!("the dynamic loader of process {pid} is not laid out as glibc 2.36's: kal attach does not know where its locks are");
        }
        if word(0) != 0 || word(8) != 0 {
            return Ok(Err(format!("a thread held the loader's {name}")));
        }
    }
    if jemalloc {
        if let Some(why) = inside_jemalloc(&mem, maps, threads) {
            return Ok(Err(why));
        }
        return Ok(pick_thread(maps, threads));
    }
    let tps: Vec<u64> = threads.iter().map(|t| t.thread_pointer()).collect();
    let walk = crate::blocks::ptmalloc::Ptmalloc {
        mem: &mem,
        maps,
        thread_pointers: &tps,
        exclude: &[],
        parked: &[],
    };
    let arenas = walk
        .arena_addresses()
        .map_err(|e| anyhow::anyhow!("cannot find glibc's malloc arenas in process {pid}: {e}"))?;
    for a in arenas {
        if read_u64(&mem, a)? as u32 != 0 {
            return Ok(Err(format!(
                "a thread held the malloc arena lock at {a:#x}"
            )));
        }
    }
    Ok(pick_thread(maps, threads))
}

/// jemalloc's locks cannot be read from outside: a thread stopped in jemalloc's code, or
/// in a call jemalloc made (a return address into it just above the stack pointer), may
/// hold one, so the process is let run a moment. Why, if so.
fn inside_jemalloc(
    mem: &ProcessMemory,
    maps: &[Mapping],
    threads: &[ThreadRegs],
) -> Option<String> {
    let text: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.exec && m.file_name().starts_with(JEMALLOC))
        .map(|m| (m.start, m.end))
        .collect();
    let is_text = |a: u64| text.iter().any(|&(s, e)| a >= s && a < e);
    for t in threads {
        if is_text(t.regs.rip) {
            return Some(format!("thread {} was inside jemalloc", t.tid));
        }
        // Blocked in a condition wait (futex FUTEX_WAIT_BITSET, as pthread_cond_wait and
        // jemalloc's background threads wait): its mutex is released while it waits.
        let r = &t.regs;
        if r.orig_rax == libc::SYS_futex as u64 && r.rsi & 0x7f == libc::FUTEX_WAIT_BITSET as u64 {
            continue;
        }
        let mut w = vec![0u8; JEMALLOC_STACK_WINDOW as usize];
        let got = match mem.read(t.sp(), &mut w) {
            Ok(()) => w.len(),
            Err(e) => e.read,
        };
        if w[..got - got % 8]
            .chunks_exact(8)
            .any(|c| is_text(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
        {
            return Some(format!("thread {} was in a call jemalloc made", t.tid));
        }
    }
    None
}

/// The thread to run the stub in: one blocked in a system call (outside the agent), else
/// one outside libc and the loader; never one stopped halfway through malloc's own
/// bookkeeping (a tcache has no lock).
fn pick_thread(maps: &[Mapping], threads: &[ThreadRegs]) -> std::result::Result<i32, String> {
    let inside = |rip: u64| {
        maps.iter().any(|m| {
            m.exec
                && rip >= m.start
                && rip < m.end
                && (m.file_name().starts_with("libc.so")
                    || m.file_name().starts_with("ld-linux")
                    || crate::agent::is_agent_file(m.file_name()))
        })
    };
    let pick = threads
        .iter()
        .find(|t| (t.regs.orig_rax as i64) >= 0 && !in_agent(maps, t.regs.rip))
        .or_else(|| threads.iter().find(|t| !inside(t.regs.rip)));
    match pick {
        Some(t) => Ok(t.tid),
        None => Err("every thread was inside libc or the loader".into()),
    }
}

fn in_agent(maps: &[Mapping], rip: u64) -> bool {
    maps.iter()
        .any(|m| rip >= m.start && rip < m.end && crate::agent::is_agent_file(m.file_name()))
}

/// The function the stub calls, with its arguments.
struct Call<'a> {
    func: u64,
    arg0: u64,
    arg1: u64,
    /// The agent's path, written into the page and passed as the first argument.
    path: Option<&'a [u8]>,
    /// The page from an earlier attach, or 0.
    page: u64,
}

/// The registers thread `r` resumes with once kal lets it go, as the kernel would leave
/// them: an interrupted system call restarted.
fn resume_state(r: &libc::user_regs_struct) -> (u64, u64) {
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            -514..=-512 => return (r.rip - 2, r.orig_rax),
            -516 => return (r.rip - 2, 219), // restart_syscall
            _ => {}
        }
    }
    (r.rip, r.rax)
}

fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("cannot write the memory of process {pid}"))?;
    f.write_all_at(data, addr)
        .with_context(|| format!("cannot write process {pid} at {addr:#x}"))
}

fn run_stub(
    mut frozen: Frozen,
    t: ThreadRegs,
    call: Call,
    agent: Option<AgentSyms>,
) -> Result<(Duration, u64)> {
    let pid = frozen.pid();
    let tid = t.tid;
    let p = Pid::from_raw(tid);
    let len = stub_len();
    let page = if call.page != 0 {
        call.page
    } else {
        let sc = crate::capture::snapshot::find_syscall(pid)?;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let rc = syscall(
            &mut frozen,
            tid,
            &t.regs,
            sc,
            9,
            [0, len, prot, flags, u64::MAX, 0],
        )?;
        if rc < 0 {
            bail!(
                "mmap failed in process {pid}: {}",
                Errno::from_raw(-rc as i32)
            );
        }
        rc as u64
    };
    let r = &t.regs;
    let (rip, rax) = resume_state(r);
    let regs = [
        rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15, r.eflags,
    ];
    let mut data = vec![0u8; (at::PATH + 1024) as usize];
    let code = stub_code();
    data[..code.len()].copy_from_slice(code);
    let arg0 = match call.path {
        Some(path) => {
            data[at::PATH as usize..at::PATH as usize + path.len()].copy_from_slice(path);
            page + at::PATH
        }
        None => call.arg0,
    };
    let put = |d: &mut Vec<u8>, off: u64, v: u64| {
        d[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    put(&mut data, at::FUNC, call.func);
    put(&mut data, at::ARG0, arg0);
    put(&mut data, at::ARG1, call.arg1);
    put(&mut data, at::RSP, r.rsp);
    put(&mut data, at::RIP, rip);
    for (i, v) in regs.iter().enumerate() {
        put(&mut data, at::REGS + 8 * i as u64, *v);
    }
    write_mem(pid, page, &data)?;
    // The xsave header must be clean for xrstor.
    write_mem(
        pid,
        page + at::XSAVE,
        &vec![0u8; (len - at::XSAVE) as usize],
    )?;
    let mut n = *r;
    n.rip = page;
    n.rsp = (r.rsp - 256) & !15;
    n.orig_rax = u64::MAX; // no restart: the stub restarts the call itself
    ptrace::setregs(p, n).context("cannot set registers")?;
    ptrace::cont(p, None).context("cannot resume the attaching thread")?;
    crate::capture::snapshot::test_hold("attach");
    let mem = ProcessMemory::new(pid);
    let deadline = Instant::now() + LOAD_DEADLINE;
    loop {
        if read_u64(&mem, page + at::DONE)? == 1 {
            break;
        }
        if Instant::now() > deadline {
            drop(frozen);
            bail!("the agent was still loading in process {pid} after {LOAD_DEADLINE:?}: kal let the program go (the load completes by itself)");
        }
        match waitpid(p, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Stopped(_, s)) => {
                ptrace::cont(p, Some(s)).context("cannot resume the attaching thread")?;
            }
            Ok(WaitStatus::PtraceEvent(..)) => {
                let _ = ptrace::cont(p, None);
            }
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                bail!("process {pid} ended while the agent was loading")
            }
            _ => std::thread::sleep(Duration::from_micros(100)),
        }
    }
    let result = read_u64(&mem, page + at::RESULT)?;
    // Stop the thread again where it is (outside the stub or at its last jump): the
    // release below detaches every thread at once.
    let _ = ptrace::interrupt(p);
    let stop_deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match waitpid(p, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {
                if Instant::now() > stop_deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Ok(WaitStatus::Stopped(_, s)) if s != Signal::SIGTRAP => {
                frozen.defer_signal(tid, s);
                break;
            }
            _ => break,
        }
    }
    let pause = frozen.paused_for();
    drop(frozen);
    // What the stub kept of the thread's registers and vector state is no longer needed
    // (the jump back reads only the saved rip): zero it, so no stale pointer hides a leak.
    let _ = write_mem(pid, page + at::REGS, &[0u8; 128]);
    let _ = write_mem(
        pid,
        page + at::XSAVE,
        &vec![0u8; (len - at::XSAVE) as usize],
    );
    let maps = procfs::maps(pid)?;
    let syms = match agent {
        Some(s) => s,
        None => {
            if result == 0 {
                bail!(
                    "dlopen of the kal agent failed in process {pid} (its dlerror() was not read)"
                );
            }
            agent_syms(pid, &maps)?.context("the agent is not mapped after dlopen")?
        }
    };
    let _ = write_mem(pid, syms.stub_addr, &page.to_le_bytes());
    let state = read_u64(&mem, syms.state_addr)?;
    if state == NO_STATIC_TLS {
        bail!("{}", no_static_tls(pid));
    }
    if state != 1 {
        bail!("the kal agent did not attach in process {pid} (state {state})");
    }
    Ok((pause, read_u64(&mem, syms.slots_addr)?))
}

/// Runs system call `nr(args)` in stopped thread `tid` (registers `saved`) with the
/// `syscall` instruction at `at` (see [`crate::capture::snapshot::inject`]).
fn syscall(
    frozen: &mut Frozen,
    tid: i32,
    saved: &libc::user_regs_struct,
    at: u64,
    nr: u64,
    args: [u64; 6],
) -> Result<i64> {
    crate::capture::snapshot::inject(frozen, tid, saved, at, nr, args).map(|(rc, _)| rc)
}

/// Detaches the agent that `kal attach` loaded into process `pid`: its GOT slots are put
/// back and its threads end; the program runs on.
pub fn detach(pid: i32) -> Result<()> {
    match agent_state(pid)? {
        None => bail!("process {pid} has no kal agent: nothing to detach"),
        Some(0) => bail!(
            "process {pid} runs under kal run (its agent was preloaded): it cannot be detached"
        ),
        Some(2) => bail!("process {pid} is not attached (detached already)"),
        Some(NO_STATIC_TLS) => bail!("{}", no_static_tls(pid)),
        Some(_) => {}
    }
    let header = crate::agent::find_header(pid)?;
    let agent = crate::agent::control::Agent::at(pid, header)?;
    if !agent.detach()? {
        bail!("the kal agent of process {pid} refused to detach");
    }
    Ok(())
}
