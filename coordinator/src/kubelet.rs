//! The kubelet's checkpoint API, as the orchestrator-level interface uses it: where a pod's
//! node serves it (its Node's InternalIP and `status.daemonEndpoints.kubeletEndpoint.Port`),
//! whether the node's runtime can checkpoint and restore (containerd >= 2.0 or CRI-O), and
//! `POST /checkpoint/{namespace}/{pod}/{container}` (KEP-2008), authorized as this
//! coordinator's service account (RBAC: `create` on `nodes/checkpoint`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::error::ApiError;

/// How this coordinator reaches kubelets.
pub struct Kubelets {
    pub client: reqwest::Client,
    /// The service account token presented to kubelets (re-read at each call: it rotates).
    pub token_file: PathBuf,
}

impl std::fmt::Debug for Kubelets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelets")
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

/// A node whose kubelet can checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointNode {
    pub name: String,
    /// `https://<InternalIP>:<port>`.
    pub kubelet_url: String,
    pub runtime: String,
}

/// The node that runs `pod`: by `spec.nodeName`, else (a cluster without a scheduler) the node
/// whose InternalIP is the pod's hostIP.
pub fn node_of<'a>(pod: &Pod, nodes: &'a [Node]) -> Option<&'a Node> {
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let host_ip = pod.status.as_ref().and_then(|s| s.host_ip.as_deref());
    nodes.iter().find(|n| match node_name {
        Some(name) if !name.is_empty() => n.metadata.name.as_deref() == Some(name),
        _ => host_ip.is_some() && internal_ip(n) == host_ip,
    })
}

fn internal_ip(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

/// The node's runtime (`nodeInfo.containerRuntimeVersion`).
pub fn runtime_of(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.container_runtime_version.clone())
        .unwrap_or_default()
}

/// The node's kernel (`nodeInfo.kernelVersion`), empty when it says none.
pub fn kernel_of(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.kernel_version.clone())
        .unwrap_or_default()
}

/// Whether a runtime (`containerd://2.1.9`, `cri-o://1.31.0`) checkpoints containers and
/// restores a container whose image is a checkpoint image: containerd >= 2.0, CRI-O.
pub fn restores_checkpoints(runtime: &str) -> bool {
    match runtime.split_once("://") {
        Some(("containerd", version)) => version
            .split('.')
            .next()
            .and_then(|major| major.parse::<u32>().ok())
            .is_some_and(|major| major >= 2),
        Some(("cri-o", _)) => true,
        _ => false,
    }
}

/// Whether the node can checkpoint and restore, and where its kubelet is; the reason if not.
pub fn checkpoint_node(node: &Node) -> Result<CheckpointNode, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let status = node.status.as_ref();
    let runtime = runtime_of(node);
    if !restores_checkpoints(&runtime) {
        return Err(format!(
            "node {name} runs {}: checkpoint and restore need containerd >= 2.0 or CRI-O (with CRIU) on the node",
            if runtime.is_empty() { "an unknown runtime" } else { runtime.as_str() }
        ));
    }
    let port = status
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .map(|e| e.port)
        .unwrap_or(0);
    let address = internal_ip(node).unwrap_or_default();
    if port == 0 || address.is_empty() {
        return Err(format!(
            "node {name} publishes no kubelet endpoint (InternalIP and daemonEndpoints.kubeletEndpoint)"
        ));
    }
    Ok(CheckpointNode {
        name,
        kubelet_url: format!("https://{address}:{port}"),
        runtime,
    })
}

/// One container's checkpoint, as the kubelet made it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub container: String,
    /// The archive's path on the node.
    pub archive: String,
    /// When the request left and the answer came, milliseconds since the Unix epoch.
    pub requested_unix_ms: u64,
    pub answered_unix_ms: u64,
}

