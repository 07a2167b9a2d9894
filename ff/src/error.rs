//! Every error `ums-ff` answers: an HTTP status and JSON naming what was wrong, in the shape
//! the sidecar's errors have (`error`, and for a migration `phase`, `rollback`, `sourceState`),
//! so the coordinator reads both alike.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub detail: serde_json::Value,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            detail: serde_json::Value::Null,
        }
    }
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, error)
    }
    pub fn internal(error: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error)
    }
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }
    /// Adds fields beside `error`.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

impl From<ums_archive::ArchiveError> for ApiError {
    fn from(e: ums_archive::ArchiveError) -> Self {
        use ums_archive::ArchiveError;
        let status = match &e {
            ArchiveError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ArchiveError::Malformed { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, chain(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let (Some(body), serde_json::Value::Object(detail)) = (body.as_object_mut(), self.detail)
        {
            body.extend(detail);
        }
        (self.status, Json(body)).into_response()
    }
}

pub use ums_contract::agent::error_chain as chain;
