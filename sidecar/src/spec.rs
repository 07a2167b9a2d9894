//! Translation of a Kubernetes container spec (from `migration-containers`) into what a nested
//! engine needs to create the container. Pure: the environment lookups it needs are passed in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar};
use ums_contract::{forwarded_env_name, runtime_volume_path};

use crate::quantity_bytes;

/// What the engine needs to create one nested container.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NestedSpec {
    pub name: String,
    /// The image as the pod names it; [`NestedSpec::pull_reference`] is what a pull asks for.
    pub image: String,
    /// When the nested engine pulls the image (Kubernetes' `imagePullPolicy` and its default).
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Kubernetes `command`: replaces the image's entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Kubernetes `args`: replaces the image's cmd.
    pub cmd: Option<Vec<String>>,
    /// `NAME=value`, in declaration order.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// Bind mounts `source:target[:ro]` from the runtime container's `/mount/<volume>`.
    pub binds: Vec<String>,
    pub memory_limit_bytes: Option<i64>,
    pub memory_reservation_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub cpu_shares: Option<i64>,
    /// `uid[:gid]`.
    pub user: Option<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub privileged: bool,
    pub read_only_rootfs: bool,
    pub tty: bool,
    pub open_stdin: bool,
    /// `port/protocol` the container declares (informational: nested containers share the
    /// runtime's network namespace, so nothing is published).
    pub exposed_ports: Vec<String>,
}

/// Kubernetes' `imagePullPolicy`, applied by the nested engine as the kubelet applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PullPolicy {
    /// Pull on every create (a moving tag); a failed pull fails the create.
    Always,
    /// Pull only when the engine does not have the image.
    #[default]
    IfNotPresent,
    /// Never pull: the image must already be in the nested engine.
    Never,
}

impl PullPolicy {
    /// The policy the pod asked for, or Kubernetes' default: `Always` for an image without a
    /// tag or with `:latest` (and no digest), `IfNotPresent` otherwise.
    pub fn for_container(declared: Option<&str>, image: &str) -> Result<Self, String> {
        match declared {
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            Some(other) => Err(other.to_owned()),
            None => {
                let (_, tag, digest) = split_reference(image);
                Ok(if digest.is_none() && tag.is_none_or(|t| t == "latest") {
                    PullPolicy::Always
                } else {
                    PullPolicy::IfNotPresent
                })
            }
        }
    }
}

/// `repository[:tag][@digest]` split into its parts (a `:` in the registry host is a port).
fn split_reference(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(i) => (
            &rest[..last_slash + i],
            Some(&rest[last_slash + i + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

impl NestedSpec {
    /// What to ask the engine to pull: the image with `:latest` made explicit when it has
    /// neither tag nor digest (the engines' pull API otherwise pulls every tag).
    pub fn pull_reference(&self) -> String {
        match split_reference(&self.image) {
            (_, None, None) => format!("{}:latest", self.image),
            _ => self.image.clone(),
        }
    }
}

/// A container spec that cannot be run nested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The container has no image.
    #[error("container {container:?} has no image")]
    NoImage { container: String },
    /// `valueFrom` variables whose value is not available inside the pod.
    #[error("container {container:?}: cannot resolve environment variables {names:?} (valueFrom not forwarded to the runtime container: was the pod created through the UMS webhook?)")]
    UnresolvedEnv {
        container: String,
        names: Vec<String>,
    },
    /// A volume mount names a volume the pod does not mount into the runtime container.
    #[error("container {container:?} mounts volume {volume:?}, which is not among the pod's volumes ({known:?})")]
    UnknownVolume {
        container: String,
        volume: String,
        known: Vec<String>,
    },
    /// A resource quantity cannot be read.
    #[error("container {container:?}: invalid {resource} quantity {value:?}")]
    BadQuantity {
        container: String,
        resource: String,
        value: String,
    },
    /// A subPath escapes its volume.
    #[error(
        "container {container:?}: subPath {sub_path:?} must be relative and stay inside the volume"
    )]
    BadSubPath { container: String, sub_path: String },
    /// `imagePullPolicy` is not one of Kubernetes' three values.
    #[error(
        "container {container:?}: imagePullPolicy {value:?} is not Always, IfNotPresent or Never"
    )]
    BadPullPolicy { container: String, value: String },
}

