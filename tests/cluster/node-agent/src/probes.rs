//! Readiness and startup probes of HTTP and TCP kind, run from the host against the pod IP (as
//! the kubelet runs them from the node). Exec and gRPC probes are not run (README).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Whether the probe succeeds now; `None` when its kind is not supported.
pub async fn check(probe: &Probe, container: &Container, pod_ip: &str) -> Option<bool> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(http) = &probe.http_get {
        let port = port(&http.port, container)?;
        let scheme = http
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let url = format!(
            "{scheme}://{pod_ip}:{port}{}",
            http.path.as_deref().unwrap_or("/")
        );
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .danger_accept_invalid_certs(true)
            .build()
            .ok()?;
        let ok = client
            .get(url)
            .send()
            .await
            .map(|r| (200..400).contains(&r.status().as_u16()))
            .unwrap_or(false);
        return Some(ok);
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = port(&tcp.port, container)?;
        let connect = tokio::net::TcpStream::connect(format!("{pod_ip}:{port}"));
        return Some(matches!(
            tokio::time::timeout(timeout, connect).await,
            Ok(Ok(_))
        ));
    }
    None
}

fn port(port: &IntOrString, container: &Container) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}
