//! Keeping a restored service's PIDs free. CRIU restores each process with the PID it had; in
//! a fresh container the supervisor's own first processes would take the low PIDs the service
//! had ("Can't fork for 7: File exists", measured: shared/ENGINES.md). So, before it starts
//! anything else, the supervisor makes the PID counter pass a bound by starting processes that
//! exit at once (`ums-ff noop`); the service then lives above the bound, and a destination's own
//! processes stay below it. (/proc/sys/kernel/ns_last_pid is read-only in a container.)

use std::process::{Command, Stdio};

/// The counter did not pass the bound.
#[derive(Debug, thiserror::Error)]
pub enum PidCounterError {
    #[error("cannot start a process to advance the PID counter: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("the PID counter did not pass {target} after {tries} processes (last PID {last})")]
    NotPassed {
        target: u32,
        tries: usize,
        last: u32,
    },
}

/// Starts short-lived processes until one gets a PID above `target`; that PID.
pub fn advance_past(target: u32) -> Result<u32, PidCounterError> {
    let exe = std::env::current_exe()?;
    let tries = target as usize + 64;
    let mut last = 0;
    for _ in 0..tries {
        let mut child = Command::new(&exe)
            .arg("noop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        last = child.id();
        child.wait()?;
        if last > target {
            return Ok(last);
        }
    }
    Err(PidCounterError::NotPassed {
        target,
        tries,
        last,
    })
}
