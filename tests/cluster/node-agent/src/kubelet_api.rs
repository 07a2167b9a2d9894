//! The kubelet's checkpoint endpoint (KEP-2008), with the kubelet's contract:
//! `POST /checkpoint/{namespace}/{pod}/{container}[?timeout=SECONDS]` over HTTPS writes the
//! container's checkpoint archive on the node as
//! `<checkpoint dir>/checkpoint-<pod>_<namespace>-<container>-<RFC 3339 time>.tar` and answers
//! `{"items": ["<path>"]}`. A request without a known bearer token is 401; a user without
//! `nodes/checkpoint` (the allowed users, or `system:masters`) is 403; an unknown pod or
//! container is 404; a runtime that cannot checkpoint, or fails, is 500 with its message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use crate::node::ContainerIndex;
use crate::runtime::Runtime;

/// A user the token file names.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// Reads a static token file, the format of kube-apiserver's `--token-authentication-file`
/// (`token,user,uid,"group1,group2"`): the kubelet authenticates the cluster's users as its API
/// server does.
pub fn read_tokens(path: &Path) -> anyhow::Result<HashMap<String, User>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
    let mut tokens = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(4, ',');
        let (Some(token), Some(name)) = (fields.next(), fields.next()) else {
            anyhow::bail!("token file {}: bad line {line:?}", path.display());
        };
        let _uid = fields.next();
        let groups = fields
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        tokens.insert(
            token.to_owned(),
            User {
                name: name.to_owned(),
                groups,
            },
        );
    }
    Ok(tokens)
}

/// What the endpoint needs.
#[derive(Debug)]
pub struct Kubelet<R> {
    pub runtime: Arc<R>,
    pub index: ContainerIndex,
    pub tokens: HashMap<String, User>,
    /// Users granted `create` on `nodes/checkpoint` (RBAC's part, here a list).
    pub checkpoint_users: Vec<String>,
    /// The kubelet's checkpoint directory, as the runtime sees it (the same path on the node).
    pub checkpoint_dir: PathBuf,
    /// Where the node's /run/containerd is on this machine: a failed checkpoint's CRIU log is
    /// read from there into the agent's log.
    pub containerd_run_dir: PathBuf,
}

/// The last lines of the CRIU log a runtime error names (`path= /run/containerd/.../criu-dump.log`).
fn criu_log_tail(error: &str, run_dir: &Path) -> Option<String> {
    let path = error
        .split_whitespace()
        .find(|w| w.ends_with("criu-dump.log") || w.ends_with("criu-dump.log)"))?
        .trim_end_matches(')');
    let on_host = run_dir.join(path.strip_prefix("/run/containerd/")?);
    let text = std::fs::read_to_string(on_host).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(lines[lines.len().saturating_sub(20)..].join("\n"))
}

#[derive(Debug, Deserialize)]
struct CheckpointQuery {
    timeout: Option<String>,
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    let message = message.into();
    (
        status,
        Json(
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "code": status.as_u16()}),
        ),
    )
}

pub fn router<R: Runtime>(kubelet: Arc<Kubelet<R>>) -> Router {
    Router::new()
        .route(
            "/checkpoint/{namespace}/{pod}/{container}",
            post(checkpoint::<R>),
        )
        .with_state(kubelet)
}

async fn checkpoint<R: Runtime>(
    State(kubelet): State<Arc<Kubelet<R>>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(query): Query<CheckpointQuery>,
    headers: HeaderMap,
) -> Answer {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| kubelet.tokens.get(t.trim())) else {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    let allowed = kubelet.checkpoint_users.contains(&user.name)
        || user.groups.iter().any(|g| g == "system:masters");
    if !allowed {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden (user={}, verb=create, resource=nodes, subresource=checkpoint)",
                user.name
            ),
        );
    }
    let timeout = match query.timeout.as_deref() {
        None | Some("") => 0,
        Some(value) => match value.parse::<i64>() {
            Ok(t) if t >= 0 => t,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "cannot parse value of timeout parameter",
                )
            }
        },
    };
    let (pod_known, id) = {
        let Ok(index) = kubelet.index.lock() else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "container index poisoned",
            );
        };
        let pod_known = index
            .keys()
            .any(|(ns, name, _)| ns == &namespace && name == &pod);
        let id = index
            .get(&(namespace.clone(), pod.clone(), container.clone()))
            .cloned();
        (pod_known, id)
    };
    if !pod_known {
        return error(StatusCode::NOT_FOUND, "pod does not exist");
    }
    let Some(id) = id else {
        return error(
            StatusCode::NOT_FOUND,
            format!("container {container} does not exist"),
        );
    };
    let stamp = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    let location = kubelet.checkpoint_dir.join(format!(
        "checkpoint-{pod}_{namespace}-{container}-{stamp}.tar"
    ));
    let started = std::time::Instant::now();
    match kubelet.runtime.checkpoint(&id, &location, timeout).await {
        Ok(()) => {
            tracing::info!(%namespace, %pod, %container, path = %location.display(),
                ms = started.elapsed().as_millis() as u64, "checkpoint written");
            (
                StatusCode::OK,
                Json(serde_json::json!({"items": [location.display().to_string()]})),
            )
        }
        Err(e) => {
            tracing::warn!(%namespace, %pod, %container, error = %e, "checkpoint failed");
            if let Some(tail) = criu_log_tail(&e.to_string(), &kubelet.containerd_run_dir) {
                tracing::warn!(%container, "CRIU's dump log ends:\n{tail}");
            }
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("checkpointing of {namespace}/{pod}/{container} failed ({e})"),
            )
        }
    }
}
