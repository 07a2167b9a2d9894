//! The `LiveMigration` resource (`migration.ums-rs.io/v1alpha1`, deploy/coordinator/crd.yaml):
//! one object, one migration, driven by the same state machine as UMS's `POST /migrate`. The
//! coordinator watches the objects of its cluster; a new one (no status yet) starts its
//! migration, whose phase, timings, bytes, destination pod and outcome are written into the
//! object's status as they happen.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Api;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::migrate::{validate, MigrateRequest};
use crate::state::new_id;
use crate::state::Coordinator;

/// The resource's group, version and kind.
pub fn resource() -> ApiResource {
    use ums_contract::live_migration::{GROUP, KIND, PLURAL, VERSION};
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// What a user writes.
#[derive(Debug, Clone, Deserialize)]
pub struct Spec {
    pub pod: String,
    /// The destination cluster's coordinator; absent: another node of this cluster.
    #[serde(default)]
    pub destination: Option<String>,
    /// The node the copy runs on (of this cluster without `destination`).
    #[serde(default, rename = "destinationNode")]
    pub destination_node: Option<String>,
    #[serde(default)]
    pub keep: bool,
    #[serde(default, rename = "postCopy")]
    pub post_copy: bool,
    #[serde(default, rename = "bandwidthPerMigration")]
    pub bandwidth_per_migration: Option<Value>,
    #[serde(default, rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: Option<u64>,
    #[serde(default, rename = "allowPostCopy")]
    pub allow_post_copy: Option<bool>,
}

/// The phases after which nothing changes any more.
const FINAL: [&str; 2] = ums_contract::live_migration::FINAL_PHASES;

/// Now, as Kubernetes writes times in conditions (k8s-openapi's `Time`: RFC 3339, seconds,
/// UTC).
fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

fn phases_json(phases: &[(String, u64)]) -> Value {
    phases
        .iter()
        .map(|(phase, ms)| json!({"phase": phase, "ms": ms}))
        .collect()
}

async fn set_status(api: &Api<DynamicObject>, name: &str, status: Value) {
    let patch = json!({"status": status});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(livemigration = name, error = %e, "failed to write the status");
    }
}

