//! The destination side, called by the source cluster's coordinator: create the passive pod
//! and wait until its sidecar can take a restore, make it active once the state has arrived,
//! or delete it when the migration is abandoned. Each acts only on a pod that carries the
//! same migration id.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde::{Deserialize, Serialize};
use serde_json::json;
use ums_contract::{MigrationAnnotations, ANNOTATION_ID, ANNOTATION_START_MODE};

use crate::error::ApiError;
use crate::journal::{ANNOTATION_ACTIVATED_BY, ANNOTATION_COPY_OF, ANNOTATION_LOCKED_BY};
use crate::outcome::{SourceRef, ANNOTATION_SOURCE, ANNOTATION_SOURCE_POD};
use crate::prerequisites::{missing_text, Prerequisites};
use crate::state::Coordinator;

/// `POST /create`: the pod to create (built by the source's coordinator) in `namespace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRequest {
    pub migration_id: String,
    pub namespace: String,
    pub pod: Pod,
    /// The source coordinator and pod, when the source advertises its URL: the copy carries
    /// them, to ask what became of the migration ([`crate::outcome`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
    /// `ssu`: the pod runs from checkpoint images and is active at once (no sidecar, no
    /// passive phase); absent: a wrapped pod's passive copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// The created pod, ready to take the restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateAnswer {
    pub name: String,
    pub namespace: String,
    pub pod_ip: String,
    /// Where the source's sidecar sends the state (`https://<pod IP>:<port>`).
    pub sidecar_url: String,
    /// The SHA-256 of the certificate that pod's sidecar serves (a throwaway one it made at
    /// start): the source's sidecar accepts no other.
    pub sidecar_certificate_sha256: String,
    /// What the source's coordinator presents to make the copy active (`/restore`): for this
    /// migration only, signed by this coordinator.
    pub migration_credential: String,
    /// The one credential that pod's sidecar takes from the source's sidecar: scoped to this
    /// migration's restore, for this pod, expiring (see `PEER_TOKEN_SECONDS`).
    pub sidecar_token: String,
    pub create_ms: u64,
    /// What the restored pod's init container unpacked of the source's emptyDirs
    /// (orchestrator-level, a pod with emptyDirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<serde_json::Value>,
}

/// `POST /restore` (make active) and `POST /delete`: one pod of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    pub migration_id: String,
    pub namespace: String,
    pub name: String,
}

/// How long the source's sidecar may take to start sending the state with its peer token.
pub const PEER_TOKEN_SECONDS: u64 = 1800;

fn annotations_of(pod: &Pod) -> MigrationAnnotations {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| MigrationAnnotations::parse(a).ok())
        .unwrap_or_default()
}

