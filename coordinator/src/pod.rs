//! What the coordinator decides about pods, as pure functions: whether a pod can be migrated
//! now, and the pod the destination cluster creates for it (from the source pod itself, not
//! from `kubectl.kubernetes.io/last-applied-configuration`, which pods made by a controller or
//! by `kubectl create` do not have).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ums_contract::{
    AnnotationError, Interface, MigrationAnnotations, StartMode, ANNOTATION_BYPASS,
    ANNOTATION_CONTAINERS, ANNOTATION_ID, ANNOTATION_START_MODE, ANNOTATION_VOLUMES,
    ANNOTATION_VOLUME_KINDS,
};

/// Why a pod cannot be migrated now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No `migration-interface`, or not wrapped by the webhook.
    #[error("pod {pod} is not migratable: {reason}")]
    NotMigratable { pod: String, reason: String },
    /// The contract's annotations do not parse.
    #[error("pod {pod} has invalid migration annotations: {source}")]
    BadAnnotations {
        pod: String,
        #[source]
        source: AnnotationError,
    },
    /// Only an active pod (its containers running) is a migration's source.
    #[error("pod {pod} is not active ({ANNOTATION_START_MODE}={mode}): only an active pod can be migrated")]
    NotActive { pod: String, mode: StartMode },
    /// Another migration holds the pod.
    #[error("pod {pod} is being migrated ({ANNOTATION_ID}={id})")]
    Locked { pod: String, id: String },
    /// Not running (yet, or any more), or without an IP.
    #[error("pod {pod} is not running with an IP (phase {phase})")]
    NotRunning { pod: String, phase: String },
    /// A controller owns the pod and would recreate it at the source.
    #[error("pod {pod} is owned by {kind} {owner}: a migrated copy would run beside the one the {kind} recreates at the source; migrate a pod without a controller (or scale the {kind} to zero and migrate its pods one by one)")]
    Owned {
        pod: String,
        kind: String,
        owner: String,
    },
    /// The request asked for another interface than the pod's.
    #[error("pod {pod} runs with migration-interface {actual}, the request asks for {requested}")]
    InterfaceMismatch {
        pod: String,
        actual: Interface,
        requested: String,
    },
}

impl Refusal {
    /// The HTTP status of the refusal: 409 for the pod's state now (locked, not running, owned),
    /// 400 for what the request or the pod's contract gets wrong.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Locked { .. } | Refusal::NotRunning { .. } | Refusal::Owned { .. } => 409,
            _ => 400,
        }
    }
}

/// A pod that can be migrated: what the flow needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Migratable {
    pub interface: Interface,
    /// The containers the user wrote (`migration-containers`).
    pub containers: Vec<Container>,
    pub ip: String,
    /// The pod's UID: the sidecar takes only tokens that name it.
    pub uid: Option<String>,
    pub resource_version: String,
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Checks that `pod` can be migrated now: wrapped (dind or pind) or prepared (ff) by the
/// webhook, active, not locked, running
/// with an IP, not owned by a controller; `interface` is what the request asked for, if it did.
pub fn check(pod: &Pod, interface: Option<&str>) -> Result<Migratable, Refusal> {
    let name = pod_name(pod);
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let parsed =
        MigrationAnnotations::parse(annotations).map_err(|source| Refusal::BadAnnotations {
            pod: name.clone(),
            source,
        })?;
    let not_migratable = |reason: &str| Refusal::NotMigratable {
        pod: name.clone(),
        reason: reason.to_owned(),
    };
    let actual = parsed
        .interface
        .ok_or_else(|| not_migratable("it has no migration-interface annotation"))?;
    if let Some(requested) = interface {
        if requested != actual.as_str() {
            return Err(Refusal::InterfaceMismatch {
                pod: name,
                actual,
                requested: requested.to_owned(),
            });
        }
    }
    let containers = match (&parsed.containers, parsed.bypass) {
        (Some(containers), true) => containers.clone(),
        _ => {
            return Err(not_migratable(
                "it was not wrapped by the admission webhook (no migration-containers)",
            ))
        }
    };
    if let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        return Err(Refusal::Owned {
            pod: name,
            kind: owner.kind.clone(),
            owner: owner.name.clone(),
        });
    }
    if let Some(id) = &parsed.migration_id {
        return Err(Refusal::Locked {
            pod: name,
            id: id.clone(),
        });
    }
    let mode = parsed.start_mode_or_default();
    if mode != StartMode::Active {
        return Err(Refusal::NotActive { pod: name, mode });
    }
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "unknown".into());
    let ip = status.and_then(|s| s.pod_ip.clone()).unwrap_or_default();
    if phase != "Running" || ip.is_empty() || pod.metadata.deletion_timestamp.is_some() {
        return Err(Refusal::NotRunning { pod: name, phase });
    }
    Ok(Migratable {
        interface: actual,
        containers,
        ip,
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
    })
}

/// The annotations the webhook writes when it wraps a pod: the destination's webhook writes
/// them again for its own pod.
const WRAP_ANNOTATIONS: [&str; 4] = [
    ANNOTATION_CONTAINERS,
    ANNOTATION_VOLUMES,
    ANNOTATION_VOLUME_KINDS,
    ANNOTATION_BYPASS,
];

