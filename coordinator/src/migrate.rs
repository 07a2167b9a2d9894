//! The source side of a migration, UMS's `POST /migrate`: check the pod, lock it, have the
//! destination's coordinator create the passive copy, hand the source sidecar the copy's
//! address, make the copy active, then delete (or keep) the source. Any failure before the
//! state has arrived leaves the service running at the source, the copy deleted and the lock
//! released; the answer says where it failed and what was undone.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ums_contract::ANNOTATION_ID;

use crate::destination::{CreateAnswer, CreateRequest, PodRequest};
use crate::error::ApiError;
use crate::journal::{keep_patch, unlock_patch, SourceJournal, ANNOTATION_LOCKED_BY};
use crate::metrics::Outcome;
use crate::outcome::SourceRef;
use crate::peer::peer_base_url;
use crate::pod::{check, destination_pod};
use crate::state::Coordinator;
use crate::target::{Target, THIS_CLUSTER};

/// UMS's request body (its names, so UMS users' calls work).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrateRequest {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The destination cluster's coordinator: `host:port` (UMS) or `https://host:port`.
    /// Absent with `destinationNode`: another node of this cluster.
    pub destination_url: Option<String>,
    /// The node the copy runs on: of this cluster without `destinationUrl`, of the
    /// destination cluster with it.
    pub destination_node: Option<String>,
    /// Keep the source pod (emptied, `migration-start-mode: null`) instead of deleting it.
    #[serde(default)]
    pub keep: bool,
    /// `dind`, `pind` or `ff`: must be the pod's own; `ssu` (or `orchestrator`) for a pod
    /// without `migration-interface`.
    pub interface: Option<String>,
    /// Post-copy: the destination resumes before the memory has arrived (one container).
    #[serde(default)]
    pub post_copy: bool,
    /// The migration's bandwidth cap, bytes per second: a number or a Kubernetes quantity
    /// (`64Mi`); default: the coordinator's `--bandwidth-per-migration`.
    #[serde(default)]
    pub bandwidth_per_migration: Option<Value>,
    /// Seconds per GiB of the pod's memory (its containers' limits, else requests; one GiB at
    /// least) the state may take to move; past it the migration is aborted and the service
    /// stays at the source. Default: the coordinator's `--completion-timeout-per-gib`.
    #[serde(default, rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: Option<u64>,
    /// At the completion timeout, move a wrapped pod with one container again with
    /// post-copy instead of leaving it at the source. Default: the coordinator's
    /// `--allow-post-copy`.
    #[serde(default, rename = "allowPostCopy")]
    pub allow_post_copy: Option<bool>,
}

/// The answer of a successful migration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrateReport {
    /// UMS's fields.
    pub message: &'static str,
    #[serde(rename = "migration_id")]
    pub migration_id_ums: String,
    pub migration_interface: String,
    pub migration_id: String,
    pub pod: String,
    pub destination: DestinationPod,
    pub source_kept: bool,
    /// Milliseconds per phase, in order.
    pub phases: Vec<(String, u64)>,
    pub total_ms: u64,
    /// The source sidecar's report (downtime, bytes, containers, volumes, images).
    pub sidecar: Value,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPod {
    pub url: String,
    pub cluster: String,
    pub pod: String,
    pub pod_ip: String,
    /// The node the copy was placed on, when the migration named one or stayed in this
    /// cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A request validated: the fields UMS requires, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub name: String,
    pub namespace: String,
    /// The destination coordinator's URL, or [`THIS_CLUSTER`] (another node of this one).
    pub destination: String,
    /// The node the copy must run on.
    pub node: Option<String>,
    pub keep: bool,
    pub interface: Option<String>,
    pub post_copy: bool,
    /// Bytes per second the state may take (`None`: the coordinator's default).
    pub bandwidth: Option<u64>,
    /// Seconds per GiB the move may take (`None`: the coordinator's default).
    pub completion_timeout_per_gib: Option<u64>,
    /// Whether the completion timeout switches to post-copy (`None`: the coordinator's
    /// default).
    pub allow_post_copy: Option<bool>,
}

/// The GiB a pod's containers may hold: their memory limits (else requests) summed, rounded
/// up, one at least.
pub fn memory_gib(containers: &[k8s_openapi::api::core::v1::Container]) -> u64 {
    let bytes: i128 = containers
        .iter()
        .filter_map(|c| {
            let resources = c.resources.as_ref()?;
            let memory = resources
                .limits
                .as_ref()
                .and_then(|l| l.get("memory"))
                .or_else(|| resources.requests.as_ref().and_then(|r| r.get("memory")))?;
            ums_contract::quantity::parse_nanos(&memory.0).ok()
        })
        .map(|nanos| nanos / 1_000_000_000)
        .sum();
    let gib = (bytes + (1 << 30) - 1) >> 30;
    u64::try_from(gib).unwrap_or(u64::MAX).max(1)
}

