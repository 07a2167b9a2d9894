//! The CRI node of the test rig (tests/cluster/cri-node + `ums-node-agent --runtime cri`): a
//! containerd 2.x node driven through the CRI as a kubelet drives it, and the kubelet's
//! checkpoint endpoint with the kubelet's contract (KEP-2008).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, User};
use ums_tests::service_pod::{ask_service, plain_counter_pod, run_plain_counter};
use ums_tests::workload::tls_registry_workload_image;

/// A two-container pod of the test workload: `main` serves its counter on 8080, `journal`
/// appends to a file in an emptyDir both mount.
fn two_container_pod(name: &str) -> Value {
    let image = tls_registry_workload_image();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {"name": "main", "image": image,
                 "env": [{"name": "WORKLOAD_MIB", "value": "16"},
                         {"name": "WORKLOAD_LISTEN", "value": "8080"},
                         {"name": "WORKLOAD_SINK", "value": "9000"}],
                 "readinessProbe": {"tcpSocket": {"port": 8080}},
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "journal", "image": image,
                 "env": [{"name": "WORKLOAD_MIB", "value": "8"},
                         {"name": "WORKLOAD_JOURNAL", "value": "/data/journal"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    })
}

async fn kubelet_post(cluster: &Cluster, path: &str, token: Option<&str>) -> (u16, Value) {
    let (base, ca) = cluster.kubelet();
    let client =
        ums_tests::coordinator::client_with(&ca, &ums_tests::coordinator::Credential::None);
    let mut request = client.post(format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "text": text }));
    (status, body)
}

