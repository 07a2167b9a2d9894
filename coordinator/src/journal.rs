//! A migration's journal: what the source pod carries so that the migration can be finished by
//! whoever finds it, if the coordinator that drove it stops.
//!
//! Once the copy exists and before the state moves, the source coordinator writes onto the
//! source pod where the copy is (the destination coordinator's URL, the copy's name), the
//! credential that makes it active, and whether the source is kept. A coordinator that finds a
//! pod it locked whose state has left (its sidecar says `migrated`) makes the copy active from
//! the journal and deletes (or keeps) the source: the service is never left in a passive copy
//! that no one will activate. Pure: annotations in, patches out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Map, Value};
use ums_contract::{StartMode, ANNOTATION_ID, ANNOTATION_START_MODE};

/// Marks a pod this coordinator created as a migration's destination (value: the cluster).
pub const ANNOTATION_COPY_OF: &str = "migration.ums-rs.io/created-by-coordinator";
/// Marks a pod this coordinator locked as a migration's source (value: the cluster).
pub const ANNOTATION_LOCKED_BY: &str = "migration.ums-rs.io/locked-by-coordinator";
/// The destination coordinator's URL (`https://host:port`).
pub const ANNOTATION_DESTINATION: &str = "migration.ums-rs.io/destination";
/// The copy, `namespace/name`, in the destination cluster.
pub const ANNOTATION_DESTINATION_POD: &str = "migration.ums-rs.io/destination-pod";
/// The credential the destination issued for this migration's `/restore` and `/delete`.
pub const ANNOTATION_CREDENTIAL: &str = "migration.ums-rs.io/migration-credential";
/// `true` when the source pod is kept (emptied) rather than deleted.
pub const ANNOTATION_KEEP: &str = "migration.ums-rs.io/keep";
/// On a copy made active: the migration that did (a repeated `/restore` is answered, not
/// refused).
pub const ANNOTATION_ACTIVATED_BY: &str = "migration.ums-rs.io/activated-by-migration";

const JOURNAL: [&str; 4] = [
    ANNOTATION_DESTINATION,
    ANNOTATION_DESTINATION_POD,
    ANNOTATION_CREDENTIAL,
    ANNOTATION_KEEP,
];

/// What the source pod says of the migration it is under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceJournal {
    pub migration_id: String,
    pub destination: String,
    pub copy_namespace: String,
    pub copy_name: String,
    pub credential: String,
    pub keep: bool,
}

impl SourceJournal {
    /// The merge patch that writes the journal (the lock stays as it is).
    pub fn patch(&self) -> Value {
        json!({"metadata": {"annotations": {
            ANNOTATION_DESTINATION: self.destination,
            ANNOTATION_DESTINATION_POD: format!("{}/{}", self.copy_namespace, self.copy_name),
            ANNOTATION_CREDENTIAL: self.credential,
            ANNOTATION_KEEP: if self.keep { "true" } else { "false" },
        }}})
    }

    /// The journal `pod` carries, if it is locked under a migration and has a whole one.
    pub fn read(pod: &Pod) -> Option<Self> {
        let annotations: &BTreeMap<String, String> = pod.metadata.annotations.as_ref()?;
        let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
        let (copy_namespace, copy_name) = get(ANNOTATION_DESTINATION_POD)?
            .split_once('/')
            .map(|(n, p)| (n.to_owned(), p.to_owned()))?;
        Some(SourceJournal {
            migration_id: get(ANNOTATION_ID)?,
            destination: get(ANNOTATION_DESTINATION)?,
            copy_namespace,
            copy_name,
            credential: get(ANNOTATION_CREDENTIAL)?,
            keep: get(ANNOTATION_KEEP).as_deref() == Some("true"),
        })
    }
}

fn removal(extra: &[(&str, Value)]) -> Value {
    let mut annotations = Map::new();
    for key in [ANNOTATION_ID, ANNOTATION_LOCKED_BY]
        .into_iter()
        .chain(JOURNAL)
    {
        annotations.insert(key.to_owned(), Value::Null);
    }
    for (key, value) in extra {
        annotations.insert((*key).to_owned(), value.clone());
    }
    json!({"metadata": {"annotations": annotations}})
}

/// The merge patch that releases a source pod: its lock and its journal go.
pub fn unlock_patch() -> Value {
    removal(&[])
}

/// The merge patch that keeps a source pod whose service moved: released, emptied
/// (`migration-start-mode: null`).
pub fn keep_patch() -> Value {
    removal(&[(ANNOTATION_START_MODE, json!(StartMode::Null.as_str()))])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> SourceJournal {
        SourceJournal {
            migration_id: "m1".into(),
            destination: "https://cloud:30001".into(),
            copy_namespace: "shop".into(),
            copy_name: "service".into(),
            credential: "cred".into(),
            keep: true,
        }
    }

    fn pod_with(patch: &Value, lock: bool) -> Pod {
        let mut annotations = patch["metadata"]["annotations"].clone();
        if lock {
            annotations[ANNOTATION_ID] = json!("m1");
        }
        serde_json::from_value(json!({"metadata": {"name": "service", "annotations": annotations}}))
            .unwrap()
    }

    #[test]
    fn the_journal_reads_back_what_was_written() {
        let written = journal();
        assert_eq!(
            SourceJournal::read(&pod_with(&written.patch(), true)),
            Some(written)
        );
    }

    #[test]
    fn no_journal_without_the_lock_or_with_a_part_missing() {
        assert_eq!(
            SourceJournal::read(&pod_with(&journal().patch(), false)),
            None
        );
        let mut partial = journal().patch();
        partial["metadata"]["annotations"][ANNOTATION_CREDENTIAL] = json!("");
        assert_eq!(SourceJournal::read(&pod_with(&partial, true)), None);
    }

    #[test]
    fn releasing_removes_the_lock_and_the_journal() {
        let patch = unlock_patch();
        let annotations = patch["metadata"]["annotations"].as_object().unwrap();
        for key in [ANNOTATION_ID, ANNOTATION_LOCKED_BY]
            .into_iter()
            .chain(JOURNAL)
        {
            assert_eq!(annotations[key], Value::Null, "{key}");
        }
        let keep = keep_patch();
        assert_eq!(
            keep["metadata"]["annotations"][ANNOTATION_START_MODE],
            "null"
        );
        assert_eq!(
            keep["metadata"]["annotations"][ANNOTATION_CREDENTIAL],
            Value::Null
        );
    }
}
