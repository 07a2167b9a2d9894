//! A pod's container as the kubelet prepares it for any runtime: the Kubernetes container spec
//! resolved into a [`ContainerPlan`] (command/args, env with valueFrom, volume mounts, security
//! context), which `docker.rs` and `cri.rs` hand to their runtime.

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::Api;

/// Label on everything the agent creates: the pod's uid.
pub const POD_LABEL: &str = "io.ums-rs.node-agent.pod";
/// Label on everything the agent creates: the node's name.
pub const NODE_LABEL: &str = "io.ums-rs.node-agent.node";

/// The labels of a pod's containers on `node`.
pub fn labels(node: &str, uid: &str) -> HashMap<String, String> {
    HashMap::from([
        (POD_LABEL.to_owned(), uid.to_owned()),
        (NODE_LABEL.to_owned(), node.to_owned()),
    ])
}

/// One container, resolved: what a runtime needs to create it.
#[derive(Debug, Clone, Default)]
pub struct ContainerPlan {
    /// The container's name in the pod.
    pub name: String,
    pub image: String,
    /// Always, IfNotPresent or Never, defaulted as Kubernetes defaults it.
    pub pull_policy: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<MountPlan>,
    pub working_dir: Option<String>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub readonly_rootfs: bool,
    /// The seccomp profile type asked for (`Unconfined`, `RuntimeDefault`, `Localhost`), the
    /// container's or else the pod's; none: the runtime's default for an unset profile.
    pub seccomp: Option<String>,
    /// `allowPrivilegeEscalation: false`: the runtime sets no_new_privs.
    pub no_new_privs: bool,
    pub tty: bool,
    pub stdin: bool,
    /// The pod's uid and this node's name, for the runtime's labels.
    pub labels: HashMap<String, String>,
}

/// A volume mount: a directory or file of the node at a path in the container.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// A container that cannot be created (the kubelet's CreateContainerConfigError).
#[derive(Debug, thiserror::Error)]
#[error("container {container:?}: {message}")]
pub struct ConfigError {
    pub container: String,
    pub message: String,
}

/// What the pod's containers need from the running pod.
#[allow(missing_debug_implementations)] // kube::Client is not Debug
pub struct PodContext<'a> {
    pub client: &'a kube::Client,
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub node_name: &'a str,
    pub volumes: &'a HashMap<String, PathBuf>,
}

/// Resolves the container's spec against the running pod (the kubelet's
/// CreateContainerConfigError when it cannot).
pub async fn plan(
    context: &PodContext<'_>,
    container: &Container,
) -> Result<ContainerPlan, ConfigError> {
    let error = |message: String| ConfigError {
        container: container.name.clone(),
        message,
    };
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        let value = resolve_env(context, var).await.map_err(error)?;
        env.push((var.name.clone(), value));
    }
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = context
            .volumes
            .get(&mount.name)
            .ok_or_else(|| error(format!("mounts unknown volume {:?}", mount.name)))?;
        let host_path = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => source.join(sub),
            None => source.clone(),
        };
        mounts.push(MountPlan {
            host_path,
            container_path: mount.mount_path.clone(),
            read_only: mount.read_only == Some(true),
        });
    }
    let security = container.security_context.as_ref();
    let capabilities = security.and_then(|s| s.capabilities.as_ref());
    let uid = context.pod.metadata.uid.clone().unwrap_or_default();
    Ok(ContainerPlan {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        pull_policy: pull_policy(container),
        command: container.command.clone(),
        args: container.args.clone(),
        env,
        mounts,
        working_dir: container.working_dir.clone(),
        privileged: security.and_then(|s| s.privileged) == Some(true),
        cap_add: capabilities.and_then(|c| c.add.clone()).unwrap_or_default(),
        cap_drop: capabilities
            .and_then(|c| c.drop.clone())
            .unwrap_or_default(),
        run_as_user: security.and_then(|s| s.run_as_user),
        run_as_group: security.and_then(|s| s.run_as_group),
        readonly_rootfs: security.and_then(|s| s.read_only_root_filesystem) == Some(true),
        seccomp: security
            .and_then(|s| s.seccomp_profile.as_ref())
            .or_else(|| {
                context
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref())
                    .and_then(|s| s.seccomp_profile.as_ref())
            })
            .map(|p| p.type_.clone()),
        no_new_privs: security.and_then(|s| s.allow_privilege_escalation) == Some(false),
        tty: container.tty == Some(true),
        stdin: container.stdin == Some(true),
        labels: labels(context.node_name, &uid),
    })
}

/// The container's image pull policy: as given, else Always for an image without a tag or
/// tagged `latest`, IfNotPresent for others (Kubernetes' defaulting).
fn pull_policy(container: &Container) -> String {
    if let Some(policy) = container
        .image_pull_policy
        .clone()
        .filter(|p| !p.is_empty())
    {
        return policy;
    }
    let image = container.image.as_deref().unwrap_or_default();
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    let pinned = image.contains('@');
    match last.split_once(':') {
        Some((_, tag)) if tag != "latest" || pinned => "IfNotPresent".into(),
        None if pinned => "IfNotPresent".into(),
        _ => "Always".into(),
    }
}

async fn resolve_env(context: &PodContext<'_>, var: &EnvVar) -> Result<String, String> {
    let Some(from) = &var.value_from else {
        return Ok(var.value.clone().unwrap_or_default());
    };
    let pod = context.pod;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    if let Some(field) = &from.field_ref {
        let meta = &pod.metadata;
        let path = field.field_path.as_str();
        let keyed = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix("']"))
                .map(str::to_owned)
        };
        let value = match path {
            "metadata.name" => meta.name.clone(),
            "metadata.namespace" => meta.namespace.clone(),
            "metadata.uid" => meta.uid.clone(),
            "spec.nodeName" => Some(context.node_name.to_owned()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            "status.podIP" | "status.hostIP" => Some(context.pod_ip.to_owned()),
            _ => {
                let lookup = |map: Option<&std::collections::BTreeMap<String, String>>,
                              key: String| {
                    map.and_then(|m| m.get(&key).cloned()).unwrap_or_default()
                };
                if let Some(key) = keyed("metadata.annotations['") {
                    Some(lookup(meta.annotations.as_ref(), key))
                } else {
                    keyed("metadata.labels['").map(|key| lookup(meta.labels.as_ref(), key))
                }
            }
        };
        return value.ok_or_else(|| format!("env {}: fieldRef {path} is not provided", var.name));
    }
    if let Some(key) = &from.secret_key_ref {
        let secret = Api::<Secret>::namespaced(context.client.clone(), &namespace)
            .get(&key.name)
            .await
            .map_err(|e| format!("env {}: secret {}: {e}", var.name, key.name))?;
        let bytes = secret
            .data
            .and_then(|d| d.get(&key.key).cloned())
            .ok_or_else(|| {
                format!(
                    "env {}: secret {} has no key {}",
                    var.name, key.name, key.key
                )
            })?;
        return String::from_utf8(bytes.0).map_err(|_| format!("env {}: not UTF-8", var.name));
    }
    if let Some(key) = &from.config_map_key_ref {
        let map = Api::<ConfigMap>::namespaced(context.client.clone(), &namespace)
            .get(&key.name)
            .await
            .map_err(|e| format!("env {}: configMap {}: {e}", var.name, key.name))?;
        return map
            .data
            .and_then(|d| d.get(&key.key).cloned())
            .ok_or_else(|| {
                format!(
                    "env {}: configMap {} has no key {}",
                    var.name, key.name, key.key
                )
            });
    }
    Err(format!(
        "env {}: this valueFrom kind is not provided (README)",
        var.name
    ))
}
