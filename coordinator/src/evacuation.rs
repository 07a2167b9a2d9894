//! `kubectl drain` for pods that opt in (`migration-eviction-strategy: live-migrate`, in UMS's
//! annotation style; KubeVirt's `evictionStrategy: LiveMigrate` for VMs): the coordinator
//! serves a validating admission webhook for CREATE `pods/eviction`
//! (deploy/coordinator/eviction-webhook.yaml). An eviction of such a pod starts its migration
//! to another node of this cluster (placed as [`crate::placement`] places copies, queued by
//! the migration policies) and is answered 429 "being live-migrated" until the pod has moved:
//! `kubectl drain` retries every five seconds and finds the pod gone once the migration has
//! deleted it. Pods that did not opt in, and pods whose migration failed or was refused, are
//! evicted as Kubernetes would (the next eviction passes, and an Event says why).
//!
//! The webhook needs no credential (the API server calls it); what it can be made to do is
//! what the eviction API already allows: move an opted-in pod off its node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube_core::DynamicObject;

use crate::events::Kind;
use crate::migrate::Validated;
use crate::state::{new_id, Coordinator};
use crate::target::THIS_CLUSTER;

/// The pod's opt-in annotation, and its value.
pub const ANNOTATION_EVICTION_STRATEGY: &str = "migration-eviction-strategy";
pub const LIVE_MIGRATE: &str = "live-migrate";

/// What became of the migration an eviction started, by pod UID, and since when. An ended
/// one (moved, failed) is forgotten after [`REMEMBERED`]: a moved pod is gone by then, and a
/// pod whose move failed long ago gets a new try at its next eviction.
#[derive(Debug, Default)]
pub struct Evacuations {
    by_uid: Mutex<HashMap<String, (Evacuation, Instant)>>,
}

/// How long an ended evacuation is remembered.
pub const REMEMBERED: Duration = Duration::from_secs(3600);

/// Forgets the ended evacuations older than `keep` at `now` (pure on the map); a moving one
/// stays until it ends.
pub fn prune(all: &mut HashMap<String, (Evacuation, Instant)>, now: Instant, keep: Duration) {
    all.retain(|_, (evacuation, since)| {
        matches!(evacuation, Evacuation::Moving { .. }) || now.duration_since(*since) < keep
    });
}

/// One pod's evacuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evacuation {
    /// Migration `id` moves it.
    Moving { id: String },
    /// It moved (the pod is deleted, or about to be).
    Moved { id: String },
    /// Its migration failed: the next eviction passes.
    Failed { id: String, why: String },
}

/// What the pod says, for the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub opted_in: bool,
    /// Running (phase Running): a pod that does not run has nothing to move.
    pub running: bool,
    /// Its `migration-id`, when some migration has it locked (or it is a passive copy).
    pub under_migration: Option<String>,
}

/// The webhook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Evicted as Kubernetes would (with why, when it opted in).
    Allow(Option<String>),
    /// 429: not yet, it is on its way (the message says so).
    NotYet(String),
    /// Start its migration, then answer 429.
    Start,
}

/// The decision for an eviction of a pod (`None`: no such pod), given its evacuation so far.
pub fn decide(pod: Option<&PodFacts>, known: Option<&Evacuation>, dry_run: bool) -> Decision {
    let Some(pod) = pod else {
        return Decision::Allow(None);
    };
    if !pod.opted_in {
        return Decision::Allow(None);
    }
    match known {
        Some(Evacuation::Moving { id }) => {
            return Decision::NotYet(format!(
                "pod {} is being live-migrated to another node by ums-rs (migration {id}): it is evicted once it has moved",
                pod.name
            ))
        }
        Some(Evacuation::Moved { id }) => {
            return Decision::NotYet(format!(
                "pod {} has been live-migrated to another node by ums-rs (migration {id}) and is being deleted",
                pod.name
            ))
        }
        Some(Evacuation::Failed { id, why }) => {
            return Decision::Allow(Some(format!(
                "its live migration {id} failed ({why}): evicted as Kubernetes would"
            )))
        }
        None => {}
    }
    if !pod.running {
        return Decision::Allow(Some("it does not run: nothing to move".to_owned()));
    }
    if let Some(id) = &pod.under_migration {
        return Decision::NotYet(format!(
            "pod {} is under migration {id}: evict it once that migration has ended",
            pod.name
        ));
    }
    if dry_run {
        return Decision::NotYet(format!(
            "pod {} would be live-migrated to another node by ums-rs (dry run: nothing started)",
            pod.name
        ));
    }
    Decision::Start
}

