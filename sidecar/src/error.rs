//! The API's error replies: `{"error": "...", "detail": ...}` with a fitting status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use crate::archive::ArchiveError;
use crate::engine::EngineError;
use crate::podinfo::PodinfoReadError;
use crate::spec::SpecError;

/// An error reply.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub detail: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            detail: None,
        }
    }
    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, error)
    }
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }
    pub fn internal(error: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(detail) = self.detail {
            body["detail"] = detail;
        }
        (self.status, Json(body)).into_response()
    }
}

pub use ums_contract::agent::error_chain as chain;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
            EngineError::ImageMissing { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            // The registry (or the image name the pod gave) is the problem, not the sidecar.
            EngineError::PullFailed { .. } => StatusCode::BAD_GATEWAY,
            EngineError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Api {
                status: Some(409), ..
            } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }
}

impl From<PodinfoReadError> for ApiError {
    fn from(e: PodinfoReadError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, chain(&e))
    }
}

impl From<ArchiveError> for ApiError {
    fn from(e: ArchiveError) -> Self {
        let status = match &e {
            ArchiveError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ArchiveError::Malformed { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_is_not_a_tar_is_the_senders_error() {
        let dst = tempfile::tempdir().expect("tempdir");
        let garbage = vec![b'x'; 2048];
        let err = crate::archive::unpack::unpack(garbage.as_slice(), dst.path(), |_| {
            Ok(Default::default())
        })
        .expect_err("garbage is no archive");
        assert_eq!(ApiError::from(err).status, StatusCode::BAD_REQUEST);
    }
}
