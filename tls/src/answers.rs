//! What every error answer of UMS-rs's servers looks like, whatever produced it: JSON
//! (`{"error": "..."}`) with its status, and heard by the client.
//!
//! - axum answers some refusals itself, as text or with no body: 413 (a body over the
//!   extractor's limit), 405 (a method a route does not take), 400 (a path or query it cannot
//!   parse), 415/422 (a body that is not the JSON asked for). [`json_error_answer`] makes those
//!   JSON, keeping their text as the message.
//! - A server that answers an error before it read the request's body (a wrong token refused
//!   by a middleware, a body over the limit) and then closes leaves a client that is still
//!   sending without its answer: over HTTP/1.1 it sees a broken pipe, over HTTP/2 a reset
//!   stream. [`DrainOnError`] reads what is left of the body (up to [`DRAIN_LIMIT`] bytes and
//!   [`DRAIN_TIMEOUT`]) before the error answer goes out, so the client gets its status.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;

/// The most of an unread request body read before an error answer; a client sending more is
/// cut off (it gets no answer, as before).
pub const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// The longest an error answer waits for the rest of the request's body.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest text body of an error answer that is carried into its JSON message.
const MESSAGE_LIMIT: usize = 64 * 1024;

/// A request body the server can still read after the handler let go of it.
///
/// The handler gets one handle, the connection's service keeps the other; the body is read by
/// whichever polls it (one at a time: the lock is held only within a poll).
pub struct DrainOnError<B> {
    inner: Arc<Mutex<Option<B>>>,
}

impl<B> std::fmt::Debug for DrainOnError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DrainOnError")
    }
}

impl<B> DrainOnError<B> {
    /// The body, and the handle to drain it with.
    pub fn wrap(body: B) -> (Self, Drain<B>) {
        let inner = Arc::new(Mutex::new(Some(body)));
        (
            DrainOnError {
                inner: inner.clone(),
            },
            Drain { inner },
        )
    }
}

impl<B> HttpBody for DrainOnError<B>
where
    B: HttpBody + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut guard = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.inner.lock() {
            Ok(guard) => guard.as_ref().is_none_or(HttpBody::is_end_stream),
            Err(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.lock() {
            Ok(guard) => guard.as_ref().map(HttpBody::size_hint).unwrap_or_default(),
            Err(_) => SizeHint::default(),
        }
    }
}

/// The service's handle on a request body.
pub struct Drain<B> {
    inner: Arc<Mutex<Option<B>>>,
}

impl<B> std::fmt::Debug for Drain<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Drain")
    }
}

impl<B> Drain<B>
where
    B: HttpBody + Unpin,
{
    /// Reads what is left of the body, unless the handler still holds it (a task of its own
    /// reading it): then that task decides. Gives up past [`DRAIN_LIMIT`] or [`DRAIN_TIMEOUT`].
    pub async fn rest(self) {
        if Arc::strong_count(&self.inner) > 1 {
            return;
        }
        let taken = match self.inner.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        let Some(mut body) = taken else { return };
        let read = async {
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return };
                if let Some(data) = frame.data_ref() {
                    total += bytes::Buf::remaining(data) as u64;
                    if total > DRAIN_LIMIT {
                        tracing::debug!(
                            total,
                            "request body over the drain limit; not read further"
                        );
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, read).await.is_err() {
            tracing::debug!("request body still arriving after the drain timeout");
        }
    }
}

/// `response` as the JSON error answer every server gives: an error status (4xx, 5xx) whose
/// body is not JSON gets `{"error": <its text, or the status's reason>}`. Other answers pass
/// unchanged.
pub async fn json_error_answer(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&response) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MESSAGE_LIMIT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = message_for(status, &text);
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(Bytes::from(body)))
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.starts_with("application/json") || v.starts_with("application/problem+json")
        })
}

/// The message of an error answer that came without one of its own.
fn message_for(status: StatusCode, text: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("error");
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!(
                "request body too large: {}",
                if text.is_empty() { reason } else { text }
            )
        }
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "method not allowed on this path{}",
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        ),
        StatusCode::NOT_FOUND if text.is_empty() => "no such path".to_owned(),
        _ if text.is_empty() => reason.to_owned(),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse as _;

    async fn answer(response: Response) -> (StatusCode, String, serde_json::Value) {
        let response = json_error_answer(response).await;
        let status = response.status();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, kind, value)
    }

    #[tokio::test]
    async fn text_and_empty_error_answers_become_json_with_their_status() {
        let (status, kind, value) =
            answer((StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded").into_response()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(kind, "application/json");
        assert_eq!(
            value["error"],
            "request body too large: length limit exceeded"
        );

        let (status, _, value) = answer(StatusCode::METHOD_NOT_ALLOWED.into_response()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(value["error"], "method not allowed on this path");

        let (_, _, value) = answer(StatusCode::NOT_FOUND.into_response()).await;
        assert_eq!(value["error"], "no such path");
        let (_, _, value) =
            answer((StatusCode::BAD_REQUEST, "Invalid URL: bad query").into_response()).await;
        assert_eq!(value["error"], "Invalid URL: bad query");
    }

    #[tokio::test]
    async fn json_and_successful_answers_pass_unchanged() {
        let json = (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({"error": "busy", "phase": "x"})),
        )
            .into_response();
        let (status, _, value) = answer(json).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(value["phase"], "x");
        let ok = json_error_answer("plain text".into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(ok.into_body(), 100).await.unwrap();
        assert_eq!(&bytes[..], b"plain text");
    }

    /// A body of `left` 1 KiB frames that counts what was read of it.
    struct Counted {
        left: usize,
        read: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl HttpBody for Counted {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.read
                .fetch_add(1024, std::sync::atomic::Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; 1024])))))
        }
    }

    #[tokio::test]
    async fn a_body_the_handler_dropped_is_read_to_its_end() {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = Counted {
            left: 300,
            read: read.clone(),
        };
        let (handler_body, drain) = DrainOnError::wrap(body);
        drop(handler_body);
        drain.rest().await;
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 300 * 1024);
    }

    #[tokio::test]
    async fn a_body_the_handler_still_holds_is_left_to_it() {
        let body = http_body_util::Full::new(Bytes::from_static(b"abc"));
        let (mut handler_body, drain) = DrainOnError::wrap(body);
        drain.rest().await;
        let frame = handler_body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"abc"));
    }
}
