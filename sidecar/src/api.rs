//! The sidecar's HTTP API (see `openapi.rs` for the document served at `/openapi.json`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::Deserialize;
use tokio_util::io::SyncIoBridge;

use ums_contract::credential;

use crate::checkpoint::{archive_stream, new_id};
use crate::engine::{LogChunk, LogResume, LogStreamKind};
use crate::error::ApiError;
use crate::migrate::MigrateRequest;
use crate::nested::Sidecar;
use crate::restore::PreflightRequest;
use crate::volumes::VolumeChoice;

/// The router: `/healthz`, `/probe/{name}` and `/tls` are open, everything else needs the
/// token (when one is configured).
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    let protected = Router::new()
        .route("/info", get(info))
        .route("/containers", get(containers))
        .route("/create/{name}", post(create))
        .route("/stop", post(stop))
        .route("/logs/{name}", get(logs))
        .route("/checkpoint", post(checkpoint))
        .route("/restore/preflight", post(preflight))
        .route("/restore", post(restore))
        .route("/restore/pages/{migration_id}", post(restore_pages))
        .route("/migrate", post(migrate))
        .route("/migrate/{migration_id}/abort", post(abort_migration))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .route_layer(middleware::from_fn_with_state(
            sidecar.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/probe/{name}", get(probe))
        .route("/tls", get(tls))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint: see GET /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: see GET /openapi.json",
            )
        })
        .with_state(sidecar)
}

