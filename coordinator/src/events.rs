//! Kubernetes Events for what migrations do, on the pod and on its LiveMigration, so that
//! `kubectl describe` tells the story (core/v1 Events, as `kubectl describe` and
//! `kubectl events` read them). Written in the background: an API server that refuses an
//! Event slows no migration, and is logged.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::PostParams;
use kube::Api;

/// `Normal` or `Warning`, as Kubernetes types its Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Subject {
    /// A pod, from `namespace/name`.
    pub fn pod(namespaced: &str) -> Option<Self> {
        let (namespace, name) = namespaced.split_once('/')?;
        Some(Subject {
            api_version: "v1",
            kind: "Pod",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// A LiveMigration.
    pub fn live_migration(namespace: &str, name: &str) -> Self {
        Subject {
            api_version: "migration.ums-rs.io/v1alpha1",
            kind: "LiveMigration",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The Event for `subject`, as this coordinator (`cluster`) reports it.
pub fn event(subject: &Subject, kind: Kind, reason: &str, message: &str, cluster: &str) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let nanos = now.as_nanosecond();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{nanos:x}", subject.name)),
            namespace: Some(subject.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(subject.api_version.to_owned()),
            kind: Some(subject.kind.to_owned()),
            namespace: Some(subject.namespace.clone()),
            name: Some(subject.name.clone()),
            ..Default::default()
        },
        reason: Some(reason.to_owned()),
        // Kubernetes caps an Event's message at 1 KiB.
        message: Some(message.chars().take(1024).collect()),
        type_: Some(
            match kind {
                Kind::Normal => "Normal",
                Kind::Warning => "Warning",
            }
            .to_owned(),
        ),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Migrate".to_owned()),
        reporting_component: Some("ums-coordinator".to_owned()),
        reporting_instance: Some(cluster.to_owned()),
        source: Some(EventSource {
            component: Some("ums-coordinator".to_owned()),
            host: None,
        }),
        ..Default::default()
    }
}

/// Writes the Event about each subject, in the background.
pub fn publish(
    kube: &kube::Client,
    subjects: &[Subject],
    kind: Kind,
    reason: &str,
    message: &str,
    cluster: &str,
) {
    for subject in subjects {
        let event = event(subject, kind, reason, message, cluster);
        let api: Api<Event> = Api::namespaced(kube.clone(), &subject.namespace);
        let reason = reason.to_owned();
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(reason, error = %e, "could not write an Event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_object_reason_and_reporter() {
        let pod = Subject::pod("shop/svc").unwrap();
        let e = event(
            &pod,
            Kind::Warning,
            "MigrationFailed",
            &"x".repeat(2000),
            "edge",
        );
        assert_eq!(e.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(e.involved_object.namespace.as_deref(), Some("shop"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.message.as_ref().unwrap().len(), 1024);
        assert_eq!(e.reporting_instance.as_deref(), Some("edge"));
        assert!(e.metadata.name.unwrap().starts_with("svc."));
        assert!(Subject::pod("no-namespace").is_none());
    }
}
