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