impl Evacuations {
    fn get(&self, uid: &str) -> Option<Evacuation> {
        let mut all = self.by_uid.lock().ok()?;
        prune(&mut all, Instant::now(), REMEMBERED);
        all.get(uid).map(|(e, _)| e.clone())
    }

    fn set(&self, uid: &str, evacuation: Evacuation) {
        if let Ok(mut all) = self.by_uid.lock() {
            all.insert(uid.to_owned(), (evacuation, Instant::now()));
        }
    }

    /// Records `Moving` unless the pod has an evacuation already (two evictions at once).
    fn claim(&self, uid: &str, id: &str) -> bool {
        let Ok(mut all) = self.by_uid.lock() else {
            return false;
        };
        if all.contains_key(uid) {
            return false;
        }
        all.insert(
            uid.to_owned(),
            (Evacuation::Moving { id: id.to_owned() }, Instant::now()),
        );
        true
    }
}

fn facts(pod: &Pod) -> PodFacts {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    PodFacts {
        name: format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        ),
        opted_in: annotations
            .get(ANNOTATION_EVICTION_STRATEGY)
            .is_some_and(|v| v == LIVE_MIGRATE),
        running: pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
        under_migration: annotations.get(ums_contract::ANNOTATION_ID).cloned(),
    }
}

/// A 429 answer, as kube-apiserver answers an eviction a budget holds back.
fn not_yet(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = response.deny(message);
    response.result.code = 429;
    response.result.reason = "TooManyRequests".to_owned();
    response
}