/// The pod the destination cluster creates: the source pod as its user wrote it (its original
/// containers, its own volumes, labels and annotations; not the runtime container, the
/// ambassadors or the volumes the webhook added, not the node it ran on), passive, locked by
/// this migration. The destination's admission chain wraps it as it wrapped the source.
pub fn destination_pod(source: &Pod, original_containers: &[Container], migration_id: &str) -> Pod {
    let mut annotations = source.metadata.annotations.clone().unwrap_or_default();
    // The user's own volumes are those the webhook listed when it wrapped the pod.
    let kinds = annotations
        .get(ANNOTATION_VOLUME_KINDS)
        .and_then(|v| ums_contract::annotations::parse_volume_kinds(v).ok());
    let paths = annotations
        .get(ANNOTATION_VOLUMES)
        .and_then(|v| ums_contract::annotations::parse_volumes(v).ok())
        .unwrap_or_default();
    let is_users = |name: &str| match &kinds {
        Some(kinds) => kinds.contains_key(name),
        None => paths.iter().any(|p| p.rsplit('/').next() == Some(name)),
    };
    for key in WRAP_ANNOTATIONS {
        annotations.remove(key);
    }
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    annotations.insert(
        ANNOTATION_START_MODE.into(),
        StartMode::Passive.as_str().into(),
    );
    annotations.insert(ANNOTATION_ID.into(), migration_id.into());
    let spec = source.spec.clone().unwrap_or_default();
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| is_users(&v.name))
        .cloned()
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: source.metadata.name.clone(),
            labels: source.metadata.labels.clone(),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: original_containers.to_vec(),
            volumes: (!volumes.is_empty()).then_some(volumes),
            node_name: None,
            ..spec
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A wrapped pod as the source cluster holds it (shape of the webhook's rewrite).
    fn wrapped(extra: serde_json::Value) -> Pod {
        let mut pod = json!({
            "metadata": {
                "name": "svc", "namespace": "shop", "resourceVersion": "41",
                "labels": {"app": "svc"},
                "annotations": {
                    "migration-interface": "dind",
                    "migration-start-mode": "active",
                    "migration-bypass": "true",
                    "migration-containers": "[{\"name\":\"app\",\"image\":\"registry/app:1\",\"volumeMounts\":[{\"name\":\"state\",\"mountPath\":\"/state\"}]}]",
                    "migration-volumes": "[\"/mount/state\"]",
                    "migration-volume-kinds": "{\"state\":\"emptyDir\"}",
                    "team": "payments"
                }
            },
            "spec": {
                "nodeName": "edge-1",
                "containers": [
                    {"name": "runtime", "image": "ums-rs/dind:latest"},
                    {"name": "app", "image": "ums-rs/ambassador:latest"}
                ],
                "volumes": [
                    {"name": "state", "emptyDir": {}},
                    {"name": "ums-engine-storage", "emptyDir": {}},
                    {"name": "podinfo", "downwardAPI": {}}
                ],
                "terminationGracePeriodSeconds": 5
            },
            "status": {"phase": "Running", "podIP": "10.1.0.7"}
        });
        merge(&mut pod, extra);
        serde_json::from_value(pod).unwrap()
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
                for (k, v) in e {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, e) => *b = e,
        }
    }

    #[test]
    fn a_wrapped_running_active_pod_is_migratable() {
        let m = check(&wrapped(json!({})), None).unwrap();
        assert_eq!(m.interface, Interface::Dind);
        assert_eq!(m.ip, "10.1.0.7");
        assert_eq!(m.resource_version, "41");
        assert_eq!(m.containers[0].name, "app");
        assert!(check(&wrapped(json!({})), Some("dind")).is_ok());
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let refused = |extra| check(&wrapped(extra), None).unwrap_err();
        let locked = refused(json!({"metadata": {"annotations": {"migration-id": "m1"}}}));
        assert_eq!(locked.status(), 409);
        assert!(locked.to_string().contains("migration-id=m1"), "{locked}");
        let passive =
            refused(json!({"metadata": {"annotations": {"migration-start-mode": "passive"}}}));
        assert_eq!(passive.status(), 400);
        assert!(passive.to_string().contains("not active"), "{passive}");
        let pending = refused(json!({"status": {"phase": "Pending", "podIP": null}}));
        assert_eq!(pending.status(), 409);
        let owned = refused(json!({"metadata": {"ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "svc-7d9f",
            "uid": "u1", "controller": true
        }]}}));
        assert_eq!(owned.status(), 409);
        assert!(owned.to_string().contains("ReplicaSet svc-7d9f"), "{owned}");
        let plain: Pod = serde_json::from_value(json!({
            "metadata": {"name": "plain"},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.8"}
        }))
        .unwrap();
        let err = check(&plain, None).unwrap_err();
        assert!(err.to_string().contains("no migration-interface"), "{err}");
        let err = check(&wrapped(json!({})), Some("pind")).unwrap_err();
        assert_eq!(err.status(), 400);
        let bad = refused(json!({"metadata": {"annotations": {"migration-start-mode": "sleepy"}}}));
        assert!(bad.to_string().contains("sleepy"), "{bad}");
    }

    #[test]
    fn the_destination_pod_is_the_users_pod_passive_and_locked() {
        let source = wrapped(json!({}));
        let m = check(&source, None).unwrap();
        let pod = destination_pod(&source, &m.containers, "m42");
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["migration-start-mode"], "passive");
        assert_eq!(annotations["migration-id"], "m42");
        assert_eq!(annotations["migration-interface"], "dind");
        assert_eq!(annotations["team"], "payments");
        for key in WRAP_ANNOTATIONS {
            assert!(
                !annotations.contains_key(key),
                "{key} must be the destination webhook's"
            );
        }
        assert_eq!(pod.metadata.name.as_deref(), Some("svc"));
        assert_eq!(pod.metadata.namespace, None);
        assert_eq!(pod.metadata.resource_version, None);
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "svc");
        let spec = pod.spec.unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app"]);
        assert_eq!(spec.containers[0].image.as_deref(), Some("registry/app:1"));
        let volumes: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(volumes, ["state"]);
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.termination_grace_period_seconds, Some(5));
        assert!(pod.status.is_none());
    }
}
