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
                // Ready once it listens (its memory filled); a passive copy is ready before:
                // its sidecar answers for it until the restore.
                "readinessProbe": {"tcpSocket": {"port": 8080 + i}, "periodSeconds": 2},
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

/// The port of the sink a container opens for a sibling's long-lived connection.
pub const SINK_PORT: u16 = 9000;

/// Wires one long-lived TCP connection inside the pod: container `from` keeps a connection to
/// container `to` over the pod's loopback and writes each of its ticks to it; `to` counts them
/// (the workload's `WORKLOAD_CONNECT` and `WORKLOAD_SINK`). Both ends travel with a migration.
pub fn with_connection(mut pod: Value, from: &str, to: &str) -> Value {
    for container in pod["spec"]["containers"].as_array_mut().unwrap() {
        let env = if container["name"] == from {
            json!({"name": "WORKLOAD_CONNECT", "value": format!("127.0.0.1:{SINK_PORT}")})
        } else if container["name"] == to {
            json!({"name": "WORKLOAD_SINK", "value": SINK_PORT.to_string()})
        } else {
            continue;
        };
        container["env"].as_array_mut().unwrap().push(env);
    }
    pod
}

/// What a container's sink has received (see `with_connection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sink {
    pub accepted: u64,
    pub closed: u64,
    pub lines: u64,
    pub last: u64,
    pub gaps: u64,
}

/// The connection inside the pod (see `with_connection`), its sink answering on `port` at
/// `ip`: once it has carried more than `past_lines` lines, asserts it is still the one
/// connection, never closed, with no line missing.
pub async fn unbroken_connection(ip: &str, port: u16, past_lines: u64, what: &str) -> Sink {
    let sink = crate::poll(what, Duration::from_secs(60), || async {
        let sink = ask_service(ip, port).await?.sink?;
        (sink.lines > past_lines).then_some(sink)
    })
    .await;
    assert_eq!(
        (sink.accepted, sink.closed, sink.gaps),
        (1, 0, 0),
        "the connection inside the pod broke ({what}): {sink:?}"
    );
    sink
}

/// The service's answer on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceAnswer {
    pub tick: u64,
    pub memory_ok: bool,
    /// Present when the container runs a sink.
    pub sink: Option<Sink>,
}

/// Parses `tick=N mem=ok|BAD[ sink=a/c/l/n/g]`.
fn parse_answer(line: &str) -> Option<ServiceAnswer> {
    let mut words = line.split_whitespace();
    let tick = words.next()?.strip_prefix("tick=")?.parse().ok()?;
    let memory_ok = words.next()? == "mem=ok";
    let sink = match words.next() {
        None => None,
        Some(word) => {
            let numbers: Vec<u64> = word
                .strip_prefix("sink=")?
                .split('/')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let [accepted, closed, lines, last, gaps] = numbers[..] else {
                return None;
            };
            Some(Sink {
                accepted,
                closed,
                lines,
                last,
                gaps,
            })
        }
    };
    Some(ServiceAnswer {
        tick,
        memory_ok,
        sink,
    })
}

