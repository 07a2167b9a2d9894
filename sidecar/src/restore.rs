//! The destination side: check an incoming archive against this engine, unpack it into a
//! staging directory (every digest verified), then restore each container and wait until it
//! runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::archive::unpack::{check_manifest, unpack, Unpacked};
use crate::archive::{
    criu_prefix, engine_prefix, rootfs_prefix, ArchiveError, Manifest, MemoryPart,
    READABLE_VERSIONS,
};
use crate::checkpoint::ms;
use crate::engine::{CheckpointFiles, EngineInfo};
use crate::error::{chain, ApiError};
use crate::nested::Sidecar;
use crate::postcopy::LazyDaemon;
use crate::spec::translate;
use crate::tcp::{
    local_addresses, restore_mode, ClosedRestore, ConnectionLock, TcpConnection, TcpRestore,
    RUNC_CRIU_CONFIG,
};
use crate::volumes;

/// What a source asks before it freezes anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightRequest {
    pub format_version: u32,
    pub source: EngineInfo,
    pub containers: Vec<PreflightContainer>,
    /// Pod volumes the archive will carry: each must be a volume of this pod.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// The source can send images this destination lacks (they are then reported, not
    /// refused).
    #[serde(default)]
    pub images_sendable: bool,
}

/// A preflight's yes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightAnswer {
    pub ok: bool,
    /// Images this destination lacks, which the source must send.
    #[serde(default)]
    pub missing_images: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightContainer {
    pub name: String,
    pub image: String,
    pub image_id: String,
}

/// This sidecar's capabilities, for `GET /info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarInfo {
    pub engine: EngineInfo,
    pub format_versions: Vec<u32>,
    pub compression: Vec<String>,
}

/// Whether `source` can be restored on `destination`; the reasons if not.
pub fn compatibility_problems(
    source: &EngineInfo,
    destination: &EngineInfo,
    format_version: u32,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !READABLE_VERSIONS.contains(&format_version) {
        problems.push(format!(
            "archive format version {format_version} is not supported (destination reads {READABLE_VERSIONS:?})"
        ));
    }
    if source.kind != destination.kind {
        problems.push(format!(
            "the source engine is {} and the destination engine is {}: a {} checkpoint cannot be restored by {}",
            source.kind, destination.kind, source.kind, destination.kind
        ));
    }
    if source.architecture != destination.architecture {
        problems.push(format!(
            "CPU architecture differs: source {}, destination {}",
            source.architecture, destination.architecture
        ));
    }
    let major = |v: &str| v.split('.').next().unwrap_or("").to_owned();
    if major(&source.criu_version) != major(&destination.criu_version) {
        problems.push(format!(
            "CRIU major version differs: source {}, destination {}",
            source.criu_version, destination.criu_version
        ));
    }
    let kernel = |v: &str| -> (u32, u32) {
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor)
    };
    if kernel(&destination.kernel) < kernel(&source.kernel) {
        problems.push(format!(
            "destination kernel {} is older than the source's {}: CRIU images may use features it lacks",
            destination.kernel, source.kernel
        ));
    }
    problems
}

/// Per container, after a restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredContainer {
    pub name: String,
    /// Established TCP connections in the checkpoint, and what the restore did with them.
    pub tcp_connections: usize,
    pub tcp: TcpRestore,
    pub state: String,
    pub restore_ms: u64,
}

/// The answer of `POST /restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub migration_id: String,
    pub entries: usize,
    pub content_bytes: u64,
    /// From the first byte received to the trailer verified.
    pub receive_ms: u64,
    /// From the trailer verified to every container running.
    pub restore_ms: u64,
    /// Post-copy: from the processes running here to the last page arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_ms: Option<u64>,
    pub containers: Vec<RestoredContainer>,
}

impl Sidecar {
    pub async fn sidecar_info(&self) -> Result<SidecarInfo, ApiError> {
        Ok(SidecarInfo {
            engine: self.engine_info().await?,
            format_versions: READABLE_VERSIONS.to_vec(),
            compression: vec!["zstd".into()],
        })
    }

