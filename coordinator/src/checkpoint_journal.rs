//! The journal of an orchestrator-level migration, for the coordinator that comes back after
//! it died mid-way. Once the source pod is stopped, the checkpoint archives on its node are the
//! service, and the pod object that would name them is gone: so before the checkpoints the
//! source's coordinator writes what it takes to restore the pod (its spec, its node, the
//! destination) into a ConfigMap `ums-ssu-<migration>` in the pod's namespace, adds the archives
//! once they are taken (before the stop), and deletes it when the migration ends either way. A
//! coordinator that starts (and every minute after) finishes the journals nobody drives: one
//! without archives (it died while checkpointing: the pod was never stopped) has what the
//! checkpoints left on the node removed; otherwise the destination deletes any copy it made, and
//! the pod is restored at the source from its archives (one copy, never two). Pure here: the ConfigMap
//! and back; the recovery is in [`crate::orchestrator`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::kubelet::Checkpoint;

/// The label that marks journal ConfigMaps (value: the migration's id).
pub const LABEL_JOURNAL: &str = "migration.ums-rs.io/ssu-journal";
/// The key of the journal in the ConfigMap's data.
const KEY: &str = "journal.json";

/// What restoring the pod at the source needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointJournal {
    pub migration_id: String,
    /// The destination coordinator's base URL.
    pub destination: String,
    /// The node that holds the archives.
    pub node: String,
    pub checkpoints: Vec<Checkpoint>,
    /// The archive of the pod's emptyDir volumes on that node, if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<String>,
    /// When the journal was first written, before the checkpoints (Unix ms). A journal without
    /// checkpoints is one whose coordinator stopped while checkpointing: the pod was never
    /// stopped, and the archives made since then are removed.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// The source pod as it was checked (namespace, name, spec).
    pub pod: Pod,
}

/// The ConfigMap's name for a migration.
pub fn journal_name(migration_id: &str) -> String {
    format!("ums-ssu-{migration_id}")
}

/// The journal as a ConfigMap in the pod's namespace.
pub fn to_config_map(journal: &CheckpointJournal) -> Result<ConfigMap, serde_json::Error> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(journal_name(&journal.migration_id)),
            namespace: journal.pod.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (LABEL_JOURNAL.to_owned(), journal.migration_id.clone()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "ums-coordinator".to_owned(),
                ),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            KEY.to_owned(),
            serde_json::to_string(journal)?,
        )])),
        ..Default::default()
    })
}

/// The journal a ConfigMap holds, if it is one.
pub fn from_config_map(config_map: &ConfigMap) -> Option<CheckpointJournal> {
    let text = config_map.data.as_ref()?.get(KEY)?;
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_journal_goes_into_its_config_map_and_back() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": [{"name": "a", "image": "img:1"}]}
        }))
        .unwrap_or_default();
        let journal = CheckpointJournal {
            migration_id: "m1".into(),
            destination: "https://cloud:8443".into(),
            node: "n1".into(),
            checkpoints: vec![Checkpoint {
                container: "a".into(),
                archive: "/var/lib/kubelet/checkpoints/checkpoint-p_shop-a-1.tar".into(),
                requested_unix_ms: 1,
                answered_unix_ms: 2,
            }],
            volumes: Some("/var/lib/kubelet/checkpoints/volumes-p_shop-m1.tar".into()),
            started_unix_ms: 1,
            pod,
        };
        let config_map = to_config_map(&journal).unwrap_or_default();
        assert_eq!(config_map.metadata.name.as_deref(), Some("ums-ssu-m1"));
        assert_eq!(config_map.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            config_map
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_JOURNAL))
                .map(String::as_str),
            Some("m1")
        );
        assert_eq!(from_config_map(&config_map), Some(journal));
        assert_eq!(from_config_map(&ConfigMap::default()), None);
    }
}
