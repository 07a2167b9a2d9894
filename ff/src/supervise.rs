//! The service under `ums-ff`: started in a process group of its own, with the container's
//! stdin, stdout and stderr (its log is the container's log); the signals a runtime sends a
//! container (TERM, INT, HUP, QUIT, USR1, USR2) forwarded to that group; every process that
//! ends in the container reaped (the supervisor is PID 1 there, and a child subreaper
//! elsewhere); the service's exit code, or 128 + the signal that killed it, is the
//! supervisor's.

use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt as _;
use tokio::signal::unix::{signal, SignalKind};

/// What keeps the service from running under the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("no command to run")]
    NoCommand,
    #[error("cannot start {command:?}: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot watch for signal {name}: {source}")]
    Signal {
        name: &'static str,
        source: std::io::Error,
    },
}

/// The signals forwarded to the service, as a runtime sends them to a container.
fn forwarded() -> [(SignalKind, Signal, &'static str); 6] {
    [
        (SignalKind::terminate(), Signal::SIGTERM, "TERM"),
        (SignalKind::interrupt(), Signal::SIGINT, "INT"),
        (SignalKind::hangup(), Signal::SIGHUP, "HUP"),
        (SignalKind::quit(), Signal::SIGQUIT, "QUIT"),
        (SignalKind::user_defined1(), Signal::SIGUSR1, "USR1"),
        (SignalKind::user_defined2(), Signal::SIGUSR2, "USR2"),
    ]
}

/// The exit code a shell gives a process that ended with `status`, if `status` is its end.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

/// Runs `command` until it ends; its exit code.
pub async fn run(command: &[String]) -> Result<i32, SuperviseError> {
    let (program, args) = command.split_first().ok_or(SuperviseError::NoCommand)?;
    // Orphans of the service are ours to reap even where the supervisor is not PID 1.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    // Watched before the service starts: nothing it is sent is lost.
    let mut ended = signal(SignalKind::child()).map_err(|source| SuperviseError::Signal {
        name: "CHLD",
        source,
    })?;
    let mut streams = Vec::new();
    for (kind, sig, name) in forwarded() {
        let stream = signal(kind).map_err(|source| SuperviseError::Signal { name, source })?;
        streams.push((stream, sig));
    }
    let child = Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| SuperviseError::Start {
            command: command.join(" "),
            source,
        })?;
    let pid = Pid::from_raw(child.id() as i32);
    tracing::info!(pid = child.id(), command = %command.join(" "), "service started");
    for (mut stream, sig) in streams {
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                // The whole group: the service and what it started, as a shell's job would.
                if let Err(e) = kill(Pid::from_raw(-pid.as_raw()), sig) {
                    tracing::warn!(signal = %sig, error = %e, "cannot forward the signal");
                }
            }
        });
    }
    loop {
        if let Some(code) = reap(pid) {
            tracing::info!(code, "service ended");
            return Ok(code);
        }
        ended.recv().await;
    }
}

/// Reaps every process that has ended; the service's exit code if it is one of them.
fn reap(service: Pid) -> Option<i32> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid");
                return None;
            }
            Ok(status) => {
                if status.pid() == Some(service) {
                    if let Some(code) = exit_code(status) {
                        return Some(code);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_a_shells() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
