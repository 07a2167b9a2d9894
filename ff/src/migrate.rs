//! `POST /migrate` at the source: check the destination's `ums-ff`, dump the service's tree
//! (left stopped), stream the archive straight into the destination's `/restore`, and once it
//! answers that the service runs there, end the tree here. Anything failing before that resumes
//! the stopped tree where it stopped: the service keeps running here.

use std::path::Path;
use std::time::{Duration, Instant};
use ums_contract::abort::ABORTED;
use ums_contract::agent;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use ums_archive::pack::{plan, summaries, PackSource, PlannedEntry};
use ums_archive::{
    criu_prefix, rootfs_prefix, volume_prefix, ContainerManifest, EngineInfo, EngineKind, Manifest,
    MemoryPart, VolumeManifest,
};

use crate::carry::{mount_points, open_files, rootfs_paths, stage};
use crate::criu::{self, DumpFacts, FACTS_FILE};
use crate::error::{chain, ApiError};
use crate::state::{Ff, Phase};

/// The body of `POST /migrate` (the sidecar's, so the coordinator sends both the same).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrateRequest {
    /// The destination `ums-ff`, `https://ip:8888`.
    pub destination: String,
    /// The peer token the destination's coordinator signed.
    #[serde(default)]
    pub destination_token: Option<String>,
    /// SHA-256 of the destination's certificate: required for an `https://` destination.
    #[serde(default)]
    pub destination_certificate_sha256: Option<String>,
    #[serde(default)]
    pub migration_id: Option<String>,
    /// `none` (default) or `zstd`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Refused: the memory travels in the archive.
    #[serde(default)]
    pub post_copy: bool,
    /// The supervisor run the caller checked the pod with.
    #[serde(default)]
    pub expect_instance: Option<String>,
    /// The migration's bandwidth cap (bytes per second), as the sidecar takes it.
    #[serde(default)]
    pub bandwidth_bytes_per_second: Option<u64>,
}

/// Totals, named as the sidecar names them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub bytes_sent: u64,
    pub content_bytes: u64,
    pub preflight_ms: u64,
    pub freeze_dump_ms: u64,
    pub transfer_ms: u64,
    pub restore_ms: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// ums-ff's own peak resident memory once the service had left, KiB.
    pub supervisor_peak_rss_kib: u64,
}

/// The answer of a migration that succeeded.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    pub migration_id: String,
    pub destination: String,
    pub compression: String,
    pub source_left_running: bool,
    pub containers: Vec<serde_json::Value>,
    pub volumes: Vec<VolumeManifest>,
    /// The root-fs files carried (open files and preserved paths).
    pub rootfs_files: Vec<String>,
    pub totals: Totals,
    /// The destination's answer.
    pub restored: serde_json::Value,
    pub cleanup_warnings: Vec<String>,
}

/// What this supervisor is, for a destination to compare.
pub fn engine_info() -> EngineInfo {
    let uname = nix::sys::utsname::uname().ok();
    EngineInfo {
        kind: EngineKind::Ff,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_version: String::new(),
        criu_version: criu::version().to_owned(),
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        architecture: std::env::consts::ARCH.to_owned(),
    }
}

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

fn client(pin: Option<&str>) -> Result<reqwest::Client, ApiError> {
    ums_tls::pinned_http_client(pin).map_err(|e| match e {
        ums_tls::ClientError::Pin(e) => {
            ApiError::bad_request(format!("destinationCertificateSha256: {e}"))
        }
        e => ApiError::internal(e.to_string()),
    })
}

