//! `POST /restore` at the destination: the archive from the source's `ums-ff`, read as it
//! arrives into a staging directory (every path and digest checked, the volumes into their
//! mounts), the root-fs files put in place, then the service's tree restored by CRIU before
//! this supervisor starts anything of its own, and adopted as the service.

use std::time::Instant;

use axum::body::Body;
use axum::http::StatusCode;
use serde::Serialize;
use ums_archive::unpack::{unpack, VolumeDirs};
use ums_archive::{criu_prefix, rootfs_prefix, ArchiveError, EngineKind};

use crate::criu::{self, DumpFacts, FACTS_FILE};
use crate::error::{chain, ApiError};
use crate::state::{Ff, Phase};

/// How long a failed restore keeps reading the source's stream before it answers.
const DRAIN_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(30);

/// The answer of a restore.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub migration_id: String,
    pub container: String,
    /// The restored service's PID (the one it had at the source).
    pub pid: i32,
    pub entries: usize,
    pub content_bytes: u64,
    pub unpack_ms: u64,
    pub restore_ms: u64,
    pub rootfs_files: u64,
    pub volumes: Vec<String>,
    /// ums-ff's own peak resident memory once the service was restored, KiB.
    pub supervisor_peak_rss_kib: u64,
}

/// Receives and restores one migration's archive.
pub async fn restore(
    ff: &Ff,
    migration_id: &str,
    encoding: &str,
    body: Body,
) -> Result<RestoreReport, ApiError> {
    let _busy = ff
        .busy
        .try_lock()
        .map_err(|_| ApiError::conflict("a migration or restore is in progress"))?;
    if ff.phase() != Phase::Waiting || ff.supervisor.service().is_some() {
        return Err(ApiError::conflict(format!(
            "this ums-ff is not waiting for a restore (phase {:?})",
            ff.phase()
        )));
    }
    let (reader, pump) = ums_archive::transfer::drained_reader(body.into_data_stream());
    let outcome = match encoding {
        "identity" | "zstd" => receive(ff, migration_id, encoding == "zstd", reader).await,
        other => {
            drop(reader);
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding {other:?}: use identity or zstd"),
            ))
        }
    };
    if let Err(e) = &outcome {
        ff.set_phase(Phase::Waiting);
        let drained = tokio::time::timeout(DRAIN_AFTER_FAILURE, pump).await;
        tracing::warn!(migration = %migration_id, error = %e.error, drained = ?drained.ok().and_then(Result::ok), "restore failed");
    }
    outcome
}

async fn receive<R: std::io::Read + Send + 'static>(
    ff: &Ff,
    migration_id: &str,
    zstd: bool,
    reader: R,
) -> Result<RestoreReport, ApiError> {
    ff.set_phase(Phase::Migrating);
    let staging = ff.config.work_dir.join(format!("in-{migration_id}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", staging.display())))?;
    let volumes: VolumeDirs = ff
        .config
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.path.clone()))
        .collect();
    let container = ff.config.container.clone();
    let into = staging.clone();
    let started = Instant::now();
    let unpacked = tokio::task::spawn_blocking(move || {
        let check = move |manifest: &ums_archive::Manifest| {
            if manifest.source.kind != EngineKind::Ff {
                return Err(ArchiveError::BadManifest(format!(
                    "an archive from a {} engine: ums-ff restores archives from ums-ff",
                    manifest.source.kind
                )));
            }
            match manifest.containers.as_slice() {
                [one] if one.name == container => Ok(volumes),
                _ => Err(ArchiveError::BadManifest(format!(
                    "the archive carries {:?}, this ums-ff supervises {container:?}",
                    manifest
                        .containers
                        .iter()
                        .map(|c| &c.name)
                        .collect::<Vec<_>>()
                ))),
            }
        };
        if zstd {
            let decoder = zstd::stream::read::Decoder::new(reader)
                .map_err(|e| ArchiveError::malformed("its zstd frame", e))?;
            unpack(decoder, &into, check)
        } else {
            unpack(reader, &into, check)
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("the unpacking task failed: {e}")))?;
    let unpacked = match unpacked {
        Ok(u) => u,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.into());
        }
    };
    let unpack_ms = started.elapsed().as_millis() as u64;
    let name = &ff.config.container;
    let dump_dir = staging.join(criu_prefix(name));
    let result = async {
        let placed = crate::carry::place(&staging.join(rootfs_prefix(name))).map_err(|e| {
            ApiError::internal(format!("putting the service's root-fs files in place: {e}"))
        })?;
        let facts: DumpFacts = std::fs::read(dump_dir.join(FACTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the archive has no readable {FACTS_FILE}"),
                )
            })?;
        let (pid, restore_ms) = criu::restore(&ff.supervisor, &dump_dir, &facts)
            .await
            .map_err(|e| ApiError::internal(chain(&e)))?;
        Ok::<_, ApiError>((placed, pid, restore_ms))
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    let (placed, pid, restore_ms) = result?;
    ff.supervisor.adopt(pid);
    ff.set_phase(Phase::Running);
    tracing::info!(migration = %migration_id, pid = pid.as_raw(), restore_ms, "service restored");
    Ok(RestoreReport {
        migration_id: migration_id.to_owned(),
        container: name.clone(),
        pid: pid.as_raw(),
        entries: unpacked.entries,
        content_bytes: unpacked.content_bytes,
        unpack_ms,
        restore_ms,
        rootfs_files: placed,
        volumes: unpacked
            .manifest
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect(),
        supervisor_peak_rss_kib: ums_proc::peak_rss_kib().unwrap_or(0),
    })
}
