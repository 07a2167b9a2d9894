//! What the coordinator's handlers share, and the record of each migration it drives (what
//! `GET /migrations/{id}` answers while it runs and after).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The coordinator of one cluster.
pub struct Coordinator {
    pub kube: kube::Client,
    /// This cluster's name, as peers see it.
    pub cluster: String,
    /// Where peers reach this coordinator (`--advertise-url`): given to each destination so
    /// that it can ask what became of a migration (`POST /outcome`).
    pub advertise_url: Option<String>,
    /// HTTPS to peer coordinators (their CAs only), presenting this coordinator's certificate.
    pub peers: reqwest::Client,
    /// The operators' tokens (`POST /migrate`, `GET /migrations`).
    pub api_tokens: crate::auth::ApiTokens,
    /// To the sidecars of wrapped pods, over the pod network.
    pub sidecars: reqwest::Client,
    pub sidecar_port: u16,
    /// How long a destination pod may take to run with its sidecar ready.
    pub pod_ready_timeout: Duration,
    pub migrations: Mutex<BTreeMap<String, MigrationRecord>>,
    /// Signs the tokens this cluster's sidecars accept (their webhook holds its public key).
    pub signing_key: ums_contract::credential::SigningKey,
    /// Its public key, which verifies the migration credentials this coordinator issues.
    pub signing_key_public: Vec<u8>,
    pub metrics: crate::metrics::Metrics,
    /// Where checkpoint images of orchestrator-level migrations go (`None`: this cluster
    /// takes none).
    pub checkpoint_registry: Option<crate::checkpoint_upload::CheckpointRegistry>,
    /// The checkpoint images received, by migration and container.
    pub uploads: Mutex<crate::checkpoint_upload::Uploads>,
    /// The kubelets' checkpoint API (`None`: this coordinator drives no orchestrator-level
    /// migration).
    pub kubelets: Option<crate::kubelet::Kubelets>,
    /// The node part (deploy/node), which sends checkpoint archives from the nodes.
    pub node_part: NodePart,
    /// Where emptyDir archives wait for the pod they go into (`--data-dir`).
    pub data_dir: std::path::PathBuf,
    /// The default bandwidth cap of a migration (bytes per second; `--bandwidth-per-migration`).
    pub bandwidth_per_migration: Option<u64>,
    /// The default completion timeout, seconds per GiB (`--completion-timeout-per-gib`).
    pub completion_timeout_per_gib: Option<u64>,
    /// Whether a move past its completion timeout switches to post-copy where it can
    /// (`--allow-post-copy`).
    pub allow_post_copy: bool,
    /// How many migrations may run at once, in the cluster and from one node.
    pub slots: crate::queue::Slots,
    /// The pods whose eviction started a migration (`kubectl drain`).
    pub evacuations: crate::evacuation::Evacuations,
}

/// Where the node part runs and what it is given.
#[derive(Debug, Clone)]
pub struct NodePart {
    pub namespace: String,
    pub port: u16,
    /// The peers' CAs (PEM): the node part verifies the destination coordinator with them.
    pub peer_ca_pem: String,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("cluster", &self.cluster)
            .field("sidecar_port", &self.sidecar_port)
            .finish_non_exhaustive()
    }
}

/// How many migration records `GET /migrations` keeps (the oldest finished ones go first).
pub const MAX_RECORDS: usize = 1000;

/// One migration this coordinator drives (as the source's coordinator).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    pub migration_id: String,
    pub pod: String,
    pub destination: String,
    /// The LiveMigration (in the pod's namespace) that asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_migration: Option<String>,
    /// `checking` (or `queued` first, while the migration policies make it wait),
    /// `locking`, `creating`, `migrating`, `activating`, `finishing`, then `done` or
    /// `failed`.
    pub phase: &'static str,
    pub started_unix_ms: u64,
    /// Milliseconds spent in each finished phase, in order.
    pub phases: Vec<(String, u64)>,
    pub error: Option<String>,
    /// An operator asked to abort it (`POST /migrations/{id}/abort`).
    pub abort_requested: bool,
    #[serde(skip)]
    pub phase_started: Option<Instant>,
    /// Cancelled by an abort: the migration rolls back at its next step before the freeze, or
    /// passes the abort to the source's sidecar while the state moves.
    #[serde(skip)]
    pub cancel: tokio_util::sync::CancellationToken,
}