/// Translates `container`. `forwarded_env` looks up the runtime container's own environment
/// (see [`forwarded_env_name`]); `volumes` are the mount points of `migration-volumes`.
pub fn translate(
    container: &Container,
    volumes: &[String],
    forwarded_env: &dyn Fn(&str) -> Option<String>,
) -> Result<NestedSpec, SpecError> {
    let name = container.name.clone();
    let image = container
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| SpecError::NoImage {
            container: name.clone(),
        })?;
    let pull_policy = PullPolicy::for_container(container.image_pull_policy.as_deref(), &image)
        .map_err(|value| SpecError::BadPullPolicy {
            container: name.clone(),
            value,
        })?;
    let env = translate_env(container, forwarded_env)?;
    let binds = translate_mounts(container, volumes)?;

    let resources = container.resources.as_ref();
    let quantity = |map: Option<
        &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
                    resource: &str,
                    to: fn(&str) -> Option<i64>|
     -> Result<Option<i64>, SpecError> {
        match map.and_then(|m| m.get(resource)) {
            None => Ok(None),
            Some(q) => to(&q.0).map(Some).ok_or_else(|| SpecError::BadQuantity {
                container: name.clone(),
                resource: resource.to_owned(),
                value: q.0.clone(),
            }),
        }
    };
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let memory_limit_bytes = quantity(limits, "memory", quantity_bytes::bytes)?;
    let memory_reservation_bytes = quantity(requests, "memory", quantity_bytes::bytes)?;
    let nano_cpus = quantity(limits, "cpu", quantity_bytes::nano_cpus)?;
    // Kubernetes maps a CPU request to cgroup shares: 1 CPU = 1024 shares, minimum 2.
    let cpu_shares = quantity(requests, "cpu", quantity_bytes::nano_cpus)?
        .map(|n| (n * 1024 / 1_000_000_000).max(2));

    let security = container.security_context.as_ref();
    let user = security.and_then(|s| {
        s.run_as_user.map(|uid| match s.run_as_group {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        })
    });
    let capabilities = security.and_then(|s| s.capabilities.as_ref());
    let caps = |list: Option<&Vec<String>>| -> Vec<String> { list.cloned().unwrap_or_default() };

    let exposed_ports = container
        .ports
        .iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p.container_port,
                p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase()
            )
        })
        .collect();

    Ok(NestedSpec {
        name: name.clone(),
        image,
        pull_policy,
        entrypoint: container.command.clone(),
        cmd: container.args.clone(),
        env,
        working_dir: container.working_dir.clone().filter(|w| !w.is_empty()),
        binds,
        memory_limit_bytes,
        memory_reservation_bytes,
        nano_cpus,
        cpu_shares,
        user,
        cap_add: caps(capabilities.and_then(|c| c.add.as_ref())),
        cap_drop: caps(capabilities.and_then(|c| c.drop.as_ref())),
        privileged: security.and_then(|s| s.privileged).unwrap_or(false),
        read_only_rootfs: security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        tty: container.tty.unwrap_or(false),
        open_stdin: container.stdin.unwrap_or(false),
        exposed_ports,
    })
}

