//! The pod rewrite for `migration-interface: dind|pind`: the original containers move into a
//! nested engine inside one privileged `runtime` container, and each is replaced by an
//! unprivileged ambassador of the same name (see DESIGN.md, "The wrapped pod").
//!
//! Pure: a `Pod` in, a `Pod` out, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, EnvVar, HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe,
    ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ums_contract::annotations::{
    encode_containers, encode_volume_kinds, encode_volumes, volume_kind,
};
use ums_contract::{
    forwarded_env_name, runtime_volume_path, Interface, StartMode, ANNOTATION_BYPASS,
    ANNOTATION_CONTAINERS, ANNOTATION_START_MODE, ANNOTATION_VOLUMES, ANNOTATION_VOLUME_KINDS,
    PODINFO_DIR,
};

use crate::config::WrapConfig;
use ums_contract::quantity::{self, QuantityError};

/// Name the runtime container gets unless an original container already uses it.
pub const RUNTIME_CONTAINER: &str = "runtime";
/// Base name of the emptyDir volume holding the nested engine's storage.
pub const ENGINE_STORAGE_VOLUME: &str = "ums-engine-storage";
/// Base name of the downward-API volume with the pod's metadata.
pub const PODINFO_VOLUME: &str = "ums-podinfo";
/// Base name of the in-memory emptyDir holding the pod-local token the sidecar writes for the
/// ambassadors (mounted in the runtime and the ambassadors only, never in nested containers).
pub const POD_TOKEN_VOLUME: &str = "ums-pod-token";
/// Where that volume is mounted, and the token file in it.
pub const POD_TOKEN_DIR: &str = "/var/run/ums";
pub const POD_TOKEN_FILE: &str = "/var/run/ums/pod-token";
/// Path of the sidecar binary in the ambassador image.
pub const SIDECAR_BINARY: &str = "/usr/local/bin/ums-sidecar";

/// The names of the volumes the webhook adds to a wrapped pod.
#[derive(Debug, Clone)]
struct AddedVolumes {
    /// The nested engine's storage.
    storage: String,
    /// The downward-API files.
    podinfo: String,
    /// The pod-local token of the ambassadors.
    token: String,
}

/// A pod that cannot be wrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// The pod has no spec or no containers.
    #[error("pod has no containers to wrap")]
    NoContainers,
    /// An original container listens on the sidecar's port.
    #[error("container {container:?} uses port {port}, which the migration sidecar needs in a {interface} pod; move the container or the sidecar port (--sidecar-port)")]
    SidecarPortTaken {
        container: String,
        port: u16,
        interface: Interface,
    },
    /// Two original containers give one port name to different ports.
    #[error("port name {name:?} is used for different ports by containers {first:?} and {second:?}; the runtime container owns every port of a wrapped pod and cannot name both")]
    PortNameClash {
        name: String,
        first: String,
        second: String,
    },
    /// A request or limit is not a valid quantity.
    #[error("container {container:?}: {reason}")]
    Quantity {
        container: String,
        reason: QuantityError,
    },
}

