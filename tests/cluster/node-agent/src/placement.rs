//! The rig's stand-in for the scheduler (`--place-unbound`, one agent per cluster): every pod
//! bound to no node is bound (`pods/binding`, as the scheduler binds) to the Ready node that
//! is not cordoned and has the fewest pods, ties by name. It does not look at resources,
//! affinities, taints, topology or volumes (see README.md).

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::PostParams;
use kube::Api;

/// The node an unbound pod goes to: Ready, schedulable, the fewest pods (ties by name).
pub fn choose<'a>(nodes: &'a [Node], pods: &[Pod]) -> Option<&'a str> {
    let ready = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let cordoned = |n: &Node| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    let load = |name: &str| {
        pods.iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
            .count()
    };
    let mut candidates: Vec<&str> = nodes
        .iter()
        .filter(|n| ready(n) && !cordoned(n))
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    candidates.sort_by_key(|name| (load(name), name.to_owned()));
    candidates.first().copied()
}

/// Binds each unbound pod of `pods` that is not being deleted.
pub async fn bind_unbound(client: &kube::Client, pods: &[Pod]) {
    let unbound: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_none_or(str::is_empty)
        })
        .collect();
    if unbound.is_empty() {
        return;
    }
    let nodes = match Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
    {
        Ok(nodes) => nodes.items,
        Err(e) => {
            tracing::warn!(error = %e, "placement: cannot list the nodes");
            return;
        }
    };
    let mut placed: Vec<Pod> = pods.to_vec();
    for pod in unbound {
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            continue;
        };
        let Some(node) = choose(&nodes, &placed).map(str::to_owned) else {
            tracing::warn!(pod = %name, "placement: no Ready, schedulable node: the pod stays Pending");
            continue;
        };
        let binding = serde_json::json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        match api
            .create_subresource::<serde_json::Value, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %name, %node, "placement: pod bound");
                let mut bound = pod.clone();
                if let Some(spec) = bound.spec.as_mut() {
                    spec.node_name = Some(node);
                }
                placed.push(bound);
            }
            Err(e) => tracing::warn!(pod = %name, %node, error = %e, "placement: binding failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, cordoned: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .unwrap()
    }

    fn pod_on(node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({"spec": {"nodeName": node, "containers": []}}))
            .unwrap()
    }

    #[test]
    fn the_least_loaded_ready_schedulable_node_takes_a_pod() {
        let nodes = [
            node("a", true, false),
            node("b", true, false),
            node("c", true, true),
            node("d", false, false),
        ];
        assert_eq!(choose(&nodes, &[]), Some("a"));
        assert_eq!(choose(&nodes, &[pod_on("a")]), Some("b"));
        assert_eq!(choose(&nodes[2..], &[]), None);
    }
}
