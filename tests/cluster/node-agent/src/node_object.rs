//! The node's Node object, as a kubelet registers it: labels, addresses, the kubelet
//! endpoint's port (`status.daemonEndpoints`, what clients of the kubelet API read), the
//! container runtime's and the kernel's versions and a Ready condition, refreshed every ten seconds.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

/// What the Node object says.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    /// The node's InternalIP: where the kubelet endpoint is reached.
    pub address: String,
    /// The kubelet endpoint's port (0: none).
    pub kubelet_port: u16,
    /// `containerd://2.1.9`, `docker://20.10.24`.
    pub runtime_version: String,
}

/// Creates the Node object if missing, then keeps its status fresh.
pub async fn keep_registered(client: kube::Client, facts: NodeFacts) {
    let nodes: Api<Node> = Api::all(client);
    let object = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": facts.name, "labels": {
            "kubernetes.io/hostname": facts.name, "kubernetes.io/os": "linux"}},
    });
    loop {
        if let Err(e) = register(&nodes, &object, &facts).await {
            tracing::warn!(node = %facts.name, error = %e, "node registration");
        }
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    }
}

async fn register(
    nodes: &Api<Node>,
    object: &serde_json::Value,
    facts: &NodeFacts,
) -> anyhow::Result<()> {
    if nodes.get_opt(&facts.name).await?.is_none() {
        let node: Node = serde_json::from_value(object.clone())?;
        nodes.create(&PostParams::default(), &node).await?;
        tracing::info!(node = %facts.name, address = %facts.address, kubelet_port = facts.kubelet_port, "Node registered");
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    // The node runs on the host's kernel, as `uname -r` names it.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": facts.address},
                      {"type": "Hostname", "address": facts.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": facts.kubelet_port}},
        "nodeInfo": {"containerRuntimeVersion": facts.runtime_version,
                     "kubeletVersion": "ums-node-agent", "operatingSystem": "linux",
                     "architecture": "amd64", "machineID": "", "systemUUID": "", "bootID": "",
                     "kernelVersion": kernel.trim(), "osImage": "", "kubeProxyVersion": ""},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
    }});
    nodes
        .patch_status(&facts.name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}