/// Wraps `pod` for `interface` (dind or pind). Callers check the bypass annotation first.
pub fn wrap_pod(
    pod: &Pod,
    interface: Interface,
    start_mode: StartMode,
    config: &WrapConfig,
) -> Result<Pod, WrapError> {
    let spec = pod.spec.as_ref().ok_or(WrapError::NoContainers)?;
    if spec.containers.is_empty() {
        return Err(WrapError::NoContainers);
    }
    let originals = &spec.containers;
    check_sidecar_port(originals, interface, config.sidecar_port)?;

    let taken_container_names: BTreeSet<&str> = originals
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| c.name.as_str()),
        )
        .collect();
    let runtime_name = free_name(RUNTIME_CONTAINER, &taken_container_names);

    let original_volumes: Vec<Volume> = spec.volumes.clone().unwrap_or_default();
    let taken_volume_names: BTreeSet<&str> =
        original_volumes.iter().map(|v| v.name.as_str()).collect();
    let added = AddedVolumes {
        storage: free_name(ENGINE_STORAGE_VOLUME, &taken_volume_names),
        podinfo: free_name(PODINFO_VOLUME, &taken_volume_names),
        token: free_name(POD_TOKEN_VOLUME, &taken_volume_names),
    };

    let volume_paths: Vec<String> = original_volumes
        .iter()
        .map(|v| runtime_volume_path(&v.name))
        .collect();

    let volume_kinds: BTreeMap<String, String> = original_volumes
        .iter()
        .map(|v| (v.name.clone(), volume_kind(v)))
        .collect();

    let runtime = runtime_container(
        &runtime_name,
        interface,
        originals,
        &original_volumes,
        &added,
        config,
    )?;
    let mut containers = vec![runtime];
    containers.extend(
        originals
            .iter()
            .map(|c| ambassador_container(c, &added.token, config)),
    );

    let mut volumes = original_volumes;
    volumes.push(Volume {
        name: added.storage,
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    volumes.push(podinfo_volume_source(added.podinfo));
    volumes.push(Volume {
        name: added.token,
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Mi".into())),
        }),
        ..Default::default()
    });

    let mut wrapped = pod.clone();
    let annotations = wrapped
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_CONTAINERS.into(), encode_containers(originals));
    annotations.insert(ANNOTATION_VOLUMES.into(), encode_volumes(&volume_paths));
    annotations.insert(
        ANNOTATION_VOLUME_KINDS.into(),
        encode_volume_kinds(&volume_kinds),
    );
    annotations.insert(ANNOTATION_START_MODE.into(), start_mode.as_str().into());
    annotations.insert(ANNOTATION_BYPASS.into(), "true".into());
    wrapped.spec = Some(PodSpec {
        containers,
        volumes: Some(volumes),
        ..spec.clone()
    });
    Ok(wrapped)
}

/// `base`, or `base-1`, `base-2`, ... whichever is not taken.
pub fn free_name(base: &str, taken: &BTreeSet<&str>) -> String {
    if !taken.contains(base) {
        return base.to_owned();
    }
    (1..)
        .map(|i| format!("{base}-{i}"))
        .find(|candidate| !taken.contains(candidate.as_str()))
        .unwrap_or_else(|| base.to_owned())
}

fn check_sidecar_port(
    originals: &[Container],
    interface: Interface,
    sidecar_port: u16,
) -> Result<(), WrapError> {
    for c in originals {
        for p in c.ports.iter().flatten() {
            if p.container_port == i32::from(sidecar_port) {
                return Err(WrapError::SidecarPortTaken {
                    container: c.name.clone(),
                    port: sidecar_port,
                    interface,
                });
            }
        }
    }
    Ok(())
}

/// The union of the original containers' ports, deduplicated by (port, protocol).
fn union_ports(originals: &[Container]) -> Result<Vec<ContainerPort>, WrapError> {
    let mut ports: Vec<ContainerPort> = Vec::new();
    let mut owner_of_name: BTreeMap<String, (String, i32, String)> = BTreeMap::new();
    for c in originals {
        for p in c.ports.iter().flatten() {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            if let Some(name) = &p.name {
                match owner_of_name.get(name) {
                    Some((first, port, proto))
                        if (*port, proto) != (p.container_port, &protocol) =>
                    {
                        return Err(WrapError::PortNameClash {
                            name: name.clone(),
                            first: first.clone(),
                            second: c.name.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        owner_of_name.insert(
                            name.clone(),
                            (c.name.clone(), p.container_port, protocol.clone()),
                        );
                    }
                }
            }
            let duplicate = ports.iter().any(|q| {
                q.container_port == p.container_port
                    && q.protocol.as_deref().unwrap_or("TCP") == protocol
            });
            if !duplicate {
                ports.push(p.clone());
            }
        }
    }
    Ok(ports)
}

/// Requests and limits of the originals summed, plus the configured overhead.
///
/// A container with only a limit is requesting that limit (Kubernetes' defaulting), so it
/// counts as such. If any original has no limit for a resource, the runtime gets none for it
/// either: a sum with an unbounded term is unbounded.
fn runtime_resources(
    originals: &[Container],
    config: &WrapConfig,
) -> Result<Option<ResourceRequirements>, WrapError> {
    check_quantities(originals)?;
    let overhead: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), config.runtime_cpu_overhead.clone()),
        ("memory".to_string(), config.runtime_memory_overhead.clone()),
    ]
    .into_iter()
    .filter(|(_, q)| !q.0.is_empty())
    .collect();

    let resource_names: BTreeSet<String> = originals
        .iter()
        .filter_map(|c| c.resources.as_ref())
        .flat_map(|r| {
            r.requests
                .iter()
                .flatten()
                .chain(r.limits.iter().flatten())
                .map(|(k, _)| k.clone())
        })
        .collect();

    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for resource in &resource_names {
        let mut request_terms: Vec<Quantity> = Vec::new();
        let mut limit_terms: Vec<Quantity> = Vec::new();
        let mut unbounded = false;
        for c in originals {
            let r = c.resources.as_ref();
            let limit = r
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get(resource));
            let request = r
                .and_then(|r| r.requests.as_ref())
                .and_then(|l| l.get(resource))
                .or(limit);
            request_terms.extend(request.cloned());
            match limit {
                Some(l) => limit_terms.push(l.clone()),
                None => unbounded = true,
            }
        }
        request_terms.extend(overhead.get(resource).cloned());
        let sum = |terms: &[Quantity]| {
            quantity::sum(terms).map_err(|reason| WrapError::Quantity {
                container: RUNTIME_CONTAINER.to_owned(),
                reason,
            })
        };
        if !request_terms.is_empty() {
            requests.insert(resource.clone(), sum(&request_terms)?);
        }
        if !unbounded {
            limit_terms.extend(overhead.get(resource).cloned());
            limits.insert(resource.clone(), sum(&limit_terms)?);
        }
    }
    // Overhead requests for resources the originals do not mention.
    for (resource, q) in &overhead {
        requests
            .entry(resource.clone())
            .or_insert_with(|| q.clone());
    }
    if requests.is_empty() && limits.is_empty() {
        return Ok(None);
    }
    Ok(Some(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    }))
}