impl Kubelets {
    /// `POST /checkpoint/{namespace}/{pod}/{container}` on the node's kubelet.
    pub async fn checkpoint(
        &self,
        node: &CheckpointNode,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Checkpoint, ApiError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ApiError::internal(format!(
                "the kubelet token {}: {e}",
                self.token_file.display()
            ))
        })?;
        let url = format!(
            "{}/checkpoint/{namespace}/{pod}/{container}?timeout=120",
            node.kubelet_url
        );
        let requested = crate::state::unix_ms();
        let started = Instant::now();
        let response = self
            .client
            .post(&url)
            .bearer_auth(token.trim())
            .timeout(Duration::from_secs(180))
            .send()
            .await
            .map_err(|e| {
                ApiError::bad_gateway(format!(
                    "the kubelet of node {} at {url}: {}",
                    node.name,
                    crate::peer::error_chain(&e)
                ))
            })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("no message");
            return Err(ApiError::bad_gateway(format!(
                "the kubelet of node {} refused to checkpoint {namespace}/{pod}/{container}: {status}: {message}",
                node.name
            )));
        }
        let archive = body["items"][0].as_str().unwrap_or_default().to_owned();
        if archive.is_empty() {
            return Err(ApiError::bad_gateway(format!(
                "the kubelet of node {} named no archive for {container}: {body}",
                node.name
            )));
        }
        tracing::info!(node = %node.name, %container, %archive, ms = started.elapsed().as_millis() as u64, "checkpoint taken");
        Ok(Checkpoint {
            container: container.to_owned(),
            archive,
            requested_unix_ms: requested,
            answered_unix_ms: crate::state::unix_ms(),
        })
    }
}

/// The spread between the containers' checkpoints: from the first answer to the last, in
/// milliseconds (how far apart in time the containers' states were taken, at most).
pub fn skew_ms(checkpoints: &[Checkpoint]) -> u64 {
    let answered = checkpoints.iter().map(|c| c.answered_unix_ms);
    match (answered.clone().min(), answered.max()) {
        (Some(first), Some(last)) => last - first,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(runtime: &str, port: u16) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
                "nodeInfo": {"containerRuntimeVersion": runtime, "kubeletVersion": "", "machineID": "",
                    "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
            }
        }))
        .unwrap_or_default()
    }

    #[test]
    fn only_runtimes_that_restore_checkpoints_qualify() {
        assert_eq!(
            checkpoint_node(&node("containerd://2.1.9", 10250)).map(|n| n.kubelet_url),
            Ok("https://10.0.0.5:10250".into())
        );
        assert!(checkpoint_node(&node("cri-o://1.31.0", 10250)).is_ok());
        for runtime in ["containerd://1.7.22", "docker://20.10.24", ""] {
            let refused = checkpoint_node(&node(runtime, 10250)).unwrap_err();
            assert!(refused.contains("containerd >= 2.0"), "{refused}");
        }
        assert!(checkpoint_node(&node("containerd://2.0.0", 0))
            .unwrap_err()
            .contains("no kubelet endpoint"));
    }

    #[test]
    fn a_pod_is_on_its_named_node_or_the_one_with_its_host_ip() {
        let nodes = vec![node("containerd://2.1.9", 10250)];
        let by_ip: Pod =
            serde_json::from_value(json!({"status": {"hostIP": "10.0.0.5"}})).unwrap_or_default();
        assert!(node_of(&by_ip, &nodes).is_some());
        let elsewhere: Pod =
            serde_json::from_value(json!({"spec": {"containers": [], "nodeName": "n2"}}))
                .unwrap_or_default();
        assert!(node_of(&elsewhere, &nodes).is_none());
    }

    #[test]
    fn skew_is_the_spread_of_the_answers() {
        let c = |at| Checkpoint {
            container: "c".into(),
            archive: "a".into(),
            requested_unix_ms: 0,
            answered_unix_ms: at,
        };
        assert_eq!(skew_ms(&[c(1000), c(1250), c(1100)]), 250);
        assert_eq!(skew_ms(&[]), 0);
    }
}
