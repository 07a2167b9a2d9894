//! The orchestrator-level interface (`ssu`, the Pisa workflow) on CRI clusters, through the
//! real images: the transfer on its own (a kubelet checkpoint leaves its node through the node
//! part, as deployed, straight to the destination coordinator, and becomes a checkpoint image
//! its node restores); one `POST /migrate` and a `LiveMigration` moving an unannotated pod;
//! what is refused before anything is checkpointed; a destination that fails, or whose
//! coordinator dies, after the source was stopped.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::json;
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{
    call_result, client_with, live_migration, CoordinatorCerts, Credential, RunningCoordinator,
    TwoClusters,
};
use ums_tests::service_pod::{
    ask_service, plain_counter_pod, run_journaling_counter, run_plain_counter,
};
use ums_tests::workload::{journal_goes_on, journal_ticks, tls_registry_workload_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_uploaded_to_the_destination_coordinator_restores_in_its_cluster() {
    let edge = Cluster::start_with_cri_node();
    let cloud = Cluster::start_with_cri_node();
    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);
    let as_edge = Credential::ClientCertificate {
        cert: edge_certs.cert.clone(),
        key: edge_certs.key.clone(),
    };

    // The checkpoint, as the source takes it: the kubelet endpoint of the pod's node.
    let (_, before) = run_plain_counter(&edge).await;
    let path = edge.kubelet_checkpoint("default", "counter", "main").await;
    edge.kubectl(User::Jane, &["delete", "pod", "counter", "--wait=false"]);
    let archive = edge
        .node_checkpoint_dir()
        .join(path.rsplit('/').next().unwrap());

    // The upload credential: peers only, one migration's uploads only.
    let address = &cloud_coordinator.address;
    let ca = &cloud_certs.ca;
    let request = json!({"migrationId": "m-orchestrator-1"});
    let (status, answer) = call_result(
        address,
        ca,
        &Credential::Bearer(cloud_coordinator.api_token.clone()),
        "POST",
        "/checkpoint-uploads",
        Some(request.clone()),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "an operator's token is not a peer: {answer}");
    let (status, answer) = call_result(
        address,
        ca,
        &as_edge,
        "POST",
        "/checkpoint-uploads",
        Some(request),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let token = answer["uploadToken"].as_str().unwrap().to_owned();

    // The archive streams in (as the source's node sends it) and becomes an image.
    let client = client_with(ca, &Credential::None);
    // `whole`: the archive; else its first MiB (a refused upload's body is read up to 64 MiB,
    // then the connection is cut: a sender with a wrong credential gets no answer past that).
    let upload = |migration: &'static str, token: Option<String>, whole: bool| {
        let client = client.clone();
        let archive = archive.clone();
        async move {
            let body = if whole {
                let file = tokio::fs::File::open(&archive).await.unwrap();
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file))
            } else {
                let mut bytes = std::fs::read(&archive).unwrap();
                bytes.truncate(1 << 20);
                reqwest::Body::from(bytes)
            };
            let mut request = client
                .put(format!("https://{address}/checkpoints/{migration}/main"))
                .body(body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, answer) = upload("m-orchestrator-1", None, false).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = upload("m-other", Some(token.clone()), false).await;
    assert_eq!(
        status, 403,
        "the credential opens its own migration's uploads only: {answer}"
    );

    // The archive leaves the source node through the node part (deploy/node, as deployed),
    // straight to the destination coordinator.
    let (node_part, node_part_ip) = edge.deploy_node_part().await;
    let coordinator_token = edge.coordinator_token_for(
        "ums-system",
        &node_part,
        ums_contract::credential::Scope::Coordinator,
    );
    let send = |body: serde_json::Value, token: Option<String>| {
        let url = format!("http://{node_part_ip}:8889/send");
        async move {
            let mut request = reqwest::Client::new().post(url).json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let send_body = |archive: &str| {
        json!({"archive": archive,
               "url": format!("https://{}/checkpoints/m-orchestrator-1/main",
                              cloud_coordinator.pod_network_address),
               "token": token, "caPem": std::fs::read_to_string(ca).unwrap()})
    };
    let (status, answer) = send(send_body(&path), None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = send(
        send_body("../../etc/shadow"),
        Some(coordinator_token.clone()),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = send(send_body(&path), Some(coordinator_token.clone())).await;
    assert_eq!(status, 200, "{answer}\n{}", cloud_coordinator.log());
    assert_eq!(
        answer["bytes"].as_u64().unwrap(),
        std::fs::metadata(&archive).unwrap().len()
    );
    let answer = answer["destination"].clone();
    assert_eq!(
        answer["archiveBytes"].as_u64().unwrap(),
        std::fs::metadata(&archive).unwrap().len()
    );
    // Once the migration is over, the node part removes the archive.
    let response = reqwest::Client::new()
        .delete(format!(
            "http://{node_part_ip}:8889/archives/{}",
            path.rsplit('/').next().unwrap()
        ))
        .bearer_auth(&coordinator_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    assert!(!archive.exists(), "the archive is removed from the node");
    let image = answer["image"].as_str().unwrap().to_owned();
    assert!(image.contains("@sha256:"), "{answer}");

    // The destination's node restores the container from it.
    cloud.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &plain_counter_pod(&image),
    );
    let restored_ip = cloud
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    let after = ask_service(&restored_ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
}

/// One `POST /migrate` moves an ordinary, unannotated two-container pod between two CRI
/// clusters: the kubelet checkpoints both containers at once, the source pod is stopped, the
/// node part sends the archives to the destination coordinator, which restores the pod from
/// checkpoint images. The service goes on at the destination with its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ums_call_moves_an_unannotated_two_container_pod() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;
    edge.deploy_node_part().await;
    let image = tls_registry_workload_image();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "service", "labels": {"app": "service"}},
        "spec": {"containers": [
            {"name": "main", "image": image,
             "env": [{"name": "WORKLOAD_MIB", "value": "32"},
                     {"name": "WORKLOAD_LISTEN", "value": "8080"},
                     {"name": "WORKLOAD_SINK", "value": "9000"}],
             "readinessProbe": {"tcpSocket": {"port": 8080}}},
            {"name": "side", "image": image,
             "env": [{"name": "WORKLOAD_MIB", "value": "8"},
                     {"name": "WORKLOAD_JOURNAL", "value": "/data/journal"}],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
        ],
        "volumes": [{"name": "data", "emptyDir": {}}]}
    });
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let source_ip = edge
        .wait_running_and_ready("service", Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    // The side container's journal, in the pod's emptyDir, which a checkpoint does not carry.
    let source_journal = edge.empty_dir("service", "data").join("journal");
    let journaled = journal_ticks(&source_journal);
    assert!(
        !journaled.is_empty(),
        "the journal has lines before the move"
    );
    // The destination as the node part reaches it too (pods send it the archives).
    let destination = two.destination.clone();

    // A pod already under migration is refused before anything is checkpointed.
    edge.kubectl(
        User::Coordinator,
        &["annotate", "pod", "service", "migration-id=other"],
    );
    let (status, answer) = two
        .migrate(json!({"name": "service", "destinationUrl": destination}))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("being migrated"),
        "{answer}"
    );
    edge.kubectl(
        User::Coordinator,
        &["annotate", "pod", "service", "migration-id-"],
    );
    assert_no_archives(edge, "nothing was checkpointed");

    // A client holds a connection to the service while it moves: the checkpoint takes it
    // (restored closed: the pod has a new IP at the destination).
    let held = tokio::net::TcpStream::connect((source_ip.as_str(), 9000))
        .await
        .unwrap();
    let (status, report) = two
        .migrate(json!({"name": "service", "destinationUrl": destination}))
        .await;
    drop(held);
    assert_eq!(
        status,
        200,
        "{report}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}\n--- edge node:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log(),
        edge.node_log()
    );
    // The figures the README quotes (run with --nocapture).
    eprintln!("orchestrator-level report: {report}");
    assert_eq!(report["migrationInterface"], "ssu", "{report}");
    let details = &report["sidecar"];
    assert_eq!(
        details["checkpoints"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    assert!(details["checkpointSkewMs"].is_u64(), "{report}");
    assert!(details["divergenceMs"].is_u64(), "{report}");
    assert!(
        details["totals"]["contentBytes"].as_u64().unwrap() > 32 << 20,
        "{report}"
    );
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "checking",
            "locking",
            "checkpointing",
            "stopping",
            "transferring",
            "creating",
            "finishing"
        ],
        "{report}"
    );

    // The source pod is gone, its archives removed from its node.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while edge
        .kubectl_result(User::Admin, &["get", "pod", "service"])
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < until,
            "the source pod is still there"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_no_archives(edge, "the archives are removed");
    // The service goes on at the destination, from where it stopped, memory intact.
    let ip = report["destination"]["podIp"].as_str().unwrap();
    assert_eq!(cloud.get_json(&["pod", "service"])["status"]["podIP"], ip);
    let after = ask_service(ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
    // The second container was restored too: its log at the destination starts past zero.
    let side = cloud.cri_container_output("service", "side");
    let first: u64 = side
        .iter()
        .find_map(|l| {
            l.strip_prefix("tick=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        first > 10,
        "side's restored log starts at tick {first}: {side:?}"
    );
    assert_eq!(
        cloud.get_json(&["pod", "service"])["metadata"]["labels"]["app"],
        "service",
        "the labels came along (Services select it)"
    );
    // The emptyDir came along, its journal file in place before the side container was
    // restored (it holds it open), and goes on from where it was.
    let carried = &details["emptyDirs"];
    assert_eq!(carried["volumes"], json!(["data"]), "{report}");
    assert!(
        carried["restored"]["entries"].as_u64().unwrap() >= 2,
        "{report}"
    );
    let journal = cloud.empty_dir("service", "data").join("journal");
    journal_goes_on(&journal, *journaled.last().unwrap()).await;
    let journaled_in_cloud = journal_ticks(&journal);

    // And back, by a LiveMigration object in cloud: a second hop, through cloud's node part.
    cloud.deploy_node_part().await;
    let status = live_migration(
        cloud,
        "back-to-edge",
        json!({"pod": "service", "destination": edge_coordinator.pod_network_address}),
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(
        status["phase"],
        "Succeeded",
        "{status}\n{}",
        two.coordinator_logs()
    );
    assert_eq!(status["destinationCluster"], edge.name.as_str());
    let back_ip = edge
        .wait_running_and_ready("service", Duration::from_secs(60))
        .await;
    let back = ask_service(&back_ip, 8080).await.unwrap();
    assert!(back.memory_ok, "{back:?}");
    assert!(back.tick > after.tick, "{after:?} -> {back:?}");
    // The journal made the second hop too (the restored pod's init container, removed from
    // the spec it moves with, was added again for edge).
    let back_journal = edge.empty_dir("service", "data").join("journal");
    journal_goes_on(&back_journal, *journaled_in_cloud.last().unwrap()).await;
    let init = edge.get_json(&["pod", "service"])["spec"]["initContainers"].clone();
    assert_eq!(init.as_array().map(Vec::len), Some(1), "{init}");
}

/// The source node's checkpoint directory is empty (no archive of any kind).
fn assert_no_archives(cluster: &Cluster, why: &str) {
    let left: Vec<_> = std::fs::read_dir(cluster.node_checkpoint_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{why}: {left:?}");
}

/// The destination fails after the source was stopped (its node cannot pull the checkpoint
/// images: its coordinator names them by an address nothing serves): the destination deletes
/// its copy, and the source's coordinator restores the pod at the source from the archives on
/// its node. The service goes on at the source with its memory; one copy, never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_fails_after_the_stop_leaves_the_service_restored_at_the_source() {
    let edge = Cluster::start_with_cri_node();
    let cloud = Cluster::start_with_cri_node();
    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    let nowhere = format!(
        "127.0.0.1:{}/ums-checkpoints/nowhere",
        ums_tests::registry::free_port()
    );
    let cloud_coordinator = RunningCoordinator::start_with_env(
        &cloud,
        &cloud_certs,
        &[&edge_certs.ca],
        &[("UMS_CHECKPOINT_REGISTRY_PULL", &nowhere)],
    );
    edge.deploy_node_part().await;
    let (_, before) = run_journaling_counter(&edge).await;
    let journaled = journal_ticks(&edge.empty_dir("counter", "data").join("journal"));
    let (status, answer) = call_result(
        &edge_coordinator.address,
        &edge_certs.ca,
        &Credential::Bearer(edge_coordinator.api_token.clone()),
        "POST",
        "/migrate",
        Some(json!({"name": "counter", "destinationUrl": cloud_coordinator.pod_network_address})),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            status,
            answer["phase"].as_str(),
            answer["serviceRunsAt"].as_str()
        ),
        (502, Some("creating"), Some("source")),
        "{answer}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}\n--- edge's node part:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log(),
        edge.cri_container_output_in("ums-system", "ums-node-1", "ums-node").join("\n")
    );
    restored_at_the_source_only(&answer, &edge, &cloud, &before).await;
    // Its emptyDir too: the archive the node part wrote came back through the init container.
    let journal = edge.empty_dir("counter", "data").join("journal");
    journal_goes_on(&journal, *journaled.last().unwrap()).await;
    assert_no_archives(&edge, "the archives are removed once the pod runs again");
}

/// What would make the move fail is refused before anything is checkpointed, the pod left
/// running and unlocked: a base image the destination's registry does not know (containerd
/// restores a checkpoint onto its base image), and a pod on a node whose runtime cannot
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_would_fail_at_the_destination_or_the_node_is_refused_before_any_checkpoint() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud_certs,
        cloud_coordinator,
        ..
    } = &two;
    edge.deploy_node_part().await;
    let destination = two.destination.clone();

    // A base image only edge's node has: the workload tagged there under a name its registry
    // never received.
    run_plain_counter(edge).await;
    let image = tls_registry_workload_image();
    let registry = image.split('/').next().unwrap();
    let local_only = format!("{registry}/ums-test/only-on-edge:1");
    edge.cri_node_exec(&["ctr", "-n", "k8s.io", "images", "tag", image, &local_only]);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "local"},
        "spec": {"containers": [{"name": "main", "image": local_only, "imagePullPolicy": "Never",
            "env": [{"name": "WORKLOAD_MIB", "value": "8"}, {"name": "WORKLOAD_LISTEN", "value": "8080"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}}}]}
    });
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let ip = edge
        .wait_running_and_ready("local", Duration::from_secs(120))
        .await;
    let (status, answer) = two
        .migrate(json!({"name": "local", "destinationUrl": destination}))
        .await;
    assert_eq!(
        (status, answer["phase"].as_str()),
        (409, Some("checking")),
        "{answer}\n--- cloud coordinator:\n{}",
        cloud_coordinator.log()
    );
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains(&local_only) && message.contains("base image of container main"),
        "{answer}"
    );
    assert_no_archives(edge, "nothing was checkpointed");
    let annotations = edge.get_json(&["pod", "local"])["metadata"]["annotations"].clone();
    assert!(
        annotations.get("migration-id").is_none()
            && annotations
                .get("migration.ums-rs.io/locked-by-coordinator")
                .is_none(),
        "not locked: {annotations}"
    );
    assert!(ask_service(&ip, 8080).await.unwrap().memory_ok);

    // A pod with an emptyDir, on a node whose node part does not mount the kubelet's pod
    // directories: refused naming the volume, nothing checkpointed.
    edge.deploy_node_part_with(false).await;
    let mut journaling: serde_json::Value = serde_json::from_str(
        &ums_tests::service_pod::journaling_counter_pod(tls_registry_workload_image()),
    )
    .unwrap();
    journaling["metadata"]["name"] = "journaling".into();
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &journaling.to_string());
    edge.wait_running_and_ready("journaling", Duration::from_secs(120))
        .await;
    let (status, answer) = two
        .migrate(json!({"name": "journaling", "destinationUrl": destination}))
        .await;
    assert_eq!(
        (status, answer["phase"].as_str()),
        (409, Some("checking")),
        "{answer}"
    );
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("emptyDir volumes (data)") && message.contains("pod directories"),
        "{answer}"
    );
    assert_no_archives(edge, "nothing was checkpointed");

    // A node whose runtime cannot checkpoint (Docker): refused naming it, before its kubelet
    // is asked anything.
    let docker = Cluster::start_with_node();
    let docker_certs = CoordinatorCerts::generate(&docker);
    let docker_coordinator = RunningCoordinator::start_with_env(
        &docker,
        &docker_certs,
        &[&cloud_certs.ca],
        &[("UMS_KUBELET_INSECURE_TLS", "true")],
    );
    // Bound to the node by name, as a scheduler binds it.
    let plain = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "plain"},
        "spec": {"nodeName": docker.name, "containers": [{"name": "main", "image": "ums-rs/debian:trixie",
            "imagePullPolicy": "IfNotPresent", "command": ["sleep", "infinity"]}]}
    });
    docker.kubectl_with_input(User::Jane, &["create", "-f", "-"], &plain.to_string());
    docker
        .wait_running_and_ready("plain", Duration::from_secs(120))
        .await;
    let (status, answer) = call_result(
        &docker_coordinator.address,
        &docker_certs.ca,
        &Credential::Bearer(docker_coordinator.api_token.clone()),
        "POST",
        "/migrate",
        Some(json!({"name": "plain", "destinationUrl": destination})),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, answer["phase"].as_str()),
        (409, Some("checking")),
        "{answer}"
    );
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("runs docker://") && message.contains("containerd >= 2.0"),
        "{answer}"
    );
    assert_eq!(
        docker.get_json(&["pod", "plain"])["status"]["phase"],
        "Running"
    );
}