fn translate_env(
    container: &Container,
    forwarded_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, SpecError> {
    let mut env = Vec::new();
    let mut unresolved = Vec::new();
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten()
    {
        let resolved = match (value, value_from) {
            (_, Some(from)) => match &from.resource_field_ref {
                Some(r) => resource_field(
                    container,
                    &r.resource,
                    r.divisor.as_ref().map(|d| d.0.as_str()),
                ),
                None => forwarded_env(&forwarded_env_name(&container.name, name)),
            },
            (Some(v), None) => Some(expand_references(v, &env)),
            (None, None) => Some(String::new()),
        };
        match resolved {
            Some(v) => env.push(format!("{name}={v}")),
            None => unresolved.push(name.clone()),
        }
    }
    if unresolved.is_empty() {
        Ok(env)
    } else {
        Err(SpecError::UnresolvedEnv {
            container: container.name.clone(),
            names: unresolved,
        })
    }
}

/// Kubernetes' `$(VAR)` expansion against the variables defined before; `$$` escapes.
fn expand_references(value: &str, defined: &[String]) -> String {
    let lookup = |name: &str| {
        defined.iter().rev().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        })
    };
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `resourceFieldRef` of the container's own resources, as the kubelet computes it (rounded up
/// to the divisor). Unset limits would need the node's allocatable, which the pod cannot see.
fn resource_field(container: &Container, resource: &str, divisor: Option<&str>) -> Option<String> {
    let (kind, name) = resource.split_once('.')?;
    let resources = container.resources.as_ref()?;
    let map = match kind {
        "limits" => resources.limits.as_ref()?,
        "requests" => resources.requests.as_ref()?,
        _ => return None,
    };
    let value = quantity_bytes::nanos(&map.get(name)?.0)?;
    let divisor = quantity_bytes::nanos(divisor.unwrap_or("1"))?;
    if divisor <= 0 {
        return None;
    }
    Some(((value + divisor - 1) / divisor).to_string())
}

