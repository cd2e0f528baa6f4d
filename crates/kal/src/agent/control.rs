//! The agent client: one [`Agent`] per process, its header found once, talking to the
//! agent's control socket (reclaim, park, stats, trim).

use anyhow::{bail, Context, Result};
use kal_proto::ctl::{
    encode_entry, Op, ParkStats, ReqHeader, Response, Status, RESPONSE_SIZE, STATS_SIZE,
};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Effective uid of a process.
fn euid(pid: i32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line")?;
    Ok(line
        .split_whitespace()
        .nth(2)
        .context("bad Uid line")?
        .parse()?)
}

/// The agent's socket, as seen through the process's own root (works across mount
/// namespaces).
pub fn socket_path(pid: i32) -> Result<PathBuf> {
    Ok(socket_dir(pid, euid(pid)?).join(format!("agent-{pid}.sock")))
}

/// The directory of the agents' sockets of user `uid`, through `pid`'s root.
fn socket_dir(pid: i32, uid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root/tmp/kal-{uid}"))
}

/// Refuses a socket directory that the agent of a process of user `uid` would not have
/// served from: not a directory of its own (a symlink, or made by someone else), or open
/// to others. Anyone can create `/tmp/kal-UID` before the agent does, and put a forged
/// socket in it.
fn check_dir(pid: i32, dir: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let shown = format!("/tmp/kal-{uid}");
    let md = std::fs::symlink_metadata(dir).with_context(|| {
        format!("cannot reach the kal agent of process {pid}: no {shown} in its file system")
    })?;
    if md.file_type().is_symlink() {
        bail!("refusing the kal agent socket of process {pid}: {shown} is a symbolic link");
    }
    if !md.is_dir() {
        bail!("refusing the kal agent socket of process {pid}: {shown} is not a directory");
    }
    if md.uid() != uid {
        bail!(
            "refusing the kal agent socket of process {pid}: {shown} belongs to uid {}, not to the process's uid {uid} (someone else created it)",
            md.uid()
        );
    }
    if md.mode() & 0o077 != 0 {
        bail!(
            "refusing the kal agent socket of process {pid}: {shown} has mode {:o}, not 0700",
            md.mode() & 0o7777
        );
    }
    Ok(())
}

/// The kal agent of one process: where its header is and how to reach it.
#[derive(Debug, Clone)]
pub struct Agent {
    pid: i32,
    header: u64,
    /// Effective uid of the process (its agent's socket directory is `/tmp/kal-UID`).
    uid: u32,
    socket: PathBuf,
}

impl Agent {
    /// Finds the agent of `pid` (its header symbol looked up once), with a clear error
    /// when the process is gone, not ours, or not started under `kal run`.
    pub fn find(pid: i32) -> Result<Agent> {
        let header = crate::agent::find_header(pid)?;
        Agent::at(pid, header)
    }

