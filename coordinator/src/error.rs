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
    /// The status a peer (the other coordinator, a sidecar) answered with, when this error
    /// passes its answer on.
    pub peer_status: Option<u16>,
    /// The peer never answered (unreachable, timed out): it may or may not have acted.
    pub unanswered: bool,
    /// After a failure past the freeze: where the service runs now, as its pods' sidecars
    /// said (`source`, `destination`, `nowhere`, `unknown`).
    pub service_runs_at: Option<&'static str>,
    /// The move ran past its completion timeout, was rolled back with the service at the
    /// source, and may be made again with post-copy: the name of the copy it had made (the
    /// next attempt's copy takes that name once it is gone).
    pub switch_to_post_copy: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            phase: None,
            rollback: Vec::new(),
            peer_status: None,
            unanswered: false,
            service_runs_at: None,
            switch_to_post_copy: None,
        }
    }

    /// A peer that could not be reached or did not answer in time.
    pub fn unanswered(message: impl Into<String>) -> Self {
        let mut e = Self::bad_gateway(message);
        e.unanswered = true;
        e
    }

    /// Whether asking again may succeed: the peer never answered, or answered that it (or
    /// what is behind it) is unavailable for now (502, 503, 504). A peer's refusal (4xx, and
    /// its other failures) is its answer: asking again gets the same.
    pub fn is_transient(&self) -> bool {
        self.unanswered || matches!(self.peer_status, Some(502..=504))
    }

    /// The peer answered with a refusal (4xx): it did nothing.
    pub fn peer_refused(&self) -> bool {
        matches!(self.peer_status, Some(400..=499))
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
    /// a name taken, a preflight that says no, a missing prerequisite) stay refusals, anything
    /// else is a gateway's failure (502); the peer's own status is kept for the retry rule.
    pub fn from_peer(status: reqwest::StatusCode, message: impl Into<String>) -> Self {
        let code = if status == reqwest::StatusCode::CONFLICT {
            StatusCode::CONFLICT
        } else {
            StatusCode::BAD_GATEWAY
        };
        let mut e = Self::new(code, message);
        e.peer_status = Some(status.as_u16());
        e
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
        if let Some(at) = self.service_runs_at {
            body["serviceRunsAt"] = at.into();
        }
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_answer_or_an_unavailable_peer_is_worth_asking_again() {
        assert!(ApiError::unanswered("timed out").is_transient());
        for status in [502, 503, 504] {
            let e = ApiError::from_peer(reqwest::StatusCode::from_u16(status).unwrap(), "x");
            assert!(e.is_transient(), "{status}");
            assert!(!e.peer_refused());
        }
        for status in [400, 401, 403, 404, 409, 500] {
            let e = ApiError::from_peer(reqwest::StatusCode::from_u16(status).unwrap(), "x");
            assert!(!e.is_transient(), "{status}");
            assert_eq!(e.peer_refused(), status < 500, "{status}");
        }
        // The 401 a wrong credential gets is passed on as a gateway's failure, not retried.
        let e = ApiError::from_peer(reqwest::StatusCode::UNAUTHORIZED, "x");
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert!(!ApiError::bad_gateway("mine").is_transient());
    }
}
