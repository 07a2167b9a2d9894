//! What a coordinator finds when it starts again: the migrations that were under way when it
//! stopped, on either side.
//!
//! - As a destination: the passive copies it created whose containers never started are
//!   deleted (the source's coordinator lost its peer and rolled back); a copy whose restored
//!   containers run holds the service and is left for the source's `/restore`. The same sweep
//!   runs every five minutes for copies older than their peer token.
//! - As a source: the pods it locked are unlocked once their sidecar says the service runs
//!   there (no migration under way, nothing migrated away); a pod whose state has left
//!   (`migrated`) is finished from its journal ([`crate::journal`]): the copy is made active
//!   and the source deleted (or kept). The same pass runs every minute, for migrations whose
//!   activation failed while the coordinator ran (the destination unreachable for longer than
//!   the two minutes `/migrate` retries).
//! - Orchestrator-level migrations stopped after their checkpoint are finished from their
//!   journals ([`crate::checkpoint_journal`]), at start and every minute.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use ums_contract::{MigrationAnnotations, StartMode};

use crate::destination::PodRequest;
use crate::error::ApiError;
use crate::journal::{unlock_patch, SourceJournal};
use crate::outcome::{
    copy_action, source_outcome, CopyAction, Outcome, PodFacts, SourceFacts, SourceRef, SourceState,
};
use crate::peer::Peer;
use crate::state::Coordinator;
use crate::target::{Target, THIS_CLUSTER};

pub use crate::journal::{ANNOTATION_COPY_OF, ANNOTATION_LOCKED_BY};

/// How often, and how long, a source pod whose sidecar is still migrating is asked again.
const RETRY_EVERY: Duration = Duration::from_secs(10);
const RETRY_FOR: Duration = Duration::from_secs(600);

fn annotations_of(pod: &Pod) -> MigrationAnnotations {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| MigrationAnnotations::parse(a).ok())
        .unwrap_or_default()
}

fn marked(pod: &Pod, key: &str, cluster: &str) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .is_some_and(|v| v == cluster)
}