/// The destination coordinator dies once the source was checkpointed and stopped, while the
/// archives move to it: its Deployment brings it back, the source's coordinator asks it again
/// until it says it holds no copy, then restores the pod at the source from the archives.
/// The service comes back with its memory; exactly one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_coordinator_killed_after_the_checkpoint_and_the_service_comes_back_once() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;
    edge.deploy_node_part().await;
    let (_, before) = run_plain_counter(edge).await;
    let migration = two.migrate_to_cloud_in_background("counter");
    past_the_stop(&two).await;
    cloud_coordinator.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| cloud_coordinator.restart());

    let (status, answer) = migration.await.unwrap().unwrap();
    assert_eq!(
        (status, answer["serviceRunsAt"].as_str()),
        (502, Some("source")),
        "{answer}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log()
    );
    assert!(
        edge_coordinator
            .log()
            .contains("the destination does not say it holds no copy; asking again"),
        "the source asked the restarting destination again:\n{}",
        edge_coordinator.log()
    );
    restored_at_the_source_only(&answer, edge, cloud, &before).await;
}

/// After a failed move past the stop: the answer says the destination holds no copy and the
/// pod was restored at the source; no counter pod in cloud, the one in edge runs on from
/// where it was (`before`) with its memory intact.
async fn restored_at_the_source_only(
    answer: &serde_json::Value,
    edge: &Cluster,
    cloud: &Cluster,
    before: &ums_tests::service_pod::ServiceAnswer,
) {
    let rollback = answer["rollback"].to_string();
    assert!(
        rollback.contains("the destination holds no copy"),
        "{answer}"
    );
    assert!(rollback.contains("restored at the source"), "{answer}");
    runs_again_at_the_source_only(edge, cloud, before, Duration::from_secs(60)).await;
}