/// Runs one migration of the service to `request.destination`.
pub async fn migrate(ff: &Ff, request: MigrateRequest) -> Result<MigrationReport, ApiError> {
    let started = Instant::now();
    let _busy = ff
        .busy
        .try_lock()
        .map_err(|_| ApiError::conflict("a migration or restore is in progress"))?;
    if request.post_copy {
        return Err(ApiError::bad_request(
            "postCopy is for wrapped pods (dind, pind): an ff migration carries the memory in its archive",
        ));
    }
    if let Some(expected) = &request.expect_instance {
        if *expected != ff.instance {
            return Err(ApiError::conflict(format!(
                "ums-ff restarted since the pod was checked (run {expected} then, {} now)",
                ff.instance
            )));
        }
    }
    let id = request
        .migration_id
        .clone()
        .unwrap_or_else(|| crate::state::random_hex(4));
    if !agent::is_migration_id(&id) {
        return Err(ApiError::bad_request(format!(
            "migrationId {id:?}: letters, digits and '-', 1 to 63"
        )));
    }
    let registration = ff.aborts.begin(&id);
    let zstd_level = match request.compression.as_deref().unwrap_or("none") {
        "none" => None,
        "zstd" => Some(3),
        other => {
            return Err(ApiError::bad_request(format!(
                "compression {other:?}: none or zstd"
            )))
        }
    };
    let https = request.destination.starts_with("https://");
    if https && request.destination_certificate_sha256.is_none() {
        return Err(ApiError::bad_request(
            "an https:// destination needs destinationCertificateSha256",
        ));
    }
    let http = client(
        request
            .destination_certificate_sha256
            .as_deref()
            .filter(|_| https),
    )?;
    let Some(service) = ff.supervisor.service() else {
        return Err(ApiError::conflict(format!(
            "no service runs here (phase {:?})",
            ff.phase()
        )));
    };
    let destination = request.destination.trim_end_matches('/').to_owned();
    let token = request.destination_token.clone().unwrap_or_default();

    // Before anything stops: the destination is an ums-ff that reads this format and waits.
    let preflight = Instant::now();
    let answer = http
        .get(format!("{destination}/info"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| {
            failed(
                StatusCode::BAD_GATEWAY,
                "preflight",
                format!("destination {destination} unreachable: {}", chain(&e)),
                vec![],
            )
        })?;
    let status = answer.status();
    let info: serde_json::Value = answer.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            "preflight",
            format!(
                "destination answered {status}: {}",
                info["error"].as_str().unwrap_or("no message")
            ),
            vec![],
        ));
    }
    let here = engine_info();
    if info["engine"]["kind"] != "ff" {
        return Err(failed(
            StatusCode::CONFLICT,
            "preflight",
            format!(
                "the destination is not an ums-ff (engine {})",
                info["engine"]["kind"]
            ),
            vec![],
        ));
    }
    if info["phase"] != "waiting" {
        return Err(failed(
            StatusCode::CONFLICT,
            "preflight",
            format!(
                "the destination's ums-ff is not waiting for a restore (phase {})",
                info["phase"]
            ),
            vec![],
        ));
    }
    if info["engine"]["criuVersion"] != here.criu_version.as_str()
        || info["engine"]["architecture"] != here.architecture.as_str()
    {
        return Err(failed(StatusCode::CONFLICT, "preflight", format!("the destination has {} on {}, this pod {} on {}: the same image at both ends is needed", info["engine"]["criuVersion"], info["engine"]["architecture"], here.criu_version, here.architecture), vec![]));
    }
    if !info["readableVersions"]
        .as_array()
        .is_some_and(|v| v.iter().any(|v| v == 5))
    {
        return Err(failed(
            StatusCode::CONFLICT,
            "preflight",
            "the destination does not read archive format 5",
            vec![],
        ));
    }
    let preflight_ms = preflight.elapsed().as_millis() as u64;
    if registration.cancel.is_cancelled() {
        return Err(failed(StatusCode::CONFLICT, "preflight", ABORTED, vec![]));
    }

    let work = ff.config.work_dir.join(format!("out-{id}"));
    let _ = std::fs::remove_dir_all(&work);
    let dump_dir = work.join("criu");
    let rootfs_dir = work.join("rootfs");
    for dir in [&dump_dir, &rootfs_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
    }
    ff.set_phase(Phase::Migrating);
    let frozen = Instant::now();
    tracing::info!(migration = %id, pid = service.as_raw(), %destination, "dumping the service");
    let (facts, dump_ms) = match criu::dump(&ff.supervisor, service, &dump_dir).await {
        Ok(done) => done,
        Err(e) => {
            // A failed dump lets the tree go itself; a stop signal it left is undone here.
            let rollback = resume_lines(
                &ums_proc::process_tree(service.as_raw() as u32)
                    .into_iter()
                    .map(|p| p as i32)
                    .collect::<Vec<_>>(),
            );
            ff.set_phase(Phase::Running);
            let _ = std::fs::remove_dir_all(&work);
            return Err(failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "dump",
                chain(&e),
                rollback,
            ));
        }
    };
    // An operator's abort stops the transfer (the destination sees its stream end and removes
    // what it had) and the service resumes below, unless the destination already runs it.
    let sending = send(
        ff,
        &id,
        &destination,
        &token,
        &http,
        zstd_level,
        request.bandwidth_bytes_per_second,
        &facts,
        &dump_dir,
        &rootfs_dir,
    );
    let outcome = tokio::select! {
        outcome = sending => outcome,
        () = registration.cancel.cancelled() => {
            Err((StatusCode::CONFLICT, "transfer", ABORTED.to_owned()))
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    // The answer can be lost after the destination restored the service (the connection cut
    // on its way back): resuming here would make two copies. The destination's ums-ff that
    // waited at the preflight says where the service runs now; only where it cannot say (gone,
    // unreachable) does the service resume here.
    let outcome = match outcome {
        Err((_, "transfer", error)) if runs_at(&http, &destination, &info).await => {
            tracing::warn!(migration = %id, %error, "the destination's answer was lost; it runs the service");
            Ok(Sent::unanswered(error))
        }
        other => other,
    };
    match outcome {
        Ok(sent) => {
            registration.commit();
            // The service runs at the destination: its tree here goes, and so does its end.
            ff.supervisor.release();
            let warnings = criu::kill_tree(&facts.tree);
            ff.set_phase(Phase::Migrated);
            let restore_ms = sent.restored["restoreMs"].as_u64().unwrap_or(0);
            let downtime_ms = frozen.elapsed().as_millis() as u64;
            tracing::info!(migration = %id, downtime_ms, bytes = sent.bytes_sent, "the service runs at the destination");
            Ok(MigrationReport {
                migration_id: id.clone(),
                destination,
                compression: request.compression.unwrap_or_else(|| "none".into()),
                source_left_running: false,
                containers: vec![serde_json::json!({
                    "name": ff.config.container,
                    "checkpointId": id,
                    "dumpMs": dump_ms,
                    "criuBytes": sent.criu_bytes,
                    "rootfsBytes": sent.rootfs_bytes,
                    "engineBytes": 0,
                    "restoreMs": restore_ms,
                    "memoryParts": 1,
                    "processes": facts.tree.len(),
                    "pid": facts.pid,
                })],
                volumes: sent.volumes,
                rootfs_files: sent.rootfs_files,
                totals: Totals {
                    bytes_sent: sent.bytes_sent,
                    content_bytes: sent.content_bytes,
                    preflight_ms,
                    freeze_dump_ms: dump_ms,
                    transfer_ms: sent.transfer_ms,
                    restore_ms,
                    downtime_ms,
                    total_ms: started.elapsed().as_millis() as u64,
                    supervisor_peak_rss_kib: ums_proc::peak_rss_kib().unwrap_or(0),
                },
                restored: sent.restored,
                cleanup_warnings: warnings,
            })
        }
        Err((status, phase, error)) => {
            let rollback = resume_lines(&facts.tree);
            ff.set_phase(Phase::Running);
            tracing::warn!(migration = %id, %error, "migration failed; the service resumed here");
            Err(failed(status, phase, error, rollback))
        }
    }
}

fn resume_lines(tree: &[i32]) -> Vec<String> {
    let problems = criu::resume(tree);
    if problems.is_empty() {
        vec![format!(
            "resumed the service's {} processes and threads where they stopped",
            tree.len()
        )]
    } else {
        problems
            .into_iter()
            .map(|p| format!("FAILED: {p}"))
            .collect()
    }
}

struct Sent {
    bytes_sent: u64,
    content_bytes: u64,
    criu_bytes: u64,
    rootfs_bytes: u64,
    transfer_ms: u64,
    volumes: Vec<VolumeManifest>,
    rootfs_files: Vec<String>,
    restored: serde_json::Value,
}

impl Sent {
    /// What is known of a send whose answer was lost: nothing measured, the loss named.
    fn unanswered(error: String) -> Self {
        Sent {
            bytes_sent: 0,
            content_bytes: 0,
            criu_bytes: 0,
            rootfs_bytes: 0,
            transfer_ms: 0,
            volumes: Vec::new(),
            rootfs_files: Vec::new(),
            restored: serde_json::json!({ "answerLost": error }),
        }
    }
}

/// Whether the ums-ff that answered the preflight (`preflight`, its `/info`) now runs the
/// service: the same instance (not restarted), phase running.
async fn runs_at(http: &reqwest::Client, destination: &str, preflight: &serde_json::Value) -> bool {
    let Some(instance) = preflight["instance"].as_str() else {
        return false;
    };
    let health: Option<serde_json::Value> = async {
        http.get(format!("{destination}/healthz"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
    .await;
    health.is_some_and(|h| h["instance"] == instance && h["phase"] == "running")
}

fn bytes_under(plan: &[PlannedEntry], prefix: &str) -> u64 {
    plan.iter()
        .filter(|e| e.archive_path.starts_with(prefix))
        .map(|e| e.size)
        .sum()
}

#[allow(clippy::too_many_arguments)]
async fn send(
    ff: &Ff,
    id: &str,
    destination: &str,
    token: &str,
    http: &reqwest::Client,
    zstd_level: Option<i32>,
    bandwidth: Option<u64>,
    facts: &DumpFacts,
    dump_dir: &Path,
    rootfs_dir: &Path,
) -> Result<Sent, (StatusCode, &'static str, String)> {
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, "packing", e);
    let facts_json = serde_json::to_vec_pretty(facts).map_err(|e| internal(e.to_string()))?;
    std::fs::write(dump_dir.join(FACTS_FILE), facts_json).map_err(|e| internal(e.to_string()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let paths = rootfs_paths(
        &open_files(&facts.tree),
        &ff.config.preserve,
        &mount_points(&mountinfo),
        &ff.config.volumes,
    );
    stage(&paths, rootfs_dir).map_err(|e| internal(format!("staging the root-fs files: {e}")))?;
    let name = &ff.config.container;
    let mut sources = vec![
        PackSource {
            prefix: criu_prefix(name),
            dir: dump_dir.to_owned(),
        },
        PackSource {
            prefix: rootfs_prefix(name),
            dir: rootfs_dir.to_owned(),
        },
    ];
    for volume in &ff.config.volumes {
        sources.push(PackSource {
            prefix: volume_prefix(&volume.name),
            dir: volume.path.clone(),
        });
    }
    let planned = plan(&sources).map_err(|e| internal(chain(&e)))?;
    let volumes: Vec<VolumeManifest> = ff
        .config
        .volumes
        .iter()
        .map(|v| {
            let prefix = format!("{}/", volume_prefix(&v.name));
            VolumeManifest {
                name: v.name.clone(),
                kind: "emptyDir".into(),
                bytes: bytes_under(&planned, &prefix),
                entries: planned
                    .iter()
                    .filter(|e| e.archive_path.starts_with(&prefix))
                    .count() as u64,
            }
        })
        .collect();
    let criu_bytes = bytes_under(&planned, &criu_prefix(name));
    let rootfs_bytes = bytes_under(&planned, &rootfs_prefix(name));
    let content_bytes: u64 = planned.iter().map(|e| e.size).sum();
    let mut manifest = Manifest {
        format_version: 5,
        migration_id: id.to_owned(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        source: engine_info(),
        containers: vec![ContainerManifest {
            name: name.clone(),
            spec: k8s_openapi::api::core::v1::Container {
                name: name.clone(),
                ..Default::default()
            },
            image: String::new(),
            image_id: String::new(),
            checkpoint_id: id.to_owned(),
            memory_parts: vec![MemoryPart::Full],
            criu_bytes,
            rootfs_bytes,
            engine_bytes: 0,
            was_running: true,
            tcp_connections: Vec::new(),
        }],
        volumes: volumes.clone(),
        images: Vec::new(),
        entries: Vec::new(),
    };
    manifest.entries = summaries(&planned);
    let (stream, writer) = ums_archive::transfer::stream(manifest, planned, zstd_level);
    let stream = ums_archive::transfer::paced(stream, bandwidth);
    let transfer = Instant::now();
    let mut post = http
        .post(format!("{destination}/restore?migrationId={id}"))
        .bearer_auth(token)
        .header("content-type", "application/x-tar")
        .timeout(Duration::from_secs(3600))
        .body(reqwest::Body::wrap_stream(stream));
    if zstd_level.is_some() {
        post = post.header("content-encoding", "zstd");
    }
    let answer = post.send().await;
    let written = writer.await;
    let answer = answer.map_err(|e| {
        (
            StatusCode::BAD_GATEWAY,
            "transfer",
            format!("sending to {destination}: {}", chain(&e)),
        )
    })?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err((
            StatusCode::BAD_GATEWAY,
            "restore",
            format!(
                "the destination answered {status}: {}",
                body["error"].as_str().unwrap_or("no message")
            ),
        ));
    }
    let bytes_sent = match written {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(internal(e)),
        Err(e) => return Err(internal(e.to_string())),
    };
    Ok(Sent {
        bytes_sent,
        content_bytes,
        criu_bytes,
        rootfs_bytes,
        transfer_ms: transfer.elapsed().as_millis() as u64,
        volumes,
        rootfs_files: paths.iter().map(|p| p.display().to_string()).collect(),
        restored: body,
    })
}
