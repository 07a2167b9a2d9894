//! A pod's container as Docker runs it: the Kubernetes container spec translated the way a
//! kubelet would (command/args, env with valueFrom, volume mounts, security context), joined to
//! the pod's sandbox network namespace.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::models::{ContainerCreateBody, HostConfig};
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

/// `privileged: true`, as this machine allows it: `--privileged` itself is refused here (the
/// sandbox's capability bounding set lacks CAP_SYS_RESOURCE, so runc cannot apply the caps);
/// everything else it means is granted explicitly. On a real node the kubelet passes privileged.
fn privileged(host: &mut HostConfig) {
    host.cap_add = Some(vec!["ALL".into()]);
    host.cap_drop = Some(vec!["SYS_RESOURCE".into()]);
    host.security_opt = Some(vec![
        "seccomp=unconfined".into(),
        "apparmor=unconfined".into(),
    ]);
    // The CLI's `--security-opt systempaths=unconfined`: nothing masked, nothing read-only.
    host.masked_paths = Some(Vec::new());
    host.readonly_paths = Some(Vec::new());
    host.device_cgroup_rules = Some(vec!["a *:* rwm".into()]);
    host.binds
        .get_or_insert_with(Vec::new)
        .push("/sys/fs/cgroup:/sys/fs/cgroup:rw".into());
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
    pub sandbox_id: &'a str,
    pub volumes: &'a HashMap<String, PathBuf>,
}

pub async fn create_body(
    context: &PodContext<'_>,
    container: &Container,
) -> Result<ContainerCreateBody, ConfigError> {
    let error = |message: String| ConfigError {
        container: container.name.clone(),
        message,
    };
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        let value = resolve_env(context, var).await.map_err(error)?;
        env.push(format!("{}={value}", var.name));
    }
    let mut binds = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = context
            .volumes
            .get(&mount.name)
            .ok_or_else(|| error(format!("mounts unknown volume {:?}", mount.name)))?;
        let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => source.join(sub),
            None => source.clone(),
        };
        let mode = if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        binds.push(format!("{}:{}:{mode}", source.display(), mount.mount_path));
    }
    let security = container.security_context.as_ref();
    let mut host = HostConfig {
        network_mode: Some(format!("container:{}", context.sandbox_id)),
        binds: Some(binds),
        readonly_rootfs: security.and_then(|s| s.read_only_root_filesystem),
        ..Default::default()
    };
    if security.and_then(|s| s.privileged) == Some(true) {
        privileged(&mut host);
    } else if let Some(capabilities) = security.and_then(|s| s.capabilities.as_ref()) {
        host.cap_add = capabilities.add.clone();
        host.cap_drop = capabilities.drop.clone();
    }
    let user = security.and_then(|s| {
        s.run_as_user.map(|uid| match s.run_as_group {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        })
    });
    let uid = context.pod.metadata.uid.clone().unwrap_or_default();
    Ok(ContainerCreateBody {
        image: container.image.clone(),
        entrypoint: container.command.clone(),
        cmd: container.args.clone(),
        env: Some(env),
        working_dir: container.working_dir.clone(),
        user,
        tty: container.tty,
        open_stdin: container.stdin,
        labels: Some(labels(context.node_name, &uid)),
        host_config: Some(host),
        ..Default::default()
    })
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
