//! Every error answer is JSON and reaches the client, over HTTP/1.1 and HTTP/2, on a real TLS
//! listener driven by curl (the client users have): a refusal before the body was read (a
//! middleware's 401), a body over the extractor's limit (413), a method a route does not take
//! (405), a path no route knows (404).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

async fn needs_token(request: Request, next: Next) -> Response {
    if request.headers().get("authorization").is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "no token"})),
        )
            .into_response();
    }
    next.run(request).await
}

fn app() -> Router {
    let guarded = Router::new()
        .route("/guarded", post(|| async { "ok" }))
        .route_layer(middleware::from_fn(needs_token));
    Router::new()
        .route(
            "/echo",
            post(|Json(v): Json<serde_json::Value>| async move { Json(v) }),
        )
        .merge(guarded)
}

async fn start() -> (u16, tokio::task::JoinHandle<()>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = ums_tls::EphemeralCert::generate("localhost").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let task = tokio::spawn(ums_tls::serve_tls(listener, acceptor, app()));
    (port, task)
}

struct Answer {
    status: u16,
    content_type: String,
    body: serde_json::Value,
    curl_error: String,
}

/// curl (`--http1.1` or `--http2`) with `args`, a body of `body_bytes` zero-ish bytes from a
/// file, answering the status, content type and JSON body.
fn curl(protocol: &str, args: &[&str], body_bytes: usize) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let body_file = dir.path().join("body");
    let mut body = vec![b' '; body_bytes];
    if body_bytes >= 2 {
        body[0] = b'"';
        body[body_bytes - 1] = b'"';
    }
    std::fs::write(&body_file, &body).unwrap();
    let out_file = dir.path().join("out");
    let mut command = Command::new("curl");
    command
        .args(["-sS", "-k", protocol, "-o"])
        .arg(&out_file)
        .args(["-w", "%{http_code} %{content_type}"])
        .args(args);
    if body_bytes > 0 {
        command
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", body_file.display()));
    }
    let output = command
        .output()
        .expect("curl must be installed (scripts/install-host.sh)");
    let written = String::from_utf8_lossy(&output.stdout).into_owned();
    let (code, kind) = written.split_once(' ').unwrap_or((&written, ""));
    let text = std::fs::read(&out_file).unwrap_or_default();
    Answer {
        status: code.trim().parse().unwrap_or(0),
        content_type: kind.trim().to_owned(),
        body: serde_json::from_slice(&text).unwrap_or(serde_json::Value::Null),
        curl_error: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn assert_json_error(answer: &Answer, status: u16, what: &str) {
    assert_eq!(
        answer.status, status,
        "{what}: status (curl said: {})",
        answer.curl_error
    );
    assert!(
        answer.content_type.starts_with("application/json"),
        "{what}: content type {:?}",
        answer.content_type
    );
    assert!(
        answer.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: body {}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_and_heard_over_http1_and_http2() {
    let (port, task) = start().await;
    let base = format!("https://localhost:{port}");
    let answers = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for protocol in ["--http1.1", "--http2"] {
            // A refusal before the body was read, ten times: every one heard (without the
            // drain, curl saw a broken pipe or a reset stream here).
            for i in 0..10 {
                let guarded = format!("{base}/guarded");
                let a = curl(protocol, &[&guarded], 500 * 1024);
                seen.push((format!("{protocol} 401 #{i}"), 401, a));
            }
            let echo = format!("{base}/echo");
            for size in [3 * 1024 * 1024, 20 * 1024 * 1024] {
                let a = curl(protocol, &[&echo], size);
                seen.push((format!("{protocol} {size} B body"), 413, a));
            }
            let a = curl(protocol, &["-X", "GET", &echo], 0);
            seen.push((format!("{protocol} GET /echo"), 405, a));
            let nowhere = format!("{base}/nowhere");
            let a = curl(protocol, &[&nowhere], 0);
            seen.push((format!("{protocol} /nowhere"), 404, a));
            let a = curl(protocol, &[&echo], 2);
            assert_eq!(a.status, 200, "{protocol} a good request: {}", a.curl_error);
        }
        seen
    })
    .await
    .unwrap();
    for (what, status, answer) in &answers {
        assert_json_error(answer, *status, what);
    }
    task.abort();
}