/// Exactly one copy: no counter pod in cloud, the one in edge (ready within `deadline`) runs
/// on from where it was (`before`) with its memory intact.
async fn runs_again_at_the_source_only(
    edge: &Cluster,
    cloud: &Cluster,
    before: &ums_tests::service_pod::ServiceAnswer,
    deadline: Duration,
) {
    assert!(
        cloud
            .kubectl_result(User::Admin, &["get", "pod", "counter"])
            .is_err(),
        "no copy at the destination"
    );
    let ip = edge.wait_running_and_ready("counter", deadline).await;
    let after = ask_service(&ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
}

/// Until edge's migration has passed the stop (the archives are the service now); panics
/// unless it is then between the stop and its end.
async fn past_the_stop(two: &TwoClusters) {
    let seen = ums_tests::poll(
        "edge's migration to pass the stop",
        Duration::from_secs(120),
        || async {
            two.edge_phase().await.filter(|phase| {
                !matches!(
                    phase.as_str(),
                    "checking" | "locking" | "checkpointing" | "stopping"
                )
            })
        },
    )
    .await;
    assert!(
        seen == "transferring" || seen == "creating",
        "the test must catch the migration between the stop and its end, it saw {seen}"
    );
}

/// The source's coordinator dies once the source pod was checkpointed and stopped: its pod
/// object is gone, and the migration's journal (a configMap in the pod's namespace) names the
/// archives on the node. The coordinator that starts again has the destination delete any
/// copy it made and restores the pod at the source from them: the service comes back with its
/// memory, exactly one copy, the journal and the archives gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_coordinator_killed_after_the_stop_restores_the_service_from_its_journal() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        ..
    } = &two;
    edge.deploy_node_part().await;
    let (_, before) = run_journaling_counter(edge).await;
    let journaled = journal_ticks(&edge.empty_dir("counter", "data").join("journal"));
    let migration = two.migrate_to_cloud_in_background("counter");
    past_the_stop(&two).await;
    edge_coordinator.kill();
    assert!(
        migration.await.unwrap().is_err(),
        "the call dies with the coordinator"
    );
    let journals = || {
        edge.get_json(&["configmaps", "-l", "migration.ums-rs.io/ssu-journal"])["items"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(journals(), 1, "the migration's journal is there");

    tokio::task::block_in_place(|| edge_coordinator.restart());
    ums_tests::poll(
        "the restarted coordinator to restore the pod at the source",
        Duration::from_secs(180),
        || async {
            edge.kubectl_result(User::Admin, &["get", "pod", "counter"])
                .is_ok()
                .then_some(())
        },
    )
    .await;
    runs_again_at_the_source_only(edge, cloud, &before, Duration::from_secs(120)).await;
    // With its emptyDir, taken from the node part by the restarted coordinator.
    let journal = edge.empty_dir("counter", "data").join("journal");
    journal_goes_on(&journal, *journaled.last().unwrap()).await;
    ums_tests::poll(
        "the journal to be deleted once the pod runs again",
        Duration::from_secs(60),
        || async { (journals() == 0).then_some(()) },
    )
    .await;
    assert_no_archives(edge, "the archives are removed");
    assert!(
        edge_coordinator
            .log()
            .contains("finished an orchestrator-level migration from its journal"),
        "{}",
        edge_coordinator.log()
    );
}

/// A coordinator that stopped while the kubelet checkpointed: its journal (written before the
/// checkpoints, as the coordinator writes it) names no archive yet, and the pod was never
/// stopped. The coordinator that starts again removes what that pod's checkpoints left on the
/// node since the journal, and nothing else (another pod's archive stays), drops the journal,
/// and the service runs on untouched. (Killing a coordinator inside the kubelet's checkpoint
/// cannot be timed here: the journal is written by hand, the archives by the real kubelet
/// endpoint.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_stopped_while_checkpointing_leaves_no_archive_behind() {
    let edge = Cluster::start_with_cri_node();
    let cloud = Cluster::start_with_cri_node();
    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    edge.deploy_node_part().await;
    let (ip, before) = run_plain_counter(&edge).await;
    let mut other: serde_json::Value =
        serde_json::from_str(&plain_counter_pod(tls_registry_workload_image())).unwrap();
    other["metadata"]["name"] = "other".into();
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &other.to_string());
    edge.wait_running_and_ready("other", Duration::from_secs(120))
        .await;
    let kept = edge.kubelet_checkpoint("default", "other", "main").await;

    let pod = edge.get_json(&["pod", "counter"]);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let journal = json!({
        "migrationId": "m-interrupted",
        "destination": cloud.name,
        "node": edge.name,
        "checkpoints": [],
        "startedUnixMs": started,
        "pod": pod,
    });
    let config_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ums-ssu-m-interrupted",
                     "labels": {"migration.ums-rs.io/ssu-journal": "m-interrupted"}},
        "data": {"journal.json": journal.to_string()},
    });
    // What the kubelet wrote for the checkpoint the coordinator asked for before it stopped
    // (before the journal appears: a coordinator finishing journals every minute must find
    // it there whenever it looks).
    let left = edge.kubelet_checkpoint("default", "counter", "main").await;
    let name_of = |path: &str| path.rsplit('/').next().unwrap().to_owned();
    assert!(edge.node_checkpoint_dir().join(name_of(&left)).exists());
    edge.kubectl_with_input(User::Admin, &["create", "-f", "-"], &config_map.to_string());
    // Locked, as the coordinator locks it before the journal.
    edge.kubectl(
        User::Coordinator,
        &[
            "annotate",
            "pod",
            "counter",
            "migration-id=m-interrupted",
            &format!("migration.ums-rs.io/locked-by-coordinator={}", edge.name),
        ],
    );

    edge_coordinator.kill();
    tokio::task::block_in_place(|| edge_coordinator.restart());
    ums_tests::poll(
        "the restarted coordinator to finish the interrupted migration's journal",
        Duration::from_secs(120),
        || async {
            edge.kubectl_result(User::Admin, &["get", "configmap", "ums-ssu-m-interrupted"])
                .is_err()
                .then_some(())
        },
    )
    .await;
    let files: Vec<String> = std::fs::read_dir(edge.node_checkpoint_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        [name_of(&kept)],
        "the interrupted checkpoint's archive is removed, another pod's stays\n{}",
        edge_coordinator.log()
    );
    assert!(
        edge_coordinator
            .log()
            .contains("archive(s) of the interrupted checkpoint removed"),
        "{}",
        edge_coordinator.log()
    );
    assert_eq!(
        edge.get_json(&["pod", "counter"])["metadata"]["uid"],
        pod["metadata"]["uid"],
        "the same pod runs on"
    );
    ums_tests::poll(
        "the pod to be unlocked",
        Duration::from_secs(60),
        || async {
            let annotations = edge.get_json(&["pod", "counter"])["metadata"]["annotations"].clone();
            (annotations.get("migration-id").is_none()
                && annotations
                    .get("migration.ums-rs.io/locked-by-coordinator")
                    .is_none())
            .then_some(())
        },
    )
    .await;
    let after = ask_service(&ip, 8080).await.unwrap();
    assert!(after.memory_ok && after.tick > before.tick, "{after:?}");
}
