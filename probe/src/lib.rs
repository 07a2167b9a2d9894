//! The kubelet's probes of a service, run by a migration agent on the kubelet's behalf. The
//! webhook points a migratable container's startup, readiness and liveness probes at its agent
//! (`GET /probe/{name}?kind=...` on `ums-ff` or the sidecar, periods and thresholds kept),
//! because the kubelet cannot tell the states of a migrating service apart: a passive copy
//! waiting for its restore must be ready (the coordinator waits for that) though nothing listens
//! yet, and a service frozen for its dump must not be killed by its liveness probe. While the
//! service runs, its original probe (from the pod's `migration-containers` annotation) decides,
//! as the kubelet would run it: a TCP connect, an HTTP GET (2xx and 3xx succeed), or a command
//! (exit 0 succeeds), which the agent runs where the service's binaries are. A gRPC probe is
//! checked as a TCP connect to its port.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

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

    /// The query value (`?kind=readiness`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Startup => "startup",
            Kind::Readiness => "readiness",
            Kind::Liveness => "liveness",
        }
    }
}

/// Runs `probe` of `container` against the service on this network namespace; an exec probe's
/// command goes to `exec` (with the time it has). Why it failed otherwise.
pub async fn run<E, F>(probe: &Probe, container: &Container, exec: E) -> Result<(), String>
where
    E: FnOnce(Vec<String>, Duration) -> F,
    F: Future<Output = Result<(), String>>,
{
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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
    if let Some(command) = probe.exec.as_ref().and_then(|e| e.command.clone()) {
        if command.is_empty() {
            return Err("an exec probe without a command".into());
        }
        return exec(command, timeout).await;
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
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, HTTPGetAction, TCPSocketAction};

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

    async fn no_exec(_: Vec<String>, _: Duration) -> Result<(), String> {
        Err("no exec here".into())
    }

    #[tokio::test]
    async fn tcp_and_http_probes_succeed_and_fail_as_the_kubelets_and_exec_goes_to_the_agent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/moved",
                axum::routing::get(|| async { axum::response::Redirect::temporary("/ok") }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = container();
        let tcp = |p: u16| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(p.into()),
                host: None,
            }),
            ..Default::default()
        };
        let http = |p: u16, path: &str| Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::Int(p.into()),
                path: Some(path.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(run(&tcp(open), &c, no_exec).await, Ok(()));
        assert!(run(&tcp(closed), &c, no_exec).await.is_err());
        assert_eq!(run(&http(open, "/ok"), &c, no_exec).await, Ok(()));
        assert_eq!(run(&http(open, "/moved"), &c, no_exec).await, Ok(()));
        let missing = run(&http(open, "/missing"), &c, no_exec).await;
        assert!(missing.unwrap_err().contains("404"));
        let exec = Probe {
            exec: Some(ExecAction {
                command: Some(vec!["check".into()]),
            }),
            ..Default::default()
        };
        let seen = run(&exec, &c, |command, _| async move {
            Err(format!("ran {command:?}"))
        })
        .await;
        assert_eq!(seen, Err("ran [\"check\"]".into()));
        assert!(run(&Probe::default(), &c, no_exec).await.is_err());
    }
}
