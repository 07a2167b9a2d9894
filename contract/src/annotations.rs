//! The pod annotations of the migration contract (UMS-compatible names and values).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Container, Volume};

/// `dind`, `pind` (container-level) or `ff` (service-level). Set by the user.
pub const ANNOTATION_INTERFACE: &str = "migration-interface";
/// `active`, `passive`, `null` or `fail`. Set by the user or by a migration.
pub const ANNOTATION_START_MODE: &str = "migration-start-mode";
/// JSON array of the pod's original containers. Set by the webhook, read by the sidecar.
pub const ANNOTATION_CONTAINERS: &str = "migration-containers";
/// JSON array of volume mount points. Set by the webhook.
pub const ANNOTATION_VOLUMES: &str = "migration-volumes";
/// JSON object from each pod volume's name to its kind (the `Volume` source field: `emptyDir`,
/// `persistentVolumeClaim`, `configMap`, ...). Set by the webhook; decides which volumes travel
/// with a migration by default (see [`travels_by_default`]). Not in UMS: pods wrapped without
/// it carry no volume unless a migration names it.
pub const ANNOTATION_VOLUME_KINDS: &str = "migration-volume-kinds";
/// Present when the pod is already prepared: mutation is then a no-op.
pub const ANNOTATION_BYPASS: &str = "migration-bypass";
/// Present while a migration of the pod is in progress.
pub const ANNOTATION_ID: &str = "migration-id";
/// Why a cluster admin released a migration's lock by hand (set in the same update that
/// removes `migration-id`; the validating webhook lets only its override groups do that).
pub const ANNOTATION_LOCK_RELEASED: &str = "migration.ums-rs.io/lock-released";

/// An annotation of the contract that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnotationError {
    /// `migration-interface` holds a value that is not one of the accepted ones.
    #[error("unsupported value {value:?} for annotation {ANNOTATION_INTERFACE}: accepted values are \"dind\", \"pind\" and \"ff\"")]
    UnknownInterface { value: String },
    /// `migration-start-mode` holds a value that is not one of the accepted ones.
    #[error("unsupported value {value:?} for annotation {ANNOTATION_START_MODE}: accepted values are \"active\", \"passive\", \"null\" and \"fail\"")]
    UnknownStartMode { value: String },
    /// `migration-containers` is not a JSON array of Kubernetes containers.
    #[error("annotation {ANNOTATION_CONTAINERS} is not a JSON array of containers: {reason}")]
    BadContainers { reason: String },
    /// `migration-containers` is present but empty.
    #[error("annotation {ANNOTATION_CONTAINERS} lists no containers")]
    NoContainers,
    /// `migration-volumes` is not a JSON array of strings.
    #[error("annotation {ANNOTATION_VOLUMES} is not a JSON array of paths: {reason}")]
    BadVolumes { reason: String },
    /// `migration-volume-kinds` is not a JSON object of strings.
    #[error("annotation {ANNOTATION_VOLUME_KINDS} is not a JSON object from volume names to kinds: {reason}")]
    BadVolumeKinds { reason: String },
    /// A wrapped pod (dind/pind with `migration-bypass`) lacks its container list.
    #[error("pod is marked {ANNOTATION_BYPASS} with {ANNOTATION_INTERFACE}={interface} but has no {ANNOTATION_CONTAINERS} annotation")]
    MissingContainers { interface: Interface },
    /// `migration-id` is present but empty.
    #[error("annotation {ANNOTATION_ID} is empty")]
    EmptyMigrationId,
}

/// How a pod is made migratable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interface {
    /// Docker-in-Docker: containers run nested in a Docker engine inside the runtime container.
    Dind,
    /// Podman-in-Podman: containers run nested in Podman inside the runtime container.
    Pind,
    /// Service-level ("fast-freeze"): containers run as they are, prepared for CRIU.
    Ff,
}