/// Watches the cluster's LiveMigrations until the task is dropped.
pub async fn reconcile(coordinator: Arc<Coordinator>) {
    let all: Api<DynamicObject> = Api::all_with(coordinator.kube.clone(), &resource());
    loop {
        let mut events = watcher(all.clone(), watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let object = match event {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => o,
                // Deleting a LiveMigration cancels its migration: rolled back while it can be
                // (an operator's abort), the service left at the source.
                Ok(watcher::Event::Delete(o)) => {
                    let id = o.data["status"]["migrationId"].as_str().unwrap_or("");
                    if coordinator.is_driving(Some(id)) {
                        match coordinator.abort(id) {
                            Ok(phase) => {
                                tracing::warn!(livemigration = ?o.metadata.name, migration = id, phase, "LiveMigration deleted: the migration is aborted")
                            }
                            Err(e) => {
                                tracing::warn!(livemigration = ?o.metadata.name, migration = id, error = %e.message, "LiveMigration deleted: the migration cannot be aborted any more")
                            }
                        }
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "LiveMigration watch failed (is the CRD installed?); retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            let phase = object.data["status"]["phase"].as_str().unwrap_or("");
            if FINAL.contains(&phase) {
                continue;
            }
            let (Some(name), Some(namespace)) = (
                object.metadata.name.clone(),
                object.metadata.namespace.clone(),
            ) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(coordinator.kube.clone(), &namespace, &resource());
            if !phase.is_empty() {
                // In flight when this coordinator (re)started: its progress was in the
                // memory of the one that stopped. The pod may still carry the lock. A
                // migration this process started has a record, whatever its phase: the event
                // of a status it wrote can arrive after the migration ended (its task then
                // writes the final status), and is not a restart.
                let id = object.data["status"]["migrationId"].as_str().unwrap_or("");
                if coordinator.record(id).is_none() {
                    set_status(&api, &name, json!({
                        "phase": "Failed",
                        "message": "the coordinator restarted during the migration; check the pod's migration-id annotation and the destination",
                        "conditions": [{"type": "Succeeded", "status": "False", "reason": "CoordinatorRestarted", "lastTransitionTime": now()}],
                    })).await;
                }
                continue;
            }
            let spec: Result<Spec, _> = serde_json::from_value(object.data["spec"].clone());
            let request = spec.map_err(|e| format!("spec: {e}")).and_then(|spec| {
                validate(MigrateRequest {
                    name: Some(spec.pod),
                    namespace: Some(namespace.clone()),
                    destination_url: spec.destination.filter(|d| !d.is_empty()),
                    destination_node: spec.destination_node,
                    keep: spec.keep,
                    interface: None,
                    post_copy: spec.post_copy,
                    bandwidth_per_migration: spec.bandwidth_per_migration,
                    completion_timeout_per_gib: spec.completion_timeout_per_gib,
                    allow_post_copy: spec.allow_post_copy,
                })
                .map_err(|e| e.message)
            });
            let request = match request {
                Ok(r) => r,
                Err(message) => {
                    set_status(&api, &name, json!({
                        "phase": "Failed",
                        "message": message,
                        "conditions": [{"type": "Succeeded", "status": "False", "reason": "InvalidSpec", "message": message, "lastTransitionTime": now()}],
                    })).await;
                    continue;
                }
            };
            let id = new_id();
            coordinator.begin(
                &id,
                &format!("{namespace}/{}", request.name),
                &request.destination_text(),
                Some(&name),
            );
            set_status(&api, &name, json!({"phase": "Pending", "migrationId": id})).await;
            tracing::info!(livemigration = %name, migration = %id, "LiveMigration started");
            tokio::spawn(drive(coordinator.clone(), api, name, request, id));
        }
    }
}

/// Runs one migration, mirroring its phase into the object's status.
async fn drive(
    coordinator: Arc<Coordinator>,
    api: Api<DynamicObject>,
    name: String,
    request: crate::migrate::Validated,
    id: String,
) {
    let running = {
        let coordinator = coordinator.clone();
        let id = id.clone();
        tokio::spawn(async move { coordinator.migrate(request, &id).await })
    };
    let mut shown = String::new();
    while !running.is_finished() {
        if let Some(record) = coordinator.record(&id) {
            if record.phase != shown && !matches!(record.phase, "done" | "failed") {
                shown = record.phase.to_owned();
                set_status(
                    &api,
                    &name,
                    json!({"phase": shown, "phases": phases_json(&record.phases)}),
                )
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = match running.await {
        Ok(Ok(report)) => json!({
            "phase": "Succeeded",
            "message": report.message,
            "phases": phases_json(&report.phases),
            "destinationPod": report.destination.pod,
            "destinationCluster": report.destination.cluster,
            "destinationNode": report.destination.node,
            // The state carried: the archive's content, and with post-copy the page stream.
            "bytes": report.sidecar["totals"]["contentBytes"].as_u64().unwrap_or(0)
                + report.sidecar["totals"]["pageBytes"].as_u64().unwrap_or(0),
            "downtimeMs": report.sidecar["totals"]["downtimeMs"],
            "postCopyMs": report.sidecar["totals"]["postCopyMs"],
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Migrated", "message": "the service runs at the destination", "lastTransitionTime": now()}],
        }),
        Ok(Err(e)) => json!({
            "phase": "Failed",
            "message": format!("{}{}", e.message, if e.rollback.is_empty() { String::new() } else { format!(" (undone: {})", e.rollback.join("; ")) }),
            "phases": phases_json(&coordinator.record(&id).map(|r| r.phases).unwrap_or_default()),
            "conditions": [{"type": "Succeeded", "status": "False", "reason": e.phase.map(|p| format!("Failed{}", capitalized(p))).unwrap_or_else(|| "Failed".into()), "message": e.message, "lastTransitionTime": now()}],
        }),
        Err(e) => json!({"phase": "Failed", "message": format!("the migration task failed: {e}")}),
    };
    set_status(&api, &name, status).await;
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_times_are_rfc3339_seconds_utc_and_reasons_capitalized() {
        let now = now();
        let text = now.as_str().unwrap();
        assert_eq!(text.len(), "2026-11-23T02:50:00Z".len(), "{text}");
        assert!(text.ends_with('Z') && text.as_bytes()[10] == b'T', "{text}");
        assert_eq!(capitalized("creating"), "Creating");
    }

    #[test]
    fn the_spec_takes_post_copy_as_the_crd_names_it() {
        let spec: Spec =
            serde_json::from_value(json!({"pod": "p", "destination": "c:1", "postCopy": true}))
                .unwrap();
        assert!(spec.post_copy);
        let spec: Spec = serde_json::from_value(json!({"pod": "p", "destination": "c:1"})).unwrap();
        assert!(!spec.post_copy && !spec.keep);
        let spec: Spec =
            serde_json::from_value(json!({"pod": "p", "destinationNode": "n2"})).unwrap();
        assert_eq!(
            (spec.destination, spec.destination_node.as_deref()),
            (None, Some("n2"))
        );
    }
}
