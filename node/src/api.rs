//! The node part's HTTP API on the pod network, for this cluster's coordinator only (its signed
//! token, bound to this pod's IP and UID, as the sidecars take it):
//! - `POST /send` `{"archive", "url", "token", "caPem"}`: streams the archive to `url` (the
//!   destination coordinator's `PUT /checkpoints/{migration}/{container}`) over TLS verified
//!   against `caPem`, with the migration's upload credential; answers the destination's answer;
//! - `POST /push` `{"archive", "target", "container", "caPem", "insecure"}`: streams the archive
//!   into a registry as a checkpoint image (`target`: `registry/repository:tag`, as this node
//!   reaches it): how the source's coordinator restores the pod at the source when the
//!   destination failed after the source was stopped;
//! - `POST /volumes` `{"podUid", "pod", "namespace", "migrationId", "volumes"}`: writes the
//!   named emptyDir volumes of that pod (read in the kubelet's pod directories, mounted
//!   read-only) into one tar archive beside the checkpoints, a top directory per volume, owners,
//!   modes and symbolic links kept; answers its node path and size;
//! - `GET /archives/{name}`: streams an archive (the source's coordinator restoring a pod at the
//!   source takes its emptyDir archive this way);
//! - `DELETE /archives/{name}`: removes an archive (the migration is over);
//! - `POST /archives/remove` `{"pod", "namespace", "containers", "migrationId", "sinceUnixMs"}`:
//!   removes what an interrupted checkpoint of that pod left (its containers' kubelet archives
//!   written since then, the migration's emptyDir archive), for a coordinator that stopped
//!   while checkpointing; answers the names removed;
//! - `GET /healthz` (open): also whether it can read emptyDirs (`"emptyDirs"`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use ums_contract::credential::{now_unix, verify, Scope};

use crate::archive::{archive_path, empty_dir_path, left_by_checkpoint, volumes_archive_name};

/// What the handlers share.
#[derive(Debug)]
pub struct NodePart {
    /// Where the checkpoint directory is mounted in this container.
    pub dir: PathBuf,
    /// The same directory as the node (and the kubelet's answers) name it.
    pub node_dir: PathBuf,
    pub coordinator_keys: Vec<Vec<u8>>,
    pub pod_ip: String,
    pub pod_uid: Option<String>,
    /// Where the kubelet's pod directories are mounted (read-only), if they are.
    pub pods_dir: Option<PathBuf>,
}

impl NodePart {
    /// Where the archive `name` (a file name, or the path the kubelet answered) is in this
    /// container, or 400 when it is not an archive name.
    fn archive(&self, name: &str) -> Result<PathBuf, Refusal> {
        archive_path(&self.dir, &self.node_dir, name)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

/// An error answer: status and JSON message.
#[derive(Debug)]
pub struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

pub fn router(part: Arc<NodePart>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/send", post(send))
        .route("/push", post(push))
        .route("/volumes", post(volumes))
        .route("/archives/remove", post(remove_left))
        .route("/archives/{name}", delete(remove).get(download))
        .with_state(part)
}

async fn healthz(State(part): State<Arc<NodePart>>) -> Json<serde_json::Value> {
    let archives = std::fs::read_dir(&part.dir)
        .map(|d| d.filter_map(Result::ok).count())
        .ok();
    Json(
        json!({"status": "ok", "checkpointDir": part.node_dir, "archives": archives,
        // Whether it can archive a pod's emptyDirs (the kubelet's pod directories mounted).
        "emptyDirs": part.pods_dir.is_some()}),
    )
}

/// The request's bearer token (`Authorization: Bearer ...`), or "".
pub fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
}

fn authorize(part: &NodePart, headers: &HeaderMap) -> Result<(), Refusal> {
    let token = bearer(headers);
    if token.is_empty() {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "a token of this cluster's coordinator is required (Authorization: Bearer)".into(),
        ));
    }
    let claims = verify(
        token,
        &part.coordinator_keys,
        std::slice::from_ref(&part.pod_ip),
        now_unix(),
    )
    .map_err(|e| {
        Refusal(
            StatusCode::UNAUTHORIZED,
            format!("the token is refused: {e}"),
        )
    })?;
    if claims.scope != Scope::Coordinator {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "only this cluster's coordinator may send or remove archives".into(),
        ));
    }
    claims
        .check_uid(part.pod_uid.as_deref())
        .map_err(|e| Refusal(StatusCode::FORBIDDEN, e.to_string()))
}

