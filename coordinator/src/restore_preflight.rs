//! The destination's preflight of an orchestrator-level migration, answered (with the upload
//! credential, `POST /checkpoint-uploads`) before the source checkpoints anything: once the
//! source is checkpointed it is stopped, so whatever would make the restore fail here is
//! refused first, by name.
//!
//! - the pod's namespace, what it needs there (configMaps, secrets, service account) and its
//!   name, free;
//! - a node whose runtime restores checkpoint images (containerd >= 2.0, CRI-O) on a kernel no
//!   older than the source node's (CRIU restores onto the same or a newer kernel);
//! - each container's base image, which the runtime pulls to restore the checkpoint onto it:
//!   its registry must not answer "unknown" (a registry this coordinator cannot ask, or that
//!   wants the nodes' pull secrets, is reported as not verified, not refused: nodes may pull
//!   through mirrors and credentials of their own);
//! - the checkpoint registry, which must answer.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::Api;
use ums_checkpoint_image::Lookup;

use crate::checkpoint_upload::UploadRequest;
use crate::error::ApiError;
use crate::kubelet::{kernel_of, restores_checkpoints, runtime_of};
use crate::state::Coordinator;

/// `major.minor` of a kernel release (`6.1.0-28-amd64` -> (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `node` is among the nodes [`restore_nodes`] found (pure).
pub fn restores_on(capable: &[String], node: &str) -> bool {
    capable
        .iter()
        .any(|c| c.split_whitespace().next() == Some(node))
}

/// The nodes (by name, with runtime and kernel) that can restore a checkpoint taken on a node
/// running `source_kernel`; the reason if none can (pure).
pub fn restore_nodes(
    cluster: &str,
    nodes: &[Node],
    source_kernel: Option<&str>,
) -> Result<Vec<String>, String> {
    let wanted = source_kernel.and_then(kernel_version);
    let mut capable = Vec::new();
    let mut older = Vec::new();
    let mut others = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let runtime = runtime_of(node);
        let kernel = kernel_of(node);
        if !restores_checkpoints(&runtime) {
            others.push(format!(
                "{name} ({})",
                if runtime.is_empty() {
                    "runtime unknown"
                } else {
                    runtime.as_str()
                }
            ));
            continue;
        }
        match (wanted, kernel_version(&kernel)) {
            (Some(source), Some(here)) if here < source => {
                older.push(format!("{name} (kernel {kernel})"));
            }
            _ => capable.push(format!(
                "{name} ({runtime}, kernel {})",
                if kernel.is_empty() {
                    "unknown"
                } else {
                    kernel.as_str()
                }
            )),
        }
    }
    if !capable.is_empty() {
        return Ok(capable);
    }
    if !older.is_empty() {
        return Err(format!(
            "every node of cluster {cluster} that restores checkpoints runs a kernel older than the source node's ({}): {}; CRIU restores onto the same or a newer kernel",
            source_kernel.unwrap_or_default(),
            older.join(", ")
        ));
    }
    Err(format!(
        "no node of cluster {cluster} restores checkpoint images (containerd >= 2.0 or CRI-O with CRIU): {}",
        if others.is_empty() { "it lists no nodes".to_owned() } else { others.join(", ") }
    ))
}