fn tar_entries(path: &std::path::Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    tar::Archive::new(file)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cri_node_runs_pods_and_serves_the_kubelet_checkpoint_endpoint() {
    let cluster = Cluster::start_with_cri_node();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &two_container_pod("counter").to_string(),
    );
    let ip = cluster
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    let status = cluster.get_json(&["pod", "counter"])["status"].clone();
    // The Node object says where its kubelet endpoint is, as a kubelet registers it; the
    // pod's hostIP is that address.
    let nodes = cluster.get_json(&["nodes"]);
    let node = &nodes["items"][0];
    let (base, _) = cluster.kubelet();
    let port = base.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(
        node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], port,
        "{node}"
    );
    let address = node["status"]["addresses"][0]["address"].clone();
    assert_eq!(status["hostIP"], address, "{node}");
    assert!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .unwrap()
            .starts_with("containerd://2."),
        "{node}"
    );
    for container in status["containerStatuses"].as_array().unwrap() {
        let id = container["containerID"].as_str().unwrap();
        assert!(id.starts_with("containerd://"), "{container}");
    }
    // The pod's IP is on the node's CNI bridge, routed from this machine.
    let answer = ask_service(&ip, 8080)
        .await
        .expect("the service answers on its pod IP");
    assert!(answer.memory_ok, "{answer:?}");
    let output = cluster.cri_container_output("counter", "main");
    assert!(
        output.iter().any(|l| l.starts_with("tick=")),
        "main's log (CRI log file): {output:?}"
    );

    // The kubelet's authentication and authorization.
    let path = "/checkpoint/default/counter/main";
    let (code, body) = kubelet_post(&cluster, path, None).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = kubelet_post(&cluster, path, Some("no-such-token")).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = kubelet_post(&cluster, path, Some("jane-token")).await;
    assert_eq!(code, 403, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("user=jane") && message.contains("subresource=checkpoint"),
        "{message}"
    );
    // The kubelet's 404s and its 400 for a bad timeout.
    let (code, body) = kubelet_post(
        &cluster,
        "/checkpoint/default/nothing/main",
        Some("coordinator-token"),
    )
    .await;
    assert_eq!(
        (code, body["message"].as_str()),
        (404, Some("pod does not exist")),
        "{body}"
    );
    let (code, body) = kubelet_post(
        &cluster,
        "/checkpoint/default/counter/nothing",
        Some("coordinator-token"),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("nothing"),
        "{body}"
    );
    let (code, body) = kubelet_post(
        &cluster,
        "/checkpoint/default/counter/main?timeout=soon",
        Some("coordinator-token"),
    )
    .await;
    assert_eq!(code, 400, "{body}");

    // A checkpoint, with the kubelet's file name, of both containers at once, while a client
    // holds a TCP connection to the service (as clients and the kubelet's probes do): the
    // node's CRIU configuration (tcp-close) checkpoints it, to be restored closed.
    let held = tokio::net::TcpStream::connect((ip.as_str(), 9000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let (main, journal) = tokio::join!(
        kubelet_post(
            &cluster,
            "/checkpoint/default/counter/main?timeout=60",
            Some("coordinator-token")
        ),
        kubelet_post(
            &cluster,
            "/checkpoint/default/counter/journal",
            Some("coordinator-token")
        ),
    );
    for ((code, body), container) in [(main, "main"), (journal, "journal")] {
        assert_eq!(code, 200, "{container}: {body}");
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{body}");
        let path = items[0].as_str().unwrap();
        let prefix =
            format!("/var/lib/kubelet/checkpoints/checkpoint-counter_default-{container}-");
        assert!(
            path.starts_with(&prefix) && path.ends_with(".tar"),
            "{path}"
        );
        let file = cluster
            .node_checkpoint_dir()
            .join(path.rsplit('/').next().unwrap());
        let entries = tar_entries(&file);
        assert!(
            entries.iter().any(|e| e.starts_with("checkpoint/"))
                && entries.iter().any(|e| e == "config.dump"),
            "{container}'s archive holds CRIU's images and containerd's config: {entries:?}"
        );
    }
    drop(held);
    // A CRI checkpoint leaves the container running (KEP-2008): the service goes on.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let after = ask_service(&ip, 8080).await;
        if let Some(after) = after.filter(|a| a.tick > before.tick) {
            assert!(after.memory_ok, "{after:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "the service stopped after its checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Deleting the pod removes its containers and sandbox from the node.
    cluster.kubectl(User::Jane, &["delete", "pod", "counter", "--wait=false"]);
    let until = Instant::now() + Duration::from_secs(60);
    while ask_service(&ip, 8080).await.is_some() {
        assert!(Instant::now() < until, "the deleted pod still answers");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cri_node_applies_the_image_pull_policy() {
    let cluster = Cluster::start_with_cri_node();
    // An image the node does not have, with Never: the kubelet's ErrImageNeverPull.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "never"},
        "spec": {"containers": [{"name": "main", "image": "example.invalid/absent:1",
                                 "imagePullPolicy": "Never"}]}
    });
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = cluster.get_json(&["pod", "never"])["status"]["containerStatuses"][0]
            ["state"]["waiting"]
            .clone();
        if waiting["reason"] == "ErrImageNeverPull" {
            break;
        }
        assert!(
            Instant::now() < until,
            "no ErrImageNeverPull: {waiting}\n{}",
            cluster.node_log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The orchestrator-level restore's mechanics on the rig: a checkpoint taken through the
/// kubelet endpoint of one cluster's node, pushed as a checkpoint OCI image
/// (ums-checkpoint-image, streamed from the archive), restores in a pod of another cluster
/// whose container image is that image: the counter goes on, memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_image_restores_the_container_in_another_cluster() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let edge = Cluster::start_with_cri_node();
    let cloud = Cluster::start_with_cri_node();
    let (ip, before) = run_plain_counter(&edge).await;
    let (code, body) = kubelet_post(
        &edge,
        "/checkpoint/default/counter/main",
        Some("coordinator-token"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // The source is stopped after its checkpoint, as a migration does.
    edge.kubectl(User::Jane, &["delete", "pod", "counter", "--wait=false"]);
    let file = edge.node_checkpoint_dir().join(
        body["items"][0]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap(),
    );
    let archive = tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::open(&file).await.unwrap(),
        1 << 20,
    );
    let registry = ums_tests::registry::Registry::shared_tls();
    let ca = std::fs::read(registry.ca.as_ref().unwrap()).unwrap();
    let client = ums_checkpoint_image::client(&[], &[ca]).unwrap();
    let tag = ums_tests::unique("counter-main-");
    let pushed = ums_checkpoint_image::push(
        &client,
        &format!("{}/ums-test/checkpoints:{tag}", registry.push_address),
        "main",
        archive,
    )
    .await
    .unwrap();
    assert_eq!(
        pushed.archive_bytes,
        std::fs::metadata(&file).unwrap().len()
    );
    // The destination's nodes pull it by digest from the registry's address they know.
    let image = pushed
        .reference
        .replacen(&registry.push_address, &registry.pod_address, 1);
    cloud.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &plain_counter_pod(&image),
    );
    let restored_ip = cloud
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    assert_ne!(
        restored_ip, ip,
        "a new pod in another cluster has an IP of its own"
    );
    let after = ask_service(&restored_ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(
        after.tick > before.tick,
        "the counter went on from {} (before the checkpoint) to {}",
        before.tick,
        after.tick
    );
    // Restored, not started afresh: its log has no start line, its counter did not restart.
    let output = cloud.cri_container_output("counter", "main");
    let first = output
        .iter()
        .find(|l| l.starts_with("tick="))
        .cloned()
        .unwrap_or_default();
    let first_tick: u64 = first
        .split_whitespace()
        .next()
        .and_then(|t| t.strip_prefix("tick="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        first_tick >= before.tick,
        "the restored log starts at {first:?}"
    );
}

/// A wrapped pod (the container-level interface) on CRI nodes: the webhook's privileged
/// runtime container runs its nested engine under containerd's `privileged`, and one UMS call
/// moves the service to another CRI cluster with its memory.
async fn a_wrapped_pod_migrates_between_cri_nodes(interface: &str) {
    let two = ums_tests::coordinator::TwoClusters::start_with_cri_nodes();
    let (edge, cloud) = (&two.edge, &two.cloud);
    for cluster in [edge, cloud] {
        for image in [
            format!("ums-rs/{interface}:latest"),
            "ums-rs/ambassador:latest".to_owned(),
        ] {
            cluster.cri_node_import(&image);
        }
    }
    let name = "service";
    let pod = ums_tests::service_pod::service_pod(name, interface, None, &[("app", 32)]);
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let source_ip = edge
        .wait_running_and_ready(name, Duration::from_secs(300))
        .await;
    let before = ums_tests::poll(
        "the wrapped service to answer",
        Duration::from_secs(120),
        || ask_service(&source_ip, 8080),
    )
    .await;
    let (status, report) = two
        .migrate(json!({"name": name, "destinationUrl": two.destination}))
        .await;
    assert_eq!(
        status,
        200,
        "{report}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}\n--- edge node:\n{}",
        two.edge_coordinator.log(),
        two.cloud_coordinator.log(),
        edge.node_log()
    );
    assert_eq!(report["migrationInterface"], interface, "{report}");
    let ip = report["destination"]["podIp"].as_str().unwrap();
    let after = ums_tests::poll(
        "the moved service to answer",
        Duration::from_secs(60),
        || ask_service(ip, 8080),
    )
    .await;
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
    // The runtime container ran privileged under containerd: what its spec asked for.
    let runtime = &cloud.get_json(&["pod", name])["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "runtime")
        .cloned()
        .unwrap();
    assert_eq!(runtime["securityContext"]["privileged"], true, "{runtime}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_dind_pod_migrates_between_cri_nodes() {
    a_wrapped_pod_migrates_between_cri_nodes("dind").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_pind_pod_migrates_between_cri_nodes() {
    a_wrapped_pod_migrates_between_cri_nodes("pind").await;
}
