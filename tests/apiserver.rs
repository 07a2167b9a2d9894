//! What the product needs from the test API server beyond admission, checked through kubectl
//! as a client would use it: CustomResourceDefinitions (apiextensions-apiserver chained behind
//! it, discovered through the shared aggregated discovery), custom resources with a status
//! subresource and schema pruning, server-side apply (OpenAPI of the served types), field
//! selectors on pods.

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
