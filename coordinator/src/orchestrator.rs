//! The orchestrator-level interface (UMS's `ssu`; the Pisa workflow), source side: an ordinary
//! pod, unwrapped, moves through the kubelet's checkpoint API.
//!
//! checking (the pod runs, its node's runtime restores checkpoints and serves the kubelet
//! endpoint, the node part runs there, the destination's preflight passes) -> locking ->
//! checkpointing (every container at once, through the kubelet of the pod's node) ->
//! stopping (the source pod is deleted right after: a CRI checkpoint leaves it running, and
//! the time it ran on is reported as the divergence window) -> transferring (the node part
//! sends each archive straight to the destination coordinator, which stores it as a checkpoint
//! image) -> creating (the destination creates the pod from the source's spec with each
//! container's image replaced by its checkpoint image, and answers once it runs and is ready)
//! -> finishing (the archives are removed from the node).
//!
//! A failure before the source is stopped leaves it running (the archives are removed, the lock
//! released). After, the archives on the source's node are the service: once the destination
//! has said it holds no copy (`/delete`), the pod is restored at the source from them (the node
//! part pushes them into this cluster's checkpoint registry); if the destination cannot say
//! so, or the restore fails, they are kept and the answer names them: never two copies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use ums_contract::ANNOTATION_ID;

use crate::checkpoint_journal::{
    from_config_map, journal_name, to_config_map, CheckpointJournal, LABEL_JOURNAL,
};
use crate::checkpoint_upload::{CheckpointRegistry, UploadAnswer, UploadRequest, UploadedImage};
use crate::destination::{CreateAnswer, CreateRequest};
use crate::empty_dirs::with_restorer;
use crate::error::ApiError;
use crate::journal::ANNOTATION_LOCKED_BY;
use crate::kubelet::{checkpoint_node, kernel_of, node_of, skew_ms, Checkpoint, CheckpointNode};
use crate::migrate::{DestinationPod, MigrateReport, Validated};
use crate::placement::copy_name_at;
use crate::state::{unix_ms, Coordinator};
use crate::target::Target;

/// The interface's name in reports (UMS's).
pub const INTERFACE: &str = "ssu";

/// On a pod restored from checkpoint images: the migration it was restored for.
pub const ANNOTATION_RESTORED_FOR: &str = "migration.ums-rs.io/restored-for";

/// The migration a pod was restored for, from checkpoint images (its
/// [`ANNOTATION_RESTORED_FOR`]).
pub fn restored_for(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_RESTORED_FOR)
        .map(String::as_str)
}

/// Whether `POST /migrate` goes the orchestrator-level way: asked for, or (UMS's order) the pod
/// carries no `migration-interface`.
pub fn is_orchestrator_level(pod: &Pod, requested: Option<&str>) -> bool {
    match requested {
        Some(i) => i == INTERFACE,
        None => !pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ums_contract::annotations::ANNOTATION_INTERFACE)),
    }
}

/// The pod to create at the destination: the source's spec, each container's image replaced by
/// its checkpoint image (pulled by digest), unbound from the source's node, without this
/// migration's lock, with the init container that puts its emptyDirs back (running
/// `restorer_image`) when it has some (pure).
pub fn restored_pod(
    source: &Pod,
    images: &BTreeMap<String, String>,
    restorer_image: &str,
) -> Result<Pod, String> {
    let mut pod = pod_to_restore(source, restorer_image);
    for container in pod.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        let image = images
            .get(&container.name)
            .ok_or_else(|| format!("no checkpoint image for container {}", container.name))?;
        container.image = Some(image.clone());
        container.image_pull_policy = Some("IfNotPresent".into());
    }
    Ok(pod)
}

/// The pod as it will be restored, its containers still naming their base images (what the
/// destination's preflight checks): the source's spec unbound from its node, its metadata
/// without this migration's lock, and the emptyDirs' restorer when it has some (pure).
pub fn pod_to_restore(source: &Pod, restorer_image: &str) -> Pod {
    let mut spec = source.spec.clone().unwrap_or_default();
    spec.node_name = None;
    let mut annotations = source.metadata.annotations.clone().unwrap_or_default();
    annotations.remove(ANNOTATION_ID);
    annotations.remove(ANNOTATION_LOCKED_BY);
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    let mut pod = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: source.metadata.name.clone(),
            labels: source.metadata.labels.clone(),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    with_restorer(&mut pod, restorer_image);
    pod
}

/// The name the copy of `source` has at `target` in migration `id`.
fn copy_at(target: &Target, source: &Pod, id: &str) -> String {
    copy_name_at(matches!(target, Target::ThisCluster), source, id)
}

/// The node part's `POST /push` of checkpoint `c` of migration `id` into `registry` (tag: the
/// migration's and container's, then `suffix`) (pure).
fn push_body(registry: &CheckpointRegistry, id: &str, c: &Checkpoint, suffix: &str) -> Value {
    json!({
        "archive": c.archive,
        "target": format!("{}:{}{suffix}", registry.pull_repository,
            crate::checkpoint_upload::image_tag(id, &c.container)),
        "container": c.container,
        "caPem": registry.ca_pem,
        "insecure": registry.insecure,
    })
}

