//! What became of a migration, asked by the destination of its source (`POST /outcome`).
//!
//! A copy whose restored containers run while it is still passive holds the service's state,
//! and only the source knows whether that state is the service's (it left the source) or a
//! stale duplicate (the source rolled back and its `/delete` of the copy never arrived). The
//! destination's coordinator asks the source's, at start and every minute, and settles the
//! copy: made active when the state left, deleted when the service runs at the source, left
//! alone while the source is still at it or cannot say. Pure: facts in, decisions out.

use serde::{Deserialize, Serialize};
use ums_contract::StartMode;

/// The copy's annotation naming the source coordinator's URL (`https://host:port`), written
/// by the destination from `/create` when the source advertises one.
pub const ANNOTATION_SOURCE: &str = "migration.ums-rs.io/source";
/// The copy's annotation naming the source pod, `namespace/name`.
pub const ANNOTATION_SOURCE_POD: &str = "migration.ums-rs.io/source-pod";

/// Where the source says the migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The source's coordinator or sidecar is still at it: ask again later.
    Underway,
    /// The state left the source: the copy holds the service.
    Left,
    /// The service runs at the source (the migration rolled back or never froze it).
    Source,
    /// The source cannot say (no such pod, its sidecar silent): an operator decides.
    Unknown,
}

/// What a source pod's sidecar says of its containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// The service runs here: nothing under way.
    Here,
    /// The sidecar is migrating (its own rollback or success will settle it).
    Migrating,
    /// The state left: the service runs at the destination.
    Left,
    /// The sidecar does not answer.
    Unknown,
}

/// What the source knows of the pod a migration moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFacts {
    /// This coordinator is driving the migration right now.
    pub driving: bool,
    /// How the migration ended here, when this coordinator still has its record: `Some(true)`
    /// done, `Some(false)` failed with the service at the source.
    pub record: Option<bool>,
    /// The source pod, if it exists: whether it is locked under this migration, its start
    /// mode and what its sidecar says.
    pub pod: Option<PodFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub under_this_migration: bool,
    pub start_mode: Option<StartMode>,
    pub state: SourceState,
}

/// The source's answer. Only a source pod that runs its service, or a record that says the
/// migration failed with the service here, makes the copy a duplicate; only a state that left
/// makes it the service.
pub fn source_outcome(facts: &SourceFacts) -> Outcome {
    if facts.driving {
        return Outcome::Underway;
    }
    match (&facts.pod, facts.record) {
        (Some(pod), _) if pod.under_this_migration => match pod.state {
            SourceState::Here => Outcome::Source,
            SourceState::Migrating => Outcome::Underway,
            SourceState::Left => Outcome::Left,
            SourceState::Unknown => Outcome::Unknown,
        },
        // Released, or under a newer migration: this one ended. A pod kept emptied
        // (`migration-start-mode: null`) gave its service away, and a migration recorded as
        // done made its copy active before it released the source: a passive copy then is
        // not for a guess. Otherwise a pod running its service here makes the copy stale.
        (Some(pod), record) => match (pod.start_mode, record, pod.state) {
            (Some(StartMode::Null), _, _) | (_, Some(true), _) => Outcome::Unknown,
            (_, _, SourceState::Here | SourceState::Migrating) => Outcome::Source,
            (_, _, SourceState::Left) => Outcome::Left,
            (_, _, SourceState::Unknown) => Outcome::Unknown,
        },
        (None, Some(true)) => Outcome::Left,
        (None, Some(false)) => Outcome::Source,
        (None, None) => Outcome::Unknown,
    }
}

/// What the destination does with a passive copy whose restored containers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyAction {
    Activate,
    Delete,
    Wait,
}

pub fn copy_action(outcome: Outcome) -> CopyAction {
    match outcome {
        Outcome::Left => CopyAction::Activate,
        Outcome::Source => CopyAction::Delete,
        Outcome::Underway | Outcome::Unknown => CopyAction::Wait,
    }
}

