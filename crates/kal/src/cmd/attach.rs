//! `kal attach PID` and `kal detach PID`: load the agent into a running process, and take
//! it out again.

use anyhow::Result;
/// Runs `kal attach`; exit status 0.
pub fn attach(pid: i32) -> Result<i32> {
    let agent = kal::run::find_agent()?;
    let a = kal::agent::attach::attach(pid, &agent)?;
    println!(
        "kal attach {pid}: agent {}, {} GOT slots redirected, program paused {:.2} ms ({} freeze{})",
        if a.again { "attached again" } else { "loaded" },
        a.slots,
        a.pause.as_secs_f64() * 1e3,
        a.tries,
        if a.tries == 1 { "" } else { "s" }
    );
    if a.jemalloc {
        println!(
            "kal attach {pid}: the program allocates with jemalloc: blocks allocated before the attach are unknown (no heap walk for jemalloc), so lost counts cover only blocks allocated since, and nothing is reclaimed"
        );
    } else {
        println!(
            "kal attach {pid}: blocks allocated before the attach come from glibc's heap at each check, without stacks (\"{}\")",
            kal::blocks::before_attach::LABEL
        );
    }
    Ok(0)
}

/// Runs `kal detach`; exit status 0.
pub fn detach(pid: i32) -> Result<i32> {
    kal::agent::attach::detach(pid)?;
    println!("kal detach {pid}: GOT slots restored, agent threads stopped; the program runs on");
    Ok(0)
}
