//! Node-to-node moves inside this cluster: which node takes the copy, and what the copy is
//! called. Pure: the cluster's nodes in, a decision out ([`choose_node`]), the copy's name
//! ([`copy_name`]) and the pod made that copy ([`CopyPlace`]); [`crate::target`] asks the API
//! server and acts on them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};

/// On a copy made in the same cluster: the name of the pod the service first ran in (a
/// second move names its copy after it, not after the first copy).
pub const ANNOTATION_ORIGINAL_NAME: &str = "migration.ums-rs.io/original-name";

/// What placement needs of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub ready: bool,
    /// `spec.unschedulable` (cordoned, as `kubectl cordon` and `kubectl drain` set it).
    pub unschedulable: bool,
    /// The pods bound to it now.
    pub pods: usize,
}

impl NodeFacts {
    /// The facts of a Node object, with the number of pods bound to it.
    pub fn of(node: &Node, pods: usize) -> Self {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            ready,
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            pods,
        }
    }
}

/// Why no node can take the copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("cluster {cluster} has no node {node}")]
    UnknownNode { cluster: String, node: String },
    #[error("the pod already runs on node {node}: name another node")]
    SameNode { node: String },
    #[error("node {node} is cordoned (spec.unschedulable): it takes no new pods")]
    Cordoned { node: String },
    #[error("node {node} is not Ready")]
    NotReady { node: String },
    #[error("no other node of cluster {cluster} can take the copy (the pod runs on {source_node}; {why})")]
    NoNode {
        cluster: String,
        source_node: String,
        why: String,
    },
}

impl PlacementError {
    /// The HTTP status a refusal answers with: 404 for a node that does not exist, 409 for
    /// one that cannot take the copy now.
    pub fn status(&self) -> u16 {
        match self {
            PlacementError::UnknownNode { .. } => 404,
            _ => 409,
        }
    }
}

/// The node the copy goes to: `wanted` if it can take it, else the Ready, schedulable node
/// other than the source's with the fewest pods (ties: the first by name).
pub fn choose_node(
    cluster: &str,
    nodes: &[NodeFacts],
    source: Option<&str>,
    wanted: Option<&str>,
) -> Result<String, PlacementError> {
    if let Some(wanted) = wanted {
        let node =
            nodes
                .iter()
                .find(|n| n.name == wanted)
                .ok_or_else(|| PlacementError::UnknownNode {
                    cluster: cluster.to_owned(),
                    node: wanted.to_owned(),
                })?;
        if source == Some(wanted) {
            return Err(PlacementError::SameNode {
                node: wanted.to_owned(),
            });
        }
        if node.unschedulable {
            return Err(PlacementError::Cordoned {
                node: wanted.to_owned(),
            });
        }
        if !node.ready {
            return Err(PlacementError::NotReady {
                node: wanted.to_owned(),
            });
        }
        return Ok(wanted.to_owned());
    }
    let mut others: Vec<&NodeFacts> = nodes
        .iter()
        .filter(|n| Some(n.name.as_str()) != source)
        .collect();
    others.sort_by(|a, b| a.pods.cmp(&b.pods).then_with(|| a.name.cmp(&b.name)));
    if let Some(node) = others.iter().find(|n| n.ready && !n.unschedulable) {
        return Ok(node.name.clone());
    }
    let why = if others.is_empty() {
        "it has no other node".to_owned()
    } else {
        let said: Vec<String> = others
            .iter()
            .map(|n| {
                format!(
                    "{}: {}",
                    n.name,
                    if n.unschedulable {
                        "cordoned"
                    } else {
                        "not Ready"
                    }
                )
            })
            .collect();
        said.join(", ")
    };
    Err(PlacementError::NoNode {
        cluster: cluster.to_owned(),
        source_node: source.unwrap_or("no node").to_owned(),
        why,
    })
}

/// The name of the pod the service first ran in: the source's `original-name`, else the
/// source's own name.
pub fn original_name<'a>(
    source: &'a str,
    annotations: Option<&'a BTreeMap<String, String>>,
) -> &'a str {
    annotations
        .and_then(|a| a.get(ANNOTATION_ORIGINAL_NAME))
        .filter(|n| !n.is_empty())
        .map(String::as_str)
        .unwrap_or(source)
}

/// Where and as what a migration's copy is created: in this cluster under a name of its own
/// on the node chosen, remembering the service's first pod (`original`); in another cluster
/// under the source's name, on the node asked for (`None`: the destination places it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlace {
    pub name: String,
    pub node: Option<String>,
    /// The name of the pod the service first ran in; `Some` for a copy in this cluster.
    pub original: Option<String>,
}

