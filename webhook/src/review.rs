//! AdmissionReview in, AdmissionReview out: the glue between the HTTP handlers and the pure
//! decisions in [`crate::mutate`] and [`crate::validate`].

use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::Value;

use crate::config::WrapConfig;
use crate::metrics::Outcome;
use crate::mutate::mutate_pod;
use crate::validate::{pod_name, Allowed, MigrationGuard, PodOperation, Requester};

/// A request body that is not an AdmissionReview the webhook can answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The body is not JSON of the AdmissionReview shape.
    #[error("request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    NotAReview(String),
    /// The review has the wrong apiVersion or kind.
    #[error("unsupported review type {api_version}/{kind}: expected admission.k8s.io/v1 AdmissionReview")]
    WrongType { api_version: String, kind: String },
    /// The review carries no `request`.
    #[error("AdmissionReview has no request")]
    NoRequest,
}

/// Parses a body into an admission request; anything else is a 400 for the caller.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, ReviewError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| ReviewError::NotAReview(e.to_string()))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(ReviewError::WrongType {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let mut request = review.request.ok_or(ReviewError::NoRequest)?;
    // The response echoes the review's type; the API server sends none inside `request`.
    request.types = review.types;
    Ok(request)
}

fn is_pod(request: &AdmissionRequest<DynamicObject>) -> bool {
    request.kind.group.is_empty() && request.kind.kind == "Pod" && request.sub_resource.is_none()
}

/// The object as a typed Pod. Both sides of the patch go through the same type, so fields this
/// build does not know are never touched by the patch.
fn as_pod(object: &DynamicObject) -> Result<(Pod, Value), String> {
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    let pod: Pod =
        serde_json::from_value(value).map_err(|e| format!("object is not a valid v1 Pod: {e}"))?;
    let typed = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
    Ok((pod, typed))
}

/// The review to send back, as JSON.
///
/// The API server decodes `response.patch` as Go `[]byte`, i.e. a base64 string; kube-core
/// serializes its `Vec<u8>` as an array of numbers (kube-rs issue #1781), which the API server
/// would refuse. So the patch is re-encoded here.
pub fn review_json(mut response: AdmissionResponse) -> Value {
    use base64::Engine as _;
    let patch = response.patch.take();
    let mut review = serde_json::to_value(response.into_review()).unwrap_or(Value::Null);
    if let (Some(bytes), Some(object)) = (patch, review["response"].as_object_mut()) {
        object.insert(
            "patch".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        );
    }
    review
}

/// Answers a mutating review.
pub fn mutate_review(
    request: &AdmissionRequest<DynamicObject>,
    config: &WrapConfig,
) -> (AdmissionResponse, Outcome) {
    let response = AdmissionResponse::from(request);
    if !is_pod(request) || !matches!(request.operation, Operation::Create) {
        return (response, Outcome::allowed);
    }
    let Some(object) = request.object.as_ref() else {
        return (
            response.deny("CREATE review carries no object"),
            Outcome::denied,
        );
    };
    let (pod, original) = match as_pod(object) {
        Ok(p) => p,
        Err(message) => return (response.deny(message), Outcome::denied),
    };
    let mutated = match mutate_pod(&pod, config) {
        Ok(None) => return (response, Outcome::allowed),
        Ok(Some(mutated)) => mutated,
        Err(error) => {
            let message = format!("pod {}: {error}", pod_name(&pod));
            return (response.deny(message), Outcome::denied);
        }
    };
    let mutated = match serde_json::to_value(&mutated) {
        Ok(v) => v,
        Err(e) => {
            return (
                response.deny(format!("failed to serialize the pod: {e}")),
                Outcome::denied,
            )
        }
    };
    let patch = pod_patch(&original, &mutated);
    if patch.0.is_empty() {
        return (response, Outcome::allowed);
    }
    match response.clone().with_patch(patch) {
        Ok(patched) => (patched, Outcome::patched),
        Err(e) => (
            response.deny(format!("failed to serialize the patch: {e}")),
            Outcome::denied,
        ),
    }
}

/// The JSON patch from `original` to `mutated`.
///
/// `spec.containers` is replaced as a whole: an element-wise diff would keep, on whichever
/// new container lands at an old index (the runtime container at index 0), the fields of the
/// old container that this build's Pod type does not know. Everything else is diffed, so
/// fields the webhook does not change are never touched.
pub fn pod_patch(original: &Value, mutated: &Value) -> json_patch::Patch {
    let take_containers = |pod: &Value| -> (Value, Option<Value>) {
        let mut rest = pod.clone();
        let containers = rest
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .and_then(|spec| spec.remove("containers"));
        (rest, containers)
    };
    let (original_rest, original_containers) = take_containers(original);
    let (mutated_rest, mutated_containers) = take_containers(mutated);
    let mut patch = json_patch::diff(&original_rest, &mutated_rest);
    if original_containers != mutated_containers {
        if let Some(containers) = mutated_containers {
            let op = serde_json::json!({"op": "replace", "path": "/spec/containers", "value": containers});
            if let Ok(op) = serde_json::from_value(op) {
                patch.0.push(op);
            }
        }
    }
    patch
}

/// Answers a validating review.
pub fn validate_review(
    request: &AdmissionRequest<DynamicObject>,
    guard: &MigrationGuard,
) -> (AdmissionResponse, Outcome) {
    let response = AdmissionResponse::from(request);
    if !is_pod(request) {
        return (response, Outcome::allowed);
    }
    let parse = |object: Option<&DynamicObject>| -> Result<Option<Pod>, String> {
        object.map(|o| as_pod(o).map(|(pod, _)| pod)).transpose()
    };
    let (object, old_object) = match (
        parse(request.object.as_ref()),
        parse(request.old_object.as_ref()),
    ) {
        (Ok(o), Ok(old)) => (o, old),
        (Err(message), _) | (_, Err(message)) => return (response.deny(message), Outcome::denied),
    };
    let operation = match request.operation {
        Operation::Create => PodOperation::Create,
        Operation::Update => PodOperation::Update,
        Operation::Delete => PodOperation::Delete,
        Operation::Connect => PodOperation::Connect,
    };
    let requester = Requester {
        user: request.user_info.username.clone().unwrap_or_default(),
        groups: request.user_info.groups.clone().unwrap_or_default(),
    };
    match guard.validate(operation, &requester, object.as_ref(), old_object.as_ref()) {
        Ok(Allowed::Plain) => (response, Outcome::allowed),
        Ok(Allowed::LockReleased {
            pod,
            migration_id,
            user,
            reason,
        }) => {
            tracing::warn!(%pod, migration = %migration_id, %user, %reason, "migration lock released by hand");
            let mut response = response;
            response.warnings = Some(vec![format!(
                "the lock of migration {migration_id} on pod {pod} is released by hand; the migration's coordinator no longer guards it"
            )]);
            (response, Outcome::allowed)
        }
        Err(error) => (response.deny(error.to_string()), Outcome::denied),
    }
}
