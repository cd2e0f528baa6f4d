//! Processes of `kal run` that go on without the agent, each named in one line.
//!
//! An agent's connection to `kal run` closes without an exit message when its process
//! ends abruptly, when it `exec`s (the connection is close-on-exec; a new image that loads
//! the agent says hello again on a new one), or when the program closes the agent's
//! descriptor (`closefrom`, `close_range`). The last two leave a running process kal will
//! never report, which must not go unsaid. When a connection closes, kal looks at the
//! process:
//! * gone, or ending (no memory left: no mappings): nothing to say here;
//! * its environment no longer preloads the agent: it exec'd without it — said at once;
//! * otherwise kal waits up to [`GRACE`] for a hello from the same process; without one,
//!   the agent is either mapped (its connection was closed under it) or not (the loader
//!   ignored `LD_PRELOAD`: a setuid or static program), and kal says which.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long a process whose connection closed has to say hello again.
pub const GRACE: Duration = Duration::from_secs(2);

/// What kal sees of a process whose connection closed.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Gone or ending.
    Gone,
    /// Its environment does not preload the agent.
    NotPreloaded,
    /// The agent is mapped in it.
    Mapped,
    /// Preloaded but not (yet) mapped.
    NotMapped,
}

struct Entry {
    pid: i32,
    since: Instant,
    exe: String,
    mapped: bool,
}

/// The processes whose connection closed and that have not said hello again.
pub struct WithoutAgent {
    agent: Vec<u8>,
    name: Vec<u8>,
    waiting: Vec<Entry>,
}

impl WithoutAgent {
    /// Watches for processes that drop `agent` (the path kal put in `LD_PRELOAD`).
    pub fn new(agent: &Path) -> WithoutAgent {
        let bytes = agent.as_os_str().as_encoded_bytes().to_vec();
        let name = agent
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        WithoutAgent {
            agent: bytes,
            name,
            waiting: Vec::new(),
        }
    }

    /// Process `pid` said hello: its agent runs.
    pub fn hello(&mut self, pid: i32) {
        self.waiting.retain(|e| e.pid != pid);
    }

    /// The connection of process `pid` closed without an exit message.
    pub fn closed(&mut self, pid: i32) {
        let exe = crate::capture::procfs::exe(pid);
        match self.look(pid) {
            Seen::Gone => {}
            Seen::NotPreloaded => say_not_preloaded(pid, &exe),
            seen => self.waiting.push(Entry {
                pid,
                since: Instant::now(),
                exe,
                mapped: seen == Seen::Mapped,
            }),
        }
    }

    /// Looks again at every waiting process; `last` says kal is about to end (say what is
    /// known now, whatever the grace left).
    pub fn poll(&mut self, last: bool) {
        let waiting = std::mem::take(&mut self.waiting);
        for mut e in waiting {
            let exe = crate::capture::procfs::exe(e.pid);
            if !exe.is_empty() {
                e.exe = exe;
            }
            let seen = self.look(e.pid);
            e.mapped |= seen == Seen::Mapped;
            let due = last || e.since.elapsed() >= GRACE;
            match seen {
                Seen::NotPreloaded => say_not_preloaded(e.pid, &e.exe),
                Seen::Gone | Seen::Mapped | Seen::NotMapped if due || seen == Seen::Gone => {
                    if e.mapped {
                        crate::say!(
                            "kal: process {} ({}) closed its connection to kal (closefrom or close_range?): it gets no leak report",
                            e.pid, e.exe
                        );
                    } else {
                        crate::say!(
                            "kal: process {} ({}) runs without kal's agent (the loader did not preload it: setuid or static?): it gets no leak report",
                            e.pid, e.exe
                        );
                    }
                }
                _ => self.waiting.push(e),
            }
        }
    }

    fn look(&self, pid: i32) -> Seen {
        // An ending process (a zombie included) has no memory left: no mappings.
        let (Ok(env), Ok(maps)) = (
            std::fs::read(format!("/proc/{pid}/environ")),
            crate::capture::procfs::maps(pid),
        ) else {
            return Seen::Gone;
        };
        if maps.is_empty() {
            return Seen::Gone;
        }
        if !preloads(&env, &self.agent) {
            return Seen::NotPreloaded;
        }
        let mapped = maps
            .iter()
            .any(|m| m.file_name().as_bytes() == self.name.as_slice());
        if mapped {
            Seen::Mapped
        } else {
            Seen::NotMapped
        }
    }
}

fn say_not_preloaded(pid: i32, exe: &str) {
    crate::say!(
        "kal: process {pid} ({exe}) exec'd without kal's agent in LD_PRELOAD: it runs untracked and gets no leak report"
    );
}

/// Whether an `environ` block (NUL-separated) preloads `agent`.
fn preloads(env: &[u8], agent: &[u8]) -> bool {
    env.split(|&c| c == 0)
        .filter_map(|v| v.strip_prefix(b"LD_PRELOAD="))
        .any(|list| {
            list.split(|&c| c == b':' || c == b' ' || c == b'\t')
                .any(|p| p == agent)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_found_among_other_preloads() {
        let a = b"/x/libkal_agent.so";
        assert!(preloads(b"A=1\0LD_PRELOAD=/x/libkal_agent.so:/y.so\0", a));
        assert!(preloads(b"LD_PRELOAD=/y.so /x/libkal_agent.so\0", a));
        assert!(!preloads(b"A=1\0LD_PRELOAD=/y.so\0", a));
        assert!(!preloads(b"X_LD_PRELOAD=/x/libkal_agent.so\0", a));
        assert!(!preloads(b"", a));
    }
}