fn name_of(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

/// A passive copy this coordinator created, and its migration.
struct PassiveCopy {
    pod: Pod,
    id: String,
    namespace: String,
    name: String,
}

impl Coordinator {
    /// Runs both recoveries, logging what they did; the source side retries a while.
    pub async fn recover(&self) {
        self.sweep_logged(None).await;
        self.settle_logged().await;
        self.journals_logged().await;
        let until = tokio::time::Instant::now() + RETRY_FOR;
        loop {
            match self.release_orphaned_locks().await {
                Ok(0) => break,
                Ok(pending) if tokio::time::Instant::now() < until => {
                    tracing::info!(pending, "source pods still migrating; asking again");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
                Ok(pending) => {
                    tracing::warn!(pending, "source pods still locked after 10 minutes");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for pods locked before the restart");
                    break;
                }
            }
        }
    }

    /// Every five minutes: copies older than a peer token (their source can no longer send
    /// them anything) that never started, e.g. one whose `/create` answer found its caller gone.
    pub async fn sweep_periodically(&self) {
        let mut ticker = tokio::time::interval(Duration::from_secs(300));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let max_life = Duration::from_secs(crate::destination::PEER_TOKEN_SECONDS + 60);
            self.sweep_logged(Some(max_life)).await;
        }
    }

    async fn sweep_logged(&self, min_age: Option<Duration>) {
        match self.sweep_abandoned_copies(min_age).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(?deleted, "abandoned copies deleted")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not look for abandoned copies"),
        }
    }

    /// The copies this coordinator created that are still passive under their migration.
    async fn passive_copies(&self) -> Result<Vec<PassiveCopy>, ApiError> {
        let pods: Api<Pod> = Api::all(self.kube.clone());
        Ok(pods
            .list(&Default::default())
            .await?
            .into_iter()
            .filter_map(|pod| {
                let parsed = annotations_of(&pod);
                if !marked(&pod, ANNOTATION_COPY_OF, &self.cluster)
                    || parsed.start_mode != Some(StartMode::Passive)
                {
                    return None;
                }
                let id = parsed.migration_id?;
                let (namespace, name) = name_of(&pod)?;
                Some(PassiveCopy {
                    pod,
                    id,
                    namespace,
                    name,
                })
            })
            .collect())
    }

    /// Deletes the passive copies this coordinator created that hold no restored state (those
    /// at least `min_age` old, when given).
    pub async fn sweep_abandoned_copies(
        &self,
        min_age: Option<Duration>,
    ) -> Result<Vec<String>, ApiError> {
        let mut deleted = Vec::new();
        for PassiveCopy {
            pod,
            id,
            namespace,
            name,
        } in self.passive_copies().await?
        {
            let age = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| {
                    let created = t.0.as_second().max(0) as u64;
                    ums_contract::credential::now_unix().saturating_sub(created)
                })
                .unwrap_or(0);
            if min_age.is_some_and(|min| age < min.as_secs()) {
                continue;
            }
            if self.any_started(&pod).await {
                tracing::warn!(pod = %name, namespace = %namespace, "a passive copy from before the restart runs restored containers: left to be settled with its source");
                continue;
            }
            let api: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
            api.delete(&name, &DeleteParams::default()).await?;
            tracing::info!(pod = %name, namespace = %namespace, migration = %id, "deleted a passive copy abandoned by a restart");
            deleted.push(format!("{namespace}/{name}"));
        }
        Ok(deleted)
    }

    /// Unlocks the pods this coordinator locked whose service runs at the source; the number
    /// still migrating (to ask again).
    pub async fn release_orphaned_locks(&self) -> Result<usize, ApiError> {
        let pods: Api<Pod> = Api::all(self.kube.clone());
        let mut pending = 0;
        for pod in pods.list(&Default::default()).await? {
            let parsed = annotations_of(&pod);
            let Some(id) = parsed.migration_id.clone() else {
                continue;
            };
            if !marked(&pod, ANNOTATION_LOCKED_BY, &self.cluster) || self.is_driving(Some(&id)) {
                continue;
            }
            let Some((namespace, name)) = name_of(&pod) else {
                continue;
            };
            if crate::orchestrator::is_orchestrator_level(&pod, None) {
                // An unwrapped pod has no sidecar to ask: with a journal, the journal's recovery
                // finishes it (crate::orchestrator); without, nothing was checkpointed (the
                // journal comes before the checkpoints) and it runs here.
                let journals: Api<k8s_openapi::api::core::v1::ConfigMap> =
                    Api::namespaced(self.kube.clone(), &namespace);
                if journals
                    .get_metadata_opt(&crate::checkpoint_journal::journal_name(&id))
                    .await?
                    .is_none()
                {
                    self.unlock_as_seen(&pod, &namespace, &name).await?;
                    tracing::info!(pod = %name, namespace = %namespace, migration = %id, "unlocked an unwrapped pod whose migration stopped with the coordinator before its checkpoints: the service runs here");
                }
                continue;
            }
            match self.source_state(&pod).await {
                SourceState::Here => {
                    self.unlock_as_seen(&pod, &namespace, &name).await?;
                    tracing::info!(pod = %name, namespace = %namespace, migration = %id, "unlocked a pod whose migration stopped with the coordinator: the service runs here");
                }
                SourceState::Migrating | SourceState::Unknown => pending += 1,
                SourceState::Left => match SourceJournal::read(&pod) {
                    Some(journal) => {
                        match self.finish_from_journal(&namespace, &name, &journal).await {
                            Ok(()) => {
                                tracing::info!(pod = %name, namespace = %namespace, migration = %id, copy = %format!("{}/{}", journal.copy_namespace, journal.copy_name), destination = %journal.destination, "finished a migration whose state had left, from its journal: the copy is active, the source released")
                            }
                            Err(e) => {
                                pending += 1;
                                tracing::warn!(pod = %name, namespace = %namespace, migration = %id, error = %e.message, "the state of this pod left and its copy could not be made active yet; asking again");
                            }
                        }
                    }
                    None => {
                        tracing::warn!(pod = %name, namespace = %namespace, migration = %id, "the state of this locked pod left, and it carries no journal: the service runs in the destination's copy; make that copy active there and delete this pod")
                    }
                },
            }
        }
        Ok(pending)
    }

    /// Unlocks a pod, if it is still the version that was looked at.
    async fn unlock_as_seen(&self, pod: &Pod, namespace: &str, name: &str) -> Result<(), ApiError> {
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), namespace);
        let mut patch = unlock_patch();
        patch["metadata"]["resourceVersion"] = json!(pod.metadata.resource_version);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Makes the copy active (the destination answers a repeat too) and deletes or keeps the
    /// source, as the migration would have.
    pub async fn finish_from_journal(
        &self,
        namespace: &str,
        name: &str,
        journal: &SourceJournal,
    ) -> Result<(), ApiError> {
        let target = Target::of(self.peers.clone(), &journal.destination);
        let request = PodRequest {
            migration_id: journal.migration_id.clone(),
            namespace: journal.copy_namespace.clone(),
            name: journal.copy_name.clone(),
        };
        self.activate_copy(&target, &request, &journal.credential)
            .await?;
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), namespace);
        self.release_source(&pods, name, journal.keep).await
    }

    /// Every minute: the source pods this coordinator locked and no longer drives (unlocked
    /// when their service runs here, finished from the journal when it left), and the copies
    /// it made whose restored state runs while they are passive (settled with their source).
    pub async fn finish_periodically(&self) {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(e) = self.release_orphaned_locks().await {
                tracing::warn!(error = %e, "could not look for pods left locked");
            }
            self.settle_logged().await;
            self.journals_logged().await;
        }
    }

    async fn journals_logged(&self) {
        if let Err(e) = self.finish_checkpoint_journals().await {
            tracing::warn!(error = %e, "could not look for orchestrator-level journals");
        }
    }

    async fn settle_logged(&self) {
        if let Err(e) = self.settle_restored_copies().await {
            tracing::warn!(error = %e, "could not look for passive copies that run restored containers");
        }
    }

    /// What became of migration `request` (its source pod, in this cluster), as the
    /// destination asks: see [`crate::outcome`]. The detail says what the answer rests on.
    pub async fn outcome_of(
        &self,
        request: &crate::destination::PodRequest,
    ) -> Result<(Outcome, String), ApiError> {
        let id = request.migration_id.as_str();
        let record = self.record(id).filter(|r| r.phase == "done").map(|_| true);
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &request.namespace);
        let pod = match pods.get_opt(&request.name).await? {
            Some(pod) => {
                let parsed = annotations_of(&pod);
                Some(PodFacts {
                    under_this_migration: parsed.migration_id.as_deref() == Some(id),
                    start_mode: parsed.start_mode,
                    state: self.source_state(&pod).await,
                })
            }
            None => None,
        };
        let facts = SourceFacts {
            driving: self.is_driving(Some(id)),
            record,
            pod,
        };
        let outcome = source_outcome(&facts);
        let detail = format!(
            "pod {}/{}: {}; {}",
            request.namespace,
            request.name,
            match &facts.pod {
                None => "not found".to_owned(),
                Some(p) => format!(
                    "{} this migration, its sidecar says {:?}",
                    if p.under_this_migration {
                        "locked under"
                    } else {
                        "not under"
                    },
                    p.state
                ),
            },
            if facts.driving {
                "the migration is under way here"
            } else if facts.record.is_some() {
                "recorded here as done"
            } else {
                "no migration under way here"
            }
        );
        tracing::info!(migration = id, ?outcome, %detail, "a destination asked what became of a migration");
        Ok((outcome, detail))
    }

    /// The copies this coordinator made that are still passive while their restored
    /// containers run: each one's source is asked what became of its migration, and the copy
    /// is made active (the state left the source) or deleted (the service runs at the source);
    /// the number settled.
    pub async fn settle_restored_copies(&self) -> Result<usize, ApiError> {
        let mut settled = 0;
        for PassiveCopy {
            pod,
            id,
            namespace,
            name,
        } in self.passive_copies().await?
        {
            if !self.any_started(&pod).await {
                continue;
            }
            let Some(source) = pod.metadata.annotations.as_ref().and_then(SourceRef::read) else {
                tracing::warn!(pod = %name, namespace = %namespace, migration = %id, "a passive copy runs restored containers and does not name its source (its coordinator has no --advertise-url): left for the source's coordinator or an operator");
                continue;
            };
            let request = PodRequest {
                migration_id: id.clone(),
                namespace: source.namespace.clone(),
                name: source.name.clone(),
            };
            // A copy in the source's own cluster (a node-to-node move) asks this coordinator.
            let asked = if source.url == THIS_CLUSTER {
                self.outcome_of(&request).await.map(
                    |(outcome, detail)| serde_json::json!({"outcome": outcome, "detail": detail}),
                )
            } else {
                Peer::source(self.peers.clone(), source.url.clone())
                    .post("/outcome", &request, Duration::from_secs(30))
                    .await
            };
            let answer: serde_json::Value = match asked {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!(pod = %name, namespace = %namespace, migration = %id, error = %e.message, "a passive copy runs restored containers and its source did not say what became of the migration; asking again");
                    continue;
                }
            };
            let outcome = serde_json::from_value::<Outcome>(answer["outcome"].clone())
                .unwrap_or(Outcome::Unknown);
            let detail = answer["detail"].as_str().unwrap_or_default();
            let copy = PodRequest {
                migration_id: id.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
            };
            match copy_action(outcome) {
                CopyAction::Activate => {
                    self.activate_destination(copy).await?;
                    settled += 1;
                    tracing::info!(pod = %name, namespace = %namespace, migration = %id, source = %source.url, %detail, "the source says the state left: the passive copy that runs it is active");
                }
                CopyAction::Delete => {
                    self.delete_destination(copy).await?;
                    settled += 1;
                    tracing::warn!(pod = %name, namespace = %namespace, migration = %id, source = %source.url, %detail, "the source says the service runs there: deleted a passive copy that ran a stale duplicate");
                }
                CopyAction::Wait => {
                    tracing::info!(pod = %name, namespace = %namespace, migration = %id, ?outcome, %detail, "a passive copy runs restored containers; its source cannot settle it yet")
                }
            }
        }
        Ok(settled)
    }

    /// The states of the pod's nested containers, from its sidecar's probes.
    async fn probe_states(&self, pod: &Pod) -> Option<Vec<(u16, String)>> {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone())?;
        let mut states = Vec::new();
        for c in annotations_of(pod).containers.unwrap_or_default() {
            states.push(self.probe(&ip, &c.name).await?);
        }
        Some(states)
    }

    async fn source_state(&self, pod: &Pod) -> SourceState {
        let Some(states) = self.probe_states(pod).await else {
            return SourceState::Unknown;
        };
        if states.iter().any(|(_, s)| s == "migrating") {
            SourceState::Migrating
        } else if states.iter().any(|(_, s)| s == "migrated") {
            SourceState::Left
        } else {
            SourceState::Here
        }
    }

    /// Where the service of a source pod runs, from its sidecar's probes: `source` (every
    /// container running there), `destination` (its state left), `nowhere` (the sidecar
    /// answers and a container does not run), `unknown` (no answer, or still migrating).
    pub async fn service_runs_at(&self, pod: &Pod) -> (&'static str, String) {
        let Some(states) = self.probe_states(pod).await else {
            return (
                "unknown",
                "the source pod's sidecar did not answer".to_owned(),
            );
        };
        let seen = states
            .iter()
            .map(|(status, state)| format!("{state} ({status})"))
            .collect::<Vec<_>>()
            .join(", ");
        let at = if states.iter().any(|(_, s)| s == "migrated") {
            "destination"
        } else if states.iter().any(|(_, s)| s == "migrating") {
            "unknown"
        } else if !states.is_empty()
            && states
                .iter()
                .all(|(status, s)| *status == 200 && s == "running")
        {
            "source"
        } else {
            "nowhere"
        };
        (at, format!("the source's containers: {seen}"))
    }

    /// Whether any nested container of the pod has been started (204 is "created, not
    /// started"; 404 "not there").
    async fn any_started(&self, pod: &Pod) -> bool {
        self.probe_states(pod).await.is_some_and(|states| {
            states
                .iter()
                .any(|(status, _)| *status != 204 && *status != 404)
        })
    }
}
