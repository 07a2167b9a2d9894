//! The validating decision: annotations must parse (with the contract's own parser, the one the
//! sidecar uses), and a pod under migration may only be changed by the migration service
//! accounts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use ums_contract::{AnnotationError, MigrationAnnotations};

/// Who may change a pod while it carries `migration-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationGuard {
    /// Full user names, e.g. `system:serviceaccount:default:migration-coordinator`.
    pub migration_accounts: Vec<String>,
}

/// The operation being validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOperation {
    Create,
    Update,
    Delete,
    Connect,
}

/// Why a pod change is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A migration annotation is malformed.
    #[error("pod {pod}: {reason}")]
    Annotation {
        pod: String,
        reason: AnnotationError,
    },
    /// The pod is being migrated and the requester is not a migration account.
    #[error("pod {pod} is being migrated (migration-id {migration_id}): it cannot be {verb} by {user} until the migration ends; only {allowed} may change it")]
    MigrationInProgress {
        pod: String,
        migration_id: String,
        verb: &'static str,
        user: String,
        allowed: String,
    },
}

impl MigrationGuard {
    /// Decides whether `user` may perform `operation` on the pod.
    ///
    /// `object` is the pod after the change (absent for DELETE), `old_object` before it
    /// (absent for CREATE).
    pub fn validate(
        &self,
        operation: PodOperation,
        user: &str,
        object: Option<&Pod>,
        old_object: Option<&Pod>,
    ) -> Result<(), ValidationError> {
        if let Some(pod) = object {
            if matches!(operation, PodOperation::Create | PodOperation::Update) {
                parse_annotations(pod).map_err(|reason| ValidationError::Annotation {
                    pod: pod_name(pod),
                    reason,
                })?;
            }
        }
        let verb = match operation {
            PodOperation::Update => "updated",
            PodOperation::Delete => "deleted",
            PodOperation::Create | PodOperation::Connect => return Ok(()),
        };
        let Some(old) = old_object else {
            return Ok(());
        };
        // A malformed migration-id on the stored pod still marks it as under migration.
        let Some(migration_id) = old
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ums_contract::ANNOTATION_ID))
        else {
            return Ok(());
        };
        if self.migration_accounts.iter().any(|a| a == user) {
            return Ok(());
        }
        // Once deletion has started (finalizers, graceful termination), the kubelet and the
        // garbage collector must be able to finish it.
        if old.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        Err(ValidationError::MigrationInProgress {
            pod: pod_name(old),
            migration_id: migration_id.clone(),
            verb,
            user: user.to_owned(),
            allowed: self.migration_accounts.join(", "),
        })
    }
}

fn parse_annotations(pod: &Pod) -> Result<MigrationAnnotations, AnnotationError> {
    let empty = BTreeMap::new();
    MigrationAnnotations::parse(pod.metadata.annotations.as_ref().unwrap_or(&empty))
}

/// `namespace/name` (or `generateName…` before a name is assigned).
pub fn pod_name(pod: &Pod) -> String {
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| {
            pod.metadata
                .generate_name
                .as_ref()
                .map(|g| format!("{g}<generated>"))
        })
        .unwrap_or_else(|| "<unnamed>".into());
    match &pod.metadata.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn guard() -> MigrationGuard {
        MigrationGuard {
            migration_accounts: vec!["system:serviceaccount:default:migration-coordinator".into()],
        }
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "memhog", "namespace": "default", "annotations": annotations },
            "spec": { "containers": [{"name": "a"}] }
        }))
        .unwrap()
    }

    #[test]
    fn create_checks_annotations_with_the_contract_parser() {
        let bad = pod(
            json!({"migration-interface": "dind", "migration-bypass": "true", "migration-containers": "not json"}),
        );
        let err = guard()
            .validate(PodOperation::Create, "alice", Some(&bad), None)
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("pod default/memhog:") && message.contains("migration-containers"),
            "{message}"
        );
        let good = pod(json!({"migration-interface": "ff", "migration-start-mode": "null"}));
        assert_eq!(
            guard().validate(PodOperation::Create, "alice", Some(&good), None),
            Ok(())
        );
        let bad_mode = pod(json!({"migration-start-mode": "sometimes"}));
        assert!(guard()
            .validate(PodOperation::Create, "alice", Some(&bad_mode), None)
            .is_err());
    }

    #[test]
    fn pods_under_migration_are_guarded() {
        let old = pod(json!({"migration-interface": "dind", "migration-id": "mig-42"}));
        let new = pod(json!({"migration-interface": "dind", "migration-id": "mig-42", "x": "y"}));
        for (op, object) in [
            (PodOperation::Update, Some(&new)),
            (PodOperation::Delete, None),
        ] {
            let err = guard()
                .validate(op, "alice", object, Some(&old))
                .unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains("default/memhog")
                    && message.contains("mig-42")
                    && message.contains("alice"),
                "{message}"
            );
            assert!(message.contains("migration-coordinator"), "{message}");
            assert_eq!(
                guard().validate(
                    op,
                    "system:serviceaccount:default:migration-coordinator",
                    object,
                    Some(&old)
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn pods_being_deleted_or_not_migrating_pass() {
        let mut deleting = pod(json!({"migration-id": "mig-1"}));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            guard().validate(PodOperation::Delete, "kubelet", None, Some(&deleting)),
            Ok(())
        );
        let quiet = pod(json!({"migration-interface": "dind"}));
        assert_eq!(
            guard().validate(PodOperation::Update, "bob", Some(&quiet), Some(&quiet)),
            Ok(())
        );
        assert_eq!(
            guard().validate(PodOperation::Delete, "bob", None, Some(&quiet)),
            Ok(())
        );
    }
}