impl CopyPlace {
    /// `pod` made this copy: bound to its node and, in this cluster, renamed with the first
    /// pod's name annotated (pure).
    pub fn apply(&self, mut pod: Pod) -> Pod {
        if let Some(original) = &self.original {
            pod.metadata.name = Some(self.name.clone());
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(ANNOTATION_ORIGINAL_NAME.to_owned(), original.clone());
        }
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = self.node.clone();
        }
        pod
    }
}

/// The name the copy of `source` has in migration `id`: in this cluster (`this_cluster`, a
/// node-to-node move) a name of its own ([`copy_name`]), in another the source's (pure).
pub fn copy_name_at(this_cluster: bool, source: &Pod, id: &str) -> String {
    let name = source.metadata.name.as_deref().unwrap_or_default();
    if this_cluster {
        copy_name(name, source.metadata.annotations.as_ref(), id)
    } else {
        name.to_owned()
    }
}

/// The name of a copy in the same cluster (pods' names are unique in a namespace): the
/// service's first pod's name ([`original_name`]) and the migration's id, cut so that it
/// stays a DNS label (63 characters, as a pod's hostname must be).
pub fn copy_name(source: &str, annotations: Option<&BTreeMap<String, String>>, id: &str) -> String {
    let base = original_name(source, annotations);
    // The id's last characters differ between migrations (it is a clock in hex).
    let suffix: String = id
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let room = 63 - suffix.len() - 1;
    let base: String = base.chars().take(room).collect();
    let base = base.trim_end_matches(['-', '.']);
    format!("{base}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, unschedulable: bool, pods: usize) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            ready,
            unschedulable,
            pods,
        }
    }

    #[test]
    fn a_named_node_is_taken_when_it_can_take_the_copy() {
        let nodes = [node("a", true, false, 3), node("b", true, false, 9)];
        assert_eq!(choose_node("c", &nodes, Some("a"), Some("b")).unwrap(), "b");
        let e = choose_node("c", &nodes, Some("a"), Some("a")).unwrap_err();
        assert_eq!(e, PlacementError::SameNode { node: "a".into() });
        let e = choose_node("c", &nodes, Some("a"), Some("z")).unwrap_err();
        assert_eq!(e.status(), 404);
        assert!(e.to_string().contains("has no node z"), "{e}");
        let nodes = [node("a", true, false, 3), node("b", true, true, 0)];
        let e = choose_node("c", &nodes, Some("a"), Some("b")).unwrap_err();
        assert!(e.to_string().contains("cordoned"), "{e}");
        let nodes = [node("a", true, false, 3), node("b", false, false, 0)];
        let e = choose_node("c", &nodes, Some("a"), Some("b")).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("not Ready"), "{e}");
    }

    #[test]
    fn without_a_name_the_least_loaded_other_node_takes_it() {
        let nodes = [
            node("a", true, false, 0),
            node("b", true, false, 4),
            node("c", true, false, 2),
            node("d", true, true, 0),
            node("e", false, false, 0),
        ];
        assert_eq!(choose_node("x", &nodes, Some("a"), None).unwrap(), "c");
        let nodes = [node("a", true, false, 0), node("b", true, true, 0)];
        let e = choose_node("x", &nodes, Some("a"), None).unwrap_err();
        assert!(
            e.to_string().contains(
                "no other node of cluster x can take the copy (the pod runs on a; b: cordoned)"
            ),
            "{e}"
        );
        let e = choose_node("x", &[node("a", true, false, 0)], Some("a"), None).unwrap_err();
        assert!(e.to_string().contains("it has no other node"), "{e}");
    }

    #[test]
    fn copies_are_named_after_the_first_pod_and_stay_dns_labels() {
        assert_eq!(copy_name("svc", None, "m18c2f3a4b5c6d7e8"), "svc-b5c6d7e8");
        let mut a = BTreeMap::new();
        a.insert(ANNOTATION_ORIGINAL_NAME.to_owned(), "svc".to_owned());
        assert_eq!(
            copy_name("svc-b5c6d7e8", Some(&a), "m1111222233334444"),
            "svc-33334444"
        );
        let long = "a".repeat(80);
        let name = copy_name(&long, None, "m18c2f3a4b5c6d7e8");
        assert_eq!(name.len(), 63);
        assert!(ums_contract::names::is_dns1123_label(&name));
        let dashed = format!("{}-b", "a".repeat(53));
        let name = copy_name(&dashed, None, "m18c2f3a4b5c6d7e8");
        assert!(ums_contract::names::is_dns1123_label(&name), "{name}");
    }
}
