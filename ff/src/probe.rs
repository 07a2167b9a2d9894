//! The service's own probes, run by `ums-ff` on the kubelet's behalf (`ums-probe`); an exec
//! probe's command runs here, in the service's container, as the supervisor's child.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::supervise::Supervisor;

pub use ums_probe::Kind;

/// Runs `probe` of `container` against the service; why it failed otherwise.
pub async fn run(
    probe: &Probe,
    container: &Container,
    supervisor: &Supervisor,
) -> Result<(), String> {
    ums_probe::run(probe, container, |command, timeout| {
        exec(supervisor, command, timeout)
    })
    .await
}

/// Runs `command` to its end within `timeout`: exit 0 succeeds.
async fn exec(
    supervisor: &Supervisor,
    command: Vec<String>,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("an exec probe without a command".into());
    };
    let mut child = std::process::Command::new(program);
    child
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let (pid, ended) = supervisor
        .spawn(child)
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let ended = std::pin::pin!(ended);
    let code = match tokio::time::timeout(timeout, ended).await {
        Ok(code) => code.map_err(|e| e.to_string())?,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(format!(
                "{program} did not end within {} ms",
                timeout.as_millis()
            ));
        }
    };
    if code == 0 {
        Ok(())
    } else {
        Err(format!("{program} exited with {code}"))
    }
}
