//! The two listeners: admission over TLS, and health plus metrics over plain HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::config::WrapConfig;
use crate::metrics::{Endpoint, Metrics, Outcome};
use crate::review::{mutate_review, parse_review, review_json, validate_review};
use crate::validate::MigrationGuard;

/// Admission request bodies larger than this are refused (the API server's own limit for an
/// object is 1.5 MiB; a review holds up to two of them).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub wrap: WrapConfig,
    pub guard: MigrationGuard,
    pub metrics: Metrics,
    /// Set once the TLS listener is accepting connections.
    pub ready: AtomicBool,
}

/// A JSON error body: `{"error": "..."}`.
fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The admission router (`POST /mutate`, `POST /validate`).
pub fn admission_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "no such endpoint: use POST /mutate or POST /validate",
            )
        })
        .method_not_allowed_fallback(|| async {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: admission endpoints accept POST only",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The admin router (`GET /livez`, `GET /readyz`, `GET /metrics`).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "no such endpoint: /livez, /readyz, /metrics",
            )
        })
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        "ok\n".into_response()
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "admission listener is not accepting connections yet",
        )
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    admit(&state, Endpoint::mutate, body, |req| {
        mutate_review(req, &state.wrap)
    })
}

async fn validate(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    admit(&state, Endpoint::validate, body, |req| {
        validate_review(req, &state.guard)
    })
}

fn admit(
    state: &AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
    decide: impl FnOnce(
        &kube_core::admission::AdmissionRequest<kube_core::DynamicObject>,
    ) -> (kube_core::admission::AdmissionResponse, Outcome),
) -> Response {
    let started = Instant::now();
    let finish = |outcome: Outcome, response: Response| {
        state
            .metrics
            .observe(endpoint, outcome, started.elapsed().as_secs_f64());
        response
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("request body is larger than {MAX_BODY_BYTES} bytes")
            } else {
                format!("failed to read request body: {}", rejection.body_text())
            };
            tracing::warn!(?endpoint, %status, "refused request body");
            return finish(Outcome::invalid, json_error(status, message));
        }
    };
    let request = match parse_review(&body) {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(?endpoint, %error, "refused request that is not an AdmissionReview");
            return finish(
                Outcome::invalid,
                json_error(StatusCode::BAD_REQUEST, error.to_string()),
            );
        }
    };
    let (response, outcome) = decide(&request);
    tracing::info!(
        ?endpoint,
        uid = %request.uid,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        operation = ?request.operation,
        user = request.user_info.username.as_deref().unwrap_or(""),
        ?outcome,
        message = %response.result.message,
        "admission review answered"
    );
    finish(outcome, Json(review_json(response)).into_response())
}

pub use ums_tls::{bind, serve_tls};
