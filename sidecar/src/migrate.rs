//! `POST /migrate`: check the destination, freeze and dump, stream the archive straight into
//! the destination's `/restore`, wait for it to confirm the containers run, then clean up here.
//! If anything fails after the freeze, the containers here are brought back to running.

use std::time::Instant;
use ums_contract::agent;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{archive_stream, ms, new_id, unix_ms, DumpedContainer};
use crate::error::{chain, ApiError};
use crate::images::{images_to_send, SendImages};
use crate::nested::Sidecar;
use crate::restore::{
    PreflightAnswer, PreflightContainer, PreflightRequest, RestoreReport, SidecarInfo,
};
use crate::volumes::VolumeChoice;

/// The body of `POST /migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateRequest {
    /// Base URL of the destination sidecar, e.g. `http://10.0.3.7:8888`.
    pub destination: String,
    /// Containers to move (default: every nested container of the pod).
    #[serde(default)]
    pub containers: Vec<String>,
    /// Keep the source containers running (a copy, not a move).
    #[serde(default)]
    pub leave_running: bool,
    /// `none` (default) or `zstd`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Bearer token of the destination (default: this sidecar's own token).
    #[serde(default)]
    pub destination_token: Option<String>,
    /// SHA-256 (hex) of the certificate the destination serves: required for an `https://`
    /// destination, which is accepted with that certificate only.
    #[serde(default)]
    pub destination_certificate_sha256: Option<String>,
    /// The migration's id (the coordinator's, so both report the same); default: a new one.
    #[serde(default)]
    pub migration_id: Option<String>,
    /// Volumes to carry besides the pod-local ones (`include`), or pod-local ones to leave
    /// (`exclude`), by pod volume name.
    #[serde(default)]
    pub volumes: VolumeChoice,
    /// Images to send in the archive: `auto` (default: those the destination lacks),
    /// `always`, or `never` (a destination without an image refuses).
    #[serde(default)]
    pub images: SendImages,
    /// Post-copy: the destination resumes the processes before their memory has arrived;
    /// pages follow on demand (CRIU lazy pages). One running container, not with
    /// `leaveRunning`. The source stays frozen until the last page has arrived; if the page
    /// stream breaks before, the copy at the destination is removed and the source runs on.
    #[serde(default)]
    pub post_copy: bool,
    /// The sidecar run (`instance` of `GET /healthz`) the caller checked the pod with: another
    /// one means the runtime container restarted since, and the migration is refused.
    #[serde(default)]
    pub expect_instance: Option<String>,
    /// The migration's bandwidth cap: the archive goes out at most this fast (bytes per
    /// second; the coordinator's `bandwidthPerMigration`). Post-copy's page stream is not
    /// paced.
    #[serde(default)]
    pub bandwidth_bytes_per_second: Option<u64>,
}

/// Totals of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationTotals {
    /// Archive bytes sent (after compression).
    pub bytes_sent: u64,
    /// Bytes of file content carried (CRIU images + root-fs changes).
    pub content_bytes: u64,
    pub preflight_ms: u64,
    /// Saving the images to send, before the freeze (part of preflightMs' wait, not of the
    /// downtime).
    pub image_save_ms: u64,
    pub freeze_dump_ms: u64,
    pub transfer_ms: u64,
    pub restore_ms: u64,
    /// Post-copy: from running at the destination to the last page arrived (the service runs
    /// meanwhile; not part of the downtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_ms: Option<u64>,
    /// Post-copy: bytes of CRIU's page stream sent to the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_bytes: Option<u64>,
    /// Frozen at the source until running at the destination.
    pub downtime_ms: u64,
    pub total_ms: u64,
}

/// Per container.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigratedContainer {
    pub name: String,
    pub checkpoint_id: String,
    pub dump_ms: u64,
    pub criu_bytes: u64,
    pub rootfs_bytes: u64,
    pub engine_bytes: u64,
    pub restore_ms: Option<u64>,
    pub memory_parts: usize,
    /// Established TCP connections carried, and whether the destination kept or closed them.
    pub tcp_connections: usize,
    pub tcp: Option<crate::tcp::TcpRestore>,
}

