//! Step 1's one interface: where a capture's memory, mappings and registers come from. A
//! live process (frozen, or its snapshot copy) and an ELF core file ([`crate::capture::corefile`]) both
//! implement [`Source`], and the capture code ([`crate::capture::capture_table`],
//! [`crate::capture::agentless::capture_source`]) reads only through it: roots, reach, attribution
//! and report never know which one it was.

use crate::capture::freeze::ThreadRegs;
use crate::capture::freeze_copy::Extras;
use crate::capture::memory::{Memory, ProcessMemory};
use crate::capture::procfs::{self, SmapsEntry};
use anyhow::Result;

/// A consistent view of one process: its memory, mappings and every thread's registers.
pub trait Source {
    /// The process id (what the report names).
    fn pid(&self) -> i32;
    /// The executable's path.
    fn exe(&self) -> String;
    /// The mappings, with the smaps figures known for them (a core file knows no `Rss`:
    /// it gives the bytes it holds).
    fn smaps(&self) -> Result<Vec<SmapsEntry>>;
    /// The registers of every thread, taken at the same instant as the memory.
    fn threads(&self) -> Vec<ThreadRegs>;
    /// A handle on the memory (reads must stay possible until classification is done).
    fn memory(&self) -> Box<dyn Memory + Send + Sync>;
    /// Resident set size of the process, in bytes (0 when unknown).
    fn rss(&self) -> u64;
    /// Paths of mapped files that must not be read for this capture: not on this host, or
    /// another build than the one that ran (a core file's). None for a live process.
    fn unusable_files(&self) -> Vec<String> {
        Vec::new()
    }
    /// What was read beside the memory (from a frozen target beside its copy: mappings a
    /// fork copy lacks, pointers the kernel holds) and what could not be seen. Taken once.
    fn take_extras(&mut self) -> Extras;
}

/// A live process `pid` read from the memory of `mem_pid` (the process itself, frozen, or
/// a snapshot copy of it).
pub struct Live {
    /// The process.
    pub pid: i32,
    /// Where its memory is read: itself (frozen) or its snapshot copy.
    pub mem_pid: i32,
    /// Registers of its threads, taken at the freeze.
    pub threads: Vec<ThreadRegs>,
    /// What was read from the frozen target beside the copy.
    pub extras: Extras,
}

impl Source for Live {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn exe(&self) -> String {
        Some(procfs::exe(self.pid))
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| procfs::exe(self.mem_pid))
    }

    fn smaps(&self) -> Result<Vec<SmapsEntry>> {
        procfs::smaps(self.mem_pid)
    }

    fn threads(&self) -> Vec<ThreadRegs> {
        self.threads.clone()
    }

    fn memory(&self) -> Box<dyn Memory + Send + Sync> {
        Box::new(ProcessMemory::new(self.mem_pid))
    }

    fn rss(&self) -> u64 {
        crate::agent::control::rss(self.pid).unwrap_or(0)
    }

    fn take_extras(&mut self) -> Extras {
        std::mem::take(&mut self.extras)
    }
}
