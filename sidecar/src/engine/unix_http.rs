//! Plain HTTP/1.1 requests over an engine's unix socket, for the endpoints bollard does not
//! cover (Docker's `start?checkpoint=`; Podman's libpod checkpoint and restore).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// An answered request.
#[derive(Debug)]
pub struct UnixResponse {
    pub status: u16,
    pub body: Bytes,
}

/// Sends one request with a small body and reads the whole answer.
pub async fn request(
    socket: &Path,
    method: &str,
    path_and_query: &str,
    body: Option<Bytes>,
) -> Result<UnixResponse, String> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", "localhost");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| format!("build request: {e}"))?;
    let response = send(socket, request).await?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("read response: {e}"))?
        .to_bytes();
    Ok(UnixResponse { status, body })
}

/// The `message` of an engine's JSON error body, or the body itself.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// Sends a request with any body and returns the response with its body still streaming.
pub async fn send<B>(
    socket: &Path,
    request: Request<B>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let what = format!("{} {}", request.method(), request.uri());
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("{what}: {e}"))
}
