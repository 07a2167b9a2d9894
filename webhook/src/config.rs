//! What the pod rewrite needs to know that is not in the pod: images, pull policy, overheads.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Settings of the pod rewrite, taken from the webhook's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct WrapConfig {
    /// Runtime image for `migration-interface: dind`.
    pub dind_image: String,
    /// Runtime image for `migration-interface: pind`.
    pub pind_image: String,
    /// Image of the per-container ambassador (`ums-sidecar ambassador <name>`).
    pub ambassador_image: String,
    /// `imagePullPolicy` of the containers the webhook adds; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// CPU added to the runtime container's requests and limits for the engine and sidecar.
    pub runtime_cpu_overhead: Quantity,
    /// Memory added to the runtime container's requests and limits.
    pub runtime_memory_overhead: Quantity,
    /// Port of the sidecar's HTTP API inside the pod.
    pub sidecar_port: u16,
    /// Plain-HTTP registries the nested engines may pull from (`UMS_INSECURE_REGISTRIES`).
    pub insecure_registries: Vec<String>,
    /// Public keys of the cluster's coordinator(s) (`UMS_COORDINATOR_KEYS` of the sidecars):
    /// only tokens they sign open a wrapped pod's sidecar. None: only the pod's ambassadors
    /// can call it.
    pub coordinator_keys: Vec<String>,
}

impl Default for WrapConfig {
    fn default() -> Self {
        WrapConfig {
            dind_image: "ums-rs/dind:latest".into(),
            pind_image: "ums-rs/pind:latest".into(),
            ambassador_image: "ums-rs/ambassador:latest".into(),
            image_pull_policy: None,
            runtime_cpu_overhead: Quantity("100m".into()),
            runtime_memory_overhead: Quantity("256Mi".into()),
            sidecar_port: ums_contract::DEFAULT_SIDECAR_PORT,
            insecure_registries: Vec::new(),
            coordinator_keys: Vec::new(),
        }
    }
}