fn translate_mounts(container: &Container, volumes: &[String]) -> Result<Vec<String>, SpecError> {
    let mut binds = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source_root = runtime_volume_path(&mount.name);
        if !volumes.contains(&source_root) {
            return Err(SpecError::UnknownVolume {
                container: container.name.clone(),
                volume: mount.name.clone(),
                known: volumes.to_vec(),
            });
        }
        let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            None => source_root,
            Some(sub) => {
                let escapes = sub.starts_with('/')
                    || std::path::Path::new(sub)
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir));
                if escapes {
                    return Err(SpecError::BadSubPath {
                        container: container.name.clone(),
                        sub_path: sub.to_owned(),
                    });
                }
                format!("{source_root}/{sub}")
            }
        };
        let read_only = if mount.read_only.unwrap_or(false) {
            ":ro"
        } else {
            ""
        };
        binds.push(format!("{source}:{}{read_only}", mount.mount_path));
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn command_args_env_workdir_and_resources_translate() {
        let c = container(json!({
            "name": "web", "image": "shop/web:2",
            "command": ["/bin/web"], "args": ["--port", "$(PORT)"],
            "workingDir": "/srv",
            "env": [
                {"name": "PORT", "value": "8080"},
                {"name": "URL", "value": "http://localhost:$(PORT)/x $$(PORT) $(MISSING)"},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}
            ],
            "resources": {"limits": {"cpu": "1500m", "memory": "256Mi"}, "requests": {"cpu": "250m", "memory": "128Mi"}},
            "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
            "securityContext": {"runAsUser": 1000, "runAsGroup": 2000, "readOnlyRootFilesystem": true,
                                "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}
        }));
        let forwarded =
            |name: &str| (name == "UMS_ENV__web__SECRET").then(|| "hunter2".to_string());
        let spec = translate(&c, &[], &forwarded).unwrap();
        assert_eq!(spec.entrypoint.as_deref().unwrap(), ["/bin/web"]);
        // Kubernetes expands $(VAR) in args at container start; the engine does not, so args
        // are passed through as written (the nested engine runs them verbatim, like the kubelet
        // would after expansion, which only the kubelet's env knows).
        assert_eq!(spec.cmd.as_deref().unwrap(), ["--port", "$(PORT)"]);
        assert_eq!(
            spec.env,
            [
                "PORT=8080",
                "URL=http://localhost:8080/x $(PORT) $(MISSING)",
                "SECRET=hunter2",
                "CPU=1500",
                "MEM=256"
            ]
        );
        assert_eq!(spec.working_dir.as_deref(), Some("/srv"));
        assert_eq!(spec.memory_limit_bytes, Some(256 << 20));
        assert_eq!(spec.memory_reservation_bytes, Some(128 << 20));
        assert_eq!(spec.nano_cpus, Some(1_500_000_000));
        assert_eq!(spec.cpu_shares, Some(256));
        assert_eq!(spec.user.as_deref(), Some("1000:2000"));
        assert!(spec.read_only_rootfs);
        assert_eq!(spec.cap_add, ["NET_ADMIN"]);
        assert_eq!(spec.cap_drop, ["ALL"]);
        assert_eq!(spec.exposed_ports, ["8080/tcp", "53/udp"]);
    }

    #[test]
    fn unresolvable_value_from_is_reported_by_name() {
        let c = container(json!({"name": "a", "image": "i", "env": [
            {"name": "OK", "value": "1"},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "NODE_CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
        ]}));
        let err = translate(&c, &[], &no_env).unwrap_err();
        assert_eq!(
            err,
            SpecError::UnresolvedEnv {
                container: "a".into(),
                names: vec!["PASSWORD".into(), "NODE_CPU".into()]
            }
        );
    }

    #[test]
    fn mounts_come_from_the_runtime_volume_paths() {
        let c = container(json!({"name": "a", "image": "i", "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "config", "mountPath": "/etc/app", "readOnly": true},
            {"name": "data", "mountPath": "/cache", "subPath": "cache/v1"}
        ]}));
        let volumes = vec!["/mount/data".to_string(), "/mount/config".to_string()];
        let spec = translate(&c, &volumes, &no_env).unwrap();
        assert_eq!(
            spec.binds,
            [
                "/mount/data:/data",
                "/mount/config:/etc/app:ro",
                "/mount/data/cache/v1:/cache"
            ]
        );
        let escaping = container(json!({"name": "a", "image": "i", "volumeMounts": [
            {"name": "data", "mountPath": "/x", "subPath": "../../etc"}
        ]}));
        assert!(matches!(
            translate(&escaping, &volumes, &no_env),
            Err(SpecError::BadSubPath { .. })
        ));
        let unknown = container(
            json!({"name": "a", "image": "i", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
        );
        assert!(matches!(
            translate(&unknown, &volumes, &no_env),
            Err(SpecError::UnknownVolume { .. })
        ));
    }

    #[test]
    fn pull_policy_follows_kubernetes_defaults() {
        let policy = |declared, image| PullPolicy::for_container(declared, image).unwrap();
        assert_eq!(policy(None, "nginx"), PullPolicy::Always);
        assert_eq!(policy(None, "nginx:latest"), PullPolicy::Always);
        assert_eq!(policy(None, "nginx:1.27"), PullPolicy::IfNotPresent);
        assert_eq!(policy(None, "10.0.0.1:5000/shop/web"), PullPolicy::Always);
        assert_eq!(
            policy(None, "10.0.0.1:5000/shop/web:2"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(policy(None, "web@sha256:abcd"), PullPolicy::IfNotPresent);
        assert_eq!(policy(Some("Never"), "nginx"), PullPolicy::Never);
        assert_eq!(policy(Some("Always"), "nginx:1"), PullPolicy::Always);
        assert!(PullPolicy::for_container(Some("Sometimes"), "nginx").is_err());
        let c = container(json!({"name": "a", "image": "i", "imagePullPolicy": "Sometimes"}));
        let error = translate(&c, &[], &|_| None).unwrap_err();
        assert!(error.to_string().contains("Sometimes"), "{error}");
    }

    #[test]
    fn pull_reference_makes_latest_explicit() {
        let spec = |image: &str| NestedSpec {
            image: image.into(),
            ..Default::default()
        };
        assert_eq!(spec("nginx").pull_reference(), "nginx:latest");
        assert_eq!(
            spec("10.0.0.1:5000/web").pull_reference(),
            "10.0.0.1:5000/web:latest"
        );
        assert_eq!(spec("web:2").pull_reference(), "web:2");
        assert_eq!(spec("web@sha256:ab").pull_reference(), "web@sha256:ab");
    }

    #[test]
    fn missing_image_is_an_error() {
        let c = container(json!({"name": "a"}));
        assert_eq!(
            translate(&c, &[], &no_env).unwrap_err(),
            SpecError::NoImage {
                container: "a".into()
            }
        );
    }
}
