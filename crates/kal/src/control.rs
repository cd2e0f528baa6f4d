//! Talking to an agent's control socket: reclaim and trim requests.

use anyhow::{bail, Context, Result};
use kal_proto::ctl::{encode_entry, Op, ReqHeader, Response, Status, RESPONSE_SIZE};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
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
    Ok(PathBuf::from(format!(
        "/proc/{pid}/root/tmp/kal-{}/agent-{pid}.sock",
        euid(pid)?
    )))
}

fn connect(pid: i32) -> Result<UnixStream> {
    crate::agent::find_header(pid)?;
    let path = socket_path(pid)?;
    let s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the kal agent of process {pid} at {}",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

fn read_response(s: &mut UnixStream) -> Result<Response> {
    let mut b = [0u8; RESPONSE_SIZE];
    s.read_exact(&mut b).context("the agent did not answer")?;
    let r = Response::decode(&b).context("the agent answered something that is not a response")?;
    if r.status == Status::BadRequest as u32 {
        bail!("the agent refused the request as malformed");
    }
    Ok(r)
}

/// Asks the agent of `pid` to free the blocks `(addr, seq)`; returns its answer and, for
/// each entry, whether it was freed.
pub fn reclaim(pid: i32, entries: &[(u64, u64)]) -> Result<(Response, Vec<bool>)> {
    let mut s = connect(pid)?;
    let mut req = Vec::with_capacity(16 + entries.len() * 16);
    req.extend_from_slice(
        &ReqHeader {
            op: Op::Reclaim,
            count: entries.len() as u32,
        }
        .encode(),
    );
    for &(a, q) in entries {
        req.extend_from_slice(&encode_entry(a, q));
    }
    s.write_all(&req)?;
    let r = read_response(&mut s)?;
    let mut bitmap = vec![0u8; entries.len().div_ceil(8)];
    s.read_exact(&mut bitmap)
        .context("the agent's answer was cut short")?;
    let freed = (0..entries.len())
        .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    Ok((r, freed))
}

/// Asks the agent of `pid` to return free memory to the OS; `Ok(false)` if its allocator
/// cannot.
pub fn trim(pid: i32) -> Result<bool> {
    let mut s = connect(pid)?;
    s.write_all(
        &ReqHeader {
            op: Op::Trim,
            count: 0,
        }
        .encode(),
    )?;
    let r = read_response(&mut s)?;
    Ok(r.status == Status::Ok as u32)
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