/// Every request and limit of every original must parse, so an error names its container.
fn check_quantities(originals: &[Container]) -> Result<(), WrapError> {
    for c in originals {
        let Some(r) = c.resources.as_ref() else {
            continue;
        };
        for (_, q) in r.requests.iter().flatten().chain(r.limits.iter().flatten()) {
            quantity::parse_nanos(&q.0).map_err(|reason| WrapError::Quantity {
                container: c.name.clone(),
                reason,
            })?;
        }
    }
    Ok(())
}

fn runtime_container(
    name: &str,
    interface: Interface,
    originals: &[Container],
    volumes: &[Volume],
    added: &AddedVolumes,
    config: &WrapConfig,
) -> Result<Container, WrapError> {
    let AddedVolumes {
        storage: storage_volume,
        podinfo: podinfo_volume,
        token: token_volume,
    } = added;
    let (image, engine, engine_root) = match interface {
        Interface::Pind => (&config.pind_image, "podman", "/var/lib/containers"),
        _ => (&config.dind_image, "docker", "/var/lib/docker"),
    };
    let mut mounts: Vec<VolumeMount> = volumes
        .iter()
        .map(|v| VolumeMount {
            name: v.name.clone(),
            mount_path: runtime_volume_path(&v.name),
            ..Default::default()
        })
        .collect();
    mounts.push(VolumeMount {
        name: storage_volume.to_owned(),
        mount_path: engine_root.to_owned(),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: podinfo_volume.to_owned(),
        mount_path: PODINFO_DIR.to_owned(),
        read_only: Some(true),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: token_volume.to_owned(),
        mount_path: POD_TOKEN_DIR.to_owned(),
        ..Default::default()
    });
    let ports = union_ports(originals)?;
    let mut env = vec![
        env_var("UMS_ENGINE", engine),
        env_var("UMS_ENGINE_ROOT", engine_root),
        env_var("UMS_LISTEN", &format!("0.0.0.0:{}", config.sidecar_port)),
        env_var("UMS_PODINFO", &format!("{PODINFO_DIR}/annotations")),
        env_var("UMS_POD_TOKEN_FILE", POD_TOKEN_FILE),
    ];
    if !config.coordinator_keys.is_empty() {
        env.push(env_var(
            "UMS_COORDINATOR_KEYS",
            &config.coordinator_keys.join(","),
        ));
    }
    if !config.insecure_registries.is_empty() {
        env.push(env_var(
            "UMS_INSECURE_REGISTRIES",
            &config.insecure_registries.join(","),
        ));
    }
    env.extend(forwarded_env(originals));
    Ok(Container {
        name: name.to_owned(),
        image: Some(image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        env: Some(env),
        ports: (!ports.is_empty()).then_some(ports),
        volume_mounts: Some(mounts),
        resources: runtime_resources(originals, config)?,
        security_context: Some(SecurityContext {
            privileged: Some(true),
            // The nested engine needs root even when the pod asks for non-root by default.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..Default::default()
        }),
        readiness_probe: Some(http_probe("/healthz", config.sidecar_port)),
        ..Default::default()
    })
}

/// The originals' `valueFrom` variables that only the kubelet can resolve (Secrets,
/// ConfigMaps, pod fields), re-declared on the runtime container under
/// [`forwarded_env_name`] so the sidecar can pass their values to the nested containers.
/// `resourceFieldRef` is left out: it names the original container's resources, which the
/// sidecar computes from the spec itself.
fn forwarded_env(originals: &[Container]) -> Vec<EnvVar> {
    originals
        .iter()
        .flat_map(|c| {
            c.env.iter().flatten().filter_map(move |e| {
                let from = e.value_from.as_ref()?;
                if from.resource_field_ref.is_some() {
                    return None;
                }
                Some(EnvVar {
                    name: forwarded_env_name(&c.name, &e.name),
                    value: None,
                    value_from: Some(from.clone()),
                })
            })
        })
        .collect()
}

fn ambassador_container(
    original: &Container,
    token_volume: &str,
    config: &WrapConfig,
) -> Container {
    let name = &original.name;
    // Every probe goes to the runtime's sidecar (`/probe/<name>?kind=...`, timings kept): it
    // answers for a nested container that waits for its restore (a passive copy must be ready
    // though nothing listens yet) or is frozen for its dump (never a liveness restart), and runs
    // the original network probe through the pod's shared network namespace while the container
    // runs. Exec probes name commands that only exist in the original image: the container's
    // state answers them.
    let via_runtime = |base: Option<&Probe>, kind: Option<&str>| {
        let path = match kind {
            Some(kind) => format!("/probe/{name}?kind={kind}"),
            None => format!("/probe/{name}"),
        };
        Probe {
            http_get: http_probe(&path, config.sidecar_port).http_get,
            exec: None,
            tcp_socket: None,
            grpc: None,
            ..base.cloned().unwrap_or_default()
        }
    };
    let redirect =
        |probe: Option<&Probe>, kind: &str| probe.map(|p| via_runtime(Some(p), Some(kind)));
    let startup = match original.startup_probe.as_ref() {
        Some(p) => redirect(Some(p), "startup"),
        None => Some(Probe {
            period_seconds: Some(2),
            // Nested image pulls and restores can take minutes.
            failure_threshold: Some(300),
            ..via_runtime(None, None)
        }),
    };
    let readiness = match original.readiness_probe.as_ref() {
        Some(p) => redirect(Some(p), "readiness"),
        None => Some(via_runtime(None, None)),
    };
    Container {
        name: name.clone(),
        image: Some(config.ambassador_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec![
            SIDECAR_BINARY.to_owned(),
            "ambassador".to_owned(),
            name.clone(),
        ]),
        env: Some(vec![
            env_var(
                "UMS_RUNTIME_URL",
                &format!("http://127.0.0.1:{}", config.sidecar_port),
            ),
            env_var("UMS_TOKEN_FILE", POD_TOKEN_FILE),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: token_volume.to_owned(),
            mount_path: POD_TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        }]),
        startup_probe: startup,
        readiness_probe: readiness,
        liveness_probe: redirect(original.liveness_probe.as_ref(), "liveness"),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".into()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: u16) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

/// The downward-API volume with the pod's annotations, labels, name, namespace and uid.
pub fn podinfo_volume_source(name: String) -> Volume {
    let field = |path: &str, field_path: &str| DownwardAPIVolumeFile {
        path: path.to_owned(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field_path.to_owned(),
            api_version: None,
        }),
        ..Default::default()
    };
    Volume {
        name,
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![
                field("annotations", "metadata.annotations"),
                field("labels", "metadata.labels"),
                field("name", "metadata.name"),
                field("namespace", "metadata.namespace"),
                field("uid", "metadata.uid"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "wrap_tests.rs"]
mod tests;