/// The phases an abort can still stop: nothing is frozen yet, or the state is on its way (the
/// source's sidecar stops and rolls back unless the destination has confirmed).
pub const ABORTABLE_PHASES: [&str; 5] = ["queued", "checking", "locking", "creating", "migrating"];

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The Event reason of a phase: `Migration` and the phase, capitalized (`MigrationQueued`).
fn phase_reason(phase: &str) -> String {
    let mut chars = phase.chars();
    let first: String = chars
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default();
    format!("Migration{first}{}", chars.as_str())
}

/// A new migration id: `m` and the time in hex (unique per coordinator, sortable).
pub fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("m{nanos:x}")
}

impl Coordinator {
    /// A token for the sidecar of the pod at `pod_ip` whose UID is `pod_uid`: `scope`, for
    /// `seconds`, for one migration (`mid`) when it is a peer's.
    pub fn sidecar_token(
        &self,
        pod_ip: &str,
        pod_uid: Option<&str>,
        scope: ums_contract::credential::Scope,
        mid: Option<&str>,
        seconds: u64,
    ) -> String {
        self.signing_key.sign(&ums_contract::credential::Claims {
            aud: pod_ip.to_owned(),
            scope,
            exp: ums_contract::credential::now_unix() + seconds,
            mid: mid.map(str::to_owned),
            uid: pod_uid.map(str::to_owned),
        })
    }

