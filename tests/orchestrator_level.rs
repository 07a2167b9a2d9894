//! The orchestrator-level interface (`ssu`, the Pisa workflow) on CRI clusters, through the
//! real images. What is built so far: the transfer. A checkpoint from the kubelet endpoint of
//! the source's node leaves that node through the node part (deploy/node, as deployed), goes
//! straight to the destination coordinator with the migration's upload credential, and becomes
//! a checkpoint image in the destination's registry, from which its node restores the
//! container. The source coordinator's flow that drives these steps is not built yet (README).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::json;
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{
    call_result, client_with, CoordinatorCerts, Credential, RunningCoordinator,
};
use ums_tests::service_pod::ask_service;
use ums_tests::workload::tls_registry_workload_image;

fn counter_pod(image: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "counter"},
        "spec": {"containers": [{"name": "main", "image": image,
            "env": [{"name": "WORKLOAD_MIB", "value": "64"},
                    {"name": "WORKLOAD_LISTEN", "value": "8080"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}}}]}
    })
    .to_string()
}

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
    edge.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &counter_pod(tls_registry_workload_image()),
    );
    let ip = edge
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ask_service(&ip, 8080).await.unwrap();
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
    cloud.kubectl_with_input(User::Jane, &["create", "-f", "-"], &counter_pod(&image));
    let restored_ip = cloud
        .wait_running_and_ready("counter", Duration::from_secs(120))
        .await;
    let after = ask_service(&restored_ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
}
