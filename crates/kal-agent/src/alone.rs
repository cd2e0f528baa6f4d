//! The agent never keeps a process alive: when every thread of the program has ended (a
//! main thread that called `pthread_exit`, then its last worker), the resizer calls
//! `exit(0)`, which is what glibc does when a process's last thread ends (atexit handlers
//! run, and so does the exit report). Without this, the agent's threads would keep it
//! running forever.
//!
//! The resizer looks every [`LOOK_EVERY`] wake-ups: first at the thread count in
//! `/proc/self/stat` (one read); only when it is as low as the agent's threads plus a
//! main thread does it read each thread's state (an exited main thread stays listed, as a
//! zombie, until the process ends).

use core::sync::atomic::{AtomicI32, Ordering};

/// Thread id of the resizer (the agent's other long-lived thread besides the server).
pub static RESIZER_TID: AtomicI32 = AtomicI32::new(0);
/// Thread id of the userfaultfd handler (parked pages), or 0.
pub static HANDLER_TID: AtomicI32 = AtomicI32::new(0);

/// Resizer wake-ups between two looks.
pub const LOOK_EVERY: u32 = 10;

/// The number after `field` fields past the command name in a `stat` line.
fn stat_field(stat: &str, field: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(field)
}

/// Whether only the agent's threads still run in this process.
pub fn only_agent_threads_left() -> bool {
    let agent = [
        RESIZER_TID.load(Ordering::Acquire),
        crate::state::server_tid() as i32,
        HANDLER_TID.load(Ordering::Acquire),
    ];
    let agent_running = agent.iter().filter(|&&t| t > 0).count();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    let Some(threads) = stat_field(&stat, 17).and_then(|n| n.parse::<usize>().ok()) else {
        return false;
    };
    if threads > agent_running + 1 {
        return false; // the common case: some program thread besides a main one
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        if agent.contains(&tid) {
            continue;
        }
        let Ok(st) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // gone meanwhile
        };
        match stat_field(&st, 0) {
            Some("Z") | Some("X") => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_after_the_command_name() {
        let s = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 9";
        assert_eq!(stat_field(s, 0), Some("S"));
        assert_eq!(stat_field(s, 17), Some("3"));
    }

    #[test]
    fn a_test_thread_is_not_an_agent_thread() {
        assert!(!only_agent_threads_left());
    }
}