/// The service's own answer on `ip:port` (the workload's `WORKLOAD_LISTEN`): its counter,
/// whether its memory check holds, what its sink received; `None` while nothing answers.
pub async fn ask_service(ip: &str, port: u16) -> Option<ServiceAnswer> {
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
    parse_answer(&line)
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

/// A request to a sidecar without a credential (its open endpoints: /healthz, /probe);
/// (status, JSON body or Null).
pub async fn sidecar(method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    sidecar_as(None, method, url, body).await
}

/// A request to a sidecar with a bearer `token` (a coordinator's, see
/// `Cluster::sidecar_token`); (status, JSON body or Null).
pub async fn sidecar_as(
    token: Option<&str>,
    method: &str,
    url: String,
    body: Option<Value>,
) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let request = match method {
        "POST" => client.post(url).json(&body.unwrap_or(Value::Null)),
        _ => client.get(url),
    };
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A user (Jane) creates `pod` (named `name`) in `cluster`; it runs, is ready and its first
/// container's ambassador relays five workload ticks. Its IP.
pub async fn run_service(cluster: &crate::cluster::Cluster, pod: &Value, name: &str) -> String {
    cluster.kubectl_with_input(
        crate::cluster::User::Jane,
        &["create", "-f", "-"],
        &pod.to_string(),
    );
    let ip = cluster
        .wait_running_and_ready(name, Duration::from_secs(180))
        .await;
    let first = pod["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("app")
        .to_owned();
    let ambassador = cluster.pod_container(name, &first);
    crate::poll(
        "the ambassador to relay the workload's ticks",
        Duration::from_secs(120),
        || {
            let n = crate::workload::ticks(&container_output(&ambassador)).len();
            async move { (n >= 5).then_some(()) }
        },
    )
    .await;
    ip
}

/// An ordinary (unwrapped, unannotated) pod `counter` of the test workload: 64 MiB, its
/// counter served on 8080, ready when it answers there.
pub fn plain_counter_pod(image: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "counter"},
        "spec": {"containers": [{"name": "main", "image": image,
            "env": [{"name": "WORKLOAD_MIB", "value": "64"},
                    {"name": "WORKLOAD_LISTEN", "value": "8080"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}}}]}
    })
    .to_string()
}

/// [`plain_counter_pod`] with an emptyDir `data` where it keeps a journal (`/data/journal`,
/// held open: the file must be there when the process is restored).
pub fn journaling_counter_pod(image: &str) -> String {
    let mut pod: serde_json::Value = serde_json::from_str(&plain_counter_pod(image)).unwrap();
    let main = &mut pod["spec"]["containers"][0];
    main["env"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "WORKLOAD_JOURNAL", "value": "/data/journal"}));
    main["volumeMounts"] = serde_json::json!([{"name": "data", "mountPath": "/data"}]);
    pod["spec"]["volumes"] = serde_json::json!([{"name": "data", "emptyDir": {}}]);
    pod.to_string()
}

/// Runs [`plain_counter_pod`] (the workload from the tests' HTTPS registry, for CRI nodes) as
/// Jane; once it has counted a while, its IP and its answer.
pub async fn run_plain_counter(cluster: &crate::cluster::Cluster) -> (String, ServiceAnswer) {
    run_counter(
        cluster,
        &plain_counter_pod(crate::workload::tls_registry_workload_image()),
    )
    .await
}

/// Runs [`journaling_counter_pod`] as [`run_plain_counter`] runs its pod.
pub async fn run_journaling_counter(cluster: &crate::cluster::Cluster) -> (String, ServiceAnswer) {
    let pod = journaling_counter_pod(crate::workload::tls_registry_workload_image());
    run_counter(cluster, &pod).await
}

async fn run_counter(cluster: &crate::cluster::Cluster, pod: &str) -> (String, ServiceAnswer) {
    cluster.kubectl_with_input(crate::cluster::User::Jane, &["create", "-f", "-"], pod);
    let ip = cluster
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    // Let it count a while: a restored counter must be past this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answer = ask_service(&ip, 8080).await.expect("the counter answers");
    (ip, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_with_and_without_a_sink() {
        assert_eq!(
            parse_answer("tick=12 mem=ok\n"),
            Some(ServiceAnswer {
                tick: 12,
                memory_ok: true,
                sink: None
            })
        );
        let answer = parse_answer("tick=7 mem=BAD sink=1/0/280/279/0\n").unwrap();
        assert!(!answer.memory_ok);
        assert_eq!(
            answer.sink,
            Some(Sink {
                accepted: 1,
                closed: 0,
                lines: 280,
                last: 279,
                gaps: 0
            })
        );
        assert_eq!(parse_answer("tick=7 mem=ok sink=1/0"), None);
        assert_eq!(parse_answer("HTTP/1.1 400"), None);
    }
}
