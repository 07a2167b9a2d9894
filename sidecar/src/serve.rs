//! `ums-sidecar serve`: connect to the nested engine, create the pod's containers per the start
//! mode, follow start-mode changes, serve the API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ums_contract::StartMode;

use crate::cli::{EngineArg, ServeArgs};
use crate::engine::docker::DockerEngine;
use crate::engine::podman::PodmanEngine;
use crate::engine::Engine;
use crate::nested::Sidecar;
use crate::podinfo::PodInfo;

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        engine,
        engine_socket,
        engine_root,
        podinfo,
        listen,
        token_file,
        pod_token_file,
        coordinator_keys,
    } = args;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let engine_socket = engine_socket.unwrap_or_else(|| {
        PathBuf::from(match engine {
            EngineArg::Docker => "/var/run/docker.sock",
            EngineArg::Podman => "/run/podman/podman.sock",
        })
    });
    let engine_root = engine_root.unwrap_or_else(|| {
        PathBuf::from(match engine {
            EngineArg::Docker => "/var/lib/docker",
            EngineArg::Podman => "/var/lib/containers",
        })
    });
    let token = match &token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read token file {}", path.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
            Some(token)
        }
        None => None,
    };
    let engine: Arc<dyn Engine> = match engine {
        EngineArg::Docker => Arc::new(
            connect_with_retry(|| DockerEngine::connect(&engine_socket, &engine_root)).await?,
        ),
        EngineArg::Podman => Arc::new(
            connect_with_retry(|| PodmanEngine::connect(&engine_socket, &engine_root)).await?,
        ),
    };
    let coordinator_keys = match coordinator_keys.as_deref() {
        Some(keys) => {
            ums_contract::credential::parse_public_keys(keys).context("UMS_COORDINATOR_KEYS")?
        }
        None => Vec::new(),
    };
    let pod_token = match &pod_token_file {
        Some(path) => Some(write_pod_token(path)?),
        None => None,
    };
    // TLS for the peers that send a migration here: a certificate made now, in memory; peers
    // learn its SHA-256 through the coordinators (`GET /tls` on this cluster's side).
    let tls = ums_tls::EphemeralCert::generate("ums-sidecar")
        .context("failed to make the sidecar's TLS certificate")?;
    let sidecar = Arc::new(
        Sidecar::new(engine, PodInfo::new(&podinfo), engine_root, token)
            .with_credentials(pod_token, coordinator_keys)
            .with_tls(tls.sha256().to_owned()),
    );
    tracing::info!(
        coordinator_keys = sidecar.coordinator_keys.len(),
        pod_token = sidecar.pod_token.is_some(),
        open = !sidecar.requires_credentials(),
        "credentials"
    );
    // Read once here: later preflights answer from the cache.
    let info = sidecar.engine_info().await?;
    tracing::info!(engine = %info.kind, version = %info.version, criu = %info.criu_version, kernel = %info.kernel, "connected to the nested engine");

    // A dump whose migration did not end (this runtime container died after it): the
    // containers come back from their checkpoints before anything else may touch them.
    for line in sidecar.resume_pending_dump().await {
        tracing::warn!(outcome = %line, "resumed from the dump a migration left");
    }

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to bind {listen}"))?;
    tracing::info!(listen = %listener.local_addr()?, tls_sha256 = %tls.sha256(), "ums-sidecar listening (HTTP, and TLS for peers on the same port)");
    tokio::spawn(follow_start_mode(sidecar.clone()));
    ums_tls::serve(
        listener,
        ums_tls::Transport::TlsOrPlain(tokio_rustls::TlsAcceptor::from(tls.server_config())),
        crate::api::router(sidecar),
        ums_tls::shutdown_signal(),
    )
    .await;
    Ok(())
}

/// The engine starts next to the sidecar in the runtime container: wait for it (two minutes).
async fn connect_with_retry<E, F, Fut>(connect: F) -> anyhow::Result<E>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<E, crate::engine::EngineError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match connect().await {
            Ok(engine) => return Ok(engine),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "waiting for the nested engine");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Creates the pod's containers at start, and again whenever the start mode changes (a
/// passive restore target turned active starts the containers that were not restored).
async fn follow_start_mode(sidecar: Arc<Sidecar>) {
    let mut last: Option<StartMode> = None;
    loop {
        match sidecar.podinfo.read().await {
            Ok(pod) => {
                let mode = pod.start_mode();
                if last != Some(mode) {
                    tracing::info!(start_mode = %mode, "start mode");
                    last = Some(mode);
                    if matches!(mode, StartMode::Active | StartMode::Passive)
                        && sidecar.busy.try_lock().is_ok()
                    {
                        if let Err(e) = sidecar.create_all().await {
                            tracing::warn!(error = %e, "failed to create the pod's containers");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot read the pod's annotations")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A fresh random token for the pod's ambassadors, written to `path` (replacing one a
/// previous run of the runtime container left).
fn write_pod_token(path: &std::path::Path) -> anyhow::Result<String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for the pod token"))?;
    let token = hex::encode(bytes);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, &token)
        .with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(token)
}