/// The source a copy names: its coordinator's URL and the source pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    pub url: String,
    pub namespace: String,
    pub name: String,
}

impl SourceRef {
    /// The annotations a copy carries for it.
    pub fn annotations(&self) -> [(&'static str, String); 2] {
        [
            (ANNOTATION_SOURCE, self.url.clone()),
            (
                ANNOTATION_SOURCE_POD,
                format!("{}/{}", self.namespace, self.name),
            ),
        ]
    }

    /// The source a copy's annotations name, if whole.
    pub fn read(annotations: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        let url = annotations
            .get(ANNOTATION_SOURCE)
            .filter(|v| !v.is_empty())?;
        let (namespace, name) = annotations.get(ANNOTATION_SOURCE_POD)?.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| SourceRef {
            url: url.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pod: Option<(bool, Option<StartMode>, SourceState)>, record: Option<bool>) -> Outcome {
        source_outcome(&SourceFacts {
            driving: false,
            record,
            pod: pod.map(|(under, start_mode, state)| PodFacts {
                under_this_migration: under,
                start_mode,
                state,
            }),
        })
    }

    #[test]
    fn a_migration_still_driven_is_underway_whatever_the_pod_says() {
        let outcome = source_outcome(&SourceFacts {
            driving: true,
            record: Some(false),
            pod: Some(PodFacts {
                under_this_migration: true,
                start_mode: None,
                state: SourceState::Here,
            }),
        });
        assert_eq!(outcome, Outcome::Underway);
    }

    #[test]
    fn a_locked_pod_answers_from_its_sidecar() {
        for (state, outcome) in [
            (SourceState::Here, Outcome::Source),
            (SourceState::Migrating, Outcome::Underway),
            (SourceState::Left, Outcome::Left),
            (SourceState::Unknown, Outcome::Unknown),
        ] {
            assert_eq!(facts(Some((true, None, state)), None), outcome, "{state:?}");
        }
    }

    #[test]
    fn a_released_pod_that_runs_its_service_makes_the_copy_a_duplicate() {
        assert_eq!(
            facts(
                Some((false, Some(StartMode::Active), SourceState::Here)),
                None
            ),
            Outcome::Source
        );
        // Under a newer migration, frozen or not: this one ended with the service here.
        assert_eq!(
            facts(Some((false, None, SourceState::Migrating)), Some(false)),
            Outcome::Source
        );
    }

    #[test]
    fn a_pod_kept_emptied_or_gone_never_deletes_the_copy_on_a_guess() {
        assert_eq!(
            facts(
                Some((false, Some(StartMode::Null), SourceState::Here)),
                None
            ),
            Outcome::Unknown
        );
        // Recorded as done yet running here: a pod made again under the same name.
        assert_eq!(
            facts(Some((false, None, SourceState::Here)), Some(true)),
            Outcome::Unknown
        );
        assert_eq!(facts(None, None), Outcome::Unknown);
        assert_eq!(facts(None, Some(true)), Outcome::Left);
        assert_eq!(facts(None, Some(false)), Outcome::Source);
    }

    #[test]
    fn the_copy_is_activated_only_when_the_state_left_and_deleted_only_when_the_source_runs() {
        assert_eq!(copy_action(Outcome::Left), CopyAction::Activate);
        assert_eq!(copy_action(Outcome::Source), CopyAction::Delete);
        assert_eq!(copy_action(Outcome::Underway), CopyAction::Wait);
        assert_eq!(copy_action(Outcome::Unknown), CopyAction::Wait);
    }

    #[test]
    fn the_source_reads_back_from_the_copy() {
        let source = SourceRef {
            url: "https://edge:30001".into(),
            namespace: "shop".into(),
            name: "service".into(),
        };
        let annotations = source
            .annotations()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(SourceRef::read(&annotations), Some(source));
        assert_eq!(SourceRef::read(&Default::default()), None);
    }
}