/// A bandwidth cap as a request writes it: bytes per second, a number or a quantity.
pub fn parse_bandwidth(value: &Value) -> Result<u64, ApiError> {
    let bytes = match value {
        Value::Number(n) => n.as_u64().map(i128::from),
        Value::String(s) => ums_contract::quantity::parse_nanos(s)
            .ok()
            .map(|nanos| nanos / 1_000_000_000),
        _ => None,
    };
    bytes
        .filter(|b| *b > 0)
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "bandwidthPerMigration {value}: write bytes per second, a positive number or a quantity such as \"64Mi\""
            ))
        })
}

impl Validated {
    /// Whether the copy is made in this cluster (a node-to-node move).
    pub fn in_this_cluster(&self) -> bool {
        self.destination == THIS_CLUSTER
    }

    /// The destination as records and logs name it.
    pub fn destination_text(&self) -> String {
        match (&self.node, self.in_this_cluster()) {
            (Some(node), true) => format!("node {node} of this cluster"),
            (None, true) => "another node of this cluster".to_owned(),
            (Some(node), false) => format!("{} (node {node})", self.destination),
            (None, false) => self.destination.clone(),
        }
    }
}

/// UMS's checks on the body: `name` and `destinationUrl` (or, for a move to another node of
/// this cluster, `destinationNode`) are required; namespace defaults to `default`.
pub fn validate(request: MigrateRequest) -> Result<Validated, ApiError> {
    let name = request
        .name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required (the pod to migrate)"))?;
    let node = request
        .destination_node
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    if let Some(node) = &node {
        check_subdomain("destinationNode", node)?;
    }
    let destination = match (request.destination_url, &node) {
        (Some(url), _) => peer_base_url(&url)?,
        (None, Some(_)) => THIS_CLUSTER.to_owned(),
        (None, None) => {
            return Err(ApiError::bad_request(
                "destinationUrl (the destination cluster's coordinator, host:port) or destinationNode (another node of this cluster) is required",
            ))
        }
    };
    // The orchestrator-level interface under UMS's name, or the name users read.
    let interface = request.interface.map(|i| match i.as_str() {
        "orchestrator" => crate::orchestrator::INTERFACE.to_owned(),
        _ => i,
    });
    if let Some(i) = &interface {
        if i != "dind" && i != "pind" && i != "ff" && i != crate::orchestrator::INTERFACE {
            return Err(ApiError::bad_request(format!(
                "interface {i:?}: the coordinator migrates \"dind\" and \"pind\" pods, \"ff\" pods (built on the ff base image), and ordinary pods as \"ssu\" (or \"orchestrator\")"
            )));
        }
    }
    check_subdomain("name", &name)?;
    let namespace = request
        .namespace
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "default".into());
    check_label("namespace", &namespace)?;
    let bandwidth = request
        .bandwidth_per_migration
        .as_ref()
        .map(parse_bandwidth)
        .transpose()?;
    if request.completion_timeout_per_gib == Some(0) {
        return Err(ApiError::bad_request(
            "completionTimeoutPerGiB must be at least 1 (seconds per GiB of the pod's memory)",
        ));
    }
    Ok(Validated {
        completion_timeout_per_gib: request.completion_timeout_per_gib,
        bandwidth,
        name,
        namespace,
        destination,
        node,
        keep: request.keep,
        interface,
        post_copy: request.post_copy,
        allow_post_copy: request.allow_post_copy,
    })
}

/// A sidecar's run, as its `GET /healthz` says.
#[derive(Debug, Clone)]
struct SidecarHealth {
    instance: String,
    resumed_from: Option<String>,
    /// `docker`, `podman`, or `ff` (the service's own supervisor, `ums-ff`).
    engine: Option<String>,
}

/// Where passing an operator's abort to the source's sidecar stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AbortPass {
    NotAsked,
    /// Not registered there yet (or unreachable): asked again while the migration runs.
    AskAgain,
    Done,
}

/// The error of a migration an operator aborted before the freeze.
fn aborted() -> ApiError {
    ApiError::conflict(
        "aborted by an operator (POST /migrations/{id}/abort) before anything was frozen: the service runs at the source",
    )
}

/// A pod's name: a DNS subdomain (RFC 1123: at most 253 characters, lower-case letters,
/// digits, '-' and '.', starting and ending with a letter or digit).
pub fn check_subdomain(field: &str, value: &str) -> Result<(), ApiError> {
    if !ums_contract::names::is_dns1123_subdomain(value) {
        return Err(ApiError::bad_request(format!(
            "{field} {value:?} is not a valid Kubernetes name (RFC 1123 subdomain: lower-case letters, digits, '-' and '.', at most 253 characters)"
        )));
    }
    Ok(())
}

