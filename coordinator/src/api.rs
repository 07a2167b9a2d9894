//! The coordinator's HTTPS API: UMS's routes (`GET /`, `POST /migrate` on the source side;
//! `POST /create`, `/restore`, `/delete` called by a peer on the destination side), plus
//! `GET /migrations` and `GET /migrations/{id}` (progress) and `GET /healthz`. Who may call
//! which is in [`crate::auth`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::auth::MigrationCredential;
use crate::destination::{CreateRequest, PodRequest};
use crate::error::ApiError;
use crate::migrate::{validate, MigrateRequest};
use crate::peer::Identity;
use crate::state::new_id;
use crate::state::Coordinator;

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(identity))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/migrate", post(migrate))
        .route("/migrations", get(migrations))
        .route("/migrations/{id}", get(migration))
        .route("/migrations/{id}/abort", post(abort))
        .route("/create", post(create))
        .route("/restore", post(restore))
        .route("/delete", post(delete))
        .route("/outcome", post(outcome))
        .route("/admission/eviction", post(eviction_review))
        .route("/checkpoint-uploads", post(checkpoint_uploads))
        .route(
            "/checkpoints/{id}/{container}",
            axum::routing::put(receive_checkpoint),
        )
        .route(
            "/checkpoint-volumes/{id}",
            axum::routing::put(receive_volumes),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            coordinator.clone(),
            crate::auth::require_credential,
        ))
        .with_state(coordinator)
}

/// A JSON body, or a 400 naming what is wrong with it.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not the expected JSON: {e}")))
}

fn answer<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn identity(State(c): State<Arc<Coordinator>>) -> Json<Identity> {
    Json(c.identity())
}

async fn migrate(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    let request = match body::<MigrateRequest>(&bytes).and_then(validate) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let id = new_id();
    // The migration runs to its end even if the caller goes away: a half-done migration
    // would leave the pod locked.
    let task = tokio::spawn(async move { c.migrate(request, &id).await });
    answer(match task.await {
        Ok(result) => result,
        Err(e) => Err(ApiError::internal(format!(
            "the migration task failed: {e}"
        ))),
    })
}

/// `POST /checkpoint-uploads` (peers): the upload credential of an orchestrator-level
/// migration to this cluster.
async fn checkpoint_uploads(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    let request = match body::<crate::checkpoint_upload::UploadRequest>(&bytes) {
        Ok(request) => request,
        Err(e) => return answer::<()>(Err(e)),
    };
    answer(c.upload_credential(&request).await)
}

/// `PUT /checkpoints/{id}/{container}` (the migration's upload credential): one container's
/// checkpoint archive, streamed into this cluster's checkpoint registry.
async fn receive_checkpoint(
    State(c): State<Arc<Coordinator>>,
    Path((id, container)): Path<(String, String)>,
    axum::Extension(credential): axum::Extension<crate::auth::MigrationCredential>,
    body: axum::body::Body,
) -> Response {
    if let Err(e) = credential.check(&id) {
        return e.into_response();
    }
    answer(c.receive_checkpoint(&id, &container, body).await)
}

/// `PUT /checkpoint-volumes/{id}` (the migration's upload credential): the pod's emptyDir
/// archive, staged until the restored pod's init container takes it.
async fn receive_volumes(
    State(c): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    axum::Extension(credential): axum::Extension<crate::auth::MigrationCredential>,
    body: axum::body::Body,
) -> Response {
    if let Err(e) = credential.check(&id) {
        return e.into_response();
    }
    answer(c.receive_volumes(&id, body).await)
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.metrics.encode(),
    )
        .into_response()
}

/// Every migration this coordinator has driven since it started, oldest first.
async fn migrations(State(c): State<Arc<Coordinator>>) -> Json<Vec<crate::state::MigrationRecord>> {
    Json(c.records())
}

