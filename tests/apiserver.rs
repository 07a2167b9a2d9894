//! What the product needs from the test API server beyond admission, checked through kubectl
//! as a client would use it: CustomResourceDefinitions (apiextensions-apiserver chained behind
//! it, discovered through the shared aggregated discovery), custom resources with a status
//! subresource and schema pruning, server-side apply (OpenAPI of the served types), field
//! selectors on pods, pods/binding, pods/eviction and PodDisruptionBudgets.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use serde_json::json;
use ums_tests::cluster::{Cluster, User};

const CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {"name": "widgets.example.ums-rs.io"},
  "spec": {
    "group": "example.ums-rs.io",
    "scope": "Namespaced",
    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
    "versions": [{
      "name": "v1", "served": true, "storage": true,
      "subresources": {"status": {}},
      "schema": {"openAPIV3Schema": {"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
      }}}
    }]
  }
}"#;

#[test]
fn custom_resources_are_served() {
    let cluster = Cluster::start();
    cluster.kubectl_with_input(User::Admin, &["apply", "-f", "-"], CRD);
    cluster.kubectl(
        User::Admin,
        &[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.ums-rs.io",
            "--timeout=60s",
        ],
    );
    let widget = json!({
        "apiVersion": "example.ums-rs.io/v1", "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3, "unknown": "pruned"}
    });
    // kubectl asks for strict field validation: the schema refuses the unknown field...
    let refused = cluster
        .kubectl_with_input_result(User::Jane, &["create", "-f", "-"], &widget.to_string())
        .unwrap_err();
    assert!(
        refused.contains("unknown field \"spec.unknown\""),
        "{refused}"
    );
    // ...and without it, the stored object is pruned to the schema.
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "--validate=false", "-f", "-"],
        &widget.to_string(),
    );
    let stored = cluster.get_json(&["widget", "w1"]);
    assert_eq!(
        stored["spec"],
        json!({"size": 3}),
        "unknown fields are pruned"
    );
    // The status subresource: a status patch changes status only.
    cluster.kubectl(
        User::Admin,
        &[
            "patch",
            "widget",
            "w1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status": {"phase": "Done"}, "spec": {"size": 9}}"#,
        ],
    );
    let stored = cluster.get_json(&["widget", "w1"]);
    assert_eq!(stored["status"]["phase"], "Done");
    assert_eq!(stored["spec"]["size"], 3);
}

#[test]
fn server_side_apply_and_field_selectors_work_on_pods() {
    let cluster = Cluster::start();
    let pod = |node: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("on-{node}"), "labels": {"app": "x"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1"}]}
        })
        .to_string()
    };
    for node in ["a", "b"] {
        cluster.kubectl_with_input(
            User::Jane,
            &["apply", "--server-side", "-f", "-"],
            &pod(node),
        );
    }
    let on_a = cluster.kubectl(
        User::Admin,
        &[
            "get",
            "pods",
            "--field-selector",
            "spec.nodeName=a",
            "-o",
            "name",
        ],
    );
    assert_eq!(on_a.trim(), "pod/on-a");
    let managed = cluster.get_json(&["pod", "on-a", "--show-managed-fields"])["metadata"]
        ["managedFields"]
        .clone();
    assert_eq!(managed[0]["operation"], "Apply", "{managed}");
    // A new pod is Pending until a node agent says otherwise.
    assert_eq!(
        cluster.get_json(&["pod", "on-b"])["status"]["phase"],
        "Pending"
    );
}

/// What `kubectl drain` and a scheduler use: pods/binding sets an unbound pod's node once;
/// pods/eviction deletes a pod unless its PodDisruptionBudget would be short (429, kube-apiserver's
/// message), with the pdb short name in discovery.
#[test]
fn bindings_evictions_and_disruption_budgets() {
    let cluster = Cluster::start();
    let pod = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "main", "image": "ums-rs/debian:trixie"}]}})
        .to_string()
    };
    let binding = |name: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
        .to_string()
    };
    let eviction = |name: &str| {
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}})
            .to_string()
    };
    let post = |path: String, body: String| {
        cluster.kubectl_with_input_result(
            User::Admin,
            &["create", "--raw", &path, "-f", "-"],
            &body,
        )
    };
    for name in ["web-1", "web-2"] {
        cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod(name));
    }
    post(
        "/api/v1/namespaces/default/pods/web-1/binding".into(),
        binding("web-1", "node-a"),
    )
    .unwrap();
    assert_eq!(
        cluster.get_json(&["pod", "web-1"])["spec"]["nodeName"],
        "node-a"
    );
    let again = post(
        "/api/v1/namespaces/default/pods/web-1/binding".into(),
        binding("web-1", "node-b"),
    )
    .unwrap_err();
    assert!(
        again.contains("already assigned to node \"node-a\""),
        "{again}"
    );

    // Both pods Ready (as a node agent would say), a budget that wants both.
    for name in ["web-1", "web-2"] {
        let status = json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        cluster.kubectl(
            User::Admin,
            &[
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
        );
    }
    let budget = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}});
    cluster.kubectl_with_input(User::Admin, &["create", "-f", "-"], &budget.to_string());
    let refused = post(
        "/api/v1/namespaces/default/pods/web-1/eviction".into(),
        eviction("web-1"),
    )
    .unwrap_err();
    assert!(refused.contains("disruption budget"), "{refused}");
    assert!(cluster
        .kubectl_result(User::Admin, &["get", "pod", "web-1"])
        .is_ok());
    // One may go once the budget allows it; the eviction deletes the pod.
    cluster.kubectl(
        User::Admin,
        &[
            "patch",
            "pdb",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"minAvailable":1}}"#,
        ],
    );
    post(
        "/api/v1/namespaces/default/pods/web-1/eviction".into(),
        eviction("web-1"),
    )
    .unwrap();
    assert!(cluster
        .kubectl_result(User::Admin, &["get", "pod", "web-1"])
        .is_err());
    let refused = post(
        "/api/v1/namespaces/default/pods/web-2/eviction".into(),
        eviction("web-2"),
    )
    .unwrap_err();
    assert!(
        refused.contains("needs 1 healthy pods and has 1 currently")
            || refused.contains("disruption budget"),
        "{refused}"
    );
}