/// Who may call what:
/// - the static token (`--token-file`, outside wrapped pods): everything;
/// - a token signed by the pod's coordinator for this pod (its IP and its UID): everything
///   (scope `coordinator`), or, for another pod's sidecar sending one migration here (scope
///   `peer`), `/info`, `/restore/preflight`, `/restore` and that migration's page stream, over
///   TLS only, while this pod is under that migration;
/// - the pod-local token of the ambassadors: `/create/{name}` and `/logs/{name}`.
///
/// No credential presented, or one that does not verify: 401; a valid one outside its scope:
/// 403. Without any credential configured (a sidecar run by hand) everything is open.
async fn require_token(
    State(sidecar): State<Arc<Sidecar>>,
    request: Request,
    next: Next,
) -> Response {
    if !sidecar.requires_credentials() {
        return next.run(request).await;
    }
    let presented = credential::bearer(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .to_owned();
    if presented.is_empty() {
        return ApiError::new(StatusCode::UNAUTHORIZED, credential::CREDENTIAL_REQUIRED)
            .into_response();
    }
    let path = request.uri().path().to_owned();
    let matches = |expected: &Option<String>| {
        expected
            .as_ref()
            .is_some_and(|e| credential::constant_time_eq(presented.as_bytes(), e.as_bytes()))
    };
    if matches(&sidecar.token) {
        return next.run(request).await;
    }
    if matches(&sidecar.pod_token) {
        if path.starts_with("/create/") || path.starts_with("/logs/") {
            return next.run(request).await;
        }
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the pod's own token does not allow {path}"),
        )
        .into_response();
    }
    if sidecar.coordinator_keys.is_empty() {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    let ips: Vec<String> = ums_proc::local_addresses()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    let uid = sidecar.podinfo.uid().await;
    let migration = sidecar
        .podinfo
        .read()
        .await
        .ok()
        .and_then(|pod| pod.annotations.migration_id);
    let access = credential::Access {
        path: &path,
        over_tls: request
            .extensions()
            .get::<ums_tls::ConnectionInfo>()
            .is_some_and(|c| c.tls),
        pod_uid: uid.as_deref(),
        pod_migration: migration.as_deref(),
    };
    let decision = credential::authorize(
        &presented,
        &sidecar.coordinator_keys,
        &ips,
        credential::now_unix(),
        &access,
    );
    match decision {
        Ok(_) => next.run(request).await,
        Err(credential::Refusal::Unauthorized(m)) => {
            ApiError::new(StatusCode::UNAUTHORIZED, m).into_response()
        }
        Err(credential::Refusal::Forbidden(m)) => {
            ApiError::new(StatusCode::FORBIDDEN, m).into_response()
        }
    }
}

async fn healthz(State(sidecar): State<Arc<Sidecar>>) -> Json<serde_json::Value> {
    let resumed_from = sidecar.resumed_from.lock().ok().and_then(|r| r.clone());
    Json(serde_json::json!({
        "status": "ok",
        "engine": sidecar.engine.kind(),
        "instance": sidecar.instance,
        "resumedFrom": resumed_from,
    }))
}

/// The SHA-256 of the certificate this sidecar serves TLS with: public, and what a peer pins.
async fn tls(State(sidecar): State<Arc<Sidecar>>) -> Result<Response, ApiError> {
    match &sidecar.tls_sha256 {
        Some(pin) => Ok(Json(serde_json::json!({ "certificateSha256": pin })).into_response()),
        None => Err(ApiError::not_found("this sidecar serves no TLS")),
    }
}

async fn info(State(sidecar): State<Arc<Sidecar>>) -> Result<Response, ApiError> {
    Ok(Json(sidecar.sidecar_info().await?).into_response())
}

async fn containers(State(sidecar): State<Arc<Sidecar>>) -> Result<Response, ApiError> {
    Ok(Json(sidecar.engine.list().await?).into_response())
}

#[derive(Debug, Deserialize)]
struct ProbeQuery {
    kind: Option<ums_probe::Kind>,
}

/// The nested container's state for the kubelet (`/probe/{name}`; see `Sidecar::probe`). With
/// `kind` (an ambassador's probes, as the webhook redirects them), a running container answers
/// its own network probe of that kind too (through the pod's shared network namespace): 200, or
/// 503 saying why it failed. Exec probes are answered by the state, as before.
async fn probe(
    State(sidecar): State<Arc<Sidecar>>,
    Path(name): Path<String>,
    Query(query): Query<ProbeQuery>,
) -> Result<Response, ApiError> {
    let outcome = sidecar.probe(&name).await?;
    if outcome.status == StatusCode::NO_CONTENT {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let original = match query.kind {
        Some(kind) if outcome.status == StatusCode::OK && outcome.state == "running" => sidecar
            .podinfo
            .read()
            .await
            .ok()
            .and_then(|pod| pod.container(&name).cloned())
            .and_then(|c| kind.of(&c).cloned().map(|p| (p, c))),
        _ => None,
    };
    if let Some((probe, container)) = original {
        let checked = ums_probe::run(&probe, &container, |_, _| async { Ok(()) }).await;
        if let Err(failure) = checked {
            let mut body = serde_json::to_value(&outcome).unwrap_or_default();
            body["probe"] = failure.into();
            return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
        }
    }
    Ok((outcome.status, Json(outcome)).into_response())
}

async fn create(
    State(sidecar): State<Arc<Sidecar>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (status, outcome) = sidecar.create_for_ambassador(&name).await?;
    Ok((status, Json(outcome)).into_response())
}

async fn stop(State(sidecar): State<Arc<Sidecar>>) -> Result<Response, ApiError> {
    let _busy = sidecar
        .busy
        .try_lock()
        .map_err(|_| ApiError::conflict("a checkpoint, restore or migration is in progress"))?;
    Ok(Json(sidecar.stop_all(10).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Only output after this UNIX time in nanoseconds (exclusive), as a decimal string: the
    /// `time` of the last stdout line a reader saw (and of the last stderr line unless
    /// `afterStderr` says otherwise).
    #[serde(default)]
    after: Option<String>,
    /// Only stderr output after this time: the `time` of the last stderr line a reader saw.
    /// Docker stamps the two streams in separate copiers, so their times interleave out of
    /// order; a reader resumes each where it left it.
    #[serde(default)]
    after_stderr: Option<String>,
}

fn unix_nanos(field: &str, text: Option<&str>) -> Result<Option<i128>, ApiError> {
    match text {
        None | Some("") => Ok(None),
        Some(text) => text.parse::<i128>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{field}={text:?} is not UNIX nanoseconds"))
        }),
    }
}

/// The nested container's output as NDJSON lines `{"stream":"stdout","data":"..."}`.
async fn logs(
    State(sidecar): State<Arc<Sidecar>>,
    Path(name): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let after = unix_nanos("after", query.after.as_deref())?.unwrap_or(0);
    let resume = LogResume {
        stdout_after: after,
        stderr_after: unix_nanos("afterStderr", query.after_stderr.as_deref())?.unwrap_or(after),
    };
    let stream = sidecar.engine.logs(&name, query.follow, resume).await?;
    let lines = stream.map(|chunk| {
        let line = match chunk {
            Ok(LogChunk {
                stream,
                time_nanos,
                data,
            }) => serde_json::json!({
                "stream": if stream == LogStreamKind::Stdout { "stdout" } else { "stderr" },
                "time": time_nanos.map(|t| t.to_string()),
                "data": String::from_utf8_lossy(&data),
            }),
            Err(e) => serde_json::json!({ "stream": "error", "data": crate::error::chain(&e) }),
        };
        Ok::<_, std::io::Error>(bytes::Bytes::from(format!("{line}\n")))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CheckpointQuery {
    container: Option<String>,
    #[serde(default)]
    leave_running: bool,
    /// `none` or `zstd`.
    compression: Option<String>,
    /// Comma-separated volumes to carry besides the pod-local ones.
    include_volumes: Option<String>,
    /// Comma-separated pod-local volumes to leave.
    exclude_volumes: Option<String>,
}

fn names(list: Option<&str>) -> Vec<String> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn checkpoint(
    State(sidecar): State<Arc<Sidecar>>,
    Query(query): Query<CheckpointQuery>,
) -> Result<Response, ApiError> {
    let busy = sidecar
        .busy
        .clone()
        .try_lock_owned()
        .map_err(|_| ApiError::conflict("a checkpoint, restore or migration is in progress"))?;
    let zstd = match query.compression.as_deref() {
        None | Some("none") => None,
        Some("zstd") => Some(1),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown compression {other:?}: use \"none\" or \"zstd\""
            )))
        }
    };
    let containers: Vec<String> = query.container.into_iter().collect();
    let selected = sidecar.select(&containers).await?;
    let volumes = sidecar
        .travelling_volumes(&VolumeChoice {
            include: names(query.include_volumes.as_deref()),
            exclude: names(query.exclude_volumes.as_deref()),
        })
        .await?;
    let id = new_id("c");
    let dump = sidecar
        .freeze_and_dump(
            selected,
            &volumes,
            &Default::default(),
            &id,
            query.leave_running,
            false,
        )
        .await
        .map_err(|f| {
            f.error
                .with_detail(serde_json::json!({ "rollback": f.rollback }))
        })?;
    let (stream, writer) = archive_stream(&dump, zstd);
    // The lock is held until the archive is written.
    tokio::spawn(async move {
        if let Ok(Err(e)) = writer.await {
            tracing::warn!(error = %e, "checkpoint archive stream ended early");
        }
        drop(busy);
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "application/x-tar"
            .parse()
            .map_err(|_| ApiError::internal("header"))?,
    );
    if zstd.is_some() {
        headers.insert(
            header::CONTENT_ENCODING,
            "zstd".parse().map_err(|_| ApiError::internal("header"))?,
        );
    }
    Ok(response)
}

async fn preflight(
    State(sidecar): State<Arc<Sidecar>>,
    body: Result<Json<PreflightRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError::bad_request(format!("invalid preflight request: {}", e.body_text()))
    })?;
    if sidecar.busy.try_lock().is_err() {
        return Err(ApiError::conflict(
            "a checkpoint, restore or migration is in progress at the destination",
        ));
    }
    let answer = sidecar.preflight(&request).await?;
    Ok(Json(answer).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RestoreQuery {
    migration_id: Option<String>,
}

async fn restore(
    State(sidecar): State<Arc<Sidecar>>,
    Query(query): Query<RestoreQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let _busy = sidecar
        .busy
        .try_lock()
        .map_err(|_| ApiError::conflict("a checkpoint, restore or migration is in progress"))?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let (reader, pump) = drained_reader(body);
    let migration_id = query.migration_id.unwrap_or_else(|| "restore".into());
    let restored = match encoding.as_str() {
        "identity" => sidecar.restore_archive(reader, &migration_id).await,
        "zstd" => match zstd::stream::read::Decoder::new(reader) {
            Ok(decoder) => sidecar.restore_archive(decoder, &migration_id).await,
            Err(e) => Err(ApiError::bad_request(format!("invalid zstd stream: {e}"))),
        },
        other => {
            // Unread: the pump discards the body from here.
            drop(reader);
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding {other:?}: use identity or zstd"),
            ))
        }
    };
    match restored {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e) => {
            // The source is still sending: read the rest of its stream (for a while) so that
            // it hears this answer instead of a broken pipe that names nothing.
            let drained = tokio::time::timeout(DRAIN_AFTER_FAILURE, pump).await;
            tracing::info!(migration = %migration_id, error = %e.error, drained = ?drained.ok().and_then(Result::ok), "restore failed; the rest of the stream was read before answering");
            Err(e)
        }
    }
}

