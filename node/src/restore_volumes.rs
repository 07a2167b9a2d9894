//! `ums-node restore-volumes`: the init container of a pod restored from checkpoint images
//! (orchestrator-level interface) whose source had emptyDir volumes. It runs before the
//! restored containers, with each emptyDir mounted at `<dir>/<volume>`, and waits for the
//! coordinator that created the pod to send the volumes' archive:
//! - `GET /tls` (plain HTTP, open): the SHA-256 of the throwaway certificate it made at start,
//!   asked by the coordinator over its cluster's pod network, as it asks a sidecar;
//! - `PUT /volumes` (TLS with that certificate only; the coordinator's signed token, bound to
//!   this pod's IP and UID): the tar archive the source's node part wrote, unpacked into the
//!   mounted volumes with owners, modes and times. Then it exits 0 and the restored containers
//!   start on their files.
//!
//! Nothing arrives within the wait (`UMS_RESTORE_WAIT_SECONDS`): it exits 1, the pod does not
//! start, and the coordinator that waits for it reports the failure.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use futures_util::TryStreamExt as _;
use serde_json::json;
use tokio::sync::watch;
use ums_contract::credential::{now_unix, verify, Scope};
use ums_tls::ConnectionInfo;

/// What went wrong unpacking the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the archive: {0}")]
    Read(#[from] std::io::Error),
    #[error("archive entry {0:?} is not inside a volume directory")]
    Outside(String),
    #[error("the archive holds volume {0:?}, which is not mounted in this init container")]
    NotMounted(String),
}

/// Unpacks a volumes archive (a top directory per volume) into `dir`, where each volume is
/// mounted: owners, modes, times and links as archived; nothing outside a mounted volume.
/// The number of entries and their bytes.
pub fn unpack_volumes(reader: impl Read, dir: &Path) -> Result<(u64, u64), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let (mut entries, mut bytes) = (0u64, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let shown = path.display().to_string();
        let volume = match path.components().next() {
            Some(Component::Normal(volume)) => volume.to_owned(),
            _ => return Err(UnpackError::Outside(shown)),
        };
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(UnpackError::Outside(shown));
        }
        if !dir.join(&volume).is_dir() {
            return Err(UnpackError::NotMounted(
                volume.to_string_lossy().into_owned(),
            ));
        }
        bytes += entry.size();
        if !entry.unpack_in(dir)? {
            return Err(UnpackError::Outside(shown));
        }
        entries += 1;
    }
    Ok((entries, bytes))
}

struct Restorer {
    dir: PathBuf,
    keys: Vec<Vec<u8>>,
    pod_ip: String,
    pod_uid: Option<String>,
    sha256: String,
    done: watch::Sender<bool>,
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// Runs the init container: serves until the archive is unpacked (Ok) or the wait is over.
pub async fn run(
    listen: std::net::SocketAddr,
    dir: PathBuf,
    keys: Vec<Vec<u8>>,
    pod_ip: String,
    pod_uid: Option<String>,
    wait: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a directory: the volumes are mounted under it",
        dir.display()
    );
    let cert = ums_tls::pinned::EphemeralCert::generate("ums-restore-volumes")?;
    let (done, mut finished) = watch::channel(false);
    let restorer = Arc::new(Restorer {
        dir,
        keys,
        pod_ip,
        pod_uid,
        sha256: cert.sha256().to_owned(),
        done,
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/tls", get(tls))
        .route("/volumes", put(receive))
        .with_state(restorer.clone());
    let listener = ums_tls::bind(listen).await?;
    tracing::info!(listen = %listener.local_addr()?, dir = %restorer.dir.display(), certificate = %restorer.sha256, "waiting for the emptyDir volumes");
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let mut received = finished.clone();
    let shutdown = async move {
        let _ = received.wait_for(|done| *done).await;
    };
    let serve = ums_tls::serve(
        listener,
        ums_tls::Transport::TlsOrPlain(acceptor),
        app,
        shutdown,
    );
    tokio::select! {
        () = serve => {}
        () = tokio::time::sleep(wait) => {
            anyhow::bail!("no volumes arrived within {} s", wait.as_secs());
        }
    }
    anyhow::ensure!(
        *finished.borrow_and_update(),
        "stopped before the volumes arrived"
    );
    Ok(())
}

async fn tls(State(restorer): State<Arc<Restorer>>) -> Json<serde_json::Value> {
    Json(json!({"certificateSha256": restorer.sha256}))
}

async fn receive(
    State(restorer): State<Arc<Restorer>>,
    Extension(connection): Extension<ConnectionInfo>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if !connection.tls {
        return refusal(
            StatusCode::FORBIDDEN,
            "the volumes are taken over TLS only (https:// with the certificate GET /tls names)",
        );
    }
    let claims = match verify(
        crate::api::bearer(&headers),
        &restorer.keys,
        std::slice::from_ref(&restorer.pod_ip),
        now_unix(),
    ) {
        Ok(claims) => claims,
        Err(e) => {
            return refusal(
                StatusCode::UNAUTHORIZED,
                format!("a token of the coordinator that created this pod is required: {e}"),
            )
        }
    };
    if claims.scope != Scope::Coordinator {
        return refusal(
            StatusCode::FORBIDDEN,
            "only the coordinator that created this pod sends its volumes",
        );
    }
    if let Err(e) = claims.check_uid(restorer.pod_uid.as_deref()) {
        return refusal(StatusCode::FORBIDDEN, e.to_string());
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let dir = restorer.dir.clone();
    let unpacked = tokio::task::spawn_blocking(move || unpack_volumes(reader, &dir)).await;
    match unpacked {
        Ok(Ok((entries, bytes))) => {
            tracing::info!(entries, bytes, "emptyDir volumes restored");
            restorer.done.send_replace(true);
            Json(json!({"entries": entries, "bytes": bytes})).into_response()
        }
        Ok(Err(e @ (UnpackError::Outside(_) | UnpackError::NotMounted(_)))) => {
            refusal(StatusCode::BAD_REQUEST, e.to_string())
        }
        Ok(Err(e)) => refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o640);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            builder.append_data(&mut header, path, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ums-restore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        dir
    }

    #[test]
    fn files_land_in_their_mounted_volume_with_their_mode() {
        let dir = temp_dir("ok");
        let tar = archive(&[("data/journal", b"tick=50\n"), ("data/sub/x", b"x")]);
        assert_eq!(unpack_volumes(&tar[..], &dir).unwrap(), (2, 9));
        assert_eq!(
            std::fs::read_to_string(dir.join("data/journal")).unwrap(),
            "tick=50\n"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("data/journal"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_volume_not_mounted_here_is_refused() {
        let dir = temp_dir("refused");
        let tar = archive(&[("cache/x", b"x")]);
        assert!(matches!(
            unpack_volumes(&tar[..], &dir),
            Err(UnpackError::NotMounted(v)) if v == "cache"
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