impl Interface {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Dind => "dind",
            Interface::Pind => "pind",
            Interface::Ff => "ff",
        }
    }

    /// Whether the pod's containers are wrapped into a runtime container.
    pub fn is_nested(self) -> bool {
        matches!(self, Interface::Dind | Interface::Pind)
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interface {
    type Err = AnnotationError;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "dind" => Ok(Interface::Dind),
            "pind" => Ok(Interface::Pind),
            "ff" => Ok(Interface::Ff),
            other => Err(AnnotationError::UnknownInterface {
                value: other.to_owned(),
            }),
        }
    }
}

/// What the sidecar does with the nested containers when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StartMode {
    /// Create and start the nested containers.
    #[default]
    Active,
    /// Create only: the pod is the target of a restore.
    Passive,
    /// Do nothing.
    Null,
    /// Refuse to start.
    Fail,
}

impl StartMode {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Active => "active",
            StartMode::Passive => "passive",
            StartMode::Null => "null",
            StartMode::Fail => "fail",
        }
    }
}

impl fmt::Display for StartMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StartMode {
    type Err = AnnotationError;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "active" => Ok(StartMode::Active),
            "passive" => Ok(StartMode::Passive),
            "null" => Ok(StartMode::Null),
            "fail" => Ok(StartMode::Fail),
            other => Err(AnnotationError::UnknownStartMode {
                value: other.to_owned(),
            }),
        }
    }
}

/// The migration annotations of one pod, parsed. Absent annotations are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationAnnotations {
    pub interface: Option<Interface>,
    pub start_mode: Option<StartMode>,
    pub containers: Option<Vec<Container>>,
    pub volumes: Option<Vec<String>>,
    /// Volume name -> kind (`migration-volume-kinds`).
    pub volume_kinds: Option<BTreeMap<String, String>>,
    pub bypass: bool,
    pub migration_id: Option<String>,
}

impl MigrationAnnotations {
    /// Parses the contract's annotations out of a pod's annotation map; every value present must
    /// be valid. Unrelated annotations are ignored.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, AnnotationError> {
        let interface = annotations
            .get(ANNOTATION_INTERFACE)
            .map(|v| v.parse::<Interface>())
            .transpose()?;
        let start_mode = annotations
            .get(ANNOTATION_START_MODE)
            .map(|v| v.parse::<StartMode>())
            .transpose()?;
        let containers = annotations
            .get(ANNOTATION_CONTAINERS)
            .map(|v| parse_containers(v))
            .transpose()?;
        let volumes = annotations
            .get(ANNOTATION_VOLUMES)
            .map(|v| parse_volumes(v))
            .transpose()?;
        let volume_kinds = annotations
            .get(ANNOTATION_VOLUME_KINDS)
            .map(|v| parse_volume_kinds(v))
            .transpose()?;
        let migration_id = match annotations.get(ANNOTATION_ID) {
            Some(id) if id.trim().is_empty() => return Err(AnnotationError::EmptyMigrationId),
            Some(id) => Some(id.clone()),
            None => None,
        };
        let parsed = MigrationAnnotations {
            interface,
            start_mode,
            containers,
            volumes,
            volume_kinds,
            bypass: annotations.contains_key(ANNOTATION_BYPASS),
            migration_id,
        };
        if let (Some(interface), true, None) = (parsed.interface, parsed.bypass, &parsed.containers)
        {
            if interface.is_nested() {
                return Err(AnnotationError::MissingContainers { interface });
            }
        }
        Ok(parsed)
    }

    /// The start mode, with UMS's default (`active`) when the annotation is absent.
    pub fn start_mode_or_default(&self) -> StartMode {
        self.start_mode.unwrap_or_default()
    }
}

