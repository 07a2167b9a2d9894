//! Node to node inside one cluster, as operators run it: a cluster with two nodes (a node
//! agent each, one pod network), its `ums-coordinator`, and wrapped pods (dind, pind) that
//! move to the other node by UMS's `POST /migrate` with `destinationNode` and by a
//! `LiveMigration`: the copy gets a name of its own and the pod's labels (what a Service
//! selects), runs on the named node, and the service continues with its memory and counter.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{live_migration, CoordinatorCerts, RunningCoordinator};
use ums_tests::poll;
use ums_tests::service_pod::{ask_service, container_output, service_pod};
use ums_tests::workload::ticks;

/// A user's 64 MiB service pod, wrapped for `interface`, labelled `app: <name>` and bound to
/// `node`; running and relaying its ticks. Its pod IP.
async fn start_on(cluster: &Cluster, name: &str, interface: &str, node: &str) -> String {
    let mut pod = service_pod(name, interface, None, &[("app", 64)]);
    pod["metadata"]["labels"] = json!({"app": name});
    pod["spec"]["nodeName"] = json!(node);
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let ip = cluster
        .wait_running_and_ready(name, Duration::from_secs(240))
        .await;
    let ambassador = cluster.pod_container(name, "app");
    poll(
        &format!("{name}'s ambassador to relay the workload's ticks"),
        Duration::from_secs(120),
        || {
            let n = ticks(&container_output(&ambassador)).len();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;
    ip
}

/// The pods a Service selecting `app=<app>` reaches: their names and nodes.
fn selected(cluster: &Cluster, app: &str) -> Vec<(String, String)> {
    let pods = cluster.get_json(&["pods", "-l", &format!("app={app}")]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The copy `copy` of service `app` runs on `node`, is the one pod its Service selects, and
/// answers with the memory and a counter past `counter`.
async fn moved(cluster: &Cluster, app: &str, copy: &str, node: &str, counter: u64, logs: &str) {
    assert_eq!(
        selected(cluster, app),
        vec![(copy.to_owned(), node.to_owned())],
        "the Service's selector app={app} reaches the copy only, on {node}\n{logs}"
    );
    let ip = cluster
        .wait_running_and_ready(copy, Duration::from_secs(60))
        .await;
    let answer = poll(
        &format!("{copy} to answer on {node}"),
        Duration::from_secs(30),
        || async { ask_service(&ip, 8080).await },
    )
    .await;
    assert!(answer.memory_ok, "{copy}: memory lost in the move");
    assert!(
        answer.tick > counter,
        "{copy}: counter {} did not continue from {counter} (restarted?)",
        answer.tick
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrapped_pods_move_to_another_node_of_their_cluster() {
    let mut cluster = Cluster::start_with_node();
    let first = cluster.first_node().to_owned();
    let second = cluster.add_node();
    let certs = CoordinatorCerts::generate(&cluster);
    let coordinator = RunningCoordinator::start(&cluster, &certs, &[&certs.ca]);
    let logs = || {
        format!(
            "--- coordinator:\n{}\n--- nodes:\n{}",
            coordinator.log(),
            cluster.node_log()
        )
    };

    let dind_ip = start_on(&cluster, "svc-dind", "dind", &first).await;
    let pind_ip = start_on(&cluster, "svc-pind", "pind", &first).await;

    // What cannot be: the node it runs on, a node the cluster lacks.
    let migrate = |body: Value| coordinator.call(&certs.ca, "POST", "/migrate", Some(body));
    let (status, answer) = migrate(json!({"name": "svc-dind", "destinationNode": first})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("already runs on node"),
        "{answer}"
    );
    let (status, answer) = migrate(json!({"name": "svc-dind", "destinationNode": "nowhere"})).await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("has no node nowhere"),
        "{answer}"
    );
    assert_eq!(cluster.node_of("default", "svc-dind"), first);

    // dind by UMS's call: the copy on the second node, a name of its own.
    let before = ask_service(&dind_ip, 8080).await.unwrap();
    let (status, report) = migrate(json!({"name": "svc-dind", "destinationNode": second})).await;
    assert_eq!(status, 200, "{report}\n{}", logs());
    assert_eq!(report["destination"]["node"], second.as_str(), "{report}");
    assert_eq!(
        report["destination"]["cluster"],
        cluster.name.as_str(),
        "{report}"
    );
    let copy = report["destination"]["pod"]
        .as_str()
        .unwrap()
        .trim_start_matches("default/")
        .to_owned();
    assert!(
        copy.starts_with("svc-dind-") && copy != "svc-dind",
        "{report}"
    );
    assert!(
        cluster
            .kubectl_result(User::Admin, &["get", "pod", "svc-dind"])
            .is_err(),
        "the source pod is deleted"
    );
    moved(&cluster, "svc-dind", &copy, &second, before.tick, &logs()).await;

    // pind by a LiveMigration.
    let before = ask_service(&pind_ip, 8080).await.unwrap();
    let status = live_migration(
        &cluster,
        "pind-to-second",
        json!({"pod": "svc-pind", "destinationNode": second}),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(status["phase"], "Succeeded", "{status}\n{}", logs());
    assert_eq!(status["destinationNode"], second.as_str(), "{status}");
    let pind_copy = status["destinationPod"]
        .as_str()
        .unwrap()
        .trim_start_matches("default/")
        .to_owned();
    moved(
        &cluster,
        "svc-pind",
        &pind_copy,
        &second,
        before.tick,
        &logs(),
    )
    .await;

    // The dind copy back to the first node: named after the service's first pod again.
    let ip = cluster
        .wait_running_and_ready(&copy, Duration::from_secs(30))
        .await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let status = live_migration(
        &cluster,
        "dind-back",
        json!({"pod": copy, "destinationNode": first}),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(status["phase"], "Succeeded", "{status}\n{}", logs());
    let back = status["destinationPod"]
        .as_str()
        .unwrap()
        .trim_start_matches("default/")
        .to_owned();
    assert!(
        back.starts_with("svc-dind-") && !back.starts_with(&copy),
        "second hop named {back} (first copy {copy})"
    );
    moved(&cluster, "svc-dind", &back, &first, before.tick, &logs()).await;
}
