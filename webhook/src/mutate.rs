//! The mutating decision: which rewrite, if any, a pod gets.

use k8s_openapi::api::core::v1::Pod;
use ums_contract::{AnnotationError, Interface, MigrationAnnotations};

use crate::config::WrapConfig;
use crate::ff::prepare_ff;
use crate::wrap::{wrap_pod, WrapError};

/// Why a pod cannot be mutated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MutateError {
    /// A migration annotation has a value the contract does not accept.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The pod cannot be wrapped into a runtime container.
    #[error(transparent)]
    Wrap(#[from] WrapError),
    /// The pod cannot be prepared for service-level migration.
    #[error(transparent)]
    Ff(#[from] crate::ff::FfError),
}

/// The pod as it must be created, or `None` when it is to be left as it is (no
/// `migration-interface`, or already prepared: `migration-bypass`).
pub fn mutate_pod(pod: &Pod, config: &WrapConfig) -> Result<Option<Pod>, MutateError> {
    let empty = Default::default();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let parsed = MigrationAnnotations::parse(annotations)?;
    let Some(interface) = parsed.interface else {
        return Ok(None);
    };
    if parsed.bypass {
        return Ok(None);
    }
    let start_mode = parsed.start_mode_or_default();
    let mutated = match interface {
        Interface::Dind | Interface::Pind => wrap_pod(pod, interface, start_mode, config)?,
        Interface::Ff => prepare_ff(pod, start_mode, config)?,
    };
    Ok(Some(mutated))
}
