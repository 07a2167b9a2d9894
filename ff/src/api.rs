//! `ums-ff`'s HTTP API, the part of the sidecar's contract the coordinator drives (the same
//! paths, bodies and answers): `GET /healthz`, `GET /tls`, `GET /probe/{name}` open;
//! `GET /info`, `POST /migrate` and `POST /migrate/{id}/abort` (the pod's coordinator) and
//! `POST /restore` (the source's
//! `ums-ff`, with the peer token the destination's coordinator signed for this migration, over
//! TLS) behind credentials.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use ums_contract::credential;

use crate::error::ApiError;
use crate::state::{Ff, Phase};

/// The router.
pub fn router(ff: Arc<Ff>) -> Router {
    let protected = Router::new()
        .route("/info", get(info))
        .route("/migrate", post(migrate))
        .route("/migrate/{migration_id}/abort", post(abort_migration))
        .route("/restore", post(restore))
        .route_layer(middleware::from_fn_with_state(ff.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/tls", get(tls))
        .route("/probe/{name}", get(probe))
        .merge(protected)
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint: ums-ff serves /healthz, /tls, /probe/{name}, /info, /migrate, /migrate/{id}/abort, /restore",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .with_state(ff)
}

/// Who may call what: with no coordinator key configured (run by hand), everyone; otherwise a
/// token signed by the pod's coordinator for this pod (its IP and UID): scope `coordinator`
/// everything, scope `peer` (another pod's `ums-ff` sending the migration this pod is under)
/// `/info` and `/restore` over TLS only. None: 401; outside its scope: 403.
async fn require_token(State(ff): State<Arc<Ff>>, request: Request, next: Next) -> Response {
    if ff.coordinator_keys.is_empty() {
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
    let ips: Vec<String> = ums_proc::local_addresses()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    let path = request.uri().path().to_owned();
    let uid = ff.pod_uid();
    let migration = ff.annotations().ok().and_then(|a| a.migration_id);
    let access = credential::Access {
        path: &path,
        over_tls: request
            .extensions()
            .get::<ums_tls::ConnectionInfo>()
            .is_some_and(|c| c.tls),
        pod_uid: uid.as_deref(),
        pod_migration: migration.as_deref(),
    };
    match credential::authorize(
        &presented,
        &ff.coordinator_keys,
        &ips,
        credential::now_unix(),
        &access,
    ) {
        Ok(_) => next.run(request).await,
        Err(credential::Refusal::Unauthorized(m)) => {
            ApiError::new(StatusCode::UNAUTHORIZED, m).into_response()
        }
        Err(credential::Refusal::Forbidden(m)) => {
            ApiError::new(StatusCode::FORBIDDEN, m).into_response()
        }
    }
}

async fn healthz(State(ff): State<Arc<Ff>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "engine": "ff",
        "instance": ff.instance,
        "phase": ff.phase(),
        "container": ff.config.container,
    }))
}

async fn tls(State(ff): State<Arc<Ff>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "certificateSha256": ff.tls_sha256 }))
}

#[derive(Debug, Deserialize)]
struct ProbeQuery {
    kind: Option<crate::probe::Kind>,
}

/// The sidecar's probe contract: 204 while nothing runs and a restore may come, 200 with the
/// state (`running`, `migrating`, `migrated`), 503 while it starts (alive, not ready) and once
/// the service ended. With `kind`
/// (the kubelet's probes, as the webhook redirects them), a running service answers its own
/// probe of that kind: 200, or 503 saying why it failed.
async fn probe(
    State(ff): State<Arc<Ff>>,
    Path(name): Path<String>,
    Query(query): Query<ProbeQuery>,
) -> Response {
    if name != ff.config.container {
        return ApiError::not_found(format!(
            "no container {name:?} here: this ums-ff supervises {:?}",
            ff.config.container
        ))
        .into_response();
    }
    let answer = |status: StatusCode, state: &str, failure: Option<String>| {
        let mut body = serde_json::json!({ "name": name, "state": state });
        if let Some(failure) = failure {
            body["probe"] = failure.into();
        }
        (status, Json(body)).into_response()
    };
    match ff.phase() {
        Phase::Waiting => StatusCode::NO_CONTENT.into_response(),
        // Alive, not ready: the service starts once the PID counter is past its bound.
        Phase::Starting if query.kind == Some(crate::probe::Kind::Liveness) => {
            answer(StatusCode::OK, "starting", None)
        }
        Phase::Starting => answer(StatusCode::SERVICE_UNAVAILABLE, "starting", None),
        // Frozen or gone for a migration: never a reason to restart the container.
        Phase::Migrating => answer(StatusCode::OK, "migrating", None),
        Phase::Migrated => answer(StatusCode::OK, "migrated", None),
        Phase::Ended => answer(StatusCode::SERVICE_UNAVAILABLE, "exited", None),
        Phase::Running => {
            let original = query.kind.and_then(|kind| {
                let annotations = ff.annotations().ok()?;
                let container = annotations
                    .containers?
                    .into_iter()
                    .find(|c| c.name == ff.config.container)?;
                let probe = kind.of(&container)?.clone();
                Some((probe, container))
            });
            let Some((original, container)) = original else {
                return answer(StatusCode::OK, "running", None);
            };
            match crate::probe::run(&original, &container, &ff.supervisor).await {
                Ok(()) => answer(StatusCode::OK, "running", None),
                Err(failure) => answer(StatusCode::SERVICE_UNAVAILABLE, "running", Some(failure)),
            }
        }
    }
}

async fn info(State(ff): State<Arc<Ff>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "engine": crate::migrate::engine_info(),
        "readableVersions": ums_archive::READABLE_VERSIONS,
        "container": ff.config.container,
        "phase": ff.phase(),
        "instance": ff.instance,
    }))
}

async fn migrate(
    State(ff): State<Arc<Ff>>,
    body: Result<Json<crate::migrate::MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let report = crate::migrate::migrate(&ff, request).await?;
    Ok(Json(report).into_response())
}

/// `POST /migrate/{id}/abort`: 202 while the migration can be stopped (its own answer then says
/// it was aborted and the service resumed here), 404 for a migration not under way, 409 once the
/// destination runs the service.
async fn abort_migration(State(ff): State<Arc<Ff>>, Path(migration_id): Path<String>) -> Response {
    let (status, body) = ff.aborts.answer(&migration_id);
    if status == 202 {
        tracing::warn!(migration = %migration_id, "migration abort asked: stopping it and rolling back");
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreQuery {
    migration_id: Option<String>,
}

async fn restore(
    State(ff): State<Arc<Ff>>,
    Query(query): Query<RestoreQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let migration_id = query.migration_id.unwrap_or_else(|| "restore".into());
    let report = crate::restore::restore(&ff, &migration_id, &encoding, body).await?;
    Ok(Json(report).into_response())
}
