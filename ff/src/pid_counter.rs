//! Keeping a restored service's PIDs free. CRIU restores each process with the PID it had; in
//! a fresh container the supervisor's own first processes would take the low PIDs the service
//! had ("Can't fork for 7: File exists", measured: shared/ENGINES.md). So, before it starts
//! the service, the supervisor makes the PID counter pass a bound by starting processes that
//! exit at once (`ums-ff noop`); the service then lives above the bound, and a destination's own
//! processes (the supervisor's threads, CRIU) stay below it. (/proc/sys/kernel/ns_last_pid is
//! read-only in a container.)

use std::process::{Command, Stdio};

use crate::supervise::Supervisor;

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

/// The PID the next process would get is above `target` once this returns; the last PID used.
pub async fn advance_past(supervisor: &Supervisor, target: u32) -> Result<u32, PidCounterError> {
    let exe = std::env::current_exe()?;
    let tries = target as usize + 64;
    let mut last = 0;
    for _ in 0..tries {
        let mut command = Command::new(&exe);
        command
            .arg("noop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (pid, _code) = supervisor.run_to_end_with_pid(command).await?;
        last = pid;
        if pid > target {
            return Ok(pid);
        }
    }
    Err(PidCounterError::NotPassed {
        target,
        tries,
        last,
    })
}