    /// The agent of `pid` whose header address is already known (from its hello).
    pub fn at(pid: i32, header: u64) -> Result<Agent> {
        let uid = euid(pid)?;
        Ok(Agent {
            pid,
            header,
            uid,
            socket: socket_dir(pid, uid).join(format!("agent-{pid}.sock")),
        })
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Address of the agent header in the process.
    pub fn header(&self) -> u64 {
        self.header
    }

    fn connect(&self) -> Result<UnixStream> {
        self.connect_within(Duration::from_secs(30))
    }

    /// Connects, each read and write of the connection bounded by `timeout`. The socket's
    /// directory must be the process user's own (0700, no symlink), and the peer must be
    /// the process itself, as the kernel says (`SO_PEERCRED`): nothing is sent to, nor
    /// believed from, anyone else.
    fn connect_within(&self, timeout: Duration) -> Result<UnixStream> {
        let pid = self.pid;
        if let Some(dir) = self.socket.parent() {
            check_dir(pid, dir, self.uid)?;
        }
        let s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the kal agent of process {pid} at {}",
                self.socket.display()
            )
        })?;
        match crate::agent::peer::peer_cred(&s) {
            Some((p, u)) if p == pid && u == self.uid => {}
            Some((p, u)) => bail!(
                "refusing the kal agent socket of process {pid}: it is served by process {p} (uid {u}), not by process {pid} (uid {})",
                self.uid
            ),
            None => bail!(
                "refusing the kal agent socket of process {pid}: the kernel does not say who serves it"
            ),
        }
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    }

    /// Asks the agent's server thread for a snapshot copy while the caller holds every other
    /// thread stopped (so each step is bounded by `timeout`): the copy's pid, and the
    /// connection that keeps the copy alive until it is closed.
    pub fn snapshot(&self, timeout: Duration) -> Result<(UnixStream, i32)> {
        let mut s = self.connect_within(timeout)?;
        s.write_all(&request(Op::Snapshot, &[], 0))?;
        let r = read_response(&mut s)
            .with_context(|| format!("the kal agent of process {} made no snapshot", self.pid))?;
        if r.status != Status::Ok as u32 || r.freed_blocks == 0 || r.freed_blocks > i32::MAX as u64
        {
            bail!(
                "the kal agent of process {} could not fork a snapshot copy",
                self.pid
            );
        }
        Ok((s, r.freed_blocks as i32))
    }

    /// Asks the agent to free the blocks `(addr, seq)`; returns its answer and, for each
    /// entry, whether it was freed.
    pub fn reclaim(&self, entries: &[(u64, u64)]) -> Result<(Response, Vec<bool>)> {
        let mut s = self.connect()?;
        s.write_all(&request(Op::Reclaim, entries, 0))?;
        let r = read_response(&mut s)?;
        let mut bitmap = vec![0u8; entries.len().div_ceil(8)];
        s.read_exact(&mut bitmap)
            .context("the agent's answer was cut short")?;
        let freed = (0..entries.len())
            .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
            .collect();
        Ok((r, freed))
    }

    /// Asks the agent to park the pages of the blocks `(addr, seq)` with store limit `arg`
    /// (see [`kal_proto::ctl::Op::Park`]); returns its answer and the pages parked per
    /// entry. `/dev/userfaultfd` is passed along when kal can open it (as root).
    pub fn park(&self, entries: &[(u64, u64)], arg: u32) -> Result<(Response, Vec<u32>)> {
        let mut s = self.connect()?;
        // The agent parks at a low priority: on a saturated machine a big request takes a
        // while (what was parked stays parked if kal gives up waiting).
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        let req = request(Op::Park, entries, arg);
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .ok();
        let head = &req[..kal_proto::ctl::REQ_HEADER_SIZE];
        match &dev {
            Some(d) => send_with_fd(&s, head, d.as_raw_fd())?,
            None => s.write_all(head)?,
        }
        drop(dev);
        s.write_all(&req[kal_proto::ctl::REQ_HEADER_SIZE..])?;
        let r = read_response(&mut s)?;
        if r.status != Status::Ok as u32 {
            return Ok((r, vec![0; entries.len()]));
        }
        let mut raw = vec![0u8; entries.len() * 4];
        s.read_exact(&mut raw)
            .context("the agent's answer was cut short")?;
        let pages = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((r, pages))
    }

    /// The agent's parking counters.
    pub fn stats(&self) -> Result<ParkStats> {
        let mut s = self.connect()?;
        s.write_all(&request(Op::Stats, &[], 0))?;
        read_response(&mut s)?;
        let mut b = [0u8; STATS_SIZE];
        s.read_exact(&mut b)
            .context("the agent's answer was cut short")?;
        Ok(ParkStats::decode(&b))
    }

    /// Asks an agent loaded by `kal attach` to detach (restore the GOT slots it redirected
    /// and end its threads); `Ok(false)` if it was not attached.
    pub fn detach(&self) -> Result<bool> {
        let mut s = self.connect()?;
        s.write_all(&request(Op::Detach, &[], 0))?;
        let r = read_response(&mut s)?;
        Ok(r.status == Status::Ok as u32 && r.freed_blocks == 1)
    }

    /// Asks the agent to return free memory to the OS; `Ok(false)` if its allocator
    /// cannot.
    pub fn trim(&self) -> Result<bool> {
        let mut s = self.connect()?;
        s.write_all(&request(Op::Trim, &[], 0))?;
        let r = read_response(&mut s)?;
        Ok(r.status == Status::Ok as u32)
    }
}