/// The answer of a successful `POST /migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    pub migration_id: String,
    pub destination: String,
    pub compression: String,
    pub source_left_running: bool,
    pub containers: Vec<MigratedContainer>,
    /// The pod volumes carried.
    pub volumes: Vec<crate::archive::VolumeManifest>,
    /// The images sent because the destination lacked them (or `images: always`).
    pub images: Vec<crate::archive::ImageManifest>,
    pub totals: MigrationTotals,
    /// Problems cleaning up the source after success (the service runs at the destination).
    pub cleanup_warnings: Vec<String>,
}

/// A client for the destination sidecar: over TLS, it accepts only the certificate `pin`
/// names.
fn client(pin: Option<&str>) -> Result<reqwest::Client, ApiError> {
    ums_tls::pinned_http_client(pin).map_err(|e| match e {
        ums_tls::ClientError::Pin(e) => {
            ApiError::bad_request(format!("destinationCertificateSha256: {e}"))
        }
        e => ApiError::internal(e.to_string()),
    })
}

/// What post-copy needs of a migration before anything is frozen.
fn check_post_copy(
    request: &MigrateRequest,
    selected: &[crate::engine::ContainerInfo],
) -> Result<(), ApiError> {
    if request.leave_running {
        return Err(ApiError::bad_request(
            "postCopy moves the service: it cannot be combined with leaveRunning",
        ));
    }
    match selected {
        [one] if one.is_running() => {}
        [one] => {
            return Err(ApiError::conflict(format!(
                "postCopy needs a running container; {:?} is {}",
                one.name, one.state
            )))
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "postCopy moves one container at a time; this migration has {} (name one in containers)",
                selected.len()
            )))
        }
    }
    crate::postcopy::lazy_pages_possible().map_err(ApiError::conflict)
}

pub use ums_contract::abort::ABORTED;

fn failed(
    status: StatusCode,
    phase: &str,
    error: impl Into<String>,
    rollback: Vec<String>,
) -> ApiError {
    let error = error.into();
    ApiError::new(status, agent::failure_message(phase, &error))
        .with_detail(agent::failure_detail(phase, &error, &rollback))
}

async fn destination_error(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(body);
    format!("destination answered {status}: {message}")
}