/// The reason and message of a container the node gave up starting (a waiting reason such as
/// CreateContainerError or ErrImagePull), as opposed to one still on its way.
pub(crate) fn cannot_start(
    state: &k8s_openapi::api::core::v1::ContainerState,
) -> Option<(String, String)> {
    let waiting = state.waiting.as_ref()?;
    let reason = waiting.reason.clone().unwrap_or_default();
    (reason.ends_with("Error") || reason.starts_with("ErrImage"))
        .then(|| (reason, waiting.message.clone().unwrap_or_default()))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Coordinator {
    /// Refuses (409) a copy whose namespace, configMaps, secrets or service account this
    /// cluster lacks, naming each; the copy would never start.
    pub(crate) async fn check_prerequisites(
        &self,
        namespace: &str,
        pod: &Pod,
    ) -> Result<(), ApiError> {
        let namespaces: Api<Namespace> = Api::all(self.kube.clone());
        if namespaces.get_opt(namespace).await?.is_none() {
            return Err(ApiError::conflict(format!(
                "cluster {} has no namespace {namespace}: create it (and what the pod needs in it), then migrate again",
                self.cluster
            )));
        }
        let needed = Prerequisites::of(pod);
        let mut missing: Vec<(&'static str, String)> = Vec::new();
        let config_maps: Api<ConfigMap> = Api::namespaced(self.kube.clone(), namespace);
        for name in &needed.config_maps {
            if config_maps.get_metadata_opt(name).await?.is_none() {
                missing.push(("configMap", name.clone()));
            }
        }
        let secrets: Api<Secret> = Api::namespaced(self.kube.clone(), namespace);
        for name in &needed.secrets {
            if secrets.get_metadata_opt(name).await?.is_none() {
                missing.push(("secret", name.clone()));
            }
        }
        if let Some(name) = &needed.service_account {
            let accounts: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), namespace);
            if accounts.get_metadata_opt(name).await?.is_none() {
                missing.push(("serviceAccount", name.clone()));
            }
        }
        match missing_text(namespace, &self.cluster, &missing) {
            Some(text) => Err(ApiError::conflict(text)),
            None => Ok(()),
        }
    }

    /// Creates the passive pod and waits until it runs, is ready and its sidecar has every
    /// nested container created (or awaiting its image). On any failure the pod is deleted.
    pub async fn create_destination(
        &self,
        request: CreateRequest,
    ) -> Result<CreateAnswer, ApiError> {
        let started = Instant::now();
        let name = request
            .pod
            .metadata
            .name
            .clone()
            .ok_or_else(|| ApiError::bad_request("the pod to create has no name"))?;
        let orchestrator_level =
            request.interface.as_deref() == Some(crate::orchestrator::INTERFACE);
        let locked_by = annotations_of(&request.pod).migration_id;
        if !orchestrator_level && locked_by.as_deref() != Some(request.migration_id.as_str()) {
            return Err(ApiError::bad_request(format!(
                "the pod to create must carry {ANNOTATION_ID}={}",
                request.migration_id
            )));
        }
        self.check_prerequisites(&request.namespace, &request.pod)
            .await?;
        // A copy bound to a node: that node must exist and take pods (a cordoned or absent
        // node would leave it Pending until the timeout).
        if let Some(node) = request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
        {
            self.place_copy(None, Some(node)).await?;
        }
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        let mut pod = request.pod.clone();
        pod.metadata.namespace = Some(request.namespace.clone());
        // Marked as this coordinator's copy (one a restart finds still passive is abandoned),
        // and not as the source coordinator's lock.
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        annotations.remove(ANNOTATION_LOCKED_BY);
        if orchestrator_level {
            // Which migration restored it: the source may ask to delete it (/delete) before
            // it restores the service at the source instead.
            annotations.insert(
                crate::orchestrator::ANNOTATION_RESTORED_FOR.to_owned(),
                request.migration_id.clone(),
            );
        } else {
            annotations.insert(ANNOTATION_COPY_OF.to_owned(), self.cluster.clone());
        }
        annotations.remove(ANNOTATION_SOURCE);
        annotations.remove(ANNOTATION_SOURCE_POD);
        for (key, value) in request.source.iter().flat_map(SourceRef::annotations) {
            annotations.insert(key.to_owned(), value);
        }
        // Its emptyDirs come back through its init container, from the archive staged here:
        // it takes them from this coordinator only.
        let restores_volumes = orchestrator_level && crate::empty_dirs::has_restorer(&pod);
        if restores_volumes {
            let staged = crate::empty_dirs::staged_path(&self.data_dir, &request.migration_id);
            if !staged.is_file() {
                return Err(ApiError::conflict(format!(
                    "the pod's emptyDir archive for migration {} has not arrived (PUT /checkpoint-volumes/{})",
                    request.migration_id, request.migration_id
                )));
            }
            crate::empty_dirs::with_creator_key(&mut pod, &self.signing_key.public_key());
        }
        let uid = match pods.create(&PostParams::default(), &pod).await {
            Ok(created) => created.metadata.uid,
            Err(e) => {
                let e = ApiError::from(e);
                return Err(if e.status == axum::http::StatusCode::CONFLICT {
                    ApiError::conflict(format!(
                        "a pod {}/{name} already exists in cluster {}",
                        request.namespace, self.cluster
                    ))
                } else {
                    e
                });
            }
        };
        tracing::info!(migration = %request.migration_id, pod = %name, "destination pod created");
        if orchestrator_level {
            // Its emptyDirs first (its init container waits for them), then restored from its
            // checkpoint images: done once it runs and is ready.
            let restored = async {
                let volumes = if restores_volumes {
                    Some(
                        self.deliver_volumes(&pods, &name, &request.migration_id)
                            .await?,
                    )
                } else {
                    None
                };
                let ip = self.wait_restored_ready(&pods, &name).await?;
                Ok::<_, ApiError>((ip, volumes))
            }
            .await;
            if restores_volumes {
                self.drop_staged_volumes(&request.migration_id).await;
            }
            return match restored {
                Ok((ip, volumes)) => Ok(CreateAnswer {
                    volumes,
                    sidecar_url: String::new(),
                    sidecar_certificate_sha256: String::new(),
                    migration_credential: self.migration_credential(&request.migration_id),
                    sidecar_token: String::new(),
                    name,
                    namespace: request.namespace,
                    pod_ip: ip,
                    create_ms: started.elapsed().as_millis() as u64,
                }),
                Err(e) => {
                    if let Err(d) = pods.delete(&name, &DeleteParams::default()).await {
                        tracing::warn!(pod = %name, error = %d, "failed to delete the restored pod after a failed restore");
                    }
                    Err(e)
                }
            };
        }
        match self.wait_passive_ready(&pods, &name).await {
            Ok((ip, pin)) => Ok(CreateAnswer {
                sidecar_url: format!("https://{ip}:{}", self.sidecar_port),
                sidecar_certificate_sha256: pin,
                migration_credential: self.migration_credential(&request.migration_id),
                sidecar_token: self.sidecar_token(
                    &ip,
                    uid.as_deref(),
                    ums_contract::credential::Scope::Peer,
                    Some(&request.migration_id),
                    PEER_TOKEN_SECONDS,
                ),
                name,
                namespace: request.namespace,
                pod_ip: ip,
                create_ms: started.elapsed().as_millis() as u64,
                volumes: None,
            }),
            Err(e) => {
                if let Err(d) = pods.delete(&name, &DeleteParams::default()).await {
                    tracing::warn!(pod = %name, error = %d, "failed to delete the destination pod after a failed create");
                }
                Err(e)
            }
        }
    }

    /// Waits until a pod restored from checkpoint images runs and is ready; its IP. A
    /// container the node cannot restore (its waiting reason and message) fails at once.
    async fn wait_restored_ready(&self, pods: &Api<Pod>, name: &str) -> Result<String, ApiError> {
        let until = Instant::now() + self.pod_ready_timeout;
        let mut last = String::from("not seen yet");
        loop {
            if Instant::now() > until {
                return Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the pod {name} restored from its checkpoint images was not ready within {} s ({last})",
                        self.pod_ready_timeout.as_secs()
                    ),
                ));
            }
            let pod = pods.get(name).await?;
            let status = pod.status.clone().unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            let ip = status.pod_ip.clone().unwrap_or_default();
            if phase == "Running" && is_ready(&pod) && !ip.is_empty() {
                return Ok(ip);
            }
            for c in status.container_statuses.iter().flatten() {
                if let Some((reason, message)) = c.state.as_ref().and_then(cannot_start) {
                    return Err(ApiError::bad_gateway(format!(
                        "the destination's node cannot restore container {}: {reason}: {message}",
                        c.name
                    )));
                }
            }
            last = format!("phase {phase}, ready {}", is_ready(&pod));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the pod runs, is ready and its sidecar has created every container; its
    /// IP and its sidecar's certificate pin.
    async fn wait_passive_ready(
        &self,
        pods: &Api<Pod>,
        name: &str,
    ) -> Result<(String, String), ApiError> {
        let until = Instant::now() + self.pod_ready_timeout;
        let mut last = String::from("not seen yet");
        loop {
            if Instant::now() > until {
                return Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "destination pod {name} not ready for the restore within {} s ({last})",
                        self.pod_ready_timeout.as_secs()
                    ),
                ));
            }
            let pod = pods.get(name).await?;
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase == "Failed" || phase == "Succeeded" {
                return Err(ApiError::bad_gateway(format!(
                    "destination pod {name} ended ({phase}) before the restore"
                )));
            }
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            last = format!("phase {phase}, ready {}", is_ready(&pod));
            if phase == "Running" && is_ready(&pod) && !ip.is_empty() {
                let containers = annotations_of(&pod).containers.unwrap_or_default();
                let mut waiting = Vec::new();
                for c in &containers {
                    // 204: created and not started (or awaiting its image), as a restore needs.
                    if self.probe(&ip, &c.name).await.map(|(status, _)| status) != Some(204) {
                        waiting.push(c.name.clone());
                    }
                }
                if !containers.is_empty() && waiting.is_empty() {
                    let pin = self.sidecar_pin(&ip).await?;
                    return Ok((ip, pin));
                }
                last = format!("sidecar has not created {waiting:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The certificate the sidecar at `ip` serves its TLS with (`GET /tls`, asked over the
    /// cluster's own pod network, as the kubelet's probes are).
    async fn sidecar_pin(&self, ip: &str) -> Result<String, ApiError> {
        self.certificate_pin(ip, self.sidecar_port, Duration::from_secs(10))
            .await
            .map_err(|e| {
                ApiError::bad_gateway(format!(
                    "the destination pod's sidecar did not say its certificate: {e}"
                ))
            })
    }

    /// The SHA-256 of the throwaway certificate a pod's server (a sidecar, the emptyDirs'
    /// restorer) made, as it says it on `GET http://<ip>:<port>/tls` over the pod network; or
    /// what went wrong, naming the URL.
    pub(crate) async fn certificate_pin(
        &self,
        ip: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<String, String> {
        let url = format!("http://{ip}:{port}/tls");
        let answer: serde_json::Value = self
            .sidecars
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("{url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{url}: unreadable answer: {e}"))?;
        answer["certificateSha256"]
            .as_str()
            .filter(|pin| pin.len() == 64)
            .map(str::to_owned)
            .ok_or_else(|| format!("{url}: no certificateSha256"))
    }

    /// The pod of `request`, if it carries the request's migration id.
    async fn pod_of(&self, request: &PodRequest) -> Result<Option<(Api<Pod>, Pod)>, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        let Some(pod) = pods.get_opt(&request.name).await? else {
            return Ok(None);
        };
        let id = annotations_of(&pod).migration_id;
        if id.as_deref() != Some(request.migration_id.as_str()) {
            return Err(ApiError::conflict(format!(
                "pod {}/{} is not under migration {} ({ANNOTATION_ID}={})",
                request.namespace,
                request.name,
                request.migration_id,
                id.as_deref().unwrap_or("absent")
            )));
        }
        Ok(Some((pods, pod)))
    }

    /// The state has arrived and runs: the pod becomes active and is unlocked. A repeat (the
    /// source's answer lost, or a coordinator finishing from the journal) answers the same,
    /// with `alreadyActive`.
    pub async fn activate_destination(
        &self,
        request: PodRequest,
    ) -> Result<serde_json::Value, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        if let Some(pod) = pods.get_opt(&request.name).await? {
            let activated_by = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_ACTIVATED_BY));
            if activated_by == Some(&request.migration_id)
                && annotations_of(&pod).migration_id.is_none()
            {
                return Ok(json!({
                    "name": request.name,
                    "namespace": request.namespace,
                    "podIp": pod.status.and_then(|s| s.pod_ip),
                    "alreadyActive": true,
                }));
            }
        }
        let Some((pods, _)) = self.pod_of(&request).await? else {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!("pod {}/{} not found", request.namespace, request.name),
            ));
        };
        let patch = json!({"metadata": {"annotations": {
            ANNOTATION_START_MODE: "active",
            ANNOTATION_ID: null,
            ANNOTATION_ACTIVATED_BY: request.migration_id,
        }}});
        let pod = pods
            .patch(
                &request.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        tracing::info!(migration = %request.migration_id, pod = %request.name, "destination pod active");
        Ok(json!({
            "name": request.name,
            "namespace": request.namespace,
            "podIp": pod.status.and_then(|s| s.pod_ip),
        }))
    }

    /// The migration is abandoned: its pod goes (absent already is fine).
    pub async fn delete_destination(
        &self,
        request: PodRequest,
    ) -> Result<serde_json::Value, ApiError> {
        // An orchestrator-level migration's emptyDir archive staged here is of no use once its
        // source gives up on it.
        self.drop_staged_volumes(&request.migration_id).await;
        // A pod restored for an orchestrator-level migration whose source gave up on it: the
        // source restores the service itself once this one is gone.
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        if let Some(pod) = pods.get_opt(&request.name).await? {
            if crate::orchestrator::restored_for(&pod) == Some(request.migration_id.as_str()) {
                // The source restores the service once this answers: the copy stops at once
                // and is gone first (never two copies running).
                let now = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                };
                pods.delete(&request.name, &now).await?;
                let until = Instant::now() + Duration::from_secs(60);
                while pods.get_opt(&request.name).await?.is_some() {
                    if Instant::now() > until {
                        return Err(ApiError::internal(format!(
                            "pod {}/{} was deleted but is still there after a minute",
                            request.namespace, request.name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                tracing::info!(migration = %request.migration_id, pod = %request.name, "restored pod deleted at its source's request");
                return Ok(json!({"deleted": true}));
            }
        }
        let deleted = match self.pod_of(&request).await? {
            Some((_, pod))
                if annotations_of(&pod).start_mode != Some(ums_contract::StartMode::Passive) =>
            {
                return Err(ApiError::conflict(format!(
                    "pod {}/{} is not a passive copy any more: not deleted",
                    request.namespace, request.name
                )));
            }
            Some((pods, _)) => {
                pods.delete(&request.name, &DeleteParams::default()).await?;
                tracing::info!(migration = %request.migration_id, pod = %request.name, "destination pod deleted");
                true
            }
            None => false,
        };
        Ok(json!({"deleted": deleted}))
    }
}
