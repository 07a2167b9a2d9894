//! The validating decision: annotations must parse (with the contract's own parser, the one the
//! sidecar uses), and a pod under migration may only be changed by the migration service
//! accounts, except for one change: a cluster admin (a member of the override groups) may
//! release the lock, saying why, when a migration left it behind.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use ums_contract::{
    AnnotationError, MigrationAnnotations, ANNOTATION_ID, ANNOTATION_LOCK_RELEASED,
};

/// Who may change a pod while it carries `migration-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationGuard {
    /// Full user names, e.g. `system:serviceaccount:default:migration-coordinator`.
    pub migration_accounts: Vec<String>,
    /// Groups whose members may release a lock by hand (`system:masters` by default).
    pub override_groups: Vec<String>,
}

/// Who asks, as the API server names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requester {
    pub user: String,
    pub groups: Vec<String>,
}

/// What an allowed change is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Plain,
    /// A cluster admin released the lock of `migration_id`, saying `reason`.
    LockReleased {
        pod: String,
        migration_id: String,
        user: String,
        reason: String,
    },
}

/// The migration's own annotations on a source pod, which a lock's release may remove with
/// `migration-id` (the coordinator's lock and journal).
const RELEASABLE_PREFIX: &str = "migration.ums-rs.io/";

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
    #[error("pod {pod} is being migrated (migration-id {migration_id}): it cannot be {verb} by {user} until the migration ends; only {allowed} may change it (a cluster admin whose migration is stuck may release the lock: remove migration-id and set {ANNOTATION_LOCK_RELEASED}=<why> in one update, nothing else)")]
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
        requester: &Requester,
        object: Option<&Pod>,
        old_object: Option<&Pod>,
    ) -> Result<Allowed, ValidationError> {
        let user = requester.user.as_str();
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
            PodOperation::Create | PodOperation::Connect => return Ok(Allowed::Plain),
        };
        let Some(old) = old_object else {
            return Ok(Allowed::Plain);
        };
        // A malformed migration-id on the stored pod still marks it as under migration.
        let Some(migration_id) = old
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ums_contract::ANNOTATION_ID))
        else {
            return Ok(Allowed::Plain);
        };
        if self.migration_accounts.iter().any(|a| a == user) {
            return Ok(Allowed::Plain);
        }
        // Once deletion has started (finalizers, graceful termination), the kubelet and the
        // garbage collector must be able to finish it.
        if old.metadata.deletion_timestamp.is_some() {
            return Ok(Allowed::Plain);
        }
        let overrides = requester
            .groups
            .iter()
            .any(|g| self.override_groups.contains(g));
        if let (true, PodOperation::Update, Some(new)) = (overrides, operation, object) {
            if let Some(reason) = lock_release_reason(old, new) {
                return Ok(Allowed::LockReleased {
                    pod: pod_name(old),
                    migration_id: migration_id.clone(),
                    user: user.to_owned(),
                    reason,
                });
            }
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

/// The reason of an update that only releases the lock: `migration-id` (and the
/// coordinator's own `migration.ums-rs.io/` annotations) removed, a non-empty
/// `lock-released` added, nothing else of the pod changed.
fn lock_release_reason(old: &Pod, new: &Pod) -> Option<String> {
    let empty = BTreeMap::new();
    let old_annotations = old.metadata.annotations.as_ref().unwrap_or(&empty);
    let new_annotations = new.metadata.annotations.as_ref().unwrap_or(&empty);
    if new_annotations.contains_key(ANNOTATION_ID) {
        return None;
    }
    let reason = new_annotations
        .get(ANNOTATION_LOCK_RELEASED)
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())?;
    let kept = |annotations: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        annotations
            .iter()
            .filter(|(k, _)| *k != ANNOTATION_ID && !k.starts_with(RELEASABLE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let released_only = kept(old_annotations) == kept(new_annotations)
        && new_annotations
            .keys()
            .filter(|k| k.starts_with(RELEASABLE_PREFIX))
            .all(|k| {
                k == ANNOTATION_LOCK_RELEASED || old_annotations.get(k) == new_annotations.get(k)
            })
        && old.metadata.labels == new.metadata.labels
        && old.spec == new.spec;
    released_only.then_some(reason)
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
            override_groups: vec!["system:masters".into()],
        }
    }

    fn who(user: &str) -> Requester {
        Requester {
            user: user.into(),
            groups: vec!["system:authenticated".into()],
        }
    }

    fn admin() -> Requester {
        Requester {
            user: "kubernetes-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    #[test]
    fn a_cluster_admin_releases_a_lock_saying_why_and_nothing_else() {
        let old = pod(
            json!({"migration-interface": "dind", "migration-id": "mig-42",
            "migration.ums-rs.io/locked-by-coordinator": "edge"}),
        );
        let released = pod(json!({"migration-interface": "dind",
            "migration.ums-rs.io/lock-released": "migration mig-42 stranded by a crash"}));
        assert_eq!(
            guard().validate(PodOperation::Update, &admin(), Some(&released), Some(&old)),
            Ok(Allowed::LockReleased {
                pod: "default/memhog".into(),
                migration_id: "mig-42".into(),
                user: "kubernetes-admin".into(),
                reason: "migration mig-42 stranded by a crash".into(),
            })
        );
        // Not without a reason, not by a user outside the groups, not with another change,
        // not a delete.
        let silent = pod(json!({"migration-interface": "dind"}));
        let more = pod(json!({"migration-interface": "pind",
            "migration.ums-rs.io/lock-released": "why"}));
        for (requester, new, op) in [
            (admin(), Some(&silent), PodOperation::Update),
            (who("jane"), Some(&released), PodOperation::Update),
            (admin(), Some(&more), PodOperation::Update),
            (admin(), None, PodOperation::Delete),
        ] {
            let refused = guard()
                .validate(op, &requester, new, Some(&old))
                .unwrap_err();
            assert!(refused.to_string().contains("lock-released"), "{refused}");
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
            .validate(PodOperation::Create, &who("alice"), Some(&bad), None)
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("pod default/memhog:") && message.contains("migration-containers"),
            "{message}"
        );
        let good = pod(json!({"migration-interface": "ff", "migration-start-mode": "null"}));
        assert_eq!(
            guard().validate(PodOperation::Create, &who("alice"), Some(&good), None),
            Ok(Allowed::Plain)
        );
        let bad_mode = pod(json!({"migration-start-mode": "sometimes"}));
        assert!(guard()
            .validate(PodOperation::Create, &who("alice"), Some(&bad_mode), None)
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
                .validate(op, &who("alice"), object, Some(&old))
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
                    &who("system:serviceaccount:default:migration-coordinator"),
                    object,
                    Some(&old)
                ),
                Ok(Allowed::Plain)
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
            guard().validate(PodOperation::Delete, &who("kubelet"), None, Some(&deleting)),
            Ok(Allowed::Plain)
        );
        let quiet = pod(json!({"migration-interface": "dind"}));
        assert_eq!(
            guard().validate(
                PodOperation::Update,
                &who("bob"),
                Some(&quiet),
                Some(&quiet)
            ),
            Ok(Allowed::Plain)
        );
        assert_eq!(
            guard().validate(PodOperation::Delete, &who("bob"), None, Some(&quiet)),
            Ok(Allowed::Plain)
        );
    }
}