/// A namespace's name: a DNS label (RFC 1123: at most 63 characters, lower-case letters,
/// digits and '-', starting and ending with a letter or digit).
pub fn check_label(field: &str, value: &str) -> Result<(), ApiError> {
    if !ums_contract::names::is_dns1123_label(value) {
        return Err(ApiError::bad_request(format!(
            "{field} {value:?} is not a valid Kubernetes name (RFC 1123 label: lower-case letters, digits and '-', at most 63 characters)"
        )));
    }
    Ok(())
}

impl Coordinator {
    /// Runs one migration to the end; `id` is recorded for `GET /migrations/{id}`.
    pub async fn migrate(&self, request: Validated, id: &str) -> Result<MigrateReport, ApiError> {
        let started = Instant::now();
        let pod_name = format!("{}/{}", request.namespace, request.name);
        if self.record(id).is_none() {
            self.begin(id, &pod_name, &request.destination_text(), None);
        }
        let mut result = self.migrate_inner(&request, id, started).await;
        // Past its completion timeout, rolled back with the service at the source: where
        // allowed, the move is made again with post-copy (its downtime does not grow with the
        // memory, which follows once the copy runs).
        if let Err(e) = &mut result {
            if let Some(copy) = e.switch_to_post_copy.take() {
                self.enter_saying(
                    id,
                    "switching",
                    "MigrationSwitchedToPostCopy",
                    &format!(
                        "migration {id}: {}; allowPostCopy: moving it again with post-copy",
                        e.message
                    ),
                );
                let switched = Validated {
                    post_copy: true,
                    ..request.clone()
                };
                let target = Target::of(self.peers.clone(), &request.destination);
                let gone = PodRequest {
                    migration_id: id.to_owned(),
                    namespace: request.namespace.clone(),
                    name: copy,
                };
                // The first attempt's copy is deleted; the next one takes its name.
                match self.copy_gone(&target, &gone).await {
                    Ok(()) => {
                        result = self.migrate_inner(&switched, id, started).await.map_err(
                            |mut again| {
                                again.message = format!(
                                    "{} (after its completion timeout the move was made again with post-copy)",
                                    again.message
                                );
                                again
                            },
                        );
                    }
                    Err(why) => e.rollback.push(format!(
                        "not switched to post-copy: the first attempt's copy is not gone ({})",
                        why.message
                    )),
                }
            }
        }
        match &result {
            Ok(report) => {
                let bytes = report.sidecar["totals"]["contentBytes"]
                    .as_u64()
                    .unwrap_or(0);
                self.metrics
                    .finished(Outcome::succeeded, &report.phases, bytes);
            }
            Err(e) => {
                self.fail(id, &e.message);
                let phases = self.record(id).map(|r| r.phases).unwrap_or_default();
                // Refused: nothing was locked (the checks, or the lock itself refused).
                let outcome =
                    if matches!(e.phase, Some("queued") | Some("checking") | Some("locking")) {
                        Outcome::refused
                    } else {
                        Outcome::failed
                    };
                self.metrics.finished(outcome, &phases, 0);
                tracing::warn!(migration = id, pod = %pod_name, phase = e.phase.unwrap_or(""), error = %e.message, "migration failed");
            }
        }
        result
    }

