//! The service's own probes, run by `ums-ff` on the kubelet's behalf. The webhook points an ff
//! container's startup, readiness and liveness probes at `GET /probe/{name}?kind=...` (keeping
//! their periods and thresholds), because the kubelet cannot tell the states of a migrating
//! service apart: a passive copy waiting for its restore must be ready (the coordinator waits
//! for that) though nothing listens yet, and a service frozen for its dump must not be killed
//! by its liveness probe. While the service runs, its original probe (from the pod's
//! `migration-containers` annotation) decides, as the kubelet would run it: a TCP connect, an
//! HTTP GET (2xx and 3xx succeed), or a command run in this container (exit 0 succeeds). A gRPC
//! probe is checked as a TCP connect to its port.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::supervise::Supervisor;

/// Which of a container's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Startup,
    Readiness,
    Liveness,
}

impl Kind {
    /// The container's probe of this kind.
    pub fn of(self, container: &Container) -> Option<&Probe> {
        match self {
            Kind::Startup => container.startup_probe.as_ref(),
            Kind::Readiness => container.readiness_probe.as_ref(),
            Kind::Liveness => container.liveness_probe.as_ref(),
        }
    }
}

/// Runs `probe` of `container` against the service; why it failed otherwise.
pub async fn run(
    probe: &Probe,
    container: &Container,
    supervisor: &Supervisor,
) -> Result<(), String> {
    // The kubelet's timeout (default 1 s), a little shorter so the answer reaches it in time.
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64)
        .saturating_sub(Duration::from_millis(100));
    if let Some(tcp) = &probe.tcp_socket {
        let port = port(&tcp.port, container)?;
        return connect(tcp.host.as_deref(), port, timeout).await;
    }
    if let Some(grpc) = &probe.grpc {
        let port = u16::try_from(grpc.port).map_err(|_| format!("gRPC port {}", grpc.port))?;
        return connect(None, port, timeout).await;
    }
    if let Some(http) = &probe.http_get {
        let port = port(&http.port, container)?;
        let scheme = http
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let host = http.host.as_deref().unwrap_or("127.0.0.1");
        let path = http.path.as_deref().unwrap_or("/");
        let url = format!("{scheme}://{host}:{port}{path}");
        // As the kubelet: no certificate check, no redirects followed (a 3xx succeeds).
        let client = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let mut request = client.get(&url);
        for header in http.http_headers.iter().flatten() {
            request = request.header(&header.name, &header.value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {url}: {status}"))
        };
    }
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
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
        return if code == 0 {
            Ok(())
        } else {
            Err(format!("{program} exited with {code}"))
        };
    }
    Err("a probe without a handler".into())
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

async fn connect(host: Option<&str>, port: u16, timeout: Duration) -> Result<(), String> {
    let host = host.unwrap_or("127.0.0.1");
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {host}:{port}: {e}")),
        Err(_) => Err(format!("connect {host}:{port}: timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    fn container() -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("web".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn a_named_port_is_the_containers() {
        let c = container();
        assert_eq!(port(&IntOrString::String("web".into()), &c), Ok(8080));
        assert_eq!(port(&IntOrString::Int(81), &c), Ok(81));
        assert!(port(&IntOrString::String("db".into()), &c)
            .unwrap_err()
            .contains("\"db\""));
        assert!(port(&IntOrString::Int(70000), &c).is_err());
    }
}