/// Parses `migration-containers`: a non-empty JSON array of Kubernetes containers.
pub fn parse_containers(value: &str) -> Result<Vec<Container>, AnnotationError> {
    let containers: Vec<Container> =
        serde_json::from_str(value).map_err(|e| AnnotationError::BadContainers {
            reason: e.to_string(),
        })?;
    if containers.is_empty() {
        return Err(AnnotationError::NoContainers);
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &containers {
        if c.name.is_empty() {
            return Err(AnnotationError::BadContainers {
                reason: "a container has no name".into(),
            });
        }
        if !seen.insert(c.name.as_str()) {
            return Err(AnnotationError::BadContainers {
                reason: format!("container name {:?} appears twice", c.name),
            });
        }
    }
    Ok(containers)
}

/// Serializes the original containers for `migration-containers`.
pub fn encode_containers(containers: &[Container]) -> String {
    // Serializing k8s-openapi types to a string cannot fail: they hold only strings, numbers,
    // maps and lists.
    serde_json::to_string(containers).unwrap_or_else(|_| "[]".to_owned())
}

/// Parses `migration-volumes`: a JSON array of absolute paths.
pub fn parse_volumes(value: &str) -> Result<Vec<String>, AnnotationError> {
    let volumes: Vec<String> =
        serde_json::from_str(value).map_err(|e| AnnotationError::BadVolumes {
            reason: e.to_string(),
        })?;
    if let Some(bad) = volumes.iter().find(|p| !p.starts_with('/')) {
        return Err(AnnotationError::BadVolumes {
            reason: format!("{bad:?} is not an absolute path"),
        });
    }
    Ok(volumes)
}

/// Serializes mount points for `migration-volumes`.
pub fn encode_volumes(paths: &[String]) -> String {
    serde_json::to_string(paths).unwrap_or_else(|_| "[]".to_owned())
}

/// Parses `migration-volume-kinds`: a JSON object from volume names to kinds.
pub fn parse_volume_kinds(value: &str) -> Result<BTreeMap<String, String>, AnnotationError> {
    serde_json::from_str(value).map_err(|e| AnnotationError::BadVolumeKinds {
        reason: e.to_string(),
    })
}

/// Serializes volume kinds for `migration-volume-kinds`.
pub fn encode_volume_kinds(kinds: &BTreeMap<String, String>) -> String {
    serde_json::to_string(kinds).unwrap_or_else(|_| "{}".to_owned())
}

/// The kind of a pod volume: the name of its source field (`emptyDir`, `hostPath`,
/// `persistentVolumeClaim`, `configMap`, ...), `unknown` if it has none.
pub fn volume_kind(volume: &Volume) -> String {
    match serde_json::to_value(volume) {
        Ok(serde_json::Value::Object(fields)) => fields
            .keys()
            .find(|k| k.as_str() != "name")
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned()),
        _ => "unknown".to_owned(),
    }
}