async fn migration(State(c): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    match c.record(&id) {
        Some(record) => Json(record).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no migration {id:?} here"))
            .into_response(),
    }
}

/// `POST /migrations/{id}/abort`: 202 until the state has arrived (before the freeze the
/// coordinator rolls back; while the state moves the source's sidecar stops and rolls back,
/// unless the destination confirmed first), and the migration's own call answers 409; 409
/// once the service runs at the destination; 404 for an unknown id.
async fn abort(State(c): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    match c.abort(&id) {
        Ok(phase) => (
            StatusCode::ACCEPTED,
            Json(json!({"migrationId": id, "abortingIn": phase})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    let request = match body::<CreateRequest>(&bytes) {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    let abandoned = PodRequest {
        migration_id: request.migration_id.clone(),
        namespace: request.namespace.clone(),
        name: request.pod.metadata.name.clone().unwrap_or_default(),
    };
    let task = tokio::spawn({
        let c = c.clone();
        async move { c.create_destination(request).await }
    });
    // If the caller goes away while the copy is made (its coordinator died), this handler is
    // dropped: the guard stops the creation and deletes the copy.
    let guard = AbandonedCreate {
        coordinator: c,
        task: task.abort_handle(),
        pod: Some(abandoned),
    };
    let result = task.await;
    guard.disarm();
    answer(match result {
        Ok(result) => result,
        Err(e) => Err(ApiError::internal(format!("the create task failed: {e}"))),
    })
}

/// Deletes the copy of a `/create` whose caller went away before the answer.
struct AbandonedCreate {
    coordinator: Arc<Coordinator>,
    task: tokio::task::AbortHandle,
    pod: Option<PodRequest>,
}

impl AbandonedCreate {
    fn disarm(mut self) {
        self.pod = None;
    }
}

impl Drop for AbandonedCreate {
    fn drop(&mut self) {
        let Some(pod) = self.pod.take() else {
            return;
        };
        self.task.abort();
        let c = self.coordinator.clone();
        tokio::spawn(async move {
            match c.delete_destination(pod.clone()).await {
                Ok(_) => {
                    tracing::warn!(migration = %pod.migration_id, pod = %pod.name, "the source went away during /create: the copy is deleted")
                }
                Err(e) => {
                    tracing::warn!(migration = %pod.migration_id, pod = %pod.name, error = %e, "the source went away during /create; deleting the copy failed")
                }
            }
        });
    }
}

async fn restore(
    State(c): State<Arc<Coordinator>>,
    credential: Option<Extension<MigrationCredential>>,
    bytes: Bytes,
) -> Response {
    let request = match body::<PodRequest>(&bytes) {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    // The middleware lets /restore through only with a verified credential.
    let Some(Extension(credential)) = credential else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "no migration credential").into_response();
    };
    if let Err(e) = credential.check(&request.migration_id) {
        return e.into_response();
    }
    answer(c.activate_destination(request).await)
}

async fn delete(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    match body::<PodRequest>(&bytes) {
        Ok(request) => answer(c.delete_destination(request).await),
        Err(e) => e.into_response(),
    }
}

/// `POST /outcome`: what became of a migration this coordinator drove, for its destination.
async fn outcome(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    match body::<PodRequest>(&bytes) {
        Ok(request) => answer(c.outcome_of(&request).await.map(|(outcome, detail)| {
            json!({"migrationId": request.migration_id, "outcome": outcome, "detail": detail})
        })),
        Err(e) => e.into_response(),
    }
}

/// `POST /admission/eviction`: the validating webhook for `pods/eviction` (see
/// [`crate::evacuation`]).
async fn eviction_review(State(c): State<Arc<Coordinator>>, bytes: Bytes) -> Response {
    match body::<kube_core::admission::AdmissionReview<kube_core::DynamicObject>>(&bytes) {
        Ok(review) => Json(c.review_eviction(review).await).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The JSON every unknown route gets.
pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such endpoint"})),
    )
        .into_response()
}