    async fn migrate_inner(
        &self,
        request: &Validated,
        id: &str,
        started: Instant,
    ) -> Result<MigrateReport, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        let pod = pods
            .get_opt(&request.name)
            .await
            .map_err(|e| ApiError::from(e).in_phase("checking"))?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("pod {}/{} not found", request.namespace, request.name),
                )
                .in_phase("checking")
            })?;
        // The migration policies: it waits its turn (queued) while the cluster, or the node it
        // leaves, runs as many migrations as they allow.
        let source_node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let waiting = self.cancel_token(id);
        let mut queued = false;
        let _slot = self
            .slots
            .acquire(id, source_node.clone(), &waiting, |ahead| {
                queued = true;
                self.enter(id, "queued");
                tracing::info!(migration = id, ahead, "migration queued by the migration policies");
            })
            .await
            .ok_or_else(|| {
                ApiError::conflict(
                    "aborted by an operator (POST /migrations/{id}/abort) while it was queued: nothing was done, the service runs at the source",
                )
                .in_phase("queued")
            })?;
        if queued {
            self.enter(id, "checking");
        }
        if crate::orchestrator::is_orchestrator_level(&pod, request.interface.as_deref()) {
            if request.keep || request.post_copy {
                return Err(ApiError::bad_request(
                    "keep and postCopy apply to wrapped pods (dind, pind): an orchestrator-level migration stops the source and copies its state once",
                )
                .in_phase("checking"));
            }
            return self.migrate_orchestrator(request, id, started, pod).await;
        }
        let migratable = check(&pod, request.interface.as_deref()).map_err(|r| {
            ApiError::new(
                StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST),
                r.to_string(),
            )
            .in_phase("checking")
        })?;
        if request.post_copy && migratable.containers.len() != 1 {
            return Err(ApiError::bad_request(format!(
                "postCopy moves one container and pod {}/{} has {}: migrate it without postCopy",
                request.namespace,
                request.name,
                migratable.containers.len()
            ))
            .in_phase("checking"));
        }
        let target = Target::of(self.peers.clone(), &request.destination);
        let identity = self
            .target_identity(&target)
            .await
            .map_err(|e| e.in_phase("checking"))?;
        // In this cluster the copy needs a node other than the source's, and a name of its
        // own (pods' names are unique in a namespace).
        let place = self
            .copy_place(
                &target,
                &pod,
                source_node.as_deref(),
                request.node.as_deref(),
                id,
            )
            .await
            .map_err(|e| e.in_phase("checking"))?;
        let copy = place.name.clone();
        // The sidecar run the pod is checked with: a restart before the state moves is then
        // refused by the sidecar, and one after it is named in the answer.
        let checked = self.sidecar_health(&migratable.ip).await;
        // A service-level pod migrates only through the supervisor its image was built on:
        // without it nothing could take the state, so nothing is locked or frozen.
        if migratable.interface == ums_contract::Interface::Ff
            && checked.as_ref().and_then(|h| h.engine.as_deref()) != Some("ff")
        {
            return Err(ApiError::conflict(format!(
                "pod {}/{} has migration-interface ff, but no ums-ff answers on {}:{}/healthz: its image must be built FROM UMS-rs's ff base image (ums-rs/ff, label io.ums-rs.ff-base), whose entrypoint ums-ff supervises and migrates the service",
                request.namespace, request.name, migratable.ip, self.sidecar_port
            ))
            .in_phase("checking"));
        }
        let cancel = self.cancel_token(id);
        if cancel.is_cancelled() {
            return Err(aborted().in_phase("checking"));
        }

        // Lock, on the version of the pod that was checked: a change in between is a 409.
        self.enter(id, "locking");
        self.lock_source(&pods, request, Some(&migratable.resource_version), id)
            .await?;
        let unlock = || self.unlock_source(&pods, &request.name);

        if cancel.is_cancelled() {
            let mut e = aborted();
            e.rollback.push(unlock().await);
            return Err(e.in_phase("locking"));
        }

        // The passive copy at the destination.
        self.enter(id, "creating");
        let copy_pod = place.apply(destination_pod(&pod, &migratable.containers, id));
        // The copy asks its source what became of the migration; in this cluster it is
        // this coordinator, asked without a network hop.
        let source_url = if request.in_this_cluster() {
            Some(THIS_CLUSTER.to_owned())
        } else {
            self.advertise_url.clone()
        };
        let create = CreateRequest {
            migration_id: id.to_owned(),
            namespace: request.namespace.clone(),
            pod: copy_pod,
            source: source_url.map(|url| SourceRef {
                url,
                namespace: request.namespace.clone(),
                name: request.name.clone(),
            }),
            interface: None,
        };
        let creating = self.target_create(
            &target,
            &create,
            self.pod_ready_timeout + Duration::from_secs(30),
        );
        // An abort stops the wait (the destination deletes a copy whose caller went away;
        // the rollback below deletes it too).
        let outcome = tokio::select! {
            outcome = creating => outcome,
            () = cancel.cancelled() => Err(aborted()),
        };
        let outcome = match outcome {
            Ok(created) if cancel.is_cancelled() => {
                tracing::info!(migration = id, copy = %created.name, "aborted once the copy was made");
                Err(aborted())
            }
            other => other,
        };
        let created: CreateAnswer = match outcome {
            Ok(created) => created,
            Err(mut e) => {
                // The destination deletes what it created when its create fails; a create
                // that failed otherwise (timed out on the way back, a 5xx) is deleted here.
                // A refusal (4xx) created nothing.
                if e.peer_refused() {
                    e.rollback
                        .push("the destination refused: it created no pod".to_owned());
                } else {
                    e.rollback
                        .push(self.delete_copy(&target, id, request, &copy).await);
                }
                e.rollback.push(unlock().await);
                return Err(e.in_phase("creating"));
            }
        };

        // The journal: from here on, whoever finds the pod with its state gone can finish.
        let journal = SourceJournal {
            migration_id: id.to_owned(),
            destination: request.destination.clone(),
            copy_namespace: created.namespace.clone(),
            copy_name: created.name.clone(),
            credential: created.migration_credential.clone(),
            keep: request.keep,
        };
        if let Err(e) = pods
            .patch(
                &request.name,
                &PatchParams::default(),
                &Patch::Merge(&journal.patch()),
            )
            .await
        {
            let mut e = ApiError::from(e);
            e.message = format!(
                "could not write the migration's journal on the source pod: {}",
                e.message
            );
            e.rollback
                .push(self.delete_copy(&target, id, request, &copy).await);
            e.rollback.push(unlock().await);
            return Err(e.in_phase("creating"));
        }

        // The state moves sidecar to sidecar.
        self.enter(id, "migrating");
        let url = format!("http://{}:{}/migrate", migratable.ip, self.sidecar_port);
        let token = self.sidecar_token(
            &migratable.ip,
            migratable.uid.as_deref(),
            ums_contract::credential::Scope::Coordinator,
            Some(id),
            300,
        );
        let mut body = json!({
            "migrationId": id,
            "destination": created.sidecar_url,
            "destinationToken": created.sidecar_token,
            "destinationCertificateSha256": created.sidecar_certificate_sha256,
            "postCopy": request.post_copy,
        });
        if let Some(cap) = request.bandwidth.or(self.bandwidth_per_migration) {
            body["bandwidthBytesPerSecond"] = json!(cap);
        }
        // Only to a sidecar that says its run (an older one knows no such field).
        if let Some(checked) = &checked {
            body["expectInstance"] = json!(checked.instance);
        }
        let moving = self
            .sidecars
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .timeout(Duration::from_secs(3600))
            .send();
        tokio::pin!(moving);
        // An operator's abort while the state moves is passed to the source's sidecar, which
        // stops and rolls back unless the destination has confirmed; its answer follows.
        // A sidecar that has not registered the migration yet answers 404: asked again.
        let mut abort = AbortPass::NotAsked;
        let mut again = tokio::time::interval(Duration::from_millis(500));
        // The completion timeout: past it the move is aborted as an operator would.
        // Not for a post-copy move: once its copy runs, nothing can be rolled back.
        let completion = request
            .completion_timeout_per_gib
            .or(self.completion_timeout_per_gib)
            .filter(|_| !request.post_copy)
            .map(|per_gib| {
                Duration::from_secs(per_gib.saturating_mul(memory_gib(&migratable.containers)))
            });
        let expiry = async {
            match completion {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let mut timed_out = false;
        let moved = loop {
            tokio::select! {
                outcome = &mut moving => break outcome,
                () = &mut expiry, if !timed_out && abort == AbortPass::NotAsked => {
                    timed_out = true;
                    tracing::warn!(migration = id, limit_s = completion.map(|l| l.as_secs()), "the move did not complete in time: aborting it");
                    abort = self.pass_abort(&migratable.ip, migratable.uid.as_deref(), id).await;
                }
                () = cancel.cancelled(), if abort == AbortPass::NotAsked => {
                    abort = self.pass_abort(&migratable.ip, migratable.uid.as_deref(), id).await;
                }
                _ = again.tick(), if abort == AbortPass::AskAgain => {
                    abort = self.pass_abort(&migratable.ip, migratable.uid.as_deref(), id).await;
                }
            }
        };
        // What the answers name the pod's migration agent.
        let agent = if migratable.interface == ums_contract::Interface::Ff {
            "source ums-ff"
        } else {
            "source sidecar"
        };
        let sidecar_report = match moved {
            Ok(response) if response.status().is_success() => {
                response.json::<Value>().await.unwrap_or(Value::Null)
            }
            outcome => {
                let mut e = match outcome {
                    Ok(response) => {
                        let status = response.status();
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        let message = body["error"].as_str().unwrap_or("no message").to_owned();
                        let mut e =
                            ApiError::from_peer(status, format!("{agent}: {status}: {message}"));
                        if let Some(rollback) = body["rollback"].as_array() {
                            e.rollback.extend(
                                rollback
                                    .iter()
                                    .filter_map(|r| r.as_str())
                                    .map(|r| format!("{agent}: {r}")),
                            );
                        }
                        e
                    }
                    Err(e) => ApiError::bad_gateway(format!(
                        "{agent} at {url} unreachable: {}",
                        crate::peer::error_chain(&e)
                    )),
                };
                if timed_out {
                    e.message = format!(
                        "the migration did not complete within its completion timeout ({} s: completionTimeoutPerGiB {} s for {} GiB) and was aborted; {}",
                        completion.map(|l| l.as_secs()).unwrap_or(0),
                        request.completion_timeout_per_gib.or(self.completion_timeout_per_gib).unwrap_or(0),
                        memory_gib(&migratable.containers),
                        e.message
                    );
                }
                e.rollback
                    .push(self.delete_copy(&target, id, request, &copy).await);
                e.rollback.push(unlock().await);
                // The answer says where the service runs now, as the source's sidecar sees
                // it after its own rollback (a clean-looking rollback may hide a source whose
                // runtime died with the service).
                let restarted = self
                    .source_restart(&migratable.ip, checked.as_ref(), id)
                    .await;
                let restarted = restarted.inspect(|line| e.rollback.push(line.clone()));
                match pods.get_opt(&request.name).await {
                    Ok(Some(now)) => {
                        // A restarted runtime container starts its containers again: the
                        // answer waits for them (a minute at most).
                        let until = Instant::now() + Duration::from_secs(60);
                        let (at, seen) = loop {
                            let (at, seen) = self.service_runs_at(&now).await;
                            if at == "source" || restarted.is_none() || Instant::now() > until {
                                break (at, seen);
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        };
                        e.service_runs_at = Some(at);
                        e.rollback.push(seen);
                    }
                    Ok(None) => {
                        e.service_runs_at = Some("nowhere");
                        e.rollback.push("the source pod is gone".to_owned());
                    }
                    Err(_) => e.service_runs_at = Some("unknown"),
                }
                // Post-copy moves one container of a wrapped pod (not ff's).
                e.switch_to_post_copy = (timed_out
                    && e.service_runs_at == Some("source")
                    && request.allow_post_copy.unwrap_or(self.allow_post_copy)
                    && migratable.interface != ums_contract::Interface::Ff
                    && migratable.containers.len() == 1)
                    .then(|| copy.clone());
                return Err(e.in_phase("migrating"));
            }
        };

        // The service runs at the destination: from here on nothing is rolled back.
        self.enter(id, "activating");
        let pod_request = PodRequest {
            migration_id: id.to_owned(),
            namespace: request.namespace.clone(),
            name: created.name.clone(),
        };
        self.activate_copy(&target, &pod_request, &created.migration_credential)
            .await
            .map_err(|e| {
                let mut e = ApiError::bad_gateway(format!(
                    "the service runs at the destination, but its pod could not be made active there yet: {}; this coordinator makes it active from the source pod's journal (it asks again every minute) and then deletes or keeps the source",
                    e.message
                ))
                .in_phase("activating");
                e.service_runs_at = Some("destination");
                e
            })?;

        self.enter(id, "finishing");
        self.release_source(&pods, &request.name, request.keep)
            .await
            .map_err(|e| e.in_phase("finishing"))?;
        self.enter(id, "done");
        let phases = self.record(id).map(|r| r.phases).unwrap_or_default();
        tracing::info!(migration = id, pod = %request.name, destination = %request.destination_text(), copy = %created.name, "migration done");
        self.announce(
            id,
            crate::events::Kind::Normal,
            "Migrated",
            &format!(
                "migration {id}: the service runs in pod {}/{} ({}{}), downtime {} ms, {} bytes moved",
                created.namespace,
                created.name,
                if request.in_this_cluster() {
                    "this cluster".to_owned()
                } else {
                    format!("cluster {}", identity.cluster)
                },
                place.node.as_deref().map(|n| format!(", node {n}")).unwrap_or_default(),
                sidecar_report["totals"]["downtimeMs"].as_u64().unwrap_or(0),
                sidecar_report["totals"]["contentBytes"].as_u64().unwrap_or(0),
            ),
        );
        Ok(MigrateReport {
            message: "migration complete!",
            migration_id_ums: id.to_owned(),
            migration_interface: migratable.interface.to_string(),
            migration_id: id.to_owned(),
            pod: format!("{}/{}", request.namespace, request.name),
            destination: DestinationPod {
                url: request.destination.clone(),
                cluster: identity.cluster,
                pod: format!("{}/{}", created.namespace, created.name),
                pod_ip: created.pod_ip,
                node: place.node,
            },
            source_kept: request.keep,
            phases,
            total_ms: started.elapsed().as_millis() as u64,
            sidecar: sidecar_report,
        })
    }

    /// Locks the source pod for migration `id` (this coordinator's lock), on the version that
    /// was checked: a change in between is a 409 in `locking`.
    pub(crate) async fn lock_source(
        &self,
        pods: &Api<Pod>,
        request: &Validated,
        resource_version: Option<&str>,
        id: &str,
    ) -> Result<(), ApiError> {
        let lock = json!({"metadata": {
            "resourceVersion": resource_version,
            "annotations": {ANNOTATION_ID: id, ANNOTATION_LOCKED_BY: &self.cluster},
        }});
        pods.patch(&request.name, &PatchParams::default(), &Patch::Merge(&lock))
            .await
            .map_err(|e| {
                let e = ApiError::from(e);
                if e.status == StatusCode::CONFLICT {
                    ApiError::conflict(format!(
                        "pod {}/{} changed while it was checked (another migration?): try again",
                        request.namespace, request.name
                    ))
                } else {
                    e
                }
                .in_phase("locking")
            })?;
        Ok(())
    }

    /// Releases the source pod's lock; what was done, for the answer.
    pub(crate) async fn unlock_source(&self, pods: &Api<Pod>, name: &str) -> String {
        match pods
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&unlock_patch()),
            )
            .await
        {
            Ok(_) => "source pod unlocked".to_owned(),
            Err(e) => format!("FAILED to unlock the source pod: {e}"),
        }
    }

    /// The service moved: the source pod is deleted, or kept emptied and released.
    pub(crate) async fn release_source(
        &self,
        pods: &Api<Pod>,
        name: &str,
        keep: bool,
    ) -> Result<(), ApiError> {
        if keep {
            pods.patch(name, &PatchParams::default(), &Patch::Merge(&keep_patch()))
                .await?;
        } else {
            match pods.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `/restore` at the destination, retried for two minutes while the peer is unreachable
    /// or unavailable (a destination coordinator restarting keeps a copy that holds the
    /// service for it); a refusal is not asked again.
    pub(crate) async fn activate_copy(
        &self,
        target: &Target,
        request: &PodRequest,
        credential: &str,
    ) -> Result<Value, ApiError> {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            match self.target_restore(target, request, credential).await {
                Err(e) if e.is_transient() && Instant::now() < until => {
                    tracing::warn!(migration = %request.migration_id, error = %e.message, "making the copy active failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// After a failed move: whether the source's runtime container restarted since the pod
    /// was checked (its sidecar another run), waiting up to a minute for a sidecar that does
    /// not answer yet, and what that meant for the service.
    async fn source_restart(
        &self,
        ip: &str,
        checked: Option<&SidecarHealth>,
        id: &str,
    ) -> Option<String> {
        let checked = checked?;
        let until = Instant::now() + Duration::from_secs(60);
        let now = loop {
            match self.sidecar_health(ip).await {
                Some(now) => break now,
                None if Instant::now() < until => tokio::time::sleep(Duration::from_secs(1)).await,
                None => {
                    return Some(
                        "the source's sidecar did not answer for a minute after the failure"
                            .to_owned(),
                    )
                }
            }
        };
        if now.instance == checked.instance {
            return None;
        }
        Some(if now.resumed_from.as_deref() == Some(id) {
            "the source's runtime container restarted during the migration and restored the service from its dump: it continues where it was frozen".to_owned()
        } else {
            "the source's runtime container restarted during the migration before its state had all left (no whole dump to resume from): the service started afresh there, and what it held in memory was lost with the restart (not moved)".to_owned()
        })
    }

    /// The source sidecar's run (`GET /healthz`), if it answers.
    async fn sidecar_health(&self, ip: &str) -> Option<SidecarHealth> {
        let url = format!("http://{ip}:{}/healthz", self.sidecar_port);
        let health: Value = self
            .sidecars
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(SidecarHealth {
            instance: health["instance"].as_str()?.to_owned(),
            resumed_from: health["resumedFrom"].as_str().map(str::to_owned),
            engine: health["engine"].as_str().map(str::to_owned),
        })
    }

    /// Asks the source's sidecar to stop migration `id` (logged: the migration's own answer
    /// says how it ended).
    async fn pass_abort(&self, ip: &str, uid: Option<&str>, id: &str) -> AbortPass {
        let url = format!("http://{ip}:{}/migrate/{id}/abort", self.sidecar_port);
        let token = self.sidecar_token(
            ip,
            uid,
            ums_contract::credential::Scope::Coordinator,
            Some(id),
            60,
        );
        match self
            .sidecars
            .post(&url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                tracing::warn!(
                    migration = id,
                    "the source's sidecar stops the migration and rolls back"
                );
                AbortPass::Done
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => AbortPass::AskAgain,
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                tracing::warn!(migration = id, %status, answer = %body["error"], "the source's sidecar did not stop the migration");
                AbortPass::Done
            }
            Err(e) => {
                tracing::warn!(migration = id, error = %crate::peer::error_chain(&e), "the abort did not reach the source's sidecar; asking again");
                AbortPass::AskAgain
            }
        }
    }

    async fn delete_copy(
        &self,
        target: &Target,
        id: &str,
        request: &Validated,
        copy: &str,
    ) -> String {
        let pod_request = PodRequest {
            migration_id: id.to_owned(),
            namespace: request.namespace.clone(),
            name: copy.to_owned(),
        };
        match self.target_delete(target, &pod_request).await {
            Ok(answer) if answer["deleted"] == true => "destination pod deleted".to_owned(),
            Ok(_) => "no destination pod to delete".to_owned(),
            Err(e) => format!(
                "FAILED to delete the destination pod: {}; the destination's coordinator deletes it itself ({})",
                e.message,
                if self.advertise_url.is_some() {
                    "a copy whose restored state runs once this coordinator tells it the service runs here, one that never started after 31 minutes"
                } else {
                    "one that never started after 31 minutes; one whose restored state runs waits for an operator, as this coordinator has no --advertise-url"
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Result<Validated, ApiError> {
        validate(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn ums_bodies_validate_with_its_defaults() {
        let v = request(json!({"name": "svc", "destinationUrl": "cloud:30001"})).unwrap();
        assert_eq!(v.namespace, "default");
        assert_eq!(v.destination, "https://cloud:30001");
        assert!(!v.keep);
        assert!(!v.post_copy);
        let v = request(json!({"name": "svc", "namespace": "shop", "destinationUrl": "https://c:1", "keep": true, "interface": "pind", "postCopy": true})).unwrap();
        assert_eq!((v.namespace.as_str(), v.keep), ("shop", true));
        assert!(v.post_copy);
        let e = request(json!({"destinationUrl": "c:1"})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("name"), "{e}");
        let e = request(json!({"name": "svc"})).unwrap_err();
        assert!(e.message.contains("destinationUrl"), "{e}");
        assert!(e.message.contains("destinationNode"), "{e}");
        // Another node of this cluster; or a node of the destination cluster.
        let v = request(json!({"name": "svc", "destinationNode": "node-2"})).unwrap();
        assert!(v.in_this_cluster());
        assert_eq!(v.node.as_deref(), Some("node-2"));
        assert_eq!(v.destination_text(), "node node-2 of this cluster");
        let v = request(json!({"name": "svc", "destinationUrl": "c:1", "destinationNode": "n"}))
            .unwrap();
        assert!(!v.in_this_cluster());
        assert_eq!(v.destination_text(), "https://c:1 (node n)");
        let e = request(json!({"name": "svc", "destinationNode": "Node_2"})).unwrap_err();
        assert!(e.message.contains("destinationNode"), "{e}");
        let v = request(
            json!({"name": "svc", "destinationNode": "n", "bandwidthPerMigration": "16Mi"}),
        )
        .unwrap();
        assert_eq!(v.bandwidth, Some(16 << 20));
        let v =
            request(json!({"name": "svc", "destinationNode": "n", "bandwidthPerMigration": 1000}))
                .unwrap();
        assert_eq!(v.bandwidth, Some(1000));
        for bad in [json!("fast"), json!(0), json!(-5), json!(true)] {
            let e = request(
                json!({"name": "svc", "destinationNode": "n", "bandwidthPerMigration": bad}),
            )
            .unwrap_err();
            assert!(e.message.contains("bandwidthPerMigration"), "{e}");
        }
        let v =
            request(json!({"name": "svc", "destinationUrl": "c:1", "interface": "ff"})).unwrap();
        assert_eq!(v.interface.as_deref(), Some("ff"));
        let e = request(json!({"name": "svc", "destinationUrl": "c:1", "interface": "docker"}))
            .unwrap_err();
        assert!(e.message.contains("ff"), "{e}");
    }

    #[test]
    fn the_completion_timeout_scales_with_the_pods_memory() {
        let containers: Vec<k8s_openapi::api::core::v1::Container> = serde_json::from_value(json!([
            {"name": "a", "resources": {"limits": {"memory": "1536Mi"}, "requests": {"memory": "1Gi"}}},
            {"name": "b", "resources": {"requests": {"memory": "600M"}}},
        ]))
        .unwrap();
        assert_eq!(memory_gib(&containers), 3);
        assert_eq!(memory_gib(&containers[..0]), 1);
        let e =
            request(json!({"name": "svc", "destinationNode": "n", "completionTimeoutPerGiB": 0}))
                .unwrap_err();
        assert!(e.message.contains("completionTimeoutPerGiB"), "{e}");
    }

    #[test]
    fn names_that_kubernetes_would_refuse_are_a_400() {
        for (name, namespace) in [
            ("Svc", "default"),
            ("svc_1", "default"),
            ("-svc", "default"),
            ("svc/x", "default"),
            ("svc", "Shop"),
            ("svc", "shop.eu"),
            (
                "svc",
                "a-very-long-namespace-name-that-is-longer-than-sixty-three-chars",
            ),
        ] {
            let e = request(json!({"name": name, "namespace": namespace, "destinationUrl": "c:1"}))
                .unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{name} {namespace}");
            assert!(e.message.contains("valid Kubernetes name"), "{e}");
        }
        request(json!({"name": "svc-1.v2", "namespace": "shop-eu", "destinationUrl": "c:1"}))
            .unwrap();
    }
}