impl Sidecar {
    pub async fn migrate(&self, request: MigrateRequest) -> Result<MigrationReport, ApiError> {
        let started = Instant::now();
        let destination = request.destination.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&destination).map_err(|e| {
            ApiError::bad_request(format!("invalid destination {destination:?}: {e}"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ApiError::bad_request(format!(
                "destination {destination:?} must be an http or https URL"
            )));
        }
        let pin = request.destination_certificate_sha256.as_deref();
        if url.scheme() == "https" && pin.is_none() {
            return Err(ApiError::bad_request(
                "an https destination needs destinationCertificateSha256 (what its GET /tls says): sidecars have no CA",
            ));
        }
        if let Some(id) = &request.migration_id {
            if !agent::is_migration_id(id) {
                return Err(ApiError::bad_request(format!(
                    "migrationId {id:?}: letters, digits and '-', at most 63"
                )));
            }
        }
        let zstd_level = match request.compression.as_deref() {
            None | Some("none") => None,
            Some("zstd") => Some(1),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unknown compression {other:?}: use \"none\" or \"zstd\""
                )))
            }
        };
        let token = request
            .destination_token
            .clone()
            .or_else(|| self.token.clone());
        let authorized = |builder: reqwest::RequestBuilder| match &token {
            Some(t) => builder.bearer_auth(t),
            None => builder,
        };
        let http = client(pin.filter(|_| url.scheme() == "https"))?;
        let selected = self.select(&request.containers).await?;
        let volumes = self.travelling_volumes(&request.volumes).await?;
        if request.post_copy {
            check_post_copy(&request, &selected)?;
        }
        // The lowest archive version that carries what this migration sends.
        let mut format_version =
            crate::archive::version_for(self.engine.kind(), !volumes.is_empty(), false);
        if request.post_copy {
            format_version = format_version.max(crate::archive::LAZY_VERSION);
        }
        let migration_id = request.migration_id.clone().unwrap_or_else(|| new_id("m"));
        tracing::info!(migration = %migration_id, %destination, containers = selected.len(), "migration starting");
        if let Some(expected) = request
            .expect_instance
            .as_deref()
            .filter(|e| *e != self.instance)
        {
            return Err(failed(
                StatusCode::CONFLICT,
                "preflight",
                format!(
                    "this sidecar ({}) is not the one the migration was checked with ({expected}): the runtime container restarted in between, and nothing was frozen or moved",
                    self.instance
                ),
                vec![],
            ));
        }
        let registration = self.aborts.begin(&migration_id);
        let cancel = registration.cancel.clone();

        // 1. Preflight: nothing is frozen until the destination says it can restore.
        let unreachable = |e: reqwest::Error| {
            failed(
                StatusCode::BAD_GATEWAY,
                "preflight",
                format!("destination {destination} is unreachable: {}", chain(&e)),
                vec![],
            )
        };
        let info_response = authorized(http.get(format!("{destination}/info")))
            .send()
            .await
            .map_err(unreachable)?;
        if !info_response.status().is_success() {
            return Err(failed(
                StatusCode::BAD_GATEWAY,
                "preflight",
                destination_error(info_response).await,
                vec![],
            ));
        }
        let destination_info: SidecarInfo = info_response.json().await.map_err(|e| {
            failed(
                StatusCode::BAD_GATEWAY,
                "preflight",
                format!("destination /info is not a sidecar's: {e}"),
                vec![],
            )
        })?;
        if !destination_info.format_versions.contains(&format_version) {
            return Err(failed(
                StatusCode::CONFLICT,
                "preflight",
                format!(
                    "destination reads archive versions {:?}; this migration needs version {format_version}{}",
                    destination_info.format_versions,
                    if volumes.is_empty() { "" } else { " (it carries volumes)" }
                ),
                vec![],
            ));
        }
        if zstd_level.is_some() && !destination_info.compression.iter().any(|c| c == "zstd") {
            return Err(failed(
                StatusCode::CONFLICT,
                "preflight",
                "destination does not accept zstd archives",
                vec![],
            ));
        }
        let preflight = PreflightRequest {
            format_version,
            source: self.engine_info().await?,
            containers: selected
                .iter()
                .map(|c| PreflightContainer {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: c.image_id.clone(),
                })
                .collect(),
            volumes: volumes.iter().map(|v| v.name.clone()).collect(),
            images_sendable: request.images != SendImages::Never,
        };
        let response = authorized(
            http.post(format!("{destination}/restore/preflight"))
                .json(&preflight),
        )
        .send()
        .await
        .map_err(unreachable)?;
        if !response.status().is_success() {
            let status = if response.status() == StatusCode::CONFLICT {
                StatusCode::CONFLICT
            } else {
                StatusCode::BAD_GATEWAY
            };
            return Err(failed(
                status,
                "preflight",
                destination_error(response).await,
                vec![],
            ));
        }
        let answer: PreflightAnswer = response.json().await.map_err(|e| {
            failed(
                StatusCode::BAD_GATEWAY,
                "preflight",
                format!("destination's preflight answer is unreadable: {e}"),
                vec![],
            )
        })?;
        // Connections this engine cannot carry are refused here, before the freeze.
        self.tcp_survey(&selected)
            .await
            .map_err(|e| failed(e.status, "preflight", e.error, vec![]))?;
        // Images the destination lacks are saved now, before anything is frozen.
        let wanted: Vec<String> = match request.images {
            SendImages::Never => vec![],
            SendImages::Auto => answer.missing_images.clone(),
            SendImages::Always => selected.iter().map(|c| c.image.clone()).collect(),
        };
        let to_send = images_to_send(&selected, &wanted);
        let with_images =
            crate::archive::version_for(self.engine.kind(), !volumes.is_empty(), true);
        if !to_send.is_empty() && !destination_info.format_versions.contains(&with_images) {
            return Err(failed(
                StatusCode::CONFLICT,
                "preflight",
                format!(
                    "the destination lacks {wanted:?} and reads archive versions {:?}: sending images needs version {with_images}",
                    destination_info.format_versions
                ),
                vec![],
            ));
        }
        let images = self
            .save_images(&to_send, &migration_id)
            .await
            .map_err(|e| failed(e.status, "preflight", e.error, vec![]))?;
        let preflight_ms = ms(started.elapsed());
        if cancel.is_cancelled() {
            images.remove().await;
            return Err(failed(StatusCode::CONFLICT, "preflight", ABORTED, vec![]));
        }

        // 2. Freeze every container, then dump each.
        let dump = match self
            .freeze_and_dump(
                selected,
                &volumes,
                &images,
                &migration_id,
                request.leave_running,
                request.post_copy,
            )
            .await
        {
            Ok(dump) => dump,
            Err(failure) => {
                images.remove().await;
                return Err(failed(
                    StatusCode::BAD_GATEWAY,
                    "freeze/dump",
                    failure.error.error,
                    failure.rollback,
                ));
            }
        };
        // The containers are stopped and live only in their checkpoints until the migration
        // ends: recorded, so that a runtime container that dies meanwhile comes back from them.
        if !dump.leave_running && dump.lazy.is_none() {
            let record = crate::pending::PendingDump {
                migration_id: migration_id.clone(),
                containers: dump
                    .manifest
                    .containers
                    .iter()
                    .filter(|c| c.was_running)
                    .map(|c| crate::pending::PendingContainer {
                        name: c.name.clone(),
                        checkpoint_id: c.checkpoint_id.clone(),
                        tcp_established: !c.tcp_connections.is_empty(),
                        connections: c.tcp_connections.clone(),
                    })
                    .collect(),
            };
            if let Err(e) = crate::pending::write(&self.engine_root, &record) {
                tracing::warn!(error = %e, "could not record the dump as pending (a runtime restart before the migration ends would start the containers afresh)");
            }
        }

        // 3. Stream the archive into the destination's /restore; it answers once the
        //    containers run there.
        let transfer_started = Instant::now();
        // Post-copy: CRIU's page server, carried to the destination while it restores.
        let (verdict, decided) = tokio::sync::oneshot::channel::<bool>();
        let pages = dump.lazy.as_ref().map(|lazy| {
            tokio::spawn(crate::postcopy::carry_pages(
                http.clone(),
                format!("{destination}/restore/pages/{migration_id}"),
                token.clone(),
                lazy.page_server,
                decided,
            ))
        });
        let (stream, writer) = archive_stream(&dump, zstd_level);
        let stream = ums_archive::transfer::paced(stream, request.bandwidth_bytes_per_second);
        let mut post =
            authorized(http.post(format!("{destination}/restore?migrationId={migration_id}")))
                .header("content-type", "application/x-tar")
                .body(reqwest::Body::wrap_stream(stream));
        if zstd_level.is_some() {
            post = post.header("content-encoding", "zstd");
        }
        // An operator's abort stops the transfer (the destination sees its stream end and
        // removes what it had; the coordinator deletes the copy) and rolls back below.
        let outcome = tokio::select! {
            outcome = post.send() => Some(outcome),
            () = cancel.cancelled() => None,
        };
        let aborted = outcome.is_none();
        let written = writer.await.map_err(|e| e.to_string()).and_then(|r| r);
        images.remove().await;
        let restore_report = match outcome {
            None => Err(ABORTED.to_owned()),
            Some(Ok(response)) if response.status().is_success() => {
                match response.json::<RestoreReport>().await {
                    Ok(report) => Ok(report),
                    Err(e) => Err(format!("destination's restore report is unreadable: {e}")),
                }
            }
            Some(Ok(response)) => Err(destination_error(response).await),
            Some(Err(e)) => Err(format!("transfer to {destination} failed: {}", chain(&e))),
        };
        let restore_report = match (&restore_report, &written) {
            (Ok(report), Ok(_)) => report.clone(),
            (Err(error), _) | (Ok(_), Err(error)) => {
                let error = error.clone();
                let error = match &written {
                    // The writer's broken pipe is the abort's doing, not news.
                    Err(w) if !aborted && !error.contains(w.as_str()) => {
                        format!("{error} (archive writer: {w})")
                    }
                    _ => error,
                };
                let mut rollback = vec![];
                // CRIU here is told the pages were not all fetched: it thaws the processes.
                let _ = verdict.send(false);
                if let Some(pages) = pages {
                    if let Ok(Err(e)) = pages.await {
                        tracing::warn!(error = %e, "page stream");
                    }
                }
                if let Some(lazy) = &dump.lazy {
                    rollback.push(lazy.abandon().await);
                }
                if !dump.leave_running {
                    rollback.extend(self.roll_back_dump(&dump).await);
                }
                crate::pending::clear(&self.engine_root);
                let _ = self.remove_checkpoints(&dump).await;
                let status = if aborted {
                    StatusCode::CONFLICT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return Err(failed(status, "transfer/restore", error, rollback));
            }
        };
        // The destination runs the containers: no abort from here on.
        registration.commit();
        // Post-copy: the destination has every page; CRIU at this end ends with its stream.
        let mut page_bytes = None;
        let _ = verdict.send(true);
        if let Some(lazy) = &dump.lazy {
            if let Err(e) = lazy.finished().await {
                tracing::warn!(error = %e, "the destination has every page but CRIU's dump here reported a failure");
            }
            if let Some(pages) = pages {
                match pages.await {
                    Ok(Ok(n)) => page_bytes = Some(n),
                    Ok(Err(e)) => tracing::warn!(error = %e, "page stream"),
                    Err(e) => tracing::warn!(error = %e, "page stream task"),
                }
            }
        }
        let post_copy_ms = restore_report.post_copy_ms;
        let downtime_ms = ms(dump.frozen_at.elapsed()).saturating_sub(post_copy_ms.unwrap_or(0));
        let round_trip_ms =
            ms(transfer_started.elapsed()).saturating_sub(post_copy_ms.unwrap_or(0));
        let bytes_sent = written.unwrap_or(0);

        // 4. The destination runs the containers: they go here.
        let cleanup_warnings = if dump.leave_running {
            self.remove_checkpoints(&dump).await
        } else {
            self.finish_migrated(&dump).await
        };
        crate::pending::clear(&self.engine_root);
        let containers = dump
            .containers
            .iter()
            .map(|c: &DumpedContainer| MigratedContainer {
                name: c.name.clone(),
                checkpoint_id: c.checkpoint_id.clone(),
                dump_ms: c.dump_ms,
                criu_bytes: c.criu_bytes,
                rootfs_bytes: c.rootfs_bytes,
                engine_bytes: c.engine_bytes,
                restore_ms: restore_report
                    .containers
                    .iter()
                    .find(|r| r.name == c.name)
                    .map(|r| r.restore_ms),
                memory_parts: 1,
                tcp_connections: restore_report
                    .containers
                    .iter()
                    .find(|r| r.name == c.name)
                    .map(|r| r.tcp_connections)
                    .unwrap_or(0),
                tcp: restore_report
                    .containers
                    .iter()
                    .find(|r| r.name == c.name)
                    .map(|r| r.tcp),
            })
            .collect();
        let report = MigrationReport {
            migration_id,
            destination,
            compression: if zstd_level.is_some() {
                "zstd".into()
            } else {
                "none".into()
            },
            source_left_running: dump.leave_running,
            containers,
            volumes: dump.manifest.volumes.clone(),
            images: dump.manifest.images.clone(),
            totals: MigrationTotals {
                bytes_sent,
                content_bytes: restore_report.content_bytes,
                preflight_ms,
                image_save_ms: images.save_ms,
                freeze_dump_ms: dump.freeze_dump_ms,
                transfer_ms: round_trip_ms.saturating_sub(restore_report.restore_ms),
                restore_ms: restore_report.restore_ms,
                post_copy_ms,
                page_bytes,
                downtime_ms: if dump.leave_running { 0 } else { downtime_ms },
                total_ms: ms(started.elapsed()),
            },
            cleanup_warnings,
        };
        tracing::info!(migration = %report.migration_id, downtime_ms = report.totals.downtime_ms, at = unix_ms(), "migration completed");
        Ok(report)
    }

    async fn remove_checkpoints(&self, dump: &crate::checkpoint::Dump) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &dump.manifest.containers {
            if let Err(e) = self
                .engine
                .remove_checkpoint(&c.name, &c.checkpoint_id)
                .await
            {
                problems.push(format!("{}: {}", c.name, chain(&e)));
            }
        }
        problems
    }
}