/// How long a failed restore keeps reading the source's stream before it answers.
const DRAIN_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(30);

/// A blocking reader over `body` (drained once the restore stops reading: see
/// [`crate::archive::transfer::drained_reader`]).
fn drained_reader(
    body: Body,
) -> (
    SyncIoBridge<impl tokio::io::AsyncRead + Unpin>,
    tokio::task::JoinHandle<u64>,
) {
    crate::archive::transfer::drained_reader(body.into_data_stream())
}

/// Post-copy: the source's CRIU page server, carried both ways (request body: from the source;
/// response body: from this side's lazy-pages daemon) while the restore of `migration_id`
/// runs. Not serialised by `busy`: the restore it serves holds it.
async fn restore_pages(
    State(sidecar): State<Arc<Sidecar>>,
    Path(migration_id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let incoming = body.into_data_stream().map_err(std::io::Error::other);
    let back = crate::postcopy::serve_pages(&sidecar.page_tunnels, &migration_id, incoming)
        .await
        .map_err(ApiError::conflict)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(back))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// `POST /migrate/{id}/abort`: 202 while the migration can be stopped (its own answer is then
/// a 409 with its rollback); 404 for no such migration under way; 409 once the destination
/// runs the containers.
async fn abort_migration(
    State(sidecar): State<Arc<Sidecar>>,
    Path(migration_id): Path<String>,
) -> Response {
    let (status, body) = sidecar.aborts.answer(&migration_id);
    if status == 202 {
        tracing::warn!(migration = %migration_id, "migration abort asked: stopping it and rolling back");
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

async fn migrate(
    State(sidecar): State<Arc<Sidecar>>,
    body: Result<Json<MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError::bad_request(format!("invalid migrate request: {}", e.body_text()))
    })?;
    let busy = sidecar
        .busy
        .clone()
        .try_lock_owned()
        .map_err(|_| ApiError::conflict("a migration is already in progress"))?;
    // The migration runs to its end (success, or its own rollback) even if the caller goes
    // away: a coordinator that dies mid-migration must not leave the containers frozen or
    // dumped with no one to bring them back. Its restarted self reads the outcome from the
    // probes (and the pod's journal).
    let running = sidecar.clone();
    let migration = tokio::spawn(async move {
        let _busy = busy;
        running.migrate(request).await
    });
    match migration.await {
        Ok(report) => Ok(Json(report?).into_response()),
        Err(e) => Err(ApiError::internal(format!(
            "the migration task failed: {e}"
        ))),
    }
}
