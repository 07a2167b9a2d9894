//! The stateful service of the end-to-end tests and the demo, as a user writes it, and the
//! small clients the tests use to look at it.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::workload::registry_workload_image;

/// A stateful service as a user writes it: the workload (seeded memory, a counter, a file in
/// its root fs, a journal it keeps appending to in an emptyDir volume), a port; only the
/// migration annotation is added.
pub fn service_pod(
    name: &str,
    interface: &str,
    start_mode: Option<&str>,
    containers: &[(&str, u32)],
) -> Value {
    let mut annotations = json!({"migration-interface": interface});
    if let Some(mode) = start_mode {
        annotations["migration-start-mode"] = mode.into();
    }
    let containers: Vec<Value> = containers
        .iter()
        .enumerate()
        .map(|(i, (container, mib))| {
            json!({
                "name": container,
                "image": registry_workload_image(),
                "args": [mib.to_string(), "42"],
                "env": [
                    {"name": "WORKLOAD_LISTEN", "value": (8080 + i).to_string()},
                    {"name": "WORKLOAD_JOURNAL", "value": format!("/state/journal-{container}")}
                ],
                "ports": [{"containerPort": 8080 + i}],
                "volumeMounts": [{"name": "state", "mountPath": "/state"}]
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "containers": containers,
            "volumes": [{"name": "state", "emptyDir": {}}]
        }
    })
}

/// The service's own answer on `ip:port` (the workload's `WORKLOAD_LISTEN`): its counter and
/// whether its memory check holds; `None` while nothing answers.
pub async fn ask_service(ip: &str, port: u16) -> Option<(u64, bool)> {
    use tokio::io::AsyncReadExt as _;
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .ok()?
    .ok()?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut line))
        .await
        .ok()?
        .ok()?;
    let tick = line
        .strip_prefix("tick=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((tick, line.contains("mem=ok")))
}

/// The output of an outer container (an ambassador relays its nested container's output).
pub fn container_output(container: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["logs", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A request to a sidecar; (status, JSON body or Null).
pub async fn sidecar(method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let request = match method {
        "POST" => client.post(url).json(&body.unwrap_or(Value::Null)),
        _ => client.get(url),
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}