/// The image the nodes pull from `registry`, from the node part's answer to `POST /push`
/// (pure); `None` if it names no digest.
fn pushed_image(registry: &CheckpointRegistry, answer: &Value) -> Option<String> {
    let digest = answer["digest"].as_str().filter(|d| !d.is_empty())?;
    Some(crate::checkpoint_upload::pull_reference(registry, digest))
}

/// Why a pod cannot move this way now (pure): not running, or a container not running.
pub fn not_ready(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return Some(format!("it is {phase}, not Running"));
    }
    let names: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.as_str()))
        .collect();
    for name in names {
        let running = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == name))
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some());
        if !running {
            return Some(format!("its container {name} is not running"));
        }
    }
    if pod.spec.as_ref().is_some_and(|s| {
        s.init_containers
            .iter()
            .flatten()
            .any(|c| c.name != crate::empty_dirs::RESTORER)
    }) {
        return Some("it has init containers, which a checkpoint does not carry".into());
    }
    None
}

/// The node part's pod on one node.
#[derive(Debug, Clone)]
struct NodePartPod {
    ip: String,
    uid: Option<String>,
    /// Its image: the restored pod's init container runs it (`ums-node restore-volumes`).
    image: String,
}

impl Coordinator {
    /// The node part (deploy/node) on the pod's node.
    async fn node_part(
        &self,
        node: &CheckpointNode,
        host_ip: Option<&str>,
    ) -> Result<NodePartPod, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &self.node_part.namespace);
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=ums-node"))
            .await?;
        list.into_iter()
            .find(|p| {
                let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                let status = p.status.as_ref();
                let here = match on_node {
                    Some(name) if !name.is_empty() => name == node.name,
                    _ => host_ip.is_some() && status.and_then(|s| s.host_ip.as_deref()) == host_ip,
                };
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                here && ready
            })
            .and_then(|p| {
                Some(NodePartPod {
                    ip: p.status.as_ref()?.pod_ip.clone()?,
                    image: p.spec.as_ref()?.containers.first()?.image.clone()?,
                    uid: p.metadata.uid.clone(),
                })
            })
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "no ready node part (deploy/node, label app.kubernetes.io/name=ums-node in namespace {}) on node {}: it sends the checkpoints from the node",
                    self.node_part.namespace, node.name
                ))
            })
    }

    /// A request to the node part with this coordinator's token, answered with success (any
    /// other status is a 502 with the node part's message).
    async fn node_part_request(
        &self,
        NodePartPod { ip, uid, .. }: &NodePartPod,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response, ApiError> {
        let token = self.sidecar_token(
            ip,
            uid.as_deref(),
            ums_contract::credential::Scope::Coordinator,
            None,
            600,
        );
        let url = format!("http://{ip}:{}{path}", self.node_part.port);
        let mut request = self
            .sidecars
            .request(method, &url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(3600));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            ApiError::bad_gateway(format!(
                "the node part at {url}: {}",
                crate::peer::error_chain(&e)
            ))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        Err(ApiError::bad_gateway(format!(
            "the node part: {status}: {}",
            answer["error"].as_str().unwrap_or("no message")
        )))
    }

    /// A node part call and its JSON answer.
    async fn node_part_call(
        &self,
        part: &NodePartPod,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let response = self.node_part_request(part, method, path, body).await?;
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    /// Removes the archives (the checkpoints', the emptyDirs') from the node; what was done,
    /// for the answer.
    async fn remove_archives(
        &self,
        part: &NodePartPod,
        checkpoints: &[Checkpoint],
        volumes: Option<&str>,
    ) -> String {
        let mut failed = Vec::new();
        let archives = checkpoints
            .iter()
            .map(|c| c.archive.as_str())
            .chain(volumes);
        for archive in archives {
            let name = archive.rsplit('/').next().unwrap_or_default();
            if let Err(e) = self
                .node_part_call(
                    part,
                    reqwest::Method::DELETE,
                    &format!("/archives/{name}"),
                    None,
                )
                .await
            {
                failed.push(format!("{name}: {}", e.message));
            }
        }
        if failed.is_empty() {
            format!(
                "{} checkpoint archive(s){} removed from the node",
                checkpoints.len(),
                if volumes.is_some() {
                    " and the emptyDir archive"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "FAILED to remove checkpoint archives from the node: {}",
                failed.join("; ")
            )
        }
    }

    /// After the source was stopped and the move failed: the destination deletes any copy it
    /// made, then the pod is restored here from its archives. What was done, for the answer,
    /// and where the service runs.
    async fn restore_at_source(
        &self,
        target: &Target,
        id: &str,
        source: &Pod,
        part: &NodePartPod,
        checkpoints: &[Checkpoint],
        volumes: Option<&str>,
    ) -> (Vec<String>, &'static str) {
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let archives = checkpoints
            .iter()
            .map(|c| c.archive.as_str())
            .chain(volumes)
            .collect::<Vec<_>>()
            .join(", ");
        let kept = |why: String| {
            (
                vec![format!(
                    "{why}: the state is kept in the checkpoint archives on the source's node: {archives}"
                )],
                "nowhere",
            )
        };
        // Never two copies: the destination first says it holds none.
        let delete = crate::destination::PodRequest {
            migration_id: id.to_owned(),
            namespace: namespace.clone(),
            name: copy_at(target, source, id),
        };
        let mut done = Vec::new();
        // A destination coordinator that does not answer may be restarting (its Deployment
        // brings it back): asked again for two minutes; a refusal is its answer.
        let until = Instant::now() + Duration::from_secs(120);
        let deleted = loop {
            match self.target_delete(target, &delete).await {
                Err(e) if e.is_transient() && Instant::now() < until => {
                    tracing::warn!(migration = id, error = %e.message, "the destination does not say it holds no copy; asking again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                outcome => break outcome,
            }
        };
        match deleted {
            Ok(answer) => done.push(format!(
                "the destination holds no copy (deleted: {})",
                answer["deleted"]
            )),
            Err(e) => {
                return kept(format!(
                    "the destination could not say it holds no copy ({}), so the pod is not restored at the source",
                    e.message
                ))
            }
        }
        let Some(registry) = &self.checkpoint_registry else {
            return kept("this cluster has no checkpoint registry to restore from".into());
        };
        let mut images = BTreeMap::new();
        for c in checkpoints {
            let body = push_body(registry, id, c, "-source");
            match self
                .node_part_call(part, reqwest::Method::POST, "/push", Some(body))
                .await
            {
                Ok(answer) => match pushed_image(registry, &answer) {
                    Some(image) => {
                        images.insert(c.container.clone(), image);
                    }
                    None => {
                        return kept(format!("pushing {} named no digest: {answer}", c.container))
                    }
                },
                Err(e) => return kept(format!("pushing {} failed: {}", c.container, e.message)),
            }
        }
        if let Some(archive) = volumes {
            if let Err(e) = self.stage_from_node_part(part, id, archive).await {
                return kept(format!(
                    "taking the emptyDir archive from the node failed: {}",
                    e.message
                ));
            }
        }
        let restored = match restored_pod(source, &images, &part.image) {
            Ok(pod) => pod,
            Err(m) => return kept(m),
        };
        let create = CreateRequest {
            migration_id: id.to_owned(),
            namespace,
            pod: restored,
            source: None,
            interface: Some(INTERFACE.to_owned()),
        };
        match self.create_destination(create).await {
            Ok(created) => {
                done.push(format!(
                    "the pod was restored at the source from its checkpoints (pod IP {})",
                    created.pod_ip
                ));
                done.push(self.remove_archives(part, checkpoints, volumes).await);
                (done, "source")
            }
            Err(e) => {
                let (mut more, at) = kept(format!("restoring at the source failed: {}", e.message));
                done.append(&mut more);
                (done, at)
            }
        }
    }

    /// Stages a migration's emptyDir archive from the node part (`GET /archives/{name}`), for
    /// the pod restored here.
    async fn stage_from_node_part(
        &self,
        part: &NodePartPod,
        id: &str,
        archive: &str,
    ) -> Result<u64, ApiError> {
        let name = archive.rsplit('/').next().unwrap_or_default();
        let response = self
            .node_part_request(
                part,
                reqwest::Method::GET,
                &format!("/archives/{name}"),
                None,
            )
            .await?;
        let stream = futures_util::TryStreamExt::map_err(response.bytes_stream(), |e| {
            std::io::Error::other(e)
        });
        self.stage_volumes(id, stream).await
    }

    async fn write_journal(&self, journal: &CheckpointJournal) -> Result<(), ApiError> {
        let namespace = journal.pod.metadata.namespace.clone().unwrap_or_default();
        let config_map = to_config_map(journal).map_err(|e| {
            ApiError::internal(format!("the migration's journal could not be written: {e}"))
        })?;
        Api::<ConfigMap>::namespaced(self.kube.clone(), &namespace)
            .create(&PostParams::default(), &config_map)
            .await
            .map_err(|e| {
                ApiError::internal(format!(
                    "the migration's journal (configMap {namespace}/{}) could not be written: {e}",
                    journal_name(&journal.migration_id)
                ))
            })?;
        Ok(())
    }

    /// Replaces the journal's content (the archives, once the checkpoints are taken).
    async fn update_journal(&self, journal: &CheckpointJournal) -> Result<(), ApiError> {
        let namespace = journal.pod.metadata.namespace.clone().unwrap_or_default();
        let name = journal_name(&journal.migration_id);
        let config_map = to_config_map(journal).map_err(|e| {
            ApiError::internal(format!("the migration's journal could not be written: {e}"))
        })?;
        Api::<ConfigMap>::namespaced(self.kube.clone(), &namespace)
            .replace(&name, &PostParams::default(), &config_map)
            .await
            .map_err(|e| {
                ApiError::internal(format!(
                    "the migration's journal (configMap {namespace}/{name}) could not be updated: {e}"
                ))
            })?;
        Ok(())
    }

    async fn drop_journal(&self, namespace: &str, id: &str) {
        let config_maps: Api<ConfigMap> = Api::namespaced(self.kube.clone(), namespace);
        if let Err(e) = config_maps
            .delete(&journal_name(id), &DeleteParams::default())
            .await
        {
            tracing::warn!(migration = id, error = %e, "the migration's journal could not be deleted");
        }
    }

    /// The orchestrator-level migrations whose coordinator stopped after the checkpoint (their
    /// journals, which nobody here drives): a source pod that still runs keeps the service
    /// (its archives are removed); one that was stopped is restored at the source from its
    /// archives once the destination says it holds no copy. The number still pending.
    pub async fn finish_checkpoint_journals(&self) -> Result<usize, ApiError> {
        let config_maps: Api<ConfigMap> = Api::all(self.kube.clone());
        let mut pending = 0;
        for config_map in config_maps
            .list(&ListParams::default().labels(LABEL_JOURNAL))
            .await?
        {
            let Some(journal) = from_config_map(&config_map) else {
                tracing::warn!(configmap = ?config_map.metadata.name, "an unreadable orchestrator-level journal: left as it is");
                continue;
            };
            let id = journal.migration_id.as_str();
            if self.is_driving(Some(id)) {
                continue;
            }
            match self.finish_journal(&journal).await {
                Ok(done) => {
                    let namespace = journal.pod.metadata.namespace.clone().unwrap_or_default();
                    self.drop_journal(&namespace, id).await;
                    tracing::info!(
                        migration = id,
                        ?done,
                        "finished an orchestrator-level migration from its journal"
                    );
                }
                Err(why) => {
                    pending += 1;
                    tracing::warn!(migration = id, %why, "an orchestrator-level migration's journal cannot be finished yet; asking again in a minute");
                }
            }
        }
        Ok(pending)
    }

    /// What finishing one journal did, or why it cannot be finished now.
    async fn finish_journal(&self, journal: &CheckpointJournal) -> Result<Vec<String>, String> {
        let namespace = journal.pod.metadata.namespace.clone().unwrap_or_default();
        let name = journal.pod.metadata.name.clone().unwrap_or_default();
        let node = Api::<Node>::all(self.kube.clone())
            .get(&journal.node)
            .await
            .map_err(|e| format!("node {}: {e}", journal.node))?;
        let node = checkpoint_node(&node)?;
        let host_ip = journal.pod.status.as_ref().and_then(|s| s.host_ip.clone());
        let part = self
            .node_part(&node, host_ip.as_deref())
            .await
            .map_err(|e| e.message)?;
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
        let source = pods.get_opt(&name).await.map_err(|e| e.to_string())?;
        let still_runs = source.as_ref().is_some_and(|p| {
            p.metadata.uid == journal.pod.metadata.uid && p.metadata.deletion_timestamp.is_none()
        });
        let restored_here = source
            .as_ref()
            .is_some_and(|p| restored_for(p) == Some(journal.migration_id.as_str()));
        if journal.checkpoints.is_empty() {
            // Died while the kubelet checkpointed: the pod was never stopped. What the
            // checkpoints wrote since the journal is removed from the node.
            let containers: Vec<String> = journal
                .pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .collect();
            let body = json!({
                "pod": name,
                "namespace": namespace,
                "containers": containers,
                "migrationId": journal.migration_id,
                "sinceUnixMs": journal.started_unix_ms,
            });
            let removed = self
                .node_part_call(&part, reqwest::Method::POST, "/archives/remove", Some(body))
                .await
                .map_err(|e| e.message)?;
            let mut done = vec![
                "the coordinator stopped while checkpointing: the source pod was never stopped"
                    .into(),
                format!(
                    "{} archive(s) of the interrupted checkpoint removed from the node",
                    removed["removed"].as_array().map_or(0, Vec::len)
                ),
            ];
            if still_runs {
                done.push(self.unlock_source(&pods, &name).await);
            }
            return Ok(done);
        }
        if still_runs || restored_here {
            // Stopped before the stop (the service never left), or already restored here.
            let mut done = vec![
                if still_runs {
                    "the source pod still runs".into()
                } else {
                    "the pod was restored at the source already".into()
                },
                self.remove_archives(&part, &journal.checkpoints, journal.volumes.as_deref())
                    .await,
            ];
            if still_runs {
                done.push(self.unlock_source(&pods, &name).await);
            }
            return Ok(done);
        }
        let target = Target::of(self.peers.clone(), &journal.destination);
        let (done, at) = self
            .restore_at_source(
                &target,
                &journal.migration_id,
                &journal.pod,
                &part,
                &journal.checkpoints,
                journal.volumes.as_deref(),
            )
            .await;
        if at == "source" {
            Ok(done)
        } else {
            Err(done.join("; "))
        }
    }

    pub(crate) async fn migrate_orchestrator(
        &self,
        request: &Validated,
        id: &str,
        started: Instant,
        pod: Pod,
    ) -> Result<MigrateReport, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        let name = format!("{}/{}", request.namespace, request.name);
        let kubelets = self.kubelets.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "this coordinator does not drive orchestrator-level migrations: it has no kubelet credentials (--kubelet-ca or --kubelet-insecure-tls)",
            )
            .in_phase("checking")
        })?;
        if let Some(reason) = not_ready(&pod) {
            return Err(
                ApiError::conflict(format!("pod {name} cannot be checkpointed: {reason}"))
                    .in_phase("checking"),
            );
        }
        if pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANNOTATION_ID))
        {
            return Err(
                ApiError::conflict(format!("pod {name} is being migrated already"))
                    .in_phase("checking"),
            );
        }
        let nodes: Vec<Node> = Api::<Node>::all(self.kube.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::from(e).in_phase("checking"))?
            .items;
        let source_node = node_of(&pod, &nodes).ok_or_else(|| {
            ApiError::conflict(format!("pod {name} runs on no node this cluster lists"))
                .in_phase("checking")
        })?;
        let node = checkpoint_node(source_node).map_err(|reason| {
            ApiError::conflict(format!("pod {name} cannot be checkpointed: {reason}"))
                .in_phase("checking")
        })?;
        let host_ip = pod.status.as_ref().and_then(|s| s.host_ip.clone());
        let part = self
            .node_part(&node, host_ip.as_deref())
            .await
            .map_err(|e| e.in_phase("checking"))?;
        let empty_dirs = crate::empty_dirs::empty_dirs(&pod);
        if !empty_dirs.is_empty() {
            let health = self
                .node_part_call(&part, reqwest::Method::GET, "/healthz", None)
                .await
                .map_err(|e| e.in_phase("checking"))?;
            if health["emptyDirs"] != Value::Bool(true) {
                return Err(ApiError::conflict(format!(
                    "pod {name} has emptyDir volumes ({}) and the node part on node {} cannot read them: it does not mount the kubelet's pod directories (deploy/node, volume pods)",
                    empty_dirs.join(", "),
                    node.name
                ))
                .in_phase("checking"));
            }
        }
        let target = Target::of(self.peers.clone(), &request.destination);
        let identity = self
            .target_identity(&target)
            .await
            .map_err(|e| e.in_phase("checking"))?;
        // The pod to restore, where it goes: in this cluster under its own name on a node
        // other than the source's; in another, on the node asked for if any (the destination
        // places it else).
        let place = self
            .copy_place(&target, &pod, Some(&node.name), request.node.as_deref(), id)
            .await
            .map_err(|e| e.in_phase("checking"))?;
        // The destination's preflight (restore_preflight), before anything is checkpointed:
        // what would make the restore fail there (the namespace and name, a node that restores
        // onto this kernel, the base images, its checkpoint registry) is refused now. In this
        // cluster it runs here; its upload credential goes unused (the node part pushes the
        // checkpoints into this cluster's registry itself).
        let source_kernel = Some(kernel_of(source_node)).filter(|k| !k.is_empty());
        let mut to_restore = place.apply(pod_to_restore(&pod, &part.image));
        to_restore.metadata.namespace = Some(request.namespace.clone());
        let upload_request = UploadRequest {
            migration_id: id.to_owned(),
            pod: Some(to_restore),
            source_kernel,
        };
        let upload: UploadAnswer = match &target {
            Target::Peer(peer) => {
                peer.post(
                    "/checkpoint-uploads",
                    &upload_request,
                    Duration::from_secs(60),
                )
                .await
            }
            Target::ThisCluster => self.upload_credential(&upload_request).await,
        }
        .map_err(|e| e.in_phase("checking"))?;
        // In this cluster the checkpoints go into its registry (the preflight required one).
        let push_to = matches!(target, Target::ThisCluster)
            .then(|| self.checkpoint_registry())
            .transpose()
            .map_err(|e| e.in_phase("checking"))?;
        let containers: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
            .collect();

        self.enter(id, "locking");
        self.lock_source(&pods, request, pod.metadata.resource_version.as_deref(), id)
            .await?;
        let unlock = || self.unlock_source(&pods, &request.name);

        // The journal first: a coordinator that dies while the kubelet checkpoints finds it
        // and removes what the checkpoints left on the node (the pod still runs then).
        let mut journal = CheckpointJournal {
            migration_id: id.to_owned(),
            destination: request.destination.clone(),
            node: node.name.clone(),
            checkpoints: Vec::new(),
            volumes: None,
            started_unix_ms: unix_ms(),
            pod: {
                let mut source = pod.clone();
                source.metadata.namespace = Some(request.namespace.clone());
                source
            },
        };
        if let Err(e) = self.write_journal(&journal).await {
            let mut e = e.in_phase("checkpointing");
            e.rollback.push(unlock().await);
            e.service_runs_at = Some("source");
            return Err(e);
        }

        // Every container at once: their states are taken as close together as the kubelet
        // allows (the skew is reported).
        self.enter(id, "checkpointing");
        let results = futures_util::future::join_all(
            containers
                .iter()
                .map(|c| kubelets.checkpoint(&node, &request.namespace, &request.name, c)),
        )
        .await;
        let checkpoints: Vec<Checkpoint> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            let mut e = e.in_phase("checkpointing");
            e.rollback
                .push(self.remove_archives(&part, &checkpoints, None).await);
            e.rollback.push(unlock().await);
            e.rollback.push(
                "a kubelet checkpoint leaves the container running: the service runs at the source"
                    .into(),
            );
            self.drop_journal(&request.namespace, id).await;
            e.service_runs_at = Some("source");
            return Err(e);
        }

        // The emptyDirs, archived on the node right after the dumps (the service still runs:
        // their time counts in the divergence window).
        let mut volumes: Option<Value> = None;
        if !empty_dirs.is_empty() {
            let body = json!({
                "podUid": pod.metadata.uid.clone().unwrap_or_default(),
                "pod": request.name,
                "namespace": request.namespace,
                "migrationId": id,
                "volumes": empty_dirs,
            });
            match self
                .node_part_call(&part, reqwest::Method::POST, "/volumes", Some(body))
                .await
            {
                Ok(answer) => volumes = Some(answer),
                Err(e) => {
                    let mut e = e.in_phase("checkpointing");
                    e.message = format!("archiving the pod's emptyDir volumes: {}", e.message);
                    e.rollback
                        .push(self.remove_archives(&part, &checkpoints, None).await);
                    e.rollback.push(unlock().await);
                    self.drop_journal(&request.namespace, id).await;
                    e.service_runs_at = Some("source");
                    return Err(e);
                }
            }
        }
        let volumes_archive: Option<String> = volumes
            .as_ref()
            .and_then(|v| v["archive"].as_str())
            .map(str::to_owned);
        let volumes_archive = volumes_archive.as_deref();

        // Past the stop the archives are the service: what restores it is written down first.
        journal.checkpoints = checkpoints.clone();
        journal.volumes = volumes_archive.map(str::to_owned);
        if let Err(e) = self.update_journal(&journal).await {
            let mut e = e.in_phase("checkpointing");
            e.rollback.push(
                self.remove_archives(&part, &checkpoints, volumes_archive)
                    .await,
            );
            e.rollback.push(unlock().await);
            self.drop_journal(&request.namespace, id).await;
            e.service_runs_at = Some("source");
            return Err(e);
        }

        // The source runs on after its dump until it is stopped: stop it now.
        self.enter(id, "stopping");
        let delete = pods
            .delete(
                &request.name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await;
        let stopped = unix_ms();
        let first_dump_end = checkpoints
            .iter()
            .map(|c| c.answered_unix_ms)
            .min()
            .unwrap_or(stopped);
        if let Err(e) = delete {
            let mut e = ApiError::from(e).in_phase("stopping");
            e.rollback.push(
                self.remove_archives(&part, &checkpoints, volumes_archive)
                    .await,
            );
            e.rollback.push(unlock().await);
            self.drop_journal(&request.namespace, id).await;
            e.service_runs_at = Some("source");
            return Err(e);
        }
        let restore = |mut e: ApiError| {
            let target = &target;
            let pod = &pod;
            let part = &part;
            let checkpoints = &checkpoints;
            async move {
                let (done, at) = self
                    .restore_at_source(target, id, pod, part, checkpoints, volumes_archive)
                    .await;
                e.rollback.extend(done);
                if at == "source" {
                    self.drop_journal(&request.namespace, id).await;
                } else {
                    e.rollback.push(format!(
                        "the migration's journal (configMap {}/{}) is kept: the coordinator tries the restore at the source again every minute",
                        request.namespace,
                        journal_name(id)
                    ));
                }
                e.service_runs_at = Some(at);
                e
            }
        };

        // Each archive goes from the node straight to the destination (another cluster's
        // coordinator, which stores it as an image), or, in this cluster, straight into this
        // cluster's checkpoint registry.
        self.enter(id, "transferring");
        let ca_pem = self.node_part.peer_ca_pem.clone();
        let sends = futures_util::future::join_all(checkpoints.iter().map(|c| {
            let (path, body) = match push_to {
                Some(registry) => ("/push", push_body(registry, id, c, "")),
                None => (
                    "/send",
                    json!({
                        "archive": c.archive,
                        "url": format!("{}/checkpoints/{id}/{}", request.destination, c.container),
                        "token": upload.upload_token,
                        "caPem": ca_pem,
                    }),
                ),
            };
            self.node_part_call(&part, reqwest::Method::POST, path, Some(body))
        }));
        let send_volumes = async {
            let archive = volumes_archive?;
            if matches!(target, Target::ThisCluster) {
                // The copy's init container unpacks them from this coordinator's stage.
                let started = Instant::now();
                return Some(self.stage_from_node_part(&part, id, archive).await.map(
                    |bytes| json!({"bytes": bytes, "sendMs": started.elapsed().as_millis() as u64}),
                ));
            }
            let body = json!({
                "archive": archive,
                "url": format!("{}/checkpoint-volumes/{id}", request.destination),
                "token": upload.upload_token,
                "caPem": ca_pem,
            });
            Some(
                self.node_part_call(&part, reqwest::Method::POST, "/send", Some(body))
                    .await,
            )
        };
        let (sends, volumes_sent) = futures_util::join!(sends, send_volumes);
        let volumes_sent = match volumes_sent.transpose() {
            Ok(sent) => sent,
            Err(e) => return Err(restore(e.in_phase("transferring")).await),
        };
        let mut images = BTreeMap::new();
        let mut transfers = Vec::new();
        for (c, sent) in checkpoints.iter().zip(sends) {
            match (sent, push_to) {
                (Ok(answer), Some(registry)) => {
                    let Some(image) = pushed_image(registry, &answer) else {
                        let e = ApiError::bad_gateway(format!(
                            "the node part's answer for {} names no digest: {answer}",
                            c.container
                        ))
                        .in_phase("transferring");
                        return Err(restore(e).await);
                    };
                    images.insert(c.container.clone(), image.clone());
                    transfers.push(json!({"container": c.container, "bytes": answer["archiveBytes"], "sendMs": answer["pushMs"], "image": image}));
                }
                (Ok(answer), None) => {
                    let uploaded: Option<UploadedImage> =
                        serde_json::from_value(answer["destination"].clone()).ok();
                    let Some(uploaded) = uploaded else {
                        let e = ApiError::bad_gateway(format!(
                            "the destination's answer for {} names no image: {answer}",
                            c.container
                        ))
                        .in_phase("transferring");
                        return Err(restore(e).await);
                    };
                    images.insert(c.container.clone(), uploaded.image.clone());
                    transfers.push(json!({"container": c.container, "bytes": answer["bytes"], "sendMs": answer["sendMs"], "image": uploaded.image}));
                }
                (Err(e), _) => return Err(restore(e.in_phase("transferring")).await),
            }
        }

        self.enter(id, "creating");
        let restored = match restored_pod(&pod, &images, &part.image) {
            Ok(restored) => place.apply(restored),
            Err(m) => return Err(restore(ApiError::internal(m).in_phase("creating")).await),
        };
        let create = CreateRequest {
            migration_id: id.to_owned(),
            namespace: request.namespace.clone(),
            pod: restored,
            source: None,
            interface: Some(INTERFACE.to_owned()),
        };
        let created: CreateAnswer = match self
            .target_create(
                &target,
                &create,
                self.pod_ready_timeout + Duration::from_secs(30),
            )
            .await
        {
            Ok(created) => created,
            Err(e) => return Err(restore(e.in_phase("creating")).await),
        };

        self.enter(id, "finishing");
        let cleanup = self
            .remove_archives(&part, &checkpoints, volumes_archive)
            .await;
        self.drop_journal(&request.namespace, id).await;
        self.enter(id, "done");
        let phases = self.record(id).map(|r| r.phases).unwrap_or_default();
        let volume_bytes = volumes_sent
            .as_ref()
            .and_then(|v| v["bytes"].as_u64())
            .unwrap_or(0);
        let bytes: u64 = transfers
            .iter()
            .filter_map(|t| t["bytes"].as_u64())
            .sum::<u64>()
            + volume_bytes;
        tracing::info!(migration = id, pod = %name, destination = %request.destination_text(), copy = %created.name, "orchestrator-level migration done");
        self.announce(
            id,
            crate::events::Kind::Normal,
            "Migrated",
            &format!(
                "migration {id}: the service runs in pod {}/{} ({}{}), restored from checkpoints, {} bytes moved",
                created.namespace,
                created.name,
                match &target {
                    Target::ThisCluster => "this cluster".to_owned(),
                    Target::Peer(_) => format!("cluster {}", identity.cluster),
                },
                place.node.as_deref().map(|n| format!(", node {n}")).unwrap_or_default(),
                bytes,
            ),
        );
        Ok(MigrateReport {
            message: "migration complete!",
            migration_id_ums: id.to_owned(),
            migration_interface: INTERFACE.to_owned(),
            migration_id: id.to_owned(),
            pod: name,
            destination: DestinationPod {
                url: request.destination.clone(),
                cluster: identity.cluster,
                pod: format!("{}/{}", created.namespace, created.name),
                pod_ip: created.pod_ip,
                node: place.node.clone(),
            },
            source_kept: false,
            phases,
            total_ms: started.elapsed().as_millis() as u64,
            sidecar: json!({
                "node": node.name,
                "runtime": node.runtime,
                "destinationPreflight": upload.checks,
                "checkpoints": checkpoints,
                "checkpointSkewMs": skew_ms(&checkpoints),
                // From the end of the first dump until the source pod's deletion was accepted
                // (the kubelet stops its containers right after).
                "divergenceMs": stopped.saturating_sub(first_dump_end),
                "transfers": transfers,
                // The emptyDirs: archived on the node, sent beside the checkpoints, unpacked
                // by the restored pod's init container.
                "emptyDirs": volumes.map(|v| json!({
                    "volumes": empty_dirs,
                    "archiveBytes": v["bytes"],
                    "archiveMs": v["archiveMs"],
                    "sendMs": volumes_sent.as_ref().map(|s| s["sendMs"].clone()),
                    "restored": created.volumes.clone(),
                })),
                "totals": {"contentBytes": bytes},
                "cleanup": cleanup,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{original_name, CopyPlace};

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap_or_default()
    }

    #[test]
    fn unannotated_pods_go_the_orchestrator_level_way() {
        let plain = pod(json!({"metadata": {"name": "p"}}));
        let wrapped =
            pod(json!({"metadata": {"name": "p", "annotations": {"migration-interface": "dind"}}}));
        assert!(is_orchestrator_level(&plain, None));
        assert!(!is_orchestrator_level(&wrapped, None));
        assert!(is_orchestrator_level(&wrapped, Some("ssu")));
        assert!(!is_orchestrator_level(&plain, Some("dind")));
    }

    #[test]
    fn the_restored_pod_runs_the_checkpoint_images_off_the_source_node() {
        let source = pod(json!({
            "metadata": {"name": "p", "labels": {"app": "a"}, "uid": "u1", "resourceVersion": "7",
                "annotations": {"migration-id": "m1", "migration.ums-rs.io/locked-by-coordinator": "edge", "team": "x"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "img:1", "env": [{"name": "K", "value": "V"}]},
                                                        {"name": "b", "image": "img:2"}]},
            "status": {"phase": "Running"}
        }));
        let images = BTreeMap::from([
            ("a".to_owned(), "r/c@sha256:1".to_owned()),
            ("b".to_owned(), "r/c@sha256:2".to_owned()),
        ]);
        let restored = restored_pod(&source, &images, "ums-rs/node:1").unwrap_or_default();
        let spec = restored.spec.clone().unwrap_or_default();
        assert_eq!(spec.containers[0].image.as_deref(), Some("r/c@sha256:1"));
        assert_eq!(spec.containers[1].image.as_deref(), Some("r/c@sha256:2"));
        assert_eq!(spec.containers[0].env.as_ref().map(Vec::len), Some(1));
        assert_eq!(spec.node_name, None);
        assert!(restored.status.is_none());
        assert_eq!(restored.metadata.uid, None);
        assert_eq!(restored.metadata.resource_version, None);
        let annotations = restored.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get("team").map(String::as_str), Some("x"));
        assert!(!annotations.contains_key("migration-id"));
        assert!(!annotations.contains_key("migration.ums-rs.io/locked-by-coordinator"));
        assert!(restored_pod(&source, &BTreeMap::new(), "ums-rs/node:1").is_err());
    }

    #[test]
    fn a_copy_in_this_cluster_has_its_own_name_its_node_and_the_first_name() {
        let source = pod(json!({
            "metadata": {"name": "svc-1a2b3c4d", "labels": {"app": "svc"},
                "annotations": {"migration.ums-rs.io/original-name": "svc"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "img:1"}]},
        }));
        let id = "18a0000000000000fedcba98";
        let copy = copy_at(&Target::ThisCluster, &source, id);
        assert_eq!(copy, "svc-fedcba98", "named after the first pod");
        let restored = restored_pod(
            &source,
            &BTreeMap::from([("a".to_owned(), "r@sha256:1".to_owned())]),
            "ums-rs/node:1",
        )
        .unwrap_or_default();
        let placed = CopyPlace {
            name: copy.clone(),
            node: Some("n2".into()),
            original: Some("svc".into()),
        }
        .apply(restored);
        assert_eq!(placed.metadata.name.as_deref(), Some("svc-fedcba98"));
        assert_eq!(
            placed.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("n2")
        );
        assert_eq!(
            placed
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(String::as_str),
            Some("svc"),
            "what a Service selects"
        );
        assert_eq!(
            original_name("svc-fedcba98", placed.metadata.annotations.as_ref()),
            "svc"
        );
        assert_eq!(
            copy_name_at(false, &source, id),
            "svc-1a2b3c4d",
            "another cluster keeps the name"
        );
    }

    #[test]
    fn only_running_pods_without_init_containers_qualify() {
        let running = |state: Value| {
            pod(json!({
                "spec": {"containers": [{"name": "a"}]},
                "status": {"phase": "Running", "containerStatuses": [{"name": "a", "image": "", "imageID": "", "ready": true, "restartCount": 0, "state": state}]}
            }))
        };
        assert_eq!(not_ready(&running(json!({"running": {}}))), None);
        assert!(not_ready(&running(json!({"waiting": {}})))
            .unwrap_or_default()
            .contains("container a"));
        assert!(not_ready(&pod(json!({"status": {"phase": "Pending"}})))
            .unwrap_or_default()
            .contains("Pending"));
    }
}