/// A JSON request body, or 400 naming what is wrong with it.
fn request_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// An archive to read: 404 when it is not there, 500 when it cannot be opened.
async fn open_archive(path: &std::path::Path) -> Result<tokio::fs::File, Refusal> {
    tokio::fs::File::open(path).await.map_err(|e| {
        let status = if e.kind() == std::io::ErrorKind::NotFound {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Refusal(status, format!("archive {}: {e}", path.display()))
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SendRequest {
    archive: String,
    url: String,
    token: String,
    ca_pem: String,
}

async fn send(
    State(part): State<Arc<NodePart>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Refusal> {
    authorize(&part, &headers)?;
    let request: SendRequest = request_body(&body)?;
    let path = part.archive(&request.archive)?;
    if !request.url.starts_with("https://") {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "url {:?}: archives leave the node over HTTPS only",
                request.url
            ),
        ));
    }
    let ca = reqwest::Certificate::from_pem(request.ca_pem.as_bytes())
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("caPem: {e}")))?;
    let file = open_archive(&path).await?;
    let bytes = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let started = Instant::now();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    let response = client
        .put(&request.url)
        .bearer_auth(&request.token)
        .header("content-length", bytes)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .map_err(|e| {
            Refusal(
                StatusCode::BAD_GATEWAY,
                format!(
                    "sending {} to {}: {}",
                    request.archive,
                    request.url,
                    ums_tls::error_chain(&e)
                ),
            )
        })?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = answer["error"].as_str().unwrap_or("no message");
        return Err(Refusal(
            StatusCode::BAD_GATEWAY,
            format!(
                "the destination refused {}: {status}: {message}",
                request.archive
            ),
        ));
    }
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(archive = %request.archive, bytes, ms, url = %request.url, "archive sent");
    Ok(Json(
        json!({"archive": request.archive, "bytes": bytes, "sendMs": ms, "destination": answer}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PushRequest {
    archive: String,
    target: String,
    container: String,
    #[serde(default)]
    ca_pem: Option<String>,
    #[serde(default)]
    insecure: bool,
}

async fn push(
    State(part): State<Arc<NodePart>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Refusal> {
    authorize(&part, &headers)?;
    let request: PushRequest = request_body(&body)?;
    let path = part.archive(&request.archive)?;
    let file = open_archive(&path).await?;
    let registry = request
        .target
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let insecure = if request.insecure {
        vec![registry]
    } else {
        Vec::new()
    };
    let cas: Vec<Vec<u8>> = request
        .ca_pem
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let client = ums_checkpoint_image::client(&insecure, &cas)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
    let started = Instant::now();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    let pushed = ums_checkpoint_image::push(&client, &request.target, &request.container, stream)
        .await
        .map_err(|e| Refusal(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(archive = %request.archive, image = %pushed.reference, ms, "archive pushed as a checkpoint image");
    Ok(Json(
        json!({"image": pushed.reference, "digest": pushed.digest,
        "archiveBytes": pushed.archive_bytes, "pushMs": ms}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VolumesRequest {
    pod_uid: String,
    pod: String,
    namespace: String,
    migration_id: String,
    volumes: Vec<String>,
}

async fn volumes(
    State(part): State<Arc<NodePart>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Refusal> {
    authorize(&part, &headers)?;
    let request: VolumesRequest = request_body(&body)?;
    let pods_dir = part.pods_dir.clone().ok_or_else(|| {
        Refusal(
            StatusCode::CONFLICT,
            "this node part does not mount the kubelet's pod directories (deploy/node: the pods volume, UMS_PODS_DIR): it cannot read emptyDir volumes".into(),
        )
    })?;
    let name = volumes_archive_name(&request.pod, &request.namespace, &request.migration_id);
    let path = part.archive(&name)?;
    let mut sources = Vec::new();
    for volume in &request.volumes {
        let dir = empty_dir_path(&pods_dir, &request.pod_uid, volume)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
        if !dir.is_dir() {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                format!(
                    "pod {} has no emptyDir {volume:?} on this node ({} is not a directory)",
                    request.pod_uid,
                    dir.display()
                ),
            ));
        }
        sources.push((volume.clone(), dir));
    }
    let started = Instant::now();
    let written = path.clone();
    let bytes = tokio::task::spawn_blocking(move || write_volumes(&written, &sources))
        .await
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("archiving the emptyDir volumes: {e}"),
            )
        })?;
    let ms = started.elapsed().as_millis() as u64;
    let archive = part.node_dir.join(&name);
    tracing::info!(archive = %archive.display(), bytes, ms, "emptyDir volumes archived");
    Ok(Json(
        json!({"archive": archive, "bytes": bytes, "archiveMs": ms}),
    ))
}

/// One tar archive of the volumes, a top directory per volume; its size.
fn write_volumes(path: &std::path::Path, sources: &[(String, PathBuf)]) -> std::io::Result<u64> {
    let file = std::fs::File::create(path)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    // A link is archived as a link: nothing outside the volume is read through one.
    builder.follow_symlinks(false);
    for (volume, dir) in sources {
        builder.append_dir_all(volume, dir)?;
    }
    let mut writer = builder.into_inner()?;
    std::io::Write::flush(&mut writer)?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

async fn download(
    State(part): State<Arc<NodePart>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    authorize(&part, &headers)?;
    let path = part.archive(&name)?;
    let file = open_archive(&path).await?;
    let bytes = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    Ok((
        [
            ("content-type", "application/x-tar".to_owned()),
            ("content-length", bytes.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LeftRequest {
    pod: String,
    namespace: String,
    containers: Vec<String>,
    migration_id: String,
    since_unix_ms: u64,
}

async fn remove_left(
    State(part): State<Arc<NodePart>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Refusal> {
    authorize(&part, &headers)?;
    let request: LeftRequest = request_body(&body)?;
    // Written since the migration's journal (a second of slack for the clocks' rounding).
    let since =
        std::time::UNIX_EPOCH + Duration::from_millis(request.since_unix_ms.saturating_sub(1000));
    let entries = std::fs::read_dir(&part.dir)
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let recent = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since);
        let left = left_by_checkpoint(
            &file,
            &request.pod,
            &request.namespace,
            &request.containers,
            &request.migration_id,
        );
        if recent && left {
            std::fs::remove_file(entry.path()).map_err(|e| {
                Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("removing {file}: {e}"),
                )
            })?;
            tracing::info!(archive = %file, "archive of an interrupted checkpoint removed");
            removed.push(file);
        }
    }
    Ok(Json(json!({"removed": removed})))
}

async fn remove(
    State(part): State<Arc<NodePart>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Refusal> {
    authorize(&part, &headers)?;
    let path = part.archive(&name)?;
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {
            tracing::info!(archive = %name, "archive removed");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("removing {}: {e}", path.display()),
        )),
    }
}