impl Coordinator {
    /// What was checked (for the source's report), or the refusal naming what would fail.
    pub(crate) async fn restore_preflight(
        &self,
        request: &UploadRequest,
        registry: &crate::checkpoint_upload::CheckpointRegistry,
    ) -> Result<Vec<String>, ApiError> {
        let mut checks = Vec::new();
        if let Some(pod) = &request.pod {
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = pod.metadata.name.clone().unwrap_or_default();
            crate::migrate::check_label("pod name", &name)?;
            self.check_prerequisites(&namespace, pod).await?;
            let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
            if pods.get_metadata_opt(&name).await?.is_some() {
                return Err(ApiError::conflict(format!(
                    "cluster {} already has a pod {namespace}/{name}: the restored pod takes its name",
                    self.cluster
                )));
            }
            checks.push(format!(
                "namespace {namespace} holds what the pod needs, and no pod {name}"
            ));
        }

        let nodes = Api::<Node>::all(self.kube.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let capable = restore_nodes(&self.cluster, &nodes, request.source_kernel.as_deref())
            .map_err(ApiError::conflict)?;
        // A pod bound to a node (a node-to-node move, or a destination node asked for) is
        // restored there or nowhere.
        let bound = request
            .pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.node_name.as_deref());
        if let Some(node) = bound {
            if !restores_on(&capable, node) {
                return Err(ApiError::conflict(format!(
                    "node {node} of cluster {} cannot restore this checkpoint (it restores on: {}): its runtime must restore checkpoint images (containerd >= 2.0 or CRI-O with CRIU) on a kernel no older than the source node's",
                    self.cluster,
                    capable.join(", ")
                )));
            }
        }
        checks.push(format!("restores on: {}", capable.join(", ")));

        let images: BTreeSet<(String, String)> = request
            .pod
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .filter_map(|c| Some((c.image.clone()?, c.name.clone())))
            .collect();
        for (image, container) in images {
            match ums_checkpoint_image::lookup(&registry.client, &image).await {
                Lookup::Found(digest) => checks.push(format!("base image {image}: {digest}")),
                Lookup::NotFound(answer) => {
                    return Err(ApiError::conflict(format!(
                        "cluster {} cannot pull {image}, the base image of container {container}: its registry does not know it ({answer}); the runtime restores a checkpoint onto its base image",
                        self.cluster
                    )))
                }
                Lookup::Unauthorized(answer) => checks.push(format!(
                    "base image {image} not verified: its registry wants credentials this coordinator does not have (the nodes may: {answer})"
                )),
                Lookup::Unknown(answer) => checks.push(format!(
                    "base image {image} not verified: {answer}"
                )),
            }
        }

        let probe = format!("{}:ums-preflight", registry.push_repository);
        match ums_checkpoint_image::lookup(&registry.client, &probe).await {
            Lookup::Found(_) | Lookup::NotFound(_) => checks.push(format!(
                "checkpoint registry {} answers",
                registry.push_repository
            )),
            Lookup::Unauthorized(answer) | Lookup::Unknown(answer) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "cluster {}'s checkpoint registry {} cannot take the checkpoint images: {answer}",
                        self.cluster, registry.push_repository
                    ),
                ))
            }
        }
        Ok(checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, runtime: &str, kernel: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"nodeInfo": {"containerRuntimeVersion": runtime, "kernelVersion": kernel,
                "architecture": "", "bootID": "", "kubeProxyVersion": "", "kubeletVersion": "",
                "machineID": "", "operatingSystem": "", "osImage": "", "systemUUID": ""}}
        }))
        .unwrap_or_default()
    }

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert_eq!(kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.167+"), Some((5, 15)));
        assert_eq!(kernel_version("6"), None);
        assert_eq!(kernel_version(""), None);
    }

    #[test]
    fn a_restore_needs_a_checkpoint_runtime_on_a_kernel_no_older_than_the_source() {
        let nodes = [
            node("docker", "docker://20.10.24", "6.1.0-28-amd64"),
            node("old", "containerd://2.1.9", "5.10.0-30-amd64"),
            node("new", "containerd://2.1.9", "6.1.0-28-amd64"),
        ];
        let ok = restore_nodes("cloud", &nodes, Some("6.1.0-28-amd64")).unwrap_or_default();
        assert!(restores_on(&ok, "new"));
        assert!(!restores_on(&ok, "old"), "{ok:?}");
        assert!(!restores_on(&ok, "docker"), "{ok:?}");
        assert!(!restores_on(&ok, "ne"), "a name's prefix is another node");
        assert_eq!(ok.len(), 1);
        assert!(ok[0].starts_with("new (containerd://2.1.9"), "{ok:?}");
        // Without the source's kernel, any checkpoint runtime does.
        assert_eq!(restore_nodes("cloud", &nodes, None).map(|n| n.len()), Ok(2));
        let older = restore_nodes("cloud", &nodes[..2], Some("6.1.0")).unwrap_err();
        assert!(
            older.contains("older than the source node's (6.1.0)"),
            "{older}"
        );
        assert!(older.contains("old (kernel 5.10.0-30-amd64)"), "{older}");
        let none = restore_nodes("cloud", &nodes[..1], None).unwrap_err();
        assert!(none.contains("no node of cluster cloud restores"), "{none}");
        assert!(none.contains("docker (docker://20.10.24)"), "{none}");
        assert!(restore_nodes("cloud", &[], None)
            .unwrap_err()
            .contains("lists no nodes"));
        // containerd 1.x does not restore checkpoint images.
        assert!(restore_nodes("cloud", &[node("c1", "containerd://1.7.24", "6.1")], None).is_err());
    }
}
