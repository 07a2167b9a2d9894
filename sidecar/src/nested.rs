//! The nested containers of this pod: creating them from the pod's spec according to the start
//! mode, probing them, stopping them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use serde::Serialize;
use ums_contract::StartMode;

use crate::engine::{ContainerInfo, Engine};
use crate::error::ApiError;
use crate::podinfo::PodInfo;
use crate::spec::translate;

/// Where a container is in a migration, as seen by this sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Frozen or being dumped; it may come back here if the migration fails.
    Migrating,
    /// Moved to another pod; it is not recreated here.
    Migrated,
    /// Passive, and its image is neither here nor pullable: the pod waits for a migration to
    /// bring the image with the checkpoint.
    Awaiting,
}

/// The sidecar's shared state.
#[derive(Debug)]
pub struct Sidecar {
    pub engine: Arc<dyn Engine>,
    pub podinfo: PodInfo,
    /// The engine's data root (checkpoints, staging of incoming archives).
    pub engine_root: PathBuf,
    pub token: Option<String>,
    /// The pod-local token the ambassadors present (create and logs only).
    pub pod_token: Option<String>,
    /// Public keys of the coordinator(s) whose signed tokens this sidecar accepts.
    pub coordinator_keys: Vec<Vec<u8>>,
    /// The SHA-256 of the throwaway certificate this sidecar serves TLS with (`GET /tls`).
    pub tls_sha256: Option<String>,
    /// Held by a checkpoint, restore or migration: one at a time.
    pub busy: Arc<tokio::sync::Mutex<()>>,
    /// Post-copy restores here waiting for their source's page stream.
    pub page_tunnels: Arc<crate::postcopy::PageTunnels>,
    /// The engine's facts (version, CRIU, kernel), read once: they do not change while the
    /// sidecar runs, and Podman takes hundreds of milliseconds to answer.
    engine_info: tokio::sync::OnceCell<crate::engine::EngineInfo>,
    /// Serialises creates: the start-up pass and each ambassador's request race otherwise.
    creating: tokio::sync::Mutex<()>,
    phases: std::sync::Mutex<HashMap<String, Phase>>,
    /// The migration under way, for an operator's abort.
    pub aborts: crate::abort::Aborts,
    /// This run of the sidecar (`GET /healthz`): a coordinator that sees another one than it
    /// checked knows the runtime container restarted in between.
    pub instance: String,
    /// The migration whose dump this run resumed from at start, if any (`GET /healthz`).
    pub resumed_from: std::sync::Mutex<Option<String>>,
}

/// What `POST /create/{name}` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateOutcome {
    pub name: String,
    pub start_mode: String,
    /// `created`, `started`, `exists`, `none` (start mode null).
    pub action: &'static str,
    pub container: Option<ContainerInfo>,
}

/// What `GET /probe/{name}` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeOutcome {
    #[serde(skip)]
    pub status: StatusCode,
    pub name: String,
    pub state: String,
    pub exit_code: Option<i64>,
}

impl Sidecar {
    pub fn new(
        engine: Arc<dyn Engine>,
        podinfo: PodInfo,
        engine_root: PathBuf,
        token: Option<String>,
    ) -> Self {
        Sidecar {
            engine,
            podinfo,
            engine_root,
            token,
            pod_token: None,
            coordinator_keys: Vec::new(),
            tls_sha256: None,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            page_tunnels: Default::default(),
            creating: tokio::sync::Mutex::new(()),
            engine_info: tokio::sync::OnceCell::new(),
            phases: std::sync::Mutex::new(HashMap::new()),
            aborts: Default::default(),
            instance: crate::checkpoint::new_id("s"),
            resumed_from: Default::default(),
        }
    }

    /// The credentials this sidecar accepts besides its static token: the pod-local token of
    /// its ambassadors, and tokens signed by its coordinator.
    pub fn with_credentials(
        mut self,
        pod_token: Option<String>,
        coordinator_keys: Vec<Vec<u8>>,
    ) -> Self {
        self.pod_token = pod_token;
        self.coordinator_keys = coordinator_keys;
        self
    }

