//! The service under `ums-ff`: started as a session of its own (`setsid`: CRIU dumps a tree
//! whose session leader is in it, without `--shell-job`), with the container's stdin, stdout
//! and stderr (its log is the container's log); the signals a runtime sends a container (TERM,
//! INT, HUP, QUIT, USR1, USR2) forwarded to its process group; every process that ends in the
//! container reaped (the supervisor is PID 1 there, and a child subreaper elsewhere); the
//! service's exit code, or 128 + the signal that killed it, is the supervisor's.
//!
//! One reaper owns `waitpid(-1)`: the supervisor's own short-lived children (CRIU, the PID
//! counter's processes) are started through [`Supervisor::run_to_end`], which registers them
//! before the reaper can see them end, so no exit status is lost to the wrong waiter.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch};

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
    #[error("a service already runs (PID {0})")]
    AlreadyRunning(i32),
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

/// How the supervisor ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The service ended with this code (the supervisor exits with it).
    Service(i32),
    /// A stop signal arrived while no service ran here (a passive pod, or one whose service
    /// moved away): the supervisor exits 0.
    Stopped,
}

/// The service's supervision: which process is the service, who waits for what.
#[derive(Debug)]
pub struct Supervisor {
    /// The service's PID (its session and process group leader), while one runs here.
    service: Mutex<Option<Pid>>,
    /// The supervisor's own children, by PID, and who waits for their end.
    waiters: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
    end: watch::Sender<Option<End>>,
}

impl Supervisor {
    /// Starts the reaper and the signal forwarding; call once, from within the runtime.
    pub fn start() -> Result<std::sync::Arc<Self>, SuperviseError> {
        // Orphans of the service are ours to reap even where the supervisor is not PID 1.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
        let supervisor = std::sync::Arc::new(Supervisor {
            service: Mutex::new(None),
            waiters: Mutex::new(HashMap::new()),
            end: watch::channel(None).0,
        });
        let mut ended = signal(SignalKind::child()).map_err(|source| SuperviseError::Signal {
            name: "CHLD",
            source,
        })?;
        for (kind, sig, name) in forwarded() {
            let mut stream =
                signal(kind).map_err(|source| SuperviseError::Signal { name, source })?;
            let me = supervisor.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    me.forward(sig);
                }
            });
        }
        let me = supervisor.clone();
        tokio::spawn(async move {
            loop {
                me.reap();
                ended.recv().await;
            }
        });
        Ok(supervisor)
    }

    /// The service's PID, while one runs here.
    pub fn service(&self) -> Option<Pid> {
        *self.service.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the supervisor's end.
    pub async fn ended(&self) -> End {
        let mut rx = self.end.subscribe();
        loop {
            if let Some(end) = *rx.borrow_and_update() {
                return end;
            }
            if rx.changed().await.is_err() {
                return End::Stopped;
            }
        }
    }

    /// Starts `command` as the service, in a session of its own.
    pub fn start_service(&self, command: &[String]) -> Result<Pid, SuperviseError> {
        let (program, args) = command.split_first().ok_or(SuperviseError::NoCommand)?;
        let mut service = self.service.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = *service {
            return Err(SuperviseError::AlreadyRunning(pid.as_raw()));
        }
        // `setsid` (util-linux, in every Debian image) makes the service a session and group
        // leader and execs it with the same PID: no unsafe pre_exec needed here.
        let child = Command::new("setsid")
            .arg(program)
            .args(args)
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| SuperviseError::Start {
                command: format!("setsid {}", command.join(" ")),
                source,
            })?;
        let pid = Pid::from_raw(child.id() as i32);
        *service = Some(pid);
        tracing::info!(pid = child.id(), command = %command.join(" "), "service started");
        Ok(pid)
    }

    /// Makes `pid` (a restored tree's root, reparented to this process) the service.
    pub fn adopt(&self, pid: Pid) {
        *self.service.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
        tracing::info!(pid = pid.as_raw(), "service restored");
        // It may have ended before it was adopted: its status would have been reaped as an
        // orphan's. A service that no longer exists ends here.
        if kill(pid, None).is_err() {
            self.service_ended(pid, 0);
        }
    }

    /// The service's tree is gone on purpose (it moved away): no end of the supervisor.
    pub fn release(&self) -> Option<Pid> {
        self.service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Runs one of the supervisor's own helper programs to its end; its exit code (or 128 +
    /// signal).
    pub async fn run_to_end(&self, command: Command) -> std::io::Result<i32> {
        Ok(self.run_to_end_with_pid(command).await?.1)
    }

    /// [`Self::run_to_end`], with the PID the process had.
    pub async fn run_to_end_with_pid(&self, command: Command) -> std::io::Result<(u32, i32)> {
        let (pid, ended) = self.spawn(command)?;
        Ok((pid, ended.await?))
    }

    /// Starts one of the supervisor's helper programs; its PID, and its exit code (or 128 +
    /// signal) once it ends.
    pub fn spawn(
        &self,
        mut command: Command,
    ) -> std::io::Result<(u32, impl std::future::Future<Output = std::io::Result<i32>>)> {
        // Registered under the lock the reaper takes before it hands a status out: the
        // child's end cannot be missed, however fast it comes.
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        let ended = async move {
            rx.await
                .map_err(|_| std::io::Error::other("the reaper stopped before the process ended"))
        };
        Ok((child.id(), ended))
    }

    fn forward(&self, sig: Signal) {
        match self.service() {
            // The whole group: the service and what it started, as a shell's job would.
            Some(pid) => {
                // Just started, the service may not lead its group yet (`setsid` has not run):
                // then the signal goes to the process itself.
                let sent = match kill(Pid::from_raw(-pid.as_raw()), sig) {
                    Err(Errno::ESRCH) => kill(pid, sig),
                    other => other,
                };
                if let Err(e) = sent {
                    tracing::warn!(signal = %sig, error = %e, "cannot forward the signal");
                }
            }
            None if matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT) => {
                tracing::info!(signal = %sig, "stopping (no service runs here)");
                self.end.send_replace(Some(End::Stopped));
            }
            None => {}
        }
    }

    fn service_ended(&self, pid: Pid, code: i32) {
        let mut service = self.service.lock().unwrap_or_else(|e| e.into_inner());
        if *service == Some(pid) {
            *service = None;
            tracing::info!(code, "service ended");
            self.end.send_replace(Some(End::Service(code)));
        }
    }

    /// Reaps every process that has ended, handing each status to whoever waits for it.
    fn reap(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid");
                    return;
                }
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) else {
                        continue;
                    };
                    let waiter = self
                        .waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&pid.as_raw());
                    match waiter {
                        Some(tx) => {
                            let _ = tx.send(code);
                        }
                        None => self.service_ended(pid, code),
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