    /// The sidecar's probe of nested container `name` in the pod at `ip`: its status (200
    /// running, 204 created and not started, ...) and the state it names; `None` when the
    /// sidecar does not answer.
    pub async fn probe(&self, ip: &str, name: &str) -> Option<(u16, String)> {
        let url = format!("http://{ip}:{}/probe/{name}", self.sidecar_port);
        let response = self
            .sidecars
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let state = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_owned))
            .unwrap_or_default();
        Some((status, state))
    }

    /// The credential a peer coordinator needs to finish migration `mid` here (`/restore`):
    /// valid as long as the sidecar's peer token, plus an hour for the restore itself.
    pub fn migration_credential(&self, mid: &str) -> String {
        self.signing_key.sign(&ums_contract::credential::Claims {
            aud: crate::auth::credential_audience(&self.cluster),
            scope: ums_contract::credential::Scope::Migration,
            exp: ums_contract::credential::now_unix()
                + crate::destination::PEER_TOKEN_SECONDS
                + 3600,
            mid: Some(mid.to_owned()),
            uid: None,
        })
    }

    /// Records a new migration in its first phase (asked for by the LiveMigration
    /// `live_migration`, if any).
    pub fn begin(&self, id: &str, pod: &str, destination: &str, live_migration: Option<&str>) {
        let record = MigrationRecord {
            migration_id: id.to_owned(),
            pod: pod.to_owned(),
            destination: destination.to_owned(),
            live_migration: live_migration.map(str::to_owned),
            phase: "checking",
            started_unix_ms: unix_ms(),
            phases: Vec::new(),
            error: None,
            abort_requested: false,
            phase_started: Some(Instant::now()),
            cancel: tokio_util::sync::CancellationToken::new(),
        };
        if let Ok(mut all) = self.migrations.lock() {
            all.insert(id.to_owned(), record);
            // The oldest finished records go past MAX_RECORDS: a coordinator that runs for
            // months does not keep every migration it ever drove.
            while all.len() > MAX_RECORDS {
                let oldest_finished = all
                    .iter()
                    .find(|(_, r)| matches!(r.phase, "done" | "failed"))
                    .map(|(id, _)| id.clone());
                match oldest_finished {
                    Some(id) => {
                        all.remove(&id);
                    }
                    None => break,
                }
            }
        }
        self.announce(
            id,
            crate::events::Kind::Normal,
            "MigrationStarted",
            &format!("migration {id} of {pod} to {destination}"),
        );
    }

    /// An Event about migration `id` on its pod and its LiveMigration.
    pub fn announce(&self, id: &str, kind: crate::events::Kind, reason: &str, message: &str) {
        let Some(record) = self.record(id) else {
            return;
        };
        let mut subjects: Vec<_> = crate::events::Subject::pod(&record.pod)
            .into_iter()
            .collect();
        if let (Some(pod), Some(name)) = (subjects.first(), &record.live_migration) {
            let namespace = pod.namespace.clone();
            subjects.push(crate::events::Subject::live_migration(&namespace, name));
        }
        crate::events::publish(&self.kube, &subjects, kind, reason, message, &self.cluster);
    }

    /// Closes the current phase and opens `phase`.
    pub fn enter(&self, id: &str, phase: &'static str) {
        if phase == "done" {
            self.close_phase(id, phase, None);
            tracing::info!(migration = id, phase, "migration phase");
        } else {
            self.enter_saying(
                id,
                phase,
                &phase_reason(phase),
                &format!("migration {id}: {phase}"),
            );
        }
    }

    /// [`Coordinator::enter`], its Event with `reason` and `message` of the caller's.
    pub fn enter_saying(&self, id: &str, phase: &'static str, reason: &str, message: &str) {
        self.close_phase(id, phase, None);
        tracing::info!(migration = id, phase, "migration phase");
        self.announce(id, crate::events::Kind::Normal, reason, message);
    }

    /// Closes the current phase; the migration has failed with `error`.
    pub fn fail(&self, id: &str, error: &str) {
        self.close_phase(id, "failed", Some(error));
        self.announce(
            id,
            crate::events::Kind::Warning,
            "MigrationFailed",
            &format!("migration {id}: {error}"),
        );
    }

    /// Records how long the current phase took and moves to `next`.
    fn close_phase(&self, id: &str, next: &'static str, error: Option<&str>) {
        let Ok(mut all) = self.migrations.lock() else {
            return;
        };
        let Some(record) = all.get_mut(id) else {
            return;
        };
        let ms = record
            .phase_started
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        record.phases.push((record.phase.to_owned(), ms));
        record.phase = next;
        record.phase_started = if matches!(next, "done" | "failed") {
            None
        } else {
            Some(Instant::now())
        };
        if let Some(error) = error {
            record.error = Some(error.to_owned());
        }
    }

    /// An operator's abort: allowed while nothing is frozen (checking, locking, creating), the
    /// migration then rolls back (the copy deleted, the lock released) and answers 409.
    /// Once the state moves it ends on its own within seconds (success, or the sidecar's own
    /// rollback), so a later abort is refused with the phase.
    pub fn abort(&self, id: &str) -> Result<&'static str, crate::error::ApiError> {
        use crate::error::ApiError;
        let Ok(mut all) = self.migrations.lock() else {
            return Err(ApiError::internal("the migration records are unreadable"));
        };
        let Some(record) = all.get_mut(id) else {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!("no migration {id:?} here"),
            ));
        };
        if !ABORTABLE_PHASES.contains(&record.phase) {
            return Err(ApiError::conflict(format!(
                "migration {id} is {}: {}",
                record.phase,
                match record.phase {
                    "done" | "failed" => "it has ended",
                    _ => "its state has moved: the service runs at the destination, and the migration ends on its own",
                }
            )));
        }
        record.abort_requested = true;
        record.cancel.cancel();
        tracing::warn!(
            migration = id,
            phase = record.phase,
            "abort asked by an operator"
        );
        Ok(record.phase)
    }

    /// The abort signal of migration `id`.
    pub fn cancel_token(&self, id: &str) -> tokio_util::sync::CancellationToken {
        self.record(id).map(|r| r.cancel).unwrap_or_default()
    }

    /// Whether this coordinator is driving migration `id` now.
    pub fn is_driving(&self, id: Option<&str>) -> bool {
        id.and_then(|id| self.record(id))
            .is_some_and(|r| !matches!(r.phase, "done" | "failed"))
    }

    /// Every record, oldest first (ids are time-ordered).
    pub fn records(&self) -> Vec<MigrationRecord> {
        self.migrations
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn record(&self, id: &str) -> Option<MigrationRecord> {
        self.migrations.lock().ok()?.get(id).cloned()
    }
}
