//! The kubelet stand-in on its own: what the wrapped pods rely on, checked on plain pods.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, User};
use ums_tests::service_pod::container_output;

fn plain_pod(name: &str, restart_policy: &str, script: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"color": "blue"}},
        "spec": {
            "restartPolicy": restart_policy,
            "containers": [{
                "name": "main",
                "image": "ums-rs/debian:trixie",
                "command": ["sh", "-c", script],
                "env": [{"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "podinfo", "mountPath": "/podinfo"}]
            }],
            "volumes": [{"name": "podinfo", "downwardAPI": {"items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
            ]}}]
        }
    })
    .to_string()
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn main_status(cluster: &Cluster, pod: &str) -> Value {
    cluster.get_json(&["pod", pod])["status"]["containerStatuses"][0].clone()
}

#[test]
fn failed_containers_restart_per_policy_and_status_says_so() {
    let cluster = Cluster::start_with_node();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &plain_pod(
            "on-failure",
            "OnFailure",
            "echo pod=$MY_POD; sleep 1; exit 3",
        ),
    );
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &plain_pod("never", "Never", "exit 0"),
    );
    let restarted = wait_for("a restart of the failing container", || {
        let status = main_status(&cluster, "on-failure");
        (status["restartCount"].as_i64().unwrap_or(0) >= 2).then_some(status)
    });
    assert_eq!(restarted["name"], "main");
    let output = container_output(&cluster.pod_container("on-failure", "main"));
    assert!(output.contains(&"pod=on-failure".to_owned()), "{output:?}");
    wait_for("the Never pod to succeed", || {
        let status = cluster.get_json(&["pod", "never"])["status"].clone();
        (status["phase"] == "Succeeded").then_some(())
    });
    assert_eq!(main_status(&cluster, "never")["restartCount"], 0);
    assert_eq!(
        main_status(&cluster, "never")["state"]["terminated"]["exitCode"],
        0
    );
    // Deleting the pod removes its containers.
    let container = cluster.pod_container("never", "main");
    cluster.kubectl(User::Jane, &["delete", "pod", "never", "--wait=false"]);
    wait_for("the deleted pod's containers to go", || {
        let gone = !std::process::Command::new("docker")
            .args(["inspect", &container])
            .output()
            .unwrap()
            .status
            .success();
        gone.then_some(())
    });
}

#[test]
fn downward_api_files_follow_annotation_changes() {
    let cluster = Cluster::start_with_node();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &plain_pod(
            "watcher",
            "Always",
            "while true; do cat /podinfo/annotations; echo; sleep 0.3; done",
        ),
    );
    let container = wait_for("the watcher to run", || {
        let status = main_status(&cluster, "watcher");
        status["state"]["running"]
            .is_object()
            .then(|| cluster.pod_container("watcher", "main"))
    });
    wait_for("the first annotations", || {
        container_output(&container)
            .contains(&r#"color="blue""#.to_owned())
            .then_some(())
    });
    cluster.kubectl(
        User::Jane,
        &["annotate", "--overwrite", "pod", "watcher", "color=green"],
    );
    wait_for("the rewritten annotations file", || {
        container_output(&container)
            .contains(&r#"color="green""#.to_owned())
            .then_some(())
    });
}

/// Init containers run in order, each to its end, before the pod's containers, on a volume
/// they share; one that fails under `restartPolicy: Never` fails the pod, and its containers
/// never start.
#[test]
fn init_containers_run_to_their_end_before_the_containers() {
    let cluster = Cluster::start_with_node();
    let pod = |name: &str, second_init: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "initContainers": [
                    {"name": "first", "image": "ums-rs/debian:trixie",
                     "command": ["sh", "-c", "sleep 1; echo first >> /data/order"],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                    {"name": "second", "image": "ums-rs/debian:trixie",
                     "command": ["sh", "-c", second_init],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
                ],
                "containers": [{"name": "main", "image": "ums-rs/debian:trixie",
                    "command": ["sh", "-c", "echo main >> /data/order; cat /data/order; sleep 600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        })
        .to_string()
    };
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &pod("ordered", "echo second >> /data/order"),
    );
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &pod("failing", "exit 4"),
    );
    let status = wait_for("the ordered pod to run", || {
        let status = cluster.get_json(&["pod", "ordered"])["status"].clone();
        (status["phase"] == "Running").then_some(status)
    });
    let init = status["initContainerStatuses"].as_array().unwrap();
    assert_eq!(init.len(), 2, "{status}");
    for (c, name) in init.iter().zip(["first", "second"]) {
        assert_eq!(c["name"], name, "{status}");
        assert_eq!(c["state"]["terminated"]["exitCode"], 0, "{status}");
    }
    assert!(
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Initialized" && c["status"] == "True"),
        "{status}"
    );
    let output = wait_for("main's output", || {
        let output = container_output(&cluster.pod_container("ordered", "main"));
        (output.len() >= 3).then_some(output)
    });
    assert_eq!(output[..3], ["first", "second", "main"], "{output:?}");

    let failed = wait_for("the failing pod to fail", || {
        let status = cluster.get_json(&["pod", "failing"])["status"].clone();
        (status["phase"] == "Failed").then_some(status)
    });
    assert_eq!(
        failed["initContainerStatuses"][1]["state"]["terminated"]["exitCode"], 4,
        "{failed}"
    );
    assert!(
        failed["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Initialized" && c["status"] == "False"),
        "{failed}"
    );
    assert!(
        failed["containerStatuses"][0]["state"]["running"].is_null(),
        "main never started: {failed}"
    );
}