/// Whether a volume of `kind` travels with a migration unless the migration says otherwise:
/// only the pod-local kinds, whose content exists nowhere else and which the destination's
/// kubelet creates empty (`emptyDir`, and `ephemeral`, a claim made for this pod alone). A
/// volume both sides share (a network claim, NFS, CSI), one the kubelet fills from the API
/// (`configMap`, `secret`, `projected`, `downwardAPI`) or a node's directory (`hostPath`) stays.
pub fn travels_by_default(kind: &str) -> bool {
    matches!(kind, "emptyDir" | "ephemeral")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interface_values_round_trip() {
        for i in [Interface::Dind, Interface::Pind, Interface::Ff] {
            assert_eq!(i.as_str().parse::<Interface>().unwrap(), i);
        }
        let err = "docker".parse::<Interface>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"docker\""), "{msg}");
        assert!(msg.contains("dind") && msg.contains("pind") && msg.contains("ff"));
    }

    #[test]
    fn start_mode_values_round_trip_and_default_is_active() {
        for m in [
            StartMode::Active,
            StartMode::Passive,
            StartMode::Null,
            StartMode::Fail,
        ] {
            assert_eq!(m.as_str().parse::<StartMode>().unwrap(), m);
        }
        assert_eq!(
            MigrationAnnotations::default().start_mode_or_default(),
            StartMode::Active
        );
        let msg = "Active".parse::<StartMode>().unwrap_err().to_string();
        assert!(
            msg.contains("\"Active\"") && msg.contains("passive"),
            "{msg}"
        );
    }

    #[test]
    fn parse_reads_every_annotation() {
        let parsed = MigrationAnnotations::parse(&map(&[
            (ANNOTATION_INTERFACE, "pind"),
            (ANNOTATION_START_MODE, "passive"),
            (ANNOTATION_CONTAINERS, r#"[{"name":"a","image":"busybox"}]"#),
            (ANNOTATION_VOLUMES, r#"["/mount/data"]"#),
            (ANNOTATION_VOLUME_KINDS, r#"{"data":"emptyDir"}"#),
            (ANNOTATION_BYPASS, "true"),
            (ANNOTATION_ID, "m-1"),
            ("unrelated", "x"),
        ]))
        .unwrap();
        assert_eq!(parsed.interface, Some(Interface::Pind));
        assert_eq!(parsed.start_mode, Some(StartMode::Passive));
        assert_eq!(parsed.containers.as_ref().unwrap()[0].name, "a");
        assert_eq!(parsed.volumes.unwrap(), vec!["/mount/data".to_string()]);
        assert_eq!(parsed.volume_kinds.unwrap()["data"], "emptyDir");
        assert!(parsed.bypass);
        assert_eq!(parsed.migration_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn parse_rejects_bad_values_with_the_annotation_named() {
        let cases = [
            (map(&[(ANNOTATION_CONTAINERS, "{}")]), ANNOTATION_CONTAINERS),
            (map(&[(ANNOTATION_CONTAINERS, "[]")]), ANNOTATION_CONTAINERS),
            (
                map(&[(ANNOTATION_CONTAINERS, r#"[{"image":"x"}]"#)]),
                ANNOTATION_CONTAINERS,
            ),
            (
                map(&[(ANNOTATION_CONTAINERS, r#"[{"name":"a"},{"name":"a"}]"#)]),
                ANNOTATION_CONTAINERS,
            ),
            (map(&[(ANNOTATION_VOLUMES, "[1]")]), ANNOTATION_VOLUMES),
            (
                map(&[(ANNOTATION_VOLUME_KINDS, r#"["data"]"#)]),
                ANNOTATION_VOLUME_KINDS,
            ),
            (
                map(&[(ANNOTATION_VOLUMES, r#"["rel"]"#)]),
                ANNOTATION_VOLUMES,
            ),
            (map(&[(ANNOTATION_ID, " ")]), ANNOTATION_ID),
            (
                map(&[(ANNOTATION_INTERFACE, "dind"), (ANNOTATION_BYPASS, "true")]),
                ANNOTATION_CONTAINERS,
            ),
        ];
        for (annotations, named) in cases {
            let err = MigrationAnnotations::parse(&annotations).unwrap_err();
            assert!(err.to_string().contains(named), "{err} should name {named}");
        }
    }

    #[test]
    fn containers_round_trip_through_the_annotation() {
        let c = Container {
            name: "memhog".into(),
            image: Some("memhog:1".into()),
            args: Some(vec!["--mib".into(), "256".into()]),
            ..Default::default()
        };
        let encoded = encode_containers(std::slice::from_ref(&c));
        assert_eq!(parse_containers(&encoded).unwrap(), vec![c]);
    }

    #[test]
    fn volume_kind_is_the_source_field_and_only_pod_local_kinds_travel() {
        let volume = |v: serde_json::Value| -> Volume { serde_json::from_value(v).unwrap() };
        let cases = [
            (
                serde_json::json!({"name": "a", "emptyDir": {}}),
                "emptyDir",
                true,
            ),
            (
                serde_json::json!({"name": "b", "persistentVolumeClaim": {"claimName": "c"}}),
                "persistentVolumeClaim",
                false,
            ),
            (
                serde_json::json!({"name": "c", "configMap": {"name": "x"}}),
                "configMap",
                false,
            ),
            (
                serde_json::json!({"name": "d", "hostPath": {"path": "/x"}}),
                "hostPath",
                false,
            ),
            (serde_json::json!({"name": "e"}), "unknown", false),
        ];
        for (v, kind, travels) in cases {
            assert_eq!(volume_kind(&volume(v)), kind);
            assert_eq!(travels_by_default(kind), travels, "{kind}");
        }
    }
}