fn request(op: Op, entries: &[(u64, u64)], arg: u32) -> Vec<u8> {
    let mut req = Vec::with_capacity(16 + entries.len() * 16);
    req.extend_from_slice(
        &ReqHeader {
            op,
            count: entries.len() as u32,
            arg,
        }
        .encode(),
    );
    for &(a, q) in entries {
        req.extend_from_slice(&encode_entry(a, q));
    }
    req
}

/// Sends `bytes` with descriptor `fd` attached (`SCM_RIGHTS`).
fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: i32) -> Result<()> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr pointing at our buffers; the control buffer is large and
    // aligned enough for one descriptor, filled through the CMSG macros within bounds.
    let n = unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf.as_mut_ptr().cast();
        m.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        (libc::CMSG_DATA(c) as *mut i32).write_unaligned(fd);
        libc::sendmsg(s.as_raw_fd(), &m, libc::MSG_NOSIGNAL)
    };
    if n != bytes.len() as isize {
        bail!(
            "cannot send a request to the kal agent: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A function kal calls again and again while it waits for an agent's answer (`kal run`'s
/// tracer resumes its tracees' stops meanwhile: a thread the agent creates for the request
/// stops at its clone event until then).
static WAIT_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function called while kal waits for an agent's answer (see `WAIT_HOOK`).
pub fn set_wait_hook(f: fn()) {
    let _ = WAIT_HOOK.set(f);
}

/// Waits, in short slices calling the wait hook between them, until `s` has something to
/// read (or its read timeout passes: the read that follows then fails as it would).
fn await_readable(s: &UnixStream) {
    let Some(hook) = WAIT_HOOK.get() else { return };
    let limit = s
        .read_timeout()
        .ok()
        .flatten()
        .unwrap_or(Duration::from_secs(3600));
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd for at most 5 ms.
        if unsafe { libc::poll(&mut p, 1, 5) } > 0 {
            return;
        }
        hook();
    }
}

fn read_response(s: &mut UnixStream) -> Result<Response> {
    await_readable(s);
    let mut b = [0u8; RESPONSE_SIZE];
    s.read_exact(&mut b).context(
        "the agent did not answer (an agent from an older kal? rebuild it with this kal)",
    )?;
    let r = Response::decode(&b).context("the agent answered something that is not a response")?;
    if r.status == Status::BadRequest as u32 {
        bail!("the agent refused the request as malformed (an agent from another kal version?)");
    }
    if r.status == Status::Denied as u32 {
        bail!("the agent refused: only root, or the process's own user while the process is dumpable (who could ptrace it), may ask it to act");
    }
    Ok(r)
}

/// Says in one line why parking is not available (a [`ParkStats::note`] value).
pub fn describe_note(note: u32) -> String {
    let errno = note >> 8;
    match note & 0xff {
        1 if errno == libc::EPERM as u32 || errno == libc::EACCES as u32 => format!(
            "userfaultfd is not available to the process (errno {errno}: only root gets one here); parking nothing (the free mode, with --free-sites, needs none)"
        ),
        1 => format!("userfaultfd is not available to the process (errno {errno}); parking nothing"),
        2 => format!(
            "the kernel's userfaultfd cannot write-protect anonymous memory (errno {errno}); parking nothing"
        ),
        3 => "the agent got no memory for its parking tables; parking nothing".to_string(),
        4 => "a parked run could not be restored exactly; parking stopped".to_string(),
        5 => "the process is exiting; everything parked was restored".to_string(),
        _ => format!("parking is not available (note {note})"),
    }
}

/// Resident set size of a process, in bytes.
pub fn rss(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}