    /// The pin peers are given for this sidecar's TLS.
    pub fn with_tls(mut self, sha256: String) -> Self {
        self.tls_sha256 = Some(sha256);
        self
    }

    /// Whether any credential is required.
    pub fn requires_credentials(&self) -> bool {
        self.token.is_some() || self.pod_token.is_some() || !self.coordinator_keys.is_empty()
    }

    /// Engine, CRIU, kernel and architecture (cached).
    pub async fn engine_info(
        &self,
    ) -> Result<crate::engine::EngineInfo, crate::engine::EngineError> {
        self.engine_info
            .get_or_try_init(|| self.engine.info())
            .await
            .cloned()
    }

    pub fn phase(&self, name: &str) -> Option<Phase> {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }

    pub fn set_phase(&self, name: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Some(p) => phases.insert(name.to_owned(), p),
            None => phases.remove(name),
        };
    }

    /// Creates (and, in `active` mode, starts) nested container `name` from the pod's
    /// `migration-containers`. Idempotent while the container exists and has not ended.
    pub async fn create(&self, name: &str) -> Result<(StatusCode, CreateOutcome), ApiError> {
        let _one_at_a_time = self.creating.lock().await;
        self.create_locked(name, false).await
    }

    /// What an ambassador asks for when it starts: the container runs. The kubelet starts an
    /// ambassador again only when it wants its container run again (its restart policy, after
    /// the ambassador relayed the container's exit, or after the runtime container itself was
    /// restarted and the nested container died with it), so a container that has ended is
    /// made anew, as the kubelet makes a restarted container anew.
    pub async fn create_for_ambassador(
        &self,
        name: &str,
    ) -> Result<(StatusCode, CreateOutcome), ApiError> {
        let _one_at_a_time = self.creating.lock().await;
        self.create_locked(name, true).await
    }

    /// Marks containers as being restored here: from then on `create` leaves them alone (an
    /// ambassador must not recreate a placeholder the restore just replaced). Waits for a
    /// create in progress to finish first.
    pub async fn mark_incoming(&self, names: &[String], incoming: bool) {
        let _one_at_a_time = self.creating.lock().await;
        for name in names {
            self.set_phase(name, incoming.then_some(Phase::Migrating));
        }
    }

    async fn create_locked(
        &self,
        name: &str,
        renew_ended: bool,
    ) -> Result<(StatusCode, CreateOutcome), ApiError> {
        match self.phase(name) {
            Some(Phase::Migrated) => {
                return Err(ApiError::conflict(format!(
                    "container {name:?} was migrated away from this pod; it is not recreated here"
                )))
            }
            Some(Phase::Migrating) => {
                return Err(ApiError::conflict(format!(
                "container {name:?} is being checkpointed or restored; try again when it is done"
            )))
            }
            Some(Phase::Awaiting) | None => {}
        }
        let pod = self.podinfo.read().await?;
        let start_mode = pod.start_mode();
        let outcome = |action, container| CreateOutcome {
            name: name.to_owned(),
            start_mode: start_mode.to_string(),
            action,
            container,
        };
        match start_mode {
            StartMode::Fail => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("start mode is \"fail\": refusing to create {name:?}"),
                ))
            }
            StartMode::Null => return Ok((StatusCode::OK, outcome("none", None))),
            StartMode::Active | StartMode::Passive => {}
        }
        let original = pod.container(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "no container {name:?} in the pod's migration-containers (known: {:?})",
                pod.containers()
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
            ))
        })?;
        let existing = self.engine.inspect(name).await?;
        let ended = existing
            .as_ref()
            .is_some_and(|c| matches!(c.state.as_str(), "exited" | "dead" | "stopped"));
        if renew_ended && ended && start_mode == StartMode::Active && self.phase(name).is_none() {
            tracing::info!(
                container = name,
                exit_code = existing.as_ref().and_then(|c| c.exit_code),
                "its ambassador started again: the ended nested container is made anew"
            );
            self.engine.remove(name).await?;
        } else if let Some(existing) = existing {
            // A created (restore target, or passive) container is started once the pod is
            // active; anything else is left as it is.
            if start_mode == StartMode::Active
                && existing.state == "created"
                && self.phase(name).is_none()
            {
                self.engine.start(name).await?;
                let started = self.engine.inspect(name).await?;
                return Ok((StatusCode::OK, outcome("started", started)));
            }
            return Ok((StatusCode::OK, outcome("exists", Some(existing))));
        }
        let lookup = |var: &str| std::env::var(var).ok();
        let spec = translate(original, pod.volumes(), &lookup)?;
        let created = match self.engine.create(&spec).await {
            Ok(created) => created,
            // A passive pod is a restore target: an image it cannot get comes with the
            // migration, so it waits instead of failing.
            Err(
                e @ (crate::engine::EngineError::PullFailed { .. }
                | crate::engine::EngineError::ImageMissing { .. }),
            ) if start_mode == StartMode::Passive => {
                tracing::warn!(container = name, error = %e, "passive: the image is not here; waiting for a migration to bring it");
                self.set_phase(name, Some(Phase::Awaiting));
                return Ok((StatusCode::ACCEPTED, outcome("awaiting", None)));
            }
            Err(e) => return Err(e.into()),
        };
        if self.phase(name) == Some(Phase::Awaiting) {
            self.set_phase(name, None);
        }
        if start_mode == StartMode::Active {
            self.engine.start(name).await?;
            let started = self.engine.inspect(name).await?;
            tracing::info!(container = name, "created and started nested container");
            return Ok((StatusCode::CREATED, outcome("started", started)));
        }
        tracing::info!(
            container = name,
            "created nested container (passive: not started)"
        );
        Ok((StatusCode::CREATED, outcome("created", Some(created))))
    }

    /// 200 running (or migrating/migrated), 204 created (or passive and awaiting its image
    /// from a migration), 503 exited, 404 unknown.
    pub async fn probe(&self, name: &str) -> Result<ProbeOutcome, ApiError> {
        let probe = |status, state: &str, exit_code| ProbeOutcome {
            status,
            name: name.to_owned(),
            state: state.to_owned(),
            exit_code,
        };
        match self.phase(name) {
            Some(Phase::Migrated) => return Ok(probe(StatusCode::OK, "migrated", None)),
            Some(Phase::Migrating) => return Ok(probe(StatusCode::OK, "migrating", None)),
            Some(Phase::Awaiting) | None => {}
        }
        let Some(info) = self.engine.inspect(name).await? else {
            if self.phase(name) == Some(Phase::Awaiting) {
                return Ok(probe(StatusCode::NO_CONTENT, "awaiting", None));
            }
            return Err(ApiError::not_found(format!("no nested container {name:?}")));
        };
        Ok(match info.state.as_str() {
            "running" | "paused" | "restarting" => probe(StatusCode::OK, &info.state, None),
            "created" => probe(StatusCode::NO_CONTENT, "created", None),
            _ => probe(StatusCode::SERVICE_UNAVAILABLE, &info.state, info.exit_code),
        })
    }

    /// Creates every container of the pod per the start mode (at start-up).
    pub async fn create_all(&self) -> Result<Vec<CreateOutcome>, ApiError> {
        let pod = self.podinfo.read().await?;
        let mut outcomes = Vec::new();
        for c in pod.containers() {
            outcomes.push(self.create(&c.name).await?.1);
        }
        Ok(outcomes)
    }

    /// Stops every nested container.
    pub async fn stop_all(&self, timeout_seconds: i32) -> Result<Vec<ContainerInfo>, ApiError> {
        let mut stopped = Vec::new();
        for c in self.engine.list().await? {
            if c.is_running() || c.state == "paused" {
                if c.state == "paused" {
                    self.engine.unpause(&c.name).await?;
                }
                self.engine.stop(&c.name, timeout_seconds).await?;
            }
            if let Some(info) = self.engine.inspect(&c.name).await? {
                stopped.push(info);
            }
        }
        Ok(stopped)
    }
}
