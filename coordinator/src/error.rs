//! The coordinator's error answer: an HTTP status and a JSON message naming what was wrong,
//! with the migration's phase when one had started.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The phase the migration failed in, and what was undone.
    pub phase: Option<&'static str>,
    pub rollback: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            phase: None,
            rollback: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// A peer's (a coordinator's or a sidecar's) error answer passed on: its refusals (409:
    /// a name taken, a preflight that says no) stay refusals, anything else is a gateway's
    /// failure (502).
    pub fn from_peer(status: reqwest::StatusCode, message: impl Into<String>) -> Self {
        let code = if status == reqwest::StatusCode::CONFLICT {
            StatusCode::CONFLICT
        } else {
            StatusCode::BAD_GATEWAY
        };
        Self::new(code, message)
    }

    /// The same error, as the failure of `phase`.
    pub fn in_phase(mut self, phase: &'static str) -> Self {
        self.phase.get_or_insert(phase);
        self
    }
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(status) => {
                let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
                // The API server's 4xx are about the request (a name taken, a precondition);
                // its 5xx are the cluster's failure, reported as a gateway's.
                let code = if code.is_server_error() {
                    StatusCode::BAD_GATEWAY
                } else {
                    code
                };
                ApiError::new(code, format!("Kubernetes API: {}", status.message))
            }
            _ => ApiError::bad_gateway(format!("Kubernetes API unreachable: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(phase) = self.phase {
            body["phase"] = phase.into();
        }
        if !self.rollback.is_empty() {
            body["rollback"] = self.rollback.into();
        }
        (self.status, Json(body)).into_response()
    }
}