    /// Answers whether an archive like this could be restored here now, and which images
    /// it must bring.
    pub async fn preflight(&self, request: &PreflightRequest) -> Result<PreflightAnswer, ApiError> {
        let mut missing_images = Vec::new();
        let here = self.engine_info().await?;
        let mut problems = compatibility_problems(&request.source, &here, request.format_version);
        if !request.volumes.is_empty() {
            let mine = self.pod_volumes().await?;
            for name in &request.volumes {
                if !mine.iter().any(|v| &v.name == name) {
                    problems.push(format!(
                        "volume {name:?} is not a volume of the destination pod (its volumes: {:?})",
                        mine.iter().map(|v| v.name.as_str()).collect::<Vec<_>>()
                    ));
                }
            }
        }
        for c in &request.containers {
            match self.engine.image_id(&c.image).await? {
                None if request.images_sendable => {
                    if !missing_images.contains(&c.image) {
                        missing_images.push(c.image.clone());
                    }
                }
                None => problems.push(format!(
                    "image {:?} of container {:?} is not present at the destination (the source may send it: images \"auto\")",
                    c.image, c.name
                )),
                Some(id) if id != c.image_id => problems.push(format!(
                    "image {:?} of container {:?} has ID {id} at the destination, {} at the source",
                    c.image, c.name, c.image_id
                )),
                Some(_) => {}
            }
            if let Some(existing) = self.engine.inspect(&c.name).await? {
                if existing.is_running() || existing.state == "paused" {
                    problems.push(format!(
                        "container {:?} is already {} at the destination",
                        c.name, existing.state
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(PreflightAnswer {
                ok: true,
                missing_images,
            })
        } else {
            Err(ApiError::conflict(format!(
                "destination cannot restore this archive: {}",
                problems.join("; ")
            ))
            .with_detail(serde_json::json!({ "problems": problems })))
        }
    }

    fn staging_dir(&self, migration_id: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let safe = crate::checkpoint::file_safe_id(migration_id);
        self.engine_root
            .join("ums-staging")
            .join(format!("{safe}-{nanos}"))
    }

    /// Unpacks `reader` (blocking, run on a blocking thread) and restores it.
    pub async fn restore_archive(
        &self,
        reader: impl std::io::Read + Send + 'static,
        migration_id: &str,
    ) -> Result<RestoreReport, ApiError> {
        let here = self.engine_info().await?;
        let staging = self.staging_dir(migration_id);
        std::fs::create_dir_all(&staging).map_err(|e| {
            ApiError::internal(format!("failed to create {}: {e}", staging.display()))
        })?;
        let received = Instant::now();
        let staging_for_unpack = staging.clone();
        // This pod's volumes; an archive's volume arrives in a directory inside the volume of
        // the same name. The directories are shared with the unpacking thread so that they are
        // removed whatever happens.
        let pod_volumes = self.pod_volumes().await.unwrap_or_default();
        let incoming: std::sync::Arc<std::sync::Mutex<volumes::IncomingDirs>> = Default::default();
        let incoming_for_unpack = incoming.clone();
        let id_for_unpack = migration_id.to_owned();
        let unpacked = tokio::task::spawn_blocking(move || {
            unpack(reader, &staging_for_unpack, |manifest| {
                check_manifest(manifest)?;
                let problems =
                    compatibility_problems(&manifest.source, &here, manifest.format_version);
                if !problems.is_empty() {
                    return Err(ArchiveError::BadManifest(problems.join("; ")));
                }
                let names: Vec<String> = manifest.volumes.iter().map(|v| v.name.clone()).collect();
                let dirs = volumes::prepare_incoming(&pod_volumes, &names, &id_for_unpack)
                    .map_err(|e| match e {
                        volumes::VolumeError::Io {
                            action,
                            path,
                            source,
                        } => ArchiveError::io(action, path.display(), source),
                        other => ArchiveError::BadManifest(other.to_string()),
                    })?;
                *incoming_for_unpack
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = dirs.clone();
                Ok(dirs)
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("unpack task failed: {e}")));
        let incoming = std::mem::take(&mut *incoming.lock().unwrap_or_else(|p| p.into_inner()));
        let unpacked = match unpacked {
            // Every digest holds: the volumes go in place before any process is restored.
            Ok(Ok(unpacked)) => match volumes::install_all(&incoming) {
                Ok(()) => Ok(Ok(unpacked)),
                Err(e) => Err(ApiError::from(e)),
            },
            other => {
                for dir in incoming.values() {
                    volumes::discard(dir);
                }
                other
            }
        };
        let result = match unpacked {
            Ok(Ok(unpacked)) => {
                let receive_ms = ms(received.elapsed());
                let names: Vec<String> = unpacked
                    .manifest
                    .containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect();
                self.mark_incoming(&names, true).await;
                let restored = self.restore_unpacked(&unpacked, &staging, receive_ms).await;
                self.mark_incoming(&names, false).await;
                restored
            }
            Ok(Err(e)) => Err(ApiError::from(e)),
            Err(e) => Err(e),
        };
        if let Err(e) = tokio::fs::remove_dir_all(&staging).await {
            tracing::warn!(staging = %staging.display(), error = %e, "failed to remove staging directory");
        }
        result
    }

    async fn restore_unpacked(
        &self,
        unpacked: &Unpacked,
        staging: &Path,
        receive_ms: u64,
    ) -> Result<RestoreReport, ApiError> {
        let manifest: &Manifest = &unpacked.manifest;
        let pod = self.podinfo.read().await.ok();
        let lookup = |var: &str| std::env::var(var).ok();
        let started = Instant::now();
        // Images the source sent, loaded (same ID) before anything is restored.
        self.load_images(manifest, staging).await?;
        // Every digest is verified (unpack); check every container before starting any.
        let mut specs = Vec::new();
        for c in &manifest.containers {
            if let Some(e) = self.engine.inspect(&c.name).await? {
                if e.is_running() || e.state == "paused" {
                    return Err(ApiError::conflict(format!(
                        "container {:?} is already {} here",
                        c.name, e.state
                    )));
                }
                if e.image_id != c.image_id {
                    return Err(ApiError::conflict(format!(
                        "container {:?} exists here with image {}, the archive needs {}",
                        c.name, e.image_id, c.image_id
                    )));
                }
            }
            // This pod's own spec if it has one (its volumes and env), else the archive's.
            let original = pod
                .as_ref()
                .and_then(|p| p.container(&c.name))
                .unwrap_or(&c.spec);
            let volumes = pod
                .as_ref()
                .map(|p| p.volumes().to_vec())
                .unwrap_or_default();
            let mut spec = translate(original, &volumes, &lookup)?;
            // The checkpoint needs exactly the source's image: present here with its ID (it
            // came in the archive or was there), never pulled at this point.
            match self.engine.image_id(&spec.image).await? {
                Some(id) if id == c.image_id => {}
                other => {
                    return Err(ApiError::conflict(format!(
                        "image {:?} of container {:?} is {} here, the checkpoint needs {}",
                        spec.image,
                        c.name,
                        other.unwrap_or_else(|| "not present".into()),
                        c.image_id
                    )))
                }
            }
            spec.pull_policy = crate::spec::PullPolicy::Never;
            specs.push(spec);
        }
        // Connections from one restored container to another: dropped until both ends exist.
        let all_connections: Vec<TcpConnection> = manifest
            .containers
            .iter()
            .flat_map(|c| c.tcp_connections.iter().cloned())
            .collect();
        let _lock = ConnectionLock::hold(&all_connections).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to lock the connections between containers: {e}"),
            )
        })?;
        let mut containers = Vec::new();
        let mut post_copy_ms = None;
        for (c, spec) in manifest.containers.iter().zip(&specs) {
            let one = Instant::now();
            let staged = CheckpointFiles {
                criu_dir: staging.join(criu_prefix(&c.name)),
                rootfs_dir: Some(staging.join(rootfs_prefix(&c.name))).filter(|p| p.exists()),
                engine_dir: Some(staging.join(engine_prefix(&c.name))).filter(|p| p.exists()),
            };
            let here = local_addresses();
            let tcp = restore_mode(&c.tcp_connections, &here);
            // Held until the restore is done (both engines restore closed connections alike).
            let _closed = if tcp == TcpRestore::Closed {
                Some(
                    ClosedRestore::prepare(&c.tcp_connections, &here).map_err(|e| {
                        ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("failed to restore {:?}: {e}", c.name),
                        )
                    })?,
                )
            } else {
                None
            };
            // Post-copy: CRIU's lazy-pages daemon first, and the restore told to use it.
            let lazy = if c.memory_parts == [MemoryPart::Lazy] {
                let daemon = LazyDaemon::start(
                    &self.engine_root,
                    &manifest.migration_id,
                    &staged.criu_dir,
                    self.page_tunnels.clone(),
                )
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("failed to restore {:?}: {}", c.name, chain(&e)),
                    )
                })?;
                Some(daemon)
            } else {
                None
            };
            let lazy_config = match &lazy {
                Some(daemon) => Some(daemon.configure_restore().map_err(|e| {
                    ApiError::internal(format!(
                        "failed to write {RUNC_CRIU_CONFIG} for the lazy restore: {e}"
                    ))
                })?),
                None => None,
            };
            let restored = self
                .engine
                .restore_imported(spec, &c.checkpoint_id, &staged, tcp)
                .await;
            drop(lazy_config);
            if let Err(e) = restored {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("failed to restore {:?}: {}", c.name, chain(&e)),
                ));
            }
            let state = match self.wait_running(&c.name, Duration::from_secs(60)).await {
                Ok(state) => state,
                Err(e) => {
                    if lazy.is_some() {
                        // Its pages will not come (the daemon goes with `lazy`).
                        let _ = self.engine.remove(&c.name).await;
                    }
                    return Err(e);
                }
            };
            let resumed_ms = ms(one.elapsed());
            if let Some(daemon) = lazy {
                let pages = Instant::now();
                if let Err(e) = daemon.finish().await {
                    // Pages that will never come: the copy here cannot go on.
                    let removed = match self.engine.remove(&c.name).await {
                        Ok(()) => "the copy here was removed".to_owned(),
                        Err(r) => format!("the copy here could NOT be removed: {}", chain(&r)),
                    };
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "post-copy of {:?} failed after it resumed here: {}; {removed}",
                            c.name,
                            chain(&e)
                        ),
                    ));
                }
                post_copy_ms = Some(ms(pages.elapsed()));
            }
            let _ = self
                .engine
                .remove_checkpoint(&c.name, &c.checkpoint_id)
                .await;
            containers.push(RestoredContainer {
                name: c.name.clone(),
                tcp_connections: c.tcp_connections.len(),
                tcp,
                state,
                restore_ms: resumed_ms,
            });
        }
        let report = RestoreReport {
            migration_id: manifest.migration_id.clone(),
            entries: unpacked.entries,
            content_bytes: unpacked.content_bytes,
            receive_ms,
            restore_ms: ms(started.elapsed()).saturating_sub(post_copy_ms.unwrap_or(0)),
            post_copy_ms,
            containers,
        };
        tracing::info!(migration = %report.migration_id, restore_ms = report.restore_ms, "restored");
        Ok(report)
    }

    async fn wait_running(&self, name: &str, deadline: Duration) -> Result<String, ApiError> {
        let until = Instant::now() + deadline;
        loop {
            let info = self.engine.inspect(name).await?;
            match info.as_ref().map(|i| i.state.as_str()) {
                Some("running") => return Ok("running".into()),
                Some("exited") | Some("dead") => {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "restored container {name:?} exited (code {:?})",
                            info.and_then(|i| i.exit_code)
                        ),
                    ))
                }
                _ => {}
            }
            if Instant::now() > until {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("restored container {name:?} did not run within {deadline:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::FORMAT_VERSION;
    use crate::engine::EngineKind;

    fn info(kind: EngineKind, criu: &str, kernel: &str, arch: &str) -> EngineInfo {
        EngineInfo {
            kind,
            version: "x".into(),
            api_version: "y".into(),
            criu_version: criu.into(),
            kernel: kernel.into(),
            architecture: arch.into(),
        }
    }

    #[test]
    fn compatibility_names_each_problem() {
        let src = info(EngineKind::Docker, "4.1.1", "6.18.44-fc", "x86_64");
        assert!(compatibility_problems(&src, &src, FORMAT_VERSION).is_empty());
        assert!(compatibility_problems(
            &src,
            &info(EngineKind::Docker, "4.0", "6.19.0", "x86_64"),
            FORMAT_VERSION
        )
        .is_empty());
        let problems = compatibility_problems(
            &src,
            &info(EngineKind::Podman, "3.17", "6.1.0", "aarch64"),
            FORMAT_VERSION + 1,
        );
        let text = problems.join("\n");
        for needle in ["format version", "podman", "architecture", "CRIU", "kernel"] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }
}