impl Coordinator {
    /// The eviction webhook's answer to one AdmissionReview.
    pub async fn review_eviction(
        self: &Arc<Self>,
        review: AdmissionReview<DynamicObject>,
    ) -> AdmissionReview<DynamicObject> {
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
        };
        let response = AdmissionResponse::from(&request);
        if request.sub_resource.as_deref() != Some("eviction") {
            return response.into_review();
        }
        let namespace = request
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
        let pod = match pods.get_opt(&request.name).await {
            Ok(pod) => pod,
            Err(e) => {
                // Not knowing whether the pod opted in, it is not evicted now: drain asks
                // again in five seconds.
                return not_yet(
                    response,
                    format!(
                        "ums-rs could not read pod {namespace}/{}: {e}",
                        request.name
                    ),
                )
                .into_review();
            }
        };
        let uid = pod
            .as_ref()
            .and_then(|p| p.metadata.uid.clone())
            .unwrap_or_default();
        let pod_facts = pod.as_ref().map(facts);
        let known = self.evacuations.get(&uid);
        match decide(pod_facts.as_ref(), known.as_ref(), request.dry_run) {
            Decision::Allow(None) => response.into_review(),
            Decision::Allow(Some(why)) => {
                tracing::warn!(pod = %request.name, namespace = %namespace, %why, "eviction of an opted-in pod let through");
                let subjects: Vec<_> =
                    crate::events::Subject::pod(&format!("{namespace}/{}", request.name))
                        .into_iter()
                        .collect();
                crate::events::publish(
                    &self.kube,
                    &subjects,
                    Kind::Warning,
                    "EvictedWithoutMigration",
                    &format!("evicted: {why}"),
                    &self.cluster,
                );
                response.into_review()
            }
            Decision::NotYet(message) => not_yet(response, message).into_review(),
            Decision::Start => {
                let id = new_id();
                if !self.evacuations.claim(&uid, &id) {
                    return not_yet(
                        response,
                        format!(
                            "pod {namespace}/{} is being live-migrated by ums-rs",
                            request.name
                        ),
                    )
                    .into_review();
                }
                let pod_name = format!("{namespace}/{}", request.name);
                let request_validated = Validated {
                    name: request.name.clone(),
                    namespace: namespace.clone(),
                    destination: THIS_CLUSTER.to_owned(),
                    node: None,
                    keep: false,
                    interface: None,
                    post_copy: false,
                    bandwidth: None,
                    completion_timeout_per_gib: None,
                    allow_post_copy: None,
                };
                self.begin(&id, &pod_name, &request_validated.destination_text(), None);
                self.announce(
                    &id,
                    Kind::Normal,
                    "EvictionDeferred",
                    &format!("an eviction started migration {id}: the pod moves to another node, then the eviction passes"),
                );
                tracing::info!(migration = %id, pod = %pod_name, "an eviction starts a live migration to another node");
                let coordinator = self.clone();
                let evacuation_id = id.clone();
                tokio::spawn(async move {
                    let outcome = coordinator.migrate(request_validated, &evacuation_id).await;
                    let state = match outcome {
                        Ok(_) => Evacuation::Moved { id: evacuation_id },
                        Err(e) => Evacuation::Failed {
                            id: evacuation_id,
                            why: e.message,
                        },
                    };
                    coordinator.evacuations.set(&uid, state);
                });
                not_yet(
                    response,
                    format!(
                        "pod {pod_name} is being live-migrated to another node by ums-rs (migration {id}): it is evicted once it has moved"
                    ),
                )
                .into_review()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(opted_in: bool) -> PodFacts {
        PodFacts {
            name: "shop/svc".into(),
            opted_in,
            running: true,
            under_migration: None,
        }
    }

    #[test]
    fn ended_evacuations_are_forgotten_after_a_while_moving_ones_never() {
        let start = Instant::now();
        let mut all = HashMap::from([
            (
                "a".to_owned(),
                (Evacuation::Moving { id: "m1".into() }, start),
            ),
            (
                "b".to_owned(),
                (Evacuation::Moved { id: "m2".into() }, start),
            ),
            (
                "c".to_owned(),
                (
                    Evacuation::Failed {
                        id: "m3".into(),
                        why: "no".into(),
                    },
                    start + Duration::from_secs(3000),
                ),
            ),
        ]);
        prune(&mut all, start + Duration::from_secs(1800), REMEMBERED);
        assert_eq!(all.len(), 3, "nothing is an hour old yet");
        prune(&mut all, start + Duration::from_secs(3700), REMEMBERED);
        let mut left: Vec<&str> = all.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(
            left,
            ["a", "c"],
            "the move that ended an hour ago is forgotten"
        );
        prune(&mut all, start + Duration::from_secs(99_999), REMEMBERED);
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["a"],
            "a move under way stays"
        );
    }

    #[test]
    fn only_running_pods_that_opted_in_are_held_back() {
        assert_eq!(decide(None, None, false), Decision::Allow(None));
        assert_eq!(
            decide(Some(&pod(false)), None, false),
            Decision::Allow(None)
        );
        assert_eq!(decide(Some(&pod(true)), None, false), Decision::Start);
        let pending = PodFacts {
            running: false,
            ..pod(true)
        };
        assert!(matches!(
            decide(Some(&pending), None, false),
            Decision::Allow(Some(_))
        ));
        let Decision::NotYet(message) = decide(Some(&pod(true)), None, true) else {
            panic!("a dry run starts nothing");
        };
        assert!(message.contains("dry run"), "{message}");
    }

    #[test]
    fn an_eviction_waits_for_the_move_and_passes_once_it_failed() {
        let moving = Evacuation::Moving { id: "m1".into() };
        let Decision::NotYet(message) = decide(Some(&pod(true)), Some(&moving), false) else {
            panic!("held back while it moves");
        };
        assert!(
            message.contains("being live-migrated") && message.contains("m1"),
            "{message}"
        );
        let failed = Evacuation::Failed {
            id: "m1".into(),
            why: "no other node".into(),
        };
        let Decision::Allow(Some(why)) = decide(Some(&pod(true)), Some(&failed), false) else {
            panic!("a failed move lets the eviction through");
        };
        assert!(why.contains("no other node"), "{why}");
        let locked = PodFacts {
            under_migration: Some("m0".into()),
            ..pod(true)
        };
        assert!(matches!(
            decide(Some(&locked), None, false),
            Decision::NotYet(_)
        ));
    }
}
